"""logger=wandb: what an offline run's files hold (metrics, images, config), and resuming."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf, open_dict
from wandb.proto import wandb_internal_pb2

from pvtlab.loggers import (
    RUN_ID_FILE,
    complexity_input_size,
    create_wandb_logger,
    previous_run_id,
)
from pvtlab.pipeline import train
from tests.conftest import compose_config

BLOCK = 32768  # the .wandb file is a LevelDB-style log of 32 KiB blocks of protobuf records


def wandb_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a `run-<id>.wandb` file, parsed with W&B's own protobuf definitions."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # block trailer / padding
            pos += left
            continue
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def read_run(run_dir: Path, part: int = 0) -> dict[str, Any]:
    """History rows, config and run facts of an offline W&B run under `run_dir`: the part-th
    process's (a resumed run writes a second offline folder beside the first)."""
    offline = sorted(run_dir.glob("wandb/offline-run-*"))[part]
    (log_file,) = offline.glob("run-*.wandb")
    out: dict[str, Any] = {"dir": offline, "history": [], "config": {}, "run": None}
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            out["run"] = record.run
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


def _overrides(tmp_path: Path, epochs: int) -> list[str]:
    return [
        "logger=[csv,wandb]",
        "logger.wandb.group=grp",
        "tags=[a,b]",
        f"paths.data_dir={tmp_path / 'data'}",
        "data.generator.train_images=16",
        "data.generator.val_images=8",
        "data.loader.batch_size=8",
        f"trainer.max_epochs={epochs}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
    ]


def _run(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    cfg = compose_config(overrides, output_dir=tmp_path / name)
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it over
    train(cfg)
    return tmp_path / name


@pytest.mark.slow
def test_offline_run_holds_metrics_images_config_and_resumes(tmp_path: Path) -> None:
    first = _run(tmp_path, "first", _overrides(tmp_path, 2))
    run = read_run(first)
    run_id = (first / RUN_ID_FILE).read_text().strip()
    assert run["run"].run_id == run_id and run["dir"].name.endswith(run_id)
    assert run["run"].project == "pvtlab" and run["run"].run_group == "grp"
    assert run["run"].display_name == "classification_pvt_tiny"
    assert list(run["run"].tags) == ["a", "b"]
    assert run["exit_code"] == 0  # finished at the end of the job

    keys = set().union(*run["history"])
    assert {"train/loss_step", "val/loss", "val/acc1", "val/acc5", "test/acc1"} <= keys
    assert any(k.startswith("lr-") for k in keys), sorted(keys)
    images = [row for row in run["history"] if "predictions/val/filenames" in row]
    assert len(images) == 2  # one panel per epoch
    assert images[0]["predictions/val/count"] == 8
    assert images[0]["predictions/val/captions"][0].startswith("true: ")
    for name in images[-1]["predictions/val/filenames"]:
        assert (run["dir"] / "files" / name).is_file()

    config = run["config"]
    assert config["task"]["_target_"].endswith("ClassificationTask")  # nested, resolved
    assert config["backbone"]["name"] == "pvt_tiny" and config["data"]["loader"]["batch_size"] == 8
    assert config["model/params"] > 1e6 and 0 < config["model/gmacs"] < 1
    assert config["model/gmacs_input_size"] == [64, 64]

    # Resuming from the first run's checkpoint continues its W&B run, in the first run's folder.
    ckpt = first / "checkpoints" / "last.ckpt"
    _run(tmp_path, "second", [*_overrides(tmp_path, 3), f"ckpt_path={ckpt}"])
    assert len(list(first.glob("wandb/offline-run-*"))) == 2
    resumed = read_run(first, part=1)
    assert resumed["run"].run_id == run_id
    assert (first / RUN_ID_FILE).read_text().strip() == run_id
    epochs = {row["epoch"] for row in resumed["history"] if "val/acc1" in row}
    assert max(epochs) == 2 and 0 not in epochs  # trained on from the checkpoint


def test_logger_saves_a_new_run_id_and_reuses_a_checkpoints_one(tmp_path: Path) -> None:
    first = create_wandb_logger("p", save_dir=tmp_path / "a", offline=True)
    run_id = (tmp_path / "a" / RUN_ID_FILE).read_text().strip()
    assert first._wandb_init["id"] == run_id and len(run_id) == 8

    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert previous_run_id(ckpt) == run_id
    second = create_wandb_logger("p", save_dir=tmp_path / "b", offline=True, resume_from=ckpt)
    assert second._wandb_init["id"] == run_id and second._wandb_init["resume"] == "allow"
    assert (tmp_path / "b" / RUN_ID_FILE).read_text().strip() == run_id


def test_only_rank_zero_writes_the_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP every rank builds the logger in the one run folder; rank 0's id must survive."""
    rank0 = create_wandb_logger("p", save_dir=tmp_path, offline=True)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    rank1 = create_wandb_logger("p", save_dir=tmp_path, offline=True)
    assert rank1._wandb_init["id"] != rank0._wandb_init["id"]
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == rank0._wandb_init["id"]


def test_resuming_from_a_foreign_checkpoint_starts_a_new_run(tmp_path: Path) -> None:
    assert previous_run_id(tmp_path / "elsewhere" / "model.ckpt") is None
    logger = create_wandb_logger(
        "p", save_dir=tmp_path / "b", offline=True, resume_from=tmp_path / "x.ckpt"
    )
    assert logger._wandb_init["id"] == (tmp_path / "b" / RUN_ID_FILE).read_text().strip()


@pytest.mark.parametrize(
    ("data", "size"),
    [
        ({"crop_size": [512, 512], "image_size": 224}, (512, 512)),
        ({"image_size": 224}, (224, 224)),
        ({"test_short_side": 800, "max_size": 1333}, (800, 1333)),
        ({"test_short_side": [640, 800], "max_size": None}, (800, 800)),
        ({}, None),
    ],
)
def test_complexity_input_size_reads_each_kind_of_data_config(data, size) -> None:
    assert complexity_input_size(OmegaConf.create(data)) == size


def test_each_multirun_job_is_its_own_named_run(tmp_path: Path) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    cfg = compose_config(["logger=wandb"], output_dir=tmp_path / "0")
    OmegaConf.set_readonly(cfg.hydra, False)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 3
        cfg.hydra.job.override_dirname = "task.optimizer.lr=0.003"
    HydraConfig.instance().set_config(cfg)
    try:
        loggers = [create_wandb_logger("p", "cls", save_dir=tmp_path / str(i)) for i in range(2)]
    finally:
        HydraConfig.instance().cfg = None
    assert loggers[0]._wandb_init["name"] == "cls-3 (task.optimizer.lr=0.003)"
    assert loggers[0]._wandb_init["id"] != loggers[1]._wandb_init["id"]
