"""Typed schema of the whole config tree.

Hydra merges every YAML of `conf/` into these dataclasses, so a key that does not exist or a value of the wrong
type fails at composition. Ranges and choices are checked by `validate()` right after, before anything runs.

One module over the usual ~400 lines: it is the whole schema, and every check lives on its field, so a reader
finds a setting, its default and its range in one place.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from ilf_lab.errors import ConfigError  # noqa: E402  (re-exported)

# ------------------------------------------------------------------ checks declared on the fields themselves


def choice(default: Any, *options: Any) -> Any:
    """A field whose value must be one of `options`."""
    return field(default=default, metadata={"choices": options})


def num(default: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """A finite number in [lo, hi] (lo excluded with lo_open); null allowed when the default is null."""
    return field(default=default, metadata={"range": (lo, hi, lo_open)})


def implementation(default: str, base: str) -> Any:
    """A `_target_`: the dotted path of a class that must subclass `base` (the plug point's interface)."""
    return field(default=default, metadata={"base": base})


def neutral(spec: Any, subtree: bool = False) -> Any:
    """Marks a field whose value does not change what a run measures (where or how fast it runs, or which
    Table 4 row it is, shown in the table anyway): the report groups runs with it ignored. On a group node it
    covers the group's choice (`feedback=human`) and, with `subtree`, every key below it (`trainer.devices`)."""
    if not isinstance(spec, dataclasses.Field):
        spec = field(default=spec)
    spec.metadata = types.MappingProxyType({**spec.metadata, "neutral": "subtree" if subtree else True})
    return spec


# sizes that allocate memory in proportion fail at start above these, not with a huge allocation mid-run
MAX_SAMPLES = 1000  # samples per prompt (the paper: 30)
MAX_NEW_TOKENS = 32768

# preset groups without a schema field of their own: choosing one picks the row, shown in the table
PRESET_GROUPS = ("experiment",)


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
    dir: str | None = neutral("${oc.env:ILF_LAB_DATA_DIR,null}")
    hub_id: str = "google-research-datasets/mbpp"
    hub_config: str = "full"
    annotations_url: str = (
        "https://raw.githubusercontent.com/nyu-mll/ILF-for-code-generation/main/surge_annotations.jsonl"
    )
    annotations_file: str | None = None  # a new annotation file (same schema), e.g. from `ilf_lab.annotate`
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    # subsets for smaller scales: the first N tasks of each split (null = all)
    max_test_tasks: int | None = num(None, 1)
    max_refine_tasks: int | None = num(None, 1)
    max_train_tasks: int | None = num(None, 1)
    # the released 195 annotations are the paper's final set (§3): used as they are by default. Opt-in filters:
    # max_edit_distance re-applies the paper's rule (Levenshtein / max length, computed from the programs)
    require_refinement_passes: bool = True
    max_edit_distance: float | None = num(None, 0.0, 1.0, lo_open=True)
    one_per_task: bool = True


@dataclass
class ModelConfig:
    name: str = MISSING
    # hub: a hub id or local dir; gguf: a .gguf inside an installed package or dir; tiny_random (a Llama) and
    # tiny_codegen (CodeGen-Mono's architecture): random, built locally in seconds
    source: str = choice("hub", "hub", "gguf", "tiny_random", "tiny_codegen")
    path: str = ""
    gguf_file: str | None = None
    gguf_package: str | None = None
    revision: str | None = None
    dtype: str = choice("float32", "float32", "bfloat16", "float16")
    prompt_format: str = choice("chat", "chat", "docstring")  # chat (instruct models) | docstring (the paper's)
    trust_remote_code: bool = False
    # tiny_random / tiny_codegen architecture (ignored by other sources)
    tiny_hidden_size: int = num(64, 8)
    tiny_layers: int = num(2, 1)
    tiny_heads: int = num(4, 1)
    tiny_tokenizer: str = "gpt2_bytes"


@dataclass
class FeedbackConfig:
    _target_: str = implementation(
        "ilf_lab.pipeline.stages.feedback.HumanFeedback", "ilf_lab.pipeline.stages.feedback.FeedbackStage"
    )
    name: str = "human"
    provider: str = choice("human", "human", "llm")
    shots: int = num(0, 0, 2)  # k for the llm provider (k-shot from MBPPRefine's human annotations)
    # hf (local model through the sampling engine) | openai (any compatible endpoint)
    backend: str = neutral(choice("hf", "hf", "openai"))
    model: str | None = neutral(None)  # hf: a hub id or local dir (null = the base model); openai: model name
    base_url: str | None = neutral(None)
    api_key_env: str = neutral("OPENAI_API_KEY")
    max_concurrency: int = neutral(num(4, 1))
    max_retries: int = neutral(num(5, 0))
    n: int = num(1, 1, MAX_SAMPLES)  # replies (feedback + refinement) per x0; the refine stage keeps one passing per task
    temperature: float = num(0.0, 0.0)
    top_p: float = num(0.95, 0.0, 1.0, lo_open=True)  # the paper names none: scale=paper sets 1.0
    max_new_tokens: int = num(256, 1, MAX_NEW_TOKENS)
    num_tasks: int | None = num(None, 1)  # Fig. 4: feedback on only the first k tasks of MBPPTrain
    shuffle: bool = False  # Table 2: give each MBPPTrain task another task's human feedback (a derangement)


@dataclass
class TrainOnConfig:
    _target_: str = implementation(
        "ilf_lab.pipeline.stages.train.Refinements", "ilf_lab.pipeline.stages.train.FineTuningData"
    )
    source: str = "refinements"  # the row's label in results.json: refinements | mbpp_gold | human_refinements | none


@dataclass
class X0Config:
    _target_: str = implementation("ilf_lab.pipeline.stages.x0.AnnotatedX0", "ilf_lab.pipeline.stages.x0.X0Stage")
    source: str = "annotations"  # annotations (the paper's x0) | policy (Algorithm 1 step 2: own failing samples)
    n: int = num(4, 1, MAX_SAMPLES)
    temperature: float = num(0.8, 0.0)
    top_p: float = num(0.95, 0.0, 1.0, lo_open=True)
    max_new_tokens: int = num(256, 1, MAX_NEW_TOKENS)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = num(16, 1)
    alpha: int = num(32, 1)
    dropout: float = num(0.05, 0.0, 1.0)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimConfig:
    """One fine-tuning run (πRefine or πθ*)."""

    lr: float = num(5e-6, 0.0, lo_open=True)
    weight_decay: float = num(0.0, 0.0)
    warmup_ratio: float = num(0.0, 0.0, 1.0)
    scheduler: str = choice("linear", "linear", "cosine", "constant")
    batch_size: int = num(32, 1)  # effective batch, in examples (micro_batch_size x accumulation x devices)
    micro_batch_size: int = num(4, 1)
    epochs: int = num(2, 0)
    max_length: int = num(1024, 16)
    grad_clip: float = num(1.0, 0.0)
    pack: bool = True  # length-bucketed batches; no padding to max_length
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, int) and isinstance(self.micro_batch_size, int):
            if self.micro_batch_size >= 1 and self.batch_size % self.micro_batch_size:
                raise ConfigError(
                    f"batch_size={self.batch_size} must be a multiple of micro_batch_size={self.micro_batch_size}"
                )


