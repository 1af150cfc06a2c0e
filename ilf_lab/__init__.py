"""ilf_lab: Imitation learning from Language Feedback (Chen et al. 2023) as a reproducible research harness."""

__version__ = "0.1.0"
