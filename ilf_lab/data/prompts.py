"""Prompt formats, each defined once, with the rule that cuts a completion back to a program.

`docstring` is the paper's (for base models such as CodeGen): the task text and the first test as an
`>>> Example:` line inside a docstring, then the gold solution's code up to its signature line; the model
continues the body. `chat` is for instruct models: the task and the first test as one user message, rendered by
the tokenizer's chat template; the program is the first fenced code block of the reply.
Every stage (x0, refinement, evaluation, fine-tuning targets) goes through these functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# part of every stage-cache key: bump when a template or a truncation rule changes what a stage produces
# (2: the chat prompt names the signature; docstring completions cut at the first unindented line; 1-shot refine)
VERSION = 2

# The chat rendering names the function the tests call, as the paper's docstring prompt does by ending with the
# gold signature line (without it about a third of SmolLM2's failing zero-shot samples were NameErrors).
CHAT_INSTRUCTION = (
    "Write a Python function for the task below. Reply with the complete code in one ```python block.\n\n"
    "Task: {text}\nThe function must be defined as:\n{signature}\nYour code should pass this test:\n{test}"
)
REFINE_CHAT_INSTRUCTION = (
    "Here is a task, an incorrect program for it, and feedback on that program. Write the corrected "
    "program in one ```python block.\n\nTask: {text}\nThe function must be defined as:\n{signature}\n"
    "Your code should pass this test:\n{test}\n\n"
    "Incorrect program:\n```python\n{old_code}\n```\n\nFeedback: {feedback}"
)
# The paper's Figure 2 / the reference πRefine input; the target continues the task's docstring prompt.
REFINE_DOCSTRING_TEMPLATE = "OLD CODE:\n{old_code}\n\nFEEDBACK:\n{feedback}\n\nREFINEMENT:\n{prompt}"

# Stop sequences: a base model's function ends where an unindented line begins; a chat reply at the fence.
DOCSTRING_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", '\n"""', "\n```")
CHAT_STOPS = ("```", "<|im_end|>")


@dataclass(frozen=True)
class Task:
    """One MBPP problem."""

    task_id: int
    text: str
    code: str
    tests: tuple[str, ...]
    setup: str = ""
    challenge_tests: tuple[str, ...] = ()

    @property
    def entry_point(self) -> str:
        return self.tests[0].split("assert ")[-1].split("(")[0].strip()

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Task:
        return cls(
            task_id=int(r["task_id"]),
            text=r["text"],
            code=r["code"].replace("\r\n", "\n"),
            tests=tuple(r["test_list"]),
            setup=r.get("test_setup_code") or "",
            challenge_tests=tuple(r.get("challenge_test_list") or ()),
        )


def example_line(test: str) -> str:
    """`assert f(x) == y` -> `f(x) = y` (the paper's `>>> Example:` rendering)."""
    return test.split("assert ")[-1].replace("==", "=")


def code_prefix(task: Task) -> str:
    """The gold program up to and including the entry point's signature (imports, constants, def line)."""
    name = re.escape(task.entry_point)
    match = re.search(rf"def {name}\(.*\):", task.code)  # the reference's pattern (pinned by the annotations)
    if match is None:  # 5 MBPPTest tasks write `def f (x) :`; the reference skipped them, we keep them
        match = re.search(rf"def\s+{name}\s*\(.*\)\s*(->[^:]*)?:", task.code)
    if (
        match is None
    ):  # 3 MBPPTrain tasks (769, 912, 927) have no such def: the model writes the whole program
        return ""
    return task.code[: match.end()]


def docstring_prompt(task: Task) -> str:
    """The paper's prompt; equals the `prompt` field of the ILF annotations."""
    return f'"""\n{task.text}\n\n>>> Example: {example_line(task.tests[0])}\n"""\n\n{code_prefix(task)}\n'


