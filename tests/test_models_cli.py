"""`src/models.py`: every backbone and head of conf/, counted as a run builds it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pvtlab.catalog import list_models, markdown_table, text_table
from tests.conftest import CONF_DIR, REPO

# paper Table 2: GMACs at 224 x 224, attention products included
PAPER_GMACS = {"pvt_tiny": 1.93, "pvt_small": 3.82, "pvt_medium": 6.66, "pvt_large": 9.81}

_spec = importlib.util.spec_from_file_location("models_cli", REPO / "src" / "models.py")
models_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(models_cli)  # type: ignore[union-attr]


def _choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def pvt_entries() -> list:
    """The PVT backbones as the paper lists them: ImageNet classifiers at 224 x 224."""
    return list_models(CONF_DIR, backbones=list(PAPER_GMACS), heads=[])


def test_pvt_gmacs_and_parameters_are_the_papers(pvt_entries) -> None:
    for entry in pvt_entries:
        assert entry.gmacs == pytest.approx(PAPER_GMACS[entry.name], abs=0.01), entry.name
        assert entry.input_size == (224, 224)
        assert entry.selected_by == f"backbone={entry.name}"
        assert "transformers PVT folder" in entry.weights
    params = {e.name: e.params for e in pvt_entries}
    assert params["pvt_tiny"] == 13_229_288  # the release's, with the 1000-class head


@pytest.mark.slow
def test_every_backbone_and_head_is_listed_with_positive_counts() -> None:
    # on the quickstart's data and sizes, so that the whole of conf/ is built and counted quickly
    entries = list_models(CONF_DIR, data="shapes", head_backbone="pvt_tiny")
    backbones = [e for e in entries if e.group == "backbone"]
    heads = [e for e in entries if e.group == "head"]
    assert [e.name for e in backbones] == _choices("backbone")
    assert [e.name for e in heads] == _choices("head")
    for entry in entries:
        assert entry.params > 0 and entry.gmacs > 0, entry
        assert entry.input_size == (64, 64), entry
        assert entry.weights, entry
    by_name = {e.name: e for e in heads}
    assert by_name["mask_rcnn"].selected_by == "task=detection head=mask_rcnn"
    assert "mmdetection" in by_name["retinanet"].weights


def test_tables_and_markdown_file(pvt_entries, tmp_path: Path, capsys) -> None:
    assert "backbone=pvt_large" in text_table(pvt_entries)
    markdown = markdown_table(pvt_entries)
    assert "| pvt_small | `backbone=pvt_small` |" in markdown
    assert "| 3.82 | 224x224 |" in markdown

    target = tmp_path / "models.md"
    models_cli.main(["--backbone", "pvt_tiny", "--data", "shapes", "--markdown", str(target)])
    assert f"wrote {target}" in capsys.readouterr().out
    written = target.read_text()
    assert "| pvt_tiny | `backbone=pvt_tiny` |" in written
    assert "pvt_small |" not in written
