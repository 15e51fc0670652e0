"""transformers' PVT v1 layout (``PvtModel``, ``PvtForImageClassification``) <-> pvtlab's PVT.

A transformers PVT is a folder written by ``save_pretrained``: ``config.json`` (a ``PvtConfig``)
and ``model.safetensors`` or ``pytorch_model.bin``. This module reads and writes that folder with
plain ``json``, ``safetensors`` and ``torch`` (transformers itself is not needed) and renames every
tensor between transformers' nested names and the release's flat ones, which pvtlab keeps
(transformers' first; ``PvtForImageClassification`` puts ``pvt.`` before ``encoder``; ``{s}`` is a
0-based stage, ``{j}`` a block)::

    encoder.patch_embeddings.{s}.projection                   patch_embed{s+1}.proj
    encoder.patch_embeddings.{s}.layer_norm                   patch_embed{s+1}.norm
    encoder.patch_embeddings.{s}.position_embeddings          pos_embed{s+1}
    encoder.patch_embeddings.{last}.cls_token                 cls_token
    encoder.block.{s}.{j}.layer_norm_1                        block{s+1}.{j}.norm1
    encoder.block.{s}.{j}.attention.self.query                block{s+1}.{j}.attn.q
    encoder.block.{s}.{j}.attention.self.key + .value         block{s+1}.{j}.attn.kv (key rows first)
    encoder.block.{s}.{j}.attention.self.sequence_reduction   block{s+1}.{j}.attn.sr (``sr`` before
                                                              transformers 5, read too)
    encoder.block.{s}.{j}.attention.self.layer_norm           block{s+1}.{j}.attn.norm
    encoder.block.{s}.{j}.attention.output.dense              block{s+1}.{j}.attn.proj
    encoder.block.{s}.{j}.layer_norm_2                        block{s+1}.{j}.norm2
    encoder.block.{s}.{j}.mlp.dense1 / dense2                 block{s+1}.{j}.mlp.fc1 / fc2
    encoder.layer_norm                                        norm
    classifier                                                head

Both compute the release's function but for one detail of arithmetic: transformers has a single
``layer_norm_eps`` (1e-6 by default) for every LayerNorm, where the release and pvtlab use 1e-5 in
the patch embeddings and the spatial-reduction norm (1e-6 in the blocks and the final norm); the
tests hold the two within 1e-4 on the same weights. Both prepend the class token at stage 4 only,
its position-embedding slot first, and classify the final-normed class token. transformers runs at
its configured ``image_size`` only (it does not resize position embeddings), pvtlab at any size.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_FILE",
    "PVT_CONFIG_DEFAULTS",
    "WEIGHT_FILES",
    "KeyChange",
    "from_transformers",
    "is_transformers_layout",
    "pvt_arguments",
    "read_transformers",
    "to_transformers",
    "transformers_config",
    "weights_file",
    "write_transformers",
]

CONFIG_FILE = "config.json"
# what `save_pretrained` writes, in the order transformers itself prefers them
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_CLASSIFIER_PREFIX = "pvt."  # PvtForImageClassification's attribute holding its PvtModel

# PvtConfig's defaults: `save_pretrained` leaves out of config.json every value equal to them.
PVT_CONFIG_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "num_channels": 3,
    "num_encoder_blocks": 4,
    "depths": [2, 2, 2, 2],
    "sequence_reduction_ratios": [8, 4, 2, 1],
    "hidden_sizes": [64, 128, 320, 512],
    "patch_sizes": [4, 2, 2, 2],
    "strides": [4, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "mlp_ratios": [8, 8, 4, 4],
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "num_labels": 1000,
}

# One rule per tensor name: transformers' template, pvtlab's template. `{s}` is the 0-based stage
# of transformers, `{S}` the 1-based stage of pvtlab, `{j}` a block, `{p}` weight or bias.
_RULES: tuple[tuple[str, str], ...] = (
    ("encoder.patch_embeddings.{s}.projection.{p}", "patch_embed{S}.proj.{p}"),
    ("encoder.patch_embeddings.{s}.layer_norm.{p}", "patch_embed{S}.norm.{p}"),
    ("encoder.patch_embeddings.{s}.position_embeddings", "pos_embed{S}"),
    ("encoder.block.{s}.{j}.layer_norm_1.{p}", "block{S}.{j}.norm1.{p}"),
    ("encoder.block.{s}.{j}.attention.self.query.{p}", "block{S}.{j}.attn.q.{p}"),
    ("encoder.block.{s}.{j}.attention.self.sequence_reduction.{p}", "block{S}.{j}.attn.sr.{p}"),
    ("encoder.block.{s}.{j}.attention.self.layer_norm.{p}", "block{S}.{j}.attn.norm.{p}"),
    ("encoder.block.{s}.{j}.attention.output.dense.{p}", "block{S}.{j}.attn.proj.{p}"),
    ("encoder.block.{s}.{j}.layer_norm_2.{p}", "block{S}.{j}.norm2.{p}"),
    ("encoder.block.{s}.{j}.mlp.dense1.{p}", "block{S}.{j}.mlp.fc1.{p}"),
    ("encoder.block.{s}.{j}.mlp.dense2.{p}", "block{S}.{j}.mlp.fc2.{p}"),
    ("encoder.layer_norm.{p}", "norm.{p}"),
    ("classifier.{p}", "head.{p}"),
)
# Read, never written: the spatial-reduction conv's name before transformers 5.
_OLDER_RULES: tuple[tuple[str, str], ...] = (
    ("encoder.block.{s}.{j}.attention.self.sr.{p}", "block{S}.{j}.attn.sr.{p}"),
)
# transformers' separate key and value projections are the two halves of pvtlab's `kv`
_KEY = "encoder.block.{s}.{j}.attention.self.key.{p}"
_VALUE = "encoder.block.{s}.{j}.attention.self.value.{p}"
_KV = "block{S}.{j}.attn.kv.{p}"
_CLS_TOKEN = "encoder.patch_embeddings.{s}.cls_token"


@dataclass(frozen=True)
class KeyChange:
    """How tensors of one layout became tensors of another: `action` is ``renamed`` (one to
    one), ``merged`` (several into one, concatenated) or ``split`` (one into several)."""

    source: tuple[str, ...]
    target: tuple[str, ...]
    action: str


def _pattern(template: str) -> re.Pattern[str]:
    fields = {"{s}": r"(?P<s>\d+)", "{S}": r"(?P<S>\d+)", "{j}": r"(?P<j>\d+)"}
    fields["{p}"] = r"(?P<p>weight|bias)"
    regex = re.escape(template)
    for field, group in fields.items():
        regex = regex.replace(re.escape(field), group)
    return re.compile(regex)


def _fields(match: re.Match[str]) -> dict[str, Any]:
    """Both stage numberings from whichever one the name carried."""
    found = match.groupdict()
    if found.get("s") is not None:
        return {**found, "s": int(found["s"]), "S": int(found["s"]) + 1}
    if found.get("S") is not None:
        return {**found, "s": int(found["S"]) - 1, "S": int(found["S"])}
    return found  # a name outside the stages (final norm, classifier)


_HF_RULES = [(_pattern(hf), pvt) for hf, pvt in _RULES + _OLDER_RULES]
_PVT_RULES = [(_pattern(pvt), hf) for hf, pvt in _RULES]
_KEY_RE, _VALUE_RE, _KV_RE = _pattern(_KEY), _pattern(_VALUE), _pattern(_KV)
_CLS_RE = _pattern(_CLS_TOKEN)


def is_transformers_layout(keys: Mapping[str, Any] | list[str]) -> bool:
    """Whether these tensor names are transformers' PVT (with or without the ``pvt.`` prefix)."""
    return any(
        k.removeprefix(_CLASSIFIER_PREFIX).startswith("encoder.patch_embeddings.") for k in keys
    )


