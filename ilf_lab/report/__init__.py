"""Results -> the paper's Table 4 (architecture contract 4), and the data behind the notebooks' figures.

    python -m ilf_lab.report DIR... [--out DIR]

finds every `results.json` under the dirs, prints the table as markdown (ours beside the paper's numbers, one
table per model/scale), and writes `table.csv` and `table.png` into `--out` (default: the first DIR). Results
that are no row of Table 4 (a hyper-parameter point, a feedback-scaling point, iterative rounds, ...) are listed in
a section of their own; several runs of one row (seeds) are shown as mean ± std with their count. Runs that
sampled refinements (every ILF-style run, and the `refine_analysis` sweep's runs, which stop after the refine
stage) also give Tables 2-3: how often the refinements pass, by refiner and feedback (`refinements.csv/.png`).

Every result is read as one `ilf_lab.results.Results`. Everything the notebooks plot comes from the functions
here, so the notebooks hold no logic of their own. No pandas: the csv module and matplotlib only.

Modules: `load` (finding and reading results), `table4` (Table 4 rows, markdown, CSV), `refinements`
(Tables 2-3), `stats` (mean ± std, per-task pass@k, paired bootstrap), `compare` (the paired comparisons
and their power: comparisons.csv), `series` (the figures' data),
`selection` (App. A.1 best point), `figures` (matplotlib), `output` (formats, escaping, files), `cli`.
"""

from ilf_lab.report.cli import build, main, report
from ilf_lab.report.compare import Comparison, comparisons, comparisons_markdown
from ilf_lab.report.figures import (
    plot,
    plot_feedback_scaling,
    plot_perplexity,
    plot_refinements,
    plot_training,
)
from ilf_lab.report.load import ReportError, collect, collect_or_published
from ilf_lab.report.output import MISSING
from ilf_lab.report.refinements import (
    REFINE_CSV_COLUMNS,
    REFINER_NAMES,
    RefineRow,
    refinement_records,
    refinement_rows,
    refinements_markdown,
    write_refinements_csv,
)
from ilf_lab.report.selection import best_overrides
from ilf_lab.report.series import feedback_num_tasks, feedback_scaling, perplexities, training_curves
from ilf_lab.report.stats import Paired, paired, paired_delta, per_task_pass
from ilf_lab.report.table4 import (
    CSV_COLUMNS,
    Row,
    deviations,
    run_label,
    table,
    to_markdown,
    to_records,
    write_csv,
)
from ilf_lab.results import Results, ResultsError

__all__ = [
    "Comparison",
    "comparisons",
    "comparisons_markdown",
    "CSV_COLUMNS",
    "MISSING",
    "REFINER_NAMES",
    "REFINE_CSV_COLUMNS",
    "RefineRow",
    "ReportError",
    "Results",
    "ResultsError",
    "Row",
    "best_overrides",
    "build",
    "collect",
    "collect_or_published",
    "deviations",
    "feedback_num_tasks",
    "feedback_scaling",
    "main",
    "Paired",
    "paired",
    "paired_delta",
    "per_task_pass",
    "perplexities",
    "plot",
    "plot_feedback_scaling",
    "plot_perplexity",
    "plot_refinements",
    "plot_training",
    "refinement_records",
    "refinement_rows",
    "refinements_markdown",
    "report",
    "run_label",
    "table",
    "to_markdown",
    "to_records",
    "training_curves",
    "write_csv",
    "write_refinements_csv",
]
