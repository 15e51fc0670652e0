"""`shapes`: an embedded data set of geometric-shape scenes, written once in real on-disk formats.

One scene sampler serves every task. A scene is an image plus its labelled instances (class,
visible mask, box); the writers turn scenes into a folder ``<kind>-<settings digest>`` (one folder
per generator setting, so runs with different settings, such as the parallel jobs of an
image-size sweep, never rewrite each other's files) holding

- classification: ``{train,val,test}/<class>/<id>.jpg`` (ImageNet's image-folder layout), one
  labelled shape per image;
- detection: ``{train,val,test}2017/<id>.jpg`` and ``annotations/instances_{train,val,test}2017.json``
  (COCO: boxes, polygons, areas);
- segmentation: ``images/{training,validation,test}/<id>.jpg`` and
  ``annotations/{training,validation,test}/<id>.png`` (ADE20K: 0 = other, 1..K = classes).

The three splits draw their scenes from separate seed streams, so the test scenes are neither
training scenes nor the validation scenes that choose the best checkpoint.

Scenes are hard on purpose: textured shapes of random colour, size, rotation and aspect on textured
backgrounds with clutter strokes and blobs, and occluders on top. Every image is a pure function of
(seed, kind, split, index). A folder is (re)generated when its manifest is missing, lists a file
that is missing or has another size, or was written by another generator version; it is written to
a temporary folder and renamed into place under a file lock, so concurrent processes (DDP ranks,
parallel test workers) generate it once.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import contourpy
import numpy as np
from filelock import FileLock
from PIL import Image, ImageDraw
from scipy import ndimage

log = logging.getLogger(__name__)

SHAPES_CLASSES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "triangle",
    "square",
    "hexagon",
    "star",
    "cross",
    "crescent",
)
KINDS: tuple[str, ...] = ("classification", "detection", "segmentation")
# Bump when the images or annotations a given setting produces change; caches then regenerate.
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"

# (low, high) of the RGB values drawn for (unlabelled layers, labelled shapes) per polarity.
POLARITY_RANGES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "any": ((0.0, 1.0), (0.0, 1.0)),
    "light": ((0.0, 0.4), (0.6, 1.0)),
}

# Split folder names of each on-disk format (train, val, test); the position is the split's
# seed stream.
SPLIT_DIRS = {
    "classification": ("train", "val", "test"),
    "detection": ("train2017", "val2017", "test2017"),
    "segmentation": ("training", "validation", "test"),
}


@dataclass(frozen=True)
class ShapesSettings:
    """What a generated folder holds. Sizes are fractions of the image side.

    Args:
        image_size: side of the square images in pixels.
        train_images, val_images: images per split (classification: balanced over classes).
        test_images: images of the test split; None: `val_images`.
        objects: (min, max) labelled shapes per scene (classification: (1, 1)).
        scale: (min, max) shape diameter as a fraction of the image side, sampled log-uniformly.
        clutter: (min, max) unlabelled background strokes and blobs under the shapes.
        occluders: (min, max) unlabelled blobs and bars drawn over the shapes.
        min_visible: fraction of every labelled shape's area that stays visible.
        min_area: smallest visible area of a labelled shape, in pixels.
        patterned: chance that a fill drawn as stripes or checks keeps its pattern (else solid or
            gradient); high-frequency patterns make the outline harder to find.
        polarity: "any" (every colour drawn from the whole RGB cube) or "light" (labelled shapes
            drawn from [0.6, 1]^3 over backgrounds, clutter and occluders from [0, 0.4]^3). With
            "any" a model must learn outlines whose contrast sign flips from image to image, which
            takes a small model from scratch many hundreds of steps before it leaves chance;
            "light" keeps hue, texture and layout random but fixes the sign.
        seed: the one seed every image derives from.
        jpeg_quality: quality of the written JPEG files.
    """

    image_size: int = 64
    train_images: int = 4000
    val_images: int = 800
    test_images: int | None = None
    objects: tuple[int, int] = (1, 1)
    scale: tuple[float, float] = (0.3, 0.9)
    clutter: tuple[int, int] = (2, 8)
    occluders: tuple[int, int] = (0, 2)
    min_visible: float = 0.55
    min_area: int = 12
    patterned: float = 1.0
    polarity: str = "any"
    seed: int = 0
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for name in ("objects", "scale", "clutter", "occluders"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] > value[1]:
                raise ValueError(f"shapes generator: {name}={value} must be a (min, max) pair")
            object.__setattr__(self, name, tuple(value))
        if self.polarity not in POLARITY_RANGES:
            raise ValueError(
                f"shapes generator: polarity={self.polarity!r} must be one of {sorted(POLARITY_RANGES)}"
            )
        if self.test_images is None:
            object.__setattr__(self, "test_images", self.val_images)
        if (
            self.image_size < 16
            or self.train_images < 1
            or self.val_images < 1
            or self.test_images < 1
        ):
            raise ValueError(
                f"shapes generator: image_size={self.image_size} (>= 16), train_images="
                f"{self.train_images}, val_images={self.val_images} and test_images="
                f"{self.test_images} (>= 1) are out of range"
            )


# Per-kind defaults; recipe/shapes_<kind>.yaml overrides them through `data.generator`.
DEFAULT_SETTINGS: dict[str, ShapesSettings] = {
    "classification": ShapesSettings(),
    "detection": ShapesSettings(
        image_size=192,
        train_images=800,
        val_images=200,
        objects=(2, 6),
        scale=(0.08, 0.6),
        clutter=(2, 10),
        occluders=(0, 2),
        min_visible=0.6,
        min_area=24,
    ),
    "segmentation": ShapesSettings(
        image_size=128,
        train_images=800,
        val_images=200,
        objects=(2, 6),
        scale=(0.12, 0.6),
        clutter=(2, 10),
        occluders=(0, 2),
        min_visible=0.6,
        min_area=24,
    ),
}


def make_settings(kind: str, **overrides: Any) -> ShapesSettings:
    """The default settings of `kind` with `overrides` (unknown names are an error)."""
    _check_kind(kind)
    known = {f.name for f in fields(ShapesSettings)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(
            f"unknown shapes generator setting(s) {unknown}; valid ones: {sorted(known)}"
        )
    values = asdict(DEFAULT_SETTINGS[kind])
    values["test_images"] = None  # unless set, follows the val count of these settings
    values.update({k: tuple(v) if isinstance(v, list | tuple) else v for k, v in overrides.items()})
    return ShapesSettings(**values)


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass
class Instance:
    """One labelled shape of a scene: what every annotation format is written from."""

    category: int  # 0-based index into SHAPES_CLASSES
    coverage: np.ndarray  # H x W float32 in [0, 1]: the visible, anti-aliased part of the shape

    @property
    def mask(self) -> np.ndarray:
        return self.coverage >= 0.5

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in pixel edges: the tight box of the visible mask."""
        rows = np.flatnonzero(self.mask.any(1))
        cols = np.flatnonzero(self.mask.any(0))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Scene:
    image: np.ndarray  # H x W x 3 uint8
    instances: list[Instance] = field(default_factory=list)

    def label_map(self) -> np.ndarray:
        """H x W uint8: 0 where no labelled shape is visible, else its category + 1."""
        labels = np.zeros(self.image.shape[:2], np.uint8)
        for inst in self.instances:  # visible masks are disjoint
            labels[inst.mask] = inst.category + 1
        return labels


