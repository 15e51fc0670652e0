"""Run folders: finding them, describing them, and choosing the one a run resumes.

A run folder is `<paths.log_dir>/<task>/runs/<timestamp>/` (or a multirun job's folder) holding
the resolved `config.yaml` that `pipeline._prepare` saves and `checkpoints/last.ckpt`. Two
configs describe the same run when they agree on the kind of task, the network (the `backbone`
group without `pretrained`, since the checkpoint holds every weight, and the `head` group) and the
data (the `data` group without `loader`: batch size and workers say how the data is read, not
which data it is). Values are compared resolved, never as file text.

`resolve_checkpoint(value, cfg)` turns a `ckpt_path` / `resume` value into a checkpoint file:
a `.ckpt` file, a run folder (its `checkpoints/last.ckpt`), or `last` (the newest run under
`paths.log_dir` that describes the same run as `cfg`; an error naming the candidates when none
does). `check_checkpoint_fits` refuses a checkpoint of another task or network before anything
is built. `continue_in` makes a resumed run write into its original folder.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from pvtlab.config import ConfigError, head_kind, task_kind

__all__ = [
    "LAST_CHECKPOINT",
    "RUN_CONFIG",
    "check_checkpoint_fits",
    "continue_in",
    "describe",
    "newest_matching_run",
    "resolve_checkpoint",
    "resume_command",
    "run_folder",
    "runs_with_last_checkpoint",
]

log = logging.getLogger(__name__)

RUN_CONFIG = "config.yaml"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
# Candidates named in the error of a `last` that matches no run.
SHOWN_CANDIDATES = 5
# Overrides that choose what to resume: replaced by `resume=<run dir>` in a resume command.
RESUME_KEYS = ("ckpt_path", "resume")


def run_folder(path: str | Path) -> Path | None:
    """The run folder `path` is or belongs to: a folder holding `config.yaml`, or the folder above
    the `checkpoints/` that holds the file `path`; None for a file outside a run folder."""
    path = Path(path)
    if path.is_dir():
        return path if (path / RUN_CONFIG).is_file() else None
    if path.parent.name == LAST_CHECKPOINT.parent.name:
        folder = path.parent.parent
        if (folder / RUN_CONFIG).is_file():
            return folder
    return None


def runs_with_last_checkpoint(log_dir: str | Path) -> list[Path]:
    """Every run folder under `log_dir` with a `config.yaml` and a `checkpoints/last.ckpt`,
    newest (last checkpoint written) first."""
    found = [
        ckpt.parent.parent
        for ckpt in Path(log_dir).rglob(str(LAST_CHECKPOINT))
        if (ckpt.parent.parent / RUN_CONFIG).is_file()
    ]
    return sorted(found, key=lambda run: (run / LAST_CHECKPOINT).stat().st_mtime, reverse=True)


def describe(cfg: DictConfig) -> dict[str, Any]:
    """What identifies a run in a config: task kind, network and data, resolved plain values."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone.pop("pretrained", None)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    data.pop("loader", None)
    return {
        "task": task_kind(cfg),
        "backbone": backbone,
        "head": OmegaConf.to_container(cfg.head, resolve=True),
        "data": data,
    }


def _saved_config(run: Path) -> DictConfig | None:
    try:
        saved = OmegaConf.load(run / RUN_CONFIG)
    except Exception as error:  # a hand-edited or truncated file: that run is not a candidate
        log.warning("%s cannot be read (%s); skipped", run / RUN_CONFIG, error)
        return None
    return saved if isinstance(saved, DictConfig) else None


def _saved_description(run: Path) -> dict[str, Any] | None:
    saved = _saved_config(run)
    if saved is None or not all(key in saved for key in ("task", "backbone", "head", "data")):
        return None
    try:
        return describe(saved)
    except Exception as error:  # e.g. a task class that no longer imports
        log.warning("%s does not describe a run (%s); skipped", run / RUN_CONFIG, error)
        return None


def _choices(run: Path) -> str:
    """`backbone=..., head=..., data=...` as the run's Hydra record names them."""
    overrides = run / ".hydra" / "hydra.yaml"
    choices: Mapping[str, Any] = {}
    if overrides.is_file():
        try:
            choices = OmegaConf.load(overrides).hydra.runtime.choices
        except Exception:  # the record is informative only
            choices = {}
    saved = _saved_config(run)
    names = []
    for group in ("backbone", "head", "data"):
        choice = choices.get(group)
        if choice is None and saved is not None and group in saved:
            node = saved[group]
            choice = node.get("name") or str(node.get("_target_", "?")).rpartition(".")[2]
        names.append(f"{group}={choice}")
    return ", ".join(names)


def newest_matching_run(cfg: DictConfig) -> Path:
    """The newest run under `cfg.paths.log_dir` with a last checkpoint that describes the same run
    as `cfg` (task kind, network, data); a ConfigError naming the candidates when none does."""
    runs = runs_with_last_checkpoint(cfg.paths.log_dir)
    wanted = describe(cfg)
    for run in runs:
        if _saved_description(run) == wanted:
            return run
    kind = wanted["task"]
    same_task = [run for run in runs if (_saved_description(run) or {}).get("task") == kind]
    if not same_task:
        raise ConfigError(
            f"ckpt_path=last: no {kind} run with a checkpoints/last.ckpt under "
            f"{cfg.paths.log_dir}; start the run without ckpt_path, or give a checkpoint file "
            "(ckpt_path=<file.ckpt>)"
        )
    shown = "; ".join(f"{run} ({_choices(run)})" for run in same_task[:SHOWN_CANDIDATES])
    more = len(same_task) - SHOWN_CANDIDATES
    raise ConfigError(
        f"ckpt_path=last: none of the {len(same_task)} {kind} runs under {cfg.paths.log_dir} "
        "was started with this config's backbone, head and data, so none is resumed. The newest: "
        f"{shown}{f' and {more} more' if more > 0 else ''}. Choose one with resume=<run dir>, "
        "with the same backbone, head and data choices as that run."
    )


