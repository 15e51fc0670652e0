"""Train a model: `python src/train.py [group=choice ...] [key=value ...]` (see README)."""

import hydra
from omegaconf import DictConfig

from pvtlab import pipeline
from pvtlab.utils.allocator import reuse_freed_memory


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    if cfg.reuse_freed_memory:
        reuse_freed_memory()
    metrics = pipeline.train(cfg)
    # A value for hyperparameter sweepers (Optuna): the metric named by `optimized_metric`.
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
