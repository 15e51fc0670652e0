"""The notebooks: committed without outputs, and each runs top to bottom at small settings, from
another working directory, leaving nothing in the temp folder."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def run_notebook(
    path: Path, parameters: str, tmp_path: Path, timeout: int = 600
) -> nbformat.NotebookNode:
    """Execute `path` with `parameters` (code) run right after its cell tagged `parameters`.

    The kernel starts outside the repository (the notebooks find it themselves) with its own
    TMPDIR, which must be empty again when the notebook ends: nothing is left in the temp folder.
    """
    book = nbformat.read(path, as_version=4)
    index = next(
        (i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])), None
    )
    assert index is not None, f"{path.name} has no cell tagged 'parameters'"
    book.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    elsewhere, temp = tmp_path / "elsewhere", tmp_path / "tmp"
    elsewhere.mkdir()
    temp.mkdir()
    client = NotebookClient(book, timeout=timeout, kernel_name="python3")
    client.execute(cwd=str(elsewhere), env=dict(os.environ, TMPDIR=str(temp)))
    # torch keeps its compiled-kernel cache there on purpose, for the next process to reuse
    left = sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_"))
    assert not left, f"{path.name} left {left} in its TMPDIR"
    return book


def test_there_are_three_notebooks() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_pvt_anatomy.ipynb",
        "02_shapes_predictions.ipynb",
        "03_compare_sweep.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_are_committed_without_outputs(path: Path) -> None:
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    dirty = [
        i
        for i, c in enumerate(book.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count)
    ]
    assert not dirty, (
        f"{path.name}: cells {dirty} hold outputs; clear them (jupyter nbconvert --clear-output "
        "--inplace notebooks/*.ipynb) before committing"
    )


def _texts(book: nbformat.NotebookNode) -> str:
    return "\n".join(
        out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def _images(book: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in book.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )


def _gmacs_rows(text: str, names: list[str], sizes: int) -> dict[str, list[float]]:
    """Figure 6's printed table: each model's GMACs at the input sides, in order."""
    rows = {}
    table = text[text.index("GMACs of the whole model") :]
    for line in table.splitlines():
        fields = line.split()
        if fields and fields[0] in names:
            rows[fields[0]] = [float(v) for v in fields[1 : 1 + sizes]]
    return rows


@pytest.mark.slow
def test_anatomy_notebook_runs(tmp_path: Path) -> None:
    book = run_notebook(
        NOTEBOOKS[0],
        'backbones = ["pvt_tiny", "resnet18", "vit_small_32"]\nsizes = [224, 320, 448]\n'
        "shape_size = 64",
        tmp_path,
    )
    text = _texts(book)
    assert "pvt_tiny" in text and "strides [4, 8, 16, 32]" in text
    assert _images(book) >= 2  # the SRA cost and the GMACs curve
    # Figure 6: the paper's four models, whole; columnar ViT-S/16 grows fastest, faster than
    # PVT-Small at every step of the range.
    figure = ["pvt_small", "resnet50", "vit_small_16", "vit_small_32"]
    gmacs = _gmacs_rows(text, figure, 3)
    assert sorted(gmacs) == sorted(figure)
    steps = {name: [b - a for a, b in itertools.pairwise(v)] for name, v in gmacs.items()}
    for name in ("pvt_small", "resnet50", "vit_small_32"):
        assert all(
            vit > other for vit, other in zip(steps["vit_small_16"], steps[name], strict=True)
        ), steps
    # whole models at 224: the paper's 3.8 (PVT-Small) and the full 12-block ViT-S/16's 4.6
    assert abs(gmacs["pvt_small"][0] - 3.8) < 0.1 and abs(gmacs["vit_small_16"][0] - 4.6) < 0.1


@pytest.mark.slow
def test_predictions_notebook_runs(tmp_path: Path) -> None:
    book = run_notebook(
        NOTEBOOKS[1],
        "epochs = dict.fromkeys(epochs, 1)\ntrain_images, val_images, num_images = 16, 8, 4\n"
        f"data_dir = {str(tmp_path / 'data')!r}\nwork_dir = {str(tmp_path / 'work')!r}\n"
        'overrides = ["data.loader.batch_size=4", "trainer.limit_train_batches=2"]',
        tmp_path,
    )
    assert _images(book) == 3  # one picture per task
    assert {p.name for p in (tmp_path / "work").glob("*.png")} == {
        "classification.png",
        "detection.png",
        "segmentation.png",
    }


@pytest.mark.slow
def test_sweep_notebook_runs(tmp_path: Path) -> None:
    book = run_notebook(
        NOTEBOOKS[2],
        'sweep_settings = ["trainer.max_epochs=2", "data.generator.train_images=16", '
        '"data.generator.val_images=8", "data.loader.batch_size=4", "trainer.limit_train_batches=2", '
        '"data.loader.num_workers=0"]',
        tmp_path,
    )
    # the default sweep ran in a temporary folder (under TMPDIR, empty again afterwards)
    assert f"2 jobs in {tmp_path / 'tmp'}" in _texts(book)
    assert _images(book) == 1
