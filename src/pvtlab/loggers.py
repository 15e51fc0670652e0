"""Logger factories that need more than a `_target_`, and what the pipeline tells W&B.

W&B runs: each run folder holds the id of its W&B run (`wandb_run_id.txt`), chosen when the
logger is made. A run resumed from a checkpoint (`resume_from`, which the pipeline fills in with
the resolved `ckpt_path`) reads the id from the checkpoint's run folder and continues that W&B
run (`resume="allow"`). A resumed run writes into its original folder (`pvtlab.runs.continue_in`),
so its `metrics.csv` continues too (`ContinuingCSVLogger`).
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import secrets
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from pvtlab.config import task_kind
from pvtlab.sweeps.naming import job_run_name

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run_id.txt"


class _ContinuingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, which deletes a `metrics.csv` it finds in its folder; this one
    keeps its rows and appends to them (the columns grow as new metrics appear)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])


class ContinuingCSVLogger(CSVLogger):
    """Lightning's CSVLogger whose `metrics.csv` keeps the rows of the run it resumes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def wandb_account_configured() -> bool:
    """True when W&B can reach an account: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def create_wandb_logger(
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    save_dir: str | Path = ".",
    offline: bool | None = None,
    log_model: bool = False,
    job_type: str | None = None,
    resume_from: str | Path | None = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger that runs offline when no account is configured (or `offline=True`).

    Args:
        resume_from: the checkpoint a resumed run starts from: its run folder's W&B run id is
            continued. Without it (or without an id there) a new W&B run starts.
        kwargs: other `wandb.init` arguments (e.g. `id`, `notes`, `entity`).
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_account_configured()
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    name = job_run_name(name)  # one name per job of a multirun; the pipeline sets its group
    run_id = kwargs.pop("id", None) or (previous_run_id(resume_from) if resume_from else None)
    if run_id:
        kwargs.setdefault("resume", "allow")
        log.info("W&B: continuing run %s", run_id)
    else:
        run_id = new_run_id()
    # Only rank 0 holds the W&B run (Lightning's WandbLogger); under DDP the other ranks build
    # this logger too, in the same folder, and must not overwrite the id with one never used.
    if rank_zero_only.rank == 0:
        (save_dir / RUN_ID_FILE).write_text(run_id + "\n")
    return WandbLogger(
        project=project,
        name=name,
        group=group,
        tags=list(tags),
        save_dir=str(save_dir),
        offline=offline,
        log_model=log_model and not offline,
        job_type=job_type,
        id=run_id,
        **kwargs,
    )


def new_run_id() -> str:
    """8 lower-case letters and digits, as W&B's own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def previous_run_id(ckpt_path: str | Path) -> str | None:
    """The W&B run id saved in the run folder of `ckpt_path` (`<run>/checkpoints/x.ckpt`)."""
    ckpt = Path(ckpt_path)
    for folder in (ckpt.parent.parent, ckpt.parent):
        path = folder / RUN_ID_FILE
        if path.is_file() and (run_id := path.read_text().strip()):
            return run_id
    log.warning("W&B: no %s beside %s; the resumed run starts a new W&B run", RUN_ID_FILE, ckpt)
    return None


def complexity_input_size(data: DictConfig) -> tuple[int, int] | None:
    """The (H, W) a run's network sees at evaluation, from the data's transforms: `crop_size`
    (segmentation), `image_size` (classification) or `test_short_side` x `max_size`
    (detection, the paper's 800 x 1333 for COCO)."""
    if data.get("crop_size"):
        crop = data.crop_size
        crop = list(crop) if OmegaConf.is_list(crop) or isinstance(crop, list | tuple) else [crop]
        return int(crop[0]), int(crop[-1])
    if data.get("image_size"):
        return int(data.image_size), int(data.image_size)
    short = data.get("test_short_side")
    if short:
        short = int(short[-1] if OmegaConf.is_list(short) else short)
        return short, int(data.get("max_size") or short)
    return None


class _ImageList(nn.Module):
    """Detection heads take a list of images; the MAC counter gives a batch tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Any:
        return self.model(list(images))


def network_gmacs(model: nn.Module, kind: str, input_size: tuple[int, int]) -> float:
    """GMACs of one forward pass of the whole network (backbone and head) at `input_size`."""
    from pvtlab.models.complexity import count_gmacs

    return count_gmacs(_ImageList(model) if kind == "detection" else model, input_size)


def log_wandb_run_facts(logger: WandbLogger, cfg: DictConfig, model: nn.Module) -> None:
    """The resolved config as nested W&B hyperparameters, and the network's GMACs at the run's
    input size (counted once, in one forward pass; left out with a warning if that fails)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    facts: dict[str, Any] = dict(config)
    size = complexity_input_size(cfg.data.get("transforms") or OmegaConf.create())
    if size is not None:
        try:
            facts["model/gmacs"] = round(network_gmacs(model, task_kind(cfg), size), 4)
            facts["model/gmacs_input_size"] = list(size)
        except Exception as error:  # a head that cannot run on a random image: no figure
            log.warning("GMACs not counted at %s: %s: %s", size, type(error).__name__, error)
    logger.log_hyperparams(facts)
