"""The slots backend's preallocated KV cache and the Llama-family forward that reads and writes it (the scheduler
that fills and drains the slots is `hf.HFEngine`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ilf_lab.generation.attention import HEAD_DIMS, head_dim, prefill_attention
from ilf_lab.generation.kernels import kernel, kernel_error
from ilf_lab.generation.packed import PackedLinears
from ilf_lab.generation.pages import zeroed
from ilf_lab.generation.phases import OFF, Phases
from ilf_lab.generation.quantize import is_quantized

# vocabulary rows per LM-head matmul on CPU: 1.3x the GFLOP/s of one [rows x 49152] matmul (results/sampling)
LM_HEAD_CHUNK = 2048
# glibc serves an allocation past its largest mmap threshold (32 MiB on 64-bit) with a fresh mapping, every page
# faulted in as it is written: at 256 rows the packed LM head's 50 MB of logits took 12k page faults a step, 54 ms
# against 40 ms (session 18). Logits past LOGITS_MMAP_BYTES (the ceiling less 1 MiB for the allocator's header,
# alignment and page rounding) are computed in row chunks no larger (once one is freed, glibc raises its threshold
# to that size and serves the next from the heap) into a buffer the cache keeps for its life.
LOGITS_MMAP_BYTES = (32 << 20) - (1 << 20)
# prefill's MLP in row chunks: at a prefill forward's ~2,048 rows the gate/up product (x 3,072 floats a row, 25 MB)
# leaves the caches before the SiLU pass and the down matmul read it; in chunks of 512 rows it stays in L3 (packed
# MLP at 2,048 rows 351-424 GFLOP/s whole, 456-471 in chunks, session 21). Rows are independent: the same values.
MLP_ROWS = 512


class SlotCache:
    """A preallocated KV cache [layer, k|v, slot, kv_head, position, head_dim] and a Llama-family forward
    that reads and writes it. Attention reads every row up to the batch's longest, so a row also reads columns
    nobody wrote in its slot: masked, but still 0 x V, so they must be finite (uninitialised memory may hold NaN).
    On CPU the cache is anonymous mmap memory, zero by definition and touched only as far as sequences grow
    (`torch.zeros` would write a refine batch's gigabytes up front: seconds)."""

    def __init__(
        self, model: Any, slots: int, max_len: int, phases: Phases = OFF, linears: PackedLinears | None = None
    ) -> None:
        cfg = model.config
        self.model = model
        self.inner = model.model
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.group = self.heads // self.kv_heads
        self.head_dim = head_dim(cfg)
        self.phases = phases
        self.linears = linears  # oneDNN-packed fp32 linear layers (packed.py), or None: each layer as it is
        p = next(model.parameters())
        self.device, self.weights_dtype = p.device, p.dtype
        # the cache and attention stay fp32 on CPU under bf16/fp16 weights: CPU half-precision batched matmuls
        # over long contexts run several times slower than fp32 (refine prompts: 87 s vs 39 s of attention)
        self.dtype = torch.float32 if p.device.type == "cpu" else p.dtype
        head = model.lm_head  # in vocabulary chunks on CPU, unless int8 (sampling.quantize): then as it is
        plain = (self.device.type == "cpu" and linears is None and not is_quantized(head)
                 and getattr(head, "bias", None) is None)
        self.head_chunks = head.weight.split(LM_HEAD_CHUNK) if plain else ()
        # the residual add + RMSNorm kernel (fp32 on CPU, where the CPU kernels build: kernels.py), else torch
        fp32_cpu = self.device.type == "cpu" and p.dtype == torch.float32
        self.norm_kernel = kernel("ilf_add_rms_norm") if fp32_cpu and kernel_error("ilf_add_rms_norm") is None else None
        # looked up per call by id: the cache lives for one sampling call, while the weights cannot change
        self._rms_norms = {id(m): (m.weight.data_ptr(), m.variance_epsilon, m.weight.shape[0])
                           for m in model.modules() if _is_rms_norm(m)} if self.norm_kernel is not None else {}
        # a decode step's q/k/v in one packed matmul, rotated and written into the cache by one C++ pass (rope.cpp)
        self.rope_kernel = (kernel("ilf_rope_qkv") if fp32_cpu and linears is not None and self.head_dim % 2 == 0
                            and kernel_error("ilf_rope_qkv") is None else None)
        # prefill's causal attention in C++, only the half torch's masked attention computes in full (attention.py)
        ok = (self.rope_kernel is not None and self.head_dim in HEAD_DIMS
              and kernel_error("ilf_prefill_attention") is None)
        self.prefill_kernel = kernel("ilf_prefill_attention") if ok else None
        self.prefix: list[int] = []  # the tokens every prompt starts with, run once (set_prefix)
        self._logits: torch.Tensor | None = None  # the large logits' buffer (lm_head), allocated on first need
        self.prefix_kv: torch.Tensor | None = None
        shape = (cfg.num_hidden_layers, 2, slots, self.kv_heads, max_len, self.head_dim)
        self.kv = zeroed(shape, self.dtype, self.device, reuse=True)  # a mapping an earlier call left, if free

    def _qkv(self, attn: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        b, t, _ = h.shape
        both = None if self.linears is None else self.linears.qkv(attn, h)  # packed: one matmul for the three
        widths = [n * self.head_dim for n in (self.heads, self.kv_heads, self.kv_heads)]
        if both is not None and both.shape[-1] == sum(widths):
            q, k, v = both.split(widths, -1)
        else:
            q, k, v = (self._linear(m, h) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def set_prefix(self, ids: Sequence[int]) -> None:
        """Run `ids`, the start every prompt of the call shares (a chat template's system turn and instruction),
        once and hold its KV; `prefill` then runs only what follows it and copies the held KV in front."""
        self.prefix, self.prefix_kv = [], None
        if ids:
            held: list[torch.Tensor] = []

            def keep(i: int, k: torch.Tensor, v: torch.Tensor) -> None:  # only the prefix's K and V are kept
                held.append(torch.stack([k[0], v[0]]))

            dev = self.device
            self._layers(torch.tensor([list(ids)], device=dev), keep, torch.tensor([len(ids) - 1], device=dev))
            self.prefix, self.prefix_kv = list(ids), torch.stack(held)  # [layer, k|v, kv_head, position, head_dim]

    def prefill(self, prompts: Sequence[Sequence[int]], row0: int, copies: int) -> torch.Tensor:
        """Run the prompts (right-padded; causal attention never sees the padding), write each prompt's KV
        into `copies` consecutive slots from `row0`, return next-token logits per prompt."""
        self._check_prefix(prompts)
        c = len(self.prefix)
        b, t = len(prompts), max(len(p) for p in prompts) - c
        ids = torch.zeros(b, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p) - c] = torch.tensor(p[c:], dtype=torch.long)
        last = torch.tensor([len(p) - c - 1 for p in prompts], device=self.device)
        x = self._layers(ids.to(self.device), lambda i, k, v: self._store_prompt(i, k, v, row0, copies), last)
        return self.lm_head(self.inner.norm(x[:, 0]))

    def _check_prefix(self, prompts: Sequence[Sequence[int]]) -> None:
        c = len(self.prefix)
        if any(len(p) <= c or list(p[:c]) != self.prefix for p in prompts):
            raise ValueError(f"every prompt must extend the held prefix of {c} tokens (set_prefix)")

    def _layers(self, ids: torch.Tensor, store: Any, last: torch.Tensor | None = None) -> torch.Tensor:
        """The model's layers over ids [b, t] at the positions after the held prefix, attending to the prefix's
        KV and causally to themselves; `store(layer, k, v)` gets each layer's K and V, prefix included. With
        `last` (each row's last position), the last layer runs past its K and V for that position only (all the
        next-token logits need): out [b, 1, hidden]."""
        b, t = ids.shape
        c = len(self.prefix)
        pos = torch.arange(c, c + t, device=self.device).unsqueeze(0).expand(b, t)
        x = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(x, pos)
        into = None  # where the rope kernel writes each row's k and v (prefill's rows: prompts x positions)
        if self.rope_kernel is not None and cos.shape == (b, t, self.head_dim):
            into = self._prefill_index(b, t, c)
            # right by construction; checked because the kernel writes without bounds checks
            room = b * self.kv_heads * (c + t)  # the K/V buffer's rows of head_dim floats (_prefill_qkv)
            if into.numel() != b * t * self.kv_heads or not 0 <= int(into.min()) <= int(into.max()) < room:
                raise ValueError("the prefill's write index does not fit its K/V buffer")
            cos, sin = cos.float().contiguous(), sin.float().contiguous()
        mask = None  # no prefix: plain causal attention
        if c:  # query j (position c + j) sees the prefix and the new tokens up to itself
            cols, rows = torch.arange(c + t, device=self.device), torch.arange(t, device=self.device)
            mask = (cols.unsqueeze(0) < c) | (cols.unsqueeze(0) - c <= rows.unsqueeze(1))
        pending = None  # the previous layer's MLP output, added by the next norm (one pass: _add_norm, as in decode)
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = self._add_norm(x, pending, layer.input_layernorm)
            q, k, v = self._prefill_qkv(i, attn, h, cos, sin, into) if into is not None else (None, None, None)
            if q is None:  # torch's way: rotate, then put the prefix's K and V in front
                q, k, v = self._qkv(attn, h, cos, sin)
                if c:
                    held = self.prefix_kv[i].unsqueeze(1).expand(2, b, -1, -1, -1).to(k.dtype)
                    k, v = torch.cat([held[0], k], 2), torch.cat([held[1], v], 2)
            store(i, k, v)
            o = None
            if last is not None and i == len(self.inner.layers) - 1:  # the one query per row that is read on
                rows_b = torch.arange(b, device=self.device)
                q, x = q[rows_b, :, last].unsqueeze(2), x[rows_b, last].unsqueeze(1)
                mask = (torch.arange(c + t, device=self.device) <= c + last.unsqueeze(1)).view(b, 1, 1, c + t)
                t = 1
            elif self.prefill_kernel is not None and q.transpose(1, 2).is_contiguous() and k.is_contiguous():
                lens = torch.full((b,), t) if last is None else (last + 1).cpu()
                o = prefill_attention(self.prefill_kernel, q, k, v.contiguous(), lens, attn.scaling)
            if o is None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                   scale=attn.scaling, enable_gqa=True).transpose(1, 2).reshape(b, t, -1)
            o = self._linear(attn.o_proj, o)
            pending = self._mlp(layer.mlp, self._add_norm(x, o, layer.post_attention_layernorm))
        return x.add_(pending)

    def _prefill_index(self, b: int, t: int, c: int) -> torch.Tensor:
        """Where the rope kernel writes position j of prompt p's head h in a [p, head, c + t] grid of rows: after
        the prefix's c."""
        j = torch.arange(t).view(1, t, 1)
        heads = torch.arange(self.kv_heads).view(1, 1, -1)
        return ((torch.arange(b).view(b, 1, 1) * self.kv_heads + heads) * (c + t) + c + j).reshape(-1).contiguous()

    def _prefill_qkv(self, i: int, attn: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     into: torch.Tensor) -> tuple[Any, Any, Any]:
        """Prefill's q [b, heads, t, hd] and layer i's K and V [b, kv_heads, c + t, hd], the prefix's first: one
        matmul for q/k/v and one rope-kernel pass that rotates q and k (bitwise torch's) and writes k and v after
        the prefix (no concatenation, ~20 small ops fewer per layer); (None, None, None) where the projection does
        not have the expected shape (then torch's way)."""
        b, t, _ = h.shape
        c, hd, kvh = len(self.prefix), self.head_dim, self.kv_heads
        both = self.linears.qkv(attn, h)
        if (both is None or both.shape != (b, t, (self.heads + 2 * kvh) * hd) or not both.is_contiguous()
                or both.dtype != torch.float32):
            return None, None, None
        kv = torch.empty(2, b, kvh, c + t, hd, dtype=torch.float32)
        if c:
            kv[:, :, :, :c] = self.prefix_kv[i].unsqueeze(1)
        q = torch.empty(b, t, self.heads, hd, dtype=torch.float32)
        self._rope(both, cos, sin, q, kv[0], kv[1], into, b * t)
        return q.transpose(1, 2), kv[0], kv[1]

    def _linear(self, m: Any, x: torch.Tensor) -> torch.Tensor:
        return m(x) if self.linears is None else self.linears.linear(m, x)

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """The layer's MLP; with packed linears, in chunks of MLP_ROWS rows (prefill; a decode step has fewer)."""
        if self.linears is None:
            return mlp(x)
        rows = x.numel() // x.shape[-1]
        if rows <= MLP_ROWS or not x.is_contiguous():
            return self.linears.mlp(mlp, x)
        flat, out = x.view(rows, x.shape[-1]), None
        for r in range(0, rows, MLP_ROWS):
            y = self.linears.mlp(mlp, flat[r : r + MLP_ROWS])
            if out is None:
                out = y.new_empty(rows, y.shape[-1])
            out[r : r + MLP_ROWS] = y
        return out.view(*x.shape[:-1], out.shape[-1])

    def lm_head(self, h: torch.Tensor, reuse: bool = False) -> torch.Tensor:
        """Next-token logits [rows, vocab] for h [rows, hidden]. `reuse` (decode): past LOGITS_MMAP_BYTES with packed
        linears on CPU, a view of the cache's own buffer, valid until the next such call (the engine samples a
        step's logits before the next step; prefill's, concatenated across runs, are never such views)."""
        if self.linears is not None:  # packed: one call is faster than MKL's chunks
            vocab = getattr(self.model.lm_head, "out_features", 0)
            if reuse and self.device.type == "cpu" and h.dim() == 2 and h.shape[0] * vocab * 4 > LOGITS_MMAP_BYTES:
                return self._head_in_chunks(h, vocab)
            return self.linears.linear(self.model.lm_head, h).float()
        if len(self.head_chunks) <= 1:
            return self.model.lm_head(h).float()
        return torch.cat([F.linear(h, w) for w in self.head_chunks], dim=-1).float()

    def _head_in_chunks(self, h: torch.Tensor, vocab: int) -> torch.Tensor:
        """The packed LM head in row chunks into the cache's logits buffer: the same values (the packed matmul is
        row-independent, tests/test_packed.py), no fresh mapping a step."""
        rows = h.shape[0]
        if self._logits is None or self._logits.shape[0] < rows:
            self._logits = zeroed((max(rows, self.kv.shape[2]), vocab), torch.float32, self.device, reuse=True)
        out, step = self._logits[:rows], max(1, LOGITS_MMAP_BYTES // (vocab * 4))
        for r in range(0, rows, step):
            out[r : r + step] = self.linears.linear(self.model.lm_head, h[r : r + step])
        return out

    def decode(self, tokens: torch.Tensor, lens: torch.Tensor, width: int) -> torch.Tensor:
        """One step for rows 0..A-1: token i goes to position lens[i] of slot i; `width` = max(lens) + 1."""
        ph = self.phases
        a = tokens.shape[0]
        with ph("decode: embed, rope, mask"):
            x = self.inner.embed_tokens(tokens).unsqueeze(1)
            cos, sin = self.inner.rotary_emb(x, lens.unsqueeze(1))
            step = self._step(lens, width)
            if self.rope_kernel is not None:  # what the kernel reads without checks: checked once per step
                cos, sin = cos.float().contiguous(), sin.float().contiguous()
                self._check_write_index(step[0], a)
        pending = None  # the previous layer's MLP output, added to x by the next norm (one pass: add_norm)
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            with ph("decode: norms, residual"):
                h = self._add_norm(x, pending, layer.input_layernorm)
            with ph("decode: q/k/v/o projections, rope"):
                q, k, v = self._project(i, attn, h, cos, sin, step[0])
            with ph("decode: attention over the cache"):
                o = self._attend_layer(i, q, k, v, step, attn.scaling)
            with ph("decode: q/k/v/o projections, rope"):
                o = self._linear(attn.o_proj, o.reshape(a, 1, -1).to(self.weights_dtype))
            with ph("decode: norms, residual"):
                h = self._add_norm(x, o, layer.post_attention_layernorm)
            with ph("decode: MLP"):
                pending = self._mlp(layer.mlp, h)
        with ph("decode: norms, residual"):
            h = self._add_norm(x, pending, self.inner.norm)
        with ph("decode: lm_head"):
            return self.lm_head(h[:, 0], reuse=True)

    def _project(self, i: int, attn: Any, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, flat: torch.Tensor):
        """A decode step's rotated q, k and v. With the rope kernel (fp32 on CPU, packed linears, q/k/v fusable):
        one matmul for the three, one C++ pass that rotates q and k (bitwise torch's rounding) and writes k and v
        into layer i's cache at `flat` (`_write_index`; k, v come back as None); else torch's way (`_qkv`)."""
        a, hd = h.shape[0], self.head_dim
        width = (self.heads + 2 * self.kv_heads) * hd
        qkv = self.linears.qkv(attn, h) if self.rope_kernel is not None and cos.shape == (a, 1, hd) else None
        if qkv is None or qkv.shape != (a, 1, width) or not qkv.is_contiguous() or qkv.dtype != torch.float32:
            return self._qkv(attn, h, cos, sin)  # partial rotary, odd projection sizes, ...: torch's way
        qkv = qkv.view(a, width)
        q = torch.empty(a, self.heads, 1, hd, dtype=torch.float32)
        self._rope(qkv, cos, sin, q, self.kv[i, 0], self.kv[i, 1], flat, a)
        return q, None, None

    def _rope(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, kc: torch.Tensor,
              vc: torch.Tensor, index: torch.Tensor, rows: int) -> None:
        """The rope kernel over `rows` rows of a fused [q | k | v] projection (last dim contiguous, rows a
        `qkv.stride(-2)` apart): rotated q into `q`, k and v into `kc` / `vc` at the rows `index` names (callers
        check it: the kernel writes without bounds checks)."""
        hd, p, size = self.head_dim, qkv.data_ptr(), qkv.element_size()
        rc = self.rope_kernel(p, p + self.heads * hd * size, p + (self.heads + self.kv_heads) * hd * size,
                              qkv.stride(-2), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), kc.data_ptr(),
                              vc.data_ptr(), index.data_ptr(), rows, self.heads, self.kv_heads, hd)
        if rc != 0:
            raise RuntimeError(f"the rope kernel refused its arguments (code {rc})")

    def _check_write_index(self, flat: torch.Tensor, a: int) -> None:
        """The rope kernel writes where `flat` says without bounds checks: check the step's indices once."""
        rows = self.kv[0, 0].numel() // self.head_dim
        if (flat.dtype != torch.int64 or not flat.is_contiguous() or flat.numel() != a * self.kv_heads
                or (a and not (0 <= int(flat.min()) and int(flat.max()) < rows))):
            raise ValueError(f"the step's cache write index does not fit the cache's {rows} rows")

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: Any) -> torch.Tensor:
        """x += delta (in place: x is the step's own residual stream), then norm(x). A Llama-family RMSNorm over
        fp32 on CPU runs as one C++ pass per row (csrc/rms_norm.cpp, equal to float rounding); else torch."""
        known = self._rms_norms.get(id(norm))  # (weight pointer, eps) of the model's RMSNorms the kernel takes
        if known is not None and x.dtype == torch.float32 and x.is_contiguous() and x.shape[-1] == known[2] and (
                delta is None or (delta.is_contiguous() and delta.shape == x.shape and delta.dtype == x.dtype)):
            out = torch.empty_like(x)
            rc = self.norm_kernel(x.data_ptr(), None if delta is None else delta.data_ptr(), known[0],
                                  out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], known[1])
            if rc != 0:
                raise RuntimeError(f"the RMSNorm kernel refused its arguments (code {rc})")
            return out
        if delta is not None:
            x.add_(delta)
        return norm(x)

    def _store_prompt(self, i: int, k: torch.Tensor, v: torch.Tensor, row0: int, copies: int) -> None:
        """Layer i's prompt KV [prompt, kv_head, t, head_dim] into `copies` consecutive slots per prompt."""
        b, t = k.shape[0], k.shape[2]
        rows = slice(row0, row0 + b * copies)
        self.kv[i, 0, rows, :, :t] = k.repeat_interleave(copies, 0) if copies > 1 else k
        self.kv[i, 1, rows, :, :t] = v.repeat_interleave(copies, 0) if copies > 1 else v

    def _step(self, lens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """What every layer of one decode step shares: where each row's new KV goes, the length mask."""
        a = lens.shape[0]
        flat = self._write_index(lens)
        cols = torch.arange(width, device=self.device)
        mask = torch.zeros(a, 1, 1, width, dtype=self.dtype, device=self.device)
        mask.masked_fill_((cols.unsqueeze(0) > lens.unsqueeze(1)).view(a, 1, 1, width), float("-inf"))
        return flat, mask, width

    def _attend_layer(self, i: int, q, k, v, step, scaling: float) -> torch.Tensor:
        """Write the step's KV into layer i's cache and attend over it."""
        flat, mask, width = step
        kc, vc = self._write(i, k, v, flat)
        return self._attend(q, kc, vc, mask, q.shape[0], width, scaling)

    def _write_index(self, cols: torch.Tensor) -> torch.Tensor:
        """Flat row indices into a layer's K (or V) viewed as [slot x kv_head x column, head_dim] where row i's
        step goes: slot i, column cols[i], every kv head."""
        heads = torch.arange(self.kv_heads, device=self.device)
        rows = torch.arange(cols.shape[0], device=self.device)
        return ((rows.unsqueeze(1) * self.kv_heads + heads) * self.kv.shape[4] + cols.unsqueeze(1)).view(-1)

    def _write(self, i: int, k: torch.Tensor, v: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's K and V into layer i's slots at `flat` (`_write_index`); return the layer's K, V. None
        for k and v: the rope kernel has written them (`_project`)."""
        kc, vc = self.kv[i, 0], self.kv[i, 1]
        if k is None:
            return kc, vc
        kc.view(-1, self.head_dim).index_copy_(0, flat, k.reshape(-1, self.head_dim).to(self.dtype))
        vc.view(-1, self.head_dim).index_copy_(0, flat, v.reshape(-1, self.head_dim).to(self.dtype))
        return kc, vc

    def _attend(self, q, kc, vc, mask, a: int, width: int, scaling: float) -> torch.Tensor:
        """Each row's query heads against its own cache columns [0, width). Batched matmuls over (row, kv head)
        read the cache in place (the 4-d `torch.matmul` copied K and V to contiguous memory first); bitwise the
        same result."""
        rows, hd = a * self.kv_heads, self.head_dim
        qg = q.reshape(rows, self.group, hd).to(self.dtype)
        k = kc[:a, :, :width].reshape(rows, width, hd)  # a view: slot and head strides merge
        v = vc[:a, :, :width].reshape(rows, width, hd)
        scores = torch.bmm(qg, k.transpose(1, 2)).view(a, self.heads, width)
        scores.mul_(scaling).add_(mask.view(a, 1, width))
        p = torch.softmax(scores.float(), dim=-1).to(qg.dtype)
        return torch.bmm(p.view(rows, self.group, width), v)

    def compact(self, dst: Sequence[int], src: Sequence[int], lens: Sequence[int], rows: int) -> None:
        """Rows src[j] (lens[j] columns filled) move into rows dst[j]; rows from `rows` on are gone."""
        if dst:
            self.move(dst, src, lens)

    def move(self, dst: Sequence[int], src: Sequence[int], lens: Sequence[int]) -> None:
        """Copy slot src[j]'s first lens[j] cache columns into slot dst[j] (in place: no gathered temporary)."""
        for d, s, n in zip(dst, src, lens, strict=True):
            self.kv[:, :, d, :, :n].copy_(self.kv[:, :, s, :, :n])


RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * (x * rsqrt(mean(x^2) + eps)), in fp32


def _is_rms_norm(m: Any) -> bool:
    w = getattr(m, "weight", None)
    return (type(m).__name__ in RMS_NORMS and isinstance(w, torch.Tensor) and w.dtype == torch.float32
            and w.is_contiguous() and isinstance(getattr(m, "variance_epsilon", None), float)
            and not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__)


def check_kernel(fn: Any) -> str | None:
    """None if the RMSNorm kernel (with and without the residual add) agrees with the Llama-family RMSNorm to float
    rounding on fixed random rows, else how far it is off."""
    gen = torch.Generator().manual_seed(0)
    x, d, w = (torch.randn(5, 77, generator=gen) for _ in range(3))
    w = w[0].contiguous()
    want_x = x + d
    want = w * (want_x * torch.rsqrt(want_x.pow(2).mean(-1, keepdim=True) + 1e-5))
    out = torch.empty_like(x)
    rc = fn(x.data_ptr(), d.data_ptr(), w.data_ptr(), out.data_ptr(), 5, 77, 1e-5)
    plain = torch.empty_like(x)
    rc2 = fn(x.data_ptr(), None, w.data_ptr(), plain.data_ptr(), 5, 77, 1e-5)
    err = max(float((x - want_x).abs().max()), float((out - want).abs().max()), float((plain - want).abs().max()))
    return None if rc == rc2 == 0 and err <= 1e-5 else f"disagrees with torch's RMSNorm by {err:.2e} (codes {rc}, {rc2})"


def check_rope(fn: Any) -> str | None:
    """None if the rope kernel's q and cache writes are bitwise torch's (x * cos + rotate_half(x) * sin, copies) and
    it writes no other cache row, at a tiny and at SmolLM2's head size."""
    gen = torch.Generator().manual_seed(0)
    for a, heads, kvh, hd in ((5, 6, 2, 16), (3, 9, 3, 64)):
        qkv = torch.randn(a, (heads + 2 * kvh) * hd + 3, generator=gen)  # 3 floats of padding: a row stride apart
        cos, sin = torch.randn(a, hd, generator=gen), torch.randn(a, hd, generator=gen)
        kc, vc = torch.zeros(a * kvh + 4, hd), torch.zeros(a * kvh + 4, hd)
        order = torch.randperm(a * kvh + 4, generator=gen)
        dst, rest = order[: a * kvh].contiguous(), order[a * kvh :]
        q = torch.empty(a, heads, hd)
        p, s = qkv.data_ptr(), qkv.element_size()
        rc = fn(p, p + heads * hd * s, p + (heads + kvh) * hd * s, qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
                q.data_ptr(), kc.data_ptr(), vc.data_ptr(), dst.data_ptr(), a, heads, kvh, hd)
        c, sn = cos.unsqueeze(1), sin.unsqueeze(1)
        qs, ks = qkv[:, : heads * hd].reshape(a, heads, hd), qkv[:, heads * hd : (heads + kvh) * hd].reshape(a, kvh, hd)
        vs = qkv[:, (heads + kvh) * hd : -3].reshape(-1, hd)
        ok = (rc == 0 and torch.equal(q, qs * c + _rotate_half(qs) * sn)
              and torch.equal(kc[dst], (ks * c + _rotate_half(ks) * sn).reshape(-1, hd)) and torch.equal(vc[dst], vs)
              and not kc[rest].any() and not vc[rest].any())
        if not ok:
            return f"is not bitwise torch's rotary embedding and cache write at head_dim {hd} (code {rc})"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
