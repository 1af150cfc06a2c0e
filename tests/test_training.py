"""Fine-tuning core: data formatting, loss masking, bucketing, checkpoints, LoRA, DDP (slow)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger

from ilf_lab.config import LoraConfig, OptimConfig, TrainerConfig
from ilf_lab.data.prompts import Task
from ilf_lab.errors import ConfigError
from ilf_lab.models.loading import build_tiny_random, load_model, load_tokenizer
from ilf_lab.training import (
    CausalLMModule,
    MicroBatchSampler,
    PolicyDataModule,
    PolicyRecord,
    RefinerDataModule,
    RefinerRecord,
    finetune,
)
from ilf_lab.training.data import IGNORE_INDEX, ExampleDataset
from ilf_lab.training.module import keeps_logits, lr_factor, scored_loss_sum, token_loss_sum

CPU = TrainerConfig(enable_progress_bar=False)
CPU_LAST = TrainerConfig(enable_progress_bar=False, checkpoint_last_epoch=True)  # last.ckpt of the trained state


def make_task(i: int, body_lines: int = 0) -> Task:
    body = "".join(f"    y{j} = x + {j}\n" for j in range(body_lines))
    return Task(
        task_id=i,
        text=f"Write a function to add {i} to a number.",
        code=f"def add_{i}(x):\n{body}    return x + {i}\n",
        tests=(f"assert add_{i}(1) == {i + 1}",),
    )


def policy_records(n: int, varied: bool = True) -> list[PolicyRecord]:
    tasks = [make_task(i, body_lines=(i % 5) if varied else 0) for i in range(n)]
    return [PolicyRecord(t, t.code) for t in tasks]


def refiner_records(n: int) -> list[RefinerRecord]:
    out = []
    for i in range(n):
        t = make_task(i)
        out.append(
            RefinerRecord(t, f"def add_{i}(x):\n    return x - {i}\n", "It subtracts; it should add.", t.code)
        )
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train ~20x faster on one thread than on two busy cores (no OpenMP spin-waiting)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(build_tiny_random(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny)


def one_batch(dm) -> dict:
    mb = next(iter(dm.sampler()))
    return ExampleDataset(dm.examples, dm.pad_id).__getitems__(mb)


# ------------------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("fmt", ["chat", "docstring"])
def test_labels_are_ignored_exactly_on_prompt_and_padding(tok, fmt):
    dm = PolicyDataModule(policy_records(6), tok, fmt, max_length=512, micro_batch_size=3, bucket=False)
    for mb in dm.sampler():
        batch = ExampleDataset(dm.examples, dm.pad_id).__getitems__(mb)
        for row, i in enumerate(mb.indices):
            e = dm.examples[i]
            ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
            n = len(e.input_ids)
            assert (labels[: e.prompt_len] == IGNORE_INDEX).all()  # prompt
            assert (labels[n:] == IGNORE_INDEX).all() and (mask[n:] == 0).all()  # padding
            assert torch.equal(labels[e.prompt_len : n], ids[e.prompt_len : n])  # target, scored
            assert labels[n - 1].item() == tok.eos_token_id  # EOS appended to the target
            assert mask[:n].all()


def test_target_text_follows_the_prompt(tok):
    rec = policy_records(1)[0]
    dm = PolicyDataModule([rec], tok, "chat", max_length=512, micro_batch_size=1)
    e = dm.examples[0]
    prompt = tok.decode(e.input_ids[: e.prompt_len])
    target = tok.decode(e.input_ids[e.prompt_len : -1])
    assert prompt.endswith("```python\n") and rec.task.text in prompt
    assert target == rec.program + "```"
    ddm = RefinerDataModule(refiner_records(1), tok, "docstring", max_length=512, micro_batch_size=1)
    e = ddm.examples[0]
    prompt = tok.decode(e.input_ids[: e.prompt_len])
    assert (
        prompt.startswith("OLD CODE:\n") and "FEEDBACK:\nIt subtracts" in prompt and "REFINEMENT:\n" in prompt
    )
    assert tok.decode(e.input_ids[e.prompt_len : -1]) == "    return x + 0\n"


def test_truncation_cuts_old_code_first_then_drops_targets_that_cannot_fit(tok):
    t = make_task(1)
    long_old = "def add_1(x):\n" + "".join(f"    z{j} = {j}\n" for j in range(60)) + "    return x\n"
    rec = RefinerRecord(t, long_old, "Return x + 1.", t.code)
    dm = RefinerDataModule([rec], tok, "docstring", max_length=300, micro_batch_size=1)
    assert dm.truncated == 1 and dm.dropped == 0
    e = dm.examples[0]
    assert len(e.input_ids) <= 300
    prompt = tok.decode(e.input_ids[: e.prompt_len])
    assert "# ... (truncated)" in prompt and "FEEDBACK:\nReturn x + 1." in prompt and t.text in prompt
    assert tok.decode(e.input_ids[e.prompt_len : -1]) == "    return x + 1\n"  # target intact
    # policy: the prompt loses its beginning, never its end
    pdm = PolicyDataModule(policy_records(1), tok, "chat", max_length=100, micro_batch_size=1)
    e = pdm.examples[0]
    assert pdm.truncated == 1 and len(e.input_ids) == 100
    assert tok.decode(e.input_ids[: e.prompt_len]).endswith("```python\n")
    # a target longer than max_length: dropped and counted, not silently cut
    huge = make_task(2, body_lines=40)
    pdm = PolicyDataModule([PolicyRecord(huge, huge.code)] + policy_records(2), tok, "chat", 200, 1)
    assert pdm.dropped == 1 and len(pdm.examples) == 2


def test_bucketing_keeps_padding_small_and_covers_every_example_once():
    lengths = [int(x) for x in torch.randint(20, 600, (203,), generator=torch.Generator().manual_seed(0))]
    targets = [max(1, n // 3) for n in lengths]

    def useful(bucket: bool) -> float:
        s = MicroBatchSampler(lengths, targets, micro_batch_size=4, accumulate=2, seed=1, bucket=bucket)
        real = padded = 0
        for mb in s:
            real += sum(lengths[i] for i in mb.indices)
            padded += len(mb.indices) * max(lengths[i] for i in mb.indices)
        return real / padded

    assert useful(bucket=True) >= 0.9 > useful(bucket=False)
    s = MicroBatchSampler(lengths, targets, micro_batch_size=4, accumulate=2, seed=1)
    epoch0 = [mb.indices for mb in s]
    assert sorted(i for ix in epoch0 for i in ix) == list(range(203))
    s.set_epoch(1)
    assert [mb.indices for mb in s] != epoch0  # reshuffled per epoch
    # each micro-batch carries the target tokens of its whole optimizer step (2 micro-batches here)
    mbs = list(s)
    for k in range(0, len(mbs), 2):
        step = mbs[k : k + 2]
        assert {mb.step_target_tokens for mb in step} == {sum(targets[i] for mb in step for i in mb.indices)}


def test_ranks_split_the_same_micro_batches_as_one_process():
    lengths = list(range(10, 47))
    targets = [n // 2 for n in lengths]
    one = list(MicroBatchSampler(lengths, targets, micro_batch_size=4, accumulate=2, world_size=1, seed=3))
    ranks = [
        list(
            MicroBatchSampler(
                lengths, targets, micro_batch_size=2, accumulate=2, world_size=2, rank=r, seed=3
            )
        )
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(one)  # same number of micro-batches on every rank
    for k, mb in enumerate(one):
        halves = [ranks[r][k] for r in (0, 1)]
        real = [h.indices for h in halves if not h.filler]
        assert sorted(i for ix in real for i in ix) == sorted(mb.indices)
        assert {h.step_target_tokens for h in halves} == {mb.step_target_tokens}


# ------------------------------------------------------------------------------------------------ loss


def test_loss_ignores_prompt_and_padding_positions(tiny, tok):
    dm = PolicyDataModule(policy_records(4), tok, "chat", max_length=512, micro_batch_size=4, bucket=False)
    batch = one_batch(dm)
    module = CausalLMModule(tiny, OptimConfig())
    module.configure_model()
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"])
    labels = batch["labels"]
    loss, n = token_loss_sum(logits, labels)
    assert n == (labels != IGNORE_INDEX).sum()
    # manual: next-token CE summed over the target positions only
    manual = sum(
        torch.nn.functional.cross_entropy(logits[b, t - 1], labels[b, t], reduction="sum")
        for b, t in (labels != IGNORE_INDEX).nonzero().tolist()
    )
    assert torch.allclose(loss, manual, rtol=1e-5)
    # logits that predict a prompt or padding token do not matter ...
    scored = torch.nn.functional.pad(labels != IGNORE_INDEX, (0, 1))[:, 1:]  # position t predicts t + 1
    noisy = logits + 10 * torch.randn_like(logits) * (~scored).unsqueeze(-1)
    assert torch.allclose(token_loss_sum(noisy, labels)[0], loss)
    # ... nor do the input ids of padding; one predicting a target token does
    b, t = scored.nonzero()[0].tolist()
    noisy = logits.clone()
    noisy[b, t] += torch.randn_like(noisy[b, t])
    assert not torch.allclose(token_loss_sum(noisy, labels)[0], loss)
    # the label ids at prompt positions are never read: a prompt-only labels tensor scores nothing
    assert token_loss_sum(logits, torch.full_like(labels, IGNORE_INDEX))[1] == 0


def test_logits_at_scored_positions_only_give_the_full_logits_loss_and_gradients(tiny, tok):
    """The training step's loss (logits only where a target is scored) is the full-logits loss, gradients too."""
    dm = RefinerDataModule(refiner_records(4), tok, "docstring", max_length=512, micro_batch_size=4, bucket=False)
    batch = one_batch(dm)
    module = CausalLMModule(tiny, OptimConfig())
    module.configure_model()
    model = module.model
    assert module.keep_logits and keeps_logits(model)
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    grads = []
    for keep in (True, False):
        model.zero_grad(set_to_none=True)
        loss = scored_loss_sum(model, *args, keep_logits=keep)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (kept, kept_grads), (full, full_grads) = grads
    assert torch.allclose(kept, full, rtol=1e-5)
    assert torch.allclose(full, token_loss_sum(module(batch["input_ids"], batch["attention_mask"]), batch["labels"])[0])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(kept_grads, full_grads, strict=True))

    class NoKeep(torch.nn.Module):  # a model whose forward has no `logits_to_keep`: full logits
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    assert not keeps_logits(NoKeep(model))
    with torch.no_grad():
        assert torch.allclose(scored_loss_sum(NoKeep(model), *args, keep_logits=False), full, rtol=1e-5)


