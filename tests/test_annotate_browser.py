"""The annotation page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium).

CI runs scripts/install_browser.sh first; without Chromium these tests skip. The end-to-end test also runs
the pipeline at smoke scale: policy x0 -> export -> annotate in the browser -> import -> ILF on the result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = Path(
    os.environ.get("ILF_LAB_SCREENSHOT", Path(tempfile.gettempdir()) / "annotate_screenshot.png")
)
XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
GOLD = {
    "add": "def add(a, b):\n    return a + b\n",
    "square": "def square(x):\n    return x * x\n",
    "is_even": "def is_even(n):\n    return n % 2 == 0\n",
    "rev": "def rev(s):\n    return s[::-1]\n",
    "maxi": "def maxi(xs):\n    return max(xs)\n",
    "count_a": "def count_a(s):\n    return s.count('a')\n",
}

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER}: run scripts/install_browser.sh (Debian chromium, chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="ilf-annotate-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    # an explicit driver path: Selenium Manager downloads nothing
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def make_items(path: Path, mini_data: Path, programs: dict[int, str]) -> Path:
    """Items as `export` writes them, for the given (task_id -> x0 program), verdicts from the sandbox."""
    from ilf_lab.annotate.export import build_items

    x0 = path.with_name("x0_samples.jsonl")
    x0.write_text(
        "".join(json.dumps({"task_id": t, "program": p, "passed": False}) + "\n" for t, p in programs.items())
    )
    from omegaconf import OmegaConf

    from ilf_lab.data import load_mbpp

    items = build_items(x0, load_mbpp(OmegaConf.create({"dir": str(mini_data)})))
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path


class Page:
    """What a test does on the page, in the annotator's terms."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.url, self.By = driver, url, By
        self.wait = WebDriverWait(driver, 60)

    def el(self, id_: str):
        return self.d.find_element(self.By.ID, id_)

    def text(self, id_: str) -> str:
        return self.d.execute_script("return document.getElementById(arguments[0]).textContent", id_)

    def open(self, fragment: str = "") -> None:
        self.d.get(self.url + fragment)
        self.wait.until(lambda d: self.text("task-id") != "")

    def wait_text(self, id_: str, needle: str) -> None:
        self.wait.until(lambda d: needle in self.text(id_))

    def type_feedback(self, text: str) -> None:
        self.el("feedback").clear()
        self.el("feedback").send_keys(text)

    def type_program(self, program: str) -> None:
        box = self.el("refinement")
        box.clear()
        box.send_keys(program)

    def run_tests(self) -> str:
        self.d.execute_script("document.getElementById('verdict').hidden = true")
        self.el("run").click()
        self.wait.until(lambda d: self.el("verdict").is_displayed())
        return self.text("verdict-head")

    def save(self) -> None:
        before = self.text("progress")
        self.el("save").click()
        self.wait.until(lambda d: self.text("progress") != before or "fail" in self.text("status"))


@pytest.fixture
def served(tmp_path, mini_data):
    """Start the app on a free port for given items; yields a factory (items path, out path) -> Page URL."""
    from ilf_lab.annotate.server import make_server

    servers = []

    def start(items: Path, out: Path) -> str:
        server = make_server(items, out, port=0, annotator="browser-test")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.url

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_annotate_run_save_reload(browser, served, tmp_path, mini_data):
    items = make_items(
        tmp_path / "items.jsonl",
        mini_data,
        {1: "def add(a, b):\n    return a - b\n", 2: "def square(x):\n    return x + x\n"},
    )
    out = tmp_path / "annotations.jsonl"
    page = Page(browser, served(items, out))
    page.open()
    assert page.text("progress") == "0 of 2 done"
    assert page.text("task-id") == "1" and "add two numbers" in page.text("task-text")
    assert page.text("program") == "def add(a, b):\n    return a - b\n"
    assert "failed" in page.text("failure")
    assert page.el("refinement").get_attribute("value") == "def add(a, b):\n    return a - b\n"

    page.type_feedback("The function subtracts b from a; it should add them.")
    assert page.run_tests().startswith("Failed")  # the unedited program still fails
    page.type_program(GOLD["add"])
    assert "Edit distance vs the original: 3.1%" in page.text("distance")  # 1 edit / 32 chars
    assert "over" not in page.el("distance").get_attribute("class")
    assert page.run_tests() == page.text("verdict-head") and page.text("verdict-head").startswith(
        "Passed all 3 tests"
    )
    browser.save_screenshot(str(SCREENSHOT))

    page.save()
    page.wait_text("progress", "1 of 2 done")
    page.wait_text("task-id", "2")  # Save & next
    (rec,) = read_jsonl(out)
    assert rec["Feedback"] == "The function subtracts b from a; it should add them."
    assert (
        rec["unedited_annotator_completion"] == GOLD["add"]
        and rec["passed"]
        and rec["worker_id"] == "browser-test"
    )

    # a big rewrite is flagged by the paper's 50% rule
    page.type_program("def square(x):\n    import math\n    return int(math.pow(x, 2))\n")
    assert "over the paper's 50% rule" in page.text("distance")
    assert "over" in page.el("distance").get_attribute("class")

    # reload: the saved item keeps its work, the unsaved edit on item 2 comes back as a draft
    browser.refresh()
    page.wait.until(lambda d: page.text("task-id") == "2")
    assert "math.pow" in page.el("refinement").get_attribute("value")
    assert "draft" in page.text("status")
    page.open("#item=1")
    browser.refresh()
    page.wait.until(lambda d: page.text("task-id") == "1")
    assert page.el("feedback").get_attribute("value") == rec["Feedback"]
    assert page.el("refinement").get_attribute("value") == GOLD["add"]
    assert "saved" in page.text("item-state") and page.text("progress") == "1 of 2 done"


