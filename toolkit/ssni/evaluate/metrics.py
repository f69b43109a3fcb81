"""Accuracy metrics for randomized defenses: expected, worst-of-N, majority vote, the worst case
over attacks, and Wilson intervals."""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch
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


def majority_vote_accuracy(predictions: Tensor, y: Tensor) -> Dict[str, Any]:
    """Accuracy of the per-sample majority vote; predictions [N, M] class ids over M draws, y [N].

    A sample counts if its most frequent predicted class is y and no other class is as frequent
    (ties count as wrong: the vote did not decide). Returns n, draws, majority (accuracy),
    majority_ci (Wilson 95% over samples) and correct ([N] bool).
    """
    if predictions.dim() != 2:
        raise ValueError(f"expected [samples, draws] class ids, got shape {list(predictions.shape)}")
    n, m = predictions.shape
    y = y.reshape(-1).to(predictions.device).long()
    if y.numel() != n:
        raise ValueError(f"y must have one label per sample ({n}), got {y.numel()}")
    if n == 0 or m == 0:
        return {"n": n, "draws": m, "majority": 0.0, "majority_ci": wilson_interval(0, n),
                "correct": torch.zeros(n, dtype=torch.bool)}
    p = predictions.long()
    k = int(max(p.max().item(), y.max().item())) + 1
    counts = torch.zeros(n, k, dtype=torch.long, device=p.device).scatter_add_(1, p, torch.ones_like(p))
    top = counts.amax(1)
    unique_top = (counts == top[:, None]).sum(1) == 1
    correct = (counts.gather(1, y[:, None])[:, 0] == top) & unique_top
    hits = int(correct.sum().item())
    return {"n": n, "draws": m, "majority": hits / n, "majority_ci": wilson_interval(hits, n),
            "correct": correct.cpu()}


def worst_case(correct_by_attack: Dict[str, Tensor]) -> Dict[str, Any]:
    """Per-sample worst case over attacks (AutoAttack style); each value [N, M] bool per draw.

    A sample is robust (worst-of-N) only if every draw survives every attack; its expected score
    is the lowest per-attack mean over draws (the attacker picks, per sample, its best attack).
    Returns n, attacks, per_sample ([N] float), robust ([N] bool), expected, worst_of_n, their
    Wilson intervals, and by_attack (each attack's expected accuracy alone).
    """
    if not correct_by_attack:
        raise ValueError("worst_case needs at least one attack")
    names = list(correct_by_attack)
    mats = [correct_by_attack[a].bool().cpu() for a in names]
    for a, c in zip(names, mats):
        if c.dim() != 2:
            raise ValueError(f"attack {a!r}: expected a [samples, draws] matrix, got {list(c.shape)}")
        if c.shape[0] != mats[0].shape[0]:
            raise ValueError(f"attack {a!r} has {c.shape[0]} samples, {names[0]!r} has {mats[0].shape[0]}")
    n = mats[0].shape[0]
    # draws may differ between attacks, so combine per sample, not per draw index
    per_attack = torch.stack([c.float().mean(1) for c in mats])  # [A, N]
    per_sample = per_attack.amin(0)
    robust = torch.stack([c.all(1) for c in mats]).all(0)
    expected = per_sample.mean().item() if n else 0.0
    worst = int(robust.sum().item())
    return {"n": n, "attacks": names, "per_sample": per_sample, "robust": robust,
            "expected": expected, "expected_ci": wilson_interval(int(round(expected * n)), n),
            "worst_of_n": worst / n if n else 0.0, "worst_of_n_ci": wilson_interval(worst, n),
            "by_attack": {a: per_attack[i].mean().item() if n else 0.0 for i, a in enumerate(names)}}


def paired_difference(a: Tensor, b: Tensor, z: float = 1.959963984540054) -> Dict[str, Any]:
    """Mean over samples of a - b for paired per-sample scores a, b [N] (e.g. each image's expected
    accuracy under two defenses), with a normal-approximation 95% interval: {n, diff, ci}.

    Pairing removes the images' own difficulty from the comparison, so the interval is narrower than
    the two accuracies' intervals suggest when the defenses fail on the same images.

    Example:
        >>> r = paired_difference(torch.tensor([1., 1., 0., 1.]), torch.tensor([1., 0., 0., 0.]))
        >>> r["n"], r["diff"]
        (4, 0.5)
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"paired_difference needs two [N] score vectors of the same samples, got "
                         f"{list(a.shape)} and {list(b.shape)}")
    d = a.double() - b.double()
    n = d.numel()
    if n == 0:
        return {"n": 0, "diff": 0.0, "ci": (-1.0, 1.0)}
    mean = d.mean().item()
    half = z * (d.std().item() if n > 1 else 1.0) / math.sqrt(n)
    return {"n": n, "diff": mean, "ci": (max(-1.0, mean - half), min(1.0, mean + half))}
