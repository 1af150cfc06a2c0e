"""MBPP loading, the paper's splits and prompts, the annotation filters, and clear errors on bad data."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from ilf_lab.data import filter_annotations, load_annotation_records, load_mbpp, read_jsonl, split_ids
from ilf_lab.data.prompts import (
    Task,
    docstring_prompt,
    parse_feedback_reply,
    program_from_completion,
    target_for,
    truncate_completion,
)
from ilf_lab.errors import DataError

SPLITS = {"prompt": [1, 10], "test": [11, 110], "refine": [111, 310], "train": [311, 974]}


def data_cfg(d, **kw):
    base = {"dir": str(d), "hub_id": "x", "hub_config": "full", "annotations_file": None, "splits": SPLITS,
            "require_refinement_passes": True, "max_edit_distance": None, "one_per_task": True}
    return OmegaConf.create({**base, **kw})


def test_mini_dataset_loads(mini_data):
    tasks = load_mbpp(data_cfg(mini_data))
    assert len(tasks) == 12 and tasks[1].entry_point == "add"
    assert docstring_prompt(tasks[1]).endswith("def add(a, b):\n")


def test_real_splits_have_the_paper_sizes(real_data):
    cfg = data_cfg(real_data)
    tasks = load_mbpp(cfg)
    assert len(tasks) == 974
    assert [len(split_ids(cfg, s)) for s in ("prompt", "test", "refine", "train")] == [10, 100, 200, 664]


def test_docstring_prompt_matches_the_annotations(real_data):
    """The paper's prompt, pinned against the annotations' `prompt` field (two records differ only by
    mojibake in the released file: tasks 260 and 679)."""
    cfg = data_cfg(real_data)
    tasks = load_mbpp(cfg)
    records = load_annotation_records(cfg)
    same = [r["task_id"] for r in records if docstring_prompt(tasks[r["task_id"]]) == r["prompt"]]
    assert len(same) == len(records) - 2
    for tid in (1, 17, 311):
        rec = next((r for r in records if r["task_id"] == tid), None)
        if rec is not None:
            assert docstring_prompt(tasks[tid]) == rec["prompt"]


def test_annotations_are_used_as_released(real_data):
    """The released file is the paper's final dataset (§3, §3.1): 195 triples, all passing, one per task,
    44 in MBPPRefine (111-310) and 128 in MBPPTrain (311-974). No filter drops any by default."""
    cfg = data_cfg(real_data)
    anns, counts = filter_annotations(load_annotation_records(cfg), cfg)
    assert counts == {"all": 195, "has_feedback": 195, "refinement_passes": 195, "one_per_task": 195}
    assert len({a.task_id for a in anns}) == len(anns) == 195
    assert sum(111 <= a.task_id <= 310 for a in anns) == 44 and sum(311 <= a.task_id <= 974 for a in anns) == 128


def test_paper_edit_distance_rule_is_opt_in_and_computed_from_the_programs(real_data):
    """data.max_edit_distance=0.5 re-applies §3's rule (Levenshtein / max length of the two programs), not the
    file's `refinement_edit_distance` field (normalised by the original body's length: 51 rows are >= 0.5)."""
    from ilf_lab.data.mbpp import paper_edit_ratio

    assert paper_edit_ratio("abcd", "abcf") == 0.25 and paper_edit_ratio("", "") == 0.0
    assert paper_edit_ratio("ab", "abcd") == 0.5  # 2 insertions over max(2, 4)
    records = load_annotation_records(data_cfg(real_data))
    anns, counts = filter_annotations(records, data_cfg(real_data, max_edit_distance=0.5))
    assert counts["edit_distance"] == len(anns) == 190
    assert sum(r["refinement_edit_distance"] >= 0.5 for r in records) == 51  # what the old filter dropped


def test_missing_dir_and_file_are_named(tmp_path):
    with pytest.raises(DataError, match="data.dir does not exist"):
        load_mbpp(data_cfg(tmp_path / "nope"))
    with pytest.raises(DataError, match="mbpp.jsonl"):
        load_mbpp(data_cfg(tmp_path))


def test_malformed_line_is_named(tmp_path):
    (tmp_path / "mbpp").mkdir()
    good = {"task_id": 1, "text": "t", "code": "def f():\n  pass", "test_list": ["assert f() is None"]}
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(DataError, match=r"mbpp.jsonl line 2: malformed JSON"):
        load_mbpp(data_cfg(tmp_path))
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"task_id": 2}) + "\n")
    with pytest.raises(DataError, match=r"line 2: missing key 'text'"):
        read_jsonl(tmp_path / "mbpp" / "mbpp.jsonl", ("task_id", "text"))


def _task() -> Task:
    return Task(1, "Add two numbers.", "import math\ndef add(a, b): \n    return a + b", ("assert add(1, 2) == 3",))


def test_docstring_truncation_and_targets():
    t = _task()
    completion = "    return a + b\n\ndef other():\n    pass\nprint(add(1, 2))"
    assert truncate_completion(completion, "docstring") == "    return a + b\n"
    prog = program_from_completion(t, completion, "docstring")
    assert prog.startswith('"""\nAdd two numbers.') and prog.endswith("    return a + b\n")
    assert target_for(t, t.code, "docstring") == "    return a + b\n"
    assert target_for(t, prog, "docstring") == "    return a + b\n"


