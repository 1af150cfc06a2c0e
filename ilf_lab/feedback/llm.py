"""LLM-written feedback and refinements (the paper's InstructGPT ablation), over one backend interface:
a local HF model through the sampling engine, or any OpenAI-compatible chat endpoint."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ilf_lab.data.prompts import Task, feedback_messages, feedback_text_prompt, parse_feedback_reply
from ilf_lab.errors import ConfigError

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]


class LLMBackend(Protocol):
    def complete(
        self, requests: Sequence[Messages], *, temperature: float, max_new_tokens: int, seed: int
    ) -> list[str]: ...


class HFBackend:
    """A local model through the sampling engine: chat template for instruct models, plain text otherwise."""

    def __init__(self, engine: Any, tokenizer: Any, prompt_format: str):
        self.engine, self.tokenizer, self.prompt_format = engine, tokenizer, prompt_format

    def render(self, messages: Messages, text_prompt: str) -> str:
        if self.prompt_format == "chat":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text_prompt

    def complete_prompts(
        self, prompts: Sequence[str], *, temperature: float, max_new_tokens: int, seed: int, n: int = 1
    ) -> list[list[str]]:
        """n replies per prompt."""
        from ilf_lab.generation import SamplingParams

        stops = ("<|im_end|>",) if self.prompt_format == "chat" else ("\n\nTask:",)
        params = SamplingParams(
            n=n, temperature=temperature, max_new_tokens=max_new_tokens, stop=stops, seed=seed
        )
        return [list(outs) for outs in self.engine.generate(list(prompts), params, progress=len(prompts) > 8)]


class OpenAIBackend:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint: retries with backoff, bounded concurrency."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 4,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff: float = 1.0,
    ):
        if not base_url:
            raise ConfigError("feedback.base_url is required for feedback.backend=openai")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1")
        self.url += "/chat/completions"
        self.model = model or "default"
        self.api_key = os.environ.get(api_key_env, "")
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.timeout, self.backoff = timeout, backoff

    def _post(self, body: dict[str, Any]) -> str:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = json.loads(resp.read())
                return payload["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = e
                if e.code not in (408, 409, 429) and e.code < 500:
                    raise RuntimeError(f"{self.url}: HTTP {e.code}: {e.read()[:200]!r}") from None
            except (
                urllib.error.URLError,
                TimeoutError,
                ConnectionError,
                KeyError,
                json.JSONDecodeError,
            ) as e:
                last = e
            if attempt < self.max_retries:
                time.sleep(self.backoff * 2**attempt)
        raise RuntimeError(f"{self.url}: no answer after {self.max_retries + 1} tries ({last})")

    def complete(
        self, requests: Sequence[Messages], *, temperature: float, max_new_tokens: int, seed: int, n: int = 1
    ) -> list[list[str]]:
        """n replies per request (n requests with seeds seed, seed+1, ...: not every server supports `n`)."""
        bodies = [
            {"model": self.model, "messages": m, "temperature": temperature, "max_tokens": max_new_tokens,
             "seed": seed + j}
            for m in requests
            for j in range(n)
        ]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            flat = list(pool.map(self._post, bodies))
        return [flat[i * n : (i + 1) * n] for i in range(len(requests))]


def llm_feedback(
    items: Sequence[tuple[Task, str]],
    shots: list[tuple[Task, str, str, str]],
    backend: HFBackend | OpenAIBackend,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    n: int = 1,
) -> list[dict[str, Any]]:
    """For each (task, x0): n of the LLM's (feedback, refinement) replies, k-shot from `shots` (task, x0, f, x1).
    Rows are task-major, with `sample_idx`."""
    if isinstance(backend, HFBackend):
        prompts = [
            backend.render(feedback_messages(t, x0, shots), feedback_text_prompt(t, x0, shots))
            for t, x0 in items
        ]
        replies = backend.complete_prompts(
            prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, n=n
        )
    else:
        requests = [feedback_messages(t, x0, shots) for t, x0 in items]
        replies = backend.complete(requests, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, n=n)
    rows = []
    for (task, x0), task_replies in zip(items, replies, strict=True):
        for i, reply in enumerate(task_replies):
            feedback, refinement = parse_feedback_reply(reply)
            rows.append({"task_id": task.task_id, "sample_idx": i, "old_code": x0, "feedback": feedback,
                         "refinement": refinement, "reply": reply})
    return rows
