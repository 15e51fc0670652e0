"""The detectors, training and data benchmark suites run at tiny settings and write their tables
(every task and head through each path; no timing assertions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pvtlab.bench import attention as attention_bench
from pvtlab.bench import data, detectors, runner, training
from pvtlab.bench.losses import QUICK_LOSS, RETINANET_LOSSES, retinanet_loss_paths
from pvtlab.bench.steps import HEADS, StepResult
from tests.bench.test_plots import png_size


def test_runner_lists_every_suite() -> None:
    assert set(runner.SUITES) == {"backbones", "detectors", "training", "data"}
    with pytest.raises(ValueError, match="choose from"):
        runner.run_suites(["nope"], "/tmp")


def _sweep_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None) -> None:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_shapes_ap_gathers_one_job_sweeps_and_the_newest_wins(tmp_path: Path) -> None:
    """The Table 11 smoke jobs run as separate sweeps (or a stopped one) still fill the AP
    column: (backbone, COCO side) from every sweep, the newest sweep's job where two repeat."""
    root = tmp_path / "experiments" / "table11_speed_smoke"
    _sweep_job(
        root / "2026-11-24_15-15-41",
        0,
        ["backbone=pvt_small", "data.test_short_side=48"],
        {"test/mAP": 5.0},
    )
    _sweep_job(
        root / "2026-11-24_15-15-41", 1, ["backbone=resnet50", "data.test_short_side=48"], None
    )
    _sweep_job(
        root / "2026-11-24_18-01-59",
        0,
        ["backbone=pvt_small", "data.test_short_side=64"],
        {"test/mAP": 7.2},
    )
    _sweep_job(
        root / "2026-11-25_09-00-00",
        0,
        ["backbone=pvt_small", "data.test_short_side=48"],
        {"test/mAP": 5.7},
    )
    (root / "2026-11-25_10-00-00").mkdir()  # stopped before its first job
    assert detectors.shapes_ap(tmp_path) == {("pvt_small", 640): 5.7, ("pvt_small", 800): 7.2}
    assert detectors.shapes_ap(tmp_path / "elsewhere") == {}


@pytest.mark.slow
def test_detectors_quick(tmp_path: Path) -> None:
    md, png = detectors.run(tmp_path, quick=True, log_dir=tmp_path / "outputs")
    text = md.read_text()
    assert png_size(png)[0] > 0 and f"![Detector latency and AP]({png.name})" in text
    assert "python src/bench.py suites=[detectors] quick=true" in text
    for head in (
        "| retinanet | pvt_tiny |",
        "| retinanet | resnet18 |",
        "| detr |",
        "| mask_rcnn |",
    ):
        assert head in text
    assert "| ms / image bf16, SDPA throughout | attention choice speed-up |" in text
    assert "failed" not in text
    evaluation = text.split("## COCO evaluation")[1]
    for iou_type in ("bbox", "segm"):  # both timed, and they agree
        row = next(line for line in evaluation.splitlines() if line.startswith(f"| {iou_type} |"))
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[6]) < 1e-9
    roi_align = text.split("## RoIAlign backward")[1]
    taken = {}
    for case in ("small map", "large map"):  # both paths timed; the gate's choice shown
        row = next(line for line in roi_align.splitlines() if line.startswith(f"| {case} |"))
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert float(cells[5]) > 0 and float(cells[6]) > 0
        taken[case] = cells[8]
    assert taken == {"small map": "products", "large map": "torchvision"}


def test_retinanet_losses_timed_on_the_same_inputs_agree() -> None:
    timing = retinanet_loss_paths(QUICK_LOSS, repeats=1)
    assert list(timing.seconds) == list(timing.losses) == list(RETINANET_LOSSES)
    assert all(seconds > 0 for seconds in timing.seconds.values())
    theirs, ours = timing.losses.values()
    assert ours == pytest.approx(theirs, rel=1e-5) and ours["classification"] > 0
    # torchvision's makes the host wait (per image: its matching, its foreground count); ours not
    waits_theirs, waits_ours = timing.host_waits.values()
    assert waits_theirs >= 2 * QUICK_LOSS.batch and waits_ours == 0
    # 9 anchors a position of P3-P7 (strides 8-128) over the 96 x 128 input
    positions = sum(math.ceil(96 / s) * math.ceil(128 / s) for s in (8, 16, 32, 64, 128))
    assert timing.num_anchors == 9 * positions


