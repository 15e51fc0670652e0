"""PVT v1: parity with the release's figures, any input size, the timm model interface."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import pvtlab  # noqa: F401  (registers the models)
from pvtlab.models import PyramidVisionTransformer, count_gmacs, count_macs
from tests.models import release_reference as rr

PVT = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large")
# docs/paper.md section 1: with 1000-class head / without cls token, final norm, head / GMACs
PARAMS = {
    "pvt_tiny": (13_229_288, 12_714_752, 1.93),
    "pvt_small": (24_485_864, 23_971_328, 3.82),
    "pvt_medium": (44_208_104, 43_693_568, 6.66),
    "pvt_large": (61_369_320, 60_854_784, 9.81),
}
# the released pvt_tiny.pth: key, shape, numel (listed from the file)
TINY_KEYS = Path(__file__).with_name("pvt_tiny_state_dict_keys.tsv")


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _explicit_twin(model: PyramidVisionTransformer) -> PyramidVisionTransformer:
    """PVT-Tiny built with `fused_attn=False`, holding `model`'s weights."""
    twin = timm.create_model("pvt_tiny", fused_attn=False)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.fixture(scope="module")
def tiny() -> PyramidVisionTransformer:
    torch.manual_seed(0)
    return timm.create_model("pvt_tiny").eval()


@pytest.mark.parametrize("name", PVT)
def test_parameter_counts_match_the_release(name: str) -> None:
    with_head, without, _ = PARAMS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        features = timm.create_model(name, features_only=True)
    assert _n_params(model) == with_head
    assert _n_params(features) == without


def test_small_wide_has_medium_parameters() -> None:
    with torch.device("meta"):
        wide = _n_params(timm.create_model("pvt_small_wide"))
        medium = _n_params(timm.create_model("pvt_medium"))
    assert abs(wide / medium - 1) < 0.03


def test_state_dict_is_the_release_layout() -> None:
    rows = [line.split("\t") for line in TINY_KEYS.read_text().strip().splitlines()]
    with torch.device("meta"):
        sd = timm.create_model("pvt_tiny").state_dict()
    assert [(k, str(tuple(v.shape))) for k, v in sd.items()] == [(k, s) for k, s, _ in rows]
    # the reference module's generator agrees with the file, so it can stand in for S/M/L
    assert [(k, str(s)) for k, s in rr.release_layout(rr.DEPTHS["pvt_tiny"])] == [
        (k, s) for k, s, _ in rows
    ]
    for name in PVT[1:]:
        with torch.device("meta"):
            sd = timm.create_model(name).state_dict()
        assert [(k, tuple(v.shape)) for k, v in sd.items()] == rr.release_layout(rr.DEPTHS[name])


def test_layer_norm_eps_and_init() -> None:
    model = timm.create_model("pvt_tiny")
    assert model.norm.eps == 1e-6
    assert model.block1[0].norm1.eps == 1e-6 and model.block1[0].norm2.eps == 1e-6
    assert model.patch_embed1.norm.eps == 1e-5 and model.block1[0].attn.norm.eps == 1e-5
    assert model.block4[0].attn.sr is None  # SR ratio 1 in stage 4
    assert model.pos_embed1.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.block2[0].mlp.fc1.bias.abs().sum() == 0
    assert model.block2[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("name", PVT)
def test_gmacs_at_224_count_attention(name: str) -> None:
    with torch.device("meta"):  # shapes only: counting needs no arithmetic
        model = timm.create_model(name)
    assert count_gmacs(model, (224, 224)) == pytest.approx(PARAMS[name][2], rel=0.02)


def test_cpu_attention_kernel_is_counted(tiny: PyramidVisionTransformer) -> None:
    fused = count_macs(tiny, (224, 224))
    # explicit matmuls: FlopCounterMode sees them on any device
    assert count_macs(_explicit_twin(tiny), (224, 224)) == fused
    assert fused / 1e9 == pytest.approx(1.93, rel=0.02)


def test_drop_path_ramps_over_all_blocks() -> None:
    model = timm.create_model("pvt_small", drop_path_rate=0.3)
    rates = [
        blk.drop_path.drop_prob if hasattr(blk.drop_path, "drop_prob") else 0.0
        for i in range(1, 5)
        for blk in getattr(model, f"block{i}")
    ]
    assert len(rates) == 16
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates == pytest.approx([0.3 * j / 15 for j in range(16)])


@pytest.mark.parametrize(
    ("size", "batch"), [((97, 131), 1), ((224, 224), 2), ((64, 33), 1), ((448, 448), 1)]
)
def test_features_at_any_size(size: tuple[int, int], batch: int) -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvt_tiny", features_only=True).eval()
    assert model.feature_info.channels() == [64, 128, 320, 512]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(batch, 3, *size))
    H, W = size
    expected = [
        (batch, c, -(-H // s), -(-W // s))
        for c, s in zip([64, 128, 320, 512], [4, 8, 16, 32], strict=True)
    ]
    assert [tuple(m.shape) for m in maps] == expected
    assert all(torch.isfinite(m).all() for m in maps)


def test_classifier_at_non_training_size(tiny: PyramidVisionTransformer) -> None:
    with torch.no_grad():
        assert tiny(torch.randn(1, 3, 97, 131)).shape == (1, 1000)
        assert tiny(torch.randn(1, 3, 448, 448)).shape == (1, 1000)


@pytest.mark.slow
def test_features_at_896_and_detection_size() -> None:
    model = timm.create_model("pvt_tiny", features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 896, 896))
        assert [m.shape[-1] for m in maps] == [224, 112, 56, 28]
        maps = model(torch.randn(1, 3, 800, 1333))
        assert [tuple(m.shape[-2:]) for m in maps] == [(200, 334), (100, 167), (50, 84), (25, 42)]


def test_no_cls_token_final_norm_or_head_in_features() -> None:
    model = timm.create_model("pvt_small", features_only=True)
    keys = model.model.state_dict().keys()
    assert not {"cls_token", "norm.weight", "head.weight"} & set(keys)
    assert model.model.pos_embed4.shape == (1, 50, 512)  # the release's layout, slot kept


@pytest.mark.parametrize("size", [(224, 224), (97, 131)])
def test_fused_attention_matches_explicit_softmax(tiny: PyramidVisionTransformer, size) -> None:
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        fused = tiny(x)
        reference = _explicit_twin(tiny)(x)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=0)


