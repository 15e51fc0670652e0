"""The notebooks: committed without outputs, and each runs top to bottom at small settings."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def run_notebook(
    path: Path, parameters: str, cwd: Path, timeout: int = 600
) -> nbformat.NotebookNode:
    """Execute `path` with `parameters` (code) run right after its cell tagged `parameters`."""
    book = nbformat.read(path, as_version=4)
    index = next(
        (i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", [])), None
    )
    assert index is not None, f"{path.name} has no cell tagged 'parameters'"
    book.cells.insert(index + 1, nbformat.v4.new_code_cell(parameters))
    # The kernel starts in the repository (the notebooks find it from the working directory).
    client = NotebookClient(
        book, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
    )
    client.execute(cwd=str(cwd))
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


@pytest.mark.slow
def test_anatomy_notebook_runs(tmp_path: Path) -> None:
    book = run_notebook(
        NOTEBOOKS[0],
        'backbones = ["pvt_tiny", "resnet18", "vit_small_32"]\nsizes = [64, 128]\nshape_size = 64',
        REPO,
    )
    text = _texts(book)
    assert "pvt_tiny" in text and "strides [4, 8, 16, 32]" in text
    assert _images(book) >= 2  # the SRA cost and the GMACs curve


@pytest.mark.slow
def test_predictions_notebook_runs(tmp_path: Path) -> None:
    book = run_notebook(
        NOTEBOOKS[1],
        "epochs = dict.fromkeys(epochs, 1)\ntrain_images, val_images, num_images = 16, 8, 4\n"
        f"data_dir = {str(tmp_path / 'data')!r}\nwork_dir = {str(tmp_path / 'work')!r}\n"
        'overrides = ["data.loader.batch_size=4", "+trainer.limit_train_batches=2"]',
        REPO,
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
        '"data.generator.val_images=8", "data.loader.batch_size=4", "+trainer.limit_train_batches=2", '
        f'"data.loader.num_workers=0"]\nwork_dir = {str(tmp_path)!r}',
        REPO,
    )
    assert "2 jobs in" in _texts(book)
    assert _images(book) == 1
    assert len(list((tmp_path / "multirun").glob("*/metrics.csv"))) == 2
