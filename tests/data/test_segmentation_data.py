"""ADE20K-layout loader and joint transforms, on small hand-built folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pvtlab.data.segmentation import (
    ADE20KDataModule,
    LabelMapError,
    SegmentationFolder,
    collate_segmentation,
)
from pvtlab.data.segmentation_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    PhotometricDistortion,
    RandomCropCatMax,
    RandomHorizontalFlip,
    TrainTransform,
    keep_ratio_size,
    shift_hue,
)


def write_pair(
    root: Path, split: str, name: str, label: np.ndarray, image_size: tuple[int, int] | None = None
) -> None:
    """A JPEG whose red channel marks stored label 2 (bright) and a PNG label map."""
    height, width = image_size or label.shape
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    if image_size is None:
        rgb[..., 0] = np.where(label == 2, 255, 0)
    Image.fromarray(rgb).save(root / "images" / split / f"{name}.jpg", quality=95)
    Image.fromarray(label.astype(np.uint8), mode="L").save(
        root / "annotations" / split / f"{name}.png"
    )


def make_label(height: int, width: int) -> np.ndarray:
    """Stored values: 0 (unlabelled) top rows, 1 left half, 2 right half, a 255 pixel."""
    label = np.ones((height, width), dtype=np.uint8)
    label[:, width // 2 :] = 2
    label[:2] = 0
    label[-1, -1] = 255
    return label


@pytest.fixture
def tiny_ade(tmp_path: Path) -> Path:
    root = tmp_path / "ade"
    write_pair(root, "training", "a", make_label(40, 60))
    write_pair(root, "training", "b", make_label(50, 30))
    write_pair(root, "validation", "c", make_label(36, 48))
    write_pair(root, "validation", "d", make_label(20, 24))
    return root


def test_zero_label_becomes_ignore_and_classes_shift(tiny_ade: Path) -> None:
    dataset = SegmentationFolder(tiny_ade, "training", num_classes=2)
    image, label = dataset.load(0)
    assert image.shape == (3, 40, 60) and image.dtype == torch.uint8
    assert label.dtype == torch.uint8  # int64 after the transform
    assert set(label.unique().tolist()) == {0, 1, 255}
    assert (label[:2] == 255).all()  # stored 0
    assert label[5, 0] == 0 and label[5, -1] == 1  # stored 1 -> 0, 2 -> 1
    assert label[-1, -1] == 255  # a stored 255 stays ignored


def test_without_zero_label_reduction(tiny_ade: Path) -> None:
    dataset = SegmentationFolder(tiny_ade, "training", num_classes=3, reduce_zero_label=False)
    _, label = dataset.load(0)
    assert set(label.unique().tolist()) == {0, 1, 2, 255}


def test_label_beyond_class_count_names_the_file(tmp_path: Path) -> None:
    label = make_label(20, 20)
    label[5, 5] = 7
    write_pair(tmp_path, "training", "bad", label)
    dataset = SegmentationFolder(tmp_path, "training", num_classes=2)
    with pytest.raises(
        LabelMapError, match=r"bad\.png holds label values \[7\] beyond the 2 classes"
    ):
        dataset[0]


@pytest.mark.parametrize("mode", ["P", "I;16"])
def test_palette_and_16_bit_label_maps_read_as_8_bit_ones(tiny_ade: Path, mode: str) -> None:
    expected = SegmentationFolder(tiny_ade, "training", num_classes=2).load(0)[1]
    path = tiny_ade / "annotations" / "training" / "a.png"
    stored = np.asarray(Image.open(path))
    if mode == "P":
        recoded = Image.fromarray(stored).convert("P")  # palette index = grey value
        recoded.putpalette([v for grey in range(256) for v in (grey, 0, 0)])
    else:
        recoded = Image.fromarray(stored.astype(np.uint16))
    recoded.save(path)
    assert Image.open(path).mode == mode
    label = SegmentationFolder(tiny_ade, "training", num_classes=2).load(0)[1]
    assert torch.equal(label, expected)


def test_16_bit_label_beyond_a_byte_names_the_file(tmp_path: Path) -> None:
    write_pair(tmp_path, "training", "wide", make_label(20, 20))
    stored = make_label(20, 20).astype(np.uint16)
    stored[3, 3] = 300
    Image.fromarray(stored).save(tmp_path / "annotations" / "training" / "wide.png")
    dataset = SegmentationFolder(tmp_path, "training", num_classes=2)
    with pytest.raises(LabelMapError, match=r"wide\.png holds label values \[300\] beyond"):
        dataset[0]


def test_class_count_beyond_a_byte_is_refused(tiny_ade: Path) -> None:
    with pytest.raises(ValueError, match="num_classes=300 must be at most 255"):
        SegmentationFolder(tiny_ade, "training", num_classes=300)


def test_label_of_another_size_names_the_file(tmp_path: Path) -> None:
    write_pair(tmp_path, "training", "odd", make_label(20, 30), image_size=(21, 30))
    dataset = SegmentationFolder(tmp_path, "training", num_classes=2)
    with pytest.raises(LabelMapError, match=r"odd\.png is 30x20 .* odd\.jpg is 30x21"):
        dataset[0]


def test_image_without_label_map_names_both_paths(tiny_ade: Path) -> None:
    (tiny_ade / "annotations" / "training" / "b.png").unlink()
    with pytest.raises(
        LabelMapError, match=r"b\.jpg has no label map: expected .*annotations/training/b\.png"
    ):
        SegmentationFolder(tiny_ade, "training", num_classes=2)


def test_missing_folder_describes_the_layout(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"images/training/<id>\.jpg with annotations/training/<id>\.png"
    ):
        SegmentationFolder(tmp_path, "training", num_classes=2)


def test_rgb_label_map_is_rejected(tmp_path: Path) -> None:
    write_pair(tmp_path, "training", "rgb", make_label(10, 10))
    Image.new("RGB", (10, 10)).save(tmp_path / "annotations" / "training" / "rgb.png")
    with pytest.raises(LabelMapError, match=r"rgb\.png is a RGB image"):
        SegmentationFolder(tmp_path, "training", num_classes=2)[0]


def test_keep_ratio_size_is_the_shorter_side_unless_the_longer_passes() -> None:
    assert keep_ratio_size(375, 500, (2048, 512)) == (512, 683)
    assert keep_ratio_size(100, 1000, (2048, 512)) == (205, 2048)  # long side capped at 2048


def test_train_transform_crops_pads_and_keeps_image_and_label_aligned(tiny_ade: Path) -> None:
    torch.manual_seed(0)
    transform = TrainTransform(
        crop_size=(48, 48), scale=(120, 40), ratio_range=(0.5, 2.0), photometric=False
    )
    dataset = SegmentationFolder(tiny_ade, "training", num_classes=2, transform=transform)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    padded = 0
    for _ in range(20):
        for index in range(len(dataset)):
            sample = dataset[index]
            image, label = sample["image"], sample["label"]
            assert image.shape == (3, 48, 48) and label.shape == (48, 48)
            red = (image * std + mean)[0]
            # class 1 (stored 2) is the bright-red half, class 0 the black one
            if (label == 1).any():
                assert red[label == 1].mean() > 200
            if (label == 0).any():
                assert red[label == 0].mean() < 55
            padded += int((image.abs().sum(0) == 0).any() and (label == 255).any())
    assert padded > 0  # small ratios give images below the crop size: padded with 0 / 255


def test_cat_max_crop_keeps_one_class_under_the_cap() -> None:
    label = torch.zeros(100, 100, dtype=torch.long)
    label[:, 40:60] = 1  # a 20-column stripe; a 40x40 crop needs >= 11 of its columns

    def dominant_share(crop: RandomCropCatMax) -> list[float]:
        shares = []
        for _ in range(200):
            _, window = crop(torch.zeros(3, 100, 100), label)
            counts = torch.bincount(window.reshape(-1), minlength=2).float()
            shares.append(float(counts.max() / counts.sum()))
        return shares

    torch.manual_seed(0)
    capped = dominant_share(RandomCropCatMax((40, 40), cat_max_ratio=0.75))
    uncapped = dominant_share(RandomCropCatMax((40, 40), cat_max_ratio=1.0))
    assert max(capped) < 0.75
    assert sum(s >= 0.75 for s in uncapped) > 30  # about 36% of uncapped crops break the cap


def test_cat_max_crop_counts_labelled_pixels_only() -> None:
    # Columns: 60 ignored, then 25 of class 0 and 15 of class 1. A 40-wide crop keeps class 0
    # under 75% of its labelled pixels only from column 54 on; counting the ignored pixels as a
    # class would also let through crops that hold class 0 alone.
    label = torch.full((40, 100), 255, dtype=torch.uint8)
    label[:, 60:85], label[:, 85:] = 0, 1
    crop = RandomCropCatMax((40, 40), cat_max_ratio=0.75, attempts=200)
    torch.manual_seed(0)
    for _ in range(100):
        _, window = crop(torch.zeros(3, 40, 100), label)
        labelled = window[window != 255]
        counts = torch.bincount(labelled.long(), minlength=2).float()
        assert float(counts.max() / counts.sum()) < 0.75


def test_flip_moves_image_and_label_together() -> None:
    image = torch.arange(12).reshape(1, 3, 4).expand(3, 3, 4).clone()
    label = torch.arange(12).reshape(3, 4)
    flipped_image, flipped_label = RandomHorizontalFlip(prob=1.0)(image, label)
    assert torch.equal(flipped_image[0], flipped_label)
    assert flipped_label[0, 0] == 3


def test_photometric_distortion_stays_in_range_and_changes_pixels() -> None:
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    outputs = [PhotometricDistortion()(image) for _ in range(10)]
    assert all(o.shape == (3, 16, 16) and o.min() >= 0 and o.max() <= 255 for o in outputs)
    assert any(not torch.allclose(o, image.float()) for o in outputs)


@pytest.mark.parametrize("shift", [-0.1, -0.02, 0.0, 0.07, 0.5])
def test_shift_hue_is_torchvisions_hue_adjustment(shift: float) -> None:
    import torchvision.transforms.v2.functional as TF

    torch.manual_seed(0)
    image = torch.randint(0, 256, (2, 3, 24, 24)).float() / 255
    image[0, :, :4] = image[0, :1, :4]  # grey pixels: no hue
    image[0, 1, 4:8] = image[0, 0, 4:8]  # red and green tied for the maximum
    image[1, 2, 8:12] = image[1, 1, 8:12]  # green and blue tied
    expected = TF.adjust_hue(image, shift)
    torch.testing.assert_close(shift_hue(image, shift), expected, atol=1e-5, rtol=0)
    # On the 0-255 scale the photometric distortion works in, the same image x 255.
    torch.testing.assert_close(shift_hue(image * 255, shift), expected * 255, atol=1e-3, rtol=0)


def test_test_transform_resizes_image_only(tiny_ade: Path) -> None:
    dataset = SegmentationFolder(
        tiny_ade, "validation", 2, transform=EvalTransform(scale=(2048, 72))
    )
    sample = dataset[0]
    assert sample["image"].shape == (3, 72, 96)  # shorter side 36 -> 72
    assert sample["label"].shape == (36, 48)  # scored at the label's own size
    assert sample["original_size"] == (36, 48)


def test_collate_pads_with_zero_and_ignore(tiny_ade: Path) -> None:
    dataset = SegmentationFolder(
        tiny_ade, "validation", 2, transform=EvalTransform(scale=(2048, 36))
    )
    batch = collate_segmentation([dataset[0], dataset[1]])
    assert batch["image"].shape == (2, 3, 36, 48)
    assert batch["image_size"].tolist() == [[36, 48], [36, 43]]
    assert batch["label_size"].tolist() == [[36, 48], [20, 24]]
    assert (batch["label"][1, 20:] == 255).all() and (batch["label"][1, :, 24:] == 255).all()
    assert (batch["image"][1, :, :, 43:] == 0).all()
    assert batch["name"] == ["c", "d"]


def test_datamodule_loaders(tiny_ade: Path) -> None:
    datamodule = ADE20KDataModule(
        tiny_ade,
        num_classes=2,
        class_names=("left", "right"),
        loader={"batch_size": 2, "eval_batch_size": 2, "num_workers": 0},
        transforms={"crop_size": (32, 32), "scale": (128, 32)},
    )
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)
    val = next(iter(datamodule.val_dataloader()))
    assert val["label_size"].tolist() == [[36, 48], [20, 24]]
    assert datamodule.class_names == ("left", "right")
    assert len(datamodule.test_dataloader().dataset) == 2  # no test split: the val split


def test_datamodule_names_ade20k_classes_and_checks_kind(tmp_path: Path) -> None:
    # ADE20K's release (ADEChallengeData2016) ships its class table beside the folders.
    (tmp_path / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    assert ADE20KDataModule(tmp_path).class_names[:3] == ("wall", "building", "sky")
    with pytest.raises(ValueError, match="task=segmentation, not detection"):
        ADE20KDataModule(tmp_path, kind="detection")


def test_missing_root_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"data.root=.*missing does not exist.*images/training"
    ):
        ADE20KDataModule(tmp_path / "missing")
