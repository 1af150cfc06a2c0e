"""Benchmark scripts keep contract 6 (last line: one JSON object with metric, value, baseline, ratio, unit).

The GPU throughput script runs here in its CPU plumbing mode (a tiny random model): the numbers mean nothing on
this machine, the point is that the script a GPU session runs once works end to end.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_throughput_script_plumbing_on_cpu(tmp_path):
    args = [
        "--device", "cpu", "--size", "tiny", "--precision", "32", "--steps", "2", "--warmup", "1",
        "--micro-batch", "2", "--seq-len", "64", "--prompts", "4", "--baseline-prompts", "2", "--n", "2",
        "--max-new-tokens", "8", "--prompt-len", "16", "--repeat-prompts", "2", "--out", str(tmp_path / "gpu.json"),
    ]
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), *args],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"metric", "value", "baseline", "ratio", "unit"} <= set(last)
    assert last["value"] > 0 and last["baseline"] > 0
    assert abs(last["ratio"] - last["value"] / last["baseline"]) < 1e-3
    s = last["sampling"]
    assert s["engine_tokens_per_s"] > 0 and s["generate_tokens_per_s"] > 0 and s["vllm_tokens_per_s"] is None
    # on CPU both hold: the same call repeats itself, and a subset of the prompts leaves each sample as it was
    assert s["same_call_same_samples"] is True and s["subset_call_same_samples"] is True
    assert s["subset_prompts"] < s["prompts"] and set(s["engine_batches"]) == {"timed", "repeat", "subset"}
    assert last["versions"]["transformers"] and last["train"]["final_loss"] > 0
    assert last["train"]["flops_per_token"] > 0 and last["mfu_datasheet"] is None  # fp32 on a CPU: no datasheet
    assert json.loads((tmp_path / "gpu.json").read_text()) == last


def test_sampling_benchmark_runs_both_prompt_sets_with_a_copied_prompt_kv(tmp_path):
    """The sampling benchmark end to end at toy sizes on SmolLM2 (its numbers mean nothing here): both prompt
    sets, the per-phase profile, the roofline share, and the option it measures reaching the engine."""
    import os

    import pytest

    data_dir = os.environ.get("ILF_LAB_DATA_DIR")
    if not data_dir:
        pytest.skip("ILF_LAB_DATA_DIR is not set (the prompts come from MBPP and the ILF annotations)")
    args = ["--prompts", "2", "--n", "3", "--max-new-tokens", "8", "--baseline-prompts", "1", "--threads", "1",
            "--prompt-kv", "copy", "--repeats", "2", "--cold", "--data-dir", data_dir,
            "--cache-dir", os.environ.get("ILF_LAB_CACHE_DIR", str(tmp_path / "cache"))]
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sampling.py"), *args],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"metric", "value", "baseline", "ratio", "unit"} <= set(last) and last["prompt_kv"] == "copy"
    assert "host: " in p.stdout and "; C++ kernels " in p.stdout  # what the numbers were measured on
    assert set(last["sets"]) == {"chat", "refine"}
    for s in last["sets"].values():
        assert s["value"] > 0 and s["baseline"] > 0 and 0 < s["roofline_share"]
        assert s["profile_s"]["decode: attention over the cache"] > 0 and s["profile_s"]["prefill"] > 0
        assert 0 < s["ceiling_share"] < 1 and s["ceiling_ratio"] > 0 and s["ceiling_seconds"] > 0
        # two calls, each with its own roofline; the reported share is the median call's; same seed, same samples
        assert len(s["calls"]) == 2 and s["same_samples_across_calls"] is True
        assert s["cold"] is True and all(c["faults"] > 0 and c["sys"] >= 0 for c in s["calls"])  # no reuse: faults
        assert round(s["roofline_share"], 2) in {round(c["share"], 2) for c in s["calls"]}
    assert "prompt KV copy" in p.stdout and "samples identical across the 2 calls" in p.stdout


def test_roofline_measures_each_kind_of_linear_the_engine_runs():
    """fp32 F.linear, oneDNN packed, and (where the host has native bf16) the bf16-packed opt-in, each a positive
    rate through the engine's own PackedLinears; an unknown kind is an error."""
    import pytest

    from ilf_lab.generation.packed import bf16_available, onednn_available

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from roofline import mm_gflops
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    kinds = ["aten"] + (["onednn"] if onednn_available() else []) + (["onednn_bf16"] if bf16_available() else [])
    for kind in kinds:
        assert mm_gflops(8, 64, 96, seconds=0.01, trials=1, kind=kind) > 0
    with pytest.raises(ValueError, match="unknown matmul kind"):
        mm_gflops(8, 64, 96, kind="fp8")


def test_sampling_ceiling_counts_prefill_at_the_roofline():
    """The ceiling's arithmetic on a config small enough to count by hand: prefill is every prompt position through
    the layers (LM head at the last position only) plus causal attention; the share's cap is decode over all."""
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from roofline import ceiling, prefill_gflop
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    cfg = SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=2, vocab_size=10)
    layer = 2 * (4 * 4 * 2 + 4 * 2 * 2 + 4 * 8 * 2 + 8 * 4)  # q, o; k, v; gate, up; down
    attn = lambda t: 2 * 2 * 1 * 2 * 2 * (t + 1) / 2 * t  # noqa: E731  (q.K and p.V, heads x head_dim, context)
    want = (3 + 5) * layer + 2 * (2 * 4 * 10) + attn(3) + attn(5)
    assert abs(prefill_gflop(SimpleNamespace(config=cfg), [3, 5]) * 1e9 - want) < 1e-6
    # a common start of 2 run once: positions 0-1 once, then 2 of the first prompt and 2-4 of the second
    want = (2 + 1 + 3) * layer + 2 * (2 * 4 * 10) + 16 * (1 + 2 + 3 + 3 + 4 + 5)
    assert abs(prefill_gflop(SimpleNamespace(config=cfg), [3, 5], shared=2) * 1e9 - want) < 1e-6
    cap = ceiling(gen_tokens=100, kept=90, gflop=2.0, prefill=100.0, rate=10.0, baseline=1.5, prefill_rate=20.0)
    assert cap == {"seconds": 25.0, "share": 20.0 / 25.0, "ratio": 90 / 25.0 / 1.5}


def test_decode_attention_benchmark_compares_the_host_width_with_8_lanes():
    """Both builds of the decode kernel (the host's width and 8 lanes) at a toy size: contract 6's line, a ratio
    per pair, and outputs that agree to float rounding (on a host without AVX-512 the two builds are the same)."""
    import pytest

    from ilf_lab.generation.kernels import _compiler

    if _compiler() is None:
        pytest.skip("no C++ compiler: the kernels cannot be built here")
    args = ["--pairs", "2", "--prompts", "3", "--rows", "2", "--prompt-len", "40", "--own", "5", "--layers", "2",
            "--threads", "1"]
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_attention.py"), *args],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert {"metric", "value", "baseline", "ratio", "unit"} <= set(last)
    assert last["value"] > 0 and last["baseline"] > 0 and abs(last["ratio"] - last["value"] / last["baseline"]) < 1e-2
    assert last["lanes"] in (8, 16) and len(last["pair_ratios"]) == 2 and last["max_abs_diff"] < 1e-5
    bad = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_attention.py"), "--own", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--own must be >= 1" in bad.stderr
