"""`src/export.py`: a checkpoint's network to ONNX, TorchScript and torch.export files, each run
again on two input sizes and checked against PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pvtlab import pipeline
from pvtlab.export import (
    FORMATS,
    ExportError,
    ValidationError,
    export_checkpoint,
    export_graph,
    load_network,
)
from pvtlab.export.formats import METADATA_FILE
from pvtlab.export.metadata import export_metadata
from pvtlab.export.validation import validate
from tests.conftest import REPO, compose_config

TINY_BACKBONE = [
    "+backbone.depths=[1,1,1,1]",
    "+backbone.embed_dims=[16,32,48,64]",
    "+backbone.num_heads=[1,1,1,1]",
    "backbone.img_size=64",
]
TINY_HEADS = {
    "classifier": ["task=classification"],
    "semantic_fpn": [
        "task=segmentation",
        "head=semantic_fpn",
        "head.fpn_channels=16",
        "head.head_channels=16",
    ],
    "retinanet": ["task=detection", "head=retinanet", "head.fpn_channels=16"],
    "detr": [
        "task=detection",
        "head=detr",
        "head.hidden_dim=32",
        "head.num_heads=2",
        "head.num_encoder_layers=1",
        "head.num_decoder_layers=1",
        "head.ffn_dim=32",
        "head.num_queries=8",
    ],
    "mask_rcnn": ["task=detection", "head=mask_rcnn", "head.fpn_channels=16"],
    "trans2seg": [
        "task=segmentation",
        "head=trans2seg",
        "head.embed_dim=32",
        "head.depth=1",
        "head.num_heads=2",
        "head.hidden_dim=16",
    ],
}
# The task kind and the head module each exported file names in its metadata.
EXPECTED_METADATA = {
    "classifier": ("classification", "linear"),
    "semantic_fpn": ("segmentation", "semantic_fpn"),
    "trans2seg": ("segmentation", "trans2seg"),
    "retinanet": ("detection", "retinanet"),
    "detr": ("detection", "detr"),
}
IMAGE_SIZE = (64, 64)


def write_checkpoint(overrides: list[str], directory: Path) -> Path:
    """A checkpoint as a pvtlab run writes it: the task's tensors and its model description."""
    cfg = compose_config(overrides, output_dir=directory / "run", data_dir=directory / "data")
    task = pipeline.build_task(cfg)
    path = directory / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": {"model_config": task.hparams.model_config},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`checkpoint(head)`: a tiny checkpoint of that head, written once per module."""
    written: dict[str, Path] = {}

    def get(head: str) -> Path:
        if head not in written:
            directory = tmp_path_factory.mktemp(head)
            written[head] = write_checkpoint([*TINY_HEADS[head], *TINY_BACKBONE], directory)
        return written[head]

    return get