def test_lr_schedules():
    assert [lr_factor(s, 2, 10, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    lin = [lr_factor(s, 0, 4, "linear") for s in range(4)]
    assert lin == [1.0, 0.75, 0.5, 0.25]
    cos = [lr_factor(s, 0, 4, "cosine") for s in range(4)]
    assert cos[0] == 1.0 and cos[2] == pytest.approx(0.5) and cos == sorted(cos, reverse=True)


def test_batch_size_must_split_over_processes(tiny, tmp_path):
    with pytest.raises(ConfigError, match="multiple"):  # the dataclass itself refuses it (__post_init__)
        OptimConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ConfigError, match="multiple"):  # and so does finetune, given it as a dict
        finetune("policy", policy_records(2), tiny, tmp_path, {"batch_size": 6, "micro_batch_size": 4}, CPU,
                 prompt_format="chat")
    with pytest.raises(ConfigError, match="kind"):
        finetune("critic", policy_records(2), tiny, tmp_path, OptimConfig(), CPU, prompt_format="chat")


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def overfit(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("overfit")
    opt = OptimConfig(
        lr=1e-2, scheduler="constant", batch_size=4, micro_batch_size=2, epochs=60, max_length=256
    )
    records = [PolicyRecord(make_task(i), make_task(i).code) for i in range(4)]
    return finetune("policy", records, tiny, out, opt, CPU_LAST, prompt_format="docstring", seed=0)


def test_small_set_is_overfitted(overfit):
    r = overfit
    assert r.steps == 60 and r.epochs == 60 and r.examples == 4 and len(r.losses) == 60
    assert r.losses[0] > 3.0 and r.losses[-1] < 0.5, r.losses  # 5.5 = uniform over the byte vocabulary
    assert r.tokens >= r.target_tokens > 0 and 0 < r.useful_fraction <= 1 and r.tokens_per_s > 0
    assert r.target_tokens == 60 * 4 * (len("    return x + 0\n") + 1)  # byte tokens + EOS, every epoch
    saved = json.loads((Path(r.checkpoint) / "train_result.json").read_text())
    assert saved["losses"] == r.losses


def test_checkpoints_reload_with_the_trained_weights(overfit, tiny, tok):
    hf, _ = load_model(overfit.checkpoint)
    ckpt = torch.load(Path(overfit.checkpoint) / "lightning" / "last.ckpt", weights_only=False)
    module = CausalLMModule(**ckpt["hyper_parameters"])
    module.configure_model()
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    base, _ = load_model(tiny)
    ids = torch.tensor([tok("def add_3(x):\n    return")["input_ids"]])
    with torch.no_grad():
        trained = module(ids)
        assert torch.allclose(hf(ids).logits, trained, atol=1e-5)
        assert not torch.allclose(base(ids).logits, trained, atol=1e-3)
    assert ckpt["global_step"] == 60 and "optimizer_states" in ckpt


def test_lora_trains_only_the_adapters(tiny, tok, tmp_path):
    opt = OptimConfig(
        lr=1e-2,
        batch_size=2,
        micro_batch_size=2,
        epochs=3,
        max_length=256,
        lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    r = finetune("refiner", refiner_records(2), tiny, tmp_path, opt, CPU_LAST, prompt_format="chat")
    assert r.steps == 3 and r.losses[-1] < r.losses[0]
    state = torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=False)["state_dict"]
    base, _ = load_model(tiny)
    base_sd = base.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(state[k].abs().sum() > 0 for k in lora_b)  # adapters (zero-initialised) moved
    frozen = {k: v for k, v in state.items() if "lora_" not in k}
    assert len(frozen) == len(base_sd)
    for k, v in frozen.items():
        name = k.removeprefix("model.base_model.model.").replace(".base_layer", "")
        assert torch.equal(v, base_sd[name]), name  # every base weight unchanged
    merged, _ = load_model(str(tmp_path))  # HF checkpoint: adapters merged, plain Llama keys
    msd = merged.state_dict()
    assert msd.keys() == base_sd.keys()
    assert not torch.equal(
        msd["model.layers.0.self_attn.q_proj.weight"], base_sd["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        msd["model.layers.0.self_attn.k_proj.weight"], base_sd["model.layers.0.self_attn.k_proj.weight"]
    )


def test_bucketed_training_wastes_little_on_padding(tiny, tok, tmp_path):
    records = policy_records(24)
    opt = OptimConfig(lr=1e-3, batch_size=4, micro_batch_size=2, epochs=1, max_length=512)
    logger = CSVLogger(tmp_path / "logs", name="run")
    r = finetune("policy", records, tiny, tmp_path / "ckpt", opt, CPU, prompt_format="chat", logger=logger)
    assert r.useful_fraction >= 0.9 and r.steps == 6
    assert sum(r.step_tokens) == r.tokens and len(r.step_seconds) == r.steps
    logged = (Path(logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = logged[0].split(",")
    for key in ("train/loss", "train/lr", "train/useful_fraction", "train/tokens_per_s"):
        assert key in header
    assert len(logged) == 1 + r.steps  # one row per optimizer step


def test_an_unfinished_run_resumes_from_last_ckpt(tiny, tmp_path):
    records = policy_records(4)
    opt = OptimConfig(lr=1e-3, batch_size=4, micro_batch_size=2, epochs=2, max_length=512)
    one = dataclasses.replace(opt, epochs=1)
    finetune("policy", records, tiny, tmp_path / "one", one, CPU, prompt_format="chat")
    assert not list((tmp_path / "one").rglob("*.ckpt"))  # one epoch: nothing to resume, nothing written
    finetune("policy", records, tiny, tmp_path, opt, CPU, prompt_format="chat")
    # by default no last.ckpt after the last epoch (nothing left to resume): the one of epoch 1 is there
    assert torch.load(tmp_path / "lightning" / "last.ckpt", weights_only=False)["epoch"] == 0
    finetune("policy", records, tiny, tmp_path, opt, CPU_LAST, prompt_format="chat")
    (tmp_path / "train_result.json").unlink()  # as if it had been killed after saving last.ckpt
    opt.epochs = 3
    r = finetune("policy", records, tiny, tmp_path, opt, CPU, prompt_format="chat")
    assert r.steps == 3 and len(r.losses) == 1  # continued at epoch 3, global step 3
    fresh = finetune("policy", records, tiny, tmp_path, opt, CPU, prompt_format="chat")
    assert fresh.steps == 3 and len(fresh.losses) == 3  # a finished run is not resumed: it starts over


# ------------------------------------------------------------------------------------------------ DDP (slow)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_matches_one_process_with_double_micro_batch(tiny, tmp_path):
    records = policy_records(16)
    common = dict(lr=3e-3, batch_size=8, epochs=2, max_length=512, scheduler="linear", warmup_ratio=0.25)
    one = finetune(
        "policy",
        records,
        tiny,
        tmp_path / "one",
        OptimConfig(micro_batch_size=4, **common),
        CPU,
        prompt_format="chat",
    )
    ddp = TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn", enable_progress_bar=False)
    two = finetune(
        "policy",
        records,
        tiny,
        tmp_path / "two",
        OptimConfig(micro_batch_size=2, **common),
        ddp,
        prompt_format="chat",
    )
    assert two.steps == one.steps == 4 and two.target_tokens == one.target_tokens
    assert two.losses == pytest.approx(one.losses, rel=1e-4)
    a, _ = load_model(str(tmp_path / "one"))
    b, _ = load_model(str(tmp_path / "two"))
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(v, w, atol=1e-5), k


SWEEP_APP = """
import os, sys
import hydra
from omegaconf import DictConfig

@hydra.main(version_base="1.3", config_path=None, config_name=None)
def job(cfg: DictConfig) -> None:
    with open(os.environ["JOB_LOG"], "a") as f:   # one line per job the sweep starts, in any process
        f.write(f"{os.getpid()} {cfg.lr}\\n")
    from ilf_lab.config import OptimConfig, TrainerConfig
    from ilf_lab.data.prompts import Task
    from ilf_lab.training import PolicyRecord, finetune
    tasks = [Task(i, f"Add {i}.", f"def add_{i}(x):\\n    return x + {i}\\n", (f"assert add_{i}(1) == {i+1}",))
             for i in range(4)]
    r = finetune("policy", [PolicyRecord(t, t.code) for t in tasks], os.environ["TINY"],
                 os.path.join(os.environ["OUT"], f"lr{cfg.lr}"),
                 OptimConfig(lr=cfg.lr, batch_size=4, micro_batch_size=2, epochs=1, max_length=256),
                 TrainerConfig(devices=2, strategy="ddp_spawn", enable_progress_bar=False, checkpoint_last_epoch=True),
                 prompt_format="chat")
    print("RESULT", r.steps, r.examples)

if __name__ == "__main__":
    job()
"""


@pytest.mark.slow
def test_ddp_under_a_hydra_multirun_does_not_rerun_the_sweep(tiny, tmp_path):
    app = tmp_path / "sweep_app.py"
    app.write_text(textwrap.dedent(SWEEP_APP))
    env = {**os.environ, "JOB_LOG": str(tmp_path / "jobs.log"), "TINY": tiny, "OUT": str(tmp_path / "out")}
    env.pop("LOCAL_RANK", None)
    cmd = [sys.executable, str(app), "-m", "+lr=0.001", f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = (tmp_path / "jobs.log").read_text().splitlines()
    assert len(jobs) == 1, jobs  # Lightning's `ddp` would re-execute argv in the second rank: 2 lines
    assert proc.stdout.count("RESULT 1 4") == 1
    ckpt = tmp_path / "out" / "lr0.001"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "lightning" / "last.ckpt").exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["lr0.001"]
