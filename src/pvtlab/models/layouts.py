"""The layouts PVT weights come in, and conversion between them (``python src/convert.py``).

* ``pvtlab``: one file, ``.pth`` or ``.safetensors``, holding the release's flat names: a released
  ``pvt_*.pth``, a classification run's ``backbone.pth``, what ``backbone.pretrained=`` reads.
  A pvtlab classification ``.ckpt`` is read as its network's weights.
* ``hf``: transformers' folder, ``config.json`` and ``model.safetensors`` (or
  ``pytorch_model.bin``) of ``PvtForImageClassification`` / ``PvtModel`` (:mod:`pvtlab.models.hf`).
* ``timm``: timm's folder, ``config.json`` naming the pvtlab model and ``model.safetensors``,
  which ``timm.create_model("local-dir:<folder>", pretrained=True)`` loads once pvtlab is imported.

A conversion builds pvtlab's PVT, loads the weights into it strictly, and writes that model out,
so what is written always loads back.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

from pvtlab.models import hf
from pvtlab.models.checkpoint import (
    SAFETENSORS_SUFFIX,
    CheckpointError,
    extract_state_dict,
    validated_state_dict,
    write_state_dict,
)
from pvtlab.models.hf import KeyChange
from pvtlab.models.pvt import checkpoint_filter_fn

__all__ = [
    "LAYOUTS",
    "Conversion",
    "PvtWeights",
    "convert",
    "pvt_arguments_of",
    "read_pvt_weights",
    "timm_variant",
]

LAYOUTS = ("pvtlab", "hf", "timm")
# every PVT size has 1 / 2 / 5 / 8 heads; the weights do not record it (docs/paper.md section 1)
DEFAULT_NUM_HEADS = (1, 2, 5, 8)
PVT_VARIANTS = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_small_wide")
_LIGHTNING_WEIGHTS = "state_dict"


@dataclass
class PvtWeights:
    """PVT weights under pvtlab's names, the model they fit, and how they were read."""

    state_dict: dict[str, torch.Tensor]
    arguments: dict[str, Any]  # PyramidVisionTransformer arguments
    layout: str
    changes: list[KeyChange] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def pvt_arguments_of(model: nn.Module) -> dict[str, Any]:
    """The ``PyramidVisionTransformer`` arguments that build a model like `model`."""
    stages = range(model.num_stages)
    blocks = [getattr(model, f"block{i + 1}") for i in stages]
    patch_sizes = tuple(getattr(model, f"patch_embed{i + 1}").patch_size for i in stages)
    grid_h, grid_w = model.pos_embed_sizes[0]
    img_h, img_w = grid_h * patch_sizes[0], grid_w * patch_sizes[0]
    return {
        "img_size": img_h if img_h == img_w else (img_h, img_w),
        "in_chans": model.in_chans,
        "num_classes": model.num_classes,
        "patch_sizes": patch_sizes,
        "embed_dims": tuple(model.embed_dims),
        "depths": tuple(len(b) for b in blocks),
        "num_heads": tuple(b[0].attn.num_heads for b in blocks),
        "mlp_ratios": tuple(
            _whole(b[0].mlp.fc1.out_features / d)
            for b, d in zip(blocks, model.embed_dims, strict=True)
        ),
        "sr_ratios": tuple(b[0].attn.sr_ratio for b in blocks),
        "qkv_bias": blocks[0][0].attn.q.bias is not None,
    }


@functools.cache
def _variant_arguments(name: str) -> dict[str, Any]:
    with torch.device("meta"):  # shapes only
        return pvt_arguments_of(timm.create_model(name))


