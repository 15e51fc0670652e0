"""Training steps measured through the real pipeline: a composed run config, its DataModule and
task, fitted by a Lightning Trainer for a few steps while a callback times each batch, or the
loop as a whole (`loop`): with no callbacks, or with `src/train.py`'s own.

`measure_training_step_in_fresh_process` runs that in a fresh interpreter (``python -m
pvtlab.bench.steps``), with the host allocator as `src/train.py` sets it or as glibc has it:
each measurement then starts from nothing, so its peak memory is its own.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from torch import nn

from pvtlab.bench import PeakMemory, bench_device, run_worker, synchronize
from pvtlab.bench.profile_parts import events_in_parts, marked_parts
from pvtlab.models.attention import explicit_attention_limit
from pvtlab.models.heads import static_shape_parts
from pvtlab.utils.numerics import use_fast_float32_matmuls

__all__ = [
    "HEADS",
    "SHAPES_DATA",
    "LoopTimer",
    "StepResult",
    "StepTimer",
    "compose_run",
    "measure_training_step",
    "measure_training_step_in_fresh_process",
]

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
# Every task and head, as (task, head).
HEADS: tuple[tuple[str, str], ...] = (
    ("classification", "linear"),
    ("detection", "retinanet"),
    ("detection", "mask_rcnn"),
    ("detection", "detr"),
    ("segmentation", "semantic_fpn"),
    ("segmentation", "trans2seg"),
)
# The data of a run measured unless told otherwise: the embedded shapes set and its recipe.
SHAPES_DATA = ("data=shapes",)
# Few, small shapes images for quick runs (the tests): generation takes seconds.
QUICK_DATA = (
    "data.generator.train_images=32",
    "data.batch_size=8",  # at least 4 batches of every kind (classification drops the last)
    "data.generator.val_images=8",
    "data.num_workers=0",
)


def compose_run(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """A `src/train.py` config, composed as the command line would, writing under `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)  # as Hydra makes it: runs write files there
    return cfg


class StepTimer(L.Callback):
    """Wall-clock seconds of every training batch (forward, backward and optimizer step); on a
    GPU the queued work is waited for at both ends, so each time is the batch's own."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        synchronize(module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        synchronize(module.device)
        self.times.append(time.perf_counter() - self._start)


class LoopTimer(L.Callback):
    """Wall-clock seconds of the training loop from the start of batch `warmup` to the end of
    the last batch (`trainer.max_steps`), the accelerator waited for at those two points only:
    the loop as a run goes, the host free to queue a GPU's work ahead of it, every callback's
    per-batch work and every read back to the host included. `warmup_s`: the batches before
    (the first one's data loading and compilation included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.warmup_s = 0.0
        self.seconds = 0.0
        self._fit_start = self._start = 0.0

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        synchronize(module.device)
        self._fit_start = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == self.warmup:
            synchronize(module.device)
            self._start = time.perf_counter()
            self.warmup_s = self._start - self._fit_start

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == trainer.max_steps:
            synchronize(module.device)
            self.seconds = time.perf_counter() - self._start


# How `measure_training_step` times: each batch on its own (None), or the loop as a whole,
# with no callbacks or logger ("bare") or with `src/train.py`'s callbacks and CSV logger ("run";
# checkpoints are not written).
LOOPS = (None, "bare", "run")
# The overrides that leave a run without callbacks, logger, progress bar or summary.
NO_CALLBACKS = (
    "logger=none",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)
# src/train.py's callbacks and a CSV logger, less the checkpoints.
RUN_CALLBACKS = ("logger=csv", "~callbacks.model_checkpoint", "~callbacks.step_checkpoint")


# Operators that run a library kernel (oneDNN / MKL / BLAS matrix products and convolutions,
# the fused attention): compiling the graph around them leaves their time as it is.
LIBRARY_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul_out", "mkldnn_convolution",
        "convolution_backward", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward", "_mkl_linear",
    )
) | {"mkldnn::_convolution_pointwise", "mkl::_mkl_linear"}  # fmt: skip


class StepProfiler(L.Callback):
    """Where one training batch's CPU time goes: the share in `LIBRARY_OPS` (`library_share`),
    which `torch.compile` calls as they are, and the time outside them spent in the parts that
    `compile=true` compiles, forward and backward (`parts_s`, `parts_share`;
    `pvtlab.bench.profile_parts`). Of an eager step, that is all compile could save: the step
    can get at most 1 / library_share and 1 / (1 - parts_share) times faster. Of a compiled
    step, it is what the compiled parts still take."""

    def __init__(self, batch_index: int) -> None:
        self.batch_index = batch_index
        self.library_share: float | None = None
        self.parts_share: float | None = None
        self.parts_s: float | None = None
        self._profile: Any = None
        self._marks = ExitStack()

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step != self.batch_index:
            return
        from torch.profiler import ProfilerActivity, profile

        parts = static_shape_parts(module.model)
        if not any(_is_compiled(part) for part in parts):  # compiled ones are named by dynamo
            self._marks.enter_context(marked_parts(parts))
        self._profile = self._marks.enter_context(profile(activities=[ProfilerActivity.CPU]))

    def on_train_batch_end(self, *args: Any) -> None:
        if self._profile is None:
            return
        profiled, self._profile = self._profile, None
        self._marks.close()
        events = profiled.events()
        total = sum(e.self_cpu_time_total for e in events)
        if not total:
            return
        library = sum(e.self_cpu_time_total for e in events if e.name in LIBRARY_OPS)
        in_parts = events_in_parts(events)
        parts = sum(e.self_cpu_time_total for e in in_parts if e.name not in LIBRARY_OPS)
        self.library_share = library / total
        if in_parts:
            self.parts_share, self.parts_s = parts / total, parts * 1e-6  # microseconds


def _is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@dataclass
class StepResult:
    batch: int
    images_per_s: float
    step_s: float
    first_step_s: float  # includes compilation when compiled
    peak_mib: float | None
    library_share: float | None = None  # see StepProfiler; measured when asked for
    parts_share: float | None = None  # see StepProfiler; measured when asked for
    parts_s: float | None = None  # see StepProfiler; measured when asked for
    step_times_s: list[float] = field(default_factory=list)  # the timed steps (step_s: median)


def measure_training_step(
    task: str,
    head: str,
    backbone: str,
    data_dir: Path,
    *,
    steps: int = 3,
    warmup: int = 1,
    compile: bool = False,
    precision: str | None = None,
    extra: Sequence[str] = (),
    profile: bool = False,
    data: Sequence[str] = SHAPES_DATA,
    loop: str | None = None,
) -> StepResult:
    """Fit `steps + warmup` training batches of the `data` overrides' recipe (default: shapes);
    time the last `steps`.

    Runs on `bench_device()` with the trainer preset a user would pick there (`trainer=cpu` or
    `trainer=gpu`); `precision` overrides the preset's (fp32 on the CPU, bf16-mixed on a GPU).
    `profile`: one more batch, profiled, for `StepResult.library_share` (CPU time).
    `loop` (one of `LOOPS`): None times each batch, the accelerator waited for at both ends;
    "bare" and "run" time the loop as a whole (`LoopTimer`), without callbacks or with
    `src/train.py`'s, and give the mean step as `step_s` and the warm-up's as `first_step_s`.
    """
    if loop not in LOOPS:
        raise ValueError(f"loop={loop!r}: choose one of {LOOPS}")
    device = bench_device()
    use_fast_float32_matmuls()  # as src/train.py runs
    overrides = [f"trainer.precision={precision}"] if precision else []
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(
            [
                f"trainer={'gpu' if device.type == 'cuda' else 'cpu'}",
                *overrides,
                f"task={task}",
                f"head={head}",
                f"backbone={backbone}",
                *data,
                *(RUN_CALLBACKS if loop == "run" else NO_CALLBACKS),
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={tmp}",
                f"trainer.max_steps={steps + warmup + int(profile and loop is None)}",
                "trainer.max_epochs=-1",
                "+trainer.limit_val_batches=0",
                "trainer.num_sanity_val_steps=0",
                "+trainer.enable_checkpointing=false",
                f"compile={str(compile).lower()}",
                *extra,
            ],
            Path(tmp) / "run",
        )
        from pvtlab.pipeline import build_task, build_trainer

        L.seed_everything(0, verbose=False)
        datamodule = instantiate(cfg.data)
        module = build_task(cfg)
        if compile:
            module.compile_model()
        if loop is None:
            timer = StepTimer()
            profiler = StepProfiler(batch_index=steps + warmup if profile else -1)
            trainer = instantiate(cfg.trainer, callbacks=[timer, profiler], logger=False)
        else:
            loop_timer = LoopTimer(warmup)
            trainer = build_trainer(cfg)  # the config's callbacks and logger, as train.py's
            trainer.callbacks.append(loop_timer)
        # The run's attention limit, as src/train.py applies it (`pipeline._prepare`).
        limit = cfg.get("explicit_attention_max_scores")
        with explicit_attention_limit(limit), PeakMemory(device) as peak:
            trainer.fit(module, datamodule=datamodule)
        batch = int(cfg.data.batch_size)
    if loop is not None:
        step = loop_timer.seconds / steps
        first = loop_timer.warmup_s / max(warmup, 1)
        return StepResult(batch, batch / step, step, first, peak.mib, step_times_s=[step])
    timed = timer.times[warmup : warmup + steps] or timer.times
    step = statistics.median(timed)
    return StepResult(
        batch,
        batch / step,
        step,
        timer.times[0],
        peak.mib,
        profiler.library_share,
        profiler.parts_share,
        profiler.parts_s,
        list(timed),
    )


def measure_training_step_in_fresh_process(
    *args: Any, reuse_freed_memory: bool = True, **kwargs: Any
) -> StepResult:
    """`measure_training_step(*args, **kwargs)` in a fresh interpreter; `reuse_freed_memory`:
    the allocator setting of `src/train.py` (True) or glibc's default (False)."""
    request = {"args": [str(a) for a in args], "kwargs": kwargs, "reuse": reuse_freed_memory}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    return StepResult(**run_worker("pvtlab.bench.steps", request, env))


def _worker(argv: list[str]) -> None:
    request = json.loads(argv[0])
    if request["reuse"]:
        from pvtlab.utils.allocator import reuse_freed_memory

        reuse_freed_memory()
    task, head, backbone, data_dir = request["args"]
    result = measure_training_step(task, head, backbone, Path(data_dir), **request["kwargs"])
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    _worker(sys.argv[1:])