def resolve_checkpoint(value: str | None, cfg: DictConfig) -> Path | None:
    """The checkpoint file a `ckpt_path` or `resume` value names, for the run `cfg` describes.

    `last`: the last checkpoint of `newest_matching_run(cfg)`; a run folder: its
    `checkpoints/last.ckpt`; a file: itself, once it looks like what `torch.save` writes.
    None for no value. Every other value is a ConfigError saying what was expected.
    """
    if value in (None, ""):
        return None
    if value == "last":
        return newest_matching_run(cfg) / LAST_CHECKPOINT
    path = Path(value)
    if path.is_dir():
        ckpt = path / LAST_CHECKPOINT
        if not ckpt.is_file():
            raise ConfigError(
                f"{value} is a folder without {LAST_CHECKPOINT}: give a run folder "
                f"(<log_dir>/<task>/runs/<timestamp>) or a .ckpt file"
            )
        return ckpt
    if not path.is_file():
        raise ConfigError(f"{value}: no such file or run folder")
    if not zipfile.is_zipfile(path):  # what torch.save writes; a cheap look before the full load
        raise ConfigError(
            f"{value} is not a checkpoint (not a file written by torch.save); give a .ckpt file "
            "or a run folder of a pvtlab run, or last"
        )
    return path


def _checkpoint_description(ckpt: Path) -> tuple[dict[str, Any] | None, str]:
    """The task kind, backbone and head a checkpoint was trained with, and where that was read:
    its run folder's config.yaml, else its `hyper_parameters['model_config']`."""
    run = run_folder(ckpt)
    if run is not None and (described := _saved_description(run)) is not None:
        return described, str(run / RUN_CONFIG)
    try:  # mmap: the hyperparameters are read, not the weights
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a pvtlab checkpoint: the trainer's own load says what is wrong
        return None, str(ckpt)
    model = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    if not model:
        return None, str(ckpt)
    backbone = dict(model["backbone"])
    backbone.pop("pretrained", None)
    head = dict(model["head"])
    return {"task": head_kind(OmegaConf.create(head)), "backbone": backbone, "head": head}, str(
        ckpt
    )


def _network(description: Mapping[str, Any]) -> str:
    backbone = description["backbone"].get("name") or description["backbone"].get("_target_")
    head = str(description["head"].get("_target_", "?")).rpartition(".")[2]
    return f"task={description['task']}, backbone {backbone}, head {head}"


def check_checkpoint_fits(ckpt: str | Path, cfg: DictConfig) -> None:
    """A ConfigError naming both when `ckpt` was trained for another task or network than `cfg`
    (task kind, backbone without `pretrained`, head); a checkpoint without a description passes."""
    found, source = _checkpoint_description(Path(ckpt))
    if found is None:
        return
    wanted = describe(cfg)
    keys = ("backbone", "head") if found["task"] is None else ("task", "backbone", "head")
    if all(found[key] == wanted[key] for key in keys):
        return
    differ = [key for key in keys if found[key] != wanted[key]]
    raise ConfigError(
        f"ckpt_path={ckpt} was trained as {_network(found)} (read from {source}), but this "
        f"config is {_network(wanted)}; they differ in {', '.join(differ)}. Resume it with the "
        "same choices as its run (resume=<its run dir> and its task / backbone / head), or "
        "start a new run from its weights with load_from=."
    )


def continue_in(cfg: DictConfig, run: Path) -> Path:
    """Point this process's outputs at `run`, the folder of the run it resumes.

    Hydra opens a fresh run folder before the application starts, so the switch happens here:
    `paths.output_dir` (which checkpoints, loggers and predictions interpolate) becomes `run`, the
    lines this process has logged so far are appended to the run's log file and the file handler
    continues there, and the fresh folder, holding nothing but Hydra's record and that log, is
    removed. Returns the folder outputs now go to.
    """
    fresh = Path(cfg.paths.output_dir)
    if fresh.resolve() == run.resolve():
        return run
    with open_dict(cfg):
        cfg.paths.output_dir = str(run)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == fresh:
            _append_log(handler, run / Path(handler.baseFilename).name)
    leftovers = {entry.name for entry in fresh.iterdir()} if fresh.is_dir() else set()
    if leftovers and all(name == ".hydra" or name.endswith(".log") for name in leftovers):
        shutil.rmtree(fresh, ignore_errors=True)
    log.info("Resuming in %s", run)
    return run


def _append_log(handler: logging.FileHandler, target: Path) -> None:
    handler.acquire()
    try:
        handler.close()
        source = Path(handler.baseFilename)
        with target.open("a") as out:
            if source.is_file():
                out.write(source.read_text())
        handler.baseFilename = str(target)
        handler.mode = "a"  # opened again at the next record
    finally:
        handler.release()


def resume_command(run: str | Path) -> str:
    """`python src/train.py <this run's overrides> resume=<run>`: the command that continues
    `run`; this process's own overrides as Hydra recorded them, less any ckpt_path / resume."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = [
            str(o)
            for o in HydraConfig.get().overrides.task
            if str(o).lstrip("+~").split("=", 1)[0] not in RESUME_KEYS
        ]
    except (ValueError, AttributeError):  # no Hydra run (a script calling the pipeline)
        pass
    return shlex.join(["python", "src/train.py", *overrides, f"resume={run}"])
