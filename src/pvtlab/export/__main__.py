"""`python -m pvtlab.export <ckpt> [OUT] [--ema]`: a classification checkpoint's backbone weights."""

from pvtlab.export.backbone import main

main()