def signature(task: Task) -> str:
    """The entry point's def line from the gold program (`def f(x):`); `def <name>(...)` where it has none."""
    prefix = code_prefix(task)
    if prefix:
        return prefix.rsplit("\n", 1)[-1].strip()
    called = [  # tests like `assert (f(x)) == y` or `assert int(f(x)) == y`: the gold defs the tests call
        m.group(0).strip()
        for m in re.finditer(r"^def\s+(\w+)\s*\(.*\)\s*:", task.code, flags=re.M)
        if re.search(rf"\b{m.group(1)}\(", task.tests[0])
    ]
    return called[-1] if called else f"def {task.entry_point}(...):"


def chat_messages(task: Task) -> list[dict[str, str]]:
    content = CHAT_INSTRUCTION.format(text=task.text, signature=signature(task), test=task.tests[0])
    return [{"role": "user", "content": content}]


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template with the assistant turn opened and the code fence started (steers small models)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + "```python\n"


def task_prompt(task: Task, fmt: str, tokenizer: Any = None) -> str:
    """The prompt for generating a program for `task`."""
    if fmt == "docstring":
        return docstring_prompt(task)
    if fmt == "chat":
        return render_chat(tokenizer, chat_messages(task))
    raise ValueError(f"unknown prompt format {fmt!r}")


def refine_prompt(
    task: Task, old_code: str, feedback: str, fmt: str, tokenizer: Any = None,
    shots: Sequence[tuple[Task, str, str, str]] = (),
) -> str:
    """πRefine's input: (task, x0, f). docstring: the paper's OLD CODE / FEEDBACK / REFINEMENT sections (Fig. 2),
    the REFINEMENT section opened with the task's prompt as the reference does; `shots` (task, x0, f, x1) go
    before it in the same format (Table 2's 1-shot prompt for the base model)."""
    if fmt == "docstring":
        examples = "".join(
            REFINE_DOCSTRING_TEMPLATE.format(old_code=s_old.strip("\n"), feedback=s_fb.strip(), prompt="")
            + s_x1.strip("\n") + "\n\n\n"
            for _, s_old, s_fb, s_x1 in shots
        )
        return examples + REFINE_DOCSTRING_TEMPLATE.format(
            old_code=old_code.strip("\n"), feedback=feedback.strip(), prompt=docstring_prompt(task)
        )
    if fmt == "chat":
        messages = []
        for s_task, s_old, s_fb, s_x1 in shots:
            messages += [
                {"role": "user", "content": _refine_chat(s_task, s_old, s_fb)},
                {"role": "assistant", "content": f"```python\n{s_x1.strip(chr(10))}\n```"},
            ]
        messages.append({"role": "user", "content": _refine_chat(task, old_code, feedback)})
        return render_chat(tokenizer, messages)
    raise ValueError(f"unknown prompt format {fmt!r}")


def _refine_chat(task: Task, old_code: str, feedback: str) -> str:
    return REFINE_CHAT_INSTRUCTION.format(
        text=task.text, signature=signature(task), test=task.tests[0], old_code=old_code.strip("\n"),
        feedback=feedback.strip(),
    )


def stop_sequences(fmt: str) -> tuple[str, ...]:
    return DOCSTRING_STOPS if fmt == "docstring" else CHAT_STOPS


def truncate_completion(completion: str, fmt: str) -> str:
    """Cut a raw continuation back to the part that belongs to the program."""
    if fmt == "docstring":  # the reference's eval_mbpp.py::truncate_code: cut at the first unindented line
        cut = len(completion)  # that starts with a letter, `#` or `"` (the stop strings end sampling early)
        for stop in DOCSTRING_STOPS:
            i = completion.find(stop)
            if i != -1:
                cut = min(cut, i)
        unindented = re.search(r'\n[A-Za-z#"]', completion)
        if unindented is not None:
            cut = min(cut, unindented.start())
        return completion[:cut].rstrip() + "\n"
    # chat: the prompt opened ```python; the program ends at the closing fence (or the end of the turn)
    text = completion
    for end in ("```", "<|im_end|>", "<|endoftext|>"):
        i = text.find(end)
        if i != -1:
            text = text[:i]
    return text.strip("\n") + "\n"


