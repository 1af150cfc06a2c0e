"""The default engine: our own batched sampling loop over a Hugging Face causal LM, on CPU or GPU.

Two backends share the scheduler's bookkeeping (seeds, sampling, stop strings, progress):

* `slots` (Llama-family models: llama, mistral, qwen2): continuous batching over a preallocated KV cache of
  `batch_size` slots. Each slot holds one sample; its cache starts at column 0 (no padding) and grows one
  column per step, so rows of different lengths decode together with a per-row length mask. A prompt is
  prefilled once and its KV held once for its n samples (prefix.py; `prompt_kv="copy"`: copied into n slots); a
  finished row is replaced by the last active row (one row copy, the batch stays dense) and freed slots are
  refilled with the next prompts' samples. Attention is computed by slots.py and prefix.py (grouped-query heads
  folded into the query axis, so the KV cache is never expanded; on CPU by a C++ kernel, attention.py);
  everything else calls the model's own modules.
* `generic` (any causal LM): prompts grouped by length, left-padded, prefilled once with the model's own
  forward and a `DynamicCache`, cache expanded n times, finished rows dropped from the batch and the cache.

The slots backend's KV cache and Llama-family forward are in `slots.py`, the batch's size in `budget.py`; this module stays one unit (~500 lines)
because both backends share one scheduler (seeds, stop checks, progress, stats) whose invariants are checked here.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ilf_lab.generation.attention import padded, resolve_attention
from ilf_lab.generation.budget import CPU_MAX_ROWS, auto_batch_size, kv_bytes_per_token
from ilf_lab.generation.packed import PACKED, PackedLinears, resolve_cpu_linear
from ilf_lab.generation.pages import heap_only, keep_heap_pages
from ilf_lab.generation.params import SamplingParams, trivial_completions
from ilf_lab.generation.phases import OFF
from ilf_lab.generation.prefix import SharedPromptCache
from ilf_lab.generation.sampling import (
    StopChecker,
    choose_tokens,
    draw_uniforms,
    make_generator,
    prompt_seeds,
)
from ilf_lab.generation.slots import SlotCache

log = logging.getLogger(__name__)

SLOT_MODEL_TYPES = ("llama", "mistral", "qwen2")
PREFILL_TOKENS_CPU = 2048  # prompt tokens per prefill forward (bounds activation memory)
# a prefill forward ends where right padding would pass this share of its tokens (prompts come sorted by length;
# session 16: one forward for 24 chat prompts was 18 % padding)
PREFILL_PAD_MAX = 0.1
PREFILL_TOKENS_GPU = 16384
PREFIX_MIN_TOKENS = 16  # a shorter common start is prefilled with each prompt (not worth a forward of its own)
COMMON_PREFIXES = ("once", "each")


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if e is not None:
            ids.update(e if isinstance(e, (list, tuple)) else [e])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(int(i) for i in ids)


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids per prompt; BOS is added by the tokenizer unless the prompt text already starts with it
    (chat templates often render it)."""
    bos = tokenizer.bos_token
    out = []
    for p in prompts:
        add = not (bos and p.startswith(bos))
        out.append(tokenizer(p, add_special_tokens=add)["input_ids"])
    return out


def context_limit(model: Any) -> int | None:
    """Positions the model has (CodeGen: 2048, a fixed sin/cos table that cannot be indexed past its end)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if limit else None


def fit_context(
    ids: list[list[int]], max_new_tokens: int, limit: int | None, bos: int | None = None
) -> tuple[list[list[int]], list[int], int]:
    """(prompts, new-token budget per prompt, prompts cut) so that prompt + generation fits `limit` positions: a
    prompt that leaves no room keeps its last `limit - 1` tokens (its BOS too), the continuation point being what
    matters; a sample that reaches the limit ends there, as at max_new_tokens. Past the limit CodeGen raises an
    IndexError (on GPU a device-side assert that ends the whole run)."""
    if not limit:
        return ids, [max_new_tokens] * len(ids), 0
    out, budgets, cut = [], [], 0
    for p in ids:
        if len(p) >= limit:
            keep = [p[0]] if bos is not None and p and p[0] == bos else []
            p = keep + p[len(p) - (limit - 1 - len(keep)) :]
            cut += 1
        out.append(p)
        budgets.append(max(0, min(max_new_tokens, limit - len(p))))
    return out, budgets, cut


def shared_prefix_len(ids: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one of its own; 0 for a single prompt or a common
    start shorter than PREFIX_MIN_TOKENS."""
    if len(ids) < 2:
        return 0
    c = min(len(os.path.commonprefix([list(p) for p in ids])), min(map(len, ids)) - 1)
    return c if c >= PREFIX_MIN_TOKENS else 0


