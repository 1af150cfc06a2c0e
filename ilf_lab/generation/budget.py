"""How many rows a sampling call decodes at once: the KV cache and logits per row against the memory this
process may use, capped where bigger batches stop paying. On a GPU the batch's shape changes the samples (the
matmuls' rounding), so the budget there must not move from call to call (cuda_budget_base)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ilf_lab.generation.attention import head_dim
from ilf_lab.generation.pages import meminfo_bytes

log = logging.getLogger(__name__)

# decode rows beyond which a step's matmuls gain little on CPU (2 cores; session 16: 256 against 192 took the
# benchmark's refine prompts 165.5 -> 153.2 s and chat 102.6 -> 97.5 s, the same samples; results/sampling)
CPU_MAX_ROWS = 256
GPU_MAX_ROWS = 1024
GPU_BUDGET_SHARE = 0.6  # of cuda_budget_base for the KV cache, logits and transients


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV cache on `device` (CUDA: the card less this process's live tensors; CPU: MemAvailable)."""
    if device.type == "cuda":
        return cuda_budget_base(device)
    free = meminfo_bytes("MemAvailable")  # without the kept cache pages (pages.KEPT): a cache of another layout
    if free is not None:  # reuses only part of them
        return free
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def cuda_budget_base(device: torch.device) -> int:
    """The card's memory less this process's live tensors: it depends on the card and on what is alive, not on
    what the caching allocator or the driver happen to hold, so each call sizes the same batch. On a GPU the batch's
    shape changes the matmuls' rounding: an H200 run sampled other tokens in a second call when the batch followed
    the driver's free memory (results/gpu/README.md). Where other processes hold so much of the card that
    GPU_BUDGET_SHARE of this would not fit in what is really free, the free memory sizes the batch, with a warning
    (samples may then differ from call to call)."""
    free, total = torch.cuda.mem_get_info(device)
    live = torch.cuda.memory_allocated(device)
    really_free = free + torch.cuda.memory_reserved(device) - live  # the allocator's cached blocks are ours to reuse
    stable = total - live
    if stable * GPU_BUDGET_SHARE > really_free:
        log.warning(
            "the GPU is shared (%.1f of %.1f GiB free to this process): the sampling batch follows the free memory, "
            "so a call's samples may depend on what else runs on the card", really_free / 2**30, total / 2**30
        )
        return int(really_free)
    return int(stable)


def kv_bytes_per_token(model: Any) -> int:
    cfg = model.config
    kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    p = next(model.parameters())
    elem = 4 if p.device.type == "cpu" else p.element_size()  # SlotCache keeps an fp32 cache on CPU
    return 2 * cfg.num_hidden_layers * kvh * head_dim(cfg) * elem


def auto_batch_size(
    model: Any, max_len: int, device: torch.device, extra_per_row: int = 0, fixed: int = 0
) -> int:
    """Concurrent sequences: as many as half the free memory holds (KV cache of `max_len` tokens plus the
    per-row logits and `extra_per_row` bytes, after `fixed` bytes), capped where bigger decode batches stop
    paying (compute-bound on CPU sooner than GPU)."""
    vocab = model.config.vocab_size
    per_row = kv_bytes_per_token(model) * max_len + vocab * 4 * 4 + extra_per_row
    budget = available_memory(device) * (GPU_BUDGET_SHARE if device.type == "cuda" else 0.5) - fixed
    if device.type != "cuda":  # the model itself is already resident; leave room for a trainer next door
        budget -= sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    rows = max(1, int(budget // per_row))
    return max(1, min(rows, GPU_MAX_ROWS if device.type == "cuda" else CPU_MAX_ROWS))
