"""Small statistics helpers for the Monte Carlo tests (torch only, no scipy).

- chi2_sf(x, k): survival function of the chi-square distribution with k
  degrees of freedom, P[X >= x] = Q(k/2, x/2), the regularised upper incomplete
  gamma function (torch.special.gammaincc), in float64.
- chi2_test(counts, probs): Pearson goodness of fit after merging bins until
  every expected count is >= 5.
- assert_follows(counts, probs, alpha): fails with an observed-vs-expected
  table when the counts are implausible under probs (p < alpha), or when any
  count falls on an outcome of probability zero (impossible under probs,
  whatever the p-value).
- rate_test / assert_rate: two-sided binomial z-test (normal approximation)
  of an observed success count against a known rate.

All the Monte Carlo in the tests is seeded (counter-based seeds and a fixed
torch.Generator), so a test that passes once passes always; alpha only bounds
how unlucky one fixed choice of seeds may be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

MIN_EXPECTED = 5.0
# Significance level of every Monte Carlo test of the suite (see the last paragraph above).
ALPHA = 1e-4
# Probabilities at or below this are treated as "impossible" outcomes: no
# sample may land there (an fp32 sampler cannot produce mass below ~1e-30 anyway).
IMPOSSIBLE = 1e-30


def chi2_sf(x: float, k: int) -> float:
    """P[chi2_k >= x] = gammaincc(k/2, x/2)."""
    if k <= 0:
        return 1.0
    if x <= 0:
        return 1.0
    a = torch.tensor(k / 2.0, dtype=torch.float64)
    z = torch.tensor(x / 2.0, dtype=torch.float64)
    return float(torch.special.gammaincc(a, z))


def normal_two_sided_p(z: float) -> float:
    """P[|N(0,1)| >= |z|]."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def _as_f64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64).reshape(-1)


def merge_bins(expected: torch.Tensor, min_expected: float = MIN_EXPECTED) -> list[list[int]]:
    """Groups of bin indices whose expected counts each sum to >= min_expected.

    Bins are visited from the least to the most expected and accumulated into
    a group until it is large enough; a final undersized group is folded into
    the last complete one. When the total is below min_expected there is one
    group holding everything.
    """
    order = torch.argsort(expected, stable=True).tolist()
    groups: list[list[int]] = []
    current: list[int] = []
    mass = 0.0
    for i in order:
        current.append(i)
        mass += float(expected[i])
        if mass >= min_expected:
            groups.append(current)
            current, mass = [], 0.0
    if current:
        if groups:
            groups[-1].extend(current)
        else:
            groups.append(current)
    return groups


@dataclass
class Chi2Result:
    statistic: float
    dof: int
    p_value: float
    n: int
    groups: list[list[int]]
    observed: list[float]  # per group
    expected: list[float]  # per group
    impossible_hits: list[tuple[int, int]]  # (bin, count) with probability 0 but count > 0


def chi2_test(counts, probs) -> Chi2Result:
    """Pearson chi-square goodness of fit of counts [K] against probs [K]."""
    counts = _as_f64(counts)
    probs = _as_f64(probs)
    if counts.shape != probs.shape:
        raise ValueError(f"counts has {counts.numel()} bins but probs has {probs.numel()}")
    if bool((probs < 0).any()) or not bool(torch.isfinite(probs).all()):
        raise ValueError("probs must be finite and non-negative")
    total_p = float(probs.sum())
    if abs(total_p - 1.0) > 1e-6:
        raise ValueError(f"probs must sum to 1, got {total_p!r}")
    probs = probs / total_p
    n = float(counts.sum())
    expected = probs * n
    impossible = (probs <= IMPOSSIBLE) & (counts > 0)
    impossible_hits = [(int(i), int(counts[i])) for i in torch.nonzero(impossible).reshape(-1).tolist()]
    possible = torch.nonzero(probs > IMPOSSIBLE).reshape(-1)
    groups_local = merge_bins(expected[possible]) if possible.numel() else []
    groups = [[int(possible[i]) for i in g] for g in groups_local]
    observed_g = [float(counts[g].sum()) for g in groups]
    expected_g = [float(expected[g].sum()) for g in groups]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed_g, expected_g) if e > 0)
    dof = max(len(groups) - 1, 0)
    p = chi2_sf(stat, dof) if dof > 0 else 1.0
    return Chi2Result(stat, dof, p, int(n), groups, observed_g, expected_g, impossible_hits)