@dataclass
class RefineConfig:
    """Sampling refinements x1 from πRefine on MBPPTrain."""

    refiner: str = choice("trained", "trained", "base")  # πRefine | the base model (Tables 2-3)
    shots: int = num(0, 0, 2)  # examples (MBPPRefine annotations) in the refine prompt; Table 2: base model 1-shot
    n: int = num(30, 1, MAX_SAMPLES)
    temperature: float = num(0.8, 0.0)
    top_p: float = num(0.95, 0.0, 1.0, lo_open=True)
    max_new_tokens: int = num(512, 1, MAX_NEW_TOKENS)


@dataclass
class SamplingConfig:
    """Final evaluation on MBPPTest (the paper: 30 samples at T=0.8)."""

    engine: str = neutral(choice("hf", "hf", "vllm"))
    n: int = num(30, 1, MAX_SAMPLES)
    temperature: float = num(0.8, 0.0)
    top_p: float = num(0.95, 0.0, 1.0, lo_open=True)
    max_new_tokens: int = num(512, 1, MAX_NEW_TOKENS)
    batch_size: int | None = neutral(num(None, 1, 4096))  # sequences per forward; null = chosen from memory
    # the sampling engine's weights in every sampling stage (null = model.dtype); training keeps model.dtype.
    # bfloat16 on a CPU with AVX512-BF16 samples faster at changed numerics: opt-in (results/sampling/README.md)
    dtype: str | None = choice(None, None, "float32", "bfloat16", "float16")
    # int8 weights in the sampling engine's linear layers (CPU, fp32 weights): faster, changed numerics, opt-in
    quantize: str | None = choice(None, None, "int8")
    # null: the hf engine's default, shared on Llama-family models (a prompt's KV held once for its n samples,
    # ilf_lab/generation/prefix.py), else copy; copy: the prompt's KV copied into each sample's slot, as before
    # session 9 (logits equal to float rounding; the same pass@k: results/sampling/README.md). hf engine only.
    prompt_kv: str | None = choice(None, None, "copy", "shared")
    # the hf engine's fp32 linear layers on CPU (slots backend): null = onednn where this torch has it (weights
    # packed once for oneDNN, ilf_lab/generation/packed.py; logits equal to float rounding), aten = F.linear,
    # onednn_bf16 = the decoder layers' weights packed in bf16 (opt-in: new numerics; AVX512-BF16 or AMX hosts)
    cpu_linear: str | None = choice(None, None, "aten", "onednn", "onednn_bf16")
    # the hf engine's attention over the shared prompt KV on CPU: null = kernel where it builds here (a C++ kernel
    # compiled on first use, ilf_lab/generation/attention.py; logits equal to float rounding), matmul = torch's
    # batched matmuls (before session 12)
    attention: str | None = choice(None, None, "matmul", "kernel")
    # the hf engine's prefill (slots backend): null = once on CPU (the start every prompt of a call shares, a chat
    # template's system turn and instruction, is run once and its KV copied in front of each prompt's; logits equal
    # to float rounding, ilf_lab/generation/slots.py), each elsewhere; each = with every prompt (before session 13)
    common_prefix: str | None = choice(None, None, "once", "each")