def program_from_completion(task: Task, completion: str, fmt: str) -> str:
    """The runnable program: the docstring prompt's code prefix + body, or the chat reply's code."""
    body = truncate_completion(completion, fmt)
    if fmt == "docstring":
        return docstring_prompt(task) + body
    return body


def target_for(task: Task, program: str, fmt: str) -> str:
    """Fine-tuning target (what follows the prompt) for a known-good program, in the format's own shape."""
    program = program.replace("\r\n", "\n").strip("\n") + "\n"
    if fmt == "docstring":
        prompt = docstring_prompt(task)
        if program.startswith(prompt):
            return program[len(prompt) :]
        prefix = code_prefix(task)
        i = program.find(prefix) if prefix else -1
        if i != -1:  # gold code or a refinement that starts at the top of the file: the lines after the def
            rest = program[i + len(prefix) :]
            return rest.split("\n", 1)[1] if "\n" in rest else "\n"
        return program
    prompt = docstring_prompt(task)
    if program.startswith(prompt):  # an annotation-style program: keep the code, drop the task docstring
        program = code_prefix(task) + "\n" + program[len(prompt) :]
    return program + "```"


# ------------------------------------------------------------------ LLM feedback (the InstructGPT ablation)

FEEDBACK_SYSTEM = (
    "You review Python programs. Given a task and an incorrect program, explain briefly what is wrong "
    "(FEEDBACK), then write the corrected program (REFINEMENT) in one ```python block."
)
FEEDBACK_QUERY = (
    "Task: {text}\nYour code should pass this test:\n{test}\n\nIncorrect program:\n```python\n{old_code}\n```"
)
FEEDBACK_ANSWER = "FEEDBACK: {feedback}\n\nREFINEMENT:\n```python\n{refinement}\n```"


def feedback_messages(
    task: Task, old_code: str, shots: list[tuple[Task, str, str, str]]
) -> list[dict[str, str]]:
    """k-shot chat for an LLM that writes feedback and a refinement; shots are (task, x0, f, x1)."""
    messages = [{"role": "system", "content": FEEDBACK_SYSTEM}]
    for s_task, s_old, s_feedback, s_refinement in shots:
        messages.append({"role": "user", "content": _feedback_query(s_task, s_old)})
        messages.append(
            {
                "role": "assistant",
                "content": FEEDBACK_ANSWER.format(
                    feedback=s_feedback.strip(), refinement=s_refinement.strip("\n")
                ),
            }
        )
    messages.append({"role": "user", "content": _feedback_query(task, old_code)})
    return messages


def _feedback_query(task: Task, old_code: str) -> str:
    return FEEDBACK_QUERY.format(text=task.text, test=task.tests[0], old_code=old_code.strip("\n"))


def feedback_text_prompt(task: Task, old_code: str, shots: list[tuple[Task, str, str, str]]) -> str:
    """The same k-shot request as plain text, for base (non-chat) models: ends where the feedback starts."""
    parts = [FEEDBACK_SYSTEM, ""]
    for s_task, s_old, s_feedback, s_refinement in shots:
        parts += [
            _feedback_query(s_task, s_old),
            FEEDBACK_ANSWER.format(feedback=s_feedback.strip(), refinement=s_refinement.strip("\n")),
            "",
        ]
    parts += [_feedback_query(task, old_code), "FEEDBACK:"]
    return "\n".join(parts)


def parse_feedback_reply(reply: str) -> tuple[str, str | None]:
    """(feedback, refinement program or None) from an LLM reply in FEEDBACK_ANSWER's shape (tolerant)."""
    text = reply.strip()
    if text.upper().startswith("FEEDBACK:"):
        text = text[len("FEEDBACK:") :]
    head, sep, tail = text.partition("REFINEMENT:")
    if not sep:
        head, sep, tail = text.partition("```")
        tail = sep + tail if sep else ""
    feedback = head.strip()
    match = re.search(r"```(?:python)?\n(.*?)(?:```|$)", tail, flags=re.S)
    code = match.group(1).strip("\n") + "\n" if match else None
    return feedback, (code if code and code.strip() else None)
