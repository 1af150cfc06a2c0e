"""Fine-tuning πRefine and πθ with PyTorch Lightning (one causal-LM core, two data formats)."""

from ilf_lab.training.data import (
    MicroBatchSampler,
    PolicyDataModule,
    PolicyRecord,
    RefinerDataModule,
    RefinerRecord,
)
from ilf_lab.training.finetune import TrainResult, build_trainer, finetune
from ilf_lab.training.module import CausalLMModule, PolicyModule, RefinerModule

__all__ = [
    "CausalLMModule",
    "MicroBatchSampler",
    "PolicyDataModule",
    "PolicyModule",
    "PolicyRecord",
    "RefinerDataModule",
    "RefinerModule",
    "RefinerRecord",
    "TrainResult",
    "build_trainer",
    "finetune",
]
