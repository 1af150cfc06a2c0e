"""A minimal OpenAI-compatible chat server over a local model (`python -m ilf_lab.feedback.server`).

It lets the `openai` feedback backend run offline (and be tested) against a real server on loopback; any other
OpenAI-compatible endpoint (vLLM's, llama.cpp's, a hosted API) works the same way. No PyPI wheel of such a server
installs here without compiling (llama-cpp-python ships sources only), hence this one.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ChatModel:
    """Renders chat messages with the model's template and samples one reply (serialised: one model)."""

    def __init__(self, model_path: str, dtype: str = "float32"):
        from ilf_lab.generation import make_engine
        from ilf_lab.models.loading import load_model

        model, self.tokenizer = load_model(model_path, dtype)
        self.engine = make_engine("hf", model_path, dtype=dtype, model=model, tokenizer=self.tokenizer)
        self.name = model_path
        self.lock = threading.Lock()

    def reply(self, messages: list[dict[str, str]], temperature: float, max_tokens: int, seed: int) -> str:
        from ilf_lab.generation import SamplingParams

        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        params = SamplingParams(
            n=1, temperature=temperature, max_new_tokens=max_tokens, stop=("<|im_end|>",), seed=seed
        )
        with self.lock:
            return self.engine.generate([prompt], params)[0][0]


def make_handler(chat: ChatModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, obj: dict[str, Any]) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": "not found"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = req["messages"]
                text = chat.reply(
                    messages,
                    float(req.get("temperature", 1.0)),
                    int(req.get("max_tokens") or 256),
                    int(req.get("seed") or 0),
                )
            except (KeyError, ValueError, TypeError) as e:
                self._send(400, {"error": {"message": f"bad request: {e}"}})
                return
            self._send(
                200,
                {
                    "id": f"chatcmpl-{time.time_ns()}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": req.get("model", chat.name),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                },
            )

    return Handler


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """Start the server in a background thread; returns it (call .shutdown() to stop)."""
    server = ThreadingHTTPServer((host, port), make_handler(ChatModel(model_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="HF model dir or hub id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    a = p.parse_args()
    server = ThreadingHTTPServer((a.host, a.port), make_handler(ChatModel(a.model)))
    print(f"serving {a.model} at http://{a.host}:{server.server_port}/v1", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
