"""LLM feedback: the local-HF backend, the OpenAI-compatible backend against a real server on loopback
(ilf_lab.feedback.server over the tiny model), retries with backoff, and the pipeline using the endpoint."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ilf_lab.data.prompts import Task
from ilf_lab.feedback import HFBackend, OpenAIBackend, llm_feedback
from ilf_lab.feedback.llm import EndpointError
from ilf_lab.feedback.server import make_handler, serve
from tests.test_annotate import raw_post
from tests.test_pipeline import SMOKE, results, run_cli

TASK = Task(1, "Add two numbers.", "def add(a, b):\n    return a + b", ("assert add(1, 2) == 3",))
SHOT = (Task(2, "Square a number.", "def square(x):\n    return x * x", ("assert square(3) == 9",)),
        "def square(x):\n    return x + x\n", "It adds instead of multiplying.", "def square(x):\n    return x * x\n")


@pytest.fixture(scope="module")
def server(tiny_model):
    srv = serve(tiny_model, port=0)
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()


def test_hf_backend_writes_feedback(tiny_model):
    from ilf_lab.generation import make_engine
    from ilf_lab.models.loading import load_model

    model, tok = load_model(tiny_model)
    backend = HFBackend(make_engine("hf", tiny_model, model=model, tokenizer=tok), tok, "chat")
    rows = llm_feedback([(TASK, "def add(a, b):\n    return a - b\n")], [SHOT], backend,
                        temperature=0.0, max_new_tokens=16, seed=0)
    assert len(rows) == 1 and rows[0]["task_id"] == 1 and isinstance(rows[0]["feedback"], str)
    assert rows[0]["reply"]  # the model said something (random bytes from a random model)


def test_openai_backend_against_a_real_local_server(server):
    backend = OpenAIBackend(server, "tiny", max_concurrency=2, max_retries=0)
    items = [(TASK, "def add(a, b):\n    return a - b\n")] * 3
    rows = llm_feedback(items, [SHOT], backend, temperature=0.0, max_new_tokens=12, seed=0)
    assert len(rows) == 3 and all(r["reply"] for r in rows)
    assert rows[0]["reply"] == rows[1]["reply"]  # greedy: same request, same answer


class _Flaky(BaseHTTPRequestHandler):
    calls = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls <= 2:
            self.send_response(429)
            self.end_headers()
            return
        body = json.dumps({"choices": [{"message": {"content": "FEEDBACK: ok\n\nREFINEMENT:\n```python\nx = 1\n```"}}]})
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


def test_openai_backend_retries_with_backoff():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{srv.server_port}/v1", "m", max_retries=3, backoff=0.01)
        (row,) = llm_feedback([(TASK, "x = 0\n")], [], backend, temperature=0.0, max_new_tokens=8, seed=0)
        assert _Flaky.calls == 3 and row["feedback"] == "ok" and row["refinement"] == "x = 1\n"
        dead = OpenAIBackend("http://127.0.0.1:9/v1", "m", max_retries=1, backoff=0.01)
        with pytest.raises(RuntimeError, match="no answer after 2 tries"):
            dead.complete([[{"role": "user", "content": "hi"}]], temperature=0, max_new_tokens=4, seed=0)
    finally:
        srv.shutdown()


HI = [[{"role": "user", "content": "hi"}]]
REPLY = json.dumps({"choices": [{"message": {"content": "hello"}}]}).encode()


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _body(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_openai_backend_never_follows_a_redirect_with_the_key(monkeypatch, code):
    """A redirect to another origin (here another port) is an error naming the location; the key stays home."""
    seen: list[tuple[str, dict]] = []

    class Elsewhere(_Quiet):
        def do_GET(self):
            seen.append(("GET", dict(self.headers)))
            self.send_response(200)
            self.send_header("Content-Length", str(len(REPLY)))
            self.end_headers()
            self.wfile.write(REPLY)

        def do_POST(self):
            self._body()
            seen.append(("POST", dict(self.headers)))
            self.do_GET()

    elsewhere = _serve(Elsewhere)
    location = f"http://localhost:{elsewhere.server_port}/v1/chat/completions"

    class Redirect(_Quiet):
        calls = 0

        def do_POST(self):
            type(self).calls += 1
            self._body()
            self.send_response(code)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    home = _serve(Redirect)
    monkeypatch.setenv("ILF_TEST_KEY", "sk-secret")
    try:
        backend = OpenAIBackend(f"http://127.0.0.1:{home.server_port}", "m", "ILF_TEST_KEY", max_retries=3)
        with pytest.raises(EndpointError, match=f"HTTP {code} redirect to '{location}' not followed"):
            backend.complete(HI, temperature=0, max_new_tokens=4, seed=0)
        assert seen == [] and Redirect.calls == 1  # not followed, not retried
    finally:
        home.shutdown()
        elsewhere.shutdown()


class _Drip(_Quiet):
    """200, then the headers or the body one byte at a time (every 0.2 s: a socket timeout never fires)."""

    in_headers = False

    def do_POST(self):
        self._body()
        try:
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            if not self.in_headers:
                self.wfile.write(b"Content-Length: 100000\r\n\r\n")
            for _ in range(1000):
                self.wfile.write(b"X" if self.in_headers else b" ")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


class _DripHeaders(_Drip):
    in_headers = True


@pytest.mark.parametrize("handler", [_Drip, _DripHeaders])
def test_openai_backend_deadline_beats_a_slow_drip(handler):
    srv = _serve(handler)
    url = f"http://127.0.0.1:{srv.server_port}/v1"
    try:
        t = time.monotonic()
        with pytest.raises(EndpointError) as e:
            OpenAIBackend(url, "m", max_retries=0, timeout=1.0).complete(
                HI, temperature=0, max_new_tokens=4, seed=0
            )
        assert time.monotonic() - t < 5
        assert (
            str(e.value)
            == f"{url}/chat/completions: no answer after 1 tries (no complete reply within the 1 s deadline)"
        )
        # retries too: the whole call's deadline bounds them
        t = time.monotonic()
        with pytest.raises(
            EndpointError,
            match=r"no answer within the call's 2 s deadline after [23] tries \(last: no complete reply within",
        ):
            OpenAIBackend(url, "m", max_retries=5, timeout=1.0, backoff=0.05, total_timeout=2.0).complete(
                HI * 3, temperature=0, max_new_tokens=4, seed=0
            )
        assert time.monotonic() - t < 5
    finally:
        srv.shutdown()


class _Huge(_Quiet):
    """A 200 MB reply (declared, or close-delimited); counts what it managed to send."""

    declare = True
    sent = 0
    done = threading.Event()

    def do_POST(self):
        self._body()
        self.send_response(200)
        if self.declare:
            self.send_header("Content-Length", str(200 << 20))
        self.send_header("Connection", "close")
        self.end_headers()
        block = b" " * (1 << 20)
        try:
            for _ in range(200):
                self.wfile.write(block)
                type(self).sent += len(block)
        except OSError:
            pass
        finally:
            type(self).done.set()


class _HugeUndeclared(_Huge):
    declare = False
    sent = 0
    done = threading.Event()


@pytest.mark.parametrize(
    "handler, message",
    [
        (_Huge, "reply of 209715200 bytes refused (over the 1048576-byte cap"),
        (_HugeUndeclared, "reply over the 1048576-byte cap"),
    ],
)
def test_openai_backend_refuses_an_oversized_reply_without_reading_it(handler, message):
    srv = _serve(handler)
    try:
        backend = OpenAIBackend(
            f"http://127.0.0.1:{srv.server_port}", "m", max_retries=3, max_response_bytes=1 << 20
        )
        with pytest.raises(EndpointError, match=re.escape(message)):
            backend.complete(HI, temperature=0, max_new_tokens=4, seed=0)
        assert handler.done.wait(10) and handler.sent < 50 << 20  # the client hung up long before the end
    finally:
        srv.shutdown()


class _Refusing(_Quiet):
    """400 with a 5 MB error body, then a reply that is not a chat completion."""

    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self._body()
        body = b'{"error": "unknown model"}' + b" " * (5 << 20) if self.calls == 1 else b'{"choices": []}'
        self.send_response(400 if self.calls == 1 else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass


def test_openai_backend_client_errors_are_clear_and_not_retried():
    srv = _serve(_Refusing)
    url = f"http://127.0.0.1:{srv.server_port}/v1/chat/completions"
    try:
        backend = OpenAIBackend(url.removesuffix("/chat/completions"), "m", max_retries=5, backoff=10)
        t = time.monotonic()
        with pytest.raises(EndpointError, match=f'^{url}: HTTP 400: b\'{{"error": "unknown model"}}'):
            backend.complete(HI, temperature=0, max_new_tokens=4, seed=0)
        with pytest.raises(EndpointError, match=r"reply is not a chat completion \(IndexError"):
            backend.complete(HI, temperature=0, max_new_tokens=4, seed=0)
        assert _Refusing.calls == 2 and time.monotonic() - t < 5  # no backoff: neither was retried
    finally:
        srv.shutdown()


class _StubChat:
    """Stands in for the model behind the real chat server: echoes, or fails on 'boom'."""

    name = "stub"

    def reply(self, messages, temperature, max_tokens, seed):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("out of memory")
        return f"{messages[-1]['content']} t={temperature} n={max_tokens} s={seed}"


def test_chat_server_refuses_malformed_requests_and_keeps_serving():
    srv = _serve(make_handler(_StubChat()))
    port, path = srv.server_port, "/v1/chat/completions"
    msg = {"messages": [{"role": "user", "content": "hi"}]}
    cases = [
        ("-1", b"{}", 400, "bad Content-Length"),
        ("99999999999", b"{}", 413, "over the 4194304-byte limit"),
        (
            None,
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}',
            400,
            "out of range",
        ),
        (
            None,
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -1e400}',
            400,
            "out of range",
        ),
        (None, b"not json", 400, "malformed JSON"),
        (None, b"[" * 100_000, 400, "malformed JSON"),
        (None, b'{"messages": "hi"}', 400, "'messages' must be a non-empty list"),
        (None, b'{"messages": [{"role": "user", "content": ["x"]}]}', 400, "'messages' must be"),
        (None, json.dumps({**msg, "max_tokens": 2.5}).encode(), 400, "'max_tokens' must be an integer"),
        (None, json.dumps({**msg, "temperature": "hot"}).encode(), 400, "'temperature' must be a number"),
        (None, json.dumps({**msg, "seed": True}).encode(), 400, "'seed' must be"),
        (
            None,
            json.dumps({"messages": [{"role": "user", "content": "boom"}]}).encode(),
            500,
            "out of memory",
        ),
    ]
    try:
        for content_length, body, status, message in cases:
            got, reply = raw_post(port, path, body, content_length)
            assert got == status and message in reply["error"]["message"], (body[:60], reply)
            got, reply = raw_post(port, path, json.dumps(msg).encode())
            assert got == 200 and reply["choices"][0]["message"]["content"] == "hi t=1.0 n=256 s=0"
        backend = OpenAIBackend(f"http://127.0.0.1:{port}", "m", max_retries=0)
        assert backend.complete(HI, temperature=0.5, max_new_tokens=7, seed=3) == [["hi t=0.5 n=7 s=3"]]
    finally:
        srv.shutdown()


def test_pipeline_with_an_openai_compatible_endpoint(server, mini_data, tmp_path):
    r = run_cli([*SMOKE, "experiment=instructgpt_1shot", "feedback.backend=openai", f"feedback.base_url={server}",
                 "feedback.model=tiny"], mini_data, tmp_path / "c", tmp_path / "o")
    assert r.returncode == 0, r.stderr[-3000:]
    res = results(tmp_path / "o")
    st = {s["name"]: s for s in res["stages"]}
    # 2 MBPPTrain tasks x feedback.n=2 replies (smoke), each its own request to the endpoint
    assert res["feedback"] == "instructgpt_1shot" and st["feedback"]["info"]["feedback"] == 4
    rows = [json.loads(x) for x in (tmp_path / "o" / "feedback.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("feedback" in x for x in rows)
    assert sorted((x["task_id"], x["sample_idx"]) for x in rows) == sorted(
        (t, i) for t in {x["task_id"] for x in rows} for i in (0, 1))