def _unaccounted(keys: list[str], layout: str) -> ValueError:
    listed = ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")
    return ValueError(f"not part of {layout}'s PVT layout, so not converted: {listed}")


def from_transformers(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[KeyChange]]:
    """transformers' PVT tensors under pvtlab's (the release's) names, and what was done.

    Every tensor is accounted for: a name outside the layout raises ``ValueError``.
    """
    out: dict[str, torch.Tensor] = {}
    changes: list[KeyChange] = []
    halves: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for key in state_dict:
        name = key.removeprefix(_CLASSIFIER_PREFIX)
        for regex, template in _HF_RULES:
            if match := regex.fullmatch(name):
                target = template.format(**_fields(match))
                out[target] = state_dict[key]
                changes.append(KeyChange((key,), (target,), "renamed"))
                break
        else:
            if match := _CLS_RE.fullmatch(name):
                out["cls_token"] = state_dict[key]
                changes.append(KeyChange((key,), ("cls_token",), "renamed"))
            elif (match := _KEY_RE.fullmatch(name)) or (match := _VALUE_RE.fullmatch(name)):
                target = _KV.format(**_fields(match))
                part = "key" if ".self.key." in name else "value"
                halves.setdefault(target, {})[part] = key
            else:
                unknown.append(key)
    for target, parts in halves.items():
        if set(parts) != {"key", "value"}:
            missing = "value" if "key" in parts else "key"
            raise ValueError(
                f"{next(iter(parts.values()))} has no {missing} partner to form {target}"
            )
        out[target] = torch.cat((state_dict[parts["key"]], state_dict[parts["value"]]), dim=0)
        changes.append(KeyChange((parts["key"], parts["value"]), (target,), "merged"))
    if unknown:
        raise _unaccounted(unknown, "transformers")
    return out, changes