@pytest.mark.slow
def test_training_quick_covers_every_head_and_path(tmp_path: Path) -> None:
    md, png = training.run(tmp_path, quick=True)
    text = md.read_text()
    assert png_size(png)[0] > 0 and f"![Training-step ratios and forward paths]({png.name})" in text
    for task, head in HEADS:
        assert f"| {task} | {head} | pvt_tiny |" in text
    assert text.count("| bf16 autocast |") == len(HEADS)  # bf16 autocast on CPU, every task
    assert "| fp32 compiled |" in text  # compile=true through the pipeline
    assert "| fp32, glibc default malloc |" in text  # against src/train.py's allocator setting
    for loop in training.LOOP_PATHS["cpu"]:  # the classifier's loop, bare and as train.py runs
        assert f"| classification | linear | pvt_tiny | 8 | {loop.label} |" in text
    ratios = text.split("## Training-step ratios")[1].split("##")[0]
    for task, head in HEADS:  # every eager step profiled: a library share in (0, 1], a ceiling,
        # and a lower one for the compiled parts (a part of the time outside library kernels)
        (row,) = [line for line in ratios.splitlines() if line.startswith(f"| {task} | {head} |")]
        share, ceiling, parts_ceiling = (float(cell) for cell in row.split("|")[3:6])
        assert 0 < share <= 1 and ceiling == pytest.approx(1 / share, rel=0.01)
        assert 1 < parts_ceiling <= ceiling * 1.01
    # the compiled step (quick runs compile the classifier only) is profiled too: its share, and
    # the eager step over its library time = (compiled / eager speed) / share
    (row,) = [line for line in ratios.splitlines() if line.startswith("| classification |")]
    cells = row.split("|")
    eager_ms, compiled_ms = (float(ms) for ms in cells[6].split(" / "))
    assert eager_ms > 0 and compiled_ms > 0  # the classifier is its own compiled part
    compiled_share, compiled_ceiling = float(cells[7]), float(cells[8])
    speedup = float(cells[11])
    assert 0 < compiled_share <= 1
    assert compiled_ceiling == pytest.approx(speedup / compiled_share, rel=0.02)
    assert float(cells[14]) > 0  # src/train.py's loop against the bare loop
    assert "failed" not in text
    attention = [
        [cell.strip() for cell in line.split("|")]
        for line in text.split("## Attention kernels")[1].split("##")[0].splitlines()
        if line.startswith("| pvt_tiny")
    ]
    assert len(attention) == 4 * 2 * 2  # pvt_tiny's stages x (fp32, bf16) x (forward, backward)
    for row in attention:  # both kernels timed; on the CPU bf16 takes the explicit product
        assert float(row[7]) > 0 and float(row[8]) > 0
        assert row[10] == ("explicit" if row[5] == "bfloat16" else "SDPA")
    assert "| eager fused attention, bf16 autocast, SDPA throughout |" in text
    passes = text.split("## Training pass by attention kernel")[1].split("##")[0]
    for label in attention_bench.PASSES:  # speed and peak memory of each pass
        (row,) = [
            line
            for line in passes.splitlines()
            if line.startswith(f"| pvt_tiny classifier, 64x64, batch 2 | {label} |")
        ]
        assert float(row.split("|")[3]) > 0 and float(row.split("|")[5]) > 0, row
    headings = (
        "Training-step ratios",
        "Forward fast paths",
        "Optimizer step",
        "Host allocator",
        "channels_last",
        "RetinaNet's training loss alone",
    )
    losses = text.split("## RetinaNet's training loss alone")[1].split("##")[0]
    for label in RETINANET_LOSSES:  # both timed, their loss values in the table
        (row,) = [line for line in losses.splitlines() if line.startswith(f"| {label} |")]
        cells = row.split("|")
        assert all(float(cell) > 0 for cell in (*cells[2:4], *cells[5:7])), row
        assert int(cells[4]) >= 0  # host waits
    for heading in (*headings, "## Targets"):
        assert heading in text
    table = [line for line in text.split("## Targets")[1].splitlines() if line.startswith("|")]
    targets = table[2:]  # below the header rows
    assert len(targets) == 5 + len(HEADS)  # five forward ratios, one per training step
    assert targets[0].startswith("| compiled (compile=true) vs reference-attention eager")
    assert targets[1].startswith("| compiled with frozen weights (eval.py compile=true) vs ref")
    for row in targets:  # each with what this machine allows at most, from the same run
        assert float(row.split("|")[4]) > 0, row


