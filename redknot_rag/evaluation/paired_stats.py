"""Paired statistics for policy-vs-`full` comparisons on the same cases.

Every policy answers the same cases as `full`, so differences are paired: the interval on an
accuracy difference resamples *cases* (keeping each case's pair together), and the exact
McNemar test looks only at discordant cases. With n paired binary outcomes the 95% interval on
a difference is roughly ±2·sqrt(discordant share / n): ±10 points at n=100, ±4-5 at n=400.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np
import torch


@dataclass(frozen=True)
class PairedComparison:
    """Policy `b` against reference `a` on the same n cases (binary outcomes, e.g. correct)."""

    num_cases: int
    accuracy_a: float
    accuracy_b: float
    num_only_a: int  # cases a got right and b wrong
    num_only_b: int  # cases b got right and a wrong
    ci95: tuple[float, float]  # paired bootstrap interval on accuracy_b - accuracy_a
    mcnemar_p: float  # exact two-sided McNemar p-value

    @property
    def accuracy_diff(self) -> float:
        return self.accuracy_b - self.accuracy_a


def _paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"need two 1-d outcome lists of equal length, got shapes {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("need at least one paired case")
    return x, y


def paired_bootstrap_ci(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    num_resamples: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval on mean(b) - mean(a), resampling cases with their pairs.

    a, b: `[n]` outcomes of the same cases (0/1 or any numbers). Deterministic for a seed."""
    x, y = _paired(a, b)
    if not 0.0 < level < 1.0 or num_resamples < 1:
        raise ValueError("need 0 < level < 1 and num_resamples >= 1")
    d = y - x  # [n] per-case difference
    idx = np.random.default_rng(seed).integers(0, d.size, size=(num_resamples, d.size))  # [R, n]
    means = d[idx].mean(axis=1)  # [R]
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def mcnemar_exact_p(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> float:
    """Exact two-sided McNemar p-value for paired binary outcomes: under H0 the discordant cases
    split Binomial(n01 + n10, 1/2); p = min(1, 2 * P(X <= min(n01, n10))). 1.0 with no discordance."""
    x, y = _paired(a, b)
    if not (np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all()):
        raise ValueError("McNemar needs binary (0/1) outcomes")
    n01 = int(((x == 1) & (y == 0)).sum())
    n10 = int(((x == 0) & (y == 1)).sum())
    n = n01 + n10
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(n01, n10) + 1))  # exact integers
    return min(1.0, 2 * tail / 2**n)


def compare_paired(
    a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray, num_resamples: int = 10_000, seed: int = 0
) -> PairedComparison:
    """Accuracy of reference `a` and policy `b`, discordant counts, bootstrap 95% CI, McNemar p."""
    x, y = _paired(a, b)
    return PairedComparison(
        num_cases=int(x.size),
        accuracy_a=float(x.mean()),
        accuracy_b=float(y.mean()),
        num_only_a=int(((x == 1) & (y == 0)).sum()),
        num_only_b=int(((x == 0) & (y == 1)).sum()),
        ci95=paired_bootstrap_ci(x, y, num_resamples, 0.95, seed),
        mcnemar_p=mcnemar_exact_p(x, y),
    )


def format_diff_ci(diff: float, ci95: Sequence[float]) -> str:
    """An accuracy difference and its 95% interval in points, as the report tables print them: "+1.2 [-0.5, +3.0]"."""
    lo, hi = ci95
    return f"{100 * diff:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def first_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(ref ‖ other) of the next-token distributions, in nats, computed in float64.

    ref_logits, logits: `[V]` or `[N, V]` (then the mean over the N rows)."""
    if ref_logits.shape != logits.shape or ref_logits.dim() not in (1, 2):
        raise ValueError(f"need equal [V] or [N, V] logits, got {tuple(ref_logits.shape)} and {tuple(logits.shape)}")
    ref_lp = ref_logits.double().log_softmax(-1)
    lp = logits.double().log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)  # [] or [N]
    return float(kl.mean().clamp_min(0.0))  # float rounding can dip a hair below 0


def agreement_at_k(ref_ids: Sequence[int], ids: Sequence[int], k: int = 32) -> float:
    """Share of the reference's first min(k, len(ref_ids)) tokens matched position by position
    (a missing token counts as a mismatch). An empty reference agrees only with an empty output."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = min(k, len(ref_ids))
    if n == 0:
        return 1.0 if len(ids) == 0 else 0.0
    return sum(1 for a, b in zip(ref_ids[:n], ids[:n]) if a == b) / n
