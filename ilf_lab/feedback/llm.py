"""LLM-written feedback and refinements (the paper's InstructGPT ablation), over one backend interface:
a local HF model through the sampling engine, or any OpenAI-compatible chat endpoint."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from ilf_lab.data.prompts import Task, feedback_messages, feedback_text_prompt, parse_feedback_reply
from ilf_lab.errors import ConfigError, IlfError

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]


class LLMBackend(Protocol):
    def complete(
        self, requests: Sequence[Messages], *, temperature: float, max_new_tokens: int, seed: int, n: int = 1,
        top_p: float = 1.0,
    ) -> list[list[str]]: ...


class HFBackend:
    """A local model through the sampling engine: chat template for instruct models, plain text otherwise."""

    def __init__(self, engine: Any, tokenizer: Any, prompt_format: str):
        self.engine, self.tokenizer, self.prompt_format = engine, tokenizer, prompt_format

    def render(self, messages: Messages, text_prompt: str) -> str:
        if self.prompt_format == "chat":
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text_prompt

    def complete_prompts(
        self, prompts: Sequence[str], *, temperature: float, max_new_tokens: int, seed: int, n: int = 1,
        top_p: float = 1.0,
    ) -> list[list[str]]:
        """n replies per prompt."""
        from ilf_lab.generation import SamplingParams

        stops = ("<|im_end|>",) if self.prompt_format == "chat" else ("\n\nTask:",)
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, stop=stops, seed=seed
        )
        return [list(outs) for outs in self.engine.generate(list(prompts), params, progress=len(prompts) > 8)]


class EndpointError(IlfError, RuntimeError):
    """An OpenAI-compatible endpoint failed (the message names the URL and why); printed as one line."""


class _Deadline:
    """A wall-clock limit on one HTTP exchange (connect, TLS, headers, body): when it passes, a timer shuts the
    watched sockets down, so a server that drips a byte at a time cannot outlast it (a socket timeout would
    restart on every byte)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        dup = sock.dup()  # survives the TLS wrap (which detaches `sock`); shutdown acts on the shared socket
        with self._lock:
            self._socks.append(dup)
            if self.expired:
                _shutdown(dup)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for s in self._socks:
                _shutdown(s)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            for s in self._socks:
                s.close()
            self._socks.clear()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Watched:
    """An http.client connection whose sockets are handed to a `_Deadline` as soon as they exist."""

    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        create = self._create_connection  # type: ignore[has-type]

        def create_watched(*a: Any, **kw: Any) -> socket.socket:
            sock = create(*a, **kw)
            deadline.watch(sock)
            return sock

        self._create_connection = create_watched


