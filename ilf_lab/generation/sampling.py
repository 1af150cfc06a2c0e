"""Engine-independent pieces of sampling: per-sample seeds, temperature + top-p token choice, stop strings.

Randomness is one uniform number per sample per step, drawn from that sample's own `torch.Generator`, and the
token is chosen by inverting the (top-p filtered) CDF. So a sample's tokens depend only on its seed and on its
own logits, never on which other sequences share the batch, and no vocab-sized random tensor is drawn.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from ilf_lab.generation.kernels import kernel, kernel_error

# top-p looks at the K most likely tokens first and sorts the full vocabulary only for rows whose nucleus is
# larger (a flat distribution); exact either way.
TOPK_FIRST = 64


def sample_seed(seed: int, prompt: str, occurrence: int, sample: int) -> int:
    """A 63-bit seed for sample `sample` of `prompt`: independent of the other prompts of the call (the same
    prompt gets the same samples in any batch); repeated prompts (`occurrence`) get fresh samples."""
    h = hashlib.sha256(f"{seed}\x00{occurrence}\x00{sample}\x00{prompt}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def prompt_seeds(prompts: Sequence[str], seed: int, n: int) -> list[list[int]]:
    """Seeds for every (prompt, sample), see `sample_seed`."""
    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        occ = seen.get(p, 0)
        seen[p] = occ + 1
        out.append([sample_seed(seed, p, occ, j) for j in range(n)])
    return out


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()  # CPU: one tiny draw per step, device-independent results
    g.manual_seed(seed)
    return g


def draw_uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One U(0,1) per row from that row's generator."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])


def choose_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor | None, use_kernel: bool = True
) -> torch.Tensor:
    """Next token per row: argmax when temperature == 0, else temperature + nucleus (top-p) sampling by
    inverse CDF with the given per-row uniforms. Same distribution as HF's TemperatureLogitsWarper +
    TopPLogitsWarper (keep the most likely tokens until their mass reaches top_p, at least one). fp32 logits on
    CPU go through the C++ kernel where it builds (csrc/top_p.cpp: the same choice to float rounding, ~5 x
    faster at a decode step's shapes); the rows it leaves, and everything else, through torch."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if use_kernel and 0 < top_p < 1 and (out := _kernel_choose(logits, temperature, top_p, uniforms)) is not None:
        return out
    return _torch_choose(logits, temperature, top_p, uniforms)


def _kernel_choose(logits: torch.Tensor, temperature: float, top_p: float, uniforms) -> torch.Tensor | None:
    """The kernel's choice, with the rows it leaves (-1: a nucleus wider than TOPK_FIRST, logits not finite)
    chosen by torch; None where the kernel does not apply or cannot run here."""
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1
            or logits.stride(0) < logits.shape[1] or logits.shape[0] == 0 or uniforms is None
            or uniforms.numel() != logits.shape[0] or kernel_error("ilf_top_p") is not None):
        return None
    rows, vocab = logits.shape
    u = uniforms.to("cpu", torch.float64).contiguous()
    out = torch.empty(rows, dtype=torch.long)
    k = min(TOPK_FIRST, vocab)
    rc = kernel("ilf_top_p")(logits.data_ptr(), rows, vocab, logits.stride(0), temperature, top_p, u.data_ptr(), k,
                             out.data_ptr(), torch.get_num_threads())
    if rc != 0:  # arguments it does not take (a temperature that rounds to 0 in fp32): torch's path decides
        return None
    left = (out < 0).nonzero().squeeze(1)
    if left.numel():
        out[left] = _torch_choose(logits[left], temperature, top_p, u[left])
    return out


