"""Every backbone config gives the same pyramid contract through `create_backbone`."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from omegaconf import OmegaConf

import pvtlab  # noqa: F401
from pvtlab.models import BACKBONES, CheckpointError, backbone_family, create_backbone
from pvtlab.models.baselines import EvalModeBatchNorm2d, FixedBatchNorm2d

CONF = Path(__file__).resolve().parents[2] / "conf" / "backbone"
CONFIGS = sorted(p.stem for p in CONF.glob("*.yaml"))
CHANNELS = {
    "pvt": [64, 128, 320, 512],
    "resnet18": [64, 128, 256, 512],
    "cnn": [256, 512, 1024, 2048],
    "vit": [384, 384, 384, 384],
}
SIZE = (67, 99)  # odd, not a multiple of 32


def _config(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"), resolve=True)


def _arguments(cfg: dict) -> dict:
    """The backbone file's create_backbone arguments."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def test_every_backbone_has_a_config() -> None:
    expected = {
        "pvt_tiny", "pvt_small", "pvt_medium", "pvt_large", "pvt_small_wide",
        "resnet18", "resnet50", "resnet101", "resnext101_32x4d", "resnext101_64x4d",
        "vit_small_32", "gcresnet50t",
    }  # fmt: skip
    assert set(CONFIGS) == expected
    assert expected <= set(BACKBONES)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_schema(name: str) -> None:
    cfg = _config(name)
    family = backbone_family(name)
    pvt = {"img_size"} if family == "pvt" else set()  # where position embeddings are stored
    assert set(cfg) == {
        "_target_", "_partial_", "name", "pretrained", "drop_path_rate", "channels_last", *pvt
    }  # fmt: skip
    assert cfg["_target_"] == "pvtlab.models.create_backbone" and cfg["_partial_"] is True
    assert cfg["name"] == name
    # NHWC for the convolutional baselines only (what it speeds up)
    assert cfg["channels_last"] is (family == "cnn")
    # PVT-M/L's per-task values: recipe/backbone_task/ (tests/config/test_configs.py)
    assert cfg["drop_path_rate"] == (0.0 if family == "cnn" else 0.1)


