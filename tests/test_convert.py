"""`src/convert.py`: PVT weights between the pvtlab, transformers and timm layouts, the mapping
printed, and the round trips exact."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from transformers import PvtConfig, PvtForImageClassification

from pvtlab.models import create_backbone, read_state_dict
from pvtlab.models.checkpoint import write_state_dict
from tests.conftest import REPO

_spec = importlib.util.spec_from_file_location("convert_cli", REPO / "src" / "convert.py")
convert_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_cli)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """PVT-Tiny with a 4-class head, position embeddings stored for 64-pixel inputs."""
    torch.manual_seed(0)
    return timm.create_model("pvt_tiny", num_classes=4, img_size=64).eval()


def _convert(capsys: pytest.CaptureFixture[str], *settings: str) -> str:
    convert_cli.main(list(settings))
    return capsys.readouterr().out


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_pvtlab_to_hf_and_back_is_exact(tmp_path: Path, tiny, capsys) -> None:
    source = write_state_dict(tiny.state_dict(), tmp_path / "tiny.pth")
    out = _convert(capsys, f"in={source}", f"out={tmp_path / 'hf'}", "to=hf")
    assert "split (16):" in out  # each kv weight and bias of 8 blocks into key and value
    assert "  block1.0.attn.kv.weight -> pvt.encoder.block.0.0.attention.self.key.weight + " in out
    assert "  head.weight -> classifier.weight" in out
    assert "resized (0)" in out and "dropped (0)" in out
    assert "heads per stage (1, 2, 5, 8)" in out  # not in a .pth: said, with the default taken

    theirs = PvtForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(pixel_values=x).logits, tiny(x), atol=1e-4, rtol=0)

    out = _convert(
        capsys, f"in={tmp_path / 'hf'}", f"out={tmp_path / 'back.safetensors'}", "to=pvtlab"
    )
    assert "merged (16):" in out and "renamed (" in out
    assert "note: transformers uses layer_norm_eps" in out
    _same_weights(read_state_dict(tmp_path / "back.safetensors"), tiny.state_dict())


def test_resize_prints_the_grids(tmp_path: Path, tiny, capsys) -> None:
    source = write_state_dict(tiny.state_dict(), tmp_path / "tiny.safetensors")
    target = tmp_path / "tiny_128.safetensors"
    out = _convert(capsys, f"in={source}", f"out={target}", "to=pvtlab", "img_size=128")
    assert "  pos_embed1: grid 16x16 -> 32x32 (bilinear)" in out
    assert "  pos_embed4: grid 2x2 -> 4x4 (bilinear; class-token slot kept)" in out
    assert "model:   pvt_tiny(img_size=128)" in out
    model = create_backbone(
        "pvt_tiny", features_only=False, num_classes=4, img_size=128, pretrained=target
    )
    assert model.pos_embed1.shape == (1, 32 * 32, 64)


def test_timm_layout_loads_with_timm(tmp_path: Path, tiny, capsys) -> None:
    source = write_state_dict(tiny.state_dict(), tmp_path / "tiny.pth")
    out = _convert(capsys, f"in={source}", f"out={tmp_path / 'timm'}", "to=timm")
    assert f"kept under the same name ({len(tiny.state_dict())})" in out
    loaded = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    _same_weights(loaded.state_dict(), tiny.state_dict())
    out = _convert(capsys, f"in={tmp_path / 'timm'}", f"out={tmp_path / 'w.pth'}", "to=pvtlab")
    assert "(timm layout)" in out
    _same_weights(read_state_dict(tmp_path / "w.pth"), tiny.state_dict())


def test_lightning_checkpoint_drops_training_state(tmp_path: Path, tiny, capsys) -> None:
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in tiny.state_dict().items()},
        "optimizer_states": [],
        "hyper_parameters": {"model_config": {"backbone": {"name": "pvt_tiny"}}},
    }
    checkpoint["state_dict"]["val_metrics.acc1.tp"] = torch.zeros(1)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    out = _convert(capsys, f"in={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'w.pth'}", "to=pvtlab")
    assert "dropped (3):" in out
    assert "  optimizer_states: training state or run settings, not weights" in out
    assert "  state_dict.val_metrics.acc1.tp: the task module's own state" in out
    assert "heads per stage" not in out  # taken from the checkpoint's model description
    _same_weights(read_state_dict(tmp_path / "w.pth"), tiny.state_dict())


def test_transformers_weights_file_converts(tmp_path: Path, capsys) -> None:
    torch.manual_seed(1)
    PvtForImageClassification(PvtConfig(image_size=64, num_labels=3)).save_pretrained(tmp_path)
    out = _convert(
        capsys, f"in={tmp_path / 'model.safetensors'}", f"out={tmp_path / 'w.pth'}", "to=pvtlab"
    )
    assert "read:    " in out and "(hf layout)" in out
    assert "model:   pvt_tiny(img_size=64)" in out


def test_bad_settings_are_named(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        convert_cli.main(["in=x", "to=hf"])
    assert "missing out=" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_cli.main([f"in={tmp_path}", f"out={tmp_path / 'o'}", "to=onnx"])
    assert "choose one of pvtlab, hf, timm" in capsys.readouterr().err


def test_safetensors_backbone_loads_through_backbone_pretrained(tmp_path: Path, tiny) -> None:
    path = write_state_dict(tiny.state_dict(), tmp_path / "backbone.safetensors")
    features = create_backbone("pvt_tiny", features_only=True, img_size=64, pretrained=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = tiny.forward_intermediates(x, intermediates_only=True)
        got = features(x)
    # stage 4 of a feature extractor attends without the class token (pvtlab.models.pvt)
    for level in range(3):
        torch.testing.assert_close(got[level], expected[level])