def _unit_polygon(name: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (N, 2) of a shape inscribed in the unit circle, centred at the origin."""
    if name in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        squash = 1.0 if name == "circle" else 1.0 / rng.uniform(1.7, 2.6)
        return np.stack([np.cos(t), squash * np.sin(t)], 1)
    if name in ("triangle", "square", "hexagon"):
        n = {"triangle": 3, "square": 4, "hexagon": 6}[name]
        t = np.arange(n) * 2 * np.pi / n
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "star":
        t = np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([r * np.cos(t), r * np.sin(t)], 1)
    if name == "cross":
        w = rng.uniform(0.22, 0.34)
        x = np.array([w, w, 1, 1, w, w, -w, -w, -1, -1, -w, -w])
        y = np.array([1, w, w, -w, -w, -1, -1, -w, -w, w, w, 1])
        return np.stack([x, y], 1)
    if name == "crescent":
        # The unit disc minus a disc of radius rho centred at (d, 0).
        rho, d = rng.uniform(0.72, 0.85), rng.uniform(0.38, 0.5)
        xi = (1 - rho**2 + d**2) / (2 * d)
        yi = np.sqrt(max(1 - xi**2, 0.0))
        phi = np.arctan2(yi, xi)
        outer = np.linspace(phi, 2 * np.pi - phi, 32)
        psi0, psi1 = np.arctan2(yi, xi - d), np.arctan2(-yi, xi - d) + 2 * np.pi
        inner = np.linspace(psi1, psi0, 24)[1:-1]
        return np.concatenate(
            [
                np.stack([np.cos(outer), np.sin(outer)], 1),
                np.stack([d + rho * np.cos(inner), rho * np.sin(inner)], 1),
            ]
        )
    raise KeyError(name)


def _blob_polygon(rng: np.random.Generator) -> np.ndarray:
    """An irregular star-convex blob: clutter that resembles no class."""
    n = int(rng.integers(7, 13))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.35, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _bar_polygon(rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(0.08, 0.25)
    return np.array([[-1, -w], [1, -w], [1, w], [-1, w]], dtype=float)


def _place(
    unit: np.ndarray, rng: np.random.Generator, radius: float, centre: np.ndarray
) -> np.ndarray:
    """Random rotation and mild aspect jitter, then scale and translate to pixels."""
    jitter = rng.uniform(0.88, 1.12)
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return (unit * [jitter, 1 / jitter]) @ rot.T * radius + centre


def _rasterise(polygon: np.ndarray, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage (size x size float32) of a polygon in pixel coordinates.

    Drawn with PIL at `supersample`x resolution inside the polygon's bounding box only, then
    box-filtered down: coverage is the fraction of each pixel the polygon covers.
    """
    cov = np.zeros((size, size), np.float32)
    x0, y0 = np.floor(polygon.min(0)).astype(int)
    x1, y1 = np.ceil(polygon.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if x1 <= x0 or y1 <= y0:
        return cov
    w, h = x1 - x0, y1 - y0
    canvas = Image.new("L", (w * supersample, h * supersample), 0)
    points = ((polygon - [x0, y0]) * supersample).ravel().tolist()
    ImageDraw.Draw(canvas).polygon(points, fill=255)
    small = canvas.resize((w, h), Image.Resampling.BOX)
    cov[y0:y1, x0:x1] = np.asarray(small, np.float32) / 255.0
    return cov


def _random_colour(
    rng: np.random.Generator,
    avoid: np.ndarray | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """An RGB colour in `value_range`; with `avoid`, the first of 16 draws at L1 distance >= 0.6
    from it."""
    candidates = rng.uniform(*value_range, (16, 3))
    if avoid is None:
        return candidates[0]
    far = np.abs(candidates - avoid).sum(1) >= 0.6
    return candidates[int(np.argmax(far))] if far.any() else 1.0 - avoid


def _texture(
    rng: np.random.Generator,
    base: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    patterned: float = 1.0,
) -> np.ndarray:
    """A fill around colour `base` on the pixel grid (yy, xx): solid, stripes, checks or gradient.

    Stripes and checks are drawn with probability `patterned` relative to their share of the
    four styles; otherwise the style falls back to solid or gradient.
    """
    second = np.clip(base + rng.uniform(-0.35, 0.35, 3), 0, 1).astype(np.float32)
    base = base.astype(np.float32)
    style = int(rng.integers(4))
    # Only draw again when patterns are restricted: patterned=1 keeps every earlier scene.
    if style in (1, 2) and patterned < 1 and rng.random() >= patterned:
        style = 0 if style == 1 else 3
    if style == 0:
        return np.broadcast_to(base, (*yy.shape, 3))
    if style == 1:
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
        t = ((xx * np.cos(angle) + yy * np.sin(angle)) / period) % 1.0 < 0.5
    elif style == 2:
        period = rng.uniform(3, 8)
        t = (np.floor(xx / period) + np.floor(yy / period)) % 2 > 0
    else:
        angle = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(angle) + yy * np.sin(angle)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    t = t.astype(np.float32)[..., None]
    return base * (1 - t) + second * t


def _background(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    patterned: float,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    size = yy.shape[0]
    image = _texture(rng, rng.uniform(*value_range, 3), yy, xx, patterned)
    # Low-frequency blotches make a flat background rare.
    low = rng.normal(0, 0.12, (4, 4, 3)).astype(np.float32)
    blotch = np.stack(
        [
            np.asarray(Image.fromarray(low[..., c]).resize((size, size), Image.Resampling.BICUBIC))
            for c in range(3)
        ],
        -1,
    )
    return image + blotch


def _stroke(rng: np.random.Generator, size: int) -> np.ndarray:
    """Coverage of a random thin line segment."""
    canvas = Image.new("L", (size * 2, size * 2), 0)
    p = rng.uniform(-0.1, 1.1, 4) * size * 2
    ImageDraw.Draw(canvas).line(p.tolist(), fill=255, width=int(rng.integers(1, 4)) * 2)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float32) / 255.0


def _has_hole(mask: np.ndarray) -> bool:
    return bool((ndimage.binary_fill_holes(mask) & ~mask).any())


def sample_scene(
    rng: np.random.Generator,
    settings: ShapesSettings,
    categories: Sequence[int] | None = None,
    allow_holes: bool = False,
    max_tries: int = 8,
) -> Scene:
    """One scene: background and clutter, labelled shapes, then occluders on top.

    Args:
        rng: the scene's own generator (everything random is drawn from it).
        settings: sizes, counts and visibility limits.
        categories: the labelled shapes' classes; default: a random count and random classes.
        allow_holes: whether a shape's visible part may enclose a hole (a smaller shape or
            occluder inside it). COCO polygons cannot describe holes, so detection and
            segmentation scenes reject such placements; classification allows them.
        max_tries: placements tried per shape or occluder before it is skipped.

    Every placement keeps each earlier shape at least `settings.min_visible` visible; a
    labelled shape that cannot be placed in `max_tries` is skipped.
    """
    size = settings.image_size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    layer_range, shape_range = POLARITY_RANGES[settings.polarity]
    image = _background(rng, yy, xx, settings.patterned, layer_range)
    background_colour = image.reshape(-1, 3).mean(0)

    def paint(cov: np.ndarray, colour: np.ndarray) -> None:
        """Composite a textured layer of coverage `cov`, inside its bounding box only."""
        rows, cols = np.flatnonzero(cov.any(1)), np.flatnonzero(cov.any(0))
        if len(rows) == 0:
            return
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        alpha = cov[box][..., None]
        fill = _texture(rng, colour, yy[box], xx[box], settings.patterned)
        image[box] = image[box] * (1 - alpha) + fill * alpha

    for _ in range(int(rng.integers(settings.clutter[0], settings.clutter[1] + 1))):
        if rng.random() < 0.5:
            cov = _stroke(rng, size)
        else:
            radius = size * rng.uniform(0.04, 0.15)
            cov = _rasterise(_place(_blob_polygon(rng), rng, radius, rng.uniform(0, size, 2)), size)
        paint(cov, _random_colour(rng, value_range=layer_range))

    instances: list[Instance] = []
    full_areas: list[int] = []

    def fits(cov: np.ndarray) -> bool:
        """Whether drawing `cov` on top leaves every labelled shape visible enough."""
        hit = cov > 0
        for inst, full in zip(instances, full_areas, strict=True):
            if not (inst.coverage[hit] > 0).any():
                continue
            visible = inst.coverage * (1 - cov) >= 0.5
            if visible.sum() < settings.min_visible * full:
                return False
            if not allow_holes and _has_hole(visible):
                return False
        return True

    def cover(cov: np.ndarray) -> None:
        for inst in instances:
            inst.coverage *= 1 - cov

    if categories is None:
        count = int(rng.integers(settings.objects[0], settings.objects[1] + 1))
        categories = rng.integers(0, len(SHAPES_CLASSES), count).tolist()
    lo, hi = np.log(settings.scale[0]), np.log(settings.scale[1])
    for category in categories:
        for _ in range(max_tries):
            radius = 0.5 * size * float(np.exp(rng.uniform(lo, hi)))
            margin = min(0.8 * radius, 0.5 * size)
            centre = rng.uniform(margin, size - margin, 2)
            unit = _unit_polygon(SHAPES_CLASSES[category], rng)
            cov = _rasterise(_place(unit, rng, radius, centre), size)
            area = int((cov >= 0.5).sum())
            if area >= settings.min_area and fits(cov):
                break
        else:
            continue
        colour = _random_colour(rng, avoid=background_colour, value_range=shape_range)
        paint(cov, colour)
        cover(cov)
        instances.append(Instance(int(category), cov))
        full_areas.append(area)

    for _ in range(int(rng.integers(settings.occluders[0], settings.occluders[1] + 1))):
        for _ in range(max_tries):
            unit = _bar_polygon(rng) if rng.random() < 0.5 else _blob_polygon(rng)
            radius = size * rng.uniform(0.08, 0.3)
            cov = _rasterise(_place(unit, rng, radius, rng.uniform(0, size, 2)), size)
            if fits(cov):
                paint(cov, _random_colour(rng, value_range=layer_range))
                cover(cov)
                break

    # Sensor-like grain over everything, so no region is perfectly flat.
    image += 0.03 * rng.standard_normal(image.shape, dtype=np.float32)
    pixels = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return Scene(pixels, [inst for inst in instances if inst.area >= 1])


# --------------------------------------------------------------------------------------------
# Annotation helpers
# --------------------------------------------------------------------------------------------


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """Drop vertices whose removal changes the polygon's area by less than `tolerance` px².

    Vectorised: each pass considers every other vertex (never two neighbours at once); passes
    alternate parity until two in a row remove nothing.
    """
    idle = 0
    for step in range(256):
        n = len(ring)
        if n <= 4 or idle == 2:
            break
        d1 = ring - np.roll(ring, 1, 0)
        d2 = np.roll(ring, -1, 0) - np.roll(ring, 1, 0)
        tri = 0.5 * np.abs(d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])
        drop = (tri < tolerance) & (np.arange(n) % 2 == step % 2)
        drop[-1] &= n % 2 == 0  # with odd n the last and first vertices share a parity
        idle = 0 if drop.any() else idle + 1
        ring = ring[~drop]
    return ring


def mask_to_polygons(coverage: np.ndarray, tolerance: float = 0.35) -> list[list[float]]:
    """COCO polygons ([x0, y0, x1, y1, ...] in pixel-edge coordinates) of `coverage >= 0.5`.

    Traced as the 0.5 iso-line of the anti-aliased coverage, so edges are sub-pixel accurate,
    then simplified. Outer boundaries only: the scene sampler rules out holes.
    """
    padded = np.pad(coverage.astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    polygons = []
    for line in generator.lines(0.5):
        ring = line[:-1] - 0.5  # closed: last point repeats the first; undo the padding
        x, y = ring[:, 0], ring[:, 1]
        if 0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y) <= 0:
            continue  # a hole (clockwise in image coordinates)
        ring = _simplify(ring, tolerance)
        if len(ring) >= 3:
            polygons.append(np.round(ring, 2).ravel().tolist())
    return polygons


# --------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------

_KIND_CODE = {kind: i for i, kind in enumerate(KINDS)}


def scene_rng(settings: ShapesSettings, kind: str, split: int, index: int) -> np.random.Generator:
    """The generator of one image: a pure function of (seed, kind, split, index)."""
    return np.random.default_rng([settings.seed, _KIND_CODE[kind], split, index])


def classification_scene(settings: ShapesSettings, split: int, index: int) -> tuple[Scene, int]:
    """Image `index` of a classification split and its class (classes cycle, so splits balance)."""
    category = index % len(SHAPES_CLASSES)
    rng = scene_rng(settings, "classification", split, index)
    return sample_scene(rng, settings, categories=[category], allow_holes=True), category


def dense_scene(settings: ShapesSettings, kind: str, split: int, index: int) -> Scene:
    """Image `index` of a detection or segmentation split (several shapes, no holes)."""
    return sample_scene(scene_rng(settings, kind, split, index), settings)


def _save_jpeg(image: np.ndarray, path: Path, quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=quality)


def _write_classification(folder: Path, settings: ShapesSettings) -> None:
    for split, name in enumerate(SPLIT_DIRS["classification"]):
        for cls in SHAPES_CLASSES:
            (folder / name / cls).mkdir(parents=True, exist_ok=True)
        for index in range(_count(settings, split)):
            scene, category = classification_scene(settings, split, index)
            path = folder / name / SHAPES_CLASSES[category] / f"{index:06d}.jpg"
            _save_jpeg(scene.image, path, settings.jpeg_quality)


def coco_categories() -> list[dict[str, Any]]:
    return [
        {"id": i + 1, "name": name, "supercategory": "shape"}
        for i, name in enumerate(SHAPES_CLASSES)
    ]


def _write_detection(folder: Path, settings: ShapesSettings) -> None:
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    size = settings.image_size
    for split, name in enumerate(SPLIT_DIRS["detection"]):
        images, annotations = [], []
        for index in range(_count(settings, split)):
            scene = dense_scene(settings, "detection", split, index)
            image_id = index + 1
            file_name = f"{image_id:012d}.jpg"
            _save_jpeg(scene.image, folder / name / file_name, settings.jpeg_quality)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for inst in scene.instances:
                polygons = mask_to_polygons(inst.coverage)
                if not polygons:
                    continue
                x0, y0, x1, y1 = inst.box
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": inst.category + 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(inst.area),
                        "iscrowd": 0,
                        "segmentation": polygons,
                    }
                )
        document = {
            "info": {"description": "pvtlab shapes", "version": str(GENERATOR_VERSION)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": coco_categories(),
        }
        target = folder / "annotations" / f"instances_{name}.json"
        target.write_text(json.dumps(document, separators=(",", ":")))


def _write_segmentation(folder: Path, settings: ShapesSettings) -> None:
    for split, name in enumerate(SPLIT_DIRS["segmentation"]):
        (folder / "annotations" / name).mkdir(parents=True, exist_ok=True)
        for index in range(_count(settings, split)):
            scene = dense_scene(settings, "segmentation", split, index)
            stem = f"{index + 1:06d}"
            _save_jpeg(scene.image, folder / "images" / name / f"{stem}.jpg", settings.jpeg_quality)
            Image.fromarray(scene.label_map(), mode="L").save(
                folder / "annotations" / name / f"{stem}.png"
            )


def _count(settings: ShapesSettings, split: int) -> int:
    return (settings.train_images, settings.val_images, settings.test_images)[split]


WRITERS: dict[str, Callable[[Path, ShapesSettings], None]] = {
    "classification": _write_classification,
    "detection": _write_detection,
    "segmentation": _write_segmentation,
}


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def _files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def _manifest_for(folder: Path, kind: str, settings: ShapesSettings) -> dict[str, Any]:
    return {
        "generator_version": GENERATOR_VERSION,
        "kind": kind,
        "settings": _plain(settings),
        "classes": list(SHAPES_CLASSES),
        "files": {p.relative_to(folder).as_posix(): p.stat().st_size for p in _files(folder)},
    }


def _plain(settings: ShapesSettings) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}


