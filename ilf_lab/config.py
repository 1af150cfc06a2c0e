"""Typed schema of the whole config tree.

Hydra merges every YAML of `conf/` into these dataclasses, so a key that does not exist or a value of the wrong
type fails at composition. Ranges and choices are checked by `validate()` right after, before anything runs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ilf_lab.errors import ConfigError  # noqa: E402  (re-exported)


@dataclass
class PathsConfig:
    # shared by all runs that point at it: stage artifacts are keyed by content, not by run
    cache_dir: str = "${oc.env:ILF_LAB_CACHE_DIR,${hydra:runtime.cwd}/.cache/ilf_lab}"
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class SplitsConfig:
    # inclusive MBPP task_id ranges (the paper's: prompt 1-10, test 11-110, refine 111-310, train 311-974)
    prompt: list[int] = field(default_factory=lambda: [1, 10])
    test: list[int] = field(default_factory=lambda: [11, 110])
    refine: list[int] = field(default_factory=lambda: [111, 310])
    train: list[int] = field(default_factory=lambda: [311, 974])


@dataclass
class DataConfig:
    # local directory with mbpp/mbpp.jsonl and ilf/surge_annotations.jsonl; null = load from the hub
    dir: str | None = "${oc.env:ILF_LAB_DATA_DIR,null}"
    hub_id: str = "google-research-datasets/mbpp"
    hub_config: str = "full"
    annotations_url: str = (
        "https://raw.githubusercontent.com/nyu-mll/ILF-for-code-generation/main/surge_annotations.jsonl"
    )
    annotations_file: str | None = None  # a new annotation file (same schema), e.g. from `ilf_lab.annotate`
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    # subsets for smaller scales: the first N tasks of each split (null = all)
    max_test_tasks: int | None = None
    max_refine_tasks: int | None = None
    max_train_tasks: int | None = None
    # the paper's filters on the human annotations
    require_refinement_passes: bool = True
    max_edit_distance: float = 0.5
    one_per_task: bool = True


@dataclass
class ModelConfig:
    name: str = MISSING
    # hub: a hub id or local dir; gguf: a .gguf inside an installed package or dir; tiny_random: built locally
    source: str = "hub"
    path: str = ""
    gguf_file: str | None = None
    gguf_package: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    prompt_format: str = "chat"  # chat (instruct models) | docstring (the paper's, base models)
    trust_remote_code: bool = False
    # tiny_random architecture (ignored by other sources)
    tiny_hidden_size: int = 64
    tiny_layers: int = 2
    tiny_heads: int = 4
    tiny_tokenizer: str = "gpt2_bytes"


@dataclass
class FeedbackConfig:
    _target_: str = "ilf_lab.pipeline.stages.feedback.HumanFeedback"  # the feedback stage's implementation
    name: str = "human"
    provider: str = "human"  # human | llm
    shots: int = 0  # k for the llm provider (k-shot from MBPPRefine's human annotations)
    backend: str = "hf"  # hf (local model through the sampling engine) | openai (any compatible endpoint)
    model: str | None = None  # hf: a model config name or path (null = the base model); openai: model name
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 4
    max_retries: int = 5
    temperature: float = 0.0
    max_new_tokens: int = 256
    num_tasks: int | None = None  # Fig. 4: feedback on only the first k tasks of MBPPTrain
    shuffle: bool = False  # Table 2: give each MBPPTrain task another task's human feedback (a derangement)


@dataclass
class TrainOnConfig:
    _target_: str = "ilf_lab.pipeline.stages.train.Refinements"  # a FineTuningData source
    source: str = "refinements"  # refinements | mbpp_gold | human_refinements | none


@dataclass
class X0Config:
    _target_: str = "ilf_lab.pipeline.stages.x0.AnnotatedX0"  # the x0 stage's implementation
    source: str = "annotations"  # annotations (the paper's x0) | policy (Algorithm 1 step 2: own failing samples)
    n: int = 4
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 256


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimConfig:
    """One fine-tuning run (πRefine or πθ*)."""

    lr: float = 5e-6
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    scheduler: str = "linear"  # linear | cosine | constant
    batch_size: int = 32  # effective batch, in examples (micro_batch_size x accumulation x devices)
    micro_batch_size: int = 4
    epochs: int = 2
    max_length: int = 1024
    grad_clip: float = 1.0
    pack: bool = True  # length-bucketed batches; no padding to max_length
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class RefineConfig:
    """Sampling refinements x1 from πRefine on MBPPTrain."""

    refiner: str = "trained"  # trained (πRefine) | base (the base model, zero-shot: Tables 2-3)
    n: int = 30
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512


@dataclass
class SamplingConfig:
    """Final evaluation on MBPPTest (the paper: 30 samples at T=0.8)."""

    engine: str = "hf"  # hf | vllm
    n: int = 30
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int | None = None  # sequences per forward; null = chosen from memory


@dataclass
class ExecutionConfig:
    timeout: float = 10.0
    workers: int | None = None  # null = CPU count
    comparison: str = "exact"  # exact (MBPP's asserts) | approx (the ILF reference's pytest.approx)
    memory_mb: int = 4096


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 10])
    split: str = "test"  # test (MBPPTest, the paper's numbers) | refine (model selection, App. A.1)
    benchmarks: list[str] = field(default_factory=lambda: ["mbpp"])  # add humaneval for transfer (issue 9)
    humaneval_max_problems: int | None = None  # the first N of HumanEval's 164 (null = all)
    perplexity: bool = False  # Figure 3: perplexity of the fine-tuning sources under the base model


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    log_every_n_steps: int = 1
    enable_progress_bar: bool = True
    deterministic: bool = True


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "ilf_lab"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None  # null = derived from the sweep
    tags: list[str] = field(default_factory=list)
    dir: str = "${paths.output_dir}"


@dataclass
class Config:
    name: str = "ilf"  # the Table 4 row; results.json's `experiment`
    scale: str = "demo"
    seed: int = 0
    rounds: int = 1  # iterative ILF: repeat x0 -> refine -> train with the improved policy
    stop_after: str | None = None  # end the run after this stage (analyses of refinements need no policy)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    train_on: TrainOnConfig = field(default_factory=TrainOnConfig)
    x0: X0Config = field(default_factory=X0Config)
    refiner: OptimConfig = field(default_factory=OptimConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    policy: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


_NO_DEFAULT = object()


def default_of(path: str) -> Any:
    """The schema's default for a dotted config path (stage keys leave values at their default out)."""
    node: Any = Config()
    for part in path.split("."):
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            return _NO_DEFAULT
        node = getattr(node, part)
    return node


