"""Strict loading of released and pvtlab checkpoints.

Accepted files (``.safetensors`` read with safetensors, any other with
``torch.load(weights_only=True)``):

* a bare state dict, or one nested under ``model`` or ``state_dict`` (the released PVT files);
* pvtlab's exported backbone files: ``torch.save(model.state_dict())`` of the full timm model;
* Lightning ``.ckpt`` files of pvtlab runs: the network's weights under ``state_dict`` with the
  ``model.`` prefix of the LightningModule attribute (other entries of the module are ignored).
  ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes are removed too;
* transformers' PVT (``save_pretrained``'s folder or its weights file), renamed to pvtlab's
  names (:mod:`pvtlab.models.hf`), and timm's ``save_for_hf`` folder.

The release's whole-model files (RetinaNet, Mask R-CNN, Semantic FPN) fill a whole network, not a
backbone: :mod:`pvtlab.models.release_checkpoints` maps them (``load_from=``, ``ckpt_path=``), and
:func:`load_checkpoint` refuses them with that advice.

Loading is all-or-nothing: every key of the model must be filled with a tensor of its shape, and
every key of the file must be used, except for two on-purpose cases:

* keys named in ``droppable`` (a feature extractor leaves out what its full model has: class
  token, final norm, head, later stages);
* the classifier (``pretrained_cfg['classifier']``) when its shape differs from the file's or the
  model has none (another ``num_classes``): the file's head is dropped and the model's freshly
  initialised head is kept.

Anything else raises one :class:`CheckpointError` that names the file and lists every missing,
unexpected and mis-shaped key with its shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pvtlab.models import hf

__all__ = [
    "CheckpointError",
    "LoadReport",
    "extract_state_dict",
    "key_problem_lines",
    "load_checkpoint",
    "read_state_dict",
    "unwrap_model",
    "validated_state_dict",
    "write_state_dict",
]

_logger = logging.getLogger(__name__)

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIGHTNING_PREFIX = "model."
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as a whole into the model it was meant for."""


@dataclass
class LoadReport:
    """What a strict load did: keys loaded, and keys left out on purpose with the reason."""

    source: str
    loaded: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    kept_init: list[str] = field(default_factory=list)


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def extract_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the network's state dict in a loaded checkpoint object and clean its key prefixes."""
    nested = None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj, nested = obj[key], key
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{source} holds no state dict: expected a mapping of parameter names to tensors, "
            f"bare or nested under 'model' or 'state_dict', found {type(obj).__name__}"
            + (" (empty)" if isinstance(obj, Mapping) else "")
        )
    keys = [k for k in obj if isinstance(k, str)]
    if nested == "state_dict" and any(k.startswith(_LIGHTNING_PREFIX) for k in keys):
        # Lightning checkpoint of a pvtlab task: the network is the module's `model` attribute
        obj = {
            k[len(_LIGHTNING_PREFIX) :]: v
            for k, v in obj.items()
            if k.startswith(_LIGHTNING_PREFIX)
        }
    elif keys and all(k.startswith(_LIGHTNING_PREFIX) for k in keys):
        obj = {k[len(_LIGHTNING_PREFIX) :]: v for k, v in obj.items()}

    out: dict[str, torch.Tensor] = {}
    bad = []
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            bad.append(f"{k!r}: {type(v).__name__}")
            continue
        while k.startswith(_WRAPPER_PREFIXES):
            k = k.split(".", 1)[1]
        out[k] = v
    if bad:
        raise CheckpointError(
            f"{source} is not a state dict: entries that are not name -> tensor: "
            + ", ".join(bad[:20])
            + (f" ... ({len(bad)} in all)" if len(bad) > 20 else "")
        )
    return out


