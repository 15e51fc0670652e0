"""The PVT release's RetinaNet, Mask R-CNN and Semantic FPN checkpoints load into pvtlab's networks.

The files are built here in the release's key layout with random values: the backbone from the
release's dense PVT (its classification layout without class token, final norm and head), the
rest from the module definitions of mmdetection 2.x (FPN, RetinaHead, RPNHead, Shared2FCBBoxHead,
FCNMaskHead) and mmsegmentation 0.x (FPN, FPNHead) at the release's configs for PVT-Tiny: 80 COCO
classes, 150 ADE20K classes. They are saved as mmcv saves them (``meta`` and ``state_dict``).
The reference functions re-state what the release's heads compute, from their documented
structure, on the file's own tensors; each mapped pvtlab head must compute the same.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from pvtlab import pipeline
from pvtlab.models import CheckpointError, LoadReport, create_backbone, load_checkpoint
from pvtlab.models.heads.mask_rcnn import build_mask_rcnn
from pvtlab.models.heads.retinanet import build_retinanet
from pvtlab.models.heads.semantic_fpn import SemanticFPN
from pvtlab.models.release_checkpoints import (
    convert_release_state_dict,
    load_release_checkpoint,
    release_kind,
)
from tests.models import release_reference
from tests.models.release_reference import DEPTHS, EMBED_DIMS, release_layout

Layout = list[tuple[str, tuple[int, ...]]]
KINDS = ("retinanet", "mask_rcnn", "semantic_fpn")
COCO_CLASSES, ADE_CLASSES = 80, 150
FPN = 256  # the necks' width
FC = 1024  # Shared2FCBBoxHead's fully connected width
SEG = 128  # FPNHead's channels
RETINA_ANCHORS = 9  # octave_base_scale 4, scales_per_octave 3, ratios 0.5 / 1 / 2
RPN_ANCHORS = 3  # scales [8], ratios 0.5 / 1 / 2
STRIDES = (4, 8, 16, 32)

# ----------------------------------------------------------------------------------------------
# The release's key layout


def _conv(name: str, c_in: int, c_out: int, k: int) -> Layout:
    return [(f"{name}.weight", (c_out, c_in, k, k)), (f"{name}.bias", (c_out,))]


def _conv_module(name: str, c_in: int, c_out: int, k: int) -> Layout:
    """mmcv's ConvModule without norm: a biased convolution named `conv` (then ReLU or nothing)."""
    return _conv(f"{name}.conv", c_in, c_out, k)


def _linear(name: str, c_in: int, c_out: int) -> Layout:
    return [(f"{name}.weight", (c_out, c_in)), (f"{name}.bias", (c_out,))]


def backbone_layout() -> Layout:
    dropped = {"cls_token", "norm.weight", "norm.bias", "head.weight", "head.bias"}
    return [(f"backbone.{k}", s) for k, s in release_layout(DEPTHS["pvt_tiny"]) if k not in dropped]


def neck_layout(in_channels: tuple[int, ...], extra_convs: int = 0) -> Layout:
    """FPN: a 1x1 lateral and a 3x3 output ConvModule per input map, then `extra_convs` stride-2
    3x3 ConvModules ("on_input": the first reads the last input map)."""
    layout: Layout = []
    for i, c in enumerate(in_channels):
        layout += _conv_module(f"neck.lateral_convs.{i}", c, FPN, 1)
    for i in range(len(in_channels)):
        layout += _conv_module(f"neck.fpn_convs.{i}", FPN, FPN, 3)
    for j in range(extra_convs):
        c_in = in_channels[-1] if j == 0 else FPN
        layout += _conv_module(f"neck.fpn_convs.{len(in_channels) + j}", c_in, FPN, 3)
    return layout