def test_intermediates_and_features_agree(tiny: PyramidVisionTransformer) -> None:
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        final, maps = tiny.forward_intermediates(x)
        assert torch.equal(tiny.forward_head(final), tiny(x))
        assert [tuple(m.shape[1:]) for m in maps] == [
            (64, 24, 32),
            (128, 12, 16),
            (320, 6, 8),
            (512, 3, 4),
        ]
        first_two = tiny.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        torch.testing.assert_close(first_two, maps[:2])
        features = timm.create_model("pvt_tiny", features_only=True, out_indices=(0, 1)).eval()
        features.model.load_state_dict(tiny.state_dict(), strict=False)
        torch.testing.assert_close(features(x), maps[:2])
    assert features.feature_info.channels() == [64, 128]
    assert features.model.block3 is None and features.model.cls_token is None


def test_forward_head_and_reset_classifier(tiny: PyramidVisionTransformer) -> None:
    model = timm.create_model("pvt_tiny").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 2 * 2, 512)
        assert model.forward_head(tokens, pre_logits=True).shape == (2, 512)
        model.reset_classifier(10)
        assert model(x).shape == (2, 10)
        assert model.get_classifier().out_features == 10 and model.num_classes == 10
        model.reset_classifier(0)
        assert model(x).shape == (2, 512)


def test_bf16_autocast(tiny: PyramidVisionTransformer) -> None:
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        reference = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvt_tiny", num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing([True, False, True, True])
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="one per stage"):
        model.set_grad_checkpointing([True])


def test_optimizer_interface() -> None:
    from timm.models import group_parameters
    from timm.optim import create_optimizer_v2

    model = timm.create_model("pvt_tiny")
    assert model.no_weight_decay() == {f"pos_embed{i}" for i in range(1, 5)} | {"cls_token"}
    groups = group_parameters(model, model.group_matcher())
    assert "patch_embed1.proj.weight" in groups[0] and "cls_token" in groups[0]
    assert "pos_embed2" in groups[3] and "block2.0.attn.q.weight" in groups[3]
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 6
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.9)
    no_decay = {id(getattr(model, n)) for n in model.no_weight_decay()}
    for group in optimizer.param_groups:
        if any(id(p) in no_decay for p in group["params"]):
            assert group["weight_decay"] == 0.0


def test_timm_registration_and_pretrained_cfg() -> None:
    for name in (*PVT, "pvt_small_wide"):
        assert timm.is_model(name)
    cfg = timm.create_model("pvt_small").pretrained_cfg
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["input_size"] == (3, 224, 224)
    assert cfg["first_conv"] == "patch_embed1.proj" and cfg["classifier"] == "head"
    assert not cfg.get("url") and not cfg.get("hf_hub_id")
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("pvt_small", pretrained=True)  # nothing downloads


@pytest.mark.slow
def test_torch_compile_gives_the_same_outputs(tiny: PyramidVisionTransformer) -> None:
    x = torch.randn(1, 3, 64, 96)
    compiled = torch.compile(tiny)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), tiny(x), atol=1e-5, rtol=1e-5)
