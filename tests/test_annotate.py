"""ilf_lab.annotate without a browser: edit distance, export, the JSON API, import and the CSV round trip."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ilf_lab.annotate.__main__ import main
from ilf_lab.annotate.records import RELEASED_KEYS, body, edit_distance, levenshtein
from ilf_lab.data import filter_annotations

GOLD_ADD = "def add(a, b):\n    return a + b\n"


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def x0_samples(tmp_path) -> Path:
    """Policy samples for tasks 1 (add), 2 (square), 3 (is_even): some failing, one passing."""
    return write_jsonl(
        tmp_path / "x0_samples.jsonl",
        [
            {
                "task_id": 1,
                "program": "def add(a, b):\n    return a - b  # a longer wrong one\n",
                "passed": False,
                "result": "failed",
            },
            {
                "task_id": 1,
                "program": "def add(a, b):\n    return a - b\n",
                "passed": False,
                "result": "failed",
            },
            {"task_id": 1, "program": GOLD_ADD, "passed": True, "result": "passed"},
            {
                "task_id": 2,
                "program": "def square(x):\n    return x + x\n",
                "passed": False,
                "result": "failed",
            },
            {
                "task_id": 3,
                "program": "def is_even(n):\n    return n % 2 == 0\n",
                "passed": True,
                "result": "passed",
            },
        ],
    )


# ------------------------------------------------------------------------------------------ edit distance


def test_levenshtein_and_paper_normalisation():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "abc") == 0
    assert levenshtein("flaw", "lawn") == 2
    prompt = '"""\nAdd.\n"""\n\ndef add(a, b):\n'
    # measured on the bodies after the shared prompt, over the original body's length
    assert edit_distance(
        prompt + "    return a - b\n", prompt + "    return a + b\n", prompt
    ) == pytest.approx(1 / 17)
    assert edit_distance("abcd", "abcd") == 0.0
    assert edit_distance("ab", "abcdef") == 2.0  # a rewrite of a short program exceeds 1


def test_edit_distance_matches_the_released_annotations(real_data):
    """The released `refinement_edit_distance` is levenshtein(x0 body, completion) / len(x0 body)."""
    rows = read_jsonl(real_data / "ilf" / "surge_annotations.jsonl")
    checked = 0
    for r in rows:
        p, o = r["prompt"], r["original_model_completion"]
        if not o.startswith(p):
            continue
        assert edit_distance(body(o, p), r["completion"]) == pytest.approx(
            r["refinement_edit_distance"], abs=1e-6
        )
        checked += 1
    assert checked > 150


# ---------------------------------------------------------------------------------------------- export


def test_export_shortest_failing_with_sandbox_verdicts(tmp_path, mini_data, x0_samples):
    out, csv_path = tmp_path / "items.jsonl", tmp_path / "items.csv"
    assert (
        run_cli("export", "--x0", x0_samples, "--data-dir", mini_data, "--out", out, "--csv", csv_path) == 0
    )
    items = read_jsonl(out)
    assert [it["task_id"] for it in items] == [1, 2]  # task 3 has no failing sample
    add = items[0]
    assert add["program"] == "def add(a, b):\n    return a - b\n"  # the shortest failing one
    assert add["prompt"].startswith('"""\nWrite a function to add two numbers.')
    assert add["tests"][0] == "assert add(1, 2) == 3"
    assert add["result"].startswith("failed") and not add["test_results"][0]["passed"]
    assert [t["test"] for t in add["test_results"]] == add["tests"]
    # per-test verdicts say which asserts fail: x + x is right for square(0) only
    assert [t["passed"] for t in items[1]["test_results"]] == [False, True, False]
    assert add["n_samples_failing"] == 2
    header = csv_path.read_text().splitlines()[0]
    for col in ("original_model_completion", "Feedback", "unedited_annotator_completion", "tests"):
        assert f'"{col}"' in header


def test_export_random_pick_is_seeded(tmp_path, mini_data, x0_samples):
    picks = []
    for n in range(2):
        out = tmp_path / f"items{n}.jsonl"
        assert (
            run_cli(
                "export",
                "--x0",
                x0_samples,
                "--data-dir",
                mini_data,
                "--out",
                out,
                "--pick",
                "random",
                "--seed",
                3,
            )
            == 0
        )
        picks.append([it["program"] for it in read_jsonl(out)])
    assert picks[0] == picks[1]
    assert all(it["pick"] == "random" for it in read_jsonl(tmp_path / "items0.jsonl"))


def test_export_from_run_dir_uses_results_artifacts(tmp_path, mini_data, x0_samples):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"artifacts": {"x0_samples": str(x0_samples)}}))
    write_jsonl(
        run / "x0.jsonl",
        [{"task_id": 1, "split": "train", "old_code": "x", "result": "failed", "source": "policy"}],
    )
    out = tmp_path / "items.jsonl"
    assert run_cli("export", "--run", run, "--data-dir", mini_data, "--out", out) == 0
    items = read_jsonl(out)
    assert items[0]["source"] == str(x0_samples) and items[0]["split"] == "train"


