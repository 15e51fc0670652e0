"""What a run prints: user errors as one message, known third-party noise filtered, unwrapped
paths.

- `entry_point` wraps an entry point's task function in both of the following.
- `exit_on_user_error` wraps an entry point's task function: a user error (a config, data set or
  checkpoint that cannot be used, a non-finite loss, a full disk) is logged as one message and
  the process exits with status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback instead.
- `KNOWN_NOISE` lists the fixed warnings and tips of third-party libraries that every run would
  print and that say nothing about this run; `filter_known_noise` silences exactly those.
- `console()` is a rich Console that never wraps a line when the output is not a terminal, so
  paths in log files stay whole and copyable.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

from rich.console import Console

__all__ = [
    "KNOWN_NOISE",
    "NoiseFilter",
    "console",
    "entry_point",
    "exit_on_user_error",
    "filter_known_noise",
    "user_error",
]

log = logging.getLogger(__name__)

USER_ERROR_STATUS = 2  # the shell's "bad usage" status, as argparse exits with


class NoiseFilter(NamedTuple):
    """One known message: a regex matched at the start of its text, and where it comes from:
    the module that issues the warning (`warnings.filterwarnings`) or, for a tip Lightning logs
    instead of warning, the logger's name (`logger=True`)."""

    message: str
    module: str
    logger: bool = False


# Fixed messages that a normal run prints whatever it does, each about something pvtlab decides
# on purpose (docs/design.md, "The console"). Every other warning still prints.
KNOWN_NOISE: tuple[NoiseFilter, ...] = (
    # Lightning's advertisement for its hosted logger, at every Trainer start.
    NoiseFilter(r".*litlogger", "lightning.pytorch.utilities.rank_zero", logger=True),
    # pvtlab's model summary (parameters and GMACs) replaces Lightning's on purpose.
    NoiseFilter(
        r"Trainer already configured with model summary callbacks",
        "lightning.pytorch.utilities.rank_zero",
        logger=True,
    ),
    NoiseFilter(
        r"Loading `train_dataloader` to estimate number of stepping batches",
        "lightning.pytorch.utilities.rank_zero",
        logger=True,
    ),
    # float32 matmul precision is a setting of its own (float32_matmul_precision).
    NoiseFilter(
        r"You are using a CUDA device .* that has Tensor Cores",
        "lightning.pytorch.utilities.rank_zero",
        logger=True,
    ),
    # The number of loader workers is a setting (data.loader.num_workers; null: the usable
    # cores, and 0 in the debug presets), not an oversight.
    NoiseFilter(r"The '\w+' does not have many workers", r"lightning\.pytorch\..*"),
    NoiseFilter(r"Consider setting `persistent_workers=True`", r"lightning\.pytorch\..*"),
    # The run folder holds config.yaml before the CSV logger writes metrics.csv beside it.
    NoiseFilter(r"Experiment logs directory .* exists and is not empty", r"lightning\.fabric\..*"),
    # Lightning's own use of a torch API that torch has deprecated.
    NoiseFilter(r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\..*"),
)


def filter_known_noise(filters: tuple[NoiseFilter, ...] = KNOWN_NOISE) -> None:
    """Silence exactly the listed messages, at their source."""
    for entry in filters:
        if entry.logger:
            logger = logging.getLogger(entry.module)
            logger.addFilter(_DropMessage(entry.message))
        else:
            warnings.filterwarnings("ignore", message=entry.message, module=entry.module)


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.match(record.getMessage()) is None

    def __eq__(self, other: object) -> bool:  # added once however often the filter is set up
        return isinstance(other, _DropMessage) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)


def console() -> Console:
    """A rich Console that wraps nothing when it does not print to a terminal (a log file, a
    SLURM output file): a long path stays on one line."""
    terminal = sys.stdout.isatty()
    return Console(soft_wrap=not terminal, width=None if terminal else 10_000)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error, then what it was raised from (Hydra's instantiate wraps what a target
    raises)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _user_error_types() -> tuple[type[BaseException], ...]:
    # Imported here: the entry points wrap their function before anything heavy is imported.
    from pvtlab.callbacks.checkpointing import TrainingInterruptedError
    from pvtlab.callbacks.guards import NonFiniteLossError
    from pvtlab.config import ConfigError
    from pvtlab.data.coco import CocoFormatError
    from pvtlab.data.imagefolder import ImageFolderError
    from pvtlab.data.segmentation import LabelMapError
    from pvtlab.export.graphs import ExportError
    from pvtlab.models.checkpoint import CheckpointError

    return (
        ConfigError,
        NonFiniteLossError,
        TrainingInterruptedError,  # Ctrl-C / SIGTERM: its message is the resume command
        CheckpointError,
        CocoFormatError,
        ImageFolderError,
        LabelMapError,
        ExportError,
        pickle.UnpicklingError,  # a checkpoint torch.load(weights_only=True) refuses
        FileNotFoundError,  # a data set, checkpoint or weights file that is not there
    )


def user_error(error: BaseException) -> BaseException | None:
    """The user error `error` is or was raised from, None for a bug (which keeps its
    traceback)."""
    kinds = _user_error_types()
    for cause in _causes(error):
        if isinstance(cause, kinds):
            return cause
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return cause
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"the disk is full{where}: free some space (or choose another paths.log_dir)"
    if isinstance(error, pickle.UnpicklingError):
        return f"the checkpoint cannot be loaded as plain tensors and values: {error}"
    return str(error)


F = TypeVar("F", bound=Callable[..., Any])


def entry_point(function: F) -> F:
    """What an entry point's task function runs under (below ``@hydra.main``): the known noise
    filtered, and a user error printed as one message with exit status 2."""
    filter_known_noise()
    return exit_on_user_error(function)


def exit_on_user_error(function: F) -> F:
    """Wrap an entry point's task function (under ``@hydra.main``): a user error is logged as
    one message and the process exits with status 2, without a traceback.

    ``HYDRA_FULL_ERROR=1`` keeps the traceback. In a multirun the error is raised on after its
    message, so that Hydra records the job as failed.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:
            cause = user_error(error)
            if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s: %s", type(cause).__name__, _describe(cause))
            if _in_multirun():
                raise
            sys.exit(USER_ERROR_STATUS)

    return wrapper  # type: ignore[return-value]


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    return HydraConfig.get().mode == RunMode.MULTIRUN
