"""Benchmarks: `python src/bench.py [suites=[backbones,...]] [quick=true]`; tables and plots go to
experiments/benchmarks/ (see README)."""

import hydra
from omegaconf import DictConfig

from pvtlab.bench.runner import run_suites
from pvtlab.utils.allocator import reuse_freed_memory


@hydra.main(version_base="1.3", config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    if cfg.reuse_freed_memory:
        reuse_freed_memory()
    run_suites(list(cfg.suites), cfg.out_dir, quick=bool(cfg.quick))


if __name__ == "__main__":
    main()
