"""Accuracy metrics for randomized defenses: expected, worst-of-N, and Wilson intervals."""
from __future__ import annotations

import math
from typing import Dict, Tuple

from torch import Tensor


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> Tuple[float, float]:
    """95% (by default) Wilson score interval for a binomial proportion successes/n."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n], got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def draw_accuracy(correct: Tensor) -> Dict[str, float]:
    """Summaries of a [N_samples, M_draws] boolean matrix of per-draw correctness.

    expected: mean over samples and draws; worst_of_n: a sample counts only if every draw is
    right; best_of_n: any draw right. Intervals are Wilson 95% over samples (for expected, the
    per-sample mean is treated as the success count, rounded).
    """
    if correct.dim() != 2:
        raise ValueError(f"expected a [samples, draws] matrix, got shape {list(correct.shape)}")
    c = correct.bool()
    n, m = c.shape
    per_sample = c.float().mean(1)
    expected = per_sample.mean().item() if n else 0.0
    worst = c.all(1).sum().item()
    out = {"n": n, "draws": m, "expected": expected, "worst_of_n": worst / n if n else 0.0,
           "best_of_n": c.any(1).float().mean().item() if n else 0.0}
    out["expected_ci"] = wilson_interval(int(round(expected * n)), n)
    out["worst_of_n_ci"] = wilson_interval(int(worst), n)
    return out