@pytest.mark.parametrize(
    "content, expect",
    [
        ('{"task_id": 1, "program": "x", "passed": false}\n{not json\n', "line 2: malformed JSON"),
        ('{"task_id": 1, "passed": false}\n', "line 1: missing key 'program'"),
        ('{"task_id": 99, "program": "x", "passed": false}\n', "line 1: task 99 is not in MBPP"),
    ],
)
def test_export_errors_name_file_and_line(tmp_path, mini_data, capsys, content, expect):
    bad = tmp_path / "x0_samples.jsonl"
    bad.write_text(content)
    out = tmp_path / "items.jsonl"
    assert run_cli("export", "--x0", bad, "--data-dir", mini_data, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{bad} {expect}" in err and err.count("\n") == 1
    assert not out.exists()


def test_missing_files_exit_2(tmp_path, mini_data, capsys):
    assert (
        run_cli("export", "--x0", tmp_path / "nope.jsonl", "--data-dir", mini_data, "--out", tmp_path / "o")
        == 2
    )
    assert "nope.jsonl" in capsys.readouterr().err
    assert run_cli("serve", "--items", tmp_path / "nope.jsonl", "--out", tmp_path / "a.jsonl") == 2
    assert "missing items file" in capsys.readouterr().err
    assert run_cli("import", "--in", tmp_path / "nope.csv", "--out", tmp_path / "o.jsonl") == 2
    assert "nope.csv" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["bogus"], "error: argument cmd: invalid choice: 'bogus'"),
        (["import", "--in", "{ann}"], "error: the following arguments are required: --out"),
        (
            ["import", "--in", "{latin1}", "--out", "{out}"],
            "error: cannot read {latin1}: 'utf-8' codec can't",
        ),
        (
            ["import", "--in", "{ann}", "--out", "{blocker}/o.jsonl"],
            "error: cannot write {blocker}/o.jsonl: ",
        ),
    ],
)
def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys, monkeypatch, args, message):
    """Bad arguments, an undecodable sheet and an unwritable output are user errors: one line, exit 2."""
    monkeypatch.delenv("ILF_LAB_DATA_DIR", raising=False)
    paths = {
        "ann": tmp_path / "ann.jsonl",
        "latin1": tmp_path / "sheet.csv",
        "out": tmp_path / "o.jsonl",
        "blocker": tmp_path / "a_file",
    }
    record = {
        "task_id": 1,
        "prompt": "p",
        "Feedback": "f",
        "original_model_completion": "a",
        "unedited_annotator_completion": "b",
        "passed": True,
    }
    write_jsonl(paths["ann"], [record])
    paths["latin1"].write_bytes('"task_id","prompt"\n"1","caf\xe9"\n'.encode("latin-1"))
    paths["blocker"].write_text("not a directory")
    assert run_cli(*[a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(**paths)) and err.count("\n") == 1, err
    assert not paths["out"].exists()


# ------------------------------------------------------------------------------------------- the web API


@pytest.fixture
def items_file(tmp_path, mini_data, x0_samples) -> Path:
    out = tmp_path / "items.jsonl"
    assert run_cli("export", "--x0", x0_samples, "--data-dir", mini_data, "--out", out) == 0
    return out


def start(items: Path, out: Path):
    from ilf_lab.annotate.server import make_server

    server = make_server(items, out, port=0, annotator="tester")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def call(server, path: str, body: dict | None = None, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json"} if body is not None else {}
    req = urllib.request.Request(server.url.rstrip("/") + path, data=data, headers={**h, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def raw_post(port: int, path: str, body: bytes, content_length: str | None = None) -> tuple[int, dict]:
    """POST `body` with any Content-Length header (a real client would not send -1), JSON reply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)) if content_length is None else content_length)
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_api_run_save_resume_and_released_schema(tmp_path, items_file):
    out = tmp_path / "annotations.jsonl"
    server = start(items_file, out)
    try:
        status, summary, _ = call(server, "/api/items")
        assert status == 200 and (summary["n"], summary["done"], summary["next"]) == (2, 0, 0)
        status, item, _ = call(server, "/api/item/0")
        assert item["item"]["task_id"] == 1 and item["saved"] is None
        status, v, _ = call(server, "/api/run", {"i": 0, "program": item["item"]["program"]})
        assert status == 200 and not v["passed"] and v["edit_distance"] == 0.0
        fixed = item["item"]["program"].replace("a - b", "a + b")
        status, v, _ = call(server, "/api/run", {"i": 0, "program": fixed})
        assert v["passed"] and all(t["passed"] for t in v["tests"]) and not v["over_limit"]
        status, r, _ = call(
            server, "/api/save", {"i": 0, "feedback": "Use + not -.", "program": fixed, "annotator": "ann1"}
        )
        assert status == 200 and r["done"] == 1 and r["next"] == 1
        assert call(server, "/api/save", {"i": 1, "feedback": "  ", "program": "x"})[0] == 400
        assert call(server, "/api/item/7")[0] == 404
    finally:
        server.shutdown()
        server.server_close()
    (rec,) = read_jsonl(out)
    assert list(rec) == list(RELEASED_KEYS)
    assert rec["task_id"] == 1 and rec["passed"] and rec["result"] == "passed" and rec["worker_id"] == "ann1"
    assert rec["unedited_annotator_completion"] == fixed and rec["Feedback"] == "Use + not -."
    assert rec["prompt"] + rec["completion"] == fixed or rec["completion"] == fixed
    assert rec["refinement_edit_distance"] == pytest.approx(1 / len(fixed))
    assert rec["test"].splitlines()[0] == "assert add(1, 2) == 3"
    # what the pipeline reads: passes its filters
    cfg = OmegaConf.create(
        {"require_refinement_passes": True, "max_edit_distance": None, "one_per_task": True}
    )
    anns, counts = filter_annotations([rec], cfg)
    assert counts["one_per_task"] == 1 and anns[0].refinement == fixed

    server = start(items_file, out)  # resume: the saved work is state
    try:
        _, summary, _ = call(server, "/api/items")
        assert (summary["done"], summary["next"]) == (1, 1)
        _, item, _ = call(server, "/api/item/0")
        assert item["saved"]["Feedback"] == "Use + not -."
    finally:
        server.shutdown()
        server.server_close()


def test_api_refuses_cross_site_requests(tmp_path, items_file):
    server = start(items_file, tmp_path / "a.jsonl")
    try:
        status, _, headers = call(server, "/api/items")
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert call(server, "/api/items", headers={"Host": "evil.example:80"})[0] == 403
        assert (
            call(server, "/api/run", {"i": 0, "program": "x"}, headers={"Origin": "http://evil.example"})[0]
            == 403
        )
        req = urllib.request.Request(
            server.url + "api/run", data=b'{"i": 0, "program": "x"}', headers={"Content-Type": "text/plain"}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 415
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "a.jsonl").exists()


BAD_REQUESTS = [  # (Content-Length header or None for the true one, body, status, words in the error)
    ("-1", b'{"i": 0, "program": "x"}', 400, "bad Content-Length: '-1'"),
    ("abc", b'{"i": 0, "program": "x"}', 400, "bad Content-Length"),
    ("99999999999", b'{"i": 0, "program": "x"}', 413, "over the 1048576-byte limit"),
    ("0", b"", 400, "empty request body"),
    (None, b'{"i": 1e400, "program": "x"}', 400, "number out of range: 1e400"),
    (None, b'{"i": NaN, "program": "x"}', 400, "NaN is not a number"),
    (None, b"not json", 400, "malformed JSON"),
    (None, b"\xff\xfe{}", 400, "not UTF-8"),
    (None, b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON"),
    (None, b"[0]", 400, "expected a JSON object"),
    (None, b'{"i": 0.5, "program": "x"}', 400, "'i' must be an integer"),
    (None, b'{"i": true, "program": "x"}', 400, "'i' must be an integer"),
    (None, b'{"i": "0", "program": "x"}', 400, "'i' must be an integer"),
    (None, b'{"i": 0, "program": 1}', 400, "'program' must be a string"),
    (None, b'{"i": 0, "program": "\\ud800"}', 400, "'program' is not valid Unicode text"),
    (None, json.dumps({"i": 0, "program": "#" * 200_000}).encode(), 413, "over the 100000-byte limit"),
]


def test_api_refuses_malformed_requests_and_keeps_serving(tmp_path, items_file):
    """Bad lengths are refused before the body is read; bad JSON, numbers, types and oversized programs get a
    JSON 4xx (never a dropped connection); the next request is answered."""
    server = start(items_file, tmp_path / "a.jsonl")
    port = server.server_address[1]
    try:
        for content_length, body, status, message in BAD_REQUESTS:
            for path in ("/api/run", "/api/save"):
                got, reply = raw_post(port, path, body, content_length)
                assert got == status and message in reply["error"], (content_length, body[:40], reply)
                assert call(server, "/api/items")[0] == 200
        _, v, _ = call(server, "/api/run", {"i": 0, "program": GOLD_ADD})
        assert v["passed"]
    finally:
        server.shutdown()
        server.server_close()
    assert not (tmp_path / "a.jsonl").exists()


def test_api_edit_distance_of_a_large_program_is_fast(tmp_path, items_file):
    """The server's edit distance is rapidfuzz's C one: 60 KB against 60 KB was 12 s of pure-Python CPU."""
    a, b = "x = 1\n" * 10_000, "y = 2\n" * 10_000
    t = time.perf_counter()
    assert edit_distance(a, b) == pytest.approx(2 / 6)
    assert time.perf_counter() - t < 2.0
    server = start(items_file, tmp_path / "a.jsonl")
    try:
        status, v, _ = call(server, "/api/run", {"i": 0, "program": "# " + "x" * 90_000 + "\n"})
        assert status == 200 and not v["passed"] and v["over_limit"]
    finally:
        server.shutdown()
        server.server_close()


def test_serve_rejects_a_malformed_out_file(tmp_path, items_file, capsys):
    out = tmp_path / "annotations.jsonl"
    out.write_text('{"task_id": 1}\n')
    assert run_cli("serve", "--items", items_file, "--out", out, "--port", "0") == 2
    assert f"{out} line 1: missing key 'prompt'" in capsys.readouterr().err
    assert out.read_text() == '{"task_id": 1}\n'


# ---------------------------------------------------------------------------------------------- import


def test_csv_round_trip_is_identical(tmp_path, mini_data):
    src = mini_data / "ilf" / "surge_annotations.jsonl"
    a_jsonl, a_csv, b_jsonl = tmp_path / "a.jsonl", tmp_path / "a.csv", tmp_path / "b.jsonl"
    assert run_cli("import", "--in", src, "--out", a_jsonl, "--csv", a_csv) == 0
    assert read_jsonl(a_jsonl) == read_jsonl(src)
    assert run_cli("import", "--in", a_csv, "--out", b_jsonl) == 0
    assert b_jsonl.read_bytes() == a_jsonl.read_bytes()


def test_csv_round_trip_of_the_released_file(tmp_path, real_data):
    """195 records with \\r\\n inside fields, nulls, floats: JSONL -> CSV -> JSONL gives identical records."""
    src = real_data / "ilf" / "surge_annotations.jsonl"
    a_csv, b_jsonl = tmp_path / "a.csv", tmp_path / "b.jsonl"
    assert run_cli("import", "--in", src, "--out", a_csv) == 0
    assert run_cli("import", "--in", a_csv, "--out", b_jsonl) == 0
    assert read_jsonl(b_jsonl) == read_jsonl(src)


def test_import_a_filled_in_items_sheet(tmp_path, mini_data, x0_samples):
    """Spreadsheet people fill Feedback and edit the program; import runs the tests and writes the schema."""
    import csv

    items, sheet = tmp_path / "items.jsonl", tmp_path / "items.csv"
    assert run_cli("export", "--x0", x0_samples, "--data-dir", mini_data, "--out", items, "--csv", sheet) == 0
    with sheet.open(newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0]["Feedback"] = "It subtracts; add instead."
    rows[0]["unedited_annotator_completion"] = rows[0]["original_model_completion"].replace("a - b", "a + b")
    rows[0]["worker_id"] = "sheet1"
    # row 1 (square) left blank: not annotated yet
    with sheet.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), quoting=csv.QUOTE_ALL)
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "surge_format.jsonl"
    assert run_cli("import", "--in", sheet, "--out", out) == 0
    (rec,) = read_jsonl(out)
    assert list(rec) == list(RELEASED_KEYS)
    assert rec["passed"] is True and rec["result"] == "passed" and rec["worker_id"] == "sheet1"
    assert rec["refinement_edit_distance"] == pytest.approx(1 / len(rows[0]["original_model_completion"]))


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("a.jsonl", '{"task_id": 1}\n', "line 1: missing key 'prompt'"),
        ("a.jsonl", "\n[1, 2]\n", "line 2: expected a JSON object"),
        ("a.csv", '"task_id","prompt"\n"1","p"\n', "line 1: missing column 'Feedback'"),
        (
            "a.csv",
            '"task_id","prompt","Feedback","original_model_completion","unedited_annotator_completion","passed"\n'
            '"1","p","fb","x","y","true"\n"2","p\nq","fb","x","y","maybe"\n',
            "line 3: passed must be true or false",
        ),
        (
            "a.csv",
            '"task_id","prompt","Feedback","original_model_completion","unedited_annotator_completion"\n"1","p","fb","x","y"\n',
            "line 2: whether the refinement passes is unknown",
        ),
    ],
)
def test_import_errors_name_file_and_line(tmp_path, capsys, monkeypatch, name, content, expect):
    monkeypatch.delenv("ILF_LAB_DATA_DIR", raising=False)
    bad = tmp_path / name
    bad.write_text(content)
    out = tmp_path / "out.jsonl"
    assert run_cli("import", "--in", bad, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{bad} {expect}" in err, err
    assert not out.exists()