def to_transformers(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[KeyChange]]:
    """pvtlab's PVT tensors under transformers' names, and what was done.

    With a ``head`` the names are ``PvtForImageClassification``'s (``pvt.encoder...`` and
    ``classifier``), without one ``PvtModel``'s (``encoder...``). Every tensor is accounted for.
    """
    num_stages = sum(1 for k in state_dict if re.fullmatch(r"pos_embed\d+", k))
    prefix = _CLASSIFIER_PREFIX if "head.weight" in state_dict else ""
    out: dict[str, torch.Tensor] = {}
    changes: list[KeyChange] = []
    unknown: list[str] = []
    for key, value in state_dict.items():
        for regex, template in _PVT_RULES:
            if match := regex.fullmatch(key):
                target = template.format(**_fields(match))
                target = target if target.startswith("classifier.") else prefix + target
                out[target] = value
                changes.append(KeyChange((key,), (target,), "renamed"))
                break
        else:
            if key == "cls_token" and num_stages:
                target = prefix + _CLS_TOKEN.format(s=num_stages - 1)
                out[target] = value
                changes.append(KeyChange((key,), (target,), "renamed"))
            elif match := _KV_RE.fullmatch(key):
                names = _fields(match)
                k_name, v_name = prefix + _KEY.format(**names), prefix + _VALUE.format(**names)
                k, v = value.chunk(2, dim=0)
                out[k_name], out[v_name] = k.contiguous(), v.contiguous()
                changes.append(KeyChange((key,), (k_name, v_name), "split"))
            else:
                unknown.append(key)
    if unknown:
        raise _unaccounted(unknown, "pvtlab")
    return out, changes


# ------------------------------------------------------------------------------------- config


