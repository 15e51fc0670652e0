"""Lightning callbacks and the checkpoint plugin that `conf/callbacks/` and `conf/trainer/` name.

* :mod:`~pvtlab.callbacks.checkpointing`: atomic checkpoint files, `last.ckpt` every N steps.
* :mod:`~pvtlab.callbacks.resume`: a run killed mid-epoch resumes as if it had never stopped.
* :mod:`~pvtlab.callbacks.guards`: a run stops at its first non-finite training loss.
* :mod:`~pvtlab.callbacks.predictions`: a few evaluation predictions drawn every epoch.
* :mod:`~pvtlab.callbacks.progress`: a progress bar that reads the loss once a log interval.
* :mod:`~pvtlab.callbacks.summary`: the model summary, with parameters and GMACs, at the start.
"""