def retinanet_layout() -> Layout:
    """retinanet_pvt_t_fpn_1x_coco: neck on stages 2-4 with two extra convs, RetinaHead."""
    layout = backbone_layout() + neck_layout(EMBED_DIMS[1:], extra_convs=2)
    for branch in ("cls", "reg"):
        for i in range(4):  # stacked_convs
            layout += _conv_module(f"bbox_head.{branch}_convs.{i}", FPN, FPN, 3)
    layout += _conv("bbox_head.retina_cls", FPN, RETINA_ANCHORS * COCO_CLASSES, 3)
    layout += _conv("bbox_head.retina_reg", FPN, RETINA_ANCHORS * 4, 3)
    return layout


def mask_rcnn_layout() -> Layout:
    """mask_rcnn_pvt_t_fpn_1x_coco: RPNHead, Shared2FCBBoxHead, FCNMaskHead."""
    layout = backbone_layout() + neck_layout(EMBED_DIMS)
    layout += _conv("rpn_head.rpn_conv", FPN, FPN, 3)
    layout += _conv("rpn_head.rpn_cls", FPN, RPN_ANCHORS, 1)  # sigmoid: one score per anchor
    layout += _conv("rpn_head.rpn_reg", FPN, RPN_ANCHORS * 4, 1)
    box = "roi_head.bbox_head"
    layout += _linear(f"{box}.shared_fcs.0", FPN * 7 * 7, FC)
    layout += _linear(f"{box}.shared_fcs.1", FC, FC)
    layout += _linear(f"{box}.fc_cls", FC, COCO_CLASSES + 1)  # background last
    layout += _linear(f"{box}.fc_reg", FC, COCO_CLASSES * 4)  # reg_class_agnostic=False
    for i in range(4):
        layout += _conv_module(f"roi_head.mask_head.convs.{i}", FPN, FPN, 3)
    # deconv upsampling: ConvTranspose2d's weight is (in, out, k, k)
    layout += [("roi_head.mask_head.upsample.weight", (FPN, FPN, 2, 2))]
    layout += [("roi_head.mask_head.upsample.bias", (FPN,))]
    layout += _conv("roi_head.mask_head.conv_logits", FPN, COCO_CLASSES, 1)
    return layout


def semantic_fpn_layout() -> Layout:
    """fpn_pvt_t_ade20k_40k: FPN on the four stages, FPNHead with SyncBN ConvModules."""
    layout = backbone_layout() + neck_layout(EMBED_DIMS)
    for i, stride in enumerate(STRIDES):
        steps = max(1, int(math.log2(stride) - math.log2(STRIDES[0])))
        for k in range(steps):
            j = 2 * k if stride != STRIDES[0] else k  # an Upsample follows each conv off stride 4
            name = f"decode_head.scale_heads.{i}.{j}"
            layout += [(f"{name}.conv.weight", (SEG, FPN if k == 0 else SEG, 3, 3))]
            layout += [(f"{name}.bn.{p}", (SEG,)) for p in ("weight", "bias")]
            layout += [(f"{name}.bn.{p}", (SEG,)) for p in ("running_mean", "running_var")]
            layout += [(f"{name}.bn.num_batches_tracked", ())]
    layout += _conv("decode_head.conv_seg", SEG, ADE_CLASSES, 1)
    return layout


LAYOUTS: dict[str, Callable[[], Layout]] = {
    "retinanet": retinanet_layout,
    "mask_rcnn": mask_rcnn_layout,
    "semantic_fpn": semantic_fpn_layout,
}


