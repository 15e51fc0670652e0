"""A Trans2Seg-style transformer segmentation head (Xie et al. 2021), as PVT's Table 7 uses it.

No PVT + Trans2Seg code was ever published; this head follows the Trans2Seg paper's description
(docs/paper.md section 3). The design choices, with the reasons, are in
experiments/trans2seg_design.md; in short:

1. Encoder. The last pyramid map (stride 32) is flattened into tokens, projected by a linear layer
   to the embedding width, given a learned position embedding (stored as a `pos_grid` grid and
   resized bilinearly to the actual token grid, so any input size works), and passed through
   `depth` pre-norm transformer blocks and a final LayerNorm.
2. Decoder. One learned query per class (the class count is the constructor's, nothing is
   hard-coded) goes through `depth - 1` pre-norm blocks of cross-attention to the encoder tokens
   plus an MLP, then a last cross-attention step whose per-head attention logits
   `(B, heads, K, N)`, taken before the softmax (a softmax over tokens would make the maps' scale
   depend on the image size), become `heads` maps per class on the token grid. These logits are
   an output, so they are computed explicitly rather than by `scaled_dot_product_attention`; the
   last step has no value / output projection or MLP, whose results nothing would use.
3. Per-class refinement. For each class, its `heads` maps and the encoder features (shared by
   all classes) are projected to `hidden` channels and summed (one conv over their concatenation,
   with the shared half computed once), then norm-ReLU and a 3x3 conv-norm-ReLU on the grid.
4. Fusion. The class maps are upsampled to stride 4 and added to a 1x1 conv-norm-ReLU projection
   of the stride-4 feature (shared by all classes); a separable 3x3 conv (depthwise, pointwise,
   each with norm and ReLU) and a 1x1 conv to one channel give each class's logit map, which is
   upsampled to the input size.

Reference widths (embed / depth / heads / MLP ratio / hidden) live in conf/head/trans2seg*.yaml:
small 128/1/4/2/32, medium 256/4/8/3/64 (default), large 768/12/16/4/128.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from pvtlab.models.factory import BackboneFactory, pyramid_backbone
from pvtlab.models.heads.semantic_fpn import ConvNormReLU, norm_2d


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class ClassAttention(nn.Module):
    """Cross-attention of class queries to tokens that also returns the per-head logits.

    With `values=False` only the logits are computed (the last decoder step, whose query update
    would be unused: unused parameters break DDP).
    """

    def __init__(self, dim: int, num_heads: int, values: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim) if values else None
        self.proj = nn.Linear(dim, dim) if values else None

    def _heads(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        return x.reshape(B, L, self.num_heads, C // self.num_heads).transpose(1, 2)

    def logits(self, queries: Tensor, tokens: Tensor) -> Tensor:
        """`(B, K, C)`, `(B, N, C)` -> attention logits `(B, heads, K, N)`."""
        return (self._heads(self.q(queries)) * self.scale) @ self._heads(self.k(tokens)).transpose(
            -2, -1
        )

    def forward(self, queries: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Updated queries `(B, K, C)` and the logits `(B, heads, K, N)`."""
        if self.v is None or self.proj is None:
            raise RuntimeError("ClassAttention(values=False) computes logits only; call .logits()")
        logits = self.logits(queries, tokens)
        out = logits.softmax(dim=-1) @ self._heads(self.v(tokens))
        return self.proj(out.transpose(1, 2).flatten(2)), logits


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        update, _ = self.attn(self.norm1(queries), tokens)
        queries = queries + update
        return queries + self.mlp(self.norm2(queries))


