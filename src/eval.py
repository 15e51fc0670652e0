"""Evaluate a checkpoint: `python src/eval.py ckpt_path=<file> [data.root=...]` (see README)."""

import hydra
from omegaconf import DictConfig

from pvtlab import pipeline
from pvtlab.console import entry_point
from pvtlab.run_config import register_resolver

register_resolver()  # before Hydra names the run folder after the checkpoint's task


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@entry_point
def main(cfg: DictConfig) -> None:
    pipeline.evaluate(cfg)


if __name__ == "__main__":
    main()