def _table(result: Chi2Result, labels: Sequence | None, max_rows: int = 40) -> str:
    def name(group):
        shown = [str(labels[i]) if labels is not None else str(i) for i in group[:4]]
        return "+".join(shown) + ("+..." if len(group) > 4 else "")

    rows = sorted(
        zip(result.groups, result.observed, result.expected),
        key=lambda r: -abs(r[1] - r[2]) / math.sqrt(max(r[2], 1e-12)),
    )
    lines = [f"{'bin':>24} {'observed':>12} {'expected':>12} {'(o-e)/sqrt(e)':>14}"]
    for group, o, e in rows[:max_rows]:
        lines.append(f"{name(group):>24} {o:12.0f} {e:12.1f} {(o - e) / math.sqrt(e):14.2f}")
    if len(rows) > max_rows:
        lines.append(f"... {len(rows) - max_rows} more bins (largest deviations shown first)")
    return "\n".join(lines)


def assert_follows(counts, probs, alpha: float = ALPHA, *, labels: Sequence | None = None, what: str = "") -> Chi2Result:
    """Assert that counts are a plausible multinomial sample of probs.

    Raises AssertionError with a readable observed-vs-expected table when the
    chi-square p-value is below alpha, or when any count sits on a bin of
    probability zero. Returns the test result otherwise.
    """
    result = chi2_test(counts, probs)
    title = f"{what}: " if what else ""
    if result.impossible_hits:
        hits = ", ".join(
            f"{labels[i] if labels is not None else i} ({c}x)" for i, c in result.impossible_hits[:10]
        )
        raise AssertionError(
            f"{title}{len(result.impossible_hits)} outcome(s) of probability 0 were observed: {hits}\n"
            + _table(result, labels)
        )
    if result.p_value < alpha:
        raise AssertionError(
            f"{title}chi-square = {result.statistic:.1f} with {result.dof} dof, "
            f"p = {result.p_value:.3g} < alpha = {alpha:g} (n = {result.n})\n" + _table(result, labels)
        )
    return result


def counts_of(samples: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Histogram of integer samples in [0, num_bins)."""
    samples = samples.reshape(-1).to(torch.int64)
    if samples.numel() and (int(samples.min()) < 0 or int(samples.max()) >= num_bins):
        raise AssertionError(
            f"samples outside [0, {num_bins}): min {int(samples.min())}, max {int(samples.max())}"
        )
    return torch.bincount(samples, minlength=num_bins)


@dataclass
class RateResult:
    successes: int
    n: int
    rate: float
    expected_rate: float
    z: float
    p_value: float


def rate_test(successes, n, rate: float) -> RateResult:
    """Two-sided z-test of successes out of n against a known rate."""
    successes, n, rate = int(successes), int(n), float(rate)
    if n <= 0:
        raise ValueError("rate_test needs n > 0")
    observed = successes / n
    var = n * rate * (1.0 - rate)
    if var <= 1e-12:
        # Degenerate rate (0 or 1): any other outcome is impossible.
        ok = abs(observed - rate) < 1e-12
        return RateResult(successes, n, observed, rate, 0.0 if ok else math.inf, 1.0 if ok else 0.0)
    z = (successes - n * rate) / math.sqrt(var)
    return RateResult(successes, n, observed, rate, z, normal_two_sided_p(z))


def assert_rate(successes, n, rate: float, alpha: float = ALPHA, *, what: str = "") -> RateResult:
    """Assert that successes / n is consistent with rate (binomial z-test)."""
    result = rate_test(successes, n, rate)
    if result.p_value < alpha:
        title = f"{what}: " if what else ""
        raise AssertionError(
            f"{title}observed rate {result.rate:.5f} ({result.successes}/{result.n}) vs expected "
            f"{result.expected_rate:.5f}: z = {result.z:.2f}, p = {result.p_value:.3g} < alpha = {alpha:g}"
        )
    return result
