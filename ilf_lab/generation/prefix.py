"""The slots backend's default cache: each prompt's KV held once and shared by its n samples.

`SlotCache` copies a prompt's KV into each of its n slots, so every decode step reads the prompt n times; on
refine prompts (hundreds of tokens, 128 new) that read is most of a step. Here a prompt's KV lives in a prompt
slot and each row's own slot holds only its generated tokens. A step attends in two parts that share one
softmax: the queries of a prompt's rows, stacked on a grid [prompt slot, sample], against the prompt's KV (read
once for all its rows), and each row against its own columns. Same model, same positions; the sums are split
differently, so logits agree with `SlotCache` to float rounding, not bitwise; zero-shot pass@k on MBPPTest was
the same on every task at two seeds, and refine prompts sample 1.26-1.27 x faster (results/sampling/README.md).
`sampling.prompt_kv=copy` selects `SlotCache` (the default before session 9).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ilf_lab.generation.phases import OFF, Phases
from ilf_lab.generation.slots import SlotCache, zeroed_cpu


class SharedPromptCache(SlotCache):
    """Own cache [layer, k|v, row slot, kv_head, new token, head_dim] (SlotCache's, `max_new` columns) plus a
    prompt store [layer, k|v, prompt slot, kv_head, position, head_dim]. Active prompts occupy prompt slots
    0..m-1: when prompts lose their last row, live prompts from slots past the new count move into the holes.
    Rows move and leave only through `compact` (it keeps the row -> prompt map in step)."""

    def __init__(self, model: Any, slots: int, max_prompt: int, max_new: int, phases: Phases = OFF) -> None:
        super().__init__(model, slots, max(1, max_new), phases)
        cfg = model.config
        # a prompt has at least one active row, so `slots` prompt slots always suffice (on CPU untouched pages
        # cost nothing; on GPU the engine sizes the batch for prompt + new tokens per row, as for SlotCache)
        shape = (cfg.num_hidden_layers, 2, slots, self.kv_heads, max_prompt, self.head_dim)
        if self.device.type == "cpu":
            self.pkv = zeroed_cpu(shape, self.dtype)
        else:
            self.pkv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.row_prompt: list[int] = []  # prompt slot of each active row
        self.row_sample: list[int] = []  # its column on the grid (the sample's index within its prompt)
        self.row_own: list[int] = []  # generated tokens in each row's own cache (host-side: no device sync)
        self.prompt_len: list[int] = []  # tokens of each active prompt slot
        self.grid = 1  # samples per prompt (the grid's width)
        self._first_prompt = 0  # the prompt slot the current prefill starts at

    def prefill(self, prompts: Sequence[Sequence[int]], row0: int, copies: int) -> torch.Tensor:
        if row0 != len(self.row_prompt):
            raise ValueError(f"rows are appended: row0 {row0} != {len(self.row_prompt)} active rows")
        self._first_prompt = len(self.prompt_len)
        for p, ids in enumerate(prompts):
            self.prompt_len.append(len(ids))
            self.row_prompt.extend([self._first_prompt + p] * copies)
            self.row_sample.extend(range(copies))
            self.row_own.extend([0] * copies)
        self.grid = max(self.grid, copies)
        return super().prefill(prompts, row0, copies)

    def _store_prompt(self, i: int, k: torch.Tensor, v: torch.Tensor, row0: int, copies: int) -> None:
        p0, b, t = self._first_prompt, k.shape[0], k.shape[2]
        self.pkv[i, 0, p0 : p0 + b, :, :t] = k
        self.pkv[i, 1, p0 : p0 + b, :, :t] = v

    def _step(self, lens: torch.Tensor, width: int):
        """As SlotCache's, from the host-side row map (`width`, the copied cache's, does not apply here)."""
        a, dev = lens.shape[0], self.device
        prompt = torch.tensor(self.row_prompt[:a], device=dev)
        sample = torch.tensor(self.row_sample[:a], device=dev)
        plen = torch.tensor(self.prompt_len, device=dev)[prompt]
        own = torch.tensor(self.row_own[:a], device=dev)  # the row's own column that takes this step's token
        gw, pw = max(self.row_own[:a]) + 1, max(self.prompt_len)
        self.row_own[:a] = [x + 1 for x in self.row_own[:a]]  # one decode step = one _step call
        flat = self._write_index(own)
        cols_p, cols_o = torch.arange(pw, device=dev), torch.arange(gw, device=dev)
        hidden = torch.cat([cols_p.unsqueeze(0) >= plen.unsqueeze(1), cols_o.unsqueeze(0) > own.unsqueeze(1)], 1)
        mask = torch.zeros(a, 1, 1, pw + gw, dtype=self.dtype, device=dev)
        mask.masked_fill_(hidden.view(a, 1, 1, pw + gw), float("-inf"))
        return flat, mask, prompt, sample, pw, gw

    def _attend_layer(self, i: int, q, k, v, step, scaling: float) -> torch.Tensor:
        flat, mask, prompt, sample, pw, gw = step
        a, m, n, kvh, g, hd = q.shape[0], len(self.prompt_len), self.grid, self.kv_heads, self.group, self.head_dim
        kc, vc = self._write(i, k, v, flat)
        qg = q.reshape(a, kvh, g, hd).to(self.dtype)
        # the prompt part: each prompt's rows on a grid [prompt, kv_head, sample x group], one matmul per prompt
        grid = qg.new_zeros(m, n, kvh, g, hd)
        grid[prompt, sample] = qg
        kp = self.pkv[i, 0, :m, :, :pw].reshape(m * kvh, pw, hd)  # views: slot and head strides merge
        vp = self.pkv[i, 1, :m, :, :pw].reshape(m * kvh, pw, hd)
        sp = torch.bmm(grid.transpose(1, 2).reshape(m * kvh, n * g, hd), kp.transpose(1, 2))
        sp = sp.view(m, kvh, n, g, pw)[prompt, :, sample]  # [row, kv_head, group, pw]
        # the own part: each row against its generated tokens
        ko = kc[:a, :, :gw].reshape(a * kvh, gw, hd)
        vo = vc[:a, :, :gw].reshape(a * kvh, gw, hd)
        so = torch.bmm(qg.view(a * kvh, g, hd), ko.transpose(1, 2)).view(a, kvh, g, gw)
        scores = torch.cat([sp, so], dim=-1)
        scores.mul_(scaling).add_(mask)
        p = torch.softmax(scores.float(), dim=-1).to(qg.dtype)
        pgrid = p.new_zeros(m, kvh, n, g, pw)
        pgrid[prompt, :, sample] = p[..., :pw]
        op = torch.bmm(pgrid.view(m * kvh, n * g, pw), vp).view(m, kvh, n, g, hd)[prompt, :, sample]
        # op + the own part, summed inside one matmul call (on GPU half precision: one rounding less)
        return torch.baddbmm(op.reshape(a * kvh, g, hd), p[..., pw:].reshape(a * kvh, g, gw), vo)

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
        live = set(self.row_prompt)
        keep = len(live)
        holes = [p for p in range(keep) if p not in live]
        movers = [p for p in range(keep, len(self.prompt_len)) if p in live]
        remap = dict(zip(movers, holes, strict=True))
        for s, d in remap.items():
            t = self.prompt_len[s]
            self.pkv[:, :, d, :, :t].copy_(self.pkv[:, :, s, :, :t])
            self.prompt_len[d] = t
        del self.prompt_len[keep:]
        self.row_prompt = [remap.get(p, p) for p in self.row_prompt]
        # each prompt's rows take grid columns 0..c-1 (c: its live rows), so the grid narrows as prompts drain
        count = [0] * keep
        for r, p in enumerate(self.row_prompt):
            self.row_sample[r], count[p] = count[p], count[p] + 1
        self.grid = max(count, default=1)