class MapBlock(nn.Module):
    """The decoder's last step: normed queries against the tokens, attention logits only."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, num_heads, values=False)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        return self.attn.logits(self.norm(queries), tokens)


class Trans2SegHead(nn.Module):
    """Stride-4 and last pyramid maps -> per-class logits at stride 4.

    Args:
        detail_channels: channels of the stride-4 map.
        context_channels: channels of the last (stride-32) map.
        num_classes: classes, one learned query each.
        embed_dim, depth, num_heads, mlp_ratio: transformer width, depth (encoder blocks, and
            decoder attention steps: `depth - 1` full blocks then the map step), attention heads,
            MLP expansion.
        hidden_dim: width of the per-class convolutional refinement.
        pos_grid: token grid of the stored position embedding (16x16: a 512 crop at stride 32);
            other grids get it resized.
        norm: norm of the convolutions (`bn`, `gn`, `none`).
    """

    def __init__(
        self,
        detail_channels: int,
        context_channels: int,
        num_classes: int,
        embed_dim: int = 256,
        depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 3.0,
        hidden_dim: int = 64,
        pos_grid: Sequence[int] = (16, 16),
        norm: str = "bn",
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_heads = num_heads
        # 1. encoder over the last map
        self.token_proj = nn.Linear(context_channels, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *pos_grid))
        self.encoder = nn.ModuleList(
            EncoderBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.encoder_norm = nn.LayerNorm(embed_dim)
        # 2. decoder: one query per class
        self.class_queries = nn.Parameter(torch.zeros(1, num_classes, embed_dim))
        self.decoder = nn.ModuleList(
            DecoderBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth - 1)
        )
        self.decoder_maps = MapBlock(embed_dim, num_heads)
        # 3. per-class refinement on the token grid: conv over [attention maps, encoder features]
        # Standardised first: attention logits start near zero (q and k both small at init), and a
        # product of two small factors is slow to leave that saddle without the rescaling.
        self.map_norm = norm_2d(norm, num_heads)
        self.map_proj = nn.Conv2d(num_heads, hidden_dim, 1, bias=False)
        self.feature_proj = nn.Conv2d(embed_dim, hidden_dim, 1, bias=norm == "none")
        self.map_act = nn.Sequential(norm_2d(norm, hidden_dim), nn.ReLU(inplace=True))
        self.map_conv = ConvNormReLU(hidden_dim, hidden_dim, 3, norm)
        # 4. fusion with the stride-4 feature
        self.detail_proj = ConvNormReLU(detail_channels, hidden_dim, 1, norm)
        self.fuse = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, 3, padding=1, groups=hidden_dim, bias=False),
            norm_2d(norm, hidden_dim),
            nn.ReLU(inplace=True),
            ConvNormReLU(hidden_dim, hidden_dim, 1, norm),
        )
        self.pred = nn.Conv2d(hidden_dim, 1, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.class_queries, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.pred.weight, std=0.01)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "class_queries"}

    def position_embedding(self, height: int, width: int) -> Tensor:
        """`(1, H*W, C)`: the stored grid, resized bilinearly when the token grid differs."""
        pos = self.pos_embed
        # Always resized under torch.export (exact at the same size): one graph for every size.
        if torch.compiler.is_exporting() or pos.shape[-2:] != (height, width):
            pos = F.interpolate(pos, size=(height, width), mode="bilinear", align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def class_maps(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder features `(B, C, h, w)` and last-block attention logits `(B, K, heads, h, w)`."""
        B, _, h, w = context.shape
        tokens = self.token_proj(context.flatten(2).transpose(1, 2)) + self.position_embedding(h, w)
        for block in self.encoder:
            tokens = block(tokens)
        tokens = self.encoder_norm(tokens)
        # A copy, not an expand() view: a parameter view without grad_fn upsets module hooks
        # (FlopCounterMode's tracker) under no_grad.
        queries = self.class_queries.repeat(B, 1, 1)
        for block in self.decoder:
            queries = block(queries, tokens)
        logits = self.decoder_maps(queries, tokens)
        features = tokens.transpose(1, 2).reshape(B, -1, h, w)
        maps = logits.transpose(1, 2).reshape(B, self.num_classes, self.num_heads, h, w)
        return features, maps

    def forward(self, detail: Tensor, context: Tensor) -> Tensor:
        features, maps = self.class_maps(context)
        B, K, heads, h, w = maps.shape
        # Per class: conv([maps_k, features]) = map_proj(maps_k) + feature_proj(features).
        x = self.map_proj(self.map_norm(maps.reshape(B * K, heads, h, w))).reshape(B, K, -1, h, w)
        x = (x + self.feature_proj(features).unsqueeze(1)).flatten(0, 1)
        x = self.map_conv(self.map_act(x))
        size = detail.shape[-2:]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        x = x.reshape(B, K, -1, *size) + self.detail_proj(detail).unsqueeze(1)
        x = self.pred(self.fuse(x.flatten(0, 1)))
        return x.reshape(B, K, *size)


class Trans2Seg(nn.Module):
    """Backbone + Trans2Seg-style head; logits at the input size.

    Args:
        backbone: a timm `features_only` model (four maps, strides 4 to 32), or a factory of
            one (`pyramid_backbone`).
        num_classes: output classes (any number).
        embed_dim, depth, num_heads, mlp_ratio, hidden_dim, pos_grid, norm: see `Trans2SegHead`.
        detail_stage, context_stage: which backbone maps feed the fusion and the encoder.
    """

    def __init__(
        self,
        backbone: nn.Module | BackboneFactory,
        num_classes: int,
        embed_dim: int = 256,
        depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 3.0,
        hidden_dim: int = 64,
        pos_grid: Sequence[int] = (16, 16),
        norm: str = "bn",
        detail_stage: int = 0,
        context_stage: int = -1,
    ) -> None:
        super().__init__()
        backbone = pyramid_backbone(backbone)
        channels = backbone.feature_info.channels()
        self.backbone = backbone
        self.detail_stage, self.context_stage = detail_stage, context_stage
        self.head = Trans2SegHead(
            channels[detail_stage],
            channels[context_stage],
            num_classes,
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            hidden_dim,
            tuple(pos_grid),
            norm,
        )
        self.num_classes = num_classes

    def forward(self, images: Tensor) -> Tensor:
        features = self.backbone(images)
        logits = self.head(features[self.detail_stage], features[self.context_stage])
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
