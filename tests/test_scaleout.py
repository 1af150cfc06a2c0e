"""Paper scale and clusters, rehearsed on one CPU machine with real components at toy sizes: CodeGen-Mono's
architecture (`model=tiny_codegen`) through the whole pipeline, DDP and FSDP on CPU processes against one process,
a sweep through hydra-submitit-launcher's local executor (the SLURM launcher's submission path), the paper preset
offline, and the memory/time plan script."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ilf_lab.config import OptimConfig, TrainerConfig
from ilf_lab.errors import ConfigError
from ilf_lab.generation.hf import HFEngine, fit_context
from ilf_lab.generation.params import SamplingParams
from ilf_lab.models.loading import build_tiny_codegen, load_model, resolve_model_dir
from ilf_lab.training import PolicyRecord, finetune
from tests.conftest import REPO, write_mini_dataset
from tests.test_training import make_task

CPU = TrainerConfig(enable_progress_bar=False)
# the mini dataset (conftest) with 40 tasks: 14 annotated MBPPTrain tasks, so gold fine-tuning takes 4 steps
SPLITS = ["data.splits.prompt=[0,0]", "data.splits.test=[1,4]", "data.splits.refine=[5,12]",
          "data.splits.train=[13,40]"]
SMOKE = ["model=tiny_codegen", "scale=smoke", "logger=none", *SPLITS, "data.max_train_tasks=null"]


@pytest.fixture(scope="module")
def data40(tmp_path_factory) -> Path:
    return write_mini_dataset(tmp_path_factory.mktemp("data40"), 40)


@pytest.fixture(scope="module")
def codegen(tmp_path_factory) -> str:
    cfg = OmegaConf.create({"source": "tiny_codegen", "tiny_hidden_size": 64, "tiny_layers": 2, "tiny_heads": 4})
    return resolve_model_dir(cfg, tmp_path_factory.mktemp("models"))


def cli(args: list[str], data: Path, cache: Path, out: Path, timeout: int = 600, cwd: Path | None = None,
        **env: str) -> subprocess.CompletedProcess:
    dirs = [f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}"] if "-m" in args else [
        f"hydra.run.dir={out}"]  # job dirs named by number: these override lists exceed a file name's 255 bytes
    cmd = [sys.executable, "-m", "ilf_lab", *args, f"paths.cache_dir={cache}", *dirs]
    full_env = {**os.environ, "ILF_LAB_DATA_DIR": str(data), "PYTHONHASHSEED": "0", "WANDB_SILENT": "true", **env}
    full_env.pop("LOCAL_RANK", None)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO)


def jobs(sweep: Path) -> list[dict]:
    found = sorted(sweep.rglob("results.json"))
    return sorted((json.loads(p.read_text()) for p in found), key=lambda r: r["seed"])


def stage(results: dict, name: str) -> dict:
    return {s["name"]: s for s in results["stages"]}[name]


def trained_weights(cache: Path, results: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(cache / "stages" / "train_policy" / stage(results, "train_policy")["key"] / "model"
                     / "model.safetensors")


# ------------------------------------------------------------------------------------------- tiny CodeGen


def test_tiny_codegen_has_codegens_architecture_and_is_deterministic(codegen, tmp_path):
    model, tok = load_model(codegen)
    cfg = model.config
    assert type(model).__name__ == "CodeGenForCausalLM" and cfg.model_type == "codegen"
    assert cfg.rotary_dim < cfg.n_embd // cfg.n_head  # partial rotary, as CodeGen-6B (64 of 256)
    assert cfg.vocab_size > len(tok) and cfg.vocab_size % 64 == 0  # embedding padded past the tokenizer
    assert not cfg.tie_word_embeddings and model.lm_head.bias is not None
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    assert tok.eos_token_id == 256 and tok.chat_template is None  # GPT-2's layout: the bytes, then <|endoftext|>
    text = 'def f(x):\n    """ünïcode\ttabs"""\n    return x\n'
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and tok.bos_token_id not in ids  # lossless; no BOS added, as CodeGen's
    # deterministic: the same files from a second build in another process (fixed init order, one generator)
    code = "import sys; from ilf_lab.models.loading import build_tiny_codegen; build_tiny_codegen(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONHASHSEED": "7"})
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        a, b = (hashlib.sha256((Path(d) / f).read_bytes()).hexdigest() for d in (codegen, tmp_path / "b"))
        assert a == b, f
    with pytest.raises(ConfigError, match="multiple of 4"):
        build_tiny_codegen(tmp_path / "bad", hidden=48, heads=3)


def test_codegen_samples_through_the_generic_path_batched_as_alone(codegen):
    """Left-padded batches (position ids from the mask, KV cache expanded n times and pruned as rows finish)
    give each prompt what it gets alone, greedy and sampled; greedy equals transformers' own generate."""
    model, tok = load_model(codegen)
    engine = HFEngine(model, tok)
    assert engine.backend == "generic"  # supports_slots: Llama-family only
    prompts = ['"""\nWrite a function to add two numbers.\n>>> Example: add(1, 2) = 3\n"""\ndef add(a, b):\n',
               "def f(x):\n", "x = 1\n" * 9 + "def g(y):\n"]
    for params in (SamplingParams(n=1, temperature=0.0, max_new_tokens=24),
                   SamplingParams(n=3, temperature=0.8, top_p=0.95, max_new_tokens=24, seed=5)):
        batched = engine.generate(prompts, params)
        assert batched == [engine.generate([p], params)[0] for p in prompts]
        assert all(len(samples) == params.n for samples in batched)
    ids = tok(prompts[0], return_tensors="pt")
    ref = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    ours = engine.generate(prompts[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=24))[0][0]
    assert ours == tok.decode(ref[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def test_prompt_and_samples_stay_within_codegens_positions(codegen):
    """CodeGen's rotary table has 2048 rows: past it an IndexError (a device assert on GPU). At paper scale one
    MBPPTrain refine prompt is ~1.5-4k tokens (task 493's x0), so the engine fits every call to the context."""
    model, tok = load_model(codegen)
    out = HFEngine(model, tok).generate(["x" * 2100, "y" * 2040], SamplingParams(n=2, temperature=0.0,
                                                                                 max_new_tokens=30))
    assert len(out) == 2 and all(len(s) == 2 for s in out)
    ids, budgets, cut = fit_context([[1] * 3000, [2] * 2040, [3] * 10], 30, 2048, bos=None)
    assert [len(p) for p in ids] == [2047, 2040, 10] and budgets == [1, 8, 30] and cut == 1
    ids, _, _ = fit_context([[9] + [1] * 3000], 5, 100, bos=9)
    assert ids[0][0] == 9 and len(ids[0]) == 99


def test_codegen_fine_tunes_and_its_checkpoint_reloads_identically(codegen, tmp_path):
    from ilf_lab.training import CausalLMModule

    tasks = [make_task(i) for i in range(4)]
    opt = OptimConfig(lr=1e-2, scheduler="constant", batch_size=4, micro_batch_size=2, epochs=12, max_length=256)
    r = finetune("policy", [PolicyRecord(t, t.code) for t in tasks], codegen, tmp_path, opt,
                 TrainerConfig(enable_progress_bar=False, checkpoint_last_epoch=True), prompt_format="docstring")
    assert r.steps == 12 and r.losses[-1] < 0.5 * r.losses[0], r.losses
    hf, tok = load_model(str(tmp_path))
    ckpt = torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=False)
    module = CausalLMModule(**ckpt["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    for k, v in hf.state_dict().items():
        assert torch.equal(v, trained[k]), k  # bit-identical, lm_head (untied, with its bias) included
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)  # still untied after training
    base, _ = load_model(codegen)
    assert not torch.equal(base.lm_head.weight, hf.lm_head.weight)
    ids = torch.tensor([tok("def add_3(x):\n    return")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, module.eval()(ids))


def test_lora_names_codegens_layers_or_fails_at_start(codegen, tmp_path):
    """The default LoRA targets are Llama's q/k/v/o projections; CodeGen fuses them in qkv_proj."""
    from ilf_lab.config import LoraConfig

    records = [PolicyRecord(t, t.code) for t in
               [make_task(i) for i in range(2)]]
    opt = OptimConfig(lr=1e-2, batch_size=2, micro_batch_size=2, epochs=2, max_length=256,
                      lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    with pytest.raises(ConfigError, match=r"policy.lora.target_modules=.*qkv_proj"):
        finetune("policy", records, codegen, tmp_path / "a", opt, CPU, prompt_format="docstring")
    opt.lora.target_modules = ["qkv_proj", "out_proj"]
    r = finetune("policy", records, codegen, tmp_path / "b", opt, CPU, prompt_format="docstring")
    assert r.steps == 2 and r.losses[-1] < r.losses[0]


def test_gradient_checkpointing_changes_memory_not_results(codegen, tmp_path):
    tasks = [make_task(i) for i in range(4)]
    opt = OptimConfig(lr=1e-2, batch_size=4, micro_batch_size=2, epochs=3, max_length=256)
    records = [PolicyRecord(t, t.code) for t in tasks]
    plain = finetune("policy", records, codegen, tmp_path / "a", opt, CPU, prompt_format="docstring")
    ckpt = finetune("policy", records, codegen, tmp_path / "b", opt,
                    TrainerConfig(enable_progress_bar=False, gradient_checkpointing=True), prompt_format="docstring")
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)
    from ilf_lab.training.finetune import _Job, _module

    job = _Job("policy", codegen, str(tmp_path), opt, TrainerConfig(gradient_checkpointing=True), 0, "float32",
               1, 1, None)
    module = _module(job)
    module.configure_model()
    on = getattr(module.model, "is_activation_checkpointing", None)
    assert on if on is not None else module.model.is_gradient_checkpointing


def test_tiny_codegen_runs_the_whole_pipeline(data40, tmp_path):
    """Every stage on CodeGen's architecture: ILF (πRefine trained, refinements sampled, perplexity, evaluation)
    and the gold fine-tune (πθ* trained and evaluated), in one sweep sharing the stage cache."""
    r = cli(["-m", *SMOKE, "experiment=ilf,mbpp_gold_all_tasks", "eval.perplexity=true"], data40,
            tmp_path / "cache", tmp_path / "sweep")
    assert r.returncode == 0, r.stderr[-3000:]
    ilf, gold = sorted(jobs(tmp_path / "sweep"), key=lambda j: j["experiment"])
    assert (ilf["experiment"], gold["experiment"]) == ("ilf", "mbpp_gold_all_tasks")
    assert ilf["model"] == gold["model"] == "tiny_codegen"
    assert ilf["config"]["model"]["prompt_format"] == "docstring"
    st = {s["name"]: s["status"] for s in ilf["stages"]}
    assert st["train_refiner"] == "ok" and st["refine"] in ("ok", "empty") and st["evaluate"] == "ok"
    assert st["perplexity"] == "ok" and len(ilf["training"]["refiner"]["losses"]) >= 1
    assert ilf["refine"]["tasks"] == 14 and ilf["refine"]["samples_per_task"] == 2
    assert stage(gold, "train_policy")["status"] == "ok" and gold["counts"]["policy_examples"] == 14
    losses = gold["training"]["policy"]["losses"]
    assert len(losses) == 4 and all(x == x for x in losses)
    for j in (ilf, gold):
        mbpp = j["benchmarks"]["mbpp"]
        assert mbpp["num_tasks"] == 3 and mbpp["n_samples"] == 10 and mbpp["pass@1"] is not None


# ------------------------------------------------------------------------------------- multi-process training


def test_fsdp_on_cpu_processes_matches_one_process(codegen, tmp_path):
    """FSDP (2 CPU processes over gloo, sharded by CodeGenBlock) against one process with the same global batch."""
    tasks = [make_task(i, i % 5) for i in range(16)]
    records = [PolicyRecord(t, t.code) for t in tasks]
    common = dict(lr=3e-3, batch_size=8, epochs=2, max_length=512, scheduler="linear", warmup_ratio=0.25)
    one = finetune("policy", records, codegen, tmp_path / "one", OptimConfig(micro_batch_size=4, **common), CPU,
                   prompt_format="docstring")
    fsdp = TrainerConfig(accelerator="cpu", devices=2, strategy="fsdp", enable_progress_bar=False)
    two = finetune("policy", records, codegen, tmp_path / "two", OptimConfig(micro_batch_size=2, **common), fsdp,
                   prompt_format="docstring")
    assert two.steps == one.steps == 4 and two.target_tokens == one.target_tokens
    assert two.losses == pytest.approx(one.losses, rel=1e-5)
    a, b = load_model(str(tmp_path / "one"))[0].state_dict(), load_model(str(tmp_path / "two"))[0].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_gpu_presets_fail_at_start_without_a_gpu(data40, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for preset, hint in (("fsdp", "trainer.accelerator=cpu trainer.precision=32-true"), ("gpu", "trainer=cpu")):
        t0 = time.monotonic()
        r = cli([*SMOKE, f"trainer={preset}"], data40, tmp_path / "cache", tmp_path / preset)
        assert r.returncode == 2, r.stderr[-2000:]
        lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "no CUDA GPU" in lines[0] and hint in lines[0] and "Traceback" not in r.stderr
        assert time.monotonic() - t0 < 60
    assert not (tmp_path / "cache" / "stages").exists()


@pytest.mark.slow
def test_ddp_and_fsdp_smoke_sweeps_equal_one_process(data40, tmp_path):
    """The user's command under `-m` (two jobs): `trainer=ddp` (2 spawned CPU processes, gloo) and FSDP on CPU
    give the single-process losses and weights with the same global batch: 4 examples per optimizer step, as
    2 per rank x 2 ranks there and one micro-batch of 4 here (the sampler cuts length-sorted global micro-batches
    of micro_batch_size x ranks, so the steps hold the same examples). Measured (8 steps at lr 1e-3): losses
    within 1.1e-7 relative, weights within 1.2e-6 absolute, for DDP and FSDP alike; asserted within 1e-5."""
    common = ["-m", *SMOKE, "experiment=mbpp_gold_all_tasks", "policy.epochs=2", "seed=0,1"]
    runs = {}
    for name, extra in (("one", ["policy.micro_batch_size=4"]), ("ddp", ["trainer=ddp"]),
                        ("fsdp", ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true"])):
        r = cli([*common, *extra], data40, tmp_path / f"cache_{name}", tmp_path / name)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = jobs(tmp_path / name)
        assert [j["seed"] for j in runs[name]] == [0, 1]
    for name in ("ddp", "fsdp"):
        for single, multi in zip(runs["one"], runs[name], strict=True):
            a, b = single["training"]["policy"], multi["training"]["policy"]
            assert len(a["losses"]) == len(b["losses"]) == 8 and a["target_tokens"] == b["target_tokens"]
            assert b["losses"] == pytest.approx(a["losses"], rel=1e-5), name
            wa = trained_weights(tmp_path / "cache_one", single)
            wb = trained_weights(tmp_path / f"cache_{name}", multi)
            assert wa.keys() == wb.keys()
            assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-5, name
            assert multi["benchmarks"]["mbpp"]["num_tasks"] == 3  # the whole pipeline ran after training


# -------------------------------------------------------------------------------------------- the launchers


def test_launcher_options_ship_in_the_package():
    import tomllib
    from importlib.resources import files

    import yaml

    slurm = files("ilf_lab.conf") / "hydra" / "launcher" / "slurm.yaml"
    assert slurm.is_file() and yaml.safe_load(slurm.read_text())["defaults"] == ["submitit_slurm"]
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for g in globs["ilf_lab.conf"] for p in (REPO / "conf").glob(g)}
    assert REPO / "conf" / "hydra" / "launcher" / "slurm.yaml" in shipped
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("hydra-submitit-launcher") for d in extras["slurm"])
    assert "[dev,slurm]" in (REPO / "scripts" / "setup.sh").read_text()


def test_slurm_launcher_composes_from_any_directory(tmp_path):
    """`hydra/launcher=slurm` from a directory that is not the repository: the option comes from the package."""
    r = subprocess.run([sys.executable, "-m", "ilf_lab", "--cfg", "hydra", "hydra/launcher=slurm",
                        "hydra.launcher.partition=gpu"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SlurmLauncher" in r.stdout and "partition: gpu" in r.stdout and "gpus_per_node: 1" in r.stdout


SUBMITIT_ARGS = ["-m", *[a for a in SMOKE if a != "logger=none"], "logger=wandb", "experiment=mbpp_gold_all_tasks",
                 "seed=0,1"]


@pytest.fixture(scope="module")
def submitit_sweep(data40, tmp_path_factory) -> Path:
    """Two jobs through submitit's local executor: each a pickled job in its own process (SLURM's path)."""
    root = tmp_path_factory.mktemp("submitit")
    r = cli([*SUBMITIT_ARGS, "hydra/launcher=submitit_local"], data40, root / "cache", root / "sweep", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return root


def report_table(sweep: Path) -> str:
    rep = subprocess.run([sys.executable, "-m", "ilf_lab.report", str(sweep)], capture_output=True, text=True,
                         timeout=300)
    assert rep.returncode == 0, rep.stderr[-2000:]
    return (sweep / "table.csv").read_text().replace(str(sweep), "<sweep>")


def test_submitit_local_sweep_writes_results_and_one_wandb_group(submitit_sweep):
    from tests.wandb_offline import read_offline_run

    sweep = submitit_sweep / "sweep"
    sub = jobs(sweep)
    assert [j["seed"] for j in sub] == [0, 1] and all(j["pass@1"] is not None for j in sub)
    assert list((sweep / ".submitit").iterdir())  # submitit's job folders: the jobs went that way
    runs = [read_offline_run(j["wandb"]["run_dir"]) for j in sub]
    assert runs[0]["group"] == runs[1]["group"] is not None and runs[0]["run_id"] != runs[1]["run_id"]
    assert [run["summary"]["pass@1"] for run in runs] == [j["pass@1"] for j in sub]
    assert [run["job_type"] for run in runs] == ["sweep_job", "sweep_job"]
    table = report_table(sweep)
    assert "<sweep>/0/" in table and "<sweep>/1/" in table  # one row over both seeds


def test_submitit_local_sweep_is_read_like_the_basic_launchers(submitit_sweep, data40):
    """The same sweep through Hydra's basic launcher: the same numbers, the same report."""
    args = [a if a != "logger=wandb" else "logger=none" for a in SUBMITIT_ARGS]
    r = cli(args, data40, submitit_sweep / "cache", submitit_sweep / "basic", cwd=submitit_sweep)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(jobs(submitit_sweep / "sweep"), jobs(submitit_sweep / "basic"), strict=True):
        assert a["benchmarks"] == b["benchmarks"]
        assert a["training"]["policy"]["losses"] == b["training"]["policy"]["losses"]
    assert report_table(submitit_sweep / "sweep") == report_table(submitit_sweep / "basic")


# ----------------------------------------------------------------------------------------- the paper preset


def test_paper_model_offline_fails_in_seconds_with_one_line(data40, tmp_path):
    """`python -m ilf_lab model=codegen_6b_mono` with no weights and no hub: exit 2, one line naming the cache
    path and model.path, nothing in the stage cache. Offline (HF_HUB_OFFLINE) and unreachable (refused)."""
    for env in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}):
        t0 = time.monotonic()
        r = cli(["model=codegen_6b_mono"], data40, tmp_path / "cache", tmp_path / "out",
                HF_HOME=str(tmp_path / "hf"), **env)
        seconds = time.monotonic() - t0
        assert r.returncode == 2, r.stderr[-2000:]
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        line = errors[0]
        assert str(tmp_path / "hf" / "hub" / "models--Salesforce--codegen-6B-mono") in line
        assert "model.path=" in line and ("HF_HUB_OFFLINE" in line or "unreachable" in line)
        assert seconds < 60, seconds
    assert not list((tmp_path / "cache").rglob("*")), "nothing may be written to the stage cache"
    assert not (tmp_path / "hf").exists()


def test_a_cached_hub_snapshot_is_used_offline_and_keyed_by_its_commit(codegen, monkeypatch, tmp_path):
    import shutil

    import huggingface_hub.constants as hub

    from ilf_lab.models.loading import model_identity

    repo = tmp_path / "hub" / "models--Salesforce--codegen-6B-mono"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(codegen, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    cfg = OmegaConf.create({"source": "hub", "path": "Salesforce/codegen-6B-mono", "revision": None})
    path = resolve_model_dir(cfg, tmp_path / "cache")
    assert Path(path) == repo / "snapshots" / commit
    assert model_identity(cfg, path) == {"source": "hub", "hub_id": "Salesforce/codegen-6B-mono",
                                         "revision": None, "commit": commit}
    assert type(load_model(path)[0]).__name__ == "CodeGenForCausalLM"
    (repo / "snapshots" / commit / "model.safetensors").unlink()  # config without weights: not a model
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        resolve_model_dir(cfg, tmp_path / "cache")


def test_paper_plan_prints_the_memory_and_time_table(data40):
    """The README's plan is this script's output; on the mini dataset with 1 token per byte here (fast)."""
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "paper_plan.py"), "--tokenizer", "bytes",
                        "--data", str(data40), *SPLITS], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| stage | preset |" in r.stdout
    plan = json.loads(r.stdout.strip().splitlines()[-1])
    assert 7.0e9 < plan["params"]["total"] < 7.1e9  # CodeGen-6B-mono's architecture, counted
    rows = {(x["stage"], x["preset"]): x for x in plan["rows"]}
    train = {p: x for (s, p), x in rows.items() if s == "train_policy"}
    # full fine-tuning in bf16-mixed does not fit one 141 GB GPU; gradient checkpointing or FSDP x2 does
    assert [(p.split(" ")[0], x["fits"]) for p, x in train.items()] == [
        ("trainer=gpu", False), ("trainer=gpu", True), ("trainer=fsdp", True)]
    assert plan["bf16_true"]["lost_updates"] > 0.5
    assert rows[("evaluate", "trainer: any (sampling, bf16)")]["fits"]


def test_gpu_throughput_measures_codegens_generic_path(tmp_path):
    """benchmarks/gpu_throughput.py --arch codegen: on a GPU it measures the path CodeGen-6B samples through
    (the plan's --step-overhead-ms); here its CPU plumbing mode."""
    args = ["--device", "cpu", "--size", "tiny", "--precision", "32", "--steps", "1", "--warmup", "1",
            "--micro-batch", "2", "--seq-len", "32", "--prompts", "3", "--baseline-prompts", "2", "--n", "2",
            "--max-new-tokens", "6", "--prompt-len", "12", "--arch", "codegen", "--repeat-prompts", "2"]
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), *args],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    last = json.loads(p.stdout.strip().splitlines()[-1])
    assert last["value"] > 0 and last["sampling"]["engine_backend"] == "generic"
    assert last["sampling"]["same_call_same_samples"] is True  # on CPU; on an H200 it was not (results/gpu/)
