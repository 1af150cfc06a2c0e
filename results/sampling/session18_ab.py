"""Session 18's same-process before/after of the engine's two memory changes, alternating calls on one engine
(the host's speed drifted by 30 % within the session, so separate runs could not show a few percent); each arm
runs first in every other pair. (The run recorded in session18_ab.txt predates two fixes: its before arm released
pages with MADV_DONTNEED, which on shared memory only unmaps them, and ran first in every pair.)
  before: logits always from one matmul (a fresh mapping a step past 32 MiB), the KV cache in shared memory;
  after:  the code as committed (large logits in row chunks into the cache's buffer, the cache in private memory).
    PYTHONPATH=. python results/sampling/session18_ab.py [refine|chat] [pairs] [--cache-dir DIR]
Prints each call's seconds, phases and page faults, then the median ratio and whether the samples are identical."""

import argparse
import math
import mmap
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from sampling import prompt_sets  # noqa: E402

from ilf_lab.data.prompts import stop_sequences  # noqa: E402
from ilf_lab.generation import SamplingParams, pages, slots  # noqa: E402
from ilf_lab.generation.hf import HFEngine  # noqa: E402
from ilf_lab.generation.phases import Phases  # noqa: E402
from ilf_lab.models.loading import load_model, model_config, resolve_model_dir  # noqa: E402

MADV_REMOVE = 9  # release_cpu's advice before session 18 (shmem pages freed)


def shared_zeroed(shape, dtype):  # pages.zeroed_cpu before session 18
    count, size = math.prod(shape), math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | pages.MAP_NORESERVE)
    return torch.frombuffer(buf, dtype=dtype, count=count).view(shape)


ap = argparse.ArgumentParser()
ap.add_argument("set", nargs="?", default="refine")
ap.add_argument("pairs", nargs="?", type=int, default=3)
ap.add_argument("--cache-dir", default=os.environ.get("ILF_LAB_CACHE_DIR", "/work/cache20"))
args = ap.parse_args()
torch.set_num_threads(2)
model, tok = load_model(resolve_model_dir(model_config("smollm2_135m_instruct"), args.cache_dir), "float32")
prompts = prompt_sets([args.set], tok, os.environ.get("ILF_LAB_DATA_DIR"), 32)[args.set]
params = SamplingParams(n=8, temperature=0.8, top_p=0.95, max_new_tokens=128, stop=stop_sequences("chat"))
engine = HFEngine(model, tok)
arms = {"before": (1 << 62, shared_zeroed, MADV_REMOVE),
        "after": (slots.LOGITS_MMAP_BYTES, pages.zeroed_cpu, pages._MADV_DONTNEED)}
secs, outs = {k: [] for k in arms}, {}
for pair in range(args.pairs):
    for tag in ("before", "after") if pair % 2 == 0 else ("after", "before"):  # each arm first in every other pair
        slots.LOGITS_MMAP_BYTES, pages.zeroed_cpu, pages._MADV_DONTNEED = arms[tag]
        engine.phases = Phases()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = engine.generate(prompts, params)
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        secs[tag].append(dt)
        outs.setdefault(tag, out)
        ph = {k: v for k, v, _ in engine.phases.table(dt)}
        print(f"{tag:6s} {dt:5.1f} s | lm_head {ph['decode: lm_head']:.2f} | q/k/v/o {ph['decode: q/k/v/o projections, rope']:.2f}"
              f" | attention {ph['decode: attention over the cache']:.2f} | MLP {ph['decode: MLP']:.2f} | prefill "
              f"{ph['prefill']:.2f} | compaction {ph['compaction (row moves)']:.2f} | page faults "
              f"{r1.ru_minflt - r0.ru_minflt} | system {r1.ru_stime - r0.ru_stime:.1f} s", flush=True)
ratios = [b / a for a, b in zip(secs["after"], secs["before"], strict=True)]
print(f"{args.set}: before/after per pair {' '.join(f'{r:.3f}' for r in ratios)}, median {statistics.median(ratios):.3f}; "
      f"samples {'identical' if outs['before'] == outs['after'] else 'DIFFERENT'}")