def test_program_text_is_shown_never_run(browser, served, tmp_path, mini_data):
    program = f"def add(a, b):\n    return '{XSS}'\n# {XSS}\n"
    items = make_items(tmp_path / "items.jsonl", mini_data, {1: program})
    page = Page(browser, served(items, tmp_path / "annotations.jsonl"))
    page.open()
    assert page.text("program") == program  # visible as text
    assert XSS in page.el("program").text
    assert page.el("refinement").get_attribute("value") == program
    assert browser.execute_script("return document.querySelectorAll('#program *, #failure *').length") == 0
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    page.type_feedback(XSS)
    page.run_tests()
    assert browser.execute_script("return typeof window.__pwned") == "undefined"
    page.save()
    page.open("#item=1")
    browser.refresh()
    page.wait.until(lambda d: page.el("feedback").get_attribute("value") == XSS)
    assert browser.execute_script("return typeof window.__pwned") == "undefined"


def _pipeline(data: Path, cache: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "ilf_lab", "model=tiny_random", "scale=smoke", "logger=none",
        "data.splits.prompt=[0,0]", "data.splits.test=[1,4]", "data.splits.refine=[5,8]",
        "data.splits.train=[9,12]", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}", *overrides,
    ]  # fmt: skip
    env = {**os.environ, "ILF_LAB_DATA_DIR": str(data)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # two pipeline runs: about a minute on 2 CPU cores
def test_end_to_end_policy_x0_to_ilf_on_new_annotations(browser, served, tmp_path, mini_data):
    """Smoke run (policy x0) -> export -> annotate two items in the browser -> import -> ILF with them."""
    from ilf_lab.annotate.__main__ import main as annotate

    cache, run1 = tmp_path / "cache", tmp_path / "run1"
    first = _pipeline(mini_data, cache, run1, "x0=policy", "feedback=instructgpt_1shot")
    if first.returncode != 0 or not (run1 / "results.json").exists():
        pytest.skip(
            f"the pipeline's smoke run (x0=policy) failed, so there is nothing to export: {first.stderr[-500:]}"
        )

    items, out, surge = (
        tmp_path / "items.jsonl",
        tmp_path / "annotations.jsonl",
        tmp_path / "surge_format.jsonl",
    )
    assert annotate(["export", "--run", str(run1), "--data-dir", str(mini_data), "--out", str(items)]) == 0
    n_items = len(read_jsonl(items))
    assert n_items >= 2

    page = Page(browser, served(items, out))
    page.open()
    for _ in range(2):
        task = mini_task_name(page.text("tests"))
        page.type_feedback(f"This is not Python; write {task} with a one-line return.")
        page.type_program(GOLD[task])
        assert page.run_tests().startswith("Passed")
        page.save()
    page.wait_text("progress", f"2 of {n_items} done")

    assert annotate(["import", "--in", str(out), "--out", str(surge)]) == 0
    records = read_jsonl(surge)
    assert len(records) == 2 and all(r["passed"] for r in records)

    # the annotations carry their x0 (x0=annotations, the default). The model's x0 here is a few random
    # bytes, so any fix is a rewrite: lift the 50% rule for this check
    run2 = tmp_path / "run2"
    second = _pipeline(
        mini_data,
        cache,
        run2,
        "feedback=human",
        f"data.annotations_file={surge}",
        "data.max_edit_distance=1.0",
    )
    assert second.returncode == 0, second.stderr[-2000:]
    results = json.loads((run2 / "results.json").read_text())
    assert "pass@1" in results
    fb = read_jsonl(Path(results["artifacts"]["feedback"]))
    assert sorted(r["task_id"] for r in fb) == sorted(r["task_id"] for r in records)


def mini_task_name(tests: str) -> str:
    return tests.split("assert ")[1].split("(")[0]
