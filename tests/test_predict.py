"""`src/predict.py` and `pvtlab.load`: every head predicts from its checkpoint alone, writes its
files, and gives a data set's images the predictions evaluation makes on them."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

import pvtlab
from pvtlab import pipeline
from pvtlab.evaluation.coco import CocoEvaluator
from pvtlab.inference import Predictor
from tests.conftest import REPO, compose_config

TINY_BACKBONE = [
    "+backbone.depths=[1,1,1,1]",
    "+backbone.embed_dims=[16,32,48,64]",
    "+backbone.num_heads=[1,1,1,1]",
    "data.loader.num_workers=0",
    "data.generator.train_images=8",
]
SMALL_SCENES = ["data.generator.val_images=4"]
HEADS = {
    "linear": ["task=classification", "data.generator.val_images=8"],  # one image per class
    # A fresh RetinaNet scores every anchor near its prior (0.01): keep them all to compare.
    "retinanet": [
        "task=detection",
        "head=retinanet",
        "head.score_thresh=0.0",
        "head.topk_candidates=50",
        "head.detections_per_img=20",
        *SMALL_SCENES,
    ],
    "mask_rcnn": ["task=detection", "head=mask_rcnn", *SMALL_SCENES],
    "detr": ["task=detection", "head=detr", *SMALL_SCENES],
    "semantic_fpn": ["task=segmentation", "head=semantic_fpn", *SMALL_SCENES],
    "trans2seg": [
        "task=segmentation",
        "head=trans2seg",
        "head.embed_dim=32",
        "head.depth=1",
        *SMALL_SCENES,
    ],
}


def _runnable(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


class Trained:
    """A tiny checkpoint of one head on shapes, with the data module it was built for."""

    def __init__(self, head: str, folder: Path, data_dir: Path) -> None:
        self.cfg = compose_config(
            [*HEADS[head], *TINY_BACKBONE], output_dir=folder / "train", data_dir=data_dir
        )
        self.datamodule = pipeline.build_datamodule(self.cfg)
        torch.manual_seed(0)
        self.task = pipeline.build_task(self.cfg, datamodule=self.datamodule).eval()
        self.ckpt = folder / f"{head}.ckpt"
        torch.save(
            {"state_dict": self.task.state_dict(), "hyper_parameters": dict(self.task.hparams)},
            self.ckpt,
        )
        self.kind = self.task.kind

    def val_folder(self) -> Path:
        root = Path(self.datamodule.root)
        return {
            "classification": root / "val",
            "detection": root / "val2017",
            "segmentation": root / "images" / "validation",
        }[self.kind]

    def val_loader(self) -> Any:
        self.datamodule.setup("validate")
        return self.datamodule.val_dataloader()


@pytest.fixture(scope="module", params=list(HEADS))
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> Trained:
    return Trained(request.param, tmp_path_factory.mktemp(request.param), data_dir)


def predict_files(trained: Trained, tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    """`src/predict.py input=<the val images>` in this process; the output folder and counts."""
    out = tmp_path / "predict"
    cfg = compose_config(
        [
            f"ckpt_path={trained.ckpt}",
            f"input={trained.val_folder()}",
            f"output_dir={out}",
            f"batch_size={trained.val_loader().batch_size}",
            "progress_bar=false",
            *overrides,
        ],
        config_name="predict",
        output_dir=out,
    )
    return out, pipeline.predict(_runnable(cfg))


def test_predict_writes_the_files_of_its_kind_with_evaluation_s_predictions(
    trained: Trained, tmp_path: Path
) -> None:
    out, counts = predict_files(trained, tmp_path)
    assert counts["skipped"] == 0 and counts["predicted"] > 0
    check = {
        "classification": _same_as_classification_eval,
        "detection": _same_as_detection_eval,
        "segmentation": _same_as_segmentation_eval,
    }[trained.kind]
    check(trained, out)


def _same_as_classification_eval(trained: Trained, out: Path) -> None:
    with (out / "predictions.csv").open() as handle:
        rows = {Path(row["file"]).parts[-2:]: row for row in csv.DictReader(handle)}
    dataset = trained.val_loader().dataset
    names = trained.task.hparams.model_config["class_names"]
    assert len(rows) == len(dataset.samples)
    with torch.inference_mode():
        for index, (path, _) in enumerate(dataset.samples):
            probabilities = trained.task.model(dataset[index][0][None]).softmax(-1)[0]
            top, labels = probabilities.topk(5)
            row = rows[Path(path).parts[-2:]]
            assert [row[f"class_{r}"] for r in range(1, 6)] == [names[i] for i in labels]
            written = [float(row[f"probability_{r}"]) for r in range(1, 6)]
            assert written == pytest.approx(top.tolist(), abs=1e-5)


def _same_as_detection_eval(trained: Trained, out: Path) -> None:
    written = json.loads((out / "predictions.json").read_text())
    dataset = trained.val_loader().dataset
    evaluator = CocoEvaluator(dataset.coco, dataset.categories.category_ids)
    with torch.inference_mode():
        for images, targets in trained.val_loader():
            evaluator.update(trained.task.model(list(images)), targets)
    assert {c["id"]: c["name"] for c in written["categories"]} == {
        c["id"]: c["name"] for c in dataset.coco.dataset["categories"]
    }
    by_file = {Path(image["file_name"]).name: image["id"] for image in written["images"]}
    found = 0
    for image_id, expected in evaluator.results.items():
        ours = by_file[dataset.coco.imgs[image_id]["file_name"]]
        got = [a for a in written["annotations"] if a["image_id"] == ours]
        assert len(got) == len(expected)
        for mine, theirs in zip(_by_score(got), _by_score(expected), strict=True):
            assert mine["category_id"] == theirs["category_id"]
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-5)
            assert mine["bbox"] == pytest.approx(theirs["bbox"], abs=1e-3)
            assert mine.get("segmentation") == theirs.get("segmentation")
        found += len(got)
    assert found > 0, "no detection at all: the comparison would say nothing"
    drawn = sorted((out / "drawn").rglob("*.png"))
    assert len(drawn) == len(written["images"])
    assert Image.open(drawn[0]).size == (
        written["images"][0]["width"],
        written["images"][0]["height"],
    )


def _by_score(results: list[dict]) -> list[dict]:
    return sorted(results, key=lambda r: (-r["score"], r["category_id"], r["bbox"]))


def _same_as_segmentation_eval(trained: Trained, out: Path) -> None:
    checked = 0
    with torch.inference_mode():
        for batch in trained.val_loader():
            for name, (scores, label) in zip(
                batch["name"], trained.task.label_scores(batch), strict=True
            ):
                written = Image.open(out / "label_maps" / f"{name}.png")
                assert written.mode == "P" and written.size == (label.shape[1], label.shape[0])
                assert np.array_equal(np.asarray(written), scores.argmax(0).numpy())
                overlay = Image.open(out / "overlays" / f"{name}.png")
                assert overlay.size == written.size and overlay.mode == "RGB"
                checked += 1
    assert checked == len(list((out / "label_maps").glob("*.png")))


@pytest.mark.parametrize("trained", ["linear"], indirect=True)
def test_load_takes_pil_arrays_paths_and_tensors(trained: Trained) -> None:
    path = next(p for p in sorted(trained.val_folder().rglob("*.jpg")))
    predictor = pvtlab.load(trained.ckpt, device="cpu")
    picture = Image.open(path).convert("RGB")
    array = np.array(picture)
    expected = predictor(path)
    key = "probabilities"
    as_uint8 = torch.from_numpy(array).permute(2, 0, 1)
    for given in (picture, array, str(path), as_uint8, as_uint8.float() / 255):
        assert torch.allclose(predictor(given)[key], expected[key], atol=1e-5)
    for result in predictor(torch.stack([as_uint8, as_uint8])):
        assert torch.allclose(result[key], expected[key], atol=1e-5)


@pytest.mark.parametrize("trained", ["semantic_fpn"], indirect=True)
def test_every_picture_kind_is_decoded_as_the_loaders_do_and_bad_files_are_skipped(
    trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40 wide, shown 24 wide and 40 high
    rgb.save(folder / "rotated.jpg", exif=exif)
    (folder / "broken.jpg").write_bytes(b"not a picture")
    with caplog.at_level(logging.WARNING):
        out, counts = predict_files(trained, tmp_path, f"input={folder}")
    assert counts == {"predicted": 5, "skipped": 1}
    assert any("broken.jpg" in record.getMessage() for record in caplog.records)
    sizes = {p.stem: Image.open(p).size for p in (out / "label_maps").glob("*.png")}
    assert sizes == {
        "gray": (40, 24),
        "rgba": (40, 24),
        "palette": (40, 24),
        "cmyk": (40, 24),
        "rotated": (24, 40),
    }


@pytest.mark.parametrize("trained", ["linear"], indirect=True)
def test_bf16_mixed_precision_runs(trained: Trained) -> None:
    path = next(p for p in sorted(trained.val_folder().rglob("*.jpg")))
    full = Predictor.from_checkpoint(trained.ckpt, "cpu")(path)
    half = Predictor.from_checkpoint(trained.ckpt, "cpu", precision="bf16-mixed")(path)
    assert half["probabilities"].dtype == torch.float32
    assert torch.allclose(half["probabilities"], full["probabilities"], atol=2e-2)
    with pytest.raises(ValueError, match="precision"):
        Predictor.from_checkpoint(trained.ckpt, "cpu", precision="64-true")


@pytest.mark.slow
@pytest.mark.parametrize("trained", ["linear"], indirect=True)
def test_compiled_predictions_equal_eager_ones(trained: Trained, tmp_path: Path) -> None:
    eager_out, _ = predict_files(trained, tmp_path / "eager")
    compiled_out, counts = predict_files(trained, tmp_path / "compiled", "compile=true")
    assert counts["skipped"] == 0 and counts["predicted"] > 0
    with (
        (eager_out / "predictions.csv").open() as eager,
        (compiled_out / "predictions.csv").open() as compiled,
    ):
        eager_rows, compiled_rows = list(csv.DictReader(eager)), list(csv.DictReader(compiled))
    assert [row["file"] for row in compiled_rows] == [row["file"] for row in eager_rows]
    for compiled_row, eager_row in zip(compiled_rows, eager_rows, strict=True):
        assert compiled_row["class_1"] == eager_row["class_1"]
        assert float(compiled_row["probability_1"]) == pytest.approx(
            float(eager_row["probability_1"]), abs=1e-4
        )


@pytest.mark.parametrize("trained", ["linear"], indirect=True)
def test_the_command_line(trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [
        sys.executable,
        str(REPO / "src" / "predict.py"),
        f"ckpt_path={trained.ckpt}",
        f"input={trained.val_folder()}/*/*.jpg",
        f"output_dir={out}",
        "top_k=2",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list(trained.val_folder().rglob("*.jpg")))
    assert list(rows[0]) == ["file", "class_1", "probability_1", "class_2", "probability_2"]
    assert "Predicted" in result.stdout


@pytest.mark.parametrize("trained", ["linear"], indirect=True)
def test_an_older_checkpoint_predicts_with_defaults_and_says_so(
    trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    description = checkpoint["hyper_parameters"]["model_config"]
    for key in ("class_names", "category_ids", "preprocessing"):
        description.pop(key, None)
    older = tmp_path / "older.ckpt"
    torch.save(checkpoint, older)
    with caplog.at_level(logging.WARNING):
        predictor = pvtlab.load(older, device="cpu")
    warnings = " ".join(record.getMessage() for record in caplog.records)
    assert "no class names" in warnings and "no preprocessing" in warnings
    result = predictor(next(trained.val_folder().rglob("*.jpg")))
    assert all(name.startswith("class_") for name in result["names"])
    # The kind's default: the ImageNet evaluation crop.
    assert predictor.transform(Image.new("RGB", (64, 64))).shape == (3, 224, 224)


def test_a_checkpoint_rebuilds_where_its_pretrained_file_is_missing(
    trained: Trained, tmp_path: Path
) -> None:
    # A run started from backbone.pretrained=<file> records that file; the checkpoint holds
    # every weight, so evaluation, prediction and export elsewhere must not read it.
    checkpoint = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["model_config"]["backbone"]["pretrained"] = str(
        tmp_path / "gone" / "pvt_tiny.pth"
    )
    moved = tmp_path / "moved.ckpt"
    torch.save(checkpoint, moved)
    rebuilt = pipeline.task_from_checkpoint(moved)
    for name, value in trained.task.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name
