"""The collate script on a multirun folder: metrics.json, metrics.csv fallback, a failed job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pvtlab.sweeps.collate import collate, main, read_multirun


def _job(root: Path, num: int, overrides: list[str], monitor: str = "val/mAP") -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "config.yaml").write_text(yaml.safe_dump({"task": {"monitor": monitor}}))
    return job


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    common = ["experiment=table3_retinanet_smoke", "trainer.max_epochs=1"]
    job = _job(root, 0, ["backbone=pvt_tiny", *common])
    (job / "metrics.json").write_text(
        json.dumps({"test/mAP": 0.4123, "test/mAP_50": 0.7, "val/mAP": 0.4})
    )
    job = _job(root, 1, ["backbone=resnet18", *common])
    (job / "metrics.csv").write_text("epoch,step,val/mAP,test/mAP\n0,10,0.2,\n0,10,,0.3051\n")
    _job(root, 10, ["backbone=resnet50", *common])  # failed: no metrics
    return root


def test_collate_writes_table_and_plot(multirun: Path) -> None:
    jobs = read_multirun(multirun)
    assert [j.name for j in jobs] == ["0", "1", "10"]
    md, png = collate(multirun)
    assert png.name == "summary.png" and png.stat().st_size > 0
    lines = md.read_text().splitlines()
    assert "| job | backbone | test/mAP (%) | test/mAP_50 (%) |" in lines
    assert "| 0 | pvt_tiny | 41.2 | 70.0 |" in lines
    assert "| 1 | resnet18 | 30.5 | n/a |" in lines
    assert any(line.startswith("| 10 | resnet50 | no metrics") for line in lines)
    assert "trainer.max_epochs" not in md.read_text()  # overrides shared by all jobs left out


def test_collate_command_line(
    multirun: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    main([str(multirun), "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "summary.md").is_file()
    assert "| 0 | pvt_tiny | 41.2" in capsys.readouterr().out


def test_not_a_multirun_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a Hydra multirun folder"):
        read_multirun(tmp_path)
