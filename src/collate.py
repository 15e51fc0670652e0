"""Collate a multirun's metrics: `python src/collate.py <multirun dir> [--out DIR]`."""

from pvtlab.sweeps.collate import main

if __name__ == "__main__":
    main()
