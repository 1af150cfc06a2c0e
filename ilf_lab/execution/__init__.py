"""Sandboxed execution of model-written programs, and pass@k."""

from ilf_lab.execution.passk import mean_pass_at_k, pass_at_k
from ilf_lab.execution.sandbox import SandboxPool, Verdict, get_pool, run_programs, shutdown_pool

__all__ = [
    "Verdict",
    "run_programs",
    "pass_at_k",
    "mean_pass_at_k",
    "SandboxPool",
    "get_pool",
    "shutdown_pool",
]
