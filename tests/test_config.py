"""Every config group composes; bad values fail at start with a short message naming the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ilf_lab.config import Config, validate
from ilf_lab.errors import ConfigError
from tests.conftest import REPO, compose

CONF = REPO / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__"))
TABLE4 = {
    "ilf": ("human", "refinements"),
    "instructgpt_1shot": ("instructgpt_1shot", "refinements"),
    "instructgpt_2shot": ("instructgpt_2shot", "refinements"),
    "mbpp_gold": ("human", "mbpp_gold"),
    "human_refinements": ("human", "human_refinements"),
    "zero_shot": ("human", "none"),
}


@pytest.mark.parametrize(
    "group,option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_option_composes_and_validates(group, option):
    extra = ["feedback=instructgpt_1shot"] if (group, option) == ("x0", "policy") else []
    cfg = compose([f"{group}={option}", "paths.cache_dir=/c", "paths.output_dir=/o", *extra])
    validate(cfg)
    obj = OmegaConf.to_object(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert obj["name"] and (group in ("experiment", "scale") or obj[group] is not None)


def test_contract_options_exist():
    need = {
        "feedback": {"human", "instructgpt_1shot", "instructgpt_2shot"},
        "train_on": {"refinements", "mbpp_gold", "human_refinements", "none"},
        "experiment": set(TABLE4),
        "model": {"smollm2_135m_instruct", "tiny_random", "codegen_6b_mono"},
        "scale": {"smoke", "demo", "paper"},
        "logger": {"wandb", "none"},
    }
    for group, options in need.items():
        assert options <= {p.stem for p in (CONF / group).glob("*.yaml")}, group


def test_defaults():
    cfg = compose()
    assert cfg.model.name == "smollm2_135m_instruct"
    assert cfg.scale == "demo" and cfg.logger.name == "wandb" and cfg.logger.mode == "offline"
    assert cfg.sampling.n >= 10 and "cache_dir" in cfg.paths


@pytest.mark.parametrize("experiment,expected", TABLE4.items())
def test_table4_presets(experiment, expected):
    cfg = compose([f"experiment={experiment}"])
    assert (cfg.name, cfg.feedback.name, cfg.train_on.source) == (experiment, *expected)


def test_paper_scale_carries_paper_settings():
    cfg = compose(["scale=paper", "model=codegen_6b_mono"])
    assert (cfg.sampling.n, cfg.sampling.temperature) == (30, 0.8)
    assert (cfg.policy.lr, cfg.policy.batch_size, cfg.policy.epochs) == (5e-6, 32, 2)
    # the reference trains both with max_seq_length=1024 (its 512 answer/generation lengths are unused)
    assert (cfg.refiner.max_length, cfg.policy.max_length) == (1024, 1024)
    assert cfg.sampling.top_p == 1.0 and cfg.sampling.max_new_tokens == 1024
    assert cfg.data.max_test_tasks is None and cfg.model.prompt_format == "docstring"


@pytest.mark.parametrize(
    "override,key",
    [
        ("sampling.temperature=-1", "sampling.temperature"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("refine.n=0", "refine.n"),
        ("policy.lr=0", "policy.lr"),
        ("feedback.shots=3", "feedback.shots"),
        ("execution.comparison=fuzzy", "execution.comparison"),
        ("sampling.dtype=int8", "sampling.dtype"),
        ("policy.batch_size=5", "policy.batch_size"),
        ("rounds=2", "rounds"),
        ("x0=policy", "x0.source"),
        ("trainer.devices=abc", "trainer.devices"),
        ("trainer.precision=bogus", "trainer.precision"),
        ("refine.refiner=oracle", "refine.refiner"),
        ("stop_after=evaluate", "stop_after"),
        ("stop_after=nowhere", "stop_after"),
        ("feedback=instructgpt_1shot feedback.shuffle=true", "feedback.shuffle"),
        ("feedback=instructgpt_2shot refine.refiner=base", "refine.refiner"),
    ],
)
def test_out_of_range_values_name_the_key(override, key):
    cfg = compose(override.split())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_schema_is_a_dataclass():
    assert OmegaConf.structured(Config).sampling.n == 30


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ilf_lab", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["feedback=unknown_source"], "feedback"),
        (["sampling.n=many"], "sampling.n"),
        (["sampling.temperature=-1", "logger=none"], "sampling.temperature"),
        (["no_such_key=1"], "no_such_key"),
    ],
)
def test_cli_rejects_bad_values_briefly(args, needle, tmp_path):
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 15
    assert not list(tmp_path.rglob("results.json"))


def test_cli_prints_config_from_any_directory(tmp_path):
    r = _cli("--cfg", "job", "experiment=zero_shot", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    cfg = OmegaConf.create(r.stdout)
    assert cfg.name == "zero_shot" and cfg.train_on.source == "none"


@pytest.mark.parametrize(
    "override,key",
    [
        ("execution.timeout=nan", "execution.timeout"),
        ("execution.timeout=inf", "execution.timeout"),
        ("data.max_edit_distance=nan", "data.max_edit_distance"),
        ("sampling.top_p=nan", "sampling.top_p"),
        ("sampling.temperature=inf", "sampling.temperature"),
        ("policy.lr=nan", "policy.lr"),
        ("sampling.n=1000000", "sampling.n"),
        ("refine.max_new_tokens=10000000", "refine.max_new_tokens"),
        ("execution.memory_mb=-5", "execution.memory_mb"),
    ],
)
def test_nan_inf_and_impossible_sizes_fail_at_start(override, key, tmp_path):
    """Every numeric option rejects NaN/inf and sizes that would allocate absurdly, naming the key, exit 2,
    before anything runs or is written."""
    r = subprocess.run([sys.executable, "-m", "ilf_lab", override, "model=tiny_random", "logger=none",
                        f"paths.cache_dir={tmp_path / 'c'}", f"hydra.run.dir={tmp_path / 'o'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists() and not (tmp_path / "o" / "results.json").exists()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["seed=-1"], "seed=-1 must be >= 0"),
        (["eval.ks=[]"], "eval.ks is empty"),
        (["trainer.devices=[]"], "trainer.devices=[] names no device"),
        (["train_on._target_=ilf_lab.pipeline.stages.train.MBPPGold"], "train_on.source='refinements' does not describe"),
        (["feedback._target_=ilf_lab.pipeline.stages.feedback.LLMFeedback"], "feedback.provider='human' does not"),
        (["x0._target_=ilf_lab.pipeline.stages.x0.PolicyX0"], "x0.source='annotations' does not describe"),
        (["sampling.quantize=int8", "sampling.dtype=bfloat16"], "sampling.quantize=int8 needs sampling.engine=hf"),
        (["sampling.quantize=int8", "sampling.engine=vllm"], "sampling.quantize=int8 needs sampling.engine=hf"),
        (["sampling.quantize=int4"], "sampling.quantize='int4' is not one of"),
        (["sampling.prompt_kv=shared", "sampling.engine=vllm"], "sampling.prompt_kv=shared needs sampling.engine=hf"),
        (["sampling.prompt_kv=copy", "sampling.engine=vllm"], "sampling.prompt_kv=copy needs sampling.engine=hf"),
        (["sampling.prompt_kv=paged"], "sampling.prompt_kv='paged' is not one of"),
        (["sampling.cpu_linear=onednn", "sampling.engine=vllm"], "sampling.cpu_linear=onednn needs sampling.engine=hf"),
        (["sampling.cpu_linear=mkl"], "sampling.cpu_linear='mkl' is not one of"),
        (["sampling.cpu_linear=onednn", "sampling.dtype=bfloat16"], "sampling.cpu_linear=onednn packs fp32 linear"),
        (["sampling.cpu_linear=onednn", "sampling.quantize=int8"], "sampling.cpu_linear=onednn packs fp32 linear"),
        (["sampling.cpu_linear=onednn_bf16", "model.dtype=bfloat16"], "sampling.cpu_linear=onednn_bf16 packs fp32"),
        (["sampling.attention=kernel", "sampling.engine=vllm"], "sampling.attention=kernel needs sampling.engine=hf"),
        (["sampling.attention=kernel", "sampling.prompt_kv=copy"], "sampling.attention=kernel reads the shared"),
        (["sampling.attention=flash"], "sampling.attention='flash' is not one of"),
        (["sampling.common_prefix=once", "sampling.engine=vllm"], "sampling.common_prefix=once needs sampling.engine=hf"),
        (["sampling.common_prefix=some"], "sampling.common_prefix='some' is not one of"),
    ],
)
def test_values_that_used_to_fail_mid_run_fail_at_start(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose(["model=tiny_random", "scale=smoke", *overrides]))