def check_kernel(fn) -> str | None:
    """None if the kernel picks what torch's path picks on fixed random rows (peaked and flat ones, several
    temperatures and top_p), else what differs."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(48, 1000, generator=gen) * torch.linspace(0.5, 12, 48).unsqueeze(1)
    u = torch.rand(48, generator=gen, dtype=torch.float64)
    for t, p in ((0.8, 0.95), (0.2, 0.9), (1.5, 0.5)):
        out = torch.empty(48, dtype=torch.long)
        rc = fn(logits.data_ptr(), 48, 1000, 1000, t, p, u.data_ptr(), TOPK_FIRST, out.data_ptr(), 1)
        want = _torch_choose(logits, t, p, u)
        wide = out < 0
        if rc != 0 or not wide[-8:].logical_not().all() or not (out[~wide] == want[~wide]).all():
            return f"picks other tokens than torch's top-p at T={t}, top_p={p} (code {rc})"
        if t == 0.8 and not wide[:4].all():  # the flattest rows' nucleus is wider than TOPK_FIRST: torch's
            return "keeps rows whose nucleus is wider than its candidates"
    return None


def _torch_choose(
    logits: torch.Tensor, temperature: float, top_p: float, uniforms: torch.Tensor | None
) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = uniforms.to(probs.device, torch.float64)
    rows = probs.shape[0]
    if top_p >= 1.0:  # inverse CDF over the vocabulary order needs no sort
        cdf = probs.double().cumsum(dim=-1)
        target = (u * cdf[:, -1]).unsqueeze(1)
        idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return idx.clamp_(max=probs.shape[1] - 1)
    k = min(TOPK_FIRST, probs.shape[1])
    top_probs, top_idx = probs.topk(k, dim=-1)  # sorted descending
    out = torch.empty(rows, dtype=torch.long, device=probs.device)
    wide = top_probs.sum(dim=-1) < top_p  # nucleus extends past the top K: sort the whole row
    narrow = ~wide
    if narrow.any():
        out[narrow] = _nucleus_pick(top_probs[narrow], top_idx[narrow], top_p, u[narrow])
    if wide.any():
        sp, si = probs[wide].sort(dim=-1, descending=True)
        out[wide] = _nucleus_pick(sp, si, top_p, u[wide])
    return out


def _nucleus_pick(
    sorted_probs: torch.Tensor, sorted_idx: torch.Tensor, top_p: float, u: torch.Tensor
) -> torch.Tensor:
    cdf = sorted_probs.double().cumsum(dim=-1)
    before = cdf - sorted_probs.double()
    keep = before < top_p
    keep[:, 0] = True
    kept = torch.where(keep, sorted_probs.double(), torch.zeros((), dtype=torch.float64, device=cdf.device))
    kcdf = kept.cumsum(dim=-1)
    target = (u * kcdf[:, -1]).unsqueeze(1)
    pos = torch.searchsorted(kcdf, target, right=True)
    pos = torch.minimum(pos, keep.sum(dim=-1, keepdim=True) - 1)
    return sorted_idx.gather(1, pos).squeeze(1)


class StopChecker:
    """Finds stop strings by decoding only the last few tokens of a sequence (a stop string that ends at the
    newest token lies within them), so checking costs O(window) per step, not O(length)."""

    def __init__(self, tokenizer, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        # every token carries at least one byte of text, so a stop of b bytes spans at most b + 1 tokens;
        # a little slack covers tokenizers that drop a leading space when decoding a fragment
        self.window = max((len(s.encode()) for s in self.stop), default=0) + 3

    def hits(self, token_lists: Sequence[Sequence[int]]) -> list[bool]:
        """Whether each sequence's text now contains a stop string (checked at its tail)."""
        if not self.stop or not token_lists:
            return [False] * len(token_lists)
        tails = self.tokenizer.batch_decode(
            [list(t[-self.window :]) for t in token_lists], skip_special_tokens=False
        )
        return [any(s in text for s in self.stop) for text in tails]

    def finish(self, tokens: Sequence[int], eos_ids: frozenset[int]) -> str:
        """The returned completion: all new tokens decoded (EOS removed), cut before the first stop string."""
        text = self.tokenizer.decode([t for t in tokens if t not in eos_ids], skip_special_tokens=False)
        return cut_at_stop(text, self.stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]