def read_metadata(path: Path, fmt: str) -> dict[str, str]:
    """The metadata an exported file carries, read back as a user without pvtlab would."""
    if fmt == "onnx":
        import onnx
        import onnxruntime

        stored = {prop.key: prop.value for prop in onnx.load(str(path)).metadata_props}
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_modelmeta().custom_metadata_map == stored
        return stored
    extra = {METADATA_FILE: ""}
    if fmt == "torchscript":
        with warnings.catch_warnings():  # TorchScript's deprecation: the format is what is tested
            warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=Warning)
            torch.jit.load(str(path), _extra_files=extra)
    else:
        torch.export.load(path, extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def check_export(ckpt: Path, fmt: str, tmp_path: Path, head: str) -> None:
    output = tmp_path / f"model{FORMATS[fmt].suffix}"
    result = export_checkpoint(ckpt, fmt, output, image_size=IMAGE_SIZE)
    assert result.path == output and output.is_file()
    shapes = {c.input_shape for c in result.comparisons}
    # dynamic batch, height and width: two batch sizes and two image sizes, both checked
    assert shapes == {(1, 3, 64, 64), (3, 3, 96, 128)}
    assert {c.output for c in result.comparisons} == set(result.output_names)
    assert all(c.passed and c.max_abs_diff < 1e-3 for c in result.comparisons)
    metadata = read_metadata(output, fmt)
    kind, head_module = EXPECTED_METADATA[head]
    assert (metadata["pvtlab.task"], metadata["pvtlab.head"]) == (kind, head_module)
    assert metadata["pvtlab.backbone"] == "pvt_tiny"
    assert json.loads(metadata["pvtlab.outputs"]) == list(result.output_names)
    assert json.loads(metadata["pvtlab.input"])["layout"] == "NCHW"
    assert json.loads(metadata["pvtlab.model_config"]) == load_network(ckpt)[1]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("head", ["classifier", "semantic_fpn"])
def test_every_format_validates_on_two_sizes(
    head: str, fmt: str, checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    check_export(checkpoint(head), fmt, tmp_path, head)


def test_trans2seg_exports_to_onnx(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    check_export(checkpoint("trans2seg"), "onnx", tmp_path, "trans2seg")


@pytest.mark.slow
def test_detectors_export_to_onnx(checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    for head in ("retinanet", "detr"):
        check_export(checkpoint(head), "onnx", tmp_path / head, head)


def test_metadata_names_the_classes_and_the_preprocessing(
    checkpoint: Callable[[str], Path],
) -> None:
    _, description = load_network(checkpoint("classifier"))
    names = [f"shape_{i}" for i in range(int(description["num_classes"]))]
    metadata = export_metadata({**description, "class_names": names}, ["logits"], "images")
    assert json.loads(metadata["pvtlab.class_names"]) == names
    assert "pvtlab.category_ids" not in metadata  # an output of detection only
    preprocessing = json.loads(metadata["pvtlab.preprocessing"])
    size = int(description["preprocessing"]["image_size"])
    assert preprocessing["size"] == [size, size]
    assert preprocessing["resize"].startswith("shorter side to floor(size / crop_pct)")
    # timm's ImageNet mean and std (0-1 scale) given on the 0-255 scale, as segmentation's are
    assert preprocessing["mean"] == pytest.approx([123.675, 116.28, 103.53])
    assert preprocessing["std"] == pytest.approx([58.395, 57.12, 57.375])

    _, description = load_network(checkpoint("semantic_fpn"))
    metadata = export_metadata(description, ["logits"], "images")
    preprocessing = json.loads(metadata["pvtlab.preprocessing"])
    assert preprocessing["scale"] == description["preprocessing"]["test_scale"]
    assert preprocessing["mean"] == pytest.approx([123.675, 116.28, 103.53])
    # a checkpoint without class names: predict's names, class_<i>
    assert json.loads(metadata["pvtlab.class_names"])[0] == "class_0"


def test_detection_metadata_carries_the_category_ids(
    checkpoint: Callable[[str], Path],
) -> None:
    _, description = load_network(checkpoint("retinanet"))
    classes = int(description["num_classes"])
    ids = [10 * (i + 1) for i in range(classes)]
    metadata = export_metadata(
        {**description, "class_names": [f"c{i}" for i in range(classes)], "category_ids": ids},
        ["scores", "boxes"],
        "images",
    )
    assert json.loads(metadata["pvtlab.category_ids"]) == ids
    preprocessing = json.loads(metadata["pvtlab.preprocessing"])
    assert preprocessing["short_side"] == description["preprocessing"]["test_short_side"]


def test_mask_rcnn_is_refused_with_the_reason(
    checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    with pytest.raises(ExportError, match=r"Mask R-CNN cannot be exported: .* NMS keeps"):
        export_checkpoint(checkpoint("mask_rcnn"), "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_outputs_beyond_the_tolerance_fail_loudly(checkpoint: Callable[[str], Path]) -> None:
    network, description = load_network(checkpoint("classifier"))
    graph = export_graph(network, description)
    images = [torch.randn(2, 3, 64, 64)]

    def off_by_a_little(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(out + 1e-2 for out in graph(images))

    with pytest.raises(ValidationError, match=r"logits +max \|diff\| 1\.000e-02 +FAILED"):
        validate(off_by_a_little, graph, images, graph.output_names, atol=1e-4, rtol=1e-3)
    passed = validate(graph, graph, images, graph.output_names, atol=1e-4, rtol=1e-3)
    assert [c.max_abs_diff for c in passed] == [0.0]


def test_retinanet_candidates_hold_the_models_best_detection(tmp_path: Path) -> None:
    """The best-scoring candidate (anchor and class) is RetinaNet's own first detection: no
    threshold, top-k or NMS removes it, so it checks the exported scores, boxes and their order."""
    torch.manual_seed(0)
    overrides = [*TINY_HEADS["retinanet"], *TINY_BACKBONE, "head.score_thresh=0.0"]
    network, description = load_network(write_checkpoint(overrides, tmp_path))
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        detections = network(list(images))
        scores, boxes = export_graph(network, description)(images)
    for image_scores, image_boxes, expected in zip(scores, boxes, detections, strict=True):
        best = expected["scores"].argmax()
        score, box, label = (
            expected["scores"][best],
            expected["boxes"][best],
            expected["labels"][best],
        )
        torch.testing.assert_close(image_scores.max(), score)
        # An untrained head scores many candidates almost alike, so the best one is found by its
        # score, class and box together: the anchor holding them all is the model's detection.
        same_score = torch.isclose(image_scores[:, int(label)], score, rtol=1e-5, atol=0.0)
        same_box = torch.isclose(image_boxes, box, rtol=0.0, atol=1e-4).all(dim=1)
        assert (same_score & same_box).any(), (score, box, label)


def test_command_line_writes_beside_the_checkpoint(
    checkpoint: Callable[[str], Path], tmp_path: Path
) -> None:
    ckpt = checkpoint("classifier")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / "export.py"),
            f"ckpt_path={ckpt}",
            "format=torchscript",
            "image_size=[64,64]",
            f"paths.log_dir={tmp_path / 'outputs'}",
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    written = ckpt.parent / "last.torchscript.pt"
    assert written.is_file()
    assert "input 3x3x96x128  logits  max |diff|" in result.stdout
    assert f"Exported: {written}" in result.stdout
