"""`finetune`: the one entry point the pipeline calls to train πRefine or πθ.

Multi-device runs on one node start their own worker processes (`torch.multiprocessing` spawn, one per device)
and tell Lightning that the processes already exist (`LOCAL_RANK` set, `LightningEnvironment`). Lightning's own
`ddp`/`fsdp` launcher re-executes `sys.argv` per rank, which under `python -m ilf_lab -m ...` would re-run the
whole Hydra sweep; its `ddp_spawn` would pickle the loaded model into every worker. Here only the tokenised
data and the configs travel; each worker loads the model itself. Multi-node runs must be started by the
cluster (srun / torchrun), which sets `LOCAL_RANK`; then everything runs in-process.

Precision: with a `*-mixed` trainer precision the weights train in fp32 (master weights; autocast computes in
bf16/fp16), whatever `model.dtype` says — AdamW updates of lr 5e-6 vanish in bf16 weights — and are saved in
`model.dtype`. `trainer.gradient_checkpointing` recomputes each decoder block's activations in the backward pass.

One module over ~400 lines: launching, the strategy (incl. CPU FSDP) and saving must agree on ranks and state
dicts, and are checked together.
FSDP shards the model by decoder block (the model's `_no_split_modules`); on CPU it runs over gloo (Lightning
itself accepts FSDP on GPUs only; torch's FSDP runs on CPU), which is how the preset is rehearsed without GPUs.

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
from pytorch_lightning.strategies import FSDPStrategy

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


def _strategy(name: str, world: int, tcfg: TrainerConfig | None = None, base_model: str | None = None) -> Any:
    """Lightning strategy for processes that already exist: ddp_spawn/ddp_fork/... become plain ddp; fsdp an
    FSDPStrategy wrapping each decoder block (see `_fsdp`)."""
    if world == 1 and (name == "auto" or name.startswith("ddp")):
        return "auto"
    if name == "auto" or name.startswith("ddp"):
        return "ddp"
    if name == "fsdp" and tcfg is not None and base_model is not None:
        return _fsdp(tcfg, base_model)
    return name


def block_names(base_model: str) -> set[str]:
    """Class names of the model's decoder blocks (transformers' `_no_split_modules`: what FSDP shards by and
    what activation checkpointing wraps), read from its config without loading weights."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(base_model)
    names: set[str] = set()
    for arch in cfg.architectures or []:
        names.update(getattr(getattr(transformers, arch, None), "_no_split_modules", None) or [])
    return names


def _fsdp(tcfg: TrainerConfig, base_model: str) -> Any:
    """FSDP sharded by decoder block, with activation checkpointing of each block when asked. Lightning accepts
    the strategy *name* on GPUs only; on CPU an instance of a subclass (torch's FSDP itself runs on CPU) over gloo."""
    import functools

    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    blocks = block_names(base_model)
    if not blocks:
        raise ConfigError(f"trainer.strategy=fsdp: {base_model} names no decoder block class to shard by")
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: type(m).__name__ in blocks)
    kw: dict[str, Any] = {"auto_wrap_policy": policy}
    if tcfg.gradient_checkpointing:
        kw["activation_checkpointing_policy"] = policy
    if _accelerator(tcfg.accelerator) == "cpu":
        return CPUFSDPStrategy(process_group_backend="gloo", **kw)
    return FSDPStrategy(**kw)


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy on CPU processes (gloo), to rehearse the FSDP path on a machine without GPUs.

    Two guards stand in the way, neither of them in FSDP's sharding itself: Lightning refuses the *name* "fsdp"
    without a GPU (it checks the exact class, so a subclass passes), and torch's FSDP picks the current
    accelerator unless given `device_id` (Lightning passes the CPU device's index: None). Here the model is
    wrapped with `device_id=cpu`; Lightning's setup then sees it wrapped and does the rest as on GPUs."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied above
        return super()._setup_model(model)

    # Lightning gathers full state dicts with offload_to_cpu=True, which on CPU frees the very storage it then
    # clones (a segfault in torch 2.13): the same gathers, without the offload

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with _full_state_dict(self.model):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        from pytorch_lightning.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with _full_state_dict(self.model):
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard (param id) layout, as Lightning stores it
                state = FullyShardedDataParallel.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, self.model)
            return state