def test_step_paths_compile_what_users_run_on_each_device() -> None:
    """CPU: fp32 steps, compiled against eager fp32, profiled for the compile ceiling, some with
    glibc's malloc. GPU (trainer=gpu): compiled bf16 against eager bf16, no CPU profile."""
    cpu = {p.label: p for p in training.step_paths("cpu", "detection", "retinanet", quick=False)}
    assert list(cpu) == ["fp32", "bf16 autocast", training.DEFAULT_MALLOC, "fp32 compiled"]
    assert cpu["fp32 compiled"].compiled and cpu["fp32 compiled"].precision == "32-true"
    assert cpu["fp32"].profile and not cpu[training.DEFAULT_MALLOC].reuse_freed_memory
    classifier = training.step_paths("cpu", "classification", "linear", quick=True)
    assert [p.loop for p in classifier if p.loop] == ["bare", "run"]
    gpu = training.step_paths("cuda", "detection", "retinanet", quick=False)
    assert [p.label for p in gpu] == ["fp32", "bf16 autocast", "bf16 compiled"]
    assert gpu[-1].compiled and gpu[-1].precision == "bf16-mixed"
    assert not any(p.profile for p in gpu)
    # quick runs (the tests) compile the classifier only
    assert not any(p.compiled for p in training.step_paths("cpu", "detection", "detr", quick=True))


def test_compile_ratio_pools_the_steps_of_processes_taken_in_turns() -> None:
    """Runs of one path become one row: the median of all their timed steps, the first run's
    compile time and memory; the per-pair ratios give the spread a single pair would hide."""

    def run(times: list[float], first: float = 1.0) -> StepResult:
        median = sorted(times)[len(times) // 2]
        return StepResult(4, 4 / median, median, first, 100.0, step_times_s=times)

    eager = [run([0.30, 0.31, 0.32]), run([0.40, 0.41], first=2.0)]
    row = training.pooled(eager)
    assert row.step_s == pytest.approx(0.32)  # median of the five steps, not of the two medians
    assert row.images_per_s == pytest.approx(4 / 0.32)
    assert row.first_step_s == 1.0 and row.step_times_s == [0.30, 0.31, 0.32, 0.40, 0.41]
    assert training.pooled(["failed: x", eager[1]]).first_step_s == 2.0
    assert training.pooled(["failed: x", "failed: y"]) == "failed: x"

    compiled = [run([0.20, 0.20, 0.20]), run([0.50, 0.50, 0.50])]
    runs = {"fp32": eager, "fp32 compiled": compiled}
    assert training._per_process_ratios(runs, "cpu") == "0.82-1.55"  # 0.41/0.50, 0.31/0.20
    assert (
        training._per_process_ratios({"fp32": eager[:1], "fp32 compiled": compiled[:1]}, "cpu")
        is None
    )


@pytest.mark.slow
def test_data_quick(tmp_path: Path) -> None:
    md, png = data.run(tmp_path, quick=True)
    text = md.read_text()
    assert png_size(png)[0] > 0 and f"![Loaders vs training step]({png.name})" in text
    shapes, real = text.split("## Training loaders vs the PVT-Tiny training step: ")[1:]
    for module, data_set in (
        ("ImageFolderDataModule", "imagenet"),
        ("CocoDataModule", "coco"),
        ("ADE20KDataModule", "ade20k"),
    ):
        assert f"| {module} |" in shapes and f"| {module} (data={data_set}) |" in real
    for section in (shapes, real):
        lines = section.splitlines()
        rows = [row for row in lines if "Module " in row and not row.startswith("| DataModule")]
        assert len(rows) == 3
        for row in rows:  # loader and step rates measured, and their ratio
            loader, step, ratio = (float(cell) for cell in row.split("|")[7:10])
            assert loader > 0 and step > 0 and ratio == pytest.approx(loader / step, rel=0.02)


def test_reports_carry_the_load_average_of_the_suite_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pvtlab import bench

    monkeypatch.setattr(bench, "_start", {})
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.5, 1.0))
    bench.mark_start()
    monkeypatch.setattr(os, "getloadavg", lambda: (2.0, 2.0, 2.0))  # the suite's own load
    assert bench.machine_info()["load average at start (1/5/15 min)"] == "0.3 / 0.5 / 1.0"


def test_data_suite_counts_images_in_every_tasks_batch_layout() -> None:
    from pvtlab.data.coco import collate_detection
    from pvtlab.data.segmentation import collate_segmentation

    image = torch.zeros(3, 8, 8)
    segmentation = collate_segmentation(
        [
            {"image": image, "label": torch.zeros(8, 8, dtype=torch.long), "name": str(i)}
            for i in range(3)
        ]
    )
    detection = collate_detection([(image, {}), None, (image, {})])
    classification = (torch.zeros(5, 3, 8, 8), torch.zeros(5, dtype=torch.long))
    assert data.count_images(segmentation) == 3  # not the dict's five keys
    assert data.count_images(detection) == 2  # the skipped sample left out
    assert data.count_images(classification) == 5


def test_interleaved_timing_takes_the_paths_in_turns() -> None:
    from pvtlab import bench

    calls: list[str] = []
    seconds = bench.time_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=2
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]  # warm-up of each, then turns
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())


