"""Why samples fail: pass@1 and the share of failing samples by error type, from a run's eval_samples.jsonl.

    python scripts/failure_reasons.py outputs/<run>/eval_samples.jsonl [more.jsonl ...]

Prints one JSON object per file: samples, pass@1 (mean over tasks of c/n), and for the failing samples the share
of each error type (`NameError`, `AssertionError`, `SyntaxError`, `timed out`, ...).
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

from ilf_lab.io import read_jsonl


def reasons(path: str) -> dict:
    rows = read_jsonl(path, ("task_id", "passed", "result"))
    per_task: dict[str, list[int]] = {}
    kinds: Counter[str] = Counter()
    for r in rows:
        nc = per_task.setdefault(str(r["task_id"]), [0, 0])
        nc[0] += 1
        nc[1] += int(r["passed"])
        if not r["passed"]:
            m = re.search(r"\b([A-Z][A-Za-z]*(?:Error|Exception))\b", r["result"])
            kinds[m.group(1) if m else r["result"].split(":")[0].strip()] += 1
    failing = sum(kinds.values())
    return {
        "file": path,
        "samples": len(rows),
        "tasks": len(per_task),
        "pass@1": sum(c / n for n, c in per_task.values()) / max(1, len(per_task)),
        "failing": failing,
        "share": {k: round(v / failing, 3) for k, v in kinds.most_common()} if failing else {},
    }


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(json.dumps(reasons(p)))