def random_release_state_dict(layout: Layout, seed: int = 0) -> OrderedDict[str, Tensor]:
    """Values of a realistic scale: the backbone's as release_reference draws them, convolutions
    and linear layers ~ 1/sqrt(fan-in), BatchNorm statistics of a trained network."""
    backbone = [(k.removeprefix("backbone."), s) for k, s in layout if k.startswith("backbone.")]
    values = {
        f"backbone.{k}": v for k, v in release_reference.random_state_dict(backbone, seed).items()
    }
    g = torch.Generator().manual_seed(seed + 1)
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, shape in layout:
        if key in values:
            out[key] = values[key]
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(40000)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.weight"):
            out[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif key.endswith((".bias", "running_mean")):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        else:
            out[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
    return out


def save_like_mmcv(path: Path, state_dict: OrderedDict[str, Tensor], kind: str) -> Path:
    """mmcv's `save_checkpoint` as the release's training wrote it: plain `meta`, the weights, the
    optimizer's state and (the release's detection runner) apex's loss-scaler state."""
    if kind == "semantic_fpn":
        meta = {
            "mmseg_version": "0.13.0",
            "CLASSES": tuple(f"class_{i}" for i in range(ADE_CLASSES)),
            "PALETTE": [[i, 2 * i % 256, 3 * i % 256] for i in range(ADE_CLASSES)],
            "iter": 40000,
        }
    else:
        meta = {
            "mmdet_version": "2.13.0",
            "CLASSES": tuple(f"class_{i}" for i in range(COCO_CLASSES)),
            "epoch": 12,
            "iter": 87960,
        }
    meta |= {"mmcv_version": "1.3.8", "config": f"model = dict(type='{kind}')", "seed": 0}
    optimizer = {
        "state": {0: {"step": 3, "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}},
        "param_groups": [
            {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-4, "params": [0]}
        ],
    }
    amp = {"loss_scaler0": {"loss_scale": 512.0, "unskipped": 7}}
    torch.save({"meta": meta, "state_dict": state_dict, "optimizer": optimizer, "amp": amp}, path)
    return path


def build_network(kind: str) -> nn.Module:
    backbone = partial(create_backbone, "pvt_tiny")
    if kind == "retinanet":
        return build_retinanet(backbone, COCO_CLASSES)
    if kind == "mask_rcnn":
        return build_mask_rcnn(backbone, COCO_CLASSES)
    return SemanticFPN(backbone, ADE_CLASSES)


@pytest.fixture(scope="module")
def release_state_dicts() -> dict[str, OrderedDict[str, Tensor]]:
    return {kind: random_release_state_dict(LAYOUTS[kind]()) for kind in KINDS}


@pytest.fixture(scope="module")
def release_files(
    tmp_path_factory: pytest.TempPathFactory, release_state_dicts: dict
) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("release")
    return {
        kind: save_like_mmcv(folder / f"{kind}_pvt_t.pth", release_state_dicts[kind], kind)
        for kind in KINDS
    }


@pytest.fixture(scope="module")
def loads(release_files: dict[str, Path]) -> dict[str, tuple[nn.Module, LoadReport]]:
    """Each network freshly built, its release file loaded (evaluation mode), and the report."""
    out = {}
    for kind in KINDS:
        network = build_network(kind)
        report = load_release_checkpoint(network, release_files[kind])
        out[kind] = (network.eval(), report)
    return out


@pytest.fixture(scope="module")
def loaded(loads: dict[str, tuple[nn.Module, LoadReport]]) -> dict[str, nn.Module]:
    return {kind: network for kind, (network, _) in loads.items()}


# ----------------------------------------------------------------------------------------------
# Reference re-statements of the release's modules (mmdetection 2.x / mmsegmentation 0.x)


def conv(x: Tensor, sd: dict, name: str, **kwargs: int) -> Tensor:
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kwargs)


def linear(x: Tensor, sd: dict, name: str) -> Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def fpn_neck(
    sd: dict, inputs: list[Tensor], extra_convs: int = 0, max_pool: bool = False
) -> list[Tensor]:
    """FPN.forward: laterals, top-down sums of nearest-upsampled coarser laterals, 3x3 outputs;
    then extra stride-2 convs, the first on the last input, none preceded by a ReLU
    (`relu_before_extra_convs=False`), or one max-pooled level (kernel 1, stride 2)."""
    laterals = [conv(x, sd, f"neck.lateral_convs.{i}.conv") for i, x in enumerate(inputs)]
    for i in range(len(laterals) - 1, 0, -1):
        size = laterals[i - 1].shape[-2:]
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=size, mode="nearest")
    outs = [conv(x, sd, f"neck.fpn_convs.{i}.conv", padding=1) for i, x in enumerate(laterals)]
    source = inputs[-1]
    for j in range(extra_convs):
        outs.append(conv(source, sd, f"neck.fpn_convs.{len(inputs) + j}.conv", stride=2, padding=1))
        source = outs[-1]
    if max_pool:
        outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    return outs


def retina_head(sd: dict, feature: Tensor) -> tuple[Tensor, Tensor]:
    """RetinaHead.forward_single: four ReLU 3x3 ConvModules per branch, then 3x3 predictors."""
    cls_feat = reg_feat = feature
    for i in range(4):
        cls_feat = F.relu(conv(cls_feat, sd, f"bbox_head.cls_convs.{i}.conv", padding=1))
        reg_feat = F.relu(conv(reg_feat, sd, f"bbox_head.reg_convs.{i}.conv", padding=1))
    return (
        conv(cls_feat, sd, "bbox_head.retina_cls", padding=1),
        conv(reg_feat, sd, "bbox_head.retina_reg", padding=1),
    )


def per_anchor(output: Tensor, width: int) -> Tensor:
    """mmdetection's flattening of a level's (N, A * width, H, W) output: location-major, then
    anchor, then `width` values (permute(0, 2, 3, 1).reshape)."""
    return output.permute(0, 2, 3, 1).reshape(output.shape[0], -1, width)


def mmdet_anchors(stride: int, scales: list[float], height: int, width: int) -> Tensor:
    """AnchorGenerator (scale_major=True, center_offset=0): base anchors over ratios (outer) and
    scales (inner) around the origin, shifted to every location, x fastest."""
    ratios = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    h_ratios = ratios.sqrt()
    w_ratios = 1 / h_ratios
    scales_t = torch.tensor(scales, dtype=torch.float64)
    ws = (stride * w_ratios[:, None] * scales_t[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    base = torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)
    xs = torch.arange(width, dtype=torch.float64) * stride
    ys = torch.arange(height, dtype=torch.float64) * stride
    shifts = torch.stack([xs.repeat(height), ys.repeat_interleave(width)] * 2, dim=-1)
    return (shifts[:, None, :] + base[None]).reshape(-1, 4)


def delta2bbox(rois: Tensor, deltas: Tensor, stds: tuple[float, ...]) -> Tensor:
    """DeltaXYWHBBoxCoder.decode (means 0, no clipping to the image): deltas (N, 4 * C)."""
    d = deltas.reshape(deltas.shape[0], -1, 4) * torch.tensor(stds)
    max_ratio = abs(math.log(16 / 1000))
    dw, dh = d[..., 2].clamp(-max_ratio, max_ratio), d[..., 3].clamp(-max_ratio, max_ratio)
    px = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None]
    py = ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    pw = (rois[:, 2] - rois[:, 0])[:, None]
    ph = (rois[:, 3] - rois[:, 1])[:, None]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * d[..., 0], py + ph * d[..., 1]
    return torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)


def shared2fc_bbox_head(sd: dict, rois: Tensor) -> tuple[Tensor, Tensor]:
    """Shared2FCBBoxHead.forward: flatten, two ReLU fully connected layers, fc_cls and fc_reg."""
    x = rois.flatten(1)
    for i in range(2):
        x = F.relu(linear(x, sd, f"roi_head.bbox_head.shared_fcs.{i}"))
    return linear(x, sd, "roi_head.bbox_head.fc_cls"), linear(x, sd, "roi_head.bbox_head.fc_reg")


def fcn_mask_head(sd: dict, rois: Tensor) -> Tensor:
    """FCNMaskHead.forward: four ReLU 3x3 ConvModules, ReLU(2x deconvolution), 1x1 logits."""
    x = rois
    for i in range(4):
        x = F.relu(conv(x, sd, f"roi_head.mask_head.convs.{i}.conv", padding=1))
    up = "roi_head.mask_head.upsample"
    x = F.relu(F.conv_transpose2d(x, sd[f"{up}.weight"], sd[f"{up}.bias"], stride=2))
    return conv(x, sd, "roi_head.mask_head.conv_logits")


def rpn_head(sd: dict, feature: Tensor) -> tuple[Tensor, Tensor]:
    """RPNHead.forward_single: ReLU(3x3 conv), then 1x1 objectness and deltas."""
    x = F.relu(conv(feature, sd, "rpn_head.rpn_conv", padding=1))
    return conv(x, sd, "rpn_head.rpn_cls"), conv(x, sd, "rpn_head.rpn_reg")


def fpn_head(sd: dict, inputs: list[Tensor]) -> Tensor:
    """FPNHead.forward at test: per level, [3x3 conv - BN (running statistics) - ReLU (- 2x
    bilinear, align_corners=False)] steps; levels summed after a bilinear resize to the first's
    size; conv_seg (dropout is off at test)."""

    def scale_head(i: int, x: Tensor) -> Tensor:
        j = 0
        while f"decode_head.scale_heads.{i}.{j}.conv.weight" in sd:
            name = f"decode_head.scale_heads.{i}.{j}"
            x = F.conv2d(x, sd[f"{name}.conv.weight"], padding=1)
            x = F.batch_norm(
                x,
                sd[f"{name}.bn.running_mean"],
                sd[f"{name}.bn.running_var"],
                sd[f"{name}.bn.weight"],
                sd[f"{name}.bn.bias"],
                training=False,
                eps=1e-5,
            )
            x = F.relu(x)
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
                j += 2
            else:
                j += 1
        return x

    out = scale_head(0, inputs[0])
    for i in range(1, len(inputs)):
        level = scale_head(i, inputs[i])
        out = out + F.interpolate(level, size=out.shape[-2:], mode="bilinear", align_corners=False)
    return conv(out, sd, "decode_head.conv_seg")


def backbone_weights(sd: dict) -> dict[str, Tensor]:
    return {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}


def close(actual: Tensor, expected: Tensor, tol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * float(scale))


# ----------------------------------------------------------------------------------------------
# Loading: every tensor, strictly


@pytest.mark.parametrize("kind", KINDS)
def test_release_file_fills_every_tensor_and_uses_every_key(
    kind: str, loads: dict[str, tuple[nn.Module, LoadReport]], release_state_dicts: dict
) -> None:
    network, report = loads[kind]
    own = network.state_dict()
    assert report.loaded == sorted(own)
    by_shape: dict[tuple[int, ...], list[Tensor]] = {}
    for tensor in own.values():
        by_shape.setdefault(tuple(tensor.shape), []).append(tensor)
    reordered = ("fc_cls", "fc_reg", "conv_logits")  # their layout is checked by the head tests
    for key, value in release_state_dicts[kind].items():
        if key.rsplit(".", 2)[-2] in reordered:
            continue
        candidates = by_shape.get(tuple(value.shape), [])
        assert any(torch.equal(value, c) for c in candidates), f"{key} is nowhere in the network"


def test_release_files_are_told_apart_from_other_state_dicts(
    release_state_dicts: dict, loaded: dict[str, nn.Module]
) -> None:
    assert {release_kind(release_state_dicts[k]) for k in KINDS} == set(KINDS)
    own = loaded["retinanet"].state_dict()
    assert release_kind(own) is None
    assert release_kind({f"model.{k}": v for k, v in own.items()}) is None
    assert release_kind(dict(release_layout(DEPTHS["pvt_tiny"]))) is None


def test_every_misfit_is_listed_in_one_error(
    release_state_dicts: dict, loaded: dict[str, nn.Module]
) -> None:
    state_dict = dict(release_state_dicts["retinanet"])
    state_dict["neck.fpn_convs.5.conv.weight"] = torch.zeros(FPN, FPN, 3, 3)
    state_dict["bbox_head.retina_iou.weight"] = torch.zeros(9, FPN, 3, 3)
    del state_dict["bbox_head.reg_convs.2.conv.bias"]
    state_dict["neck.lateral_convs.0.conv.weight"] = torch.zeros(FPN, 64, 1, 1)
    with pytest.raises(CheckpointError) as error:
        convert_release_state_dict(loaded["retinanet"], state_dict, source="x.pth")
    message = str(error.value)
    assert "cannot load x.pth (the release's retinanet)" in message
    assert "neck.fpn_convs.5.conv.weight (256, 256, 3, 3)" in message
    assert "bbox_head.retina_iou.weight (9, 256, 3, 3)" in message
    assert "missing from the file (1):\n    head.regression_head.conv.2.0.bias (256,)" in message
    assert (
        "neck.lateral_convs.0.conv.weight (256, 64, 1, 1) -> backbone.fpn.inner_blocks.0.0.weight:"
        " the network's is (256, 128, 1, 1)"
    ) in message


def test_another_number_of_classes_is_named(
    release_state_dicts: dict, loaded: dict[str, nn.Module]
) -> None:
    state_dict = dict(release_state_dicts["semantic_fpn"])
    state_dict["decode_head.conv_seg.weight"] = torch.zeros(19, SEG, 1, 1)
    state_dict["decode_head.conv_seg.bias"] = torch.zeros(19)
    with pytest.raises(
        CheckpointError, match=r"predict 19 classes, the network 150 \(data.num_classes=19\)"
    ):
        convert_release_state_dict(loaded["semantic_fpn"], state_dict)


def test_another_pvt_size_is_named(release_state_dicts: dict, loaded: dict[str, nn.Module]) -> None:
    state_dict = dict(release_state_dicts["semantic_fpn"])
    extra = {k: v for k, v in state_dict.items() if k.startswith("backbone.block3.1.")}
    state_dict |= {k.replace("block3.1.", "block3.2."): v for k, v in extra.items()}
    with pytest.raises(CheckpointError) as error:
        convert_release_state_dict(loaded["semantic_fpn"], state_dict)
    message = str(error.value)
    assert "the file's PVT has depths (2, 2, 3, 2), the network's backbone (2, 2, 2, 2)" in message
    assert "backbone.block3.2.mlp.fc2.bias (320,)" in message


def test_another_head_is_named(release_state_dicts: dict, loaded: dict[str, nn.Module]) -> None:
    with pytest.raises(
        CheckpointError, match=r"release's mask_rcnn checkpoint.*choose head=mask_rcnn"
    ):
        convert_release_state_dict(loaded["retinanet"], release_state_dicts["mask_rcnn"])


def test_box_coder_of_other_weights_is_refused(
    release_state_dicts: dict, loaded: dict[str, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    network = loaded["mask_rcnn"]
    monkeypatch.setattr(network.roi_heads.box_coder, "weights", (1.0, 1.0, 1.0, 1.0))
    with pytest.raises(
        CheckpointError, match=r"RoI head's box coder has weights \(1.0, 1.0, 1.0, 1.0\)"
    ):
        convert_release_state_dict(network, release_state_dicts["mask_rcnn"])


def test_backbone_pretrained_refuses_a_whole_model_file(
    release_files: dict[str, Path], loaded: dict[str, nn.Module]
) -> None:
    """`backbone.pretrained=` loads through `load_checkpoint`, which must point elsewhere."""
    backbone = loaded["semantic_fpn"].backbone.body
    with pytest.raises(CheckpointError, match=r"whole semantic_fpn checkpoint.*load_from="):
        load_checkpoint(backbone, release_files["semantic_fpn"])


# ----------------------------------------------------------------------------------------------
# Each mapped part computes what the release's computes


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_backbone_is_the_release_backbone(
    kind: str, loaded: dict[str, nn.Module], release_state_dicts: dict
) -> None:
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    expected = release_reference.features(backbone_weights(release_state_dicts[kind]), images)
    actual = loaded[kind].backbone.body(images)
    for a, e in zip(actual, expected, strict=True):
        close(a, e, 1e-4)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_neck_is_the_release_fpn(
    kind: str, loaded: dict[str, nn.Module], release_state_dicts: dict
) -> None:
    g = torch.Generator().manual_seed(2)
    stages = (1, 2, 3) if kind == "retinanet" else (0, 1, 2, 3)
    inputs = [
        torch.randn(1, EMBED_DIMS[s], 64 // STRIDES[s], 96 // STRIDES[s], generator=g)
        for s in stages
    ]
    expected = fpn_neck(
        release_state_dicts[kind],
        inputs,
        extra_convs=2 if kind == "retinanet" else 0,
        max_pool=kind == "mask_rcnn",
    )
    actual = loaded[kind].backbone.fpn(OrderedDict((str(i), x) for i, x in enumerate(inputs)))
    assert len(actual) == len(expected)
    for a, e in zip(actual.values(), expected, strict=True):
        close(a, e)


@torch.no_grad()
def test_retinanet_head_is_the_release_retina_head(
    loaded: dict[str, nn.Module], release_state_dicts: dict
) -> None:
    g = torch.Generator().manual_seed(3)
    features = [torch.randn(2, FPN, s, s + 1, generator=g) for s in (8, 4, 2, 1, 1)]
    outputs = loaded["retinanet"].head(features)
    reference = [retina_head(release_state_dicts["retinanet"], f) for f in features]
    close(outputs["cls_logits"], torch.cat([per_anchor(c, COCO_CLASSES) for c, _ in reference], 1))
    close(outputs["bbox_regression"], torch.cat([per_anchor(r, 4) for _, r in reference], 1))


@pytest.mark.parametrize("kind", ["retinanet", "mask_rcnn"])
def test_anchors_are_numbered_as_the_release_numbers_them(
    kind: str, loaded: dict[str, nn.Module]
) -> None:
    """Output channel a * width + c belongs to anchor a of a location in both libraries, so the
    anchors' order must agree for the predictors' channels to carry over unpermuted."""
    network = loaded[kind]
    generator = network.anchor_generator if kind == "retinanet" else network.rpn.anchor_generator
    if kind == "retinanet":
        strides, scales = (8, 16, 32, 64, 128), [4 * 2 ** (i / 3) for i in range(3)]
    else:
        strides, scales = (4, 8, 16, 32, 64), [8.0]
    sizes = [(max(1, 128 // s), max(1, 256 // s)) for s in strides]
    features = [torch.zeros(1, 1, h, w) for h, w in sizes]
    anchors = generator(ImageList(torch.zeros(1, 3, 128, 256), [(128, 256)]), features)[0]
    expected = torch.cat(
        [mmdet_anchors(s, scales, h, w) for s, (h, w) in zip(strides, sizes, strict=True)]
    )
    # torchvision may round corners to whole pixels; any other order is tens of pixels off
    torch.testing.assert_close(anchors.double(), expected, rtol=0, atol=0.5)


@torch.no_grad()
def test_rpn_head_is_the_release_rpn_head(
    loaded: dict[str, nn.Module], release_state_dicts: dict
) -> None:
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(2, FPN, s, s, generator=g) for s in (16, 8, 4, 2, 1)]
    objectness, deltas = loaded["mask_rcnn"].rpn.head(features)
    for feature, o, d in zip(features, objectness, deltas, strict=True):
        expected_o, expected_d = rpn_head(release_state_dicts["mask_rcnn"], feature)
        close(o, expected_o)
        close(d, expected_d)


@torch.no_grad()
def test_box_head_is_the_release_bbox_head_with_background_first(
    loaded: dict[str, nn.Module], release_state_dicts: dict
) -> None:
    heads = loaded["mask_rcnn"].roi_heads
    sd = release_state_dicts["mask_rcnn"]
    g = torch.Generator().manual_seed(5)
    rois = torch.randn(6, FPN, 7, 7, generator=g)
    scores, deltas = heads.box_predictor(heads.box_head(rois))
    cls_score, bbox_pred = shared2fc_bbox_head(sd, rois)
    # class k of the release (0-based, background = K) is torchvision's k + 1, background 0
    close(scores[:, 1:], cls_score[:, :COCO_CLASSES])
    close(scores[:, 0], cls_score[:, COCO_CLASSES])
    close(scores.softmax(-1)[:, 1:], cls_score.softmax(-1)[:, :COCO_CLASSES])
    close(deltas.reshape(6, -1, 4)[:, 1:], bbox_pred.reshape(6, -1, 4))
    # the same boxes: torchvision's weights (10, 10, 5, 5) against the release's stds
    xy = torch.rand(6, 2, generator=g) * 200
    proposals = torch.cat([xy, xy + 20 + torch.rand(6, 2, generator=g) * 100], dim=1)
    boxes = heads.box_coder.decode(deltas, [proposals])
    close(boxes[:, 1:], delta2bbox(proposals, bbox_pred, (0.1, 0.1, 0.2, 0.2)), 1e-5)


@torch.no_grad()
def test_mask_head_is_the_release_fcn_mask_head_with_background_first(
    loaded: dict[str, nn.Module], release_state_dicts: dict
) -> None:
    heads = loaded["mask_rcnn"].roi_heads
    rois = torch.randn(3, FPN, 14, 14, generator=torch.Generator().manual_seed(6))
    logits = heads.mask_predictor(heads.mask_head(rois))
    assert logits.shape == (3, COCO_CLASSES + 1, 28, 28)
    close(logits[:, 1:], fcn_mask_head(release_state_dicts["mask_rcnn"], rois))


@torch.no_grad()
def test_semantic_fpn_logits_are_the_release_logits(
    loaded: dict[str, nn.Module], release_state_dicts: dict
) -> None:
    """The whole network: release backbone, FPN, FPNHead, logits resized to the input
    (EncoderDecoder.encode_decode, align_corners=False)."""
    sd = release_state_dicts["semantic_fpn"]
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    features = release_reference.features(backbone_weights(sd), images)
    logits = fpn_head(sd, fpn_neck(sd, features))
    expected = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
    close(loaded["semantic_fpn"](images), expected, 1e-4)


# ----------------------------------------------------------------------------------------------
# Through the pipeline: load_from= (training) and ckpt_path= (src/eval.py)


def _segmentation_config(make_config: Callable[..., DictConfig], config_name: str) -> DictConfig:
    return make_config(
        ["task=segmentation", "backbone=pvt_tiny", f"data.num_classes={ADE_CLASSES}"], config_name
    )


def test_load_from_accepts_a_release_file_of_its_head(
    make_config: Callable[..., DictConfig], release_files: dict[str, Path], loaded: dict
) -> None:
    task = pipeline.build_task(_segmentation_config(make_config, "train"))
    with pytest.raises(CheckpointError, match="choose head=retinanet"):
        pipeline.initialise_from(task, release_files["retinanet"])
    assert pipeline.initialise_from(task, release_files["semantic_fpn"]) == []
    expected = loaded["semantic_fpn"].state_dict()
    for key, value in task.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_eval_ckpt_path_accepts_a_release_file(
    make_config: Callable[..., DictConfig], release_files: dict[str, Path], loaded: dict
) -> None:
    cfg = _segmentation_config(make_config, "eval")
    path = pipeline.resolve_ckpt_path(str(release_files["semantic_fpn"]), cfg)
    task = pipeline.load_task(cfg, path)
    expected = loaded["semantic_fpn"].state_dict()
    for key, value in task.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
