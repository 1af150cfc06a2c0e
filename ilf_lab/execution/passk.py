"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c correct, passes).

    Computed as ``1 - prod(1 - k / arange(n - c + 1, n + 1))``, which avoids the huge
    binomials of ``1 - C(n-c, k) / C(n, k)``.
    """
    if n < 0 or c < 0 or k < 1:
        raise ValueError(f"need n >= 0, c >= 0, k >= 1 (got n={n}, c={c}, k={k})")
    if c > n:
        raise ValueError(f"c={c} correct samples out of n={n} is impossible")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with only n={n} samples")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over tasks of ``pass_at_k(n, c, k)`` for ``(n, c)`` pairs."""
    if not counts:
        raise ValueError("no tasks")
    return float(np.mean([pass_at_k(n, c, k) for n, c in counts]))
