"""A minimal OpenAI-compatible chat server over a local model (`python -m ilf_lab.feedback.server`).

It lets the `openai` feedback backend run offline (and be tested) against a real server on loopback; any other
OpenAI-compatible endpoint (vLLM's, llama.cpp's, a hosted API) works the same way. No PyPI wheel of such a server
installs here without compiling (llama-cpp-python ships sources only), hence this one.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO

MAX_BODY = 4 << 20  # a chat request: k-shot prompts are a few KB
MAX_TOKENS = 32768  # as config.MAX_NEW_TOKENS
SOCKET_TIMEOUT = 30.0  # per read/write on a connection: a client that stops sending is dropped


class BadRequest(Exception):
    """A request answered with `status` and `message`; the connection is closed after it (the body may be unread)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_json_body(headers: Message, rfile: BinaryIO, max_body: int) -> dict[str, Any]:
    """A request's JSON object, or BadRequest. The Content-Length (one value, digits only, at most `max_body`;
    no chunked bodies) is checked before any byte is read (411/400/413); the body must be that many bytes of
    UTF-8 JSON with finite numbers, nested within the parser's depth, and an object (400)."""
    if headers.get("Transfer-Encoding"):
        raise BadRequest(411, "chunked request bodies are not accepted: send a Content-Length")
    values = [v.strip() for v in headers.get_all("Content-Length") or []]
    if not values:
        raise BadRequest(411, "a Content-Length is required")
    if len(set(values)) != 1 or not re.fullmatch(r"[0-9]{1,19}", values[0]):
        raise BadRequest(400, f"bad Content-Length: {', '.join(values)[:40]!r}")
    length = int(values[0])
    if length > max_body:
        raise BadRequest(413, f"request body of {length} bytes is over the {max_body}-byte limit")
    if length == 0:
        raise BadRequest(400, "empty request body: expected a JSON object")
    raw = rfile.read(length)
    if len(raw) < length:
        raise BadRequest(400, "request body shorter than its Content-Length")
    try:
        data = json.loads(raw.decode("utf-8"), parse_float=_finite_float, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise BadRequest(400, "request body is not UTF-8") from None
    except (ValueError, RecursionError) as e:
        raise BadRequest(400, f"malformed JSON: {str(e)[:200] or type(e).__name__}") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "expected a JSON object")
    return data


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not a number")


def is_int(value: Any) -> bool:
    """A JSON integer (not a bool, not 1.0)."""
    return isinstance(value, int) and not isinstance(value, bool)


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
        timeout = SOCKET_TIMEOUT

        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, obj: dict[str, Any], close: bool = False) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": chat.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": "not found"}}, close=True)
                return
            try:
                req = read_json_body(self.headers, self.rfile, MAX_BODY)
                messages, temperature, max_tokens, seed = _chat_args(req)
            except BadRequest as e:
                self._send(e.status, {"error": {"message": f"bad request: {e}"}}, close=True)
                return
            try:
                text = chat.reply(messages, temperature, max_tokens, seed)
            except Exception as e:  # the model failed: say so, keep serving
                self._send(500, {"error": {"message": f"model error: {type(e).__name__}: {str(e)[:300]}"}})
                return
            model = req.get("model")
            self._send(
                200,
                {
                    "id": f"chatcmpl-{time.time_ns()}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model if isinstance(model, str) else chat.name,
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


def _chat_args(req: dict[str, Any]) -> tuple[list[dict[str, str]], float, int, int]:
    """(messages, temperature, max_tokens, seed) from a chat request, or BadRequest(400) naming the field."""
    messages = req.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise BadRequest(400, "'messages' must be a non-empty list of {role: string, content: string}")
    temperature = req.get("temperature", 1.0)
    if temperature is None:
        temperature = 1.0
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise BadRequest(400, f"'temperature' must be a number >= 0, got {str(temperature)[:40]}")
    max_tokens = req.get("max_tokens")
    if max_tokens is None:
        max_tokens = 256
    if not is_int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(
            400, f"'max_tokens' must be an integer in [1, {MAX_TOKENS}], got {str(max_tokens)[:40]}"
        )
    seed = req.get("seed")
    if seed is None:
        seed = 0
    if not is_int(seed) or not -(2**63) <= seed < 2**63:
        raise BadRequest(400, f"'seed' must be a 64-bit integer, got {str(seed)[:40]}")
    return messages, float(temperature), max_tokens, seed


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
