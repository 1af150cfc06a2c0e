"""LLM feedback: the local-HF backend, the OpenAI-compatible backend against a real server on loopback
(ilf_lab.feedback.server over the tiny model), retries with backoff, and the pipeline using the endpoint."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ilf_lab.data.prompts import Task
from ilf_lab.feedback import HFBackend, OpenAIBackend, llm_feedback
from ilf_lab.feedback.server import serve
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