def _full_state_dict(module: torch.nn.Module, rank0_only: bool = True) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.api import FullOptimStateDictConfig, FullStateDictConfig

    return FullyShardedDataParallel.state_dict_type(
        module=module,
        state_dict_type=StateDictType.FULL_STATE_DICT,
        state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


class FSDPClipGradNorm(pl.Callback):
    """Gradient clipping by global norm under FSDP: Lightning's `gradient_clip_val` refuses FSDP (the norm must
    be taken over all shards: FullyShardedDataParallel.clip_grad_norm_)."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, optimizer: Any) -> None:
        trainer.strategy.model.clip_grad_norm_(self.max_norm)


def train_dtype(dtype: str, precision: str) -> str:
    """The dtype the weights train in: fp32 master weights under mixed precision, else `model.dtype`."""
    return "float32" if precision.endswith("-mixed") else dtype


def check_trainer(trainer: Any) -> None:
    """What the trainer settings need from this machine, checked before anything runs (one line each)."""
    tcfg = as_trainer_config(trainer)
    if tcfg.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        hint = (
            " (on CPU: trainer.accelerator=cpu trainer.precision=32-true; FSDP then runs over gloo)"
            if tcfg.strategy == "fsdp"
            else " (use trainer=cpu, or trainer=ddp for several CPU processes)"
        )
        raise ConfigError(f"trainer.accelerator={tcfg.accelerator} but this machine has no CUDA GPU{hint}")
    if tcfg.strategy == "fsdp" and _accelerator(tcfg.accelerator) == "cpu" and tcfg.precision not in (
        "32-true", "32"
    ):
        raise ConfigError(
            f"trainer.strategy=fsdp on CPU runs in fp32 only: set trainer.precision=32-true "
            f"(got {tcfg.precision})"
        )


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

    @property
    def fsdp(self) -> bool:
        return self.trainer.strategy == "fsdp"


class ResumeCheckpoint(pl.callbacks.ModelCheckpoint):
    """`last.ckpt` after each epoch but the last (unless `last_epoch`): it is there to resume a killed training,
    and after the last epoch the HF checkpoint is written instead. The skipped write was 20 s of each of the
    default run's two trainings (SmolLM2: weights and AdamW state, 1.6 GB). ModelCheckpoint also writes
    `last.ckpt` at the end of training when it has linked none (a 1-epoch run, a resume into the last epoch):
    skipped too."""

    def __init__(self, last_epoch: bool, **kw: Any) -> None:
        super().__init__(**kw)
        self.last_epoch = last_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 == trainer.max_epochs
        if self.last_epoch or not last:
            super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.last_epoch:
            super().on_train_end(trainer, pl_module)


def build_trainer(job: _Job, logger: Any = None) -> pl.Trainer:
    """The Lightning Trainer of a job: preset from TrainerConfig, accumulation, clipping, `last.ckpt` per epoch."""
    from lightning_fabric.plugins.environments import LightningEnvironment

    from ilf_lab.logs import is_tty

    t = job.trainer
    plugins = [LightningEnvironment()] if job.spawned else None  # never mistake our workers for SLURM tasks
    callbacks: list[Any] = [  # every epoch: a killed training resumes from the last one (the stage cache keeps it)
        ResumeCheckpoint(
            t.checkpoint_last_epoch,
            dirpath=Path(job.out_dir) / "lightning",
            save_top_k=1,
            save_last="link",
            every_n_epochs=1,
        )
    ]
    bar = t.enable_progress_bar and is_tty()
    if t.enable_progress_bar and not bar:  # a log file: rate-limited lines instead of a bar
        callbacks.append(LogTrainingProgress(job.kind))
    clip = job.opt.grad_clip or None
    if job.fsdp and clip:
        callbacks.append(FSDPClipGradNorm(clip))
    return pl.Trainer(
        accelerator=_accelerator(t.accelerator),
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=_strategy(t.strategy, job.world, t, job.base_model),
        precision=t.precision,
        plugins=plugins,
        max_epochs=job.opt.epochs,
        accumulate_grad_batches=job.accumulate,
        gradient_clip_val=None if job.fsdp else clip,
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
        losses = getattr(module, "losses", None)
        loss = f", loss {losses[-1]:.3f}" if losses else ""
        self.lines.total = int(total) if total != float("inf") else 0
        self.lines.set_postfix_str(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}{loss}")
        self.lines.update(trainer.global_step - self.lines.n)

    def on_train_end(self, trainer: pl.Trainer, module: Any) -> None:
        if trainer.is_global_zero:
            self.lines.close()


def _save_hf(trainer: pl.Trainer, module: CausalLMModule, out_dir: Path, base_model: str, dtype: str) -> None:
    """save_pretrained of the trained weights (LoRA merged, in `dtype`) + the tokenizer, on rank 0."""
    from ilf_lab.models.loading import DTYPES, load_tokenizer

    state_dict = None
    if "fsdp" in type(trainer.strategy).__name__.lower():  # a collective: every rank takes part
        full = trainer.strategy.lightning_module_state_dict()
        state_dict = {k.removeprefix("model."): v.to(DTYPES[dtype]) for k, v in full.items()}
    if trainer.is_global_zero:
        model = module.hf_model()
        if state_dict is None and next(model.parameters()).dtype != DTYPES[dtype]:
            model = model.to(DTYPES[dtype])  # trained in fp32 master weights, saved as the model's dtype
        model.save_pretrained(out_dir, state_dict=state_dict)
        load_tokenizer(base_model).save_pretrained(out_dir)


def _module(job: _Job) -> CausalLMModule:
    """The job's LightningModule, training in `train_dtype`; with gradient checkpointing (outside FSDP, which
    wraps the blocks itself) each decoder block recomputes its activations in the backward pass."""
    cls = MODULES[job.kind]
    if job.trainer.gradient_checkpointing and not job.fsdp:
        cls = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
    return cls(job.base_model, job.opt, train_dtype(job.dtype, job.trainer.precision))


class _Checkpointed:
    def configure_model(self) -> None:
        had = self.model is not None
        super().configure_model()  # type: ignore[misc]
        if not had:
            kw = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x (the old name warns)
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _train(job: _Job, dm: CausalLMDataModule, logger: Any = None) -> CausalLMModule:
    """One process's share of the run; rank 0 writes the HF checkpoint and the result file."""
    pl.seed_everything(job.seed, workers=True, verbose=False)
    module = _module(job)
    trainer = build_trainer(job, logger)
    trainer.fit(module, datamodule=dm, ckpt_path=job.ckpt_path)
    out = Path(job.out_dir)
    _save_hf(trainer, module, out, job.base_model, job.dtype)
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


def check_lora_targets(kind: str, targets: Sequence[str], base_model: str) -> None:
    """LoRA's target modules must name layers of this model (the default names Llama's q/k/v/o projections;
    CodeGen has one fused `qkv_proj` and `out_proj`): one line at start instead of PEFT's error in a worker."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    if not set(targets) & set(linear):
        raise ConfigError(
            f"{kind}.lora.target_modules={list(targets)} names no layer of this {cfg.model_type} model; its linear "
            f"layers: {', '.join(linear)} (e.g. {kind}.lora.target_modules=[{','.join(linear[:2])}])"
        )


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

    check_trainer(trainer)
    opt, tcfg = as_optim_config(opt), as_trainer_config(trainer)
    if opt.lora.enabled:
        check_lora_targets(kind, opt.lora.target_modules, base_model)
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
        # Lightning's deterministic=True turns torch.use_deterministic_algorithms on for the whole process and
        # leaves it on (it also fills fresh tensors with NaN); later stages in this process must not inherit it
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        try:
            _train(job, dm, logger)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
    return TrainResult(**json.loads(result_file.read_text()))
