"""`finetune`: the one entry point the pipeline calls to train πRefine or πθ.

Multi-device runs on one node start their own worker processes (`torch.multiprocessing` spawn, one per device)
and tell Lightning that the processes already exist (`LOCAL_RANK` set, `LightningEnvironment`). Lightning's own
`ddp`/`fsdp` launcher re-executes `sys.argv` per rank, which under `python -m ilf_lab -m ...` would re-run the
whole Hydra sweep; its `ddp_spawn` would pickle the loaded model into every worker. Here only the tokenised
data and the configs travel; each worker loads the model itself. Multi-node runs must be started by the
cluster (srun / torchrun), which sets `LOCAL_RANK`; then everything runs in-process.

Output: `out_dir/` is a Hugging Face checkpoint (LoRA merged), loadable by `load_model` and vLLM;
`out_dir/lightning/last.ckpt` resumes an interrupted run; `out_dir/train_result.json` is the `TrainResult`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ilf_lab.config import OptimConfig, TrainerConfig, structured
from ilf_lab.errors import ConfigError
from ilf_lab.training.data import DATAMODULES, CausalLMDataModule, PolicyRecord, RefinerRecord
from ilf_lab.training.module import MODULES, CausalLMModule, as_optim_config

log = logging.getLogger(__name__)

RESULT_FILE = "train_result.json"


@dataclass
class TrainResult:
    """What one fine-tuning run did. Token counts are summed over all ranks and epochs."""

    steps: int  # optimizer steps
    epochs: int
    examples: int  # examples trained on (after dropping those whose target does not fit)
    tokens: int  # tokens processed, padding included
    target_tokens: int  # tokens with a loss
    useful_fraction: float  # non-padding share of `tokens`
    seconds: float  # time in optimizer steps (excludes model loading, process start, checkpoint writing)
    tokens_per_s: float
    losses: list[float]  # per optimizer step: mean loss over the step's target tokens
    checkpoint: str  # HF-format directory
    dropped: int = 0  # examples whose target could not fit in max_length
    truncated: int = 0  # examples whose prompt (OLD CODE first) was shortened
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    step_tokens: list[int] = field(default_factory=list)  # tokens processed in each optimizer step


def as_trainer_config(trainer: Any) -> TrainerConfig:
    return structured(TrainerConfig, trainer)


def _accelerator(name: str) -> str:
    if name == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return name


def _local_devices(tcfg: TrainerConfig) -> int:
    """Processes on this node: devices=2 -> 2, [0, 3] -> 2, -1/'auto' -> all GPUs (1 on CPU)."""
    devices = tcfg.devices
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if devices in ("auto", -1, "-1"):
        return torch.cuda.device_count() if _accelerator(tcfg.accelerator) == "gpu" else 1
    return int(devices)


def _strategy(name: str, world: int) -> str:
    """Lightning strategy for processes that already exist: ddp_spawn/ddp_fork/... become plain ddp."""
    if world == 1 and (name == "auto" or name.startswith("ddp")):
        return "auto"
    if name == "auto" or name.startswith("ddp"):
        return "ddp"
    return name


def accumulation(opt: OptimConfig, world: int) -> int:
    """Micro-batches per optimizer step so that micro_batch_size x accumulation x world = batch_size."""
    per_pass = opt.micro_batch_size * world
    if opt.batch_size % per_pass:
        raise ConfigError(
            f"batch_size={opt.batch_size} must be a multiple of micro_batch_size={opt.micro_batch_size} "
            f"x {world} processes"
        )
    return opt.batch_size // per_pass


@dataclass
class _Job:
    """Everything a training process needs (picklable; no model weights)."""

    kind: str
    base_model: str
    out_dir: str
    opt: OptimConfig
    trainer: TrainerConfig
    seed: int
    dtype: str
    accumulate: int
    world: int
    ckpt_path: str | None
    spawned: bool = False


def build_trainer(job: _Job, logger: Any = None) -> pl.Trainer:
    """The Lightning Trainer of a job: preset from TrainerConfig, accumulation, clipping, `last.ckpt` per epoch."""
    from lightning_fabric.plugins.environments import LightningEnvironment
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ilf_lab.logs import is_tty

    t = job.trainer
    plugins = [LightningEnvironment()] if job.spawned else None  # never mistake our workers for SLURM tasks
    callbacks: list[Any] = [  # every epoch: a killed training resumes from the last one (the stage cache keeps it)
        ModelCheckpoint(dirpath=Path(job.out_dir) / "lightning", save_top_k=1, save_last="link", every_n_epochs=1)
    ]
    bar = t.enable_progress_bar and is_tty()
    if t.enable_progress_bar and not bar:  # a log file: rate-limited lines instead of a bar
        callbacks.append(LogTrainingProgress(job.kind))
    return pl.Trainer(
        accelerator=_accelerator(t.accelerator),
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(t.strategy, job.world),
        precision=t.precision,
        plugins=plugins,
        max_epochs=job.opt.epochs,
        accumulate_grad_batches=job.accumulate,
        gradient_clip_val=job.opt.grad_clip or None,
        logger=logger if logger is not None else False,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=bar,
        enable_model_summary=False,
        deterministic=t.deterministic,
        callbacks=callbacks,
        default_root_dir=str(Path(job.out_dir) / "lightning"),
        use_distributed_sampler=False,  # MicroBatchSampler shards by rank itself
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


class LogTrainingProgress(pl.Callback):
    """Training progress as log lines (epoch, optimizer step, loss) at most every ILF_LAB_PROGRESS_SECONDS."""

    def __init__(self, kind: str) -> None:
        from ilf_lab.logs import LogProgress

        self.kind, self.lines = kind, LogProgress(0, f"training {kind}", "steps")

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        if not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        losses = getattr(module, "losses", None) or [float("nan")]
        self.lines.total = int(total) if total != float("inf") else 0
        self.lines.set_postfix_str(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}, loss {losses[-1]:.3f}")
        self.lines.update(trainer.global_step - self.lines.n)

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        if trainer.is_global_zero:
            self.lines.close()


def _save_hf(trainer: pl.Trainer, module: CausalLMModule, out_dir: Path, base_model: str) -> None:
    """save_pretrained of the trained weights (LoRA merged) + the tokenizer, on rank 0."""
    from ilf_lab.models.loading import load_tokenizer

    state_dict = None
    if "fsdp" in type(trainer.strategy).__name__.lower():  # a collective: every rank takes part
        full = trainer.strategy.lightning_module_state_dict()
        state_dict = {k.removeprefix("model."): v for k, v in full.items()}
    if trainer.is_global_zero:
        module.hf_model().save_pretrained(out_dir, state_dict=state_dict)
        load_tokenizer(base_model).save_pretrained(out_dir)


def _train(job: _Job, dm: CausalLMDataModule, logger: Any = None) -> CausalLMModule:
    """One process's share of the run; rank 0 writes the HF checkpoint and the result file."""
    pl.seed_everything(job.seed, workers=True, verbose=False)
    module = MODULES[job.kind](job.base_model, job.opt, job.dtype)
    trainer = build_trainer(job, logger)
    trainer.fit(module, datamodule=dm, ckpt_path=job.ckpt_path)
    out = Path(job.out_dir)
    _save_hf(trainer, module, out, job.base_model)
    if trainer.is_global_zero:
        seconds = sum(module.step_seconds)
        result = TrainResult(
            steps=trainer.global_step,
            epochs=trainer.current_epoch,
            examples=len(dm.examples),
            tokens=module.tokens,
            target_tokens=module.target_tokens,
            useful_fraction=module.useful_tokens / max(1, module.tokens),
            seconds=seconds,
            tokens_per_s=module.tokens / seconds if seconds else 0.0,
            losses=module.losses,
            checkpoint=str(out),
            dropped=dm.dropped,
            truncated=dm.truncated,
            step_seconds=module.step_seconds,
            step_tokens=module.step_tokens,
        )
        (out / RESULT_FILE).write_text(json.dumps(dataclasses.asdict(result), indent=1))
    trainer.strategy.barrier()
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(local_rank: int, job: _Job, dm: CausalLMDataModule, logger: Any, port: int) -> None:
    """Entry of a spawned training process: rank from the spawn index, rendezvous on localhost."""
    os.environ.update(
        LOCAL_RANK=str(local_rank),
        NODE_RANK="0",
        WORLD_SIZE=str(job.world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    sys.argv = sys.argv[:1]  # nothing in a worker may see (or re-run) the sweep's overrides
    if _accelerator(job.trainer.accelerator) == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.world))
    _train(job, dm, logger)


