"""Checkpoint loading: release parity, accepted file layouts, and one error for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import pvtlab  # noqa: F401
from pvtlab.models import CheckpointError, create_backbone, read_state_dict
from tests.models import release_reference as rr


@pytest.fixture(scope="module")
def release_sd() -> dict[str, torch.Tensor]:
    """Random PVT-Tiny weights in the released checkpoint's layout (no model involved)."""
    return rr.random_state_dict(rr.release_layout(rr.DEPTHS["pvt_tiny"]))


@pytest.fixture
def release_file(tmp_path: Path, release_sd) -> Path:
    path = tmp_path / "pvt_tiny.pth"
    torch.save({"model": release_sd}, path)
    return path


def test_release_weights_give_the_release_logits(release_file: Path, release_sd) -> None:
    model = timm.create_model(
        "pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(release_file))
    ).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), rr.forward(release_sd, x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_release_parity_small(tmp_path: Path) -> None:
    sd = rr.random_state_dict(rr.release_layout(rr.DEPTHS["pvt_small"]), seed=1)
    torch.save(sd, tmp_path / "pvt_small.pth")
    model = create_backbone("pvt_small", features_only=False, pretrained=tmp_path / "pvt_small.pth")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), rr.forward(sd, x), atol=1e-5, rtol=0)


def test_release_weights_give_the_release_features(release_file: Path, release_sd) -> None:
    # a 224-trained checkpoint at a detection-like size: position embeddings resized per stage
    x = torch.randn(1, 3, 256, 320)
    theirs = rr.features(release_sd, x)
    for model in (
        create_backbone("pvt_tiny", features_only=True, pretrained=release_file),
        timm.create_model(
            "pvt_tiny",
            features_only=True,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(release_file)),
        ),
    ):
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), theirs, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", ["bare", "model", "state_dict", "lightning"])
def test_accepted_layouts(tmp_path: Path, release_sd, layout: str) -> None:
    path = tmp_path / "weights.pth"
    if layout == "bare":
        obj = release_sd
    elif layout == "lightning":  # a pvtlab classification run: LightningModule.model
        obj = {
            "epoch": 3,
            "global_step": 30,
            "pytorch-lightning_version": "2.6.6",
            "state_dict": {f"model.{k}": v for k, v in release_sd.items()},
            "hyper_parameters": {"lr": 1e-3, "backbone": {"name": "pvt_tiny"}},
        }
    else:
        obj = {layout: release_sd}
    torch.save(obj, path)
    model = timm.create_model(
        "pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))
    )
    torch.testing.assert_close(model.state_dict(), release_sd)
    features = create_backbone("pvt_tiny", features_only=True, pretrained=path)
    assert torch.equal(features.model.block1[0].attn.q.weight, release_sd["block1.0.attn.q.weight"])


def test_exported_model_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvt_tiny", num_classes=7)
    path = tmp_path / "export.pth"
    torch.save(model.state_dict(), path)
    again = create_backbone("pvt_tiny", features_only=False, num_classes=7, pretrained=path)
    torch.testing.assert_close(again.state_dict(), model.state_dict())
    # another num_classes: the file's head is dropped on purpose, the new one initialised
    other = create_backbone("pvt_tiny", features_only=False, num_classes=3, pretrained=path)
    assert other.head.weight.shape == (3, 512)
    assert torch.equal(other.norm.weight, model.norm.weight)
    # features only: class token, final norm and head dropped on purpose; stages 1-2 only too
    features = create_backbone("pvt_tiny", features_only=True, pretrained=path, out_indices=(0, 1))
    assert torch.equal(features.model.pos_embed2, model.pos_embed2)


def test_position_embeddings_of_another_resolution_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("pvt_tiny", img_size=320)
    torch.save(source.state_dict(), tmp_path / "at320.pth")
    model = create_backbone("pvt_tiny", features_only=False, pretrained=tmp_path / "at320.pth")
    assert model.pos_embed1.shape == (1, 56 * 56, 64) and model.pos_embed4.shape == (1, 50, 512)
    assert torch.equal(model.pos_embed4[:, 0], source.pos_embed4[:, 0])  # class slot kept apart
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():  # resized once at load == resized at every forward
        torch.testing.assert_close(model.eval()(x), source.eval()(x), atol=1e-5, rtol=0)


def test_wrong_keys_and_shapes_raise_one_error(tmp_path: Path, release_sd) -> None:
    bad = dict(release_sd)
    del bad["block1.0.attn.q.weight"], bad["norm.bias"]
    bad["block9.0.extra"] = torch.zeros(2)
    bad["block2.1.mlp.fc1.weight"] = torch.zeros(10, 128)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as info:
        create_backbone("pvt_tiny", features_only=False, pretrained=path)
    message = str(info.value)
    assert str(path) in message
    for expected in (
        "block1.0.attn.q.weight (64, 64)",
        "norm.bias (512,)",
        "block9.0.extra (2,)",
        "block2.1.mlp.fc1.weight: file (10, 128), model (1024, 128)",
    ):
        assert expected in message
    # features only: norm.bias is dropped on purpose there, the rest still fails
    with pytest.raises(CheckpointError) as info:
        create_backbone("pvt_tiny", features_only=True, pretrained=path)
    assert "norm.bias" not in str(info.value) and "block1.0.attn.q.weight" in str(info.value)
    # timm's own path is strict as well
    with pytest.raises(CheckpointError):
        timm.create_model("pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    with pytest.raises(CheckpointError):
        timm.create_model(
            "pvt_tiny", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(state_dict=bad)
        )


def test_a_file_of_another_model_raises(tmp_path: Path) -> None:
    torch.save(timm.create_model("pvt_tiny").state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(CheckpointError, match="missing from the file"):
        create_backbone("pvt_small", features_only=True, pretrained=tmp_path / "tiny.pth")


@pytest.mark.parametrize("content", [b"\x00\x13garbage" * 100, b"just some text\n"])
def test_non_checkpoint_files_name_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not_a_checkpoint.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"not_a_checkpoint\.pth is not a PyTorch checkpoint"):
        create_backbone("pvt_tiny", features_only=True, pretrained=path)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        timm.create_model("pvt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_files_without_a_state_dict(tmp_path: Path) -> None:
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(tmp_path / "list.pth")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(tmp_path / "meta.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        read_state_dict(tmp_path / "missing.pth")