def test_chat_truncation():
    assert truncate_completion("def add(a, b):\n    return a + b\n```\nThis adds.", "chat") == (
        "def add(a, b):\n    return a + b\n"
    )
    assert target_for(_task(), "def add(a, b):\n    return a + b", "chat").endswith("```")


def test_parse_feedback_reply():
    fb, code = parse_feedback_reply("FEEDBACK: off by one.\n\nREFINEMENT:\n```python\ndef f():\n    return 1\n```")
    assert fb == "off by one." and code == "def f():\n    return 1\n"
    fb, code = parse_feedback_reply("just words")
    assert fb == "just words" and code is None


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("passed", "False", "passed='False' is not bool"),
        ("task_id", "12", "task_id='12' is not int"),
        ("task_id", True, "task_id=True is not int"),
        ("Feedback", 3, "Feedback=3 is not str/null"),
        ("original_model_completion", None, "original_model_completion=None is not str"),
        ("refinement_edit_distance", "0.2", "is not int/float/null"),
    ],
)
def test_annotation_fields_of_the_wrong_type_are_named(mini_data, tmp_path, field, value, message):
    src = (mini_data / "ilf" / "surge_annotations.jsonl").read_text().splitlines()
    row = json.loads(src[1])
    row[field] = value
    bad = tmp_path / "ann.jsonl"
    bad.write_text("\n".join([src[0], json.dumps(row), *src[2:]]) + "\n")
    with pytest.raises(DataError, match=rf"ann.jsonl line 2: .*{message}"):
        load_annotation_records(data_cfg(mini_data, annotations_file=str(bad)))


def test_empty_or_directory_annotation_file_is_an_error(mini_data, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no annotations"):
        load_annotation_records(data_cfg(mini_data, annotations_file=str(tmp_path / "empty.jsonl")))
    with pytest.raises(DataError, match="is a directory"):
        load_annotation_records(data_cfg(mini_data, annotations_file=str(tmp_path)))


def test_mbpp_fields_of_the_wrong_type_are_named(tmp_path):
    (tmp_path / "mbpp").mkdir()
    good = {"task_id": 1, "text": "t", "code": "c", "test_list": ["assert 1"]}
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({**good, "task_id": 2, "test_list": "assert 1"}) + "\n")
    with pytest.raises(DataError, match="mbpp.jsonl line 2: test_list='assert 1' is not list"):
        load_mbpp(data_cfg(tmp_path))
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(json.dumps({**good, "test_list": [1]}) + "\n")
    with pytest.raises(DataError, match="line 1: test_list"):
        load_mbpp(data_cfg(tmp_path))
