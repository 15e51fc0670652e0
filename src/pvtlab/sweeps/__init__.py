"""Sweeps: what a run leaves for its multirun, and the multirun's summary.

* :mod:`pvtlab.sweeps.naming`: W&B names and groups of a multirun's jobs.
* :mod:`pvtlab.sweeps.metrics`: each run's final metrics as ``metrics.json``.
* :mod:`pvtlab.sweeps.pretrained`: the pre-trained weights a run names exist before it starts.
* :mod:`pvtlab.sweeps.collate`: a multirun's jobs as one markdown table and a plot
  (``python -m pvtlab.sweeps.collate <multirun dir>``).
* :mod:`pvtlab.sweeps.hydra_callbacks`: the summary written at the end of every multirun.
"""