def structured(cls: type, value: Any) -> Any:
    """A `cls` dataclass from a DictConfig, a dict, another dataclass or None (unknown keys fail here, not mid-run)."""
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), value if value is not None else {}))


# overrides that do not change what a Table 4 row measures: which row / model / scale (group choices, shown in the
# table), the seed, and where or how fast it runs. The report groups runs with these ignored.
_REPORT_NEUTRAL_EXACT = frozenset(
    {
        "experiment", "feedback", "train_on", "model", "scale", "seed", "name", "data.dir",
        "sampling.engine", "sampling.batch_size", "execution.workers", "execution.timeout",
        "execution.memory_mb", "eval", "eval.benchmarks", "eval.perplexity", "eval.humaneval_max_problems",
        "feedback.backend", "feedback.model", "feedback.base_url", "feedback.api_key_env",
        "feedback.max_concurrency", "feedback.max_retries", "trainer",
    }
)
_REPORT_NEUTRAL_PREFIXES = ("logger", "paths", "hydra", "trainer")


def is_report_neutral(key: str) -> bool:
    """True for a config key (as written in an override) whose value does not change what a run measures."""
    key = key.lstrip("+~").split("=", 1)[0]
    return key in _REPORT_NEUTRAL_EXACT or any(key == p or key.startswith(p + ".") for p in _REPORT_NEUTRAL_PREFIXES)


def register_configs() -> None:
    """Register the schema; conf/config.yaml lists it first, so every group's YAML is merged into it."""
    ConfigStore.instance().store(name="config_schema", node=Config)


# ----------------------------------------------------------------------------------------- value checks

# the pipeline's stages in order (ilf_lab/pipeline/run.py); `stop_after` may name any but the last
STAGES = ("tasks", "x0", "feedback", "train_refiner", "refine", "train_policy", "evaluate")