class _WatchedHTTP(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_WatchedHTTP, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    _ssl: ssl.SSLContext | None = None

    def __init__(self, deadline: _Deadline):
        if _HTTPSHandler._ssl is None:
            _HTTPSHandler._ssl = ssl.create_default_context()
        super().__init__(context=_HTTPSHandler._ssl)
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(
            functools.partial(_WatchedHTTPS, deadline=self.deadline), req, context=_HTTPSHandler._ssl
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed (urllib would re-send the Authorization header to any host): a 3xx is an error."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Fatal(Exception):
    """A failure that another try would not fix (4xx, a redirect, an oversized or malformed reply)."""


class _Retryable(Exception):
    pass


class OpenAIBackend:
    """Any OpenAI-compatible `/v1/chat/completions` endpoint: bounded concurrency; each try has a wall-clock
    deadline (`timeout`, connect to last byte) and a reply-size cap (`max_response_bytes`); 408/409/429/5xx and
    connection errors are retried with exponential backoff (`max_retries`), other failures end the call at once
    with an `EndpointError` naming the URL. Redirects are never followed (the API key goes to `base_url` only).
    `total_timeout` (optional) bounds the whole `complete` call, retries and backoff included."""

    def __init__(
        self,
        base_url: str,
        model: str | None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 4,
        max_retries: int = 5,
        timeout: float = 120.0,
        backoff: float = 1.0,
        max_response_bytes: int = 8 << 20,
        total_timeout: float | None = None,
    ):
        if not base_url:
            raise ConfigError("feedback.base_url is required for feedback.backend=openai")
        if (
            not timeout > 0
            or not max_response_bytes > 0
            or (total_timeout is not None and not total_timeout > 0)
        ):
            raise ConfigError("OpenAIBackend: timeout, max_response_bytes and total_timeout must be > 0")
        self.url = base_url.rstrip("/") + ("" if base_url.rstrip("/").endswith("/v1") else "/v1")
        self.url += "/chat/completions"
        self.model = model or "default"
        self.api_key = os.environ.get(api_key_env, "")
        self.max_concurrency, self.max_retries = max_concurrency, max_retries
        self.timeout, self.backoff = timeout, backoff
        self.max_response_bytes, self.total_timeout = max_response_bytes, total_timeout

    def _post(
        self, body: dict[str, Any], stop_at: float | None = None, cancel: threading.Event | None = None
    ) -> str:
        """One chat completion; retries with backoff until `max_retries`, `stop_at` (monotonic) or `cancel`."""
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        cancel = cancel or threading.Event()
        last = ""
        tries = 0
        for attempt in range(self.max_retries + 1):
            left = None if stop_at is None else stop_at - time.monotonic()
            if cancel.is_set() or (left is not None and left <= 0):
                break
            tries += 1
            seconds = self.timeout if left is None else min(self.timeout, left)
            try:
                return self._attempt(data, headers, seconds)
            except _Fatal as e:
                raise EndpointError(f"{self.url}: {e}") from None
            except _Retryable as e:
                last = str(e)
            if attempt < self.max_retries:
                pause = self.backoff * 2**attempt
                if stop_at is not None:
                    pause = min(pause, max(0.0, stop_at - time.monotonic()))
                if cancel.wait(pause):
                    break
        if stop_at is not None and time.monotonic() >= stop_at:
            raise EndpointError(
                f"{self.url}: no answer within the call's {self.total_timeout:g} s deadline "
                f"after {tries} tries (last: {last or 'none finished'})"
            )
        raise EndpointError(f"{self.url}: no answer after {tries} tries ({last})")

    def _attempt(self, data: bytes, headers: dict[str, str], seconds: float) -> str:
        """One HTTP exchange within `seconds` of wall clock; raises _Retryable or _Fatal."""
        deadline = _Deadline(seconds)
        opener = urllib.request.build_opener(_NoRedirect, _HTTPHandler(deadline), _HTTPSHandler(deadline))
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with opener.open(req, timeout=max(deadline.remaining(), 0.001)) as resp:
                raw = self._read_capped(resp, deadline)
        except urllib.error.HTTPError as e:
            snippet, location = _snippet(e), e.headers.get("Location") if e.headers else None
            if 300 <= e.code < 400:
                raise _Fatal(
                    f"HTTP {e.code} redirect to {location!r} not followed "
                    "(the API key is only sent to the configured URL: set base_url to the final address)"
                ) from None
            if e.code in (408, 409, 429) or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {snippet}") from None
            raise _Fatal(f"HTTP {e.code}: {snippet}") from None
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncated replies
            reason = getattr(e, "reason", None) or e
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise _Fatal(f"TLS certificate not accepted: {reason}") from None
            if deadline.expired or deadline.remaining() <= 0:
                raise _Retryable(f"no complete reply within the {seconds:g} s deadline") from None
            raise _Retryable(f"{type(e).__name__}: {reason}") from None
        finally:
            deadline.close()
        try:
            payload = json.loads(raw)
            content = payload["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
            raise _Fatal(f"reply is not a chat completion ({type(e).__name__}: {e}): {raw[:200]!r}") from None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise _Fatal(f"reply content is not a string: {str(content)[:200]!r}")
        return content

    def _read_capped(self, resp: Any, deadline: _Deadline) -> bytes:
        cap = self.max_response_bytes
        declared = resp.headers.get("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > cap:
            raise _Fatal(
                f"reply of {int(declared)} bytes refused (over the {cap}-byte cap, max_response_bytes)"
            )
        chunks, size = [], 0
        while chunk := resp.read(min(1 << 16, cap + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise _Fatal(f"reply over the {cap}-byte cap (max_response_bytes) refused")
        if deadline.expired:  # the socket was shut down mid-body: the read above ended early
            raise TimeoutError
        return b"".join(chunks)

    def complete(
        self, requests: Sequence[Messages], *, temperature: float, max_new_tokens: int, seed: int, n: int = 1,
        top_p: float = 1.0,
    ) -> list[list[str]]:
        """n replies per request (n requests with seeds seed, seed+1, ...: not every server supports `n`).
        The first request that fails ends the call: the others stop retrying, queued ones never start."""
        bodies = [
            {"model": self.model, "messages": m, "temperature": temperature, "top_p": top_p,
             "max_tokens": max_new_tokens, "seed": seed + j}
            for m in requests
            for j in range(n)
        ]
        stop_at = None if self.total_timeout is None else time.monotonic() + self.total_timeout
        cancel = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            futures = [pool.submit(self._post, b, stop_at, cancel) for b in bodies]
            flat = [f.result() for f in futures]
        except BaseException:
            cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return [flat[i * n : (i + 1) * n] for i in range(len(requests))]


def _snippet(e: urllib.error.HTTPError) -> str:
    """The start of an error reply's body (never the whole of it), and the connection closed."""
    try:
        return repr(e.read(200).strip())
    except (OSError, http.client.HTTPException, AttributeError):
        return "(no body)"
    finally:
        e.close()


def llm_feedback(
    items: Sequence[tuple[Task, str]],
    shots: list[tuple[Task, str, str, str]],
    backend: HFBackend | OpenAIBackend,
    *,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    n: int = 1,
    top_p: float = 1.0,
) -> list[dict[str, Any]]:
    """For each (task, x0): n of the LLM's (feedback, refinement) replies, k-shot from `shots` (task, x0, f, x1).
    Rows are task-major, with `sample_idx`."""
    if isinstance(backend, HFBackend):
        prompts = [
            backend.render(feedback_messages(t, x0, shots), feedback_text_prompt(t, x0, shots))
            for t, x0 in items
        ]
        replies = backend.complete_prompts(
            prompts, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, n=n, top_p=top_p
        )
    else:
        requests = [feedback_messages(t, x0, shots) for t, x0 in items]
        replies = backend.complete(
            requests, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed, n=n, top_p=top_p
        )
    rows = []
    for (task, x0), task_replies in zip(items, replies, strict=True):
        for i, reply in enumerate(task_replies):
            feedback, refinement = parse_feedback_reply(reply)
            rows.append({"task_id": task.task_id, "sample_idx": i, "old_code": x0, "feedback": feedback,
                         "refinement": refinement, "reply": reply})
    return rows
