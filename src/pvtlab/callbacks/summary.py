"""The model summary at the start of a run, with the network's parameters and GMACs.

Lightning's summary counts FLOPs only through a LightningModule's ``example_input_array``, which
pvtlab's tasks do not have (their batch shapes depend on the data), so it reports 0. This one
counts multiply-accumulates instead, attention products included (:mod:`pvtlab.models.complexity`),
in one evaluation-mode forward pass of a random image at the run's evaluation input size: the
figure ``python src/models.py`` lists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_formatted_model_size
from omegaconf import OmegaConf

__all__ = ["ComplexitySummary"]


class ComplexitySummary(RichModelSummary):
    """Lightning's rich model summary, its FLOPs replaced by the network's GMACs.

    Args:
        max_depth: module nesting shown in the table (0: no summary).
        input_size: ``(H, W)`` the GMACs are counted at; None: the evaluation size of the run's
            data module (its ``transforms``: ``image_size``, ``crop_size`` or
            ``test_short_side`` x ``max_size``).
    """

    def __init__(
        self,
        max_depth: int = 1,
        input_size: Sequence[int] | None = None,
        **summarize_kwargs: Any,
    ) -> None:
        super().__init__(max_depth, **summarize_kwargs)
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        self.complexity_line = ""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._max_depth and trainer.is_global_zero:
            self.complexity_line = self._complexity(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    def _input_size(self, trainer: L.Trainer) -> tuple[int, int] | None:
        if self.input_size is not None:
            return self.input_size  # type: ignore[return-value]
        from pvtlab.loggers import complexity_input_size

        transforms = getattr(trainer.datamodule, "transforms", None)
        if is_dataclass(transforms):  # pvtlab's data modules hold their settings dataclass
            transforms = asdict(transforms)
        if not isinstance(transforms, Mapping):
            return None
        return complexity_input_size(OmegaConf.create(dict(transforms)))

    def _complexity(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        from pvtlab.loggers import network_gmacs

        network = getattr(pl_module, "model", pl_module)
        params = sum(p.numel() for p in network.parameters())
        line = f"network: {params / 1e6:.2f} M parameters"
        try:
            size = self._input_size(trainer)
            if size is None:
                return line + "; GMACs not counted (no input size: pass input_size=)"
            with torch.no_grad():
                gmacs = network_gmacs(network, getattr(pl_module, "kind", ""), size)
        except Exception as error:  # the summary never stops a run: no figure, and why
            return line + f"; GMACs not counted ({type(error).__name__}: {error})"
        return line + f", {gmacs:.2f} GMACs at {size[0]}x{size[1]} (attention products included)"

    def summarize(  # type: ignore[override]
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        console = get_console()
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        for name, _ in columns:
            right = name.startswith("Params") or name.endswith("sizes")
            table.add_column(name, justify="right" if right else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console.print(table)
        frozen = total_parameters - trainable_parameters
        console.print(
            f"[bold]Trainable params[/]: {trainable_parameters:,}  "
            f"[bold]Non-trainable params[/]: {frozen:,}  "
            f"[bold]Size[/]: {get_formatted_model_size(model_size)} MB  "
            f"[bold]Modules in train / eval mode[/]: "
            f"{total_training_modes['train']} / {total_training_modes['eval']}",
            soft_wrap=True,
        )
        if self.complexity_line:
            console.print(f"[bold]{self.complexity_line}[/]", soft_wrap=True)
