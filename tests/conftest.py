"""Shared fixtures: a tiny random model built once per session, a small MBPP-format dataset written by the
tests themselves (invented tasks, not MBPP), and the real data directory when ILF_LAB_DATA_DIR is set."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# invented tasks in MBPP's schema: (name, text, gold code, tests)
_MINI = [
    ("add", "Write a function to add two numbers.", "def add(a, b):\n    return a + b",
     ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]),
    ("square", "Write a function to square a number.", "def square(x):\n    return x * x",
     ["assert square(3) == 9", "assert square(0) == 0", "assert square(-2) == 4"]),
    ("is_even", "Write a function to check whether a number is even.", "def is_even(n):\n    return n % 2 == 0",
     ["assert is_even(4) == True", "assert is_even(7) == False", "assert is_even(0) == True"]),
    ("rev", "Write a function to reverse a string.", "def rev(s):\n    return s[::-1]",
     ["assert rev('abc') == 'cba'", "assert rev('') == ''", "assert rev('ab') == 'ba'"]),
    ("maxi", "Write a function to find the largest element of a list.", "def maxi(xs):\n    return max(xs)",
     ["assert maxi([1, 5, 2]) == 5", "assert maxi([-1]) == -1", "assert maxi([3, 3]) == 3"]),
    ("count_a", "Write a function to count the letter a in a string.", "def count_a(s):\n    return s.count('a')",
     ["assert count_a('banana') == 3", "assert count_a('xyz') == 0", "assert count_a('a') == 1"]),
]


def write_mini_dataset(root: Path, n_tasks: int = 12) -> Path:
    """mbpp/mbpp.jsonl with `n_tasks` tasks (ids 1..n) and ilf/surge_annotations.jsonl for half of them."""
    (root / "mbpp").mkdir(parents=True, exist_ok=True)
    (root / "ilf").mkdir(parents=True, exist_ok=True)
    tasks, anns = [], []
    for i in range(1, n_tasks + 1):
        name, text, code, tests = _MINI[(i - 1) % len(_MINI)]
        tasks.append({"text": text, "code": code, "task_id": i, "test_setup_code": "", "test_list": tests,
                      "challenge_test_list": []})
        prompt = f'"""\n{text}\n\n>>> Example: {tests[0].split("assert ")[-1].replace("==", "=")}\n"""\n\n{code.splitlines()[0]}\n'
        body = "\n".join(code.splitlines()[1:]) + "\n"
        if i % 2 == 0:
            anns.append({
                "task_id": i, "prompt": prompt, "test": "", "Feedback": f"The function {name} returns None; return the value.",
                "completion": body, "result": "passed", "passed": True, "unedited_annotator_completion": prompt + body,
                "original_model_completion": prompt + "    pass\n", "refinement_edit_distance": 0.2, "worker_id": "w1",
            })
    (root / "mbpp" / "mbpp.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    (root / "ilf" / "surge_annotations.jsonl").write_text("".join(json.dumps(a) + "\n" for a in anns))
    return root


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    return write_mini_dataset(tmp_path_factory.mktemp("mini_data"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    d = os.environ.get("ILF_LAB_DATA_DIR")
    if not d or not (Path(d) / "mbpp" / "mbpp.jsonl").exists():
        pytest.skip("real MBPP not available: set ILF_LAB_DATA_DIR to a dir with mbpp/mbpp.jsonl (CI does)")
    return Path(d)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One stage/model cache for the whole session (the tiny model is built once)."""
    return tmp_path_factory.mktemp("ilf_cache")


@pytest.fixture(scope="session")
def tiny_model(cache_dir) -> str:
    from omegaconf import OmegaConf

    from ilf_lab.models.loading import resolve_model_dir

    cfg = OmegaConf.create({"source": "tiny_random", "tiny_hidden_size": 64, "tiny_layers": 2, "tiny_heads": 4})
    return resolve_model_dir(cfg, cache_dir)


def compose(overrides: list[str] | None = None):
    """The composed config as `python -m ilf_lab` would build it (hydra values filled in for a test)."""
    from hydra import compose as h_compose
    from hydra import initialize_config_module

    from ilf_lab.config import register_configs

    register_configs()
    with initialize_config_module(config_module="ilf_lab.conf", version_base="1.3"):
        return h_compose(config_name="config", overrides=overrides or [], return_hydra_config=True)


SMOKE = [
    "model=tiny_random", "scale=smoke", "logger=none",
    "data.splits.prompt=[0,0]", "data.splits.test=[1,4]", "data.splits.refine=[5,8]", "data.splits.train=[9,12]",
]


def dag_config(data: Path, tmp: Path, extra: list[str], base: list[str] = SMOKE):
    """A composed config for running the DAG in this process (no Hydra runtime: paths given explicitly)."""
    from omegaconf import open_dict

    cfg = compose([*base, *extra, f"paths.cache_dir={tmp / 'cache'}", f"paths.output_dir={tmp / 'out'}",
                   f"data.dir={data}"])
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_dag(cfg):
    """Run the DAG in this process up to `stop_after`; the Runner holds every stage's artifact and inputs."""
    from ilf_lab.pipeline.cache import StageCache
    from ilf_lab.pipeline.dag import ilf
    from ilf_lab.pipeline.runner import Runner, StopAfter
    from ilf_lab.tracking.base import NullTracker

    run = Runner(cfg, StageCache(cfg.paths.cache_dir), NullTracker(), rounds=cfg.rounds)
    try:
        ilf(cfg, run)
    except StopAfter:
        pass
    return run


# prompts the sampling-engine tests share (short, long, repeated lines)
PROMPTS = ["def add(a, b):\n", "Hi", "x = [1, 2, 3]\nfor i in x:\n    print(i)\n" * 3, "import os\n"]


@pytest.fixture(scope="session")
def peaked_llama(tmp_path_factory):
    """A tiny random Llama whose weights are re-drawn with a large spread so greedy paths vary (the default
    init makes it repeat one token)."""
    import torch

    from ilf_lab.models.loading import build_tiny_random, load_model

    path = build_tiny_random(tmp_path_factory.mktemp("tiny"))
    model, tok = load_model(str(path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(
                    torch.randn(p.shape, generator=g) * 1.0
                )  # peaked logits: no near-ties for fp32 noise to flip
    return str(path), model, tok