def length_groups(lens: Sequence[int], most: float = PREFILL_PAD_MAX) -> list[int]:
    """Sizes of consecutive runs of `lens` (ascending), each run's right padding to its longest at most `most` of
    its padded tokens (a run of one has none): the prefill forwards of one admission."""
    sizes, start, total = [], 0, 0
    for j, n in enumerate(lens):
        total += n
        if j > start and (j - start + 1) * n - total > most * (j - start + 1) * n:
            sizes.append(j - start)
            start, total = j, n
    return [*sizes, len(lens) - start] if lens else []


def supports_slots(model: Any) -> bool:
    """Llama-family decoder whose modules the slot forward can call (no sliding-window attention in use)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SLOT_MODEL_TYPES:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        return False  # e.g. Mistral-7B-v0.1: windowed attention, which the slot forward does not implement
    inner = getattr(model, "model", None)
    return all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))


class _Progress:
    """Progress over samples with generated tokens/s (a bar, or log lines in a log file); a no-op when disabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from ilf_lab.logs import progress_bar

            self.bar = progress_bar(total, "sampling", "sample")
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.last = 0.0

    def step(self, tokens: int, done: int) -> None:
        self.tokens += tokens
        if self.bar is None:
            return
        if done:
            self.bar.update(done)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            self.bar.set_postfix_str(f"{self.tokens / max(now - self.t0, 1e-9):.0f} tok/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Rows:
    """Per-row bookkeeping of the active batch (row i = one sample being generated)."""

    def __init__(self) -> None:
        self.prompt: list[int] = []
        self.sample: list[int] = []
        self.gen: list[torch.Generator | None] = []
        self.tokens: list[list[int]] = []
        self.lens: list[int] = []  # cache columns filled (slots backend)

    def __len__(self) -> int:
        return len(self.prompt)

    def add(self, prompt: int, sample: int, gen: torch.Generator | None, length: int) -> None:
        self.prompt.append(prompt)
        self.sample.append(sample)
        self.gen.append(gen)
        self.tokens.append([])
        self.lens.append(length)

    def keep(self, idx: Sequence[int]) -> None:
        for name in ("prompt", "sample", "gen", "tokens", "lens"):
            seq = getattr(self, name)
            setattr(self, name, [seq[i] for i in idx])

    def move(self, dst: Sequence[int], src: Sequence[int], new_len: int) -> None:
        for name in ("prompt", "sample", "gen", "tokens", "lens"):
            seq = getattr(self, name)
            for d, s in zip(dst, src, strict=True):
                seq[d] = seq[s]
            del seq[new_len:]


class HFEngine:
    """Batched temperature/top-p sampling with stop strings over a loaded HF causal LM (see module doc)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int | None = None,
        backend: str = "auto",
        refill_fraction: float = 0.0,
        prompt_kv: str | None = None,
        cpu_linear: str | None = None,
        attention: str | None = None,
        common_prefix: str | None = None,
    ) -> None:
        if backend not in ("auto", "slots", "generic"):
            raise ValueError(f"backend must be auto, slots or generic, got {backend!r}")
        if prompt_kv not in (None, "copy", "shared"):
            raise ValueError(f"prompt_kv must be copy, shared or None (the default), got {prompt_kv!r}")
        if backend == "slots" and not supports_slots(model):
            raise ValueError(f"the slots backend supports {SLOT_MODEL_TYPES}, not {model.config.model_type}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.backend = ("slots" if supports_slots(model) else "generic") if backend == "auto" else backend
        if prompt_kv == "shared" and self.backend != "slots":
            raise ValueError(f"prompt_kv=shared needs the slots backend ({SLOT_MODEL_TYPES}), not {self.backend}")
        # shared (the slots backend's default): a prompt's KV held once for its n samples (prefix.py); 1.26 x
        # the copying cache's kept tok/s on refine prompts, the same pass@k (results/sampling/README.md)
        self.prompt_kv = prompt_kv or ("shared" if self.backend == "slots" else "copy")
        # onednn (the default for fp32 on CPU in the slots backend): linear layers with weights packed once for
        # oneDNN, 1.1-1.6 x F.linear's GFLOP/s at the decode shapes (packed.py); aten: F.linear as the model calls it
        self.cpu_linear = resolve_cpu_linear(cpu_linear, model, self.backend)
        self._linears: PackedLinears | None = None  # one per generate() call (packed.py)
        # kernel (the default on CPU where it builds): the shared prompt KV attended by a C++ kernel, 1.3-1.6 x
        # the batched matmuls at the decode shapes (attention.py); matmul: torch's batched matmuls
        self.attention = resolve_attention(attention, model, self.backend, self.prompt_kv)
        # once (the slots backend's default on CPU): the start all prompts of a call share (chat template,
        # instruction) is prefilled once and its KV copied in front of each prompt's (slots.py, set_prefix); each:
        # with every prompt (the GPU default: the prefix's explicit SDPA mask would leave flash attention)
        if common_prefix not in (None, *COMMON_PREFIXES):
            raise ValueError(f"common_prefix must be once, each or None (the default), got {common_prefix!r}")
        if common_prefix == "once" and self.backend != "slots":
            raise ValueError(f"common_prefix=once needs the slots backend ({SLOT_MODEL_TYPES}), not {self.backend}")
        on_cpu = next(model.parameters()).device.type == "cpu"
        self.common_prefix = common_prefix or ("once" if self.backend == "slots" and on_cpu else "each")
        # refill freed slots once this share of them is free (0: as soon as one prompt's n samples fit)
        self.refill_fraction = refill_fraction
        self.eos = eos_token_ids(model, tokenizer)
        self._budget: list[int] = []  # new tokens each prompt of the current call may take (fit_context)
        self.device = next(model.parameters()).device
        if self.device.type == "cpu":
            keep_heap_pages()  # prefill's large temporaries reuse heap pages instead of faulting fresh ones
        self.last_stats: dict[str, float] = {}
        self._rows_mean = 0.0
        self.phases = OFF  # set to a Phases() to time a call's phases (benchmarks/sampling.py)

    def generate(
        self, prompts: Sequence[str], params: SamplingParams, progress: bool = False
    ) -> list[list[str]]:
        """n raw completions per prompt, in prompt order (greedy: one decode, copied n times)."""
        prompts = list(prompts)
        if (done := trivial_completions(prompts, params)) is not None:
            return done
        n = 1 if params.greedy else params.n
        ids = encode_prompts(self.tokenizer, prompts)
        limit = context_limit(self.model)
        ids, self._budget, cut = fit_context(ids, params.max_new_tokens, limit, self.tokenizer.bos_token_id)
        short = sum(b < params.max_new_tokens for b in self._budget)
        if short:
            log.warning(
                "the model has %d positions: %d of %d prompts leave less room than max_new_tokens=%d "
                "(their samples end at the limit; %d prompts cut from the left)",
                limit,
                short,
                len(ids),
                params.max_new_tokens,
                cut,
            )
        seeds = prompt_seeds(prompts, params.seed, n)
        if self.cpu_linear in PACKED:  # packed now, before the batch is sized from free memory; dropped after
            head = self.model.get_output_embeddings()  # packed in fp32 whatever the layers' dtype (packed.py)
            self._linears = PackedLinears(PACKED[self.cpu_linear], keep=(head,) if head is not None else ())
            with heap_only(self._linears.size(self.model)):  # the packed LM head too: the same heap pages each call
                self._linears.pack(self.model)
        max_len = max(len(p) + b for p, b in zip(ids, self._budget, strict=True))
        extra = fixed = 0
        if self.prompt_kv == "shared":
            longest = max(map(len, ids))
            # its grid scores and probabilities: up to n sample places per live row (one fresh prompt beside
            # drained ones), each [heads, longest prompt]
            elem = 4 if self.device.type == "cpu" else next(self.model.parameters()).element_size()
            extra = 2 * n * self.model.config.num_attention_heads * longest * elem
            if self.device.type == "cpu":  # only touched pages count (zeroed_cpu): a row's own columns, and
                # prompts held once each, at most the longest CPU_MAX_ROWS of them (one long prompt no longer
                # sizes every row: MBPPTrain refine prompts, mean ~490 tokens with one of ~4,300)
                max_len = max(self._budget)
                whole = padded if self.attention == "kernel" else int  # the kernel's store: whole key blocks
                held = sorted((whole(len(p)) for p in ids), reverse=True)[:CPU_MAX_ROWS]
                fixed = kv_bytes_per_token(self.model) * sum(held)
            else:  # allocated in full: every row's slot as long as the longest prompt plus the largest budget
                max_len = longest + max(self._budget)
        slots = self.batch_size or auto_batch_size(self.model, max_len, self.device, extra, fixed)
        slots = max(slots, n)
        out: list[list[str | None]] = [[None] * n for _ in prompts]
        stopper = StopChecker(self.tokenizer, params.stop)
        bar = _Progress(len(prompts) * n, progress)
        t0 = time.perf_counter()
        # Lightning's deterministic=True leaves torch.use_deterministic_algorithms(True) set after training; under
        # it, index_copy_ into a view of the KV cache does not write through (torch 2.13, CPU) and samples
        # degenerate. Sampling is deterministic without it (per-sample generators), so switch it off here.
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(False)
        self._rows_mean = 0.0
        try:
            with torch.inference_mode():
                run = self._run_slots if self.backend == "slots" else self._run_generic
                run(ids, seeds, n, params, slots, max_len, stopper, out, bar)
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            bar.close()
            held = self._linears.weights() if self._linears is not None else []
            packed, bf16, self._linears = len(held), sum(w.dtype == torch.bfloat16 for w in held), None
        self.last_stats = {
            "packed_linears": packed,  # linear layers this call ran through oneDNN-packed weights (packed.py)
            "packed_bf16": bf16,  # of them, packed in bf16 (cpu_linear=onednn_bf16)
            "seconds": time.perf_counter() - t0,
            "generated_tokens": bar.tokens,
            "batch_size": slots,
            "rows_mean": self._rows_mean or float(slots),  # active rows per decode step (slots backend)
        }
        if n != params.n:
            return [[o[0]] * params.n for o in out]  # type: ignore[list-item]
        return out  # type: ignore[return-value]

    # -- shared step logic ------------------------------------------------------------------------------

    def _advance(
        self,
        rows: _Rows,
        logits: torch.Tensor,
        idx: Sequence[int],
        params: SamplingParams,
        stopper: StopChecker,
        out: list[list[str | None]],
    ) -> list[int]:
        """Sample the next token for rows `idx` (logits row j belongs to rows idx[j]), record finished
        samples, return the row indices that finished."""
        with self.phases("sampling: uniform draws"):
            uniforms = None if params.greedy else draw_uniforms([rows.gen[i] for i in idx])
        with self.phases("sampling: temperature, top-p, choice"):
            chosen = choose_tokens(logits, params.temperature, params.top_p, uniforms).tolist()
        finished, check = [], []
        for j, i in enumerate(idx):
            tok = chosen[j]
            if tok in self.eos:
                finished.append(i)
                continue
            rows.tokens[i].append(tok)
            if len(rows.tokens[i]) >= self._budget[rows.prompt[i]]:
                finished.append(i)
            else:
                check.append(i)
        if stopper.stop and check:
            with self.phases("stop-string checks"):
                hits = stopper.hits([rows.tokens[i] for i in check])
            finished.extend(i for i, h in zip(check, hits, strict=True) if h)
        with self.phases("finishing samples (decode text)"):
            for i in finished:
                out[rows.prompt[i]][rows.sample[i]] = stopper.finish(rows.tokens[i], self.eos)
        return finished

    # -- slots backend ----------------------------------------------------------------------------------

    def _run_slots(self, ids, seeds, n, params, slots, max_len, stopper, out, bar) -> None:
        if self.prompt_kv == "shared":
            cache = SharedPromptCache(
                self.model, slots, max(map(len, ids)), max(self._budget), self.phases, self._linears, self.attention
            )
        else:
            cache = SlotCache(self.model, slots, max_len, self.phases, self._linears)
        if self.common_prefix == "once" and (c := shared_prefix_len(ids)):
            with self.phases("prefill"):
                cache.set_prefix(ids[0][:c])
        queue = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        budget = PREFILL_TOKENS_GPU if self.device.type == "cuda" else PREFILL_TOKENS_CPU
        refill_at = max(n, int(math.ceil(self.refill_fraction * slots)))
        rows = _Rows()
        last: list[int] = []  # the newest token of each row (not yet in the cache)
        steps = row_steps = 0
        while queue or len(rows):
            free = slots - len(rows)
            if queue and (free >= refill_at or (free >= n and not len(rows))):
                take: list[int] = []
                while queue and (len(take) + 1) * n <= free:
                    if take and (len(take) + 1) * len(ids[queue[0]]) > budget:
                        break
                    take.append(queue.pop(0))
                row0, parts, done_p = len(rows), [], 0
                with self.phases("prefill"):  # in runs of similar length (length_groups), rows appended in order
                    for size in length_groups([len(ids[p]) - len(cache.prefix) for p in take], PREFILL_PAD_MAX):
                        part = take[done_p : done_p + size]
                        parts.append(cache.prefill([ids[p] for p in part], row0 + done_p * n, n))
                        done_p += size
                logits = torch.cat(parts)
                for p in take:
                    for j in range(n):
                        gen = None if params.greedy else make_generator(seeds[p][j])
                        rows.add(p, j, gen, len(ids[p]))
                new = list(range(row0, len(rows)))
                done = self._advance(rows, logits.repeat_interleave(n, 0), new, params, stopper, out)
                last.extend(rows.tokens[i][-1] if rows.tokens[i] else 0 for i in new)
                self._compact(cache, rows, last, done)
                bar.step(len(new), len(done))
                continue
            a = len(rows)
            steps, row_steps = steps + 1, row_steps + a
            lens = torch.tensor(rows.lens, device=self.device)
            logits = cache.decode(torch.tensor(last, device=self.device), lens, max(rows.lens) + 1)
            for i in range(a):
                rows.lens[i] += 1
            done = self._advance(rows, logits, range(a), params, stopper, out)
            for i in range(a):
                if rows.tokens[i]:
                    last[i] = rows.tokens[i][-1]
            with self.phases("compaction (row moves)"):
                self._compact(cache, rows, last, done)
            bar.step(a, len(done))
        self._rows_mean = row_steps / max(steps, 1)

    @staticmethod
    def _compact(cache: SlotCache, rows: _Rows, last: list[int], done: Sequence[int]) -> None:
        """Fill the holes left by finished rows with the last active rows, keeping rows 0..A-1 dense."""
        if not done:
            return
        gone = set(done)
        new_len = len(rows) - len(gone)
        holes = sorted(i for i in gone if i < new_len)
        movers = [i for i in range(new_len, len(rows)) if i not in gone]
        cache.compact(holes, movers, [rows.lens[i] for i in movers], new_len)
        if holes:
            for d, s in zip(holes, movers, strict=True):
                last[d] = last[s]
        rows.move(holes, movers, new_len)
        del last[new_len:]

    # -- generic backend --------------------------------------------------------------------------------

    def _run_generic(self, ids, seeds, n, params, slots, max_len, stopper, out, bar) -> None:
        from transformers import DynamicCache

        fwd = inspect.signature(self.model.forward).parameters
        cache_kw = "cache" if "cache" in fwd else "past_key_values"
        extra = {"logits_to_keep": 1} if "logits_to_keep" in fwd else {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        per_group = max(1, slots // n)
        for g0 in range(0, len(order), per_group):
            group = order[g0 : g0 + per_group]
            t = max(len(ids[p]) for p in group)
            inp = torch.full((len(group), t), pad, dtype=torch.long)
            mask = torch.zeros(len(group), t, dtype=torch.long)
            for r, p in enumerate(group):
                inp[r, t - len(ids[p]) :] = torch.tensor(ids[p])
                mask[r, t - len(ids[p]) :] = 1
            inp, mask = inp.to(self.device), mask.to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            try:
                kv = DynamicCache(config=self.model.config)
            except TypeError:
                kv = DynamicCache()
            res = self.model(
                input_ids=inp,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                **{cache_kw: kv},
                **extra,
            )
            logits = res.logits[:, -1].float()
            if n > 1:
                kv.batch_repeat_interleave(n)
                mask = mask.repeat_interleave(n, 0)
                logits = logits.repeat_interleave(n, 0)
            rows = _Rows()
            for p in group:
                for j in range(n):
                    rows.add(p, j, None if params.greedy else make_generator(seeds[p][j]), 0)
            while True:
                a = len(rows)
                done = set(self._advance(rows, logits, range(a), params, stopper, out))
                bar.step(a, len(done))
                if done:
                    keep = [i for i in range(a) if i not in done]
                    if not keep:
                        break
                    keep_t = torch.tensor(keep, device=self.device)
                    kv.batch_select_indices(keep_t)
                    mask = mask[keep_t]
                    rows.keep(keep)
                last = torch.tensor([r[-1] for r in rows.tokens], device=self.device).unsqueeze(1)
                pos = mask.sum(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                res = self.model(
                    input_ids=last, attention_mask=mask, position_ids=pos, use_cache=True, **{cache_kw: kv}
                )
                logits = res.logits[:, -1].float()
