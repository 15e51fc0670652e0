"""Train and evaluate: turn a composed config into objects, run them, return the metrics.

This is the one place where configs become objects. Data flows one way: config, then the data
module, the model and the task, then the Lightning Trainer.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torch import nn

from pvtlab import run_config, runs
from pvtlab.callbacks.progress import CompileReport, StepLog
from pvtlab.callbacks.validation import ValidateAtLastStep
from pvtlab.config import (
    HEAD_KINDS,
    ConfigError,
    check_compatible,
    choices_summary,
    head_kind,
    print_config_tree,
    save_resolved_config,
    task_class,
    task_kind,
)
from pvtlab.console import console
from pvtlab.evaluation.predictions import ClassificationPredictions
from pvtlab.loggers import log_wandb_run_facts
from pvtlab.models.release_checkpoints import load_release_state_dict, release_kind
from pvtlab.sweeps.metrics import write_metrics
from pvtlab.sweeps.naming import set_sweep_group
from pvtlab.sweeps.pretrained import check_pretrained
from pvtlab.tasks.base import FROZEN_WEIGHTS, TaskModule, frozen_weight_compilation
from pvtlab.tasks.optim import check_updates

log = logging.getLogger(__name__)


def build_model(
    backbone: Mapping[str, Any], head: Mapping[str, Any], num_classes: int
) -> nn.Module:
    """The network: a head built around a timm backbone.

    Args:
        backbone: the `backbone` config group, a partial of `pvtlab.models.create_backbone`
            (name, pretrained, drop_path_rate, ...); the head completes it, with
            ``features_only=True`` for the dense heads, with `num_classes` for the classifier.
        head: the `head` config group (`_target_` and its arguments).
        num_classes: classes of the data set.
    """
    factory = instantiate(OmegaConf.create(dict(backbone)))
    return instantiate(OmegaConf.create(dict(head)), backbone=factory, num_classes=num_classes)


def model_config(cfg: DictConfig, datamodule: Any | None = None) -> dict[str, Any]:
    """The plain, resolved description of the network that a checkpoint carries.

    `backbone` and `head` (config groups), and the classes it predicts, read from `datamodule`:
    `num_classes`, `class_names` (one per contiguous label, in label order) and `category_ids`
    (COCO's category id of each label; None for other data). Without a data module, the classes
    are `data.num_classes` alone (`class_names` and `category_ids` None).
    """
    description: dict[str, Any] = {
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "head": OmegaConf.to_container(cfg.head, resolve=True),
        "preprocessing": _preprocessing(cfg),
    }
    if datamodule is not None:
        ids = getattr(datamodule, "category_ids", None)
        description["class_names"] = [str(name) for name in datamodule.class_names]
        description["category_ids"] = None if ids is None else [int(i) for i in ids]
        description["num_classes"] = len(description["class_names"])
        return description
    if cfg.data.get("num_classes") is None:
        raise ConfigError(
            "data.num_classes is null (read from the data): build the model description "
            "with the data module, model_config(cfg, datamodule)"
        )
    description.update(num_classes=int(cfg.data.num_classes), class_names=None, category_ids=None)
    return description


def _preprocessing(cfg: DictConfig) -> dict[str, Any] | None:
    """The run's data `transforms` group: what prediction repeats of evaluation's input
    (`pvtlab.inference`: resize rule and size, mean, std)."""
    transforms = cfg.data.get("transforms")
    return None if transforms is None else OmegaConf.to_container(transforms, resolve=True)


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """`cfg.data` instantiated; an error of the DataModule reaches the user as itself (its
    message), not wrapped in Hydra's InstantiationException, which prints it as a repr."""
    try:
        return instantiate(cfg.data)
    except InstantiationException as error:
        cause = error.__cause__
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause.with_traceback(cause.__traceback__) from None


def pretrained_description(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The network of an evaluation without a checkpoint (`backbone.pretrained` weights).

    A classifier keeps the head of its weights file: when the file's classifier has another
    number of classes than the data, the model is built with the file's, which records no class
    names, so the data's classes are matched to it by index (`match_data_classes`) instead of
    the trained head being replaced.
    """
    description = model_config(cfg, datamodule)
    rows = _pretrained_classifier_rows(cfg)
    if rows is not None and rows != description["num_classes"]:
        description.update(num_classes=rows, class_names=None, category_ids=None)
    return description


def _pretrained_classifier_rows(cfg: DictConfig) -> int | None:
    """Classes of the classifier in `backbone.pretrained` (None: no file, or not classification)."""
    path = cfg.backbone.get("pretrained")
    if not path or task_kind(cfg) != "classification":
        return None
    import timm

    from pvtlab.models.checkpoint import read_state_dict

    classifier = timm.models.get_pretrained_cfg_value(str(cfg.backbone.name), "classifier")
    weight = read_state_dict(path).get(f"{classifier or 'head'}.weight")
    return None if weight is None else int(weight.shape[0])


def checkpoint_description(description: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's network description, to rebuild the network its weights then fill: the
    run's pre-trained file (`backbone.pretrained`) is left out, since the checkpoint holds every
    weight and that file may not exist where the checkpoint is used."""
    return {**description, "backbone": {**description["backbone"], "pretrained": None}}


def match_data_classes(datamodule: Any, description: Mapping[str, Any]) -> None:
    """Evaluation: label the data's classes with the model's (by name, see
    `pvtlab.data.classes.label_mapping`), so a trained head is scored as it is."""
    use_model_classes = getattr(datamodule, "use_model_classes", None)
    if callable(use_model_classes):
        use_model_classes(description.get("class_names"), int(description["num_classes"]))


def build_task(
    cfg: DictConfig,
    description: Mapping[str, Any] | None = None,
    datamodule: Any | None = None,
) -> TaskModule:
    """The LightningModule of `cfg.task` around the network `description` (default:
    `model_config(cfg, datamodule)`)."""
    description = dict(description or model_config(cfg, datamodule))
    model = build_model(description["backbone"], description["head"], description["num_classes"])
    # Partial first: `description` holds the head's `_target_`, which instantiate would recurse into.
    factory = instantiate(cfg.task, _partial_=True, _convert_="all")
    task = factory(model=model, model_config=description)
    task.hparams[run_config.RUN_CONFIG] = run_config.run_config(cfg)  # what eval rebuilds
    return task


def _instantiate_group(group: DictConfig | None, **monitor: str) -> list[Any]:
    """Instantiate every `_target_` entry of a callbacks / logger group (entries may be null).
    A `ModelCheckpoint` whose config names no metric keeps the best checkpoint by `monitor`
    (`monitor=..., mode=...`: the task's own metric)."""
    if not group:
        return []
    return [
        instantiate(entry, **(monitor if _needs_monitor(entry) else {}))
        for entry in group.values()
        if entry and "_target_" in entry
    ]


def _needs_monitor(entry: DictConfig) -> bool:
    # A subclass may fix its own (StepCheckpoint keeps the last state, whatever the metrics).
    target = get_class(str(entry._target_))
    return (
        issubclass(target, ModelCheckpoint)
        and "monitor" in inspect.signature(target).parameters
        and "monitor" not in entry
    )


def build_trainer(cfg: DictConfig, resume_from: str | None = None) -> L.Trainer:
    """`resume_from`: the checkpoint fitting resumes from; loggers whose config declares a
    `resume_from` key receive it (W&B continues that checkpoint's run). The best checkpoint is
    chosen by the task's metric (`TaskModule.monitor`)."""
    task = task_class(cfg)
    callbacks = _instantiate_group(
        cfg.get("callbacks"), monitor=task.monitor, mode=task.monitor_mode
    )
    loggers = [
        instantiate(entry, **({"resume_from": resume_from} if "resume_from" in entry else {}))
        for entry in (cfg.get("logger") or {}).values()
        if entry and "_target_" in entry
    ]
    if not loggers:  # Lightning refuses a LearningRateMonitor with nothing to log to
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    if not cfg.trainer.get("enable_progress_bar", True):  # nor a progress bar it was told to hide
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        callbacks.append(StepLog())  # a line every log_every_n_steps instead
    callbacks.append(ValidateAtLastStep())
    if cfg.get("compile"):
        callbacks.append(CompileReport())
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        **validation_schedule(cfg.trainer),
    )


def validation_schedule(trainer: Mapping[str, Any]) -> dict[str, int]:
    """Trainer settings under which a run validates at least once and at its end.

    A validation interval (`val_check_interval` steps across epochs, or
    `check_val_every_n_epoch`) that does not end on the run's last step or epoch (ADE20K's
    4000 iterations in a 1000-step run) becomes the shortest one that does, with no more
    validations than asked for; one line says so. Returns the settings that change. A run
    that `max_steps` ends inside an epoch validated once an epoch validates at its last step
    (`pvtlab.callbacks.validation.ValidateAtLastStep`, which build_trainer adds).
    """
    if trainer.get("fast_dev_run"):
        return {}
    max_steps = int(trainer.get("max_steps") or -1)
    max_epochs = int(trainer.get("max_epochs") or -1)
    interval = trainer.get("val_check_interval")
    every_n_epochs = trainer.get("check_val_every_n_epoch")
    if every_n_epochs is None and type(interval) is int and max_steps > 0:
        setting, value, length, unit = "val_check_interval", interval, max_steps, "steps"
    elif every_n_epochs and max_steps <= 0 and max_epochs > 0:
        setting, value, length, unit = (
            "check_val_every_n_epoch",
            every_n_epochs,
            max_epochs,
            "epochs",
        )
    else:
        return {}
    if length % int(value) == 0:
        return {}
    validations = math.ceil(length / int(value))
    fitted = next(d for d in range(math.ceil(length / validations), length + 1) if length % d == 0)
    log.warning(
        "trainer.%s=%d does not end on this run's last of %d %s: %d instead (%d validations, "
        "the last at the end)",
        setting,
        value,
        length,
        unit,
        fitted,
        length // fitted,
    )
    return {setting: fitted}


def resolve_ckpt_path(value: str | None, cfg: DictConfig) -> str | None:
    """The checkpoint file a `ckpt_path` value names for the run `cfg` describes: a `.ckpt`
    file, a run folder (its `checkpoints/last.ckpt`) or `last` (the last checkpoint of the newest
    run with this config's task, network and data; `pvtlab.runs.resolve_checkpoint`)."""
    ckpt = runs.resolve_checkpoint(value, cfg)
    return None if ckpt is None else str(ckpt)


def _resume_value(cfg: DictConfig) -> str | None:
    """What `resume=<run dir>` or `ckpt_path=` asks to resume (at most one of them)."""
    resume, ckpt_path = cfg.get("resume"), cfg.get("ckpt_path")
    if resume not in (None, "") and ckpt_path not in (None, ""):
        raise ConfigError(
            f"resume={resume} and ckpt_path={ckpt_path} are both set; both name the run to "
            "continue: keep one"
        )
    return resume if resume not in (None, "") else ckpt_path


def _resolve_load_from(value: str | None, resuming: bool) -> str | None:
    if value in (None, ""):
        return None
    if resuming:
        raise ConfigError(
            "ckpt_path and load_from are both set: ckpt_path resumes a run (weights, optimiser, "
            "epoch), load_from starts a new one from a checkpoint's weights; choose one"
        )
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"load_from={value}: no such file")
    return str(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file without running pickled code, with a clear error if it is not one."""
    return run_config.read_checkpoint(path)


def read_training_checkpoint(path: str | Path, option: str = "") -> dict[str, Any]:
    """A checkpoint written by a pvtlab run (it holds a `state_dict`); `option` names the setting
    that pointed at it in the error."""
    checkpoint = read_checkpoint(path)
    if "state_dict" not in checkpoint:
        raise ConfigError(
            f"{option}{path} has no 'state_dict': not a pvtlab training checkpoint. Released or "
            f"exported backbone weights go to backbone.pretrained={path} instead."
        )
    return checkpoint


def load_task(cfg: DictConfig, ckpt_path: str | Path, datamodule: Any | None = None) -> TaskModule:
    """A task of `cfg.task` rebuilt from a pvtlab checkpoint: its saved network description,
    then its weights. A file without a description (the release's whole models, older runs) is
    built from the config, for the classes of `datamodule`, else of `data.num_classes`."""
    checkpoint = read_training_checkpoint(ckpt_path)
    if release_kind(checkpoint["state_dict"]) is not None:  # the PVT release's own file
        task = build_task(cfg, datamodule=datamodule)
        load_release_state_dict(task.model, checkpoint["state_dict"], source=str(ckpt_path))
        return task
    description = checkpoint.get("hyper_parameters", {}).get("model_config")
    if description is None:
        log.warning(
            "%s carries no model description; building the model from the config", ckpt_path
        )
        description = model_config(cfg, datamodule)
    elif (kind := _checkpoint_kind(description, ckpt_path)) != task_kind(cfg):
        raise ConfigError(
            f"ckpt_path={ckpt_path} is a {kind} checkpoint, but task={task_kind(cfg)} was "
            f"chosen: evaluate it with task={kind} (or without task=)"
        )
    factory = instantiate(cfg.task, _partial_=True, _convert_="all")
    return _rebuild(factory, description, checkpoint, ckpt_path)


# The task class of each kind of prediction (a head's kind: pvtlab.config.HEAD_KINDS).
TASK_CLASSES = {
    "classification": "pvtlab.tasks.classification.ClassificationTask",
    "detection": "pvtlab.tasks.detection.DetectionTask",
    "segmentation": "pvtlab.tasks.segmentation.SegmentationTask",
}


def task_from_checkpoint(ckpt_path: str | Path) -> TaskModule:
    """A task rebuilt from a pvtlab checkpoint alone, no config: the network from its saved
    description, the task class from its head's kind, the task's settings from its saved
    hyperparameters, then its weights."""
    checkpoint = read_training_checkpoint(ckpt_path)
    hyper_parameters = dict(checkpoint.get("hyper_parameters") or {})
    description = hyper_parameters.get("model_config")
    if not description:
        raise ConfigError(
            f"{ckpt_path} carries no model description (hyper_parameters['model_config']): "
            "nothing in it says which network its weights belong to"
        )
    task_type = get_class(TASK_CLASSES[_checkpoint_kind(description, ckpt_path)])
    accepted = set(inspect.signature(task_type).parameters) - {"model", "model_config"}
    settings = {k: v for k, v in hyper_parameters.items() if k in accepted}
    return _rebuild(partial(task_type, **settings), description, checkpoint, ckpt_path).eval()


def _checkpoint_kind(description: Mapping[str, Any], ckpt_path: str | Path) -> str:
    kind = head_kind(OmegaConf.create(description["head"]))
    if kind is None:
        raise ConfigError(
            f"{ckpt_path}: head {description['head'].get('_target_')} is not a pvtlab head; "
            f"its kind of prediction is unknown (pvtlab heads: {sorted(HEAD_KINDS)})"
        )
    return kind


def _rebuild(
    factory: Callable[..., TaskModule],
    description: Mapping[str, Any],
    checkpoint: Mapping[str, Any],
    ckpt_path: str | Path,
) -> TaskModule:
    """The one way a task is rebuilt from a checkpoint: the network its description names
    (`checkpoint_description`), the task `factory` around it, then its weights, strictly."""
    rebuilt = checkpoint_description(description)
    model = build_model(rebuilt["backbone"], rebuilt["head"], rebuilt["num_classes"])
    task = factory(model=model, model_config=rebuilt)
    missing, unexpected = task.load_state_dict(checkpoint["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{ckpt_path} does not fit its network ({type(task).__name__}): missing keys "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}, unexpected keys "
            f"{unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    return task


def initialise_from(task: TaskModule, path: str | Path) -> list[str]:
    """Copy the weights of a pvtlab checkpoint into `task`, tensor by tensor (mmdetection's
    `load_from`): a fine-tuning start, with the optimiser, schedule and epochs of the new run.

    Tensors the checkpoint lacks or holds in another shape (a head for other classes) keep their
    fresh initialisation; their names are returned and logged. A checkpoint sharing no tensor with
    the model is a ConfigError.
    """
    saved = read_training_checkpoint(path, option="load_from=")["state_dict"]
    if release_kind(saved) is not None:  # the PVT release's own file: mapped, loaded strictly
        load_release_state_dict(task.model, saved, source=f"load_from={path}")
        return []
    own = task.state_dict()
    fitting = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise ConfigError(
            f"load_from={path}: no tensor fits task={task.__class__.__name__} with this backbone "
            f"and head (checkpoint keys {list(saved)[:5]}, model keys {list(own)[:5]})"
        )
    task.load_state_dict(fitting, strict=False)
    kept = sorted(set(own) - set(fitting))
    log.info("load_from=%s: %d of %d tensors loaded", path, len(fitting), len(own))
    if kept:
        log.warning(
            "load_from=%s: %d tensors keep their fresh values (absent or another shape): %s%s",
            path,
            len(kept),
            ", ".join(kept[:10]),
            " ..." if len(kept) > 10 else "",
        )
    return kept


def _prepare(cfg: DictConfig) -> Path:
    """Checks that need no data, then the config tree printed and saved with the run."""
    check_compatible(cfg)
    check_updates(cfg)
    check_pretrained(cfg)
    set_sweep_group(cfg)  # before the config is saved: config.yaml records the group
    output_dir = Path(cfg.paths.output_dir)
    _write_run_config(cfg, output_dir)
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    L.seed_everything(cfg.seed, workers=True)
    return output_dir


@rank_zero_only  # a distributed run's other processes re-run the command in the same folder
def _write_run_config(cfg: DictConfig, output_dir: Path) -> None:
    """The config tree and resolved config saved with the run; the tree printed with
    `print_config=true`, else one line of the choices and the run folder."""
    output_dir.mkdir(parents=True, exist_ok=True)
    show_tree = bool(cfg.get("print_config", False))
    print_config_tree(cfg, save_to=output_dir / "config_tree.log", show=show_tree)
    save_resolved_config(cfg, output_dir / "config.yaml")
    if not show_tree:
        log.info("%s (print_config=true prints the config)", choices_summary(cfg))
    log.info("Run folder: %s", output_dir)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit `cfg.task` on `cfg.data`, then test the best checkpoint; return the final metrics."""
    # Before anything is built or written: a wrong or foreign checkpoint fails at once, and a
    # resumed run writes into its own folder (config, checkpoints, logs).
    ckpt_path = resolve_ckpt_path(_resume_value(cfg), cfg) if cfg.get("train", True) else None
    load_from = _resolve_load_from(cfg.get("load_from"), resuming=bool(ckpt_path))
    if ckpt_path:
        runs.check_checkpoint_fits(ckpt_path, cfg)
        if (run := runs.run_folder(ckpt_path)) is not None:
            runs.continue_in(cfg, run)
    output_dir = _prepare(cfg)
    datamodule = build_datamodule(cfg)
    task = build_task(cfg, datamodule=datamodule)
    if load_from:
        initialise_from(task, load_from)
    if cfg.get("compile"):
        task.compile_model()
    trainer = build_trainer(cfg, resume_from=ckpt_path)
    _log_run_facts(trainer, task, cfg)

    metrics: dict[str, float] = {}
    try:
        if cfg.get("train", True):
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            metrics.update(_scalars(trainer.callback_metrics))
        if cfg.get("test", True):
            best = _best_checkpoint(trainer)
            trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True)
            metrics.update(_scalars(trainer.callback_metrics))
    finally:
        _finish_loggers(trainer)
    print_summary(task, trainer, metrics, output_dir)
    write_metrics(metrics, output_dir)  # what multirun summaries read
    return metrics


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Score a checkpoint (or `backbone.pretrained` weights) on the chosen split; return metrics.

    The checkpoint names its task, network and data (`pvtlab.run_config.eval_config`); the
    command line's overrides apply on top. Writes `metrics.json` and the task's predictions
    into the run folder."""
    source = _checkpoint_source(cfg)
    if source is not None:
        cfg = run_config.eval_config(cfg, source)
    output_dir = _prepare(cfg)
    ckpt_path = str(source.path) if source is not None and cfg.get("ckpt_path") else None
    datamodule = build_datamodule(cfg)
    if ckpt_path:
        task = load_task(cfg, ckpt_path, datamodule)
    else:
        task = build_task(cfg, pretrained_description(cfg, datamodule))
    _log_rebuilt_model(task, source)
    match_data_classes(datamodule, task.hparams.model_config)
    if cfg.get("compile"):
        task.compile_model(options=FROZEN_WEIGHTS)
    trainer = build_trainer(cfg)
    predictions = Path(str(cfg.task.get("predictions_dir") or output_dir / "predictions"))
    if task.kind == "classification":
        names = task.hparams.model_config.get("class_names")
        trainer.callbacks.append(ClassificationPredictions(predictions / "predictions.csv", names))
    run = trainer.test if cfg.get("split", "val") == "test" else trainer.validate
    try:
        with frozen_weight_compilation():  # compile=true: traced at the first batch
            run(task, datamodule=datamodule)
        metrics = _scalars(trainer.callback_metrics)
    finally:
        _finish_loggers(trainer)
    print_summary(task, trainer, metrics, output_dir)
    written = [write_metrics(metrics, output_dir)]
    written += sorted(predictions.glob("*")) if predictions.is_dir() else []
    out = console()
    for path in written:
        out.print(f"Written:         {path}")
    return metrics


def _checkpoint_source(cfg: DictConfig) -> run_config.CheckpointSource | None:
    """What `ckpt_path` names: a transformers folder, else a file `resolve_ckpt_path` finds."""
    value = cfg.get("ckpt_path")
    if value not in (None, "") and run_config.is_transformers_folder(value):
        return run_config.read_source(value)
    ckpt_path = resolve_ckpt_path(value, cfg)
    return None if ckpt_path is None else run_config.read_source(ckpt_path)


@rank_zero_only
def _log_rebuilt_model(task: TaskModule, source: run_config.CheckpointSource | None) -> None:
    description = task.hparams.model_config
    names = description.get("class_names")
    log.info(
        "Model: %s, backbone %s, head %s, %d classes%s, from %s",
        task.kind,
        description["backbone"].get("name"),
        str(description["head"].get("_target_")).rpartition(".")[2],
        int(description["num_classes"]),
        f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else "",
        source.path
        if source is not None
        else description["backbone"].get("pretrained") or "fresh weights (no checkpoint)",
    )


def predict(cfg: DictConfig) -> dict[str, int]:
    """Run the checkpoint `cfg.ckpt_path` on the pictures `cfg.input` names, in batches; write
    the files of its kind of prediction (`pvtlab.prediction_files`) to the run folder. A file
    that cannot be decoded is named in a warning and skipped. Returns the counts of pictures
    predicted and skipped."""
    # Imported here: train and evaluate need neither.
    from rich.progress import Progress

    from pvtlab.data.images import DECODE_ERRORS, read_rgb
    from pvtlab.inference import Predictor
    from pvtlab.prediction_files import batches, find_images, prediction_writer, relative_name

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path in (None, "", "last"):
        raise ConfigError("ckpt_path=<file>: the .ckpt of a pvtlab run to predict with")
    ckpt_path = resolve_ckpt_path(ckpt_path, cfg)
    files, root = find_images(cfg.input)
    if not files:
        raise ConfigError(f"input={cfg.input} names no image file")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, output_dir / "config.yaml")
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    predictor = Predictor.from_checkpoint(
        ckpt_path, _device(cfg.trainer.accelerator), str(cfg.trainer.precision), int(cfg.top_k)
    )
    if cfg.get("compile"):
        predictor.compile()
    writer = prediction_writer(
        predictor.kind, output_dir, predictor.classes, predictor.top_k, float(cfg.min_score)
    )
    skipped: list[Path] = []
    with Progress(disable=not cfg.get("progress_bar", True)) as progress:
        bar = progress.add_task(f"{predictor.kind} ({len(files)} files)", total=len(files))
        for chunk in batches(files, int(cfg.batch_size)):
            read, pictures = [], []
            for path in chunk:
                try:
                    pictures.append(read_rgb(path))
                    read.append(path)
                except DECODE_ERRORS as error:
                    log.warning("Skipped %s: not a readable image (%s)", path, error)
                    skipped.append(path)
            for path, picture, result in zip(
                read, pictures, predictor.predict(pictures), strict=True
            ):
                writer.add(path, relative_name(path, root), picture, result)
            progress.advance(bar, len(chunk))
    written = writer.close()
    counts = {"predicted": len(files) - len(skipped), "skipped": len(skipped)}
    out = console()  # paths never wrapped
    out.print(
        f"Predicted {counts['predicted']} of {len(files)} files with {ckpt_path}"
        + (f"; {len(skipped)} unreadable, skipped (named in the log)" if skipped else "")
    )
    for path in written:
        out.print(f"  {path}")
    return counts


def _device(accelerator: str) -> str:
    """The torch device of a Trainer's `accelerator` setting (one device: prediction runs on
    one)."""
    accelerator = str(accelerator)
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    devices = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "mps": "mps"}
    if accelerator not in devices:
        raise ConfigError(
            f"trainer.accelerator={accelerator}: prediction runs on one of {sorted(devices)} "
            "or auto"
        )
    return devices[accelerator]


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}


def _best_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "best_model_path", "") if callback is not None else ""
    return path or None


def _log_run_facts(trainer: L.Trainer, task: TaskModule, cfg: DictConfig | None = None) -> None:
    facts = {"model/params": task.num_parameters()}
    for logger in trainer.loggers:
        if cfg is not None and isinstance(logger, WandbLogger):
            log_wandb_run_facts(logger, cfg, task.model)  # nested config, GMACs
        logger.log_hyperparams(facts)


def _finish_loggers(trainer: L.Trainer) -> None:
    """W&B never finishes its run by itself: without this, the next multirun job reuses it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