def test_attention_setting_traces_the_shapes_of_its_images() -> None:
    # PVT-Small's stage 1 at 800 x 1333: 200 x 334 query tokens (stride 4, rounded up), keys
    # reduced 8 x to 25 x 42. Without a width the images are square: 56 x 56 queries, 7 x 7 keys.
    detection = attention_bench.AttentionSetting("pvt_small", 800, 2, True, width=1333)
    assert str(detection) == "pvt_small backbone, 800x1333, batch 2"
    assert attention_bench.attention_shapes(detection)[0] == (2, 1, 200 * 334, 25 * 42, 64)
    classifier = attention_bench.AttentionSetting("pvt_small", 224, 32)
    assert str(classifier) == "pvt_small classifier, 224x224, batch 32"
    assert attention_bench.attention_shapes(classifier)[0] == (32, 1, 56 * 56, 7 * 7, 64)


def test_attention_table_times_folded_queries_where_training_folds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kernels' table adds SDPA with the queries folded into the batch at the stages whose
    backward `backward_query_chunks` spreads, and no such columns where none is."""
    setting = attention_bench.AttentionSetting("pvt_tiny", 64, 1, True)  # stage 1: 256 queries
    plain_rows = attention_bench.attention_kernels(setting, repeats=1)  # too few queries to cut
    assert all(r.folded_ms is None and r.chunks == 1 for r in plain_rows)
    assert "query chunks" not in attention_bench.attention_section(plain_rows)

    monkeypatch.setattr(
        attention_bench, "backward_query_chunks", lambda b, h, q, k, device: 4 if q == 256 else 1
    )
    rows = attention_bench.attention_kernels(setting, repeats=1)
    folded = [r for r in rows if r.folded_ms is not None]
    assert {r.stage for r in folded} == {1} and len(folded) == 4  # fp32, bf16 x fwd, fwd+bwd
    assert all(r.chunks == 4 and r.folded_ms > 0 for r in folded)
    table = attention_bench.attention_section(rows)
    assert "| query chunks | SDPA, queries folded ms | folded / SDPA time | taken |" in table
    assert "SDPA, queries in 4 chunks in training" in table  # fp32 at stage 1


def test_measured_steps_apply_the_runs_attention_limit(tmp_path: Path) -> None:
    """`explicit_attention_max_scores` reaches a measured step as it reaches src/train.py's:
    bf16 on the CPU, the default runs PVT-Tiny's attention as explicit products, 0 as SDPA."""
    from unittest import mock

    import torch.nn.functional as F

    from pvtlab.bench.steps import QUICK_DATA, measure_training_step
    from pvtlab.models.attention import cpu_explicit_attention_max_scores

    limit_before = cpu_explicit_attention_max_scores()
    calls = {}
    for limit in ("null", "0"):
        sdpa = mock.patch.object(
            F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention
        )
        with sdpa as counted:
            measure_training_step(
                "classification", "linear", "pvt_tiny", tmp_path, steps=1,
                precision="bf16-mixed",
                extra=(*QUICK_DATA, f"explicit_attention_max_scores={limit}"),
            )  # fmt: skip
        calls[limit] = counted.call_count
    assert calls["null"] == 0 and calls["0"] > 0
    assert cpu_explicit_attention_max_scores() == limit_before  # the block restored it


def test_the_run_loop_is_timed_with_train_py_callbacks_and_logger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`loop="run"` fits with src/train.py's callbacks (checkpoints aside) and a CSV logger;
    `loop="bare"` with neither. Both give the mean step of the loop timed as a whole."""
    from lightning.pytorch.callbacks import Checkpoint
    from lightning.pytorch.loggers import CSVLogger

    from pvtlab import pipeline
    from pvtlab.bench.steps import QUICK_DATA, LoopTimer, measure_training_step

    built = []
    build_trainer = pipeline.build_trainer

    def recorded(*args: object, **kwargs: object) -> object:
        built.append(build_trainer(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(pipeline, "build_trainer", recorded)
    for loop in ("run", "bare"):
        result = measure_training_step(
            "classification", "linear", "pvt_tiny", tmp_path, steps=2, loop=loop,
            extra=QUICK_DATA,
        )  # fmt: skip
        assert result.step_s > 0 and result.step_times_s == [result.step_s]
        assert result.images_per_s == pytest.approx(result.batch / result.step_s)
    run, bare = built
    names = {type(c).__name__ for c in run.callbacks}
    assert {"NonFiniteLossGuard", "PeriodicLossProgressBar", "LearningRateMonitor"} <= names
    assert not any(isinstance(c, Checkpoint) for c in run.callbacks)
    assert [type(logger) for logger in run.loggers] == [CSVLogger]
    assert [type(c) for c in bare.callbacks] == [LoopTimer] and not bare.loggers
    with pytest.raises(ValueError, match="loop='every step'"):
        measure_training_step("classification", "linear", "pvt_tiny", tmp_path, loop="every step")