def pvt_arguments(config: Mapping[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """``PyramidVisionTransformer`` arguments of a transformers ``PvtConfig`` (config.json).

    Args:
        config: the json's mapping; values it leaves out take PvtConfig's defaults.
        num_classes: the classifier's size when known from the weights (0: no classifier);
            None: from the config (``id2label``, else ``num_labels``).

    Raises ``ValueError`` for a config pvtlab's PVT cannot express.
    """
    cfg = {**PVT_CONFIG_DEFAULTS, **config}
    if cfg.get("model_type", "pvt") != "pvt":
        raise ValueError(f"config.json is a {cfg['model_type']!r} model, not transformers' 'pvt'")
    depths = list(cfg["depths"])
    problems = []
    if int(cfg["num_encoder_blocks"]) != len(depths):
        problems.append(
            f"num_encoder_blocks {cfg['num_encoder_blocks']} != len(depths) {len(depths)}"
        )
    if list(cfg["strides"]) != list(cfg["patch_sizes"]):
        # transformers convolves with kernel `strides[i]` at stride `patch_sizes[i]`; PVT's patch
        # embedding is kernel = stride = patch size
        problems.append(f"strides {cfg['strides']} differ from patch_sizes {cfg['patch_sizes']}")
    if cfg["hidden_act"] != "gelu":
        problems.append(f"hidden_act {cfg['hidden_act']!r} (PVT uses exact 'gelu')")
    if not isinstance(cfg["image_size"], int):
        problems.append(f"image_size {cfg['image_size']!r} is not one square side")
    if problems:
        raise ValueError("transformers PvtConfig not expressible as PVT: " + "; ".join(problems))
    if num_classes is None:
        labels = cfg.get("id2label")
        num_classes = len(labels) if labels else int(cfg["num_labels"])
    return {
        "img_size": int(cfg["image_size"]),
        "in_chans": int(cfg["num_channels"]),
        "num_classes": int(num_classes),
        "patch_sizes": tuple(int(p) for p in cfg["patch_sizes"]),
        "embed_dims": tuple(int(d) for d in cfg["hidden_sizes"]),
        "depths": tuple(int(d) for d in depths),
        "num_heads": tuple(int(h) for h in cfg["num_attention_heads"]),
        "mlp_ratios": tuple(cfg["mlp_ratios"]),
        "sr_ratios": tuple(int(r) for r in cfg["sequence_reduction_ratios"]),
        "qkv_bias": bool(cfg["qkv_bias"]),
    }


def _whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def transformers_config(
    arguments: Mapping[str, Any], class_names: list[str] | None = None
) -> dict[str, Any]:
    """The ``PvtConfig`` (config.json's mapping) of a PVT built with `arguments` (the
    ``PyramidVisionTransformer`` arguments; :func:`pvt_arguments` is the inverse).

    ``layer_norm_eps`` is the release's 1e-6 of the blocks and final norm (transformers has one
    eps for every norm; see the module docstring).
    """
    args = dict(arguments)
    img_size = args["img_size"]
    if not isinstance(img_size, int):
        h, w = img_size
        if h != w:
            raise ValueError(f"transformers' PVT needs a square image_size, not {h}x{w}")
        img_size = h
    patch_sizes = [int(p) for p in args["patch_sizes"]]
    num_classes = int(args["num_classes"])
    config: dict[str, Any] = {
        "architectures": ["PvtForImageClassification" if num_classes else "PvtModel"],
        "model_type": "pvt",
        "image_size": int(img_size),
        "num_channels": int(args.get("in_chans", 3)),
        "num_encoder_blocks": len(args["depths"]),
        "depths": [int(d) for d in args["depths"]],
        "sequence_reduction_ratios": [int(r) for r in args["sr_ratios"]],
        "hidden_sizes": [int(d) for d in args["embed_dims"]],
        "patch_sizes": patch_sizes,
        "strides": patch_sizes,
        "num_attention_heads": [int(h) for h in args["num_heads"]],
        "mlp_ratios": [_whole(r) for r in args["mlp_ratios"]],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "qkv_bias": bool(args.get("qkv_bias", True)),
    }
    if num_classes:
        names = list(class_names) if class_names else [f"LABEL_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for a {num_classes}-class head")
        config["num_labels"] = num_classes  # transformers 5 sizes the classifier by it
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    return config


# -------------------------------------------------------------------------------------- files


def weights_file(folder: str | PathLike[str]) -> Path:
    """The weights of a transformers folder: ``model.safetensors``, else ``pytorch_model.bin``."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder} holds no {' or '.join(WEIGHT_FILES)} (what transformers' save_pretrained writes)"
    )


def read_transformers(
    path: str | PathLike[str],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and the tensors of a transformers PVT folder (or of a weights file in one)."""
    path = Path(path)
    folder, weights = (path, weights_file(path)) if path.is_dir() else (path.parent, path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a transformers folder holds config.json")
    config = json.loads(config_path.read_text())
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(weights, device="cpu")
    else:
        tensors = torch.load(weights, map_location="cpu", weights_only=True)
    return config, dict(tensors)


def write_transformers(
    state_dict: Mapping[str, torch.Tensor],
    arguments: Mapping[str, Any],
    folder: str | PathLike[str],
    class_names: list[str] | None = None,
) -> tuple[Path, list[KeyChange]]:
    """Save a pvtlab PVT's weights as transformers' ``save_pretrained`` would: ``config.json``
    and ``model.safetensors`` in `folder`. Returns the weights file and the renaming done."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers_config(arguments, class_names)
    tensors, changes = to_transformers(state_dict)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    weights = folder / WEIGHT_FILES[0]
    # transformers reads a safetensors file only with this format tag
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return weights, changes
