"""The backbone benchmark runs end to end in quick mode and writes its tables and plot."""

from __future__ import annotations

from pathlib import Path

import torch

from pvtlab.bench import PeakMemory, backbones, markdown_table, time_call


def test_quick_run_writes_tables_and_plot(tmp_path: Path) -> None:
    paths = backbones.run(tmp_path, quick=True)
    assert [p.name for p in paths] == ["backbones.md", "backbones.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    text = paths[0].read_text()
    for heading in ("Throughput and peak memory", "fused vs reference", "GMACs vs input size"):
        assert heading in text
    assert "python src/bench.py suites=[backbones] quick=true`" in text
    rows = [line for line in text.splitlines() if line.startswith("| pvt_tiny")]
    assert len(rows) >= 6  # fused and reference at two sizes and in bf16, plus the comparisons
    assert "| pvt_tiny | 64x96 | 1 | features | bf16 | fused (SDPA) |" in text
    assert "| pvt_tiny | 64x96 x1 bf16 |" in text  # bf16's fused / reference ratios
    assert "| 224 | 3.82 |" in text  # PVT-Small GMACs at 224


def test_helpers() -> None:
    calls = []
    assert time_call(lambda: calls.append(1), warmup=2, repeats=3) >= 0
    assert len(calls) == 5
    with PeakMemory("cpu") as peak:
        block = torch.ones(64, 2**20 // 4 * 4)  # 64 MiB, touched
        del block
    assert peak.mib is None or peak.mib > 32
    table = markdown_table(["a", "b"], [(1, 0.12345), ("x", None)])
    assert table.splitlines()[2:] == ["| 1 | 0.123 |", "| x | n/a |"]


def test_full_run_measures_memory_and_timings_in_separate_worker_processes() -> None:
    cfg = backbones.Config("pvt_tiny", 32, 48, 1, True, repeats_fwd=1, repeats_bwd=1)
    fused, reference = backbones._measure_in_subprocess(cfg)
    assert (fused["fused"], reference["fused"]) == (True, False)
    for result in (fused, reference):
        assert result["fwd_img_s"] > 0 and result["fwdbwd_img_s"] > 0
        assert result["fwd_peak_mib"] is None or result["fwd_peak_mib"] >= 0
        assert "fwdbwd_peak_mib" in result
