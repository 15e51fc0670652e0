"""benchmarks/benchmark.py as users run it: a subprocess that writes CSV in timm's schema under
outputs/ of its working directory, never over the committed reference results."""

from __future__ import annotations

import csv
import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "benchmark.py"
REFERENCE_DIR = REPO / "benchmarks" / "results"
# timm's benchmark.py columns, then those that name the variant of a model a row measured.
TIMM_COLUMNS = (
    "model",
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "infer_img_size",
    "infer_gmacs",
    "train_samples_per_sec",
    "train_step_time",
    "train_batch_size",
    "train_img_size",
    "param_count",
)
VARIANT_COLUMNS = ("task", "head", "precision", "compile", "device")
MEASURED = tuple(c for c in TIMM_COLUMNS if c != "model")


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, int]]:
    """One tiny run of a backbone alone and a detector, both measurements, from a fresh working
    directory with no output option: the default location is what is under test."""
    cwd = tmp_path_factory.mktemp("working_dir")
    before = _snapshot(REFERENCE_DIR)
    models = ["pvt_tiny", "detection/retinanet/pvt_tiny"]
    sizes = ["--img-size", "32", "--batch-size", "2", "--warmup", "1", "--steps", "1"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", *models, *sizes],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd, proc.stdout, before


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        return list(reader.fieldnames or []), list(reader)


def _results_file(cwd: Path) -> Path:
    (path,) = cwd.glob("outputs/benchmarks/*/results.csv")
    return path


def test_results_go_under_outputs_and_never_over_the_reference(
    benchmark_run: tuple[Path, str, dict[str, int]],
) -> None:
    cwd, _, before = benchmark_run
    written = [p.relative_to(cwd) for p in cwd.rglob("*") if p.is_file()]
    assert written == [_results_file(cwd).relative_to(cwd)]
    assert _snapshot(REFERENCE_DIR) == before


def test_columns_are_timms_schema_and_the_variant(
    benchmark_run: tuple[Path, str, dict[str, int]],
) -> None:
    columns, _ = _rows(_results_file(benchmark_run[0]))
    assert columns == [*TIMM_COLUMNS, *VARIANT_COLUMNS]


def test_every_measurement_is_a_positive_number(
    benchmark_run: tuple[Path, str, dict[str, int]],
) -> None:
    _, rows = _rows(_results_file(benchmark_run[0]))
    assert len(rows) == 2
    for row in rows:
        for column in MEASURED:
            assert float(row[column]) > 0, (row["head"], column)
        assert int(row["infer_img_size"]) == int(row["train_img_size"]) == 32
        assert int(row["infer_batch_size"]) == int(row["train_batch_size"]) == 2


def test_rows_name_the_model_and_what_it_ran_as(
    benchmark_run: tuple[Path, str, dict[str, int]],
) -> None:
    cwd, stdout, _ = benchmark_run
    _, rows = _rows(_results_file(cwd))
    variants = [tuple(row[c] for c in ("model", *VARIANT_COLUMNS)) for row in rows]
    assert variants == [
        ("pvt_tiny", "", "", "fp32", "False", "cpu"),
        ("pvt_tiny", "detection", "retinanet", "fp32", "False", "cpu"),
    ]
    assert stdout.splitlines()[0].split()[:2] == ["model", "infer_samples_per_sec"]  # the table


@functools.cache
def _script() -> ModuleType:
    """The script as a module (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def test_models_are_timm_names_or_task_head_backbone() -> None:
    script = _script()
    assert script.ModelSpec.parse("pvt_small") == script.ModelSpec("pvt_small")
    assert script.ModelSpec.parse("segmentation/trans2seg/pvt_tiny") == script.ModelSpec(
        backbone="pvt_tiny", task="segmentation", head="trans2seg"
    )
    for wrong in ("retinanet/pvt_tiny", "tracking/retinanet/pvt_tiny"):
        with pytest.raises(ValueError, match="task/head/backbone"):
            script.ModelSpec.parse(wrong)


def test_default_output_is_a_fresh_folder_under_outputs() -> None:
    path = _script().default_output_dir()
    assert path.parts[:2] == ("outputs", "benchmarks") and len(path.parts) == 3


def test_reference_results_follow_the_schema() -> None:
    files = sorted(REFERENCE_DIR.glob("*.csv"))
    assert files, f"no reference results in {REFERENCE_DIR}"
    for path in files:
        columns, rows = _rows(path)
        assert columns == [*TIMM_COLUMNS, *VARIANT_COLUMNS], path.name
        assert rows, path.name


def test_import_pvtlab_imports_no_benchmark_code() -> None:
    """torch itself imports `torch.utils.throughput_benchmark`; pvtlab must add none."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import pvtlab\n"
        "print([m for m in sys.modules if 'bench' in m and (m not in before or 'pvtlab' in m)])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert proc.stdout.strip() == "[]"
    assert not list((REPO / "src" / "pvtlab").rglob("*bench*"))
