"""An independent, minimal re-statement of the released PVT v1 forward pass, for parity tests.

Written from the description in docs/paper.md section 1 (not from the authors' code):
plain functions over a state dict in the release's flat key layout, explicit softmax, no
modules. Patch embeddings are Conv2d k = s = p with no padding, so inputs must be multiples of
32 (what the release runs on). Position embeddings are resized per stage to that stage's own
grid (the release's stage-1 comparison bug is not reproduced: at 224 it does not matter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PATCH_SIZES = (4, 2, 2, 2)
EMBED_DIMS = (64, 128, 320, 512)
MLP_RATIOS = (8, 8, 4, 4)
SR_RATIOS = (8, 4, 2, 1)
HEAD_DIM = 64  # 64 channels per head in every stage
DEPTHS = {
    "pvt_tiny": (2, 2, 2, 2),
    "pvt_small": (3, 4, 6, 3),
    "pvt_medium": (3, 4, 18, 3),
    "pvt_large": (3, 8, 27, 3),
}


def release_layout(depths: tuple[int, ...], num_classes: int = 1000) -> list[tuple[str, tuple]]:
    """(key, shape) of every tensor of a released checkpoint, in the release's order."""
    keys: list[tuple[str, tuple]] = []
    grid = 224
    for s, dim in enumerate(EMBED_DIMS, start=1):
        grid //= PATCH_SIZES[s - 1]
        keys.append((f"pos_embed{s}", (1, grid * grid + (1 if s == 4 else 0), dim)))
    keys.append(("cls_token", (1, 1, EMBED_DIMS[-1])))
    in_dim = 3
    for s, (dim, depth) in enumerate(zip(EMBED_DIMS, depths, strict=True), start=1):
        p, sr, hidden = PATCH_SIZES[s - 1], SR_RATIOS[s - 1], dim * MLP_RATIOS[s - 1]
        keys += [
            (f"patch_embed{s}.proj.weight", (dim, in_dim, p, p)),
            (f"patch_embed{s}.proj.bias", (dim,)),
            (f"patch_embed{s}.norm.weight", (dim,)),
            (f"patch_embed{s}.norm.bias", (dim,)),
        ]
        for j in range(depth):
            b = f"block{s}.{j}"
            keys += [
                (f"{b}.norm1.weight", (dim,)),
                (f"{b}.norm1.bias", (dim,)),
                (f"{b}.attn.q.weight", (dim, dim)),
                (f"{b}.attn.q.bias", (dim,)),
                (f"{b}.attn.kv.weight", (2 * dim, dim)),
                (f"{b}.attn.kv.bias", (2 * dim,)),
                (f"{b}.attn.proj.weight", (dim, dim)),
                (f"{b}.attn.proj.bias", (dim,)),
            ]
            if sr > 1:
                keys += [
                    (f"{b}.attn.sr.weight", (dim, dim, sr, sr)),
                    (f"{b}.attn.sr.bias", (dim,)),
                    (f"{b}.attn.norm.weight", (dim,)),
                    (f"{b}.attn.norm.bias", (dim,)),
                ]
            keys += [
                (f"{b}.norm2.weight", (dim,)),
                (f"{b}.norm2.bias", (dim,)),
                (f"{b}.mlp.fc1.weight", (hidden, dim)),
                (f"{b}.mlp.fc1.bias", (hidden,)),
                (f"{b}.mlp.fc2.weight", (dim, hidden)),
                (f"{b}.mlp.fc2.bias", (dim,)),
            ]
        in_dim = dim
    keys += [
        ("norm.weight", (EMBED_DIMS[-1],)),
        ("norm.bias", (EMBED_DIMS[-1],)),
        ("head.weight", (num_classes, EMBED_DIMS[-1])),
        ("head.bias", (num_classes,)),
    ]
    return keys


def random_state_dict(layout: list[tuple[str, tuple]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a realistic scale (activations stay O(1), attention is not uniform)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in layout:
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.startswith(("pos_embed", "cls_token")) or key.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[key] = t
    return sd


def _ln(x: torch.Tensor, sd: dict, name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _fc(x: torch.Tensor, sd: dict, name: str) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def attention(x: torch.Tensor, h: int, w: int, sd: dict, name: str) -> torch.Tensor:
    B, N, C = x.shape
    heads = C // HEAD_DIM
    q = _fc(x, sd, f"{name}.q").reshape(B, N, heads, HEAD_DIM).permute(0, 2, 1, 3)
    if f"{name}.sr.weight" in sd:
        sr = sd[f"{name}.sr.weight"]
        kv_in = x.permute(0, 2, 1).reshape(B, C, h, w)
        kv_in = F.conv2d(kv_in, sr, sd[f"{name}.sr.bias"], stride=sr.shape[-1])
        kv_in = _ln(kv_in.reshape(B, C, -1).permute(0, 2, 1), sd, f"{name}.norm", 1e-5)
    else:
        kv_in = x
    kv = _fc(kv_in, sd, f"{name}.kv").reshape(B, -1, 2, heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    weights = torch.softmax((q @ k.transpose(-2, -1)) * HEAD_DIM**-0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, C)
    return _fc(out, sd, f"{name}.proj")


def block(x: torch.Tensor, h: int, w: int, sd: dict, name: str) -> torch.Tensor:
    x = x + attention(_ln(x, sd, f"{name}.norm1", 1e-6), h, w, sd, f"{name}.attn")
    h = F.gelu(_fc(_ln(x, sd, f"{name}.norm2", 1e-6), sd, f"{name}.mlp.fc1"))
    return x + _fc(h, sd, f"{name}.mlp.fc2")


def _pos(pos: torch.Tensor, h: int, w: int) -> torch.Tensor:
    side = math.isqrt(pos.shape[1])
    if (side, side) == (h, w):
        return pos
    grid = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
    return grid.reshape(1, -1, h * w).permute(0, 2, 1)


def _stages(sd: dict, images: torch.Tensor, with_cls: bool):
    x, B = images, images.shape[0]
    for s in range(1, 5):
        w = sd[f"patch_embed{s}.proj.weight"]
        x = F.conv2d(x, w, sd[f"patch_embed{s}.proj.bias"], stride=w.shape[-1])
        H, W = x.shape[-2:]
        x = _ln(x.flatten(2).transpose(1, 2), sd, f"patch_embed{s}.norm", 1e-5)
        pos = sd[f"pos_embed{s}"]
        if s == 4:
            if with_cls:
                x = torch.cat((sd["cls_token"].expand(B, -1, -1), x), dim=1)
                pos = torch.cat((pos[:, :1], _pos(pos[:, 1:], H, W)), dim=1)
            else:
                pos = _pos(pos[:, 1:], H, W)
        else:
            pos = _pos(pos, H, W)
        x = x + pos
        j = 0
        while f"block{s}.{j}.norm1.weight" in sd:
            x = block(x, H, W, sd, f"block{s}.{j}")
            j += 1
        yield x, H, W
        if s < 4:
            x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def forward(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Class logits: final-normed class token into the linear head."""
    *_, (x, _, _) = _stages(sd, images, with_cls=True)
    return _fc(_ln(x, sd, "norm", 1e-6)[:, 0], sd, "head")


@torch.no_grad()
def features(sd: dict[str, torch.Tensor], images: torch.Tensor) -> list[torch.Tensor]:
    """The four NCHW stage maps of the dense-prediction backbone (no class token, no norm)."""
    B = images.shape[0]
    return [x.reshape(B, H, W, -1).permute(0, 3, 1, 2) for x, H, W in _stages(sd, images, False)]
