"""One causal-LM fine-tuning core, used for both πRefine and πθ.

The model is built in `configure_model` (once per process, after Lightning has started the processes), so no
weights travel between processes and FSDP can wrap it. The loss is the summed next-token cross-entropy over
target tokens divided by the target tokens of the whole optimizer step (see `data.MicroBatch`): every target
token of a step weighs the same, however the step is split over micro-batches and ranks.

Logits are computed at scored positions only (transformers' `logits_to_keep` with a boolean mask): the vocab
projection and its (tokens × vocab) tensor are most of a step's memory traffic, and a refiner's targets are about
a sixth of its tokens. 1.66 × per micro-batch on SmolLM2 (benchmarks/training_step.py). Models without it get
full logits.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ilf_lab.config import OptimConfig, structured
from ilf_lab.training.data import IGNORE_INDEX


def as_optim_config(opt: Any) -> OptimConfig:
    """An `OptimConfig` from a DictConfig, a dict or the dataclass (unknown keys fail here, not mid-run)."""
    return structured(OptimConfig, opt)


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels shifted left by one: position t is scored on token t + 1 (as transformers does, but shifting the
    labels rather than the logits, so the big logits tensor is not copied)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token cross-entropy, number of scored tokens) from full (batch, seq, vocab) logits; positions
    labelled -100 are ignored."""
    shifted = next_token_labels(labels)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shifted != IGNORE_INDEX).sum()


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes a boolean `logits_to_keep` mask (transformers' causal LMs since
    `slice_logits_to_keep`; a PEFT model forwards it to its base model)."""
    import transformers.modeling_utils as mu

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(mu, "slice_logits_to_keep") and "logits_to_keep" in inspect.signature(base.forward).parameters


def scored_loss_sum(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    keep_logits: bool = True,
) -> torch.Tensor:
    """Summed next-token cross-entropy over the scored positions, computing logits only there when
    `keep_logits` (the same loss as `token_loss_sum` on full logits, up to float rounding)."""
    if not keep_logits:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return token_loss_sum(logits, labels)[0]
    shifted = next_token_labels(labels)
    scored = shifted != IGNORE_INDEX
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=scored
    ).logits  # (scored tokens, vocab)
    return F.cross_entropy(logits.float(), shifted[scored], reduction="sum")


def lr_factor(step: int, warmup_steps: int, total_steps: int, scheduler: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then linear/cosine/constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown scheduler {scheduler!r} (linear | cosine | constant)")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; no weight decay on biases and norms (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class CausalLMModule(pl.LightningModule):
    """Fine-tunes a HF causal LM on prompt -> target examples (full fine-tuning or LoRA, by `opt.lora`).

    Besides training it keeps the numbers `finetune` reports: per optimizer step the loss (mean over the step's
    target tokens, all ranks), its wall time and its tokens, and the totals of processed, non-padding and target
    tokens.
    """

    def __init__(self, model_path: str, opt: Any = None, dtype: str = "float32") -> None:
        super().__init__()
        opt = as_optim_config(opt)
        self.save_hyperparameters({"model_path": model_path, "opt": dataclasses.asdict(opt), "dtype": dtype})
        self.model_path, self.opt, self.dtype_name = model_path, opt, dtype
        self.model: torch.nn.Module | None = None
        self.keep_logits = False
        self._reset_stats()

    # ---------------------------------------------------------------------------------------- model

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from ilf_lab.models.loading import load_model

        model, _ = load_model(self.model_path, self.dtype_name)
        if self.opt.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lora = self.opt.lora
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=list(lora.target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
        model.train()
        self.model = model
        self.keep_logits = keeps_logits(model)

    def hf_model(self) -> torch.nn.Module:
        """The plain transformers model to save: LoRA adapters merged into the base weights (in place)."""
        if self.opt.lora.enabled and hasattr(self.model, "merge_and_unload"):
            self.model = self.model.merge_and_unload()
        return self.model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    # ---------------------------------------------------------------------------------------- optimisation

    def configure_optimizers(self) -> dict:
        opt = self.opt
        optimizer = torch.optim.AdamW(param_groups(self.model, opt.weight_decay), lr=opt.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(opt.warmup_ratio * total)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total, opt.scheduler)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self._step_t0 is None:
            self._step_t0 = time.perf_counter()
        loss_sum = scored_loss_sum(
            self.model, batch["input_ids"], batch["attention_mask"], batch["labels"], self.keep_logits
        )
        step_tokens = batch["step_target_tokens"].clamp(min=1)
        self._step_loss += (loss_sum.detach() / step_tokens).to(self._step_loss)
        self._step_counts += torch.stack(
            [
                torch.tensor(batch["input_ids"].numel(), device=self._step_counts.device),
                batch["attention_mask"].sum(),
                (batch["labels"] != IGNORE_INDEX).sum(),
            ]
        ).to(self._step_counts)
        # DDP averages gradients over ranks and Lightning divides by the accumulation: undo both, so the
        # gradient is that of (summed loss of the step) / (target tokens of the step).
        scale = self.trainer.world_size * self.trainer.accumulate_grad_batches
        return loss_sum / step_tokens * scale

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._stepping = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._stepping:
            return
        self._stepping = False
        now = time.perf_counter()
        seconds, self._step_t0 = now - self._step_t0, now  # the next step's clock includes loading its data
        # one all-reduce per optimizer step: loss, tokens, non-padding tokens, target tokens over all ranks
        totals = self.trainer.strategy.reduce(
            torch.cat([self._step_loss.view(1), self._step_counts.double()]), reduce_op="sum"
        )
        loss, tokens, useful, targets = (float(x) for x in totals)
        self._step_loss.zero_()
        self._step_counts.zero_()
        self.losses.append(loss)
        self.step_seconds.append(seconds)
        self.step_tokens.append(int(tokens))
        self.tokens += int(tokens)
        self.useful_tokens += int(useful)
        self.target_tokens += int(targets)
        metrics = {
            "train/loss": loss,
            "train/lr": self.trainer.optimizers[0].param_groups[0]["lr"],
            "train/useful_fraction": self.useful_tokens / max(1, self.tokens),
            "train/tokens_per_s": tokens / max(seconds, 1e-9),
        }
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, batch_size=1)
        self.log("loss", loss, on_step=True, prog_bar=True, logger=False, batch_size=1)

    # ---------------------------------------------------------------------------------------- bookkeeping

    def _reset_stats(self) -> None:
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []
        self.tokens = self.useful_tokens = self.target_tokens = 0
        self._step_loss = torch.zeros((), dtype=torch.float64)
        self._step_counts = torch.zeros(3, dtype=torch.float64)
        self._step_t0: float | None = None
        self._stepping = False

    def on_train_start(self) -> None:
        self._step_loss = self._step_loss.to(self.device)
        self._step_counts = self._step_counts.to(self.device)

    def on_train_epoch_start(self) -> None:
        self._step_t0 = None  # the epoch-end checkpoint does not count as training time


class RefinerModule(CausalLMModule):
    """πRefine. Same core; what differs is the data (`RefinerDataModule`)."""


class PolicyModule(CausalLMModule):
    """πθ. Same core; what differs is the data (`PolicyDataModule`)."""


MODULES: dict[str, type[CausalLMModule]] = {"refiner": RefinerModule, "policy": PolicyModule}
