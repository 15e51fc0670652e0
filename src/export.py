"""Export a checkpoint's network: `python src/export.py ckpt_path=<file> format=onnx` (see README)."""

import hydra
from omegaconf import DictConfig

from pvtlab.console import entry_point
from pvtlab.export import export_checkpoint


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
@entry_point
def main(cfg: DictConfig) -> None:
    result = export_checkpoint(
        cfg.ckpt_path,
        format=cfg.format,
        output=cfg.output,
        image_size=list(cfg.image_size),
        atol=cfg.atol,
        rtol=cfg.rtol,
    )
    print(f"Validated against PyTorch (atol={cfg.atol:g}, rtol={cfg.rtol:g}):")
    for comparison in result.comparisons:
        print(f"  {comparison}")
    print(f"Exported: {result.path}  (outputs: {', '.join(result.output_names)})")


if __name__ == "__main__":
    main()