def read_state_dict(path: str | PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict of a weights file: ``.safetensors`` read with safetensors, any other file
    with ``torch.load(weights_only=True)``; a folder written by transformers' ``save_pretrained``
    or timm's ``save_for_hf`` is read from its ``model.safetensors`` or ``pytorch_model.bin``.
    transformers' PVT names are renamed to pvtlab's (:mod:`pvtlab.models.hf`)."""
    path = Path(path)
    if path.is_dir():
        path = hf.weights_file(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == SAFETENSORS_SUFFIX:
        obj = _read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for files that are not checkpoints
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise CheckpointError(
                f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read "
                f"({type(err).__name__}: {reason[:200]}); expected a .pth/.ckpt/.safetensors "
                "file holding a state dict"
            ) from err
    state_dict = extract_state_dict(obj, str(path))
    if hf.is_transformers_layout(state_dict):
        try:
            state_dict, _ = hf.from_transformers(state_dict)
        except ValueError as err:
            raise CheckpointError(f"{path}: {err}") from err
    return state_dict


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a safetensors file ({err})") from err


def write_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | PathLike[str]) -> Path:
    """Write weights by the file's suffix: ``.safetensors`` with safetensors, any other with
    ``torch.save``; :func:`read_state_dict` reads both back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        # safetensors stores contiguous CPU tensors; the tag is what transformers and timm expect
        tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
        save_file(tensors, path, metadata={"format": "pt"})
    else:
        torch.save(dict(state_dict), path)
    return path


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network whose state dict a checkpoint fills (timm's getter feature wrapper holds it)."""
    inner = getattr(model, "model", None)
    if isinstance(model, nn.ModuleDict) and isinstance(inner, nn.Module) and len(model) == 1:
        return inner
    return model


def _classifier_keys(model: nn.Module) -> set[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def validated_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    droppable: Collection[str] = (),
    report: LoadReport | None = None,
) -> dict[str, torch.Tensor]:
    """Check `state_dict` against `model` and return the part to load; raise on any mismatch."""
    expected = model.state_dict()
    classifier = _classifier_keys(model)
    droppable = set(droppable)
    report = report if report is not None else LoadReport(source)
    sd = dict(state_dict)

    # a classifier of another size (or none in the model): drop the file's, keep the model's
    file_head = classifier & sd.keys()
    if file_head and any(k not in expected or expected[k].shape != sd[k].shape for k in file_head):
        for k in sorted(file_head):
            report.dropped[k] = f"classifier {_shape(sd.pop(k))} replaced (num_classes differs)"
        report.kept_init.extend(sorted(classifier & expected.keys()))

    missing, unexpected, mismatched = [], [], []
    for k, v in sd.items():
        if k not in expected:
            if k in droppable:
                report.dropped[k] = "not part of this model (features only)"
            else:
                unexpected.append(f"{k} {_shape(v)}")
        elif v.shape != expected[k].shape:
            mismatched.append(f"{k}: file {_shape(v)}, model {_shape(expected[k])}")
    for k, v in expected.items():
        # BatchNorm fills a missing counter itself; an older torch did not save it
        if k not in sd and k not in report.kept_init and not k.endswith("num_batches_tracked"):
            missing.append(f"{k} {_shape(v)}")

    if missing or unexpected or mismatched:
        lines = [f"cannot load {source} into {type(model).__name__} strictly:"]
        lines += key_problem_lines(
            ("missing from the file", missing),
            ("unexpected in the file", unexpected),
            ("shape mismatch", mismatched),
        )
        raise CheckpointError("\n".join(lines))

    loaded = {k: v for k, v in sd.items() if k in expected}
    report.loaded = sorted(loaded)
    return loaded


def key_problem_lines(*sections: tuple[str, list[str]]) -> list[str]:
    """The lines of a strict-loading error: each non-empty section's title, count and keys."""
    lines: list[str] = []
    for title, items in sections:
        if items:
            lines.append(f"  {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items)
    return lines


def _refuse_whole_release_model(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    # Imported here: the release mapping imports the heads, which import this module.
    from pvtlab.models.release_checkpoints import release_kind

    kind = release_kind(state_dict)
    if kind is not None:
        raise CheckpointError(
            f"{source} is the PVT release's whole {kind} checkpoint (backbone, neck and heads), "
            f"not a backbone's: start a run from it with load_from=, or evaluate it with "
            f"ckpt_path=, with head={kind}"
        )


def load_checkpoint(
    model: nn.Module,
    path: str | PathLike[str],
    *,
    filter_fn: FilterFn | None = None,
    droppable: Collection[str] = (),
) -> LoadReport:
    """Load a checkpoint file into `model` strictly (see the module docstring).

    Args:
        model: the network, or a timm feature wrapper around it.
        path: released file, pvtlab export or pvtlab Lightning checkpoint.
        filter_fn: ``(state_dict, network) -> state_dict`` adaptation applied before the check,
            e.g. position-embedding resizing.
        droppable: keys the file may hold that the model leaves out on purpose.
    """
    net = unwrap_model(model)
    source = str(path)
    state_dict = read_state_dict(path)
    _refuse_whole_release_model(state_dict, source)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, net)
    report = LoadReport(source)
    to_load = validated_state_dict(
        net, state_dict, source=source, droppable=droppable, report=report
    )
    result = net.load_state_dict(to_load, strict=False)
    left = [
        k
        for k in result.missing_keys
        if k not in report.kept_init and not k.endswith("num_batches_tracked")
    ]
    if left or result.unexpected_keys:  # defensive: validated above
        raise CheckpointError(
            f"{source}: load left {left} missing, {result.unexpected_keys} unexpected"
        )
    if report.dropped:
        _logger.info("%s: left out on purpose: %s", source, ", ".join(sorted(report.dropped)))
    return report
