"""redknot_rag.evaluation.paired_stats: paired intervals, exact McNemar, first-token KL, agreement@k, the table cell."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redknot_rag.evaluation.paired_stats import (
    agreement_at_k,
    compare_paired,
    first_token_kl,
    format_diff_ci,
    mcnemar_exact_p,
    paired_bootstrap_ci,
)


def test_mcnemar_exact_known_values() -> None:
    # 10 discordant cases split 1 : 9 -> p = 2 * (1 + 10) / 2**10
    a = [1] * 9 + [0] * 1 + [1] * 20
    b = [0] * 9 + [1] * 1 + [1] * 20
    assert mcnemar_exact_p(a, b) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact_p(b, a) == mcnemar_exact_p(a, b)  # two-sided
    assert mcnemar_exact_p([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant case
    assert mcnemar_exact_p([1, 0], [0, 1]) == 1.0  # balanced split caps at 1
    with pytest.raises(ValueError):
        mcnemar_exact_p([1, 0], [1])
    with pytest.raises(ValueError):
        mcnemar_exact_p([0.5], [1])


def test_mcnemar_matches_scipy_binomtest_when_available() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
        n01, n10 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
        want = scipy_stats.binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
        assert mcnemar_exact_p(a, b) == pytest.approx(want, rel=1e-9)


def test_paired_bootstrap_ci_deterministic_and_sized() -> None:
    rng = np.random.default_rng(1)
    full = rng.random(400) < 0.78
    flip = rng.random(400) < 0.10  # the policy flips 10% of cases
    policy = np.where(flip, ~full, full)
    lo, hi = paired_bootstrap_ci(full, policy, seed=3)
    assert (lo, hi) == paired_bootstrap_ci(full, policy, seed=3)
    diff = policy.mean() - full.mean()
    assert lo <= diff <= hi
    # the paired interval's half-width is about 1.96 * sd(d) / sqrt(n)
    d = policy.astype(float) - full.astype(float)
    assert (hi - lo) / 2 == pytest.approx(1.96 * d.std() / np.sqrt(400), rel=0.1)
    assert paired_bootstrap_ci(full, full) == (0.0, 0.0)


def test_compare_paired_summary() -> None:
    a = [1, 1, 1, 0, 0, 1, 1, 0]
    b = [1, 0, 1, 1, 0, 1, 0, 0]
    c = compare_paired(a, b)
    assert (c.num_cases, c.num_only_a, c.num_only_b) == (8, 2, 1)
    assert c.accuracy_diff == pytest.approx(-1 / 8)
    assert c.ci95[0] <= c.accuracy_diff <= c.ci95[1]
    assert c.mcnemar_p == pytest.approx(1.0)


def test_first_token_kl() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 50, generator=g), torch.randn(5, 50, generator=g)
    assert first_token_kl(p, p) == 0.0
    want = torch.nn.functional.kl_div(q.double().log_softmax(-1), p.double().log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1).mean()  # fmt: skip
    assert first_token_kl(p, q) == pytest.approx(float(want), rel=1e-9)
    assert first_token_kl(p[0], q[0]) > 0
    assert first_token_kl(p, p + 7.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    with pytest.raises(ValueError):
        first_token_kl(p, q[:, :10])


def test_agreement_at_k() -> None:
    ref = list(range(40))
    assert agreement_at_k(ref, ref) == 1.0
    assert agreement_at_k(ref, ref[:16]) == 0.5  # missing tokens are mismatches
    assert agreement_at_k(ref, [0, 1, 9, 3], k=4) == 0.75
    assert agreement_at_k([5, 6], [5, 7, 8], k=32) == 0.5  # short reference: its own length
    assert agreement_at_k([], []) == 1.0 and agreement_at_k([], [1]) == 0.0
    with pytest.raises(ValueError):
        agreement_at_k(ref, ref, k=0)


def test_format_diff_ci_in_points() -> None:
    assert format_diff_ci(-0.113, (-0.155, -0.07)) == "-11.3 [-15.5, -7.0]"
    assert format_diff_ci(0.0, [0.0, 0.042]) == "+0.0 [+0.0, +4.2]"  # the sign always shows
