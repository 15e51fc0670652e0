"""The benchmark reports' figures: bars with gaps for failed measurements, target lines, and the
detector plot's AP-vs-latency panel only where a sweep gave AP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from pvtlab.bench import data, detectors, training
from pvtlab.bench.plots import bar_chart, new_figure, save_figure


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of the PNG at `path`; fails if it is not one."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_bar_chart_leaves_gaps_for_failures_and_draws_the_reference(tmp_path: Path) -> None:
    fig, (ax,) = new_figure()
    bar_chart(
        ax,
        ["a", "b", "c"],
        {"fp32": [2.0, "failed: OOM", None], "bf16": [1.0, 3.0, 4.0]},
        ylabel="ms",
        title="t",
        log=True,
        reference=(2.5, "target"),
    )
    heights = [patch.get_height() for patch in ax.patches]
    fp32, bf16 = heights[:3], heights[3:]  # one series after the other
    assert fp32[0] == 2.0 and math.isnan(fp32[1]) and math.isnan(fp32[2])
    assert bf16 == [1.0, 3.0, 4.0]
    (line,) = ax.lines
    assert list(line.get_ydata()) == [2.5, 2.5]
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    png = save_figure(fig, tmp_path / "bars.png")
    assert png_size(png)[0] > 0


def test_bar_chart_rejects_a_series_of_the_wrong_length(tmp_path: Path) -> None:
    fig, (ax,) = new_figure()
    with pytest.raises(ValueError, match="'fp32' has 1 values for 2 groups"):
        bar_chart(ax, ["a", "b"], {"fp32": [1.0]}, ylabel="", title="")
    save_figure(fig, tmp_path / "empty.png")


def test_detector_plot_adds_the_ap_panel_only_with_ap(tmp_path: Path) -> None:
    plan = detectors.FULL[:3]
    latencies = {
        plan[0]: {"fp32": 2000.0, "bf16": 1400.0},
        plan[1]: "failed: RuntimeError: out of memory",
        plan[2]: {"fp32": 2600.0, "bf16": 1300.0},
    }
    alone = png_size(detectors._plot(plan, latencies, {}, tmp_path / "alone.png"))
    ap = {("pvt_small", 640): 0.0576, ("resnet50", 800): 0.0382}
    paired = png_size(detectors._plot(plan, latencies, ap, tmp_path / "paired.png"))
    assert paired[0] == pytest.approx(2 * alone[0], rel=0.05) and paired[1] == alone[1]


def test_data_and_training_plots(tmp_path: Path) -> None:
    rates = {"ImageFolderDataModule": (1661.0, 113.0), "CocoDataModule": (331.0, 30.1)}
    one = png_size(data._plot({"shapes": rates}, tmp_path / "one.png"))
    two = png_size(data._plot({"shapes": rates, "real": rates}, tmp_path / "two.png"))
    assert two[0] == pytest.approx(2 * one[0], rel=0.05) and two[1] == one[1]
    classifier = training.RatioRow(
        task="classification",
        head="linear",
        library_share=0.7,
        compile_ceiling=1.4,
        compiled_parts_ceiling=1.3,
        parts_ms="20 / 18",
        compiled_library_share=0.7,
        compiled_ceiling=1.4,
        reused_vs_default_malloc=1.06,
        bf16_speedup=1.24,
        compile_speedup=1.01,
        compile_speedup_per_pair="0.9-1.1",
        compile_target=1.3,
        run_loop_vs_bare=0.99,
    )
    # A head with columns left unmeasured (None), as the table and plot must take them.
    detr = classifier._replace(
        task="detection",
        head="detr",
        library_share=0.4,
        compile_ceiling=2.3,
        parts_ms=None,
        reused_vs_default_malloc=None,
        bf16_speedup=1.18,
        compile_speedup=None,
        compile_speedup_per_pair=None,
        run_loop_vs_bare=None,
    )
    ratio_rows = [classifier, detr]
    fwd = {training.REFERENCE: 16.0, training.EAGER_FP32: 14.9, training.EAGER_BF16: 29.1}
    width, height = png_size(training._plot(ratio_rows, fwd, "cpu", tmp_path / "training.png"))
    assert width > 1.5 * height  # two panels side by side


def test_bar_chart_keeps_the_legend_off_the_bars(tmp_path: Path) -> None:
    """The training plot's case: tall bars at both ends, a target line, long legend entries."""
    heads = ["classification/linear", "detection/retinanet", "detection/mask_rcnn"]
    heads += ["detection/detr", "segmentation/semantic_fpn", "segmentation/trans2seg"]
    for log in (False, True):
        fig, (ax,) = new_figure()
        bar_chart(
            ax,
            heads,
            {
                "bf16 autocast / fp32": [1.75, 1.19, 1.01, 1.02, 1.53, 1.30],
                "fp32 compiled / fp32": [1.02, 1.0, 1.03, 1.0, 1.05, 1.04],
            },
            ylabel="speed-up over the eager step",
            title="t",
            log=log,
            reference=(1.3, "compile target 1.3x"),
        )
        fig.tight_layout()
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert not any(legend.overlaps(bar.get_window_extent()) for bar in ax.patches), log
        save_figure(fig, tmp_path / f"legend_{log}.png")
