"""Pyramid Vision Transformer (PVT v1).

`Pyramid Vision Transformer: A Versatile Backbone for Dense Prediction without Convolutions`,
Wang et al., ICCV 2021 (https://arxiv.org/abs/2102.12122).

The four released sizes (Tiny, Small, Medium, Large) match the authors' release number for
number: parameter counts, LayerNorm eps (1e-6 in blocks and the final norm, 1e-5 in the patch
embedding and the spatial-reduction norm) and the flat parameter names of the released
checkpoints (``pos_embed1..4``, ``cls_token``, ``patch_embed{i}``, ``block{i}.{j}``, ``norm``,
``head``), so ``model.state_dict()`` *is* the release layout and a released file loads with no
key remapping.

Where this implementation departs from the release, on purpose:

* Any input size. Every strided projection (the patch embeddings and the spatial-reduction conv
  of the attention) zero-pads its input at the right / bottom up to a multiple of its stride, so
  stage ``i`` has a ``ceil(H / s_i) x ceil(W / s_i)`` token grid for strides 4, 8, 16, 32 (the
  same rounding as a ResNet) and no pixel or token is dropped. When the input is a multiple of
  32 (all the release's own uses: 224 crops, detection inputs padded to 32, 512 crops) nothing is
  padded and the computation is the release's.
* Position embeddings are resized bilinearly (``align_corners=False``) to each stage's own grid;
  stage 4's class-token slot is kept apart. The release compared every stage against stage 1's
  token count and crashed at 448 and 896.
* Attention runs through ``F.scaled_dot_product_attention``; ``fused_attn=False`` writes out
  ``softmax(q k^T * scale) v`` instead, the release's arithmetic.
* Feature extraction (``features_only=True`` or ``prune_intermediate_layers``) removes the class
  token, the final norm and the head (the dense-prediction models take the four stage maps
  without them, and the release's detectors load its checkpoints ignoring those keys): stage 4
  then attends over its spatial tokens only and uses ``pos_embed4[:, 1:]``.

``pvt_small_wide`` is the "wider" model of the paper's Table 9: PVT-Small's depths (3-4-6-3),
heads (1 / 2 / 5 / 8), MLP ratios (8 / 8 / 4 / 4) and SR ratios, with the embed dims widened
from 64 / 128 / 320 / 512 to 88 / 176 / 440 / 688 (x1.375 in stages 1-3, i.e. 88-channel heads;
x1.344 in stage 4, 86-channel heads), so the MLP hidden widths are 704 / 1408 / 1760 / 2752.
An exact x1.4 (89.6 / 179.2 / 448 / 716.8) does not divide into the heads, and the nearest
widths that do (89 / 178 / 445 / 712) land 5.9% above PVT-Medium; 88 / 176 / 440 / 688 give
44,943,096 parameters with a 1000-class head, 1.7% above PVT-Medium's 44,208,104 (the paper's premise:
equal parameters, wider vs deeper), and 7.09 GMACs at 224 (Medium: 6.66).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from os import PathLike
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from pvtlab.models.checkpoint import extract_state_dict, load_checkpoint, validated_state_dict

__all__ = [
    "PatchEmbed",
    "PyramidVisionTransformer",
    "SpatialReductionAttention",
    "checkpoint_filter_fn",
    "resize_pos_embed",
]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW tensor at the right and bottom so H and W are multiples of `multiple`."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def resize_pos_embed(
    pos_embed: torch.Tensor,
    src_size: tuple[int, int],
    dst_size: tuple[int, int],
    num_prefix_tokens: int = 0,
) -> torch.Tensor:
    """Resize a ``(1, prefix + h * w, C)`` position embedding to another token grid.

    The grid part is interpolated bilinearly (``align_corners=False``, as the release does);
    the first `num_prefix_tokens` entries (the class-token slot) are kept apart and unchanged.
    """
    # Under torch.export the grid is symbolic: always resize (exact at the same size), so that
    # one exported graph serves every input size instead of guarding on the stored one.
    if not torch.compiler.is_exporting() and tuple(src_size) == tuple(dst_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    C = grid.shape[-1]
    grid = grid.reshape(1, src_size[0], src_size[1], C).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_size), mode="bilinear", align_corners=False)
    grid = grid.flatten(2).transpose(1, 2)
    return torch.cat((prefix, grid), dim=1) if num_prefix_tokens else grid


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patch projection (Conv2d k = s = p), then LayerNorm (eps 1e-5)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(pad_to_multiple(x, self.patch_size))
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (H, W)


class SpatialReductionAttention(nn.Module):
    """Multi-head attention whose keys and values come from an R x R-reduced token grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        sr_ratio: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.sr_ratio = sr_ratio
        self.fused_attn = fused_attn

        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim)
        else:
            self.sr = None
            self.norm = None

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr is not None:
            # A channels-last view of the tokens: the reduction conv reads them without a copy
            # and its channels-last output flattens back to tokens as a view.
            kv_in = x.reshape(B, size[0], size[1], C).permute(0, 3, 1, 2)
            kv_in = self.sr(pad_to_multiple(kv_in, self.sr_ratio)).flatten(2).transpose(1, 2)
            kv_in = self.norm(kv_in)
        else:
            kv_in = x
        kv = self.kv(kv_in).reshape(B, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: SRA then MLP, each with a residual and stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        sr_ratio: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialReductionAttention(
            dim,
            num_heads=num_heads,
            sr_ratio=sr_ratio,
            qkv_bias=qkv_bias,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            fused_attn=fused_attn,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


class PyramidVisionTransformer(nn.Module):
    """PVT v1: four stages of patch embedding + position embedding + SRA transformer blocks.

    Parameters keep the release's flat names: stage ``i`` (1-based) owns ``patch_embed{i}``,
    ``pos_embed{i}`` and the blocks ``block{i}.{j}``; ``cls_token`` joins at the start of the last
    stage (``pos_embed4`` holds its slot first), ``norm`` and ``head`` classify the final-normed
    class token.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        patch_sizes: Sequence[int] = (4, 2, 2, 2),
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        fused_attn: bool = True,
    ) -> None:
        """
        Args:
            img_size: training resolution; sets the stored position-embedding grids only, any
                input size runs.
            global_pool: ``'token'`` classifies the class token; ``''`` returns all tokens.
            drop_rate: dropout before the head.
            pos_drop_rate / proj_drop_rate / attn_drop_rate: dropout after the position
                embedding, after the attention / MLP projections, on the attention weights.
            drop_path_rate: stochastic depth, ramped linearly from 0 over all blocks.
            fused_attn: ``F.scaled_dot_product_attention`` if True, the written-out softmax
                product (the release's arithmetic) if False.
        """
        super().__init__()
        num_stages = len(depths)
        for name, seq in (("patch_sizes", patch_sizes), ("embed_dims", embed_dims),
                          ("num_heads", num_heads), ("mlp_ratios", mlp_ratios),
                          ("sr_ratios", sr_ratios)):  # fmt: skip
            if len(seq) != num_stages:
                raise ValueError(f"{name} has {len(seq)} entries, depths has {num_stages}")
        if sr_ratios[-1] != 1:
            raise ValueError("the last stage carries the class token and needs sr_ratio 1")
        if global_pool not in ("token", ""):
            raise ValueError(f"global_pool must be 'token' or '', got {global_pool!r}")

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.num_stages = num_stages
        self.embed_dims = tuple(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = (False,) * num_stages

        img_size = _pair(img_size)
        strides = [math.prod(patch_sizes[: i + 1]) for i in range(num_stages)]
        # token grid each stored position embedding was trained for (ceil: inputs are padded)
        self.pos_embed_sizes = tuple(
            (math.ceil(img_size[0] / s), math.ceil(img_size[1] / s)) for s in strides
        )
        for i, (h, w) in enumerate(self.pos_embed_sizes):
            extra = 1 if i == num_stages - 1 else 0
            setattr(
                self,
                f"pos_embed{i + 1}",
                nn.Parameter(torch.zeros(1, h * w + extra, embed_dims[i])),
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # linear ramp over all blocks (plain Python: the model can be built on the meta device)
        n_blocks = sum(depths)
        dpr = [drop_path_rate * j / max(n_blocks - 1, 1) for j in range(n_blocks)]
        self.feature_info: list[dict[str, Any]] = []
        prev_dim, cur = in_chans, 0
        for i in range(num_stages):
            setattr(
                self, f"patch_embed{i + 1}", PatchEmbed(patch_sizes[i], prev_dim, embed_dims[i])
            )
            blocks = nn.ModuleList(
                Block(
                    embed_dims[i],
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    sr_ratio=sr_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[cur + j],
                    fused_attn=fused_attn,
                )
                for j in range(depths[i])
            )
            setattr(self, f"block{i + 1}", blocks)
            self.feature_info.append(
                dict(num_chs=embed_dims[i], reduction=strides[i], module=f"block{i + 1}")
            )
            prev_dim, cur = embed_dims[i], cur + depths[i]

        self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()

        for i in range(num_stages):
            trunc_normal_(getattr(self, f"pos_embed{i + 1}"), std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # convolutions keep PyTorch's default init, as in the release
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ----------------------------------------------------------------------------------------
    # timm model interface

    @property
    def num_prefix_tokens(self) -> int:
        return 0 if self.cls_token is None else 1

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        names = {f"pos_embed{i + 1}" for i in range(self.num_stages)}
        return names | ({"cls_token"} if self.cls_token is not None else set())

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        if coarse:
            return dict(
                stem=r"^cls_token|^pos_embed1|^patch_embed1",
                blocks=[(r"^(?:block|patch_embed|pos_embed)(\d+)", None), (r"^norm", (99999,))],
            )
        return dict(
            stem=r"^cls_token|^pos_embed1|^patch_embed1",
            blocks=[
                (r"^block(\d+)\.(\d+)", None),
                # a stage's patch and position embedding go with its first block
                (r"^(?:patch_embed|pos_embed)(\d+)", (0,)),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool | Sequence[bool] = True) -> None:
        """Checkpoint every block of all stages (bool) or of the chosen stages (one bool each)."""
        if isinstance(enable, bool):
            enable = (enable,) * self.num_stages
        if len(enable) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} flags, one per stage, got {len(enable)}")
        self.grad_checkpointing = tuple(bool(e) for e in enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", ""):
                raise ValueError(f"global_pool must be 'token' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            self._init_weights(head)
            ref = next(self.parameters(), None)
            if ref is not None:
                head = head.to(device=ref.device, dtype=ref.dtype)
        self.head = head.train(self.training)

    # ----------------------------------------------------------------------------------------
    # forward

    def _pos_embed(self, i: int, size: tuple[int, int], with_prefix: bool) -> torch.Tensor:
        pos = getattr(self, f"pos_embed{i + 1}")
        stored_prefix = 1 if i == len(self.pos_embed_sizes) - 1 else 0
        if stored_prefix and not with_prefix:
            pos, stored_prefix = pos[:, 1:], 0
        return resize_pos_embed(pos, self.pos_embed_sizes[i], size, stored_prefix)

    def _forward_stage(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stage `i` (0-based) on an NCHW input; returns tokens (B, [1 +] h * w, C) and (h, w)."""
        x, size = getattr(self, f"patch_embed{i + 1}")(x)
        with_cls = i == len(self.pos_embed_sizes) - 1 and self.cls_token is not None
        if with_cls:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self._pos_embed(i, size, with_cls))
        use_ckpt = self.grad_checkpointing[i] and torch.is_grad_enabled()
        for blk in getattr(self, f"block{i + 1}"):
            x = checkpoint(blk, x, size) if use_ckpt else blk(x, size)
        return x, size

    @staticmethod
    def _to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return x.reshape(x.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens of the last stage, class token first: (B, [1 +] h * w, C)."""
        for i in range(self.num_stages):
            x, size = self._forward_stage(i, x)
            if i < self.num_stages - 1:
                x = self._to_map(x, size)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs as NCHW maps (class token removed).

        Args:
            indices: stages to return (last n if int, all if None, these if a sequence).
            norm: apply the final norm to the last stage's map.
            stop_early: stop after the last requested stage.
            intermediates_only: return only the maps, not the final tokens.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early or intermediates_only else self.num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x, size = self._forward_stage(i, x)
            if i == self.num_stages - 1:
                normed = self.norm(x) if norm or not intermediates_only else x
                fmap = self._to_map((normed if norm else x)[:, self.num_prefix_tokens :], size)
                x = normed
            else:
                fmap = x = self._to_map(x, size)
            if i in take_indices:
                intermediates.append(fmap.contiguous())
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Remove what the chosen stages do not need: later stages, the head and class token,
        and the final norm if `prune_norm`."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            setattr(self, f"patch_embed{i + 1}", None)
            setattr(self, f"block{i + 1}", None)
            setattr(self, f"pos_embed{i + 1}", None)
        pruned_end = max_index < self.num_stages - 1
        self.num_stages = max_index + 1
        self.grad_checkpointing = self.grad_checkpointing[: self.num_stages]
        if pruned_end:
            self.num_features = self.head_hidden_size = self.embed_dims[max_index]
        if prune_norm or pruned_end:
            self.norm = nn.Identity()
        if prune_head or pruned_end:
            self.cls_token = None
            self.reset_classifier(0, "")
        return take_indices

    # ----------------------------------------------------------------------------------------
    # checkpoints

    def load_pretrained(self, checkpoint_path: str | PathLike[str]) -> None:
        """Strict load of a released or pvtlab checkpoint file (timm's ``custom_load`` hook)."""
        load_checkpoint(self, checkpoint_path, filter_fn=checkpoint_filter_fn)


def checkpoint_filter_fn(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Resize position embeddings trained at another (square) resolution to the model's grids.

    Keys need no remapping: the model uses the release's names.
    """
    out = dict(state_dict)
    for i, size in enumerate(model.pos_embed_sizes):
        key = f"pos_embed{i + 1}"
        target = getattr(model, key, None)
        if key not in out or target is None or out[key].shape == target.shape:
            continue
        pos = out[key]
        prefix = 1 if i == len(model.pos_embed_sizes) - 1 else 0
        side = math.isqrt(pos.shape[1] - prefix)
        if pos.ndim != 3 or side * side != pos.shape[1] - prefix or pos.shape[2] != target.shape[2]:
            continue  # not a square grid of the right width: the strict check reports it
        out[key] = resize_pos_embed(pos.float(), (side, side), size, prefix).to(pos.dtype)
    return out


def _pretrained_filter(
    state_dict: dict[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    # timm calls this for `pretrained_cfg_overlay=dict(state_dict=...)`; files go through
    # `load_pretrained` above. Either way the weights are checked strictly.
    state_dict = extract_state_dict(state_dict, "pretrained_cfg state_dict")
    return validated_state_dict(model, checkpoint_filter_fn(state_dict, model), source="state_dict")


def _create_pvt(variant: str, pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and overlay.get("file"):
        # timm turns custom loading off for a file overlay unless told otherwise: route files
        # through `load_pretrained` (readable errors naming the file, strict load)
        kwargs["pretrained_cfg_overlay"] = {"custom_load": True, **overlay}
    return build_model_with_cfg(
        PyramidVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=_pretrained_filter,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


def pretrained_cfg(**kwargs: Any) -> dict[str, Any]:
    """timm pretrained config of a pvtlab model (keyword arguments override the PVT defaults)."""
    # no url / hf_hub_id: nothing ever downloads; pass the released file with
    # pretrained_cfg_overlay=dict(file=...) (or `create_backbone(pretrained=path)`)
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.proj",
        "classifier": "head",
        "fixed_input_size": False,
        "custom_load": True,
        "license": "apache-2.0",
        "paper_ids": "arXiv:2102.12122",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "pvt_tiny.in1k": pretrained_cfg(),
        "pvt_small.in1k": pretrained_cfg(),
        "pvt_medium.in1k": pretrained_cfg(),
        "pvt_large.in1k": pretrained_cfg(),
        "pvt_small_wide.untrained": pretrained_cfg(),
    }
)


@register_model
def pvt_tiny(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Tiny: depths 2-2-2-2, 13.2M parameters, 1.93 GMACs at 224."""
    return _create_pvt("pvt_tiny", pretrained, **dict(dict(depths=(2, 2, 2, 2)), **kwargs))


@register_model
def pvt_small(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Small: depths 3-4-6-3, 24.5M parameters, 3.82 GMACs at 224."""
    return _create_pvt("pvt_small", pretrained, **dict(dict(depths=(3, 4, 6, 3)), **kwargs))


@register_model
def pvt_medium(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Medium: depths 3-4-18-3, 44.2M parameters, 6.66 GMACs at 224."""
    return _create_pvt("pvt_medium", pretrained, **dict(dict(depths=(3, 4, 18, 3)), **kwargs))


@register_model
def pvt_large(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Large: depths 3-8-27-3, 61.4M parameters, 9.81 GMACs at 224."""
    return _create_pvt("pvt_large", pretrained, **dict(dict(depths=(3, 8, 27, 3)), **kwargs))


@register_model
def pvt_small_wide(pretrained: bool = False, **kwargs: Any) -> PyramidVisionTransformer:
    """PVT-Small-Wide (paper Table 9): PVT-Small ~1.4x wider, 44.9M parameters (module docstring)."""
    args = dict(depths=(3, 4, 6, 3), embed_dims=(88, 176, 440, 688))
    return _create_pvt("pvt_small_wide", pretrained, **dict(args, **kwargs))