def cache_problem(folder: Path, kind: str, settings: ShapesSettings) -> str | None:
    """Why `folder` cannot be used as it is (None: it is intact and current).

    Cheap: reads the manifest and stats every listed file, reading no image.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "missing" if not folder.exists() else f"no {MANIFEST} (an interrupted write?)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        return f"unreadable {MANIFEST} ({error})"
    if manifest.get("generator_version") != GENERATOR_VERSION:
        return f"generator version {manifest.get('generator_version')} != {GENERATOR_VERSION}"
    if manifest.get("kind") != kind or manifest.get("settings") != _plain(settings):
        return "written with other settings"
    if manifest.get("classes") != list(SHAPES_CLASSES):
        return "written with another class list"
    for name, size in manifest.get("files", {}).items():
        path = folder / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual} bytes, the manifest says {size}"
    if not manifest.get("files"):
        return f"{MANIFEST} lists no files"
    return None


def cache_folder(root: str | os.PathLike[str], kind: str, settings: ShapesSettings) -> Path:
    """``root/<kind>-<digest>``: the folder of one kind and generator setting (12 hex digits of
    the SHA-256 of the settings)."""
    text = json.dumps(_plain(settings), sort_keys=True)
    return Path(root) / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def ensure_shapes(root: str | os.PathLike[str], kind: str, **generator_settings: Any) -> Path:
    """The folder of `kind` and these settings under `root`, generated first if missing, corrupt
    or out of date.

    Args:
        root: the shapes cache (``${paths.data_dir}/shapes``).
        kind: classification | detection | segmentation.
        **generator_settings: fields of `ShapesSettings` overriding the defaults of `kind`.

    Returns:
        `cache_folder` (``root/<kind>-<digest>``) in the on-disk format of that kind (see the
        module docstring).
    """
    settings = make_settings(kind, **generator_settings)
    folder = cache_folder(root, kind, settings)
    if cache_problem(folder, kind, settings) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        # Another process may have written it while this one waited for the lock.
        problem = cache_problem(folder, kind, settings)
        if problem is None:
            return folder
        _generate(folder, kind, settings, reason=problem)
    return folder


def _generate(folder: Path, kind: str, settings: ShapesSettings, reason: str) -> None:
    log.info("Generating shapes/%s in %s (%s)", kind, folder, reason)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        WRITERS[kind](tmp, settings)
        manifest = _manifest_for(tmp, kind, settings)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=0))
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}-{time.time_ns()}"
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "Generated %d files of shapes/%s in %.1f s",
        len(manifest["files"]),
        kind,
        time.perf_counter() - start,
    )


# The DataModule that reads each kind's on-disk format (imported lazily: each pulls in its task's
# dependencies).
DATAMODULES = {
    "classification": "pvtlab.data.imagefolder:ImageFolderDataModule",
    "detection": "pvtlab.data.coco:CocoDataModule",
    "segmentation": "pvtlab.data.segmentation:ADE20KDataModule",
}


# Where the COCO and ADE20K DataModules find the generated test split (their test split defaults
# to val); a `data.splits` of the config overrides these.
TEST_SPLITS: dict[str, dict[str, str]] = {
    "detection": {
        "test_images": SPLIT_DIRS["detection"][2],
        "test_annotations": f"annotations/instances_{SPLIT_DIRS['detection'][2]}.json",
    },
    "segmentation": {"test": SPLIT_DIRS["segmentation"][2]},
}


def shapes_datamodule(
    kind: str,
    root: str | os.PathLike[str],
    generator: Mapping[str, Any] | None = None,
    **datamodule_kwargs: Any,
) -> Any:
    """Ensure the shapes files of `kind`, then return the real DataModule of that format.

    classification -> `pvtlab.data.imagefolder.ImageFolderDataModule`, detection ->
    `pvtlab.data.coco.CocoDataModule`, segmentation -> `pvtlab.data.segmentation.ADE20KDataModule`,
    each called with ``root=<the folder of that kind>`` and `datamodule_kwargs`: its `loader`
    and `transforms` groups and its own flags (recipe/shapes_<kind>.yaml sets them).
    """
    _check_kind(kind)
    folder = ensure_shapes(root, kind, **dict(generator or {}))
    module_name, _, class_name = DATAMODULES[kind].partition(":")
    datamodule = getattr(importlib.import_module(module_name), class_name)
    if kind in TEST_SPLITS:  # the image folder finds test/ itself
        datamodule_kwargs["splits"] = {
            **TEST_SPLITS[kind],
            **(datamodule_kwargs.get("splits") or {}),
        }
    return datamodule(root=folder, **datamodule_kwargs)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"shapes: kind={kind!r} is not one of {', '.join(KINDS)}")
