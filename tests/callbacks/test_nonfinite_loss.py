"""A NaN loss stops the run naming the step and the loss, before the optimizer applies that step;
the last good checkpoint is kept, and under DDP every process stops."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from pvtlab.callbacks.guards import NonFiniteLossError, NonFiniteLossGuard
from tests.conftest import REPO
from tests.host_sync import intercept_host_reads

NAN_STEP = 3

SMALL_RUN = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.num_sanity_val_steps=0",
    "data.loader.batch_size=4",
    "data.loader.num_workers=0",
    "+backbone.depths=[1,1,1,1]",
    "+backbone.embed_dims=[16,32,48,64]",
    "+backbone.num_heads=[1,1,1,1]",
    "callbacks.progress_bar=null",
    "+callbacks.poison._target_=tests.callbacks.test_nonfinite_loss.PoisonBatch",
    f"+callbacks.poison.step={NAN_STEP}",
    "task.export_backbone=false",
]


class PoisonBatch(L.Callback):
    """Fills the images of the batch of optimizer step `step` with NaN (a stand-in for bad data
    or an exploding run), on process `rank` only if given, keeping a copy of the weights that
    step starts from."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step, self.rank = step, rank
        self.weights_before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, *args: Any) -> None:
        on_this_rank = self.rank is None or trainer.global_rank == self.rank
        if trainer.global_step == self.step and on_this_rank:
            self.weights_before = {n: p.detach().clone() for n, p in module.named_parameters()}
            batch[0].fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    make_config: Callable[..., DictConfig],
) -> None:
    cfg = make_config([*SMALL_RUN, "callbacks.step_checkpoint.every_n_train_steps=2"])
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(NonFiniteLossError) as error:
        pipeline.train(cfg)
    message = str(error.value)
    assert f"at step {NAN_STEP} " in message and "train/loss=nan" in message
    assert f"resume={cfg.paths.output_dir}" in message  # the command that resumes this run
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the step-2 checkpoint, not one written after the NaN
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_without_a_checkpoint_the_message_recommends_no_resume(
    make_config: Callable[..., DictConfig],
) -> None:
    trainer = pipeline.build_trainer(make_config(SMALL_RUN))
    message = NonFiniteLossGuard.message(trainer, [(0, torch.tensor(float("nan")))])
    assert "nothing to resume" in message
    assert "resume=" not in message and "ckpt_path=last" not in message


@pytest.mark.parametrize("fused", [True, False])
def test_the_guard_reads_one_flag_a_step_after_the_backward_and_the_nan_step_is_not_taken(
    make_config: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    """Nothing is read before the backward; once it is done, one flag a step. The NaN step's
    backward runs, and the fit stops before the optimizer (fused or foreach) applies it."""
    cfg = make_config([*SMALL_RUN, f"task.optimizer.fused={str(fused).lower()}"])
    trainer, task = pipeline.build_trainer(cfg), pipeline.build_task(cfg)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteLossGuard))
    poison = next(c for c in trainer.callbacks if isinstance(c, PoisonBatch))
    reads: dict[str, list[int]] = {"on_before_backward": [], "on_before_optimizer_step": []}

    def counted(hook_name: str) -> None:
        hook = getattr(guard, hook_name)

        def counting_reads(trainer: L.Trainer, *args: Any) -> None:
            def record(name: str) -> None:
                reads[hook_name].append(trainer.global_step)

            with intercept_host_reads(monkeypatch, record):
                hook(trainer, *args)

        monkeypatch.setattr(guard, hook_name, counting_reads)

    counted("on_before_backward")
    counted("on_before_optimizer_step")
    with pytest.raises(NonFiniteLossError, match=f"at step {NAN_STEP} ") as error:
        trainer.fit(task, datamodule=instantiate(cfg.data))

    assert reads["on_before_backward"] == []
    good_steps = [step for step in reads["on_before_optimizer_step"] if step < NAN_STEP]
    assert good_steps == list(range(NAN_STEP)), reads  # one read a good step
    assert NAN_STEP in reads["on_before_optimizer_step"]
    assert "optimizer did not take that step" in str(error.value)
    weights = dict(task.named_parameters())
    assert all(torch.equal(weights[n], before) for n, before in poison.weights_before.items())
    grads = [p.grad for p in weights.values() if p.grad is not None]
    assert grads and not all(torch.isfinite(g).all() for g in grads)  # the backward ran
    steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {NAN_STEP}  # steps 0-2 taken, the NaN one not


@pytest.mark.slow
def test_a_nan_on_one_ddp_rank_stops_every_rank_at_that_step(
    tmp_path: Path, data_dir: Path
) -> None:
    """The flag is reduced over the ranks: both stop at that step, before its update."""
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *[o for o in SMALL_RUN if "limit_train_batches" not in o and "poison" not in o],
        "trainer.limit_train_batches=4",
        "trainer=ddp_cpu",
        "test=false",
        "+callbacks.poison._target_=tests.callbacks.test_nonfinite_loss.PoisonBatch",
        f"+callbacks.poison.step={NAN_STEP - 1}",
        "+callbacks.poison.rank=1",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={data_dir}",
    ]
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(REPO))
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    stops = output.count("NonFiniteLossError: non-finite training loss")
    assert stops == 2, output[-3000:]
    assert output.count(f"at step {NAN_STEP - 1} ") == 2, output[-3000:]
    assert output.count("loss on another process") == 1, output[-3000:]  # rank 0's was finite
    assert output.count("optimizer did not take that step") == 2, output[-3000:]