@rank_zero_only
def print_summary(
    task: TaskModule, trainer: L.Trainer, metrics: Mapping[str, float], output_dir: Path
) -> None:
    """The end-of-run table: metrics (and task-specific figures), then where everything went."""
    table = Table(title="Results", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in sorted(metrics):
        if name.startswith(("val/", "test/")):
            table.add_row(name, f"{metrics[name]:.4f}")
    summarize = getattr(task, "summary_rows", None)
    for name, value in (summarize(metrics) if callable(summarize) else {}).items():
        table.add_row(name, value)
    out = console()
    out.print(table)
    out.print(f"Run folder:      {output_dir}")
    best = _best_checkpoint(trainer)
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") if callback is not None else ""
    if best:
        out.print(f"Best checkpoint: {best}")
    if last:
        out.print(f"Last checkpoint: {last}")
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            out.print(f"Metrics:         {Path(logger.log_dir) / 'metrics.csv'}")
        elif isinstance(logger, Logger) and getattr(logger, "save_dir", None):
            out.print(f"{type(logger).__name__}: {logger.save_dir}")
    for log_file in _log_files():
        out.print(f"Log:             {log_file}")


def _log_files() -> list[str]:
    """The files the run's log is written to (Hydra's job log, `<entry point>.log`)."""
    return [
        handler.baseFilename
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.FileHandler)
    ]
