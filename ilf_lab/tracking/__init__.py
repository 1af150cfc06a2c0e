"""Experiment tracking for the pipeline: a small `Tracker` protocol, a null and a W&B implementation.

`make_tracker(cfg)` picks the implementation from `cfg.logger` (`_target_`, else `name`: wandb | none) and wraps
it in the one failure boundary (`SafeTracker`): tracking never fails a run. W&B is imported only when used.
"""

from ilf_lab.tracking.base import NullTracker, SafeTracker, Tracker, make_tracker, tracker_class

__all__ = ["Tracker", "NullTracker", "SafeTracker", "make_tracker", "tracker_class"]