@dataclass
class ExecutionConfig:
    # timeout and memory_mb decide which programs pass, so they are part of what a run measures
    timeout: float = num(10.0, 0.0, lo_open=True)
    workers: int | None = neutral(num(None, 1))  # null = CPU count
    comparison: str = choice("exact", "exact", "approx")  # MBPP's asserts | the ILF reference's pytest.approx
    memory_mb: int = num(4096, 64)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 10])
    # MBPPTest (the paper's numbers) | MBPPRefine (App. A.1's model selection) | the annotated MBPPTrain tasks
    # (Table 3's zero-shot baseline: the policy's own programs on the tasks the refine stage refines)
    split: str = choice("test", "test", "refine", "train")
    benchmarks: list[str] = neutral(field(default_factory=lambda: ["mbpp"]))  # + humaneval for transfer
    humaneval_max_problems: int | None = neutral(num(None, 1, 164))  # the first N of HumanEval's 164
    perplexity: bool = neutral(False)  # Figure 3: perplexity of the fine-tuning sources under the base model


@dataclass
class TrainerConfig:
    accelerator: str = choice("cpu", "cpu", "gpu", "cuda", "mps", "auto")
    devices: Any = 1
    num_nodes: int = num(1, 1)
    strategy: str = choice("auto", "auto", "ddp", "ddp_spawn", "fsdp")
    precision: str = choice("32-true", "32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
    log_every_n_steps: int = num(1, 1)
    enable_progress_bar: bool = True
    deterministic: bool = True
    # recompute each decoder block's activations in the backward pass: ~1/3 more compute, activations of one
    # block instead of all (what lets CodeGen-6B train on one 141 GB GPU: benchmarks/paper_plan.py)
    gradient_checkpointing: bool = False
    # `last.ckpt` (weights + AdamW state) is written after every epoch but the last, to resume a killed training;
    # true: after the last one too (to continue a finished run with more epochs). SmolLM2: 1.6 GB, ~20 s a write
    checkpoint_last_epoch: bool = neutral(False)


@dataclass
class LoggerConfig:
    _target_: str | None = None  # a tracker class (ilf_lab/tracking); null = chosen by `name`
    name: str = choice("wandb", "wandb", "none")
    project: str = "ilf_lab"
    entity: str | None = None
    mode: str = choice("offline", "offline", "online", "disabled")
    group: str | None = None  # null = derived from the sweep
    tags: list[str] = field(default_factory=list)
    dir: str = "${paths.output_dir}"


@dataclass
class Config:
    name: str = neutral("ilf")  # the Table 4 row; results.json's `experiment`
    scale: str = neutral("demo")
    seed: int = neutral(num(0, 0, 2**31 - 10_000))  # offsets per stage and round are added to it
    rounds: int = num(1, 1)  # iterative ILF: repeat x0 -> refine -> train with the improved policy
    stop_after: str | None = None  # end the run after this stage (analyses of refinements need no policy)
    # set by `python -m ilf_lab.a1`: this run's policy.*/refiner.* overrides are its method's App. A.1 point, so
    # the report keeps it on its Table 4 row (other hyper-parameter overrides move a run off the table)
    hparams_from: str | None = neutral(None)
    paths: PathsConfig = neutral(field(default_factory=PathsConfig), subtree=True)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = neutral(field(default_factory=ModelConfig))
    feedback: FeedbackConfig = neutral(field(default_factory=FeedbackConfig))
    train_on: TrainOnConfig = neutral(field(default_factory=TrainOnConfig))
    x0: X0Config = field(default_factory=X0Config)
    refiner: OptimConfig = field(default_factory=OptimConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    policy: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    eval: EvalConfig = neutral(field(default_factory=EvalConfig))
    trainer: TrainerConfig = neutral(field(default_factory=TrainerConfig), subtree=True)
    logger: LoggerConfig = neutral(field(default_factory=LoggerConfig), subtree=True)


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


def is_report_neutral(key: str) -> bool:
    """True for a config key (as written in an override, `+`/`~` allowed) that the schema marks `neutral`: a
    neutral leaf, a neutral group's choice, or any key under a `subtree` node; `hydra.*` is always neutral."""
    parts = key.lstrip("+~").split("=", 1)[0].split(".")
    if parts[0] == "hydra" or (len(parts) == 1 and parts[0] in PRESET_GROUPS):
        return True
    node: Any = Config
    for i, part in enumerate(parts):
        f = {f.name: f for f in dataclasses.fields(node)}.get(part) if dataclasses.is_dataclass(node) else None
        if f is None:
            return False
        mark = f.metadata.get("neutral")
        if mark == "subtree" or (mark and i == len(parts) - 1):
            return True
        node = _field_type(node, f)
    return False


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    import typing

    return typing.get_type_hints(cls).get(f.name)


def register_configs() -> None:
    """Register the schema; conf/config.yaml lists it first, so every group's YAML is merged into it."""
    ConfigStore.instance().store(name="config_schema", node=Config)


# ----------------------------------------------------------------------------------------- value checks

# the pipeline's stages in order (ilf_lab/pipeline/dag.py); `stop_after` may name any but the last
STAGES = ("tasks", "x0", "feedback", "train_refiner", "refine", "train_policy", "evaluate")


def _check_fields(cls: type, node: Any, prefix: str = "") -> None:
    """Every field's declared check (choices, finite range, implementation class), recursively."""
    for f in dataclasses.fields(cls):
        key, sub, meta = f"{prefix}{f.name}", _field_type(cls, f), f.metadata
        if not (dataclasses.is_dataclass(sub) or {"choices", "range", "base"} & set(meta)):
            continue  # read only what is checked (paths.* resolve Hydra's runtime values)
        value = node.get(f.name) if node is not None else None
        if dataclasses.is_dataclass(sub):
            _check_fields(sub, value, key + ".")
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, meta['choices']))}")
        if "range" in meta and value is not None:
            _check_range(key, value, *meta["range"])
        if "base" in meta and value is not None:
            _check_implementation(key, value, meta["base"])


