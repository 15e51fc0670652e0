"""pvtlab: a Lightning + Hydra experiment framework for the Pyramid Vision Transformer.

Importing the package registers the PVT family and the pyramid baselines with timm.
`pvtlab.load(ckpt)` returns a predictor of a trained checkpoint (`pvtlab.inference`).
"""

from pvtlab import models  # noqa: F401  (registration side effect)

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> object:
    # `pvtlab.load` imports the inference stack (Lightning, Hydra) on first use only.
    if name == "load":
        from pvtlab.inference import load

        return load
    raise AttributeError(f"module 'pvtlab' has no attribute {name!r}")
