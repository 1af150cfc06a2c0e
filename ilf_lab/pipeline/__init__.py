"""The ILF experiment: the DAG (dag.py) of declared stages (stages/), run through the stage cache (cache.py)."""

from ilf_lab.pipeline.experiment import run_experiment

__all__ = ["run_experiment"]