def _check_range(key: str, value: Any, lo: float | None, hi: float | None, lo_open: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number")
    if not math.isfinite(value):
        raise ConfigError(f"{key}={value} must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}={value} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}={value} must be <= {hi}")


def _check_implementation(key: str, value: str, base: str) -> None:
    from hydra.utils import get_class

    try:
        cls, base_cls = get_class(value), get_class(base)
    except Exception as e:
        raise ConfigError(f"{key}={value!r} does not name an importable class ({type(e).__name__})") from None
    if not (isinstance(cls, type) and issubclass(cls, base_cls)):
        raise ConfigError(f"{key}={value!r} is not a {base.rsplit('.', 1)[-1]} (see {base})")


def validate(cfg: DictConfig) -> None:
    """Check every field's declared choices and ranges, then the combinations; raise ConfigError naming the key."""
    _check_fields(Config, cfg)
    if cfg.stop_after not in (None, *STAGES[:-1]):
        raise ConfigError(f"stop_after={cfg.stop_after!r} is not one of {', '.join(STAGES[:-1])} (or null)")
    devices = cfg.trainer.devices
    ok = (
        devices == "auto"
        or (isinstance(devices, int) and devices >= 1)
        or (OmegaConf.is_list(devices) and all(isinstance(d, int) and d >= 0 for d in devices))
    )
    if not ok:
        raise ConfigError(f"trainer.devices={devices!r} must be an int >= 1, a list of device ids, or auto")
    for stage in ("refiner", "policy"):
        try:
            OmegaConf.to_object(cfg[stage])  # the dataclass's own __post_init__ checks
        except ConfigError as e:
            raise ConfigError(f"{stage}.{e}") from None
    for name, rng in cfg.data.splits.items():
        if len(rng) != 2 or rng[0] > rng[1]:
            raise ConfigError(f"data.splits.{name}={list(rng)} must be [first_task_id, last_task_id]")
    if not cfg.eval.ks:
        raise ConfigError("eval.ks is empty; give at least one k (e.g. [1, 10])")
    if OmegaConf.is_list(cfg.trainer.devices) and not cfg.trainer.devices:
        raise ConfigError("trainer.devices=[] names no device")
    for k in cfg.eval.ks:
        if k < 1:
            raise ConfigError(f"eval.ks contains {k}; each k must be >= 1")
    _check_labels(cfg)
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
    if cfg.sampling.prompt_kv and cfg.sampling.engine != "hf":
        raise ConfigError(f"sampling.prompt_kv={cfg.sampling.prompt_kv} needs sampling.engine=hf (vLLM pages its own cache)")
    if cfg.sampling.common_prefix and cfg.sampling.engine != "hf":
        raise ConfigError(f"sampling.common_prefix={cfg.sampling.common_prefix} needs sampling.engine=hf (vLLM caches "
                          "prefixes its own way)")
    if cfg.sampling.attention and cfg.sampling.engine != "hf":
        raise ConfigError(f"sampling.attention={cfg.sampling.attention} needs sampling.engine=hf (vLLM has its own)")
    if cfg.sampling.attention == "kernel" and cfg.sampling.prompt_kv == "copy":
        raise ConfigError("sampling.attention=kernel reads the shared prompt KV: it needs sampling.prompt_kv=null "
                          "or shared")
    if cfg.sampling.cpu_linear and cfg.sampling.engine != "hf":
        raise ConfigError(f"sampling.cpu_linear={cfg.sampling.cpu_linear} needs sampling.engine=hf (vLLM runs on GPU)")
    if cfg.sampling.cpu_linear in ("onednn", "onednn_bf16") and (
        cfg.sampling.quantize or (cfg.sampling.dtype or cfg.model.dtype) != "float32"
    ):
        raise ConfigError(f"sampling.cpu_linear={cfg.sampling.cpu_linear} packs fp32 linear layers: it needs fp32 "
                          "sampling weights (sampling.dtype=float32, or null with model.dtype=float32) and "
                          "sampling.quantize=null")
    if cfg.sampling.quantize and (cfg.sampling.engine != "hf" or (cfg.sampling.dtype or cfg.model.dtype) != "float32"):
        raise ConfigError(f"sampling.quantize={cfg.sampling.quantize} needs sampling.engine=hf and fp32 sampling "
                          "weights (sampling.dtype=float32, or null with model.dtype=float32)")


def _check_labels(cfg: DictConfig) -> None:
    """The labels results.json and the report use (train_on.source, feedback.provider, x0.source) must name
    what the `_target_` classes do, or a run would be reported as another row."""
    from hydra.utils import get_class

    for node, label_key, attr in (("train_on", "source", "label"), ("feedback", "provider", "provider"),
                                  ("x0", "source", "source")):
        cls = get_class(cfg[node]._target_)
        expected = getattr(cls, attr, None)
        if expected is not None and cfg[node][label_key] != expected:
            raise ConfigError(f"{node}.{label_key}={cfg[node][label_key]!r} does not describe {node}._target_="
                              f"{cfg[node]._target_} ({attr} {expected!r})")