_CHOICES: dict[str, tuple[str | None, ...]] = {
    "model.source": ("hub", "gguf", "tiny_random"),
    "model.prompt_format": ("chat", "docstring"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "feedback.provider": ("human", "llm"),
    "feedback.backend": ("hf", "openai"),
    "train_on.source": ("refinements", "mbpp_gold", "human_refinements", "none"),
    "x0.source": ("annotations", "policy"),
    "refine.refiner": ("trained", "base"),
    "stop_after": (None, *STAGES[:-1]),
    "refiner.scheduler": ("linear", "cosine", "constant"),
    "policy.scheduler": ("linear", "cosine", "constant"),
    "sampling.engine": ("hf", "vllm"),
    "execution.comparison": ("exact", "approx"),
    "eval.split": ("test", "refine"),
    "logger.name": ("wandb", "none"),
    "trainer.accelerator": ("cpu", "gpu", "cuda", "mps", "auto"),
    "trainer.precision": ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"),
    "trainer.strategy": ("auto", "ddp", "ddp_spawn", "fsdp"),
    "logger.mode": ("offline", "online", "disabled"),
}

# key -> (low, high, low_inclusive); None = unbounded
_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "rounds": (1, None, True),
    "x0.n": (1, None, True),
    "x0.temperature": (0.0, None, True),
    "x0.max_new_tokens": (1, None, True),
    "refine.n": (1, None, True),
    "refine.temperature": (0.0, None, True),
    "refine.top_p": (0.0, 1.0, False),
    "refine.max_new_tokens": (1, None, True),
    "sampling.n": (1, None, True),
    "sampling.temperature": (0.0, None, True),
    "sampling.top_p": (0.0, 1.0, False),
    "sampling.max_new_tokens": (1, None, True),
    "sampling.batch_size": (1, None, True),
    "execution.timeout": (0.0, None, False),
    "execution.workers": (1, None, True),
    "execution.memory_mb": (64, None, True),
    "feedback.shots": (0, 2, True),
    "feedback.max_concurrency": (1, None, True),
    "feedback.max_retries": (0, None, True),
    "feedback.temperature": (0.0, None, True),
    "feedback.max_new_tokens": (1, None, True),
    "feedback.num_tasks": (1, None, True),
    "data.max_edit_distance": (0.0, 1.0, True),
    "eval.humaneval_max_problems": (1, 164, True),
    "data.max_test_tasks": (1, None, True),
    "data.max_refine_tasks": (1, None, True),
    "data.max_train_tasks": (1, None, True),
    "model.tiny_hidden_size": (8, None, True),
    "model.tiny_layers": (1, None, True),
    "model.tiny_heads": (1, None, True),
    "trainer.num_nodes": (1, None, True),
}
for _stage in ("refiner", "policy"):
    _RANGES.update(
        {
            f"{_stage}.lr": (0.0, None, False),
            f"{_stage}.weight_decay": (0.0, None, True),
            f"{_stage}.warmup_ratio": (0.0, 1.0, True),
            f"{_stage}.batch_size": (1, None, True),
            f"{_stage}.micro_batch_size": (1, None, True),
            f"{_stage}.epochs": (0, None, True),
            f"{_stage}.max_length": (16, None, True),
            f"{_stage}.grad_clip": (0.0, None, True),
            f"{_stage}.lora.r": (1, None, True),
        }
    )


def validate(cfg: DictConfig) -> None:
    """Check choices and ranges; raise ConfigError naming the first bad key."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")
    for key, (low, high, low_incl) in _RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if low is not None and (value < low if low_incl else value <= low):
            raise ConfigError(f"{key}={value} must be {'>=' if low_incl else '>'} {low}")
        if high is not None and value > high:
            raise ConfigError(f"{key}={value} must be <= {high}")
    devices = cfg.trainer.devices
    ok = (
        devices == "auto"
        or (isinstance(devices, int) and devices >= 1)
        or (OmegaConf.is_list(devices) and all(isinstance(d, int) and d >= 0 for d in devices))
    )
    if not ok:
        raise ConfigError(f"trainer.devices={devices!r} must be an int >= 1, a list of device ids, or auto")
    for stage in ("refiner", "policy"):
        opt = cfg[stage]
        if opt.batch_size % opt.micro_batch_size:
            raise ConfigError(
                f"{stage}.batch_size={opt.batch_size} must be a multiple of "
                f"{stage}.micro_batch_size={opt.micro_batch_size}"
            )
    for name, rng in cfg.data.splits.items():
        if len(rng) != 2 or rng[0] > rng[1]:
            raise ConfigError(f"data.splits.{name}={list(rng)} must be [first_task_id, last_task_id]")
    for k in cfg.eval.ks:
        if k < 1:
            raise ConfigError(f"eval.ks contains {k}; each k must be >= 1")
    for b in cfg.eval.benchmarks:
        if b not in ("mbpp", "humaneval"):
            raise ConfigError(f"eval.benchmarks contains {b!r}; choose from mbpp, humaneval")
    if cfg.feedback.provider == "llm" and cfg.feedback.shots < 1:
        raise ConfigError("feedback.shots must be 1 or 2 for feedback.provider=llm")
    if cfg.feedback.provider == "human" and cfg.x0.source != "annotations":
        raise ConfigError(
            "x0.source=policy needs feedback on the policy's own programs: use feedback=instructgpt_1shot/2shot, "
            "or collect human feedback with `python -m ilf_lab.annotate` and run with x0=annotations "
            "data.annotations_file=<the imported file> (its records carry the policy's x0)"
        )
    if cfg.feedback.shuffle and cfg.feedback.provider != "human":
        raise ConfigError(
            "feedback.shuffle=true shuffles human feedback; the llm provider writes its own refinements"
        )
    if cfg.refine.refiner == "base" and cfg.feedback.provider != "human":
        raise ConfigError(
            "refine.refiner=base refines with human feedback; the llm provider writes its own refinements"
        )
    if cfg.rounds > 1 and cfg.feedback.provider != "llm":
        raise ConfigError("rounds>1 needs fresh feedback each round: use an llm feedback option")
    if cfg.feedback.backend == "openai" and cfg.feedback.provider == "llm" and not cfg.feedback.base_url:
        raise ConfigError("feedback.base_url is required for feedback.backend=openai")
