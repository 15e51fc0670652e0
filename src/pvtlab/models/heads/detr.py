"""DETR (paper Table 6) on the last map of any pyramid backbone: a detector without convolutions.

PVT + DETR has no convolution beyond PVT's own patch projections: the stage-4 map (stride 32) is
projected to the model width by a linear layer, a post-norm transformer of 6 encoder and 6 decoder
layers (8 heads, FFN 2048, dropout 0.1) reads it with a sine position encoding that is added to
queries and keys in every layer, and 100 learned queries come out as class logits (K + 1, the last
slot "no object") and normalised (cx, cy, w, h) boxes. Training matches queries to objects with
the Hungarian matcher (`detr_matcher`) and scores every decoder layer with the set criterion
(`detr_criterion`); evaluation returns every query's box, best class and its probability, without
NMS.

Padding: the images of a batch differ in size; they are padded bottom-right to a common multiple
of 32 with a mask that is True on padding. The mask, brought to the feature map's size, builds the
position encoding (coordinates normalised to each image's own extent) and is the key padding mask
of the encoder's self-attention and the decoder's cross-attention, so padding never reaches a
prediction through the transformer. (The backbone itself sees the padded image, as in DETR.)

Interface of every pvtlab detection head (docs/design.md): `model(images, targets)` in training
returns a dict of weighted losses; `model(images)` in evaluation returns per image `{boxes,
scores, labels}`, boxes xyxy in the pixels of that image, labels 0-based.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert

from pvtlab.data.detection_transforms import pad_images
from pvtlab.models.factory import BackboneFactory, pyramid_backbone
from pvtlab.models.heads.detr_criterion import SetCriterion
from pvtlab.models.heads.detr_matcher import HungarianMatcher
from pvtlab.models.heads.transfer import to_device_without_waiting


class PositionEmbeddingSine(nn.Module):
    """DETR's 2-D sine / cosine encoding of each position's coordinates within its image.

    Coordinates are the counts of valid positions up to and including this one along each axis,
    scaled to (0, 2 pi] by the image's own valid extent, so the encoding of an image does not
    depend on how much padding its batch adds. `dim / 2` channels encode y, then `dim / 2` x.
    """

    def __init__(self, dim: int = 256, temperature: float = 10000.0) -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"position encoding width {dim} must be a multiple of 4")
        self.dim = dim
        self.temperature = temperature

    def forward(self, mask: Tensor) -> Tensor:
        """(B, H, W) bool, True on padding -> (B, H * W, dim)."""
        valid = (~mask).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * 2 * math.pi
        x = x / (x[:, :, -1:] + eps) * 2 * math.pi
        half = self.dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=mask.device)
        freqs = self.temperature ** (2 * torch.div(steps, 2, rounding_mode="floor") / half)
        pos_x = x[..., None] / freqs
        pos_y = y[..., None] / freqs
        # Interleave sin of even and cos of odd channels, as DETR.
        pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=-1).flatten(3)
        pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=-1).flatten(3)
        return torch.cat([pos_y, pos_x], dim=-1).flatten(1, 2)


class Attention(nn.Module):
    """Multi-head attention with a key padding mask (`F.scaled_dot_product_attention`)."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None
    ) -> Tensor:
        """(B, Nq, C) attending over (B, Nk, C); `key_padding_mask` (B, Nk) is True on padding."""
        batch, length, dim = query.shape
        # SDPA's boolean mask marks the keys that take part.
        attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            self._heads(self.q(query)),
            self._heads(self.k(key)),
            self._heads(self.v(value)),
            dropout_p=self.dropout if self.training else 0.0,
            attn_mask=attend,
        )
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )


class EncoderLayer(nn.Module):
    """Post-norm self-attention (position added to queries and keys) and FFN."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, padding: Tensor) -> Tensor:
        qk = x + pos
        x = self.norm1(x + self.drop1(self.self_attn(qk, qk, x, padding)))
        return self.norm2(x + self.drop2(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Post-norm query self-attention, cross-attention to the memory, FFN; query positions added
    to queries and keys of both attentions, memory positions to the cross-attention's keys."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout)
        self.cross_attn = Attention(dim, num_heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)
        self.drop3 = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor, padding: Tensor
    ) -> Tensor:
        qk = x + query_pos
        x = self.norm1(x + self.drop1(self.self_attn(qk, qk, x)))
        attended = self.cross_attn(x + query_pos, memory + pos, memory, padding)
        x = self.norm2(x + self.drop2(attended))
        return self.norm3(x + self.drop3(self.ffn(x)))


class Transformer(nn.Module):
    """DETR's encoder-decoder: returns every decoder layer's output, each through the final norm."""

    def __init__(
        self,
        dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            EncoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_encoder_layers)
        )
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(dim)
        for param in self.parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)

    def forward(self, tokens: Tensor, pos: Tensor, padding: Tensor, queries: Tensor) -> Tensor:
        """tokens, pos (B, N, C); padding (B, N), True on padding; queries (Q, C) -> (L, B, Q, C)."""
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos, padding)
        query_pos = queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = torch.zeros_like(query_pos)
        outputs = []
        for layer in self.decoder:
            x = layer(x, query_pos, memory, pos, padding)
            outputs.append(self.decoder_norm(x))
        return torch.stack(outputs)


class MLP(nn.Sequential):
    """Linear layers with ReLU between them (DETR's box head: 3 layers)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class DETR(nn.Module):
    """A pyramid backbone's last map under DETR's transformer, queries, heads and set loss.

    Args:
        backbone: timm `features_only` model (a list of maps, `feature_info`).
        num_classes: object classes K (labels 0..K-1; slot K is "no object").
        in_stage: which backbone map (0-based) feeds the transformer: the last, stride 32.
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout:
            transformer sizes (DETR: 256, 8, 6, 6, 2048, 0.1).
        num_queries: object queries, the most detections per image (100).
        aux_loss: score every decoder layer, not only the last.
        criterion: the set criterion (default: `SetCriterion(num_classes)`, DETR's weights).
        size_divisible: batch padding multiple.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        in_stage: int = 3,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dim: int = 2048,
        dropout: float = 0.1,
        num_queries: int = 100,
        aux_loss: bool = True,
        criterion: SetCriterion | None = None,
        size_divisible: int = 32,
    ) -> None:
        super().__init__()
        channels = backbone.feature_info.channels()
        if not -len(channels) <= in_stage < len(channels):
            raise ValueError(f"in_stage={in_stage} outside the backbone's {len(channels)} maps")
        self.backbone = backbone
        self.in_stage = in_stage
        self.num_classes = num_classes
        self.aux_loss = aux_loss
        self.size_divisible = size_divisible
        self.input_proj = nn.Linear(channels[in_stage], hidden_dim)
        self.position = PositionEmbeddingSine(hidden_dim)
        self.transformer = Transformer(
            hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout
        )
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.criterion = criterion or SetCriterion(num_classes)

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        """Training: weighted losses against `targets` (per image `boxes` (N, 4) xyxy in that
        image's pixels, `labels` (N,) 0-based). Evaluation: detections per image."""
        if self.training and targets is None:
            raise ValueError("DETR in training mode needs targets (boxes, labels) per image")
        batch, padding = pad_images(images, self.size_divisible)
        outputs = self.predict(batch, padding)
        sizes = to_device_without_waiting(  # not waiting for the forward above
            torch.tensor([[im.shape[-1], im.shape[-2]] * 2 for im in images], dtype=torch.float32),
            batch.device,
        )
        if self.training:
            return self.criterion(outputs, normalize_targets(targets, sizes))
        return postprocess(outputs["logits"], outputs["boxes"], sizes)

    def predict(self, batch: Tensor, padding: Tensor) -> dict[str, Tensor]:
        """Raw outputs of a padded batch (B, 3, H, W) with its padding mask (B, H, W):
        `logits` (B, Q, K + 1), `boxes` (B, Q, 4) normalised (cx, cy, w, h) of the last decoder
        layer, and with `aux_loss` `aux_logits` / `aux_boxes` of the earlier layers."""
        feature = self.backbone(batch)[self.in_stage]
        mask = F.interpolate(padding[:, None].float(), size=feature.shape[-2:])[:, 0].bool()
        tokens = self.input_proj(feature.flatten(2).transpose(1, 2))
        hidden = self.transformer(
            tokens, self.position(mask), mask.flatten(1), self.query_embed.weight
        )
        logits = self.class_embed(hidden)
        boxes = self.bbox_embed(hidden).sigmoid()
        outputs = {"logits": logits[-1], "boxes": boxes[-1]}
        if self.aux_loss:
            outputs.update(aux_logits=logits[:-1], aux_boxes=boxes[:-1])
        return outputs


def normalize_targets(
    targets: Sequence[Mapping[str, Tensor]], sizes: Tensor
) -> list[dict[str, Tensor]]:
    """Boxes xyxy in pixels -> (cx, cy, w, h) as fractions of each image's width and height.

    `sizes` (B, 4) holds (w, h, w, h) of each image.
    """
    return [
        {
            "labels": t["labels"],
            "boxes": box_convert(t["boxes"].float(), "xyxy", "cxcywh") / size,
        }
        for t, size in zip(targets, sizes, strict=True)
    ]


@torch.no_grad()
def postprocess(logits: Tensor, boxes: Tensor, sizes: Tensor) -> list[dict[str, Tensor]]:
    """Every query as a detection: best object class, its probability, its box in pixels.

    Args:
        logits: (B, Q, K + 1); boxes: (B, Q, 4) normalised (cx, cy, w, h).
        sizes: (B, 4) (w, h, w, h) of each image.
    """
    scores, labels = logits.softmax(-1)[..., :-1].max(-1)
    pixels = box_convert(boxes, "cxcywh", "xyxy") * sizes[:, None]
    pixels = torch.minimum(pixels.clamp(min=0), sizes[:, None])
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(pixels, scores, labels, strict=True)
    ]


def build_detr(
    backbone: nn.Module | BackboneFactory,
    num_classes: int,
    in_stage: int = 3,
    hidden_dim: int = 256,
    num_heads: int = 8,
    num_encoder_layers: int = 6,
    num_decoder_layers: int = 6,
    ffn_dim: int = 2048,
    dropout: float = 0.1,
    num_queries: int = 100,
    aux_loss: bool = True,
    cost_class: float = 1.0,
    cost_bbox: float = 5.0,
    cost_giou: float = 2.0,
    eos_coef: float = 0.1,
    size_divisible: int = 32,
) -> DETR:
    """DETR with the paper's settings by default; losses weighted as the matching costs.

    Args: as `DETR`, plus the matcher costs (class 1, L1 5, GIoU 2), which are also the loss
    weights, and `eos_coef`, the "no object" class weight (0.1). `backbone` may also be a
    factory of the feature model (`pyramid_backbone`).
    """
    matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou)
    criterion = SetCriterion(num_classes, matcher, cost_class, cost_bbox, cost_giou, eos_coef)
    return DETR(
        pyramid_backbone(backbone),
        num_classes,
        in_stage=in_stage,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        num_encoder_layers=num_encoder_layers,
        num_decoder_layers=num_decoder_layers,
        ffn_dim=ffn_dim,
        dropout=dropout,
        num_queries=num_queries,
        aux_loss=aux_loss,
        criterion=criterion,
        size_divisible=size_divisible,
    )