@pytest.mark.parametrize("name", CONFIGS)
def test_pyramid_contract(name: str) -> None:
    cfg = _config(name)
    with torch.device("meta"):  # shapes only, without the arithmetic
        model = create_backbone(features_only=True, **_arguments(cfg)).eval()
        maps = model(torch.randn(1, 3, *SIZE))
    channels = CHANNELS.get(name, CHANNELS[backbone_family(name)])
    if name == "pvt_small_wide":
        channels = [88, 176, 440, 688]
    assert model.feature_info.channels() == channels
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    H, W = SIZE
    assert [tuple(m.shape) for m in maps] == [
        (1, c, -(-H // s), -(-W // s)) for c, s in zip(channels, [4, 8, 16, 32], strict=True)
    ]


@pytest.mark.parametrize("name", ["resnet18", "vit_small_32"])
def test_baseline_features_run(name: str) -> None:
    model = create_backbone(name, features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(2, 3, *SIZE))
    assert [m.shape[-1] for m in maps] == [25, 13, 7, 4]
    assert all(torch.isfinite(m).all() for m in maps)


def test_channels_last_backbone_keeps_its_outputs() -> None:
    from pvtlab.pipeline import build_model

    head = {"_target_": "pvtlab.models.heads.retinanet.build_retinanet"}
    torch.manual_seed(0)
    nchw = create_backbone("resnet18", features_only=True).eval()
    nhwc = create_backbone("resnet18", features_only=True, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    conv = nhwc.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        for a, b in zip(nchw(x), nhwc(x), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The backbone file's flag reaches the network the pipeline builds.
    backbone = {**_config("resnet18"), "pretrained": None}
    built = build_model(backbone, head, num_classes=3).backbone.body.conv1.weight
    assert built.is_contiguous(memory_format=torch.channels_last)


def test_out_indices_select_pyramid_levels() -> None:
    for name in ("resnet18", "vit_small_32", "pvt_tiny"):
        model = create_backbone(name, features_only=True, out_indices=(1, 3))
        assert model.feature_info.reduction() == [8, 32]


@pytest.mark.parametrize("name", ["resnet18", "vit_small_32"])
def test_baseline_checkpoints_load_strictly(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    full = timm.create_model(name)
    path = tmp_path / f"{name}.pth"
    torch.save(full.state_dict(), path)
    features = create_backbone(name, features_only=True, pretrained=path)
    inner = features.model if hasattr(features, "model") else features
    first = next(iter(inner.state_dict()))
    assert torch.equal(inner.state_dict()[first], full.state_dict()[first])
    classifier = create_backbone(name, features_only=False, num_classes=5, pretrained=path)
    assert classifier.get_classifier().out_features == 5
    bad = {k: v for k, v in full.state_dict().items() if "layer1" not in k and "blocks.0." not in k}
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="missing from the file"):
        create_backbone(name, features_only=True, pretrained=path)


def test_columnar_vit_levels_come_from_blocks_2_4_6_8() -> None:
    torch.manual_seed(0)
    features = create_backbone("vit_small_32", features_only=True).eval()
    vit = features.model
    assert len(vit.blocks) == 8  # blocks 9-12, final norm and head pruned
    x = torch.randn(1, 3, 96, 160)
    with torch.no_grad():
        maps = features(x)
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        after = []
        for blk in vit.blocks:
            tokens = blk(tokens)
            after.append(
                tokens[:, vit.num_prefix_tokens :].reshape(1, 3, 5, -1).permute(0, 3, 1, 2)
            )
    for level, (block, size) in enumerate(
        zip([1, 3, 5, 7], [(24, 40), (12, 20), (6, 10), (3, 5)], strict=True)
    ):
        expected = torch.nn.functional.interpolate(after[block], size=size, mode="bilinear")
        torch.testing.assert_close(maps[level], expected)


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="pvt_small, pvt_medium"):
        create_backbone("pvt_huge", features_only=True)


# ---------------------------------------- mmdetection's baseline ResNets (docs/fidelity.md)


def test_detection_baseline_freezes_the_stem_and_first_stage() -> None:
    model = create_backbone("resnet18", features_only=True, batch_norm="eval", frozen_stages=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("conv1.", "bn1.", "layer1.")) for n in frozen)
    assert {n for n, _ in model.named_parameters() if n.startswith(("conv1.", "layer1."))} <= frozen
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("layer2."))
    whole = create_backbone("resnet18", features_only=True)
    assert all(p.requires_grad for p in whole.parameters())


def test_norm_eval_keeps_the_running_statistics_and_learns_the_affine() -> None:
    torch.manual_seed(0)
    model = create_backbone("resnet18", features_only=True, batch_norm="eval").train()
    norm = model.layer2[0].bn1
    assert isinstance(norm, EvalModeBatchNorm2d)
    before = norm.running_mean.clone()
    maps = model(torch.randn(2, 3, 64, 64))
    assert torch.equal(norm.running_mean, before)
    sum(m.sum() for m in maps).backward()
    assert norm.weight.grad is not None
    trained = create_backbone("resnet18", features_only=True).train()
    trained(torch.randn(2, 3, 64, 64))
    assert not torch.equal(trained.layer2[0].bn1.running_mean, before)


def test_detr_baseline_freezes_batch_norm() -> None:
    model = create_backbone("resnet50", features_only=True, batch_norm="frozen", frozen_stages=1)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(isinstance(m, FixedBatchNorm2d) for m in norms)
    assert not any(p.requires_grad for m in norms for p in m.parameters())
    assert set(model.state_dict()) == set(
        create_backbone("resnet50", features_only=True).state_dict()
    )


def test_cnn_options_refuse_other_backbones() -> None:
    with pytest.raises(ValueError, match="CNN baselines"):
        create_backbone("pvt_tiny", features_only=True, frozen_stages=1)
    with pytest.raises(ValueError, match="choose one of"):
        create_backbone("resnet18", features_only=True, batch_norm="sync")
