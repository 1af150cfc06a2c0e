"""The annotation web app: stdlib http.server + one static page (no build step, no framework).

State is the out file itself (released schema, rewritten atomically on each save), so stopping and
restarting resumes where the annotator stopped. Programs run server-side in the sandbox. The page never
puts program text into HTML (textContent only) and is served with a CSP that forbids inline script;
POSTs must be JSON from this origin (a web page elsewhere cannot drive the sandbox through the browser).
"""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ilf_lab.annotate.export import read_items
from ilf_lab.annotate.records import (
    MAX_EDIT_DISTANCE,
    AnnotateError,
    atomic_write_text,
    edit_distance,
    jsonl_text,
    make_record,
    normalize_record,
    read_jsonl_rows,
)
from ilf_lab.feedback.server import SOCKET_TIMEOUT, BadRequest, is_int, read_json_body

STATIC_FILES = {"index.html": "text/html", "app.js": "text/javascript", "app.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
MAX_BODY = 1 << 20
MAX_PROGRAM = 100_000  # bytes of UTF-8 in a refinement: MBPP programs are < 2 KB


class AnnotationStore:
    """Items + the saved annotations (the out file); thread-safe; the sandbox runs one request at a time."""

    def __init__(self, items_path: str | Path, out_path: str | Path, timeout: float = 10.0) -> None:
        self.items = read_items(items_path)
        self.out_path = Path(out_path)
        self.timeout = timeout
        self.records: list[dict[str, Any]] = []
        if self.out_path.exists():
            for lineno, row in read_jsonl_rows(self.out_path, "annotations file"):
                self.records.append(normalize_record(row, f"{self.out_path} line {lineno}"))
        self._lock = threading.Lock()
        self._sandbox = threading.Lock()

    def saved(self, task_id: int) -> dict[str, Any] | None:
        """The latest saved record for a task (a resumed session shows it)."""
        for r in reversed(self.records):
            if r["task_id"] == task_id:
                return r
        return None

    def summary(self) -> dict[str, Any]:
        with self._lock:
            rows = []
            for i, it in enumerate(self.items):
                rec = self.saved(it["task_id"])
                rows.append(
                    {
                        "i": i,
                        "task_id": it["task_id"],
                        "done": rec is not None,
                        "passed": None if rec is None else rec["passed"],
                    }
                )
        done = sum(r["done"] for r in rows)
        nxt = next((r["i"] for r in rows if not r["done"]), None)
        return {
            "n": len(rows),
            "done": done,
            "next": nxt,
            "items": rows,
            "out": str(self.out_path),
            "max_edit_distance": MAX_EDIT_DISTANCE,
        }

    def item(self, i: int) -> dict[str, Any]:
        it = self._get(i)
        with self._lock:
            saved = self.saved(it["task_id"])
        return {"i": i, "n": len(self.items), "item": it, "saved": saved}

    def _get(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self.items):
            raise LookupError(f"no item {i} (there are {len(self.items)})")
        return self.items[i]

    def run(self, i: int, program: str) -> dict[str, Any]:
        """Run a refinement against the item's tests: overall verdict, per test, and the edit distance."""
        from ilf_lab.execution import run_programs

        it = self._get(i)
        tests = list(it["tests"])
        base = {"task_id": it["task_id"], "program": program, "setup": it.get("setup") or ""}
        jobs = [{**base, "tests": tests}] + [{**base, "tests": [t]} for t in tests]
        with self._sandbox:
            verdicts = run_programs(jobs, timeout=self.timeout)
        whole, per_test = verdicts[0], verdicts[1:]
        dist = edit_distance(it["program"], program, it["prompt"])
        return {
            "passed": whole.passed,
            "result": whole.result,
            # "sealed": decided outside the program's process (docs/sandbox.md); "partial": part ran inside it
            "trust": whole.trust,
            "stdout": whole.stdout,
            "seconds": round(whole.seconds, 3),
            "tests": [
                {"test": t, "passed": v.passed, "result": v.result}
                for t, v in zip(tests, per_test, strict=True)
            ],
            "edit_distance": dist,
            "over_limit": dist >= MAX_EDIT_DISTANCE,
        }

    def save(self, i: int, feedback: str, program: str, annotator: str) -> dict[str, Any]:
        """Verify the refinement (server-side, never trusting the page) and store the released-schema record."""
        it = self._get(i)
        if not feedback.strip():
            raise ValueError("write some feedback first")
        if not program.strip():
            raise ValueError("the refinement is empty")
        if not annotator.strip():
            raise ValueError("set an annotator id")
        verdict = self.run(i, program)
        record = make_record(
            task_id=it["task_id"],
            prompt=it["prompt"],
            tests=it["tests"],
            feedback=feedback.strip(),
            refinement=program,
            original=it["program"],
            passed=verdict["passed"],
            result=verdict["result"],
            worker_id=annotator.strip(),
        )
        with self._lock:
            records = [r for r in self.records if r["task_id"] != it["task_id"]] + [record]
            # rewrite first, then adopt: a failed write leaves the old state in memory and on disk
            atomic_write_text(self.out_path, jsonl_text(records))
            self.records = records
        return {
            "record": record,
            "verdict": verdict,
            **{k: v for k, v in self.summary().items() if k != "items"},
        }


class Handler(BaseHTTPRequestHandler):
    server: AnnotateServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        if self.server.verbose:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ helpers

    def _send(self, status: int, body: bytes, ctype: str, close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if close:  # after a refused or unread body: its bytes must not be read as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", close)

    def _error(self, status: int, message: str, close: bool = False) -> None:
        self._json(status, {"error": message}, close)

    def _host_ok(self) -> bool:
        """Host (DNS rebinding) and Origin (cross-site requests) must name this server."""
        host = (self.headers.get("Host") or "").lower()
        if host not in self.server.allowed_hosts:
            return False
        origin = self.headers.get("Origin")
        if origin and origin != "null":
            return urlsplit(origin).netloc.lower() in self.server.allowed_hosts
        return origin != "null"

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "bad Host or Origin")
        path = urlsplit(self.path).path
        store = self.server.store
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html")
            if path.startswith("/static/"):
                return self._static(path[len("/static/") :])
            if path == "/api/items":
                return self._json(HTTPStatus.OK, {**store.summary(), "annotator": self.server.annotator})
            if path.startswith("/api/item/"):
                return self._json(HTTPStatus.OK, store.item(int(path[len("/api/item/") :])))
        except (LookupError, ValueError) as e:
            return self._error(HTTPStatus.NOT_FOUND, str(e))
        self._error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        if not self._host_ok():
            return self._error(HTTPStatus.FORBIDDEN, "bad Host or Origin", close=True)
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json", close=True)
        path = urlsplit(self.path).path
        if path not in ("/api/run", "/api/save"):
            return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}", close=True)
        try:
            data = read_json_body(self.headers, self.rfile, MAX_BODY)
            i = data.get("i")
            if not is_int(i):
                raise BadRequest(HTTPStatus.BAD_REQUEST, "'i' must be an integer (the item's index)")
            program = _text(data, "program")
            size = len(program.encode("utf-8"))
            if size > MAX_PROGRAM:
                raise BadRequest(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"the program is {size} bytes, over the {MAX_PROGRAM}-byte limit",
                )
            if path == "/api/save":
                feedback = _text(data, "feedback")
                annotator = _text(data, "annotator", optional=True) or self.server.annotator
        except BadRequest as e:
            return self._error(e.status, f"bad request: {e}", close=True)
        store = self.server.store
        try:
            if path == "/api/run":
                return self._json(HTTPStatus.OK, store.run(i, program))
            return self._json(HTTPStatus.OK, store.save(i, feedback, program, annotator))
        except LookupError as e:
            return self._error(HTTPStatus.NOT_FOUND, str(e))
        except ValueError as e:
            return self._error(HTTPStatus.BAD_REQUEST, str(e))
        except OSError as e:
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"could not write {store.out_path}: {e}")
        except Exception as e:  # answer, never drop the connection; the server keeps serving
            print(f"annotate server: {path} failed: {e!r}", file=sys.stderr)
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(e).__name__}: {e}")

    def _static(self, name: str) -> None:
        if name not in STATIC_FILES:
            return self._error(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        body = resources.files("ilf_lab.annotate").joinpath("static", name).read_bytes()
        self._send(HTTPStatus.OK, body, STATIC_FILES[name] + "; charset=utf-8")


def _text(data: dict[str, Any], key: str, optional: bool = False) -> str:
    """A string field that can be written out as UTF-8 (JSON allows lone surrogates), or BadRequest(400)."""
    value = data.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"'{key}' must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(HTTPStatus.BAD_REQUEST, f"'{key}' is not valid Unicode text") from None
    return value


class AnnotateServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, store: AnnotationStore, host: str, port: int, annotator: str, verbose: bool = False
    ) -> None:
        super().__init__((host, port), Handler)
        self.store = store
        self.annotator = annotator
        self.verbose = verbose
        port = self.server_address[1]
        names = {host, "127.0.0.1", "localhost", "[::1]"} if _is_loopback(host) else {host}
        self.allowed_hosts = {f"{h}:{port}".lower() for h in names}

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def make_server(
    items: str | Path,
    out: str | Path,
    host: str = "127.0.0.1",
    port: int = 8765,
    annotator: str = "",
    timeout: float = 10.0,
    verbose: bool = False,
) -> AnnotateServer:
    """Load items and the out file (errors name file and line) and bind; port 0 picks a free port."""
    store = AnnotationStore(items, out, timeout)
    if not _is_loopback(host):
        print(
            f"warning: serving on {host}: anyone who can reach it can run code in the sandbox",
            file=sys.stderr,
        )
    try:
        return AnnotateServer(store, host, port, annotator, verbose)
    except OSError as e:
        raise AnnotateError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
