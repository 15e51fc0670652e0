"""Predict with a checkpoint: `python src/predict.py ckpt_path=<.ckpt> input=<image | folder | glob>`
(see README, "Use a trained model")."""

import hydra
from omegaconf import DictConfig

from pvtlab import pipeline
from pvtlab.console import entry_point


@hydra.main(version_base="1.3", config_path="../conf", config_name="predict")
@entry_point
def main(cfg: DictConfig) -> None:
    pipeline.predict(cfg)


if __name__ == "__main__":
    main()
