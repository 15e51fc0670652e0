"""A NaN loss stops the run naming the step and the loss; the last good checkpoint is kept, and
with the fused optimizers the step is skipped on the device instead of waited for."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from pvtlab.reliability.guards import NonFiniteLossError, NonFiniteLossGuard, _PendingCheck
from tests.conftest import REPO
from tests.tasks.test_host_sync import intercept_host_reads

NAN_STEP = 3

SMALL_RUN = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=6",
    "trainer.num_sanity_val_steps=0",
    "data.batch_size=4",
    "data.num_workers=0",
    "+backbone.kwargs.depths=[1,1,1,1]",
    "+backbone.kwargs.embed_dims=[16,32,48,64]",
    "+backbone.kwargs.num_heads=[1,1,1,1]",
    "callbacks.progress_bar=null",
    "+callbacks.poison._target_=tests.reliability.test_nonfinite_loss.PoisonBatch",
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
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the step-2 checkpoint, not one written after the NaN
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


@pytest.mark.parametrize("fused", [True, False])
def test_a_fused_optimizer_skips_the_nan_step_without_a_read_before_its_backward(
    make_config: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    """Fused optimizers: after the first step, the guard reads nothing before the backward; the
    NaN step's backward runs and its update is skipped on the device. Foreach optimizers: the
    loss is read before every backward, and the NaN step stops there."""
    cfg = make_config([*SMALL_RUN, f"task.optimizer.fused={str(fused).lower()}"])
    trainer, task = pipeline.build_trainer(cfg), pipeline.build_task(cfg)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteLossGuard))
    poison = next(c for c in trainer.callbacks if isinstance(c, PoisonBatch))
    reads_at_steps: list[int] = []
    check_before_backward = guard.on_before_backward

    def counting_reads(trainer: L.Trainer, module: Any, loss: torch.Tensor) -> None:
        def record(name: str) -> None:
            reads_at_steps.append(trainer.global_step)

        with intercept_host_reads(monkeypatch, record):
            check_before_backward(trainer, module, loss)

    guard.on_before_backward = counting_reads
    with pytest.raises(NonFiniteLossError, match=f"at step {NAN_STEP} ") as error:
        trainer.fit(task, datamodule=instantiate(cfg.data))

    weights = dict(task.named_parameters())
    assert all(torch.equal(weights[n], before) for n, before in poison.weights_before.items())
    grads = [p.grad for p in weights.values() if p.grad is not None]
    optimizer = trainer.optimizers[0]
    if fused:
        assert sorted(set(reads_at_steps)) == [0]  # the first step only (see skips_on_found_inf)
        assert "optimizer skipped that step" in str(error.value)
        assert grads and not all(torch.isfinite(g).all() for g in grads)  # the backward ran
        steps = {int(state["step"]) for state in optimizer.state.values()}
        assert steps == {NAN_STEP}  # steps 0-2 counted, the skipped one not
        assert not hasattr(optimizer, "found_inf")
    else:
        assert sorted(set(reads_at_steps)) == list(range(NAN_STEP + 1))
        assert all(torch.isfinite(g).all() for g in grads)  # stopped before the backward


@pytest.mark.slow
def test_a_nan_on_one_ddp_rank_stops_every_rank_at_that_step(
    tmp_path: Path, data_dir: Path
) -> None:
    """The skip flag is reduced over the ranks on the device: both skip the step and both stop."""
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *[o for o in SMALL_RUN if "limit_train_batches" not in o and "poison" not in o],
        "+trainer.limit_train_batches=4",
        "trainer=ddp_cpu",
        "test=false",
        "+callbacks.poison._target_=tests.reliability.test_nonfinite_loss.PoisonBatch",
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
    assert output.count("optimizer skipped that step") == 2, output[-3000:]


def test_a_flag_still_on_its_way_is_checked_once_it_arrives() -> None:
    """On a GPU the host copy may arrive a step later: the guard does not wait for it between
    steps, and does before a checkpoint or the end of the fit."""

    class CopyInFlight:
        def __init__(self) -> None:
            self.done = False

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            self.done = True

    copy = CopyInFlight()
    guard = NonFiniteLossGuard()
    guard._pending.append(
        _PendingCheck(
            finite=torch.tensor(False),
            arrived=copy,  # type: ignore[arg-type]
            loss=torch.tensor(float("inf")),
            logged={"train/loss": torch.tensor(float("inf"))},
            step=7,
            epoch=0,
            batch=8,
            skipped_on_device=True,
        )
    )
    trainer: Any = SimpleNamespace(checkpoint_callback=None)
    guard.on_train_batch_end(trainer)  # not arrived: the next step goes on
    assert len(guard._pending) == 1
    with pytest.raises(NonFiniteLossError, match=r"at step 7 .*train/loss=inf"):
        guard.on_save_checkpoint(trainer)
    assert copy.done and not guard._pending
