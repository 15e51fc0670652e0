"""transformers' PVT v1 layout <-> pvtlab's PVT: every key mapped, the same logits both ways."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import PvtConfig, PvtForImageClassification, PvtModel

from pvtlab.models import PyramidVisionTransformer, create_backbone, hf
from pvtlab.models.layouts import pvt_arguments_of, read_pvt_weights

# A small transformers PVT whose every per-stage setting differs from PvtConfig's defaults, so
# that config.json (a diff against those defaults) spells each one out.
TINY = dict(
    image_size=64,
    depths=[1, 2, 1, 1],
    hidden_sizes=[16, 32, 48, 64],
    num_attention_heads=[1, 2, 3, 4],
    sequence_reduction_ratios=[4, 2, 2, 1],
    mlp_ratios=[4, 4, 2, 2],
    num_labels=7,
)


@pytest.fixture(scope="module")
def hf_classifier() -> PvtForImageClassification:
    torch.manual_seed(0)
    return PvtForImageClassification(PvtConfig(**TINY)).eval()


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_transformers_folder_gives_the_same_logits(
    tmp_path: Path, hf_classifier: PvtForImageClassification, weights_name: str
) -> None:
    hf_classifier.save_pretrained(tmp_path)
    if weights_name == "pytorch_model.bin":  # what transformers 4 wrote by default
        tensors = load_file(tmp_path / "model.safetensors")
        (tmp_path / "model.safetensors").unlink()
        torch.save(tensors, tmp_path / weights_name)
    assert hf.weights_file(tmp_path).name == weights_name

    weights = read_pvt_weights(tmp_path)
    assert weights.arguments["depths"] == (1, 2, 1, 1)
    assert weights.arguments["num_heads"] == (1, 2, 3, 4)
    assert weights.arguments["num_classes"] == 7
    model = PyramidVisionTransformer(**weights.arguments).eval()
    model.load_state_dict(weights.state_dict, strict=True)  # every key filled, none left over
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = hf_classifier(pixel_values=x).logits
    torch.testing.assert_close(_logits(model, x), expected, atol=1e-4, rtol=0)


def test_transformers_default_config_loads_through_backbone_pretrained(tmp_path: Path) -> None:
    # PvtConfig's defaults are PVT-Tiny's: config.json then holds almost nothing but the labels
    torch.manual_seed(1)
    theirs = PvtForImageClassification(PvtConfig(image_size=64, num_labels=5)).eval()
    theirs.save_pretrained(tmp_path)
    ours = create_backbone(
        "pvt_tiny", features_only=False, num_classes=5, img_size=64, pretrained=tmp_path
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = theirs(pixel_values=x).logits.detach()
    torch.testing.assert_close(_logits(ours, x), expected, atol=1e-4, rtol=0)


def test_pvtlab_classifier_saves_to_the_transformers_layout(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = PyramidVisionTransformer(img_size=64, num_classes=3, depths=(1, 1, 2, 1)).eval()
    hf.write_transformers(ours.state_dict(), pvt_arguments_of(ours), tmp_path)
    theirs, info = PvtForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    x = torch.randn(2, 3, 64, 64)
    expected = _logits(ours, x)
    torch.testing.assert_close(
        theirs.eval()(pixel_values=x).logits.detach(), expected, atol=1e-4, rtol=0
    )


def test_pvtlab_feature_model_saves_as_pvt_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ours = PyramidVisionTransformer(img_size=64, num_classes=0, depths=(1, 1, 1, 1)).eval()
    hf.write_transformers(ours.state_dict(), pvt_arguments_of(ours), tmp_path)
    theirs, info = PvtModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = ours.forward_features(x)
        got = theirs.eval()(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_mapping_is_one_to_one_both_ways(hf_classifier: PvtForImageClassification) -> None:
    theirs = hf_classifier.state_dict()
    ours, changes = hf.from_transformers(theirs)
    assert {k for c in changes for k in c.source} == set(theirs)
    assert sorted(ours) == sorted(
        PyramidVisionTransformer(**hf.pvt_arguments({**TINY, "model_type": "pvt"})).state_dict()
    )
    back, _ = hf.to_transformers(ours)
    assert sorted(back) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(back[key], value), key


def test_a_key_outside_the_layout_is_named() -> None:
    tensors = {"pvt.encoder.patch_embeddings.0.position_embeddings": torch.zeros(1, 4, 8)}
    tensors["pvt.encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"pvt\.encoder\.extra\.weight"):
        hf.from_transformers(tensors)


def test_config_pvt_cannot_express_is_refused() -> None:
    with pytest.raises(ValueError, match="strides"):
        hf.pvt_arguments({"strides": [7, 2, 2, 2]})
