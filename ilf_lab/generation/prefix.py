"""The slots backend's default cache: each prompt's KV held once and shared by its n samples.

`SlotCache` copies a prompt's KV into each of its n slots, so every decode step reads the prompt n times; on
refine prompts (hundreds of tokens, 128 new) that read is most of a step. Here a prompt's KV lives in a prompt
slot and each row's own slot holds only its generated tokens. A step attends in two parts: the queries of a
prompt's rows, stacked on a grid [prompt slot, sample], against the prompt's KV (read once for all its rows),
and each row against its own columns; the two are merged into one softmax as flash-decoding does (each part's
max score and sum of exponentials). Prompt slots are attended in contiguous runs, each at its own longest
prompt's width, so one long prompt does not widen every prompt's scores (`_runs`). Same model, same positions;
the sums are split differently, so logits agree with `SlotCache` to float rounding, not bitwise
(results/sampling/README.md: pass@k and speed). `sampling.prompt_kv=copy` selects `SlotCache`. On CPU the two
parts run by default in one pass of a C++ kernel per (prompt, kv head) (attention.py, `sampling.attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ilf_lab.generation.attention import DecodeAttention, keys_blocked, padded
from ilf_lab.generation.packed import PackedLinears
from ilf_lab.generation.pages import zeroed
from ilf_lab.generation.phases import OFF, Phases
from ilf_lab.generation.slots import SlotCache


class SharedPromptCache(SlotCache):
    """Own cache [layer, k|v, row slot, kv_head, new token, head_dim] (SlotCache's, `max_new` columns) plus a
    prompt store [layer, k|v, prompt slot, kv_head, position, head_dim] (for the kernel, keys blocked and the
    positions whole blocks: attention.keys_blocked). A prompt stays in its slot until its last row ends; its slot is
    then a hole (no rows, length 1; its KV stays, read by no row) that the next prompt admitted takes, the lowest
    first, and holes at the end are dropped. On CPU a slot's pages stay mapped for that next prompt (a fresh page
    costs a fault, 8-26 us on a host that takes freed memory back; moving prompts down into holes and freeing the
    slots they left cost refine ~50 k faults a call, session 21). So a slot holds the longest prompt admitted to it,
    each a distinct prompt of the call, in at most as many slots as prompts were live at once (at most the rows):
    what the batch sizing counts (hf.py). Rows move and leave only through `compact` (it keeps the row -> prompt map
    in step)."""

    # a run's fixed cost in prompt slots x columns (its per-layer calls), against the columns a wider run computes
    RUN_COST = 1024

    def __init__(
        self, model: Any, slots: int, max_prompt: int, max_new: int, phases: Phases = OFF,
        linears: PackedLinears | None = None, attention: str = "matmul",
    ) -> None:
        super().__init__(model, slots, max(1, max_new), phases, linears)
        cfg = model.config
        # attention=kernel: the C++ kernel (attention.py) in place of the grid matmuls below; it reads the store's
        # keys in blocks of 64 positions, each transposed (keys_blocked), so the store holds whole blocks
        self.blocked = attention == "kernel"
        # a prompt has at least one active row, so `slots` prompt slots always suffice (on CPU untouched pages
        # cost nothing; on GPU the engine sizes the batch for prompt + new tokens per row, as for SlotCache)
        positions = padded(max_prompt) if self.blocked else max_prompt
        shape = (cfg.num_hidden_layers, 2, slots, self.kv_heads, positions, self.head_dim)
        self.pkv = zeroed(shape, self.dtype, self.device, reuse=True)
        self.row_prompt: list[int] = []  # prompt slot of each active row
        self.row_sample: list[int] = []  # its column on the grid (the sample's index within its prompt)
        self.row_own: list[int] = []  # generated tokens in each row's own cache (host-side: no device sync)
        self.prompt_len: list[int] = []  # tokens of each prompt slot in use (a hole's: 1)
        self.prompt_rows: list[int] = []  # live rows of each prompt slot in use (0: a hole)
        self.grid = 1  # samples per prompt (the grid's width)
        self._runs_of: tuple[tuple[int, ...], list[tuple[int, int]]] = ((), [])  # prompt lengths -> runs
        self._new: list[int] = []  # the prompt slots of the prompts being prefilled
        self._lens: list[int] = []  # and their lengths
        self.kernel = DecodeAttention(self.pkv, self.kv, self.heads) if self.blocked else None

    def prefill(self, prompts: Sequence[Sequence[int]], row0: int, copies: int) -> torch.Tensor:
        if row0 != len(self.row_prompt):
            raise ValueError(f"rows are appended: row0 {row0} != {len(self.row_prompt)} active rows")
        self._check_prefix(prompts)  # before the row map changes
        holes = [p for p, n in enumerate(self.prompt_rows) if n == 0]
        self._new = (holes + list(range(len(self.prompt_len), len(self.prompt_len) + len(prompts))))[: len(prompts)]
        self._lens = [len(ids) for ids in prompts]
        for q, t in zip(self._new, self._lens, strict=True):
            if q == len(self.prompt_len):
                self.prompt_len.append(0)
                self.prompt_rows.append(0)
            self.prompt_len[q], self.prompt_rows[q] = t, copies
            self.row_prompt.extend([q] * copies)
            self.row_sample.extend(range(copies))
            self.row_own.extend([0] * copies)
        self.grid = max(self.grid, copies)
        return super().prefill(prompts, row0, copies)

    def _store_prompt(self, i: int, k: torch.Tensor, v: torch.Tensor, row0: int, copies: int) -> None:
        """Layer i's K and V of the prompts being prefilled (right-padded to the run's longest) into their slots,
        each only as far as its own length (keys: whole blocks), so a slot's pages are what the sizing counts."""
        if self.blocked:  # whole blocks, each transposed; a block's columns past the run's end zero
            t = padded(k.shape[2])
            k = keys_blocked(torch.nn.functional.pad(k, (0, 0, 0, t - k.shape[2])))
        for p, (q, t) in enumerate(zip(self._new, self._lens, strict=True)):
            self.pkv[i, 1, q, :, :t] = v[p, :, :t]
            w = padded(t) if self.blocked else t
            self.pkv[i, 0, q, :, :w] = k[p, :, :w]

    def _step(self, lens: torch.Tensor, width: int):
        """What every layer of the step shares, from the host-side row map (`width`, the copied cache's, does not
        apply here): where each row's KV goes, each (row, kv head)'s place on the grid, the runs of prompt slots
        with their widths and length masks, the own columns' mask, and the grid's output buffers."""
        a, dev, dt = lens.shape[0], self.device, self.dtype
        m, n, kvh, g, hd = len(self.prompt_len), self.grid, self.kv_heads, self.group, self.head_dim
        own_cols = self.row_own[:a]  # each row's own column that takes this step's token
        self.row_own[:a] = [x + 1 for x in own_cols]  # one decode step = one _step call
        own = torch.tensor(own_cols, device=dev)
        flat = self._write_index(own)
        if self.kernel is not None:  # the kernel reads the row map itself (attention.py)
            return flat, self.kernel.plan(self.row_prompt[:a], self.prompt_len, self.row_own[:a])
        prompt = torch.tensor(self.row_prompt[:a], device=dev)
        sample = torch.tensor(self.row_sample[:a], device=dev)
        gw = max(own_cols) + 1
        own_mask = torch.zeros(a, 1, 1, gw, dtype=torch.float32, device=dev)
        own_mask.masked_fill_((torch.arange(gw, device=dev) > own.unsqueeze(1)).view(a, 1, 1, gw), float("-inf"))
        runs = []
        for p0, p1 in self._runs():
            plen = torch.tensor(self.prompt_len[p0:p1], device=dev)
            w = max(self.prompt_len[p0:p1])
            mask = torch.zeros(p1 - p0, 1, 1, w, dtype=torch.float32, device=dev)
            mask.masked_fill_((torch.arange(w, device=dev) >= plen.unsqueeze(1)).view(-1, 1, 1, w), float("-inf"))
            runs.append((p0, p1, w, mask))
        # the grid [prompt, kv_head, sample] as rows: (row r, head h) sits at (prompt_r * kvh + h) * n + sample_r
        place = ((prompt.unsqueeze(1) * kvh + torch.arange(kvh, device=dev)) * n + sample.unsqueeze(1)).view(-1)
        # zeroed once per step, not per layer: a place no row holds keeps a finite value from an earlier layer,
        # and only its own grid row of each matmul (read by no row) sees it
        qbuf = torch.zeros(m * kvh * n, g * hd, dtype=dt, device=dev)
        obuf = torch.zeros(m * kvh, n * g, hd, dtype=torch.float32, device=dev)  # unnormalised prompt part
        stats = torch.zeros(2, m * kvh, n * g, dtype=torch.float32, device=dev)  # its max score, sum of exp
        return flat, own_mask, runs, place, qbuf, obuf, stats, gw

    def _runs(self) -> list[tuple[int, int]]:
        """Prompt slots in contiguous runs, each attended at its own longest prompt's width: one long prompt
        among short ones (MBPPTrain task 493's x0 is ~4k tokens, its neighbours ~500) no longer makes every
        prompt's scores that wide. Minimum of sum(RUN_COST + slots x width) by dynamic programming, kept until
        the prompts change (prefill, compaction)."""
        lens = tuple(self.prompt_len)
        if self._runs_of[0] != lens:
            best, cut = [0.0] * (len(lens) + 1), [0] * (len(lens) + 1)
            for j in range(1, len(lens) + 1):
                best[j], w = float("inf"), 0
                for i in range(j - 1, -1, -1):
                    w = max(w, lens[i])
                    if self.RUN_COST + (j - i) * w >= best[j]:
                        break  # a longer run only costs more (best[i] >= 0, w grows)
                    c = best[i] + self.RUN_COST + (j - i) * w
                    if c < best[j]:
                        best[j], cut[j] = c, i
            runs, j = [], len(lens)
            while j:
                runs.append((cut[j], j))
                j = cut[j]
            self._runs_of = (lens, runs[::-1])
        return self._runs_of[1]

    def _attend_layer(self, i: int, q, k, v, step, scaling: float) -> torch.Tensor:
        """Attention in two parts merged as flash-decoding does: the prompt part per run on the grid, the own
        part per row, each with its max score and sum of exponentials; the parts are rescaled to the larger max."""
        if self.kernel is not None:  # the same two parts, in one pass per (prompt, kv head) (attention.py)
            flat, plan = step
            self._write(i, k, v, flat)
            return self.kernel(i, q, plan, scaling)
        flat, own_mask, runs, place, qbuf, obuf, stats, gw = step
        a, kvh, g, hd, n = q.shape[0], self.kv_heads, self.group, self.head_dim, self.grid
        kc, vc = self._write(i, k, v, flat)
        qg = q.reshape(a * kvh, g * hd).to(self.dtype)
        qbuf.index_copy_(0, place, qg)
        for p0, p1, w, mask in runs:  # the prompt part: each prompt's rows on the grid, one matmul per run
            b0, b1 = p0 * kvh, p1 * kvh
            kp = self.pkv[i, 0, p0:p1, :, :w].reshape(b1 - b0, w, hd)  # views: slot and head strides merge
            vp = self.pkv[i, 1, p0:p1, :, :w].reshape(b1 - b0, w, hd)
            s = torch.bmm(qbuf.view(-1, n * g, hd)[b0:b1], kp.transpose(1, 2)).float()
            s = s.view(p1 - p0, kvh, n * g, w).mul_(scaling).add_(mask).view(b1 - b0, n * g, w)
            top = s.amax(-1, keepdim=True)
            e = s.sub_(top).exp_()
            stats[0, b0:b1] = top.squeeze(-1)
            torch.sum(e, -1, out=stats[1, b0:b1])
            obuf[b0:b1] = torch.bmm(e.to(self.dtype), vp)
        rows = place.view(a * kvh)
        op = obuf.view(-1, g * hd).index_select(0, rows).view(a * kvh, g, hd)
        mp, zp = stats.view(2, -1, g).index_select(1, rows).view(2, a * kvh, g, 1).unbind(0)
        # the own part: each row against its generated tokens
        ko = kc[:a, :, :gw].reshape(a * kvh, gw, hd)
        vo = vc[:a, :, :gw].reshape(a * kvh, gw, hd)
        so = torch.bmm(qg.view(a * kvh, g, hd), ko.transpose(1, 2)).float()
        so = so.view(a, kvh, g, gw).mul_(scaling).add_(own_mask).view(a * kvh, g, gw)
        mo = so.amax(-1, keepdim=True)
        eo = so.sub_(mo).exp_()
        zo = eo.sum(-1, keepdim=True)
        oo = torch.bmm(eo.to(self.dtype), vo).float()
        top = torch.maximum(mp, mo)
        ap, ao = (mp - top).exp_(), (mo - top).exp_()
        out = op.mul_(ap).add_(oo.mul_(ao)).div_(zp.mul(ap).add_(zo.mul_(ao)))
        return out.to(self.dtype)

    def move(self, dst: Sequence[int], src: Sequence[int], lens: Sequence[int]) -> None:
        raise NotImplementedError("SharedPromptCache moves rows only through compact (it keeps the row map)")

    def compact(self, dst: Sequence[int], src: Sequence[int], lens: Sequence[int], rows: int) -> None:
        """Move rows (own columns only), drop rows from `rows` on, free the prompts left without rows."""
        for d, s, n in zip(dst, src, lens, strict=True):
            own = self.row_own[s]
            if own != n - self.prompt_len[self.row_prompt[s]]:
                raise RuntimeError(f"row {s}: {own} own columns, but the scheduler counts {n} in all")
            self.kv[:, :, d, :, :own].copy_(self.kv[:, :, s, :, :own])
            self.row_prompt[d], self.row_sample[d], self.row_own[d] = self.row_prompt[s], self.row_sample[s], own
        del self.row_prompt[rows:], self.row_sample[rows:], self.row_own[rows:]
        # a prompt without rows leaves a hole for the next one (its pages stay; no row reads them); the holes at
        # the end go. Each prompt's rows take grid columns 0..c-1 (c: its live rows), so the grid narrows
        # as prompts drain
        count = [0] * len(self.prompt_len)
        for r, p in enumerate(self.row_prompt):
            self.row_sample[r], count[p] = count[p], count[p] + 1
        self.prompt_rows = count
        for p, rows_left in enumerate(count):
            if rows_left == 0:  # a hole: one position, so the matmul path's runs stay as narrow as their live prompts
                self.prompt_len[p] = 1
        while self.prompt_rows and self.prompt_rows[-1] == 0:
            self.prompt_rows.pop()
            self.prompt_len.pop()
        self.grid = max(count, default=1)
