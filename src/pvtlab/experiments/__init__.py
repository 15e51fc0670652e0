"""Experiments: paper tables as Hydra sweeps, per-job metrics, and multirun summaries.

* :mod:`pvtlab.experiments.runtime`: what the pipeline does for every run (pre-trained weights
  checked, W&B runs grouped by sweep, ``metrics.json`` written).
* :mod:`pvtlab.experiments.collate`: a multirun's jobs as one markdown table and a plot
  (``python -m pvtlab.experiments.collate <multirun dir>``).
* :mod:`pvtlab.experiments.hydra_callbacks`: the summary written at the end of every multirun.
"""
