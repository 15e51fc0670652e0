"""pvtlab: a Lightning + Hydra experiment framework for the Pyramid Vision Transformer.

Importing the package registers the PVT family and the pyramid baselines with timm.
"""

from pvtlab import models  # noqa: F401  (registration side effect)

__version__ = "0.1.0"