def _spawn(job: _Job, dm: CausalLMDataModule, logger: Any) -> None:
    import torch.multiprocessing as mp

    log.info("training on %d processes (spawned; sys.argv is not re-executed)", job.world)
    mp.start_processes(
        _worker, args=(job, dm, logger, _free_port()), nprocs=job.world, start_method="spawn", join=True
    )


def _save_untrained(job: _Job) -> None:
    from ilf_lab.models.loading import load_model

    model, tok = load_model(job.base_model, job.dtype)
    model.save_pretrained(job.out_dir)
    tok.save_pretrained(job.out_dir)


def finetune(
    kind: str,
    records: Sequence[RefinerRecord | PolicyRecord],
    base_model: str,
    out_dir: str | Path,
    opt: Any,
    trainer: Any,
    *,
    prompt_format: str,
    seed: int = 0,
    logger: Any = None,
    dtype: str = "float32",
    resume: bool = True,
) -> TrainResult:
    """Fine-tune `base_model` on `records` and write `out_dir/` as a HF checkpoint.

    kind: "refiner" (RefinerRecord: task, x0, feedback -> refinement) or "policy" (PolicyRecord: task -> program).
    opt / trainer: OptimConfig / TrainerConfig, as dataclasses, dicts or DictConfigs.
    resume: continue from `out_dir/lightning/last.ckpt` if an earlier run into the same dir did not finish.
    """
    if kind not in MODULES:
        raise ConfigError(f"kind={kind!r} is not one of {', '.join(MODULES)}")
    from ilf_lab.models.loading import load_tokenizer

    opt, tcfg = as_optim_config(opt), as_trainer_config(trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    local = _local_devices(tcfg)
    world = local * tcfg.num_nodes
    accumulate = accumulation(opt, world)

    last, result_file = out / "lightning" / "last.ckpt", out / RESULT_FILE
    ckpt_path = None
    if result_file.exists() or not resume:  # a finished run (or a fresh start asked for): start over
        result_file.unlink(missing_ok=True)
        shutil.rmtree(out / "lightning", ignore_errors=True)
    elif last.exists():
        ckpt_path = str(last)
        log.warning("resuming the unfinished run in %s from %s", out, last)

    dm = DATAMODULES[kind](
        records,
        load_tokenizer(base_model),
        prompt_format,
        opt.max_length,
        opt.micro_batch_size,
        accumulate,
        seed,
        bucket=opt.pack,
    )
    spawn = local > 1 and tcfg.num_nodes == 1 and "LOCAL_RANK" not in os.environ
    job = _Job(
        kind, base_model, str(out), opt, tcfg, seed, dtype, accumulate, world, ckpt_path, spawned=spawn
    )

    if not dm.examples or opt.epochs == 0:
        log.warning(
            "nothing to train on (%d examples, %d epochs): saving the base model",
            len(dm.examples),
            opt.epochs,
        )
        _save_untrained(job)
        return TrainResult(
            0, 0, len(dm.examples), 0, 0, 0.0, 0.0, 0.0, [], str(out), dm.dropped, dm.truncated
        )
    if spawn:
        _spawn(job, dm, logger)
    else:
        _train(job, dm, logger)
    return TrainResult(**json.loads(result_file.read_text()))
