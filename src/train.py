"""Train a model: `python src/train.py [group=choice ...] [key=value ...]` (see README)."""

import hydra
from omegaconf import DictConfig

from pvtlab import pipeline
from pvtlab.config import task_class
from pvtlab.console import entry_point


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@entry_point
def main(cfg: DictConfig) -> float | None:
    metrics = pipeline.train(cfg)
    # A value for hyperparameter sweepers (Optuna): the metric named by `optimized_metric`,
    # by default the one the task chooses its best checkpoint by.
    name = cfg.get("optimized_metric") or task_class(cfg).monitor
    return metrics.get(name)


if __name__ == "__main__":
    main()
