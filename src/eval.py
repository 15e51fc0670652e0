"""Evaluate a checkpoint: `python src/eval.py task=<kind> ckpt_path=<file> [data=...]` (see README)."""

import hydra
from omegaconf import DictConfig

from pvtlab import pipeline


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    pipeline.evaluate(cfg)


if __name__ == "__main__":
    main()
