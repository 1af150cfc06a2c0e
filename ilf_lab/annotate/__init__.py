"""Human feedback on the policy's own failing programs (ILF Algorithm 1, step 2 done by people).

`python -m ilf_lab.annotate export` picks one failing sample per task from a run, `serve` is a local web app
to write feedback f and a refinement x1 (tests run in the sandbox), and `import` turns a JSONL or a
spreadsheet into the released ILF annotation schema that `feedback=human data.annotations_file=PATH` reads.
"""

from ilf_lab.annotate.records import (
    MAX_EDIT_DISTANCE,
    RELEASED_KEYS,
    AnnotateError,
    edit_distance,
    levenshtein,
    make_record,
)

__all__ = [
    "MAX_EDIT_DISTANCE",
    "RELEASED_KEYS",
    "AnnotateError",
    "edit_distance",
    "levenshtein",
    "make_record",
]