def timm_variant(arguments: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registered PVT closest to `arguments`, and the arguments that differ from it
    (``num_classes`` aside): ``timm.create_model(name, num_classes=..., **those)`` builds it."""
    best: tuple[str, dict[str, Any]] | None = None
    for name in PVT_VARIANTS:
        own = _variant_arguments(name)
        differ = {k: v for k, v in arguments.items() if k != "num_classes" and own.get(k) != v}
        if best is None or len(differ) < len(best[1]):
            best = (name, differ)
    assert best is not None
    return best


def architecture_from_weights(
    state_dict: Mapping[str, torch.Tensor], num_heads: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """``PyramidVisionTransformer`` arguments read off the tensors' shapes.

    The number of heads leaves no trace in the weights: `num_heads`, else PVT's 1 / 2 / 5 / 8.
    """
    stages = sorted(int(m[1]) for k in state_dict if (m := re.fullmatch(r"pos_embed(\d+)", k)))
    if not stages or "patch_embed1.proj.weight" not in state_dict:
        raise CheckpointError(
            "no pos_embed1 / patch_embed1: not the weights of a PVT classifier or backbone "
            f"(first keys: {', '.join(list(state_dict)[:5])})"
        )
    depths, embed_dims, patch_sizes, sr_ratios, mlp_ratios = [], [], [], [], []
    for s in stages:
        blocks = {int(m[1]) for k in state_dict if (m := re.match(rf"block{s}\.(\d+)\.", k))}
        proj = state_dict[f"patch_embed{s}.proj.weight"]
        dim = proj.shape[0]
        depths.append(max(blocks) + 1 if blocks else 0)
        embed_dims.append(dim)
        patch_sizes.append(proj.shape[-1])
        sr = state_dict.get(f"block{s}.0.attn.sr.weight")
        sr_ratios.append(sr.shape[-1] if sr is not None else 1)
        mlp_ratios.append(_whole(state_dict[f"block{s}.0.mlp.fc1.weight"].shape[0] / dim))
    tokens = state_dict["pos_embed1"].shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"pos_embed1 holds {tokens} tokens: not a square grid")
    heads = tuple(num_heads) if num_heads is not None else DEFAULT_NUM_HEADS[: len(stages)]
    if len(heads) != len(stages):
        raise ValueError(f"num_heads needs one entry per stage ({len(stages)}), got {heads}")
    head = state_dict.get("head.weight")
    return {
        "img_size": side * patch_sizes[0],
        "in_chans": state_dict["patch_embed1.proj.weight"].shape[1],
        "num_classes": head.shape[0] if head is not None else 0,
        "patch_sizes": tuple(patch_sizes),
        "embed_dims": tuple(embed_dims),
        "depths": tuple(depths),
        "num_heads": heads,
        "mlp_ratios": tuple(mlp_ratios),
        "sr_ratios": tuple(sr_ratios),
        "qkv_bias": "block1.0.attn.q.bias" in state_dict,
    }


def _load(path: Path) -> Any:
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for files that are not checkpoints
        raise CheckpointError(
            f"{path} is not a file torch.load(weights_only=True) can read ({type(err).__name__})"
        ) from err


def _lightning_leftovers(obj: Any) -> dict[str, str]:
    """What a Lightning checkpoint holds besides the network's weights, and why it stays."""
    if not isinstance(obj, Mapping) or not isinstance(obj.get(_LIGHTNING_WEIGHTS), Mapping):
        return {}
    dropped = {
        f"{_LIGHTNING_WEIGHTS}.{k}": "the task module's own state, not the network's"
        for k in obj[_LIGHTNING_WEIGHTS]
        if isinstance(k, str) and not k.startswith("model.")
    }
    for key in obj:
        if key == "ema_state_dict":
            dropped[key] = "the EMA weights; the network's own weights are converted"
        elif key != _LIGHTNING_WEIGHTS:
            dropped[key] = "training state or run settings, not weights"
    return dropped


def _ckpt_variant(obj: Any) -> str | None:
    """The backbone a pvtlab checkpoint's saved network description names."""
    try:
        name = obj["hyper_parameters"]["model_config"]["backbone"]["name"]
    except (KeyError, TypeError):
        return None
    return name if name in PVT_VARIANTS else None


def read_pvt_weights(
    path: str | PathLike[str], num_heads: tuple[int, ...] | None = None
) -> PvtWeights:
    """PVT weights of any accepted layout (see the module docstring), under pvtlab's names.

    Args:
        path: a file, or a transformers or timm folder.
        num_heads: heads per stage, for files that do not say (a released or exported file);
            None: the checkpoint's named model, else PVT's 1 / 2 / 5 / 8.
    """
    path = Path(path)
    config_path = (path if path.is_dir() else path.parent) / hf.CONFIG_FILE
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if path.is_dir() and not config:
        raise FileNotFoundError(f"{path} is a folder without {hf.CONFIG_FILE}")

    if path.is_dir() and "architecture" in config:  # timm's save_for_hf
        with torch.device("meta"):  # timm reads its own config.json; shapes only
            model = timm.create_model(f"local-dir:{path}", pretrained=False)
        state_dict = extract_state_dict(_load(hf.weights_file(path)), str(path))
        return PvtWeights(state_dict, pvt_arguments_of(model), "timm")

    if path.is_dir() or config.get("model_type") == "pvt":
        config, tensors = hf.read_transformers(path)
        state_dict, changes = hf.from_transformers(tensors)
        head = state_dict.get("head.weight")
        arguments = hf.pvt_arguments(config, head.shape[0] if head is not None else 0)
        eps = config.get("layer_norm_eps", hf.PVT_CONFIG_DEFAULTS["layer_norm_eps"])
        note = (
            f"transformers uses layer_norm_eps={eps} in every LayerNorm; pvtlab, as the release, "
            "1e-5 in the patch embeddings and spatial-reduction norms"
        )
        return PvtWeights(state_dict, arguments, "hf", changes, notes=[note])

    if not path.is_file():
        raise FileNotFoundError(f"no such file or folder: {path}")
    obj = _load(path)
    state_dict = extract_state_dict(obj, str(path))
    notes = []
    if hf.is_transformers_layout(state_dict):  # a transformers weights file without its config
        state_dict, changes = hf.from_transformers(state_dict)
        layout = "hf"
        notes.append(f"no {hf.CONFIG_FILE} beside {path.name}: the model is read off the shapes")
    else:
        changes, layout = [], "pvtlab"
    variant = _ckpt_variant(obj) if num_heads is None else None
    if variant is not None:
        num_heads = tuple(_variant_arguments(variant)["num_heads"])
    elif num_heads is None:
        notes.append(
            f"heads per stage {DEFAULT_NUM_HEADS} (every PVT size's): the weights do not record "
            "them; num_heads= sets others"
        )
    arguments = architecture_from_weights(state_dict, num_heads)
    return PvtWeights(state_dict, arguments, layout, changes, _lightning_leftovers(obj), notes)


# ----------------------------------------------------------------------------------- convert


@dataclass
class Conversion:
    """What :func:`convert` read, built and wrote, and every tensor's way from one to the other."""

    source: Path
    target: Path
    source_layout: str
    target_layout: str
    model: str
    model_args: dict[str, Any]
    arguments: dict[str, Any]
    changes: list[KeyChange]
    kept: list[str]
    resized: dict[str, tuple[tuple[int, int], tuple[int, int]]]
    dropped: dict[str, str]
    notes: list[str]

    def lines(self) -> list[str]:
        """The key mapping, as ``src/convert.py`` prints it."""
        args = ", ".join(f"{k}={v}" for k, v in self.model_args.items())
        out = [
            f"read:    {self.source} ({self.source_layout} layout)",
            f"wrote:   {self.target} ({self.target_layout} layout)",
            f"model:   {self.model}({args})" if args else f"model:   {self.model}",
            "          " + ", ".join(f"{k}={v}" for k, v in self.arguments.items()),
        ]
        for action in ("renamed", "merged", "split"):
            rows = [c for c in self.changes if c.action == action]
            if rows:
                out.append(f"{action} ({len(rows)}):")
                out += [f"  {' + '.join(c.source)} -> {' + '.join(c.target)}" for c in rows]
        out.append(f"kept under the same name ({len(self.kept)})")
        out.append(f"resized ({len(self.resized)}):")
        out += [
            f"  {key}: grid {a[0]}x{a[1]} -> {b[0]}x{b[1]} (bilinear; class-token slot kept)"
            if key == f"pos_embed{len(self.arguments['depths'])}"
            else f"  {key}: grid {a[0]}x{a[1]} -> {b[0]}x{b[1]} (bilinear)"
            for key, (a, b) in self.resized.items()
        ]
        out.append(f"dropped ({len(self.dropped)}):")
        out += [f"  {key}: {why}" for key, why in self.dropped.items()]
        out += [f"note: {note}" for note in self.notes]
        return out


def _grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


def convert(
    source: str | PathLike[str],
    target: str | PathLike[str],
    to: str,
    *,
    img_size: int | None = None,
    num_heads: tuple[int, ...] | None = None,
) -> Conversion:
    """Convert PVT weights between layouts (see the module docstring).

    Args:
        source: a file or folder of any layout.
        target: a ``.pth`` / ``.safetensors`` file for ``pvtlab``, a folder for ``hf`` and ``timm``.
        to: ``pvtlab``, ``hf`` or ``timm``.
        img_size: store the position embeddings for this training resolution (resized
            bilinearly); None keeps the source's.
        num_heads: heads per stage when the source does not say (:func:`read_pvt_weights`).
    """
    if to not in LAYOUTS:
        raise ValueError(f"to={to!r}: choose one of {', '.join(LAYOUTS)}")
    source, target = Path(source), Path(target)
    weights = read_pvt_weights(source, num_heads)
    arguments = dict(weights.arguments)
    if img_size is not None:
        arguments["img_size"] = int(img_size)
    name, model_args = timm_variant(arguments)
    model = timm.create_model(name, num_classes=arguments["num_classes"], **model_args)
    filtered = checkpoint_filter_fn(weights.state_dict, model)
    model.load_state_dict(validated_state_dict(model, filtered, source=str(source)), strict=True)

    resized = {}
    for i, grid in enumerate(model.pos_embed_sizes):
        key, prefix = f"pos_embed{i + 1}", int(i == len(model.pos_embed_sizes) - 1)
        if weights.state_dict[key].shape != filtered[key].shape:
            resized[key] = (_grid(weights.state_dict[key].shape[1] - prefix), tuple(grid))
    changes = list(weights.changes)
    if to == "pvtlab":
        if target.suffix not in (SAFETENSORS_SUFFIX, ".pth", ".pt", ".bin"):
            raise ValueError(f"out={target}: a pvtlab file ends in .safetensors or .pth")
        write_state_dict(model.state_dict(), target)
    elif to == "hf":
        _, written = hf.write_transformers(model.state_dict(), pvt_arguments_of(model), target)
        changes += written
    else:
        timm.models.save_for_hf(model, target, model_args=model_args, safe_serialization=True)
    touched = {k for c in changes for k in (*c.source, *c.target)}
    kept = [k for k in model.state_dict() if k not in touched]
    return Conversion(
        source=source,
        target=target,
        source_layout=weights.layout,
        target_layout=to,
        model=name,
        model_args=model_args,
        arguments=pvt_arguments_of(model),
        changes=changes,
        kept=kept,
        resized=resized,
        dropped=weights.dropped,
        notes=weights.notes,
    )
