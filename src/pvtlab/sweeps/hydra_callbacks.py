"""Hydra callbacks (registered in conf/hydra/default.yaml)."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from pvtlab.sweeps.collate import collate

log = logging.getLogger(__name__)


class MultirunSummary(Callback):
    """At the end of a multirun, one table of every job's metrics: ``<sweep dir>/summary.md``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = str(config.hydra.sweep.dir)
        try:
            paths = collate(sweep_dir)
        except Exception as error:  # a summary must never turn a finished sweep into a failure
            log.warning(
                "no multirun summary for %s: %s: %s", sweep_dir, type(error).__name__, error
            )
            return
        print(paths[0].read_text())
        for path in paths:
            log.info("multirun summary: %s", path)
