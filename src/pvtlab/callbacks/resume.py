"""Exact resume: a run killed mid-epoch continues as if it had never stopped.

Lightning restores the model, optimizer, schedule and loop counters, but a plain DataLoader
restarts its epoch from the first batch with a new order, and the random number generators
(augmentation, drop path, Mixup) restart from wherever the new process is. `ExactResume` closes
both gaps for the training loader:

- each epoch's order and worker seeds are drawn from generators seeded by (seed, epoch, rank), so
  they do not depend on what ran before;
- the callback saves, with its own state in the checkpoint, how many batches of the epoch were
  trained on and fetched and the random states seen just before the last fetches; on resume the
  loader skips the batches already trained on and restores those states, so every later batch,
  augmentation and dropout mask is the same.

Exact with `num_workers=0` and with non-persistent workers (skipped batches are then loaded and
dropped, so each worker's generator advances as before). Persistent workers keep their generators
across epochs, which a new process cannot rebuild: the order is still exact, augmentations are not.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)

# Random states kept from before the last fetches: Lightning prefetches one batch ahead.
KEPT_STATES = 3


def rng_state() -> dict[str, Any]:
    """The global random states (torch CPU, numpy, random) as plain values (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def seed_all(*parts: int) -> None:
    """Seed torch, numpy and random from a tuple of integers (e.g. seed, epoch, rank)."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class ResumableDataLoader(DataLoader):
    """A DataLoader whose iteration can be saved and continued (`resume_state`, `resume_from`).

    Not constructed directly: `ExactResume` turns the training loader of a data module into one
    (`make_resumable`), keeping every argument it was built with.
    """

    _resume_trainer: L.Trainer | None = None
    _resume_seed: int = 0
    _resume_state: dict[str, Any] | None = None
    _iteration: dict[str, Any] | None = None

    def _epoch_and_rank(self) -> tuple[int, int]:
        trainer = self._resume_trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.global_rank

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        epoch, rank = self._epoch_and_rank()
        resume, self._resume_state = self._resume_state, None
        if resume is not None and (resume["epoch"] != epoch or resume["epoch_done"]):
            resume = None
        seed_all(self._resume_seed, epoch, rank)
        iterator = super().__iter__()
        states: dict[int, dict[str, Any]] = {}
        self._iteration = {"epoch": epoch, "done": 0, "fetched": 0, "states": states}
        start = 0
        if resume is not None:
            start = int(resume["done"])
            self._iteration["done"] = start
            self._skip(iterator, start)
            states.update({int(k): v for k, v in resume["states"].items()})
            log.info("Resuming epoch %d at batch %d", epoch, start)
        for index in range(start, len(self)):
            if resume is not None and index in states:
                set_rng_state(states[index])
            elif resume is not None and index == resume["fetched"]:
                set_rng_state(resume["now"])
                resume = None
            states[index] = rng_state()
            states.pop(index - KEPT_STATES, None)
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._iteration["fetched"] = index + 1
            yield batch

    def _skip(self, iterator: Any, count: int) -> None:
        """Advance past `count` batches: without loading them in the main process, by loading and
        dropping them with workers (whose generators must advance as they did)."""
        if self.num_workers == 0:
            for _ in range(count):
                next(iterator._sampler_iter)
        else:
            for _ in range(count):
                next(iterator)

    def trained_on_one(self) -> None:
        """Count one more batch of this epoch trained on (`ExactResume`, after each batch)."""
        if self._iteration is not None:
            self._iteration["done"] += 1

    def resume_state(self) -> dict[str, Any]:
        """Where this epoch's iteration stands, as plain values (weights_only-safe)."""
        if self._iteration is None or self._resume_trainer is None:
            return {}
        # Batches trained on; the fetched ones beyond were prefetched, and are fetched again.
        trainer = self._resume_trainer
        done = self._iteration["done"]
        fetched = self._iteration["fetched"]
        return {
            "epoch": self._iteration["epoch"],
            "epoch_done": done >= min(trainer.num_training_batches, len(self)),
            "done": done,
            "fetched": fetched,
            "states": {i: s for i, s in self._iteration["states"].items() if done <= i < fetched},
            "now": rng_state(),
        }

    def resume_from(self, state: dict[str, Any]) -> None:
        """Continue the iteration `resume_state` saved, from the next `__iter__` on."""
        self._resume_state = state or None


def make_resumable(loader: DataLoader, trainer: L.Trainer, seed: int) -> DataLoader:
    """`loader` turned, in place, into a `ResumableDataLoader` bound to `trainer` and `seed`.

    The binding lives in a class made for this run, so that the copy Lightning makes of the
    loader under DDP (to insert a distributed sampler) keeps it. Plain DataLoaders only.
    """
    if type(loader) is not DataLoader:
        log.warning(
            "Exact resume: the training loader is a %s, not a plain DataLoader; a resumed run "
            "restarts its epoch.",
            type(loader).__name__,
        )
        return loader
    bound = {"_resume_trainer": trainer, "_resume_seed": int(seed), "__module__": __name__}
    loader.__class__ = type(ResumableDataLoader.__name__, (ResumableDataLoader,), bound)
    if loader.num_workers > 0 and loader.persistent_workers:
        log.warning(
            "Exact resume: persistent data workers keep their random state across epochs, so "
            "augmentations after a resume differ from an uninterrupted run (set "
            "data.loader.persistent_workers=false where exact resume matters)."
        )
    return loader


class ExactResume(Callback):
    """Makes the data module's training loader resumable (see the module docstring), and keeps
    where its iteration stands in this callback's state in the checkpoint.

    Args:
        seed: base seed of the per-epoch generators (the run's `seed`).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = int(seed)
        self._loader_state: dict[str, Any] = {}
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None or getattr(datamodule, "_exact_resume", False):
            return
        build = datamodule.train_dataloader

        def train_dataloader() -> DataLoader:
            return make_resumable(build(), trainer, self.seed)

        datamodule.train_dataloader = train_dataloader
        datamodule._exact_resume = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hand a restored state to the loader, which reads it at its first batch."""
        state, self._loader_state = self._loader_state, {}
        loader = trainer.train_dataloader
        if state and isinstance(loader, ResumableDataLoader):
            loader.resume_from(state)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.trained_on_one()

    def state_dict(self) -> dict[str, Any]:
        """Saved with every checkpoint: Lightning's checkpoint callbacks run after this one's
        `on_train_batch_end`, so the batch just trained on is counted."""
        loader = self._trainer.train_dataloader if self._trainer is not None else None
        return {"loader": loader.resume_state() if isinstance(loader, ResumableDataLoader) else {}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = state_dict.get("loader") or {}
