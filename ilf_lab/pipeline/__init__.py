"""The ILF stage DAG (run.py), one function per stage (stages.py) and the content-addressed cache (cache.py)."""

from ilf_lab.pipeline.run import run_experiment

__all__ = ["run_experiment"]
