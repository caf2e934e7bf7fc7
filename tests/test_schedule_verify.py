"""schedule_verify: the paper's worked example, an independent brute-force
Algorithm 1 / async scheduler over thousands of random batches, the
structural properties of a schedule, non-anticipation
(paper appendix A), losslessness end to end by Monte Carlo through
rejection_sample, and capturability (opcheck, torch.compile, no host sync,
CUDA-graph capture on a GPU). Argument validation: tests/test_validation.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import schedule_verify as op

from host_sync import HostSyncSpy
from stats import rate_test
from support import DEVICE, available_backends, capture_graph, debug_mode, interpreted

BACKENDS = available_backends(op)


def cases(n: int, backend: str) -> int:
    """Fewer random cases where a backend runs through the Triton interpreter (~0.3 s a
    call at R = 4, ~1 min at R = 1024; the full counts run on a GPU, and on CPU for the
    reference)."""
    return min(n, 10) if interpreted(backend) else n

# The paper's appendix A table: sps[B] for a verify batch of B tokens.
PAPER_SPS = [0.0, 1.0, 0.5, 0.45]


def paper_sps(length: int) -> torch.Tensor:
    """[0, 1.0, 0.5, 0.45, 0.4, 0.374, ...]: the appendix table, then slowly falling."""
    vals = list(PAPER_SPS) + [0.4 / (1.0 + 0.07 * k) for k in range(max(length - 4, 0))]
    return torch.tensor(vals[:length], dtype=torch.float32)


def sched(survival, sps, backend, **kw):
    dev = lambda t: None if t is None else t.to(DEVICE)
    out = dk.schedule_verify(
        survival.to(DEVICE), sps.to(DEVICE), mode=kw.get("mode", "causal"), history=dev(kw.get("history")),
        max_len=dev(kw.get("max_len")), active=dev(kw.get("active")), capacity=dev(kw.get("capacity")),
        backend=backend,
    )
    return dk.Schedule(*(t.cpu() for t in out))


# ---------------------------------------------------------------------------
# 1. The paper's worked example (appendix A).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_appendix_a(backend):
    surv = torch.tensor([[0.8, 0.72]])
    sps = torch.tensor(PAPER_SPS)
    # Causal: Θ_0 = 1·1.0 = 1.0, Θ_1 = 1.8·0.5 = 0.9 does not rise: stop before
    # looking at the second draft, verify the anchor only.
    c = sched(surv, sps, backend)
    assert c.lengths.tolist() == [0]
    assert c.cu_verify.tolist() == [0, 1]
    assert int(c.total) == 1
    assert float(c.expected_tokens) == pytest.approx(1.0, abs=1e-6)
    # Unconstrained search over the same survival: Θ_2 = 2.52·0.45 = 1.134 is the
    # best of (1.0, 0.9, 1.134): both drafts.
    a = sched(surv, sps, backend, mode="async", history=surv)
    assert a.lengths.tolist() == [2]
    assert a.cu_verify.tolist() == [0, 3]
    assert int(a.total) == 3
    assert float(a.expected_tokens) == pytest.approx(2.52, abs=1e-5)


# ---------------------------------------------------------------------------
# 2. Independent brute force, written from the docstring with plain loops.
# ---------------------------------------------------------------------------

# Two throughputs closer than this (relative) are an fp32 coin flip: the op
# computes in fp32, the brute force in fp64 on the same fp32 inputs. Exact
# fp64 ties (zero gains, equal sps entries, dyadic values) are real ties.
AMBIGUOUS_REL = 1e-5


def brute_force(surv, sps, mode, hist, max_len, active, capacity=None):
    """Returns (lengths, cu_verify, total, expected_tokens, ambiguous, admitted).

    surv / hist: R lists of γ floats; sps: list of floats; max_len / active:
    lists or None; capacity: an int (async mode instead of hist) or None.
    Candidates (r, j), j < min(max_len[r], γ), of active requests with a
    value > 0 (Alg. 1 line 4), ordered by value descending, then r, then j.
    """
    num_req = len(surv)
    gamma = len(surv[0]) if num_req else 0
    act = [True] * num_req if active is None else list(active)
    cap = [gamma] * num_req if max_len is None else [min(max(int(m), 0), gamma) for m in max_len]
    num_active = sum(1 for a in act if a)

    def cands(vals):
        return [(r, j) for r in range(num_req) if act[r] for j in range(cap[r]) if vals[r][j] > 0]

    def order(vals):
        return sorted(cands(vals), key=lambda rj: (-vals[rj[0]][rj[1]], rj[0], rj[1]))

    def throughput(vals, ordered):
        tau = float(num_active)
        theta = [tau * sps[num_active]]
        for k, (r, j) in enumerate(ordered, start=1):
            tau += vals[r][j]
            theta.append(tau * sps[num_active + k])
        return theta

    def close(x, y):
        return x != y and abs(x - y) <= AMBIGUOUS_REL * max(abs(x), abs(y))

    ambiguous = False
    current = order(surv)
    n = len(current)
    if mode == "causal":
        theta = throughput(surv, current)
        k = 0
        while k < n:
            ambiguous |= close(theta[k + 1], theta[k])
            if theta[k + 1] > theta[k]:
                k += 1
            else:
                break
    elif capacity is not None:
        k = min(max(int(capacity), 0), n)
    else:
        theta = throughput(hist, order(hist))
        best = theta[0]
        k = 0
        for i, t in enumerate(theta):
            if t > best:  # strict: the first maximum wins ties
                best, k = t, i
        ambiguous |= any(close(t, best) for t in theta)
        k = min(k, n)
    admitted = current[:k]
    lengths = [0] * num_req
    for r, _ in admitted:
        lengths[r] += 1
    cu = [0]
    for r in range(num_req):
        cu.append(cu[-1] + (lengths[r] + 1 if act[r] else 0))
    expected = num_active + sum(surv[r][j] for r, j in admitted)
    return lengths, cu, cu[-1], expected, ambiguous, admitted


TIE_SET = np.array([0.0, 0.25, 0.5, 0.75, 1.0])


def random_survival(rng: np.random.Generator, num_req: int, gamma: int, kind: str) -> torch.Tensor:
    if kind == "ties":  # few distinct values: ties within and across requests
        vals = -np.sort(-rng.choice(TIE_SET, size=(num_req, gamma)), axis=1)
        return torch.tensor(vals, dtype=torch.float32)
    sharp = rng.uniform(0.02, 1.0)
    conf = torch.tensor(rng.uniform(0.0, 1.0, (num_req, gamma)) ** sharp, dtype=torch.float32)
    if kind == "ones":  # many exact 1.0 confidences
        conf = torch.where(torch.tensor(rng.uniform(size=(num_req, gamma)) < 0.5), torch.ones_like(conf), conf)
    surv = torch.cumprod(conf, dim=1)  # fp32 products of factors <= 1 never increase
    # Gains below fp32 resolution of τ would make the causal comparison an fp32
    # rounding question (flat sps); flush them to exact zeros (a clean stop).
    surv = torch.where(surv < 1e-4, torch.zeros_like(surv), surv)
    if kind == "zeros":  # a zero confidence kills the rest of the row
        cut = torch.tensor(rng.integers(0, gamma + 1, num_req))
        surv = torch.where(torch.arange(gamma)[None, :] >= cut[:, None], torch.zeros_like(surv), surv)
    return surv


def random_sps(rng: np.random.Generator, length: int, kind: str) -> torch.Tensor:
    b = np.arange(length, dtype=np.float64)
    if kind == "hyperbolic":  # 1 / (1 + c·B)
        vals = 1.0 / (1.0 + 10 ** rng.uniform(-3, 0.5) * b)
    elif kind == "flat":
        vals = np.ones(length)
    elif kind == "step":  # dyadic plateaus: exact ties in Θ
        vals = np.ones(length)
        for edge in np.sort(rng.integers(1, max(length, 2), rng.integers(1, 5))):
            vals[edge:] *= rng.choice([0.5, 0.75, 0.875])
    elif kind == "noisy":  # decaying with jagged noise
        vals = np.exp(-10 ** rng.uniform(-3, -0.5) * b) * (1.0 + 0.3 * rng.uniform(size=length))
    elif kind == "random":  # no shape at all
        vals = rng.uniform(0.05, 1.0, length)
    elif kind == "rising":  # bigger batches faster (odd, but allowed)
        vals = (b + 1.0) / (b + 1.0 + 10 ** rng.uniform(0, 2))
    elif kind == "paper":
        return paper_sps(length)
    else:
        raise ValueError(kind)
    return torch.tensor(vals, dtype=torch.float32)


SURV_KINDS = ("ties", "cumprod", "ones", "zeros")
SPS_KINDS = ("hyperbolic", "flat", "step", "noisy", "random", "rising", "paper")


def random_case(rng: np.random.Generator, num_req: int, gamma: int):
    surv = random_survival(rng, num_req, gamma, rng.choice(SURV_KINDS))
    sps = random_sps(rng, num_req * (gamma + 1) + 1 + int(rng.integers(0, 3)), rng.choice(SPS_KINDS))
    roll = rng.uniform()
    hist = surv.clone() if roll < 0.3 else random_survival(rng, num_req, gamma, rng.choice(SURV_KINDS))
    max_len = None
    if rng.uniform() < 0.5:
        max_len = torch.tensor(rng.integers(0, gamma + 3, num_req), dtype=rng.choice([torch.int32, torch.int64]))
    active = None
    roll = rng.uniform()
    if roll < 0.1:
        active = torch.zeros(num_req, dtype=torch.bool)
    elif roll < 0.5:
        active = torch.tensor(rng.uniform(size=num_req) < 0.7)
    elif roll < 0.6:
        active = torch.ones(num_req, dtype=torch.bool)
    if rng.uniform() < 0.1:  # half-precision survival: the op compares its fp32 values
        surv = surv.to(rng.choice([torch.float16, torch.bfloat16]))
    return surv, sps, hist, max_len, active


def check_against_brute_force(backend, surv, sps, mode, hist, max_len, active):
    """Asserts the op equals the brute force. Returns None when the case was
    skipped as an fp32 coin flip, else (admitted, candidates)."""
    lists = lambda t: None if t is None else t.double().tolist()
    want = brute_force(
        surv.double().tolist(), sps.double().tolist(), mode, lists(hist),
        None if max_len is None else max_len.tolist(), None if active is None else active.tolist(),
    )
    lengths, cu, total, expected, ambiguous, admitted = want
    if ambiguous:
        return None
    got = sched(surv, sps, backend, mode=mode, history=hist, max_len=max_len, active=active)
    ctx = f"mode={mode} survival={surv.tolist()} sps={sps.tolist()} history={lists(hist)} " \
          f"max_len={None if max_len is None else max_len.tolist()} active={None if active is None else active.tolist()}"
    assert got.lengths.dtype == torch.int32 and got.cu_verify.dtype == torch.int32
    assert got.total.dtype == torch.int32 and got.total.shape == ()
    assert got.expected_tokens.dtype == torch.float32 and got.expected_tokens.shape == ()
    assert got.lengths.tolist() == lengths, ctx
    assert got.cu_verify.tolist() == cu, ctx
    assert int(got.total) == total, ctx
    assert float(got.expected_tokens) == pytest.approx(expected, rel=1e-4, abs=1e-3), ctx
    num_req, gamma = surv.shape
    act = [True] * num_req if active is None else active.tolist()
    cap = [gamma] * num_req if max_len is None else [min(max(int(m), 0), gamma) for m in max_len.tolist()]
    vals = surv.float()
    return len(admitted), sum(int((vals[r, :c] > 0).sum()) for r, (c, a) in enumerate(zip(cap, act)) if a)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["causal", "async"])
def test_matches_brute_force_small(backend, mode):
    rng = np.random.default_rng(1234 if mode == "causal" else 4321)
    checked = skipped = partial = 0
    for case in range(cases(1500, backend)):
        num_req = 1 if case % 4 == 0 else int(rng.integers(1, 5 if interpreted(backend) else 9))
        gamma = int(rng.integers(1, 9 if interpreted(backend) else 17))
        surv, sps, hist, max_len, active = random_case(rng, num_req, gamma)
        res = check_against_brute_force(backend, surv, sps, mode, hist if mode == "async" else None, max_len, active)
        if res is None:
            skipped += 1
            continue
        checked += 1
        partial += 0 < res[0] < res[1]
    if not interpreted(backend):
        assert skipped < 0.02 * (checked + skipped), f"{skipped} ambiguous cases: the comparison lost its power"
        # Enough cases cut through the candidate list (neither none nor all admitted).
        assert partial > 0.3 * checked, (partial, checked)


# Large batches: near its optimum τ·sps is flat to fp32 resolution for smooth
# curves, so these combinations are chosen to be decisive (exact dyadic ties
# or jagged curves) while still cutting through the candidate list (a flat
# sps admits every candidate in causal mode: zero survivals are none).
LARGE_COMBOS = {
    "causal": [("zeros", "noisy"), ("ones", "random"), ("ties", "noisy"), ("ties", "random")],
    "async": [("ties", "random"), ("cumprod", "random"), ("ties", "step"), ("ones", "random"), ("zeros", "random"),
              ("ties", "flat")],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["causal", "async"])
@pytest.mark.parametrize("num_req,gamma", [(64, 4), (1024, 1), (1024, 4), (256, 16), (1000, 7)])
def test_matches_brute_force_large(backend, mode, num_req, gamma):
    combos = LARGE_COMBOS[mode]
    if interpreted(backend):
        if num_req > 64:
            pytest.skip("R >= 256 takes minutes through the Triton interpreter (runs on a GPU)")
        combos = combos[:2]
    rng = np.random.default_rng(num_req * 31 + gamma)
    partial = 0
    for surv_kind, sps_kind in combos:
        surv = random_survival(rng, num_req, gamma, surv_kind)
        sps = random_sps(rng, num_req * (gamma + 1) + 1, sps_kind)
        hist = random_survival(rng, num_req, gamma, surv_kind) if mode == "async" else None
        active = torch.tensor(rng.uniform(size=num_req) < 0.8)
        max_len = torch.tensor(rng.integers(0, gamma + 2, num_req), dtype=torch.int32)
        res = check_against_brute_force(backend, surv, sps, mode, hist, max_len, active)
        assert res is not None, f"test design: {surv_kind}/{sps_kind} is an fp32 coin flip here"
        partial += 0 < res[0] < res[1]
    assert partial >= 1 if interpreted(backend) else partial >= 2


# ---------------------------------------------------------------------------
# 3. Structural properties and validation.
# ---------------------------------------------------------------------------


def admitted_prefix_check(surv, lengths, max_len, active):
    """The first Σ lengths candidates in (survival desc, r, j) order are, per
    request, exactly positions 0..lengths[r]-1."""
    num_req, gamma = surv.shape
    act = [True] * num_req if active is None else active.tolist()
    cap = [gamma] * num_req if max_len is None else [min(max(int(m), 0), gamma) for m in max_len.tolist()]
    vals = surv.float().tolist()
    cands = sorted(
        ((r, j) for r in range(num_req) if act[r] for j in range(cap[r]) if vals[r][j] > 0),
        key=lambda rj: (-vals[rj[0]][rj[1]], rj[0], rj[1]),
    )
    taken = cands[: sum(lengths)]
    per_req = [set() for _ in range(num_req)]
    for r, j in taken:
        per_req[r].add(j)
    for r in range(num_req):
        assert per_req[r] == set(range(lengths[r])), (r, sorted(per_req[r]), lengths[r])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["causal", "async"])
def test_schedule_properties(backend, mode):
    rng = np.random.default_rng(99 if mode == "causal" else 98)
    for case in range(cases(300, backend) // (2 if interpreted(backend) else 1)):
        num_req = int(rng.integers(1, 12))
        gamma = int(rng.integers(1, 17))
        surv, sps, hist, max_len, active = random_case(rng, num_req, gamma)
        got = sched(surv, sps, backend, mode=mode, history=hist if mode == "async" else None,
                    max_len=max_len, active=active)
        lengths = got.lengths.tolist()
        act = torch.ones(num_req, dtype=torch.bool) if active is None else active
        cap = torch.full((num_req,), gamma) if max_len is None else max_len.long().clamp(0, gamma)
        assert got.lengths.shape == (num_req,) and got.cu_verify.shape == (num_req + 1,)
        assert bool((got.lengths >= 0).all()) and bool((got.lengths.long() <= cap).all())
        assert bool((got.lengths[~act] == 0).all())
        rows = torch.where(act, got.lengths + 1, torch.zeros_like(got.lengths))
        assert got.cu_verify[0] == 0
        assert torch.equal(got.cu_verify[1:].long(), torch.cumsum(rows.long(), 0))
        assert int(got.total) == int(got.cu_verify[-1])
        assert bool((got.cu_verify.diff()[act] >= 1).all())  # every active row verifies its anchor
        admitted_prefix_check(surv, lengths, max_len, active)
        tau = float(act.sum()) + sum(float(surv.float()[r, :lengths[r]].sum()) for r in range(num_req))
        assert float(got.expected_tokens) == pytest.approx(tau, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    # γ = 0: nothing to draft, every active request verifies its anchor only.
    surv = torch.empty(3, 0)
    act = torch.tensor([True, False, True])
    for mode in ("causal", "async"):
        got = sched(surv, torch.ones(4), backend, mode=mode, history=surv.clone(), active=act)
        assert got.lengths.tolist() == [0, 0, 0]
        assert got.cu_verify.tolist() == [0, 1, 1, 2]
        assert float(got.expected_tokens) == pytest.approx(2.0)
    # All inactive: nothing at all.
    surv = torch.tensor([[1.0, 0.9], [0.5, 0.5]])
    for mode in ("causal", "async"):
        got = sched(surv, torch.ones(7), backend, mode=mode, history=surv, active=torch.zeros(2, dtype=torch.bool))
        assert got.lengths.tolist() == [0, 0] and got.cu_verify.tolist() == [0, 0, 0]
        assert int(got.total) == 0 and float(got.expected_tokens) == 0.0
    # max_len 0 everywhere: anchors only, even with a flat sps that would take all.
    got = sched(surv, torch.ones(7), backend, max_len=torch.zeros(2, dtype=torch.int32))
    assert got.lengths.tolist() == [0, 0] and got.cu_verify.tolist() == [0, 1, 2]
    # Flat sps: every positive candidate raises τ, zero survival stops the causal scan.
    got = sched(torch.tensor([[1.0, 0.5, 0.0], [0.25, 0.0, 0.0]]), torch.ones(9), backend)
    assert got.lengths.tolist() == [2, 1]


# ---------------------------------------------------------------------------
# 3b. Zero survival is no candidate (Alg. 1 line 4); async with a given capacity.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_survival_is_never_admitted(backend):
    surv = torch.tensor([[0.9, 0.0], [0.9, 0.8]])
    rising = torch.arange(7, dtype=torch.float32)  # sps[B] = B: any extra token "pays", a zero gain too
    # Async, history = survival: K = 3 positive drafts (the zero used to make it 4: [2, 2]).
    a = sched(surv, rising, backend, mode="async", history=surv)
    assert a.lengths.tolist() == [1, 2] and a.cu_verify.tolist() == [0, 2, 5]
    assert float(a.expected_tokens) == pytest.approx(4.6)
    # Async with a history that has no zero: K = 4, but only 3 current candidates.
    a = sched(surv, rising, backend, mode="async", history=torch.tensor([[0.9, 0.85], [0.9, 0.8]]))
    assert a.lengths.tolist() == [1, 2]
    # Causal: a 0 gain with sps[B+1] > sps[B] raised Θ and was admitted.
    c = sched(surv, rising, backend)
    assert c.lengths.tolist() == [1, 2] and int(c.total) == 5
    # Flat sps: causal admits every positive draft and nothing else.
    c = sched(torch.tensor([[1.0, 0.5, 0.0], [0.25, 0.0, 0.0]]), torch.ones(9), backend)
    assert c.lengths.tolist() == [2, 1]
    # Only zeros: anchors only, in every mode.
    zeros = torch.zeros(2, 3)
    for kw in (dict(), dict(mode="async", history=zeros), dict(mode="async", history=torch.ones(2, 3)),
               dict(mode="async", capacity=torch.tensor(6))):
        got = sched(zeros, rising.new_ones(9) * torch.arange(9), backend, **kw)
        assert got.lengths.tolist() == [0, 0] and int(got.total) == 2, kw


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_nan_survival_is_no_candidate(backend):
    """With value checks off NaN survival / history are defined: not candidates (NaN > 0 is false)."""
    surv = torch.tensor([[0.9, float("nan")], [0.9, 0.8]])
    rising = torch.arange(7, dtype=torch.float32)
    dk.set_value_checks(False)
    try:
        assert sched(surv, rising, backend).lengths.tolist() == [1, 2]
        assert sched(surv, rising, backend, mode="async", history=surv).lengths.tolist() == [1, 2]
    finally:
        dk.set_value_checks(None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_capacity_matches_brute_force(backend):
    """capacity=K admits the top min(K, candidates) by current survival, for any K (int32 / int64)."""
    rng = np.random.default_rng(31)
    for case in range(cases(400, backend)):
        num_req = int(rng.integers(1, 5 if interpreted(backend) else 9))
        gamma = int(rng.integers(1, 9 if interpreted(backend) else 17))
        surv, sps, _, max_len, active = random_case(rng, num_req, gamma)
        k = int(rng.integers(0, num_req * gamma + 3))
        capacity = torch.tensor(k, dtype=torch.int32 if case % 2 else torch.int64)
        lists = lambda t: None if t is None else t.tolist()  # noqa: E731
        lengths, cu, total, expected, _, _ = brute_force(surv.double().tolist(), sps.double().tolist(), "async",
                                                         None, lists(max_len), lists(active), capacity=k)
        got = sched(surv, sps, backend, mode="async", capacity=capacity, max_len=max_len, active=active)
        assert got.lengths.tolist() == lengths and got.cu_verify.tolist() == cu and int(got.total) == total
        assert float(got.expected_tokens) == pytest.approx(expected, rel=1e-4, abs=1e-3)
        assert int(got.total) <= (num_req if active is None else int(active.sum())) + k  # fits A + K rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_history_form_is_the_capacity_form(backend):
    """mode="async" with history=h equals capacity=verify_capacity(h) (K from the reference), on this
    backend's schedule_verify (the CUDA kernel's history pass included, on a GPU)."""
    rng = np.random.default_rng(4242)
    for case in range(cases(200, backend)):
        num_req = int(rng.integers(1, 5 if interpreted(backend) else 12))
        gamma = int(rng.integers(1, 9 if interpreted(backend) else 17))
        surv, sps, hist, max_len, active = random_case(rng, num_req, gamma)
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        k = dk.verify_capacity(dev(hist), dev(sps), max_len=dev(max_len), active=dev(active), backend="reference")
        kw = dict(mode="async", max_len=dev(max_len), active=dev(active), backend=backend)
        a = dk.schedule_verify(dev(surv), dev(sps), history=dev(hist), **kw)
        b = dk.schedule_verify(dev(surv), dev(sps), capacity=k, **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y), (surv.tolist(), hist.tolist(), int(k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_capacity_is_clamped(backend):
    surv = torch.tensor([[0.9, 0.5], [0.8, 0.0]])
    dk.set_value_checks(False)
    try:
        for k, want in ((-5, [0, 0]), (-(2**40), [0, 0]), (2**40, [2, 1]), (2**31 - 1, [2, 1])):
            dtype = torch.int64 if abs(k) >= 2**31 else torch.int32
            got = sched(surv, torch.ones(7), backend, mode="async", capacity=torch.tensor(k, dtype=dtype))
            assert got.lengths.tolist() == want, k
    finally:
        dk.set_value_checks(None)


# ---------------------------------------------------------------------------
# 4. Non-anticipation (paper appendix A).
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_capacity_depends_only_on_history(backend):
    rng = np.random.default_rng(7)
    num_req, gamma = 6, 5
    sps = 1.0 / (1.0 + 0.08 * torch.arange(num_req * (gamma + 1) + 1, dtype=torch.float32))
    hist = random_survival(rng, num_req, gamma, "cumprod")
    ks = set()
    for trial in range(cases(200, backend)):
        surv = random_survival(rng, num_req, gamma, rng.choice(SURV_KINDS))
        got = sched(surv, sps, backend, mode="async", history=hist)
        # min(K, candidates): the current survival can only lower K, when it has fewer
        # positive drafts than K (zero survivals are no candidates).
        n_cur = int((surv.float() > 0).sum())
        if n_cur >= num_req * gamma // 2:
            ks.add(int(got.lengths.sum()))
        else:
            assert int(got.lengths.sum()) <= n_cur
        assert int(got.total) == num_req + int(got.lengths.sum())
    assert len(ks) == 1, f"capacity K moved with the current survival: {sorted(ks)}"
    k = ks.pop()
    assert 0 < k < num_req * gamma // 2  # a non-trivial capacity, so the check means something
    assert int(dk.verify_capacity(hist.to(DEVICE), sps.to(DEVICE), backend=backend)) == k
    # The capacity follows history: appendix A rows with the paper's sps.
    surv = torch.tensor([[0.8, 0.16]])
    hi = sched(surv, torch.tensor(PAPER_SPS), backend, mode="async", history=torch.tensor([[0.8, 0.72]]))
    lo = sched(surv, torch.tensor(PAPER_SPS), backend, mode="async", history=torch.tensor([[0.8, 0.16]]))
    assert hi.lengths.tolist() == [2] and lo.lengths.tolist() == [0]
    # And on the random batch: a much more confident history buys more capacity.
    got = sched(hist, sps, backend, mode="async", history=torch.ones(num_req, gamma))
    assert int(got.lengths.sum()) > k


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_stop_ignores_later_candidates(backend):
    """When the best candidate does not raise τ·sps, the causal scan stops
    there, whatever the later (unrealised) positions hold."""
    rng = np.random.default_rng(11)
    for trial in range(cases(200, backend)):
        num_req = int(rng.integers(1, 6))
        gamma = int(rng.integers(1, 9))
        top = float(rng.uniform(0.05, 1.0))
        surv = random_survival(rng, num_req, gamma, rng.choice(SURV_KINDS)).float() * top
        r0 = int(rng.integers(0, num_req))
        surv[r0, 0] = top  # the first candidate in admission order is worth `top`
        surv = surv.clamp(max=top)
        n = num_req * (gamma + 1) + 1
        # sps[A+1]·(A + top) <= sps[A]·A: the first admission does not pay, but
        # later batch sizes are fast, so an unconstrained search would admit more.
        sps = torch.full((n,), 10.0)
        sps[num_req] = 1.0
        sps[num_req + 1] = num_req / (num_req + top) * float(rng.uniform(0.5, 1.0))
        got = sched(surv, sps, backend)
        assert got.lengths.tolist() == [0] * num_req, (surv.tolist(), sps.tolist())
        if trial < 40 and int((surv > 0).sum()) >= 2:
            greedy = sched(surv, sps, backend, mode="async", history=surv)
            assert int(greedy.lengths.sum()) > 0  # the later values would have mattered


# ---------------------------------------------------------------------------
# 5. Losslessness end to end (Monte Carlo through rejection_sample).
# ---------------------------------------------------------------------------

P_TARGET = torch.tensor([0.7, 0.3])  # A = 0, B = 1, at every position
Q_DRAFT = torch.tensor([0.5, 0.5])
C1 = 0.8
C2 = {0: 0.9, 1: 0.2}  # the confidence of position 2 depends on the realised x_1


def p_first_is_a(x1: int, length: int) -> float:
    """P[first emitted token = A | first draft x1, length drafts verified].

    length 0: the bonus token ~ p_t, so p_t(A). length >= 1: x1 is accepted
    with probability min(1, p(x1)/q(x1)) and is then the first token; on
    rejection the first token ~ norm(max(0, p - q)).
    """
    p, q = P_TARGET.double(), Q_DRAFT.double()
    if length == 0:
        return float(p[0])
    accept = min(1.0, float(p[x1] / q[x1]))
    residual = (p - q).clamp(min=0)
    residual = residual / residual.sum() if float(residual.sum()) > 0 else p
    return accept * (1.0 if x1 == 0 else 0.0) + (1 - accept) * float(residual[0])


def survival_row(x1: int) -> torch.Tensor:
    return torch.tensor([C1, C1 * C2[x1]], dtype=torch.float32)


def exact_p_a(lengths_of: dict[int, int]) -> float:
    """Σ_x1 q(x1) · P[first = A | x1, ℓ(x1)]: exact, by enumeration of x1."""
    return sum(float(Q_DRAFT[x]) * p_first_is_a(x, lengths_of[x]) for x in (0, 1))


def monte_carlo_first_token(backend, num_req: int, mode: str, history_of=None):
    """Draft x ~ q, schedule each request on its own (R = 1), verify, return
    (count of first token == A, n, lengths by x1)."""
    g = torch.Generator().manual_seed(2026)
    drafts = torch.multinomial(Q_DRAFT.expand(num_req * 2, 2), 1, replacement=True, generator=g)
    drafts = drafts.reshape(num_req, 2).to(torch.int32)
    x1 = drafts[:, 0].long()
    c2 = torch.where(x1 == 0, torch.tensor(C2[0]), torch.tensor(C2[1]))
    surv = torch.stack([torch.full((num_req,), C1), torch.full((num_req,), C1) * c2], dim=1)
    # For R = 1 the schedule depends on the survival row (and history) only: run
    # the op once per distinct row and map the answer onto every request.
    rows, inverse = torch.unique(surv, dim=0, return_inverse=True)
    sps = paper_sps(8)
    row_len = []
    for row in rows:
        hist = None if history_of is None else history_of(row)[None, :]
        row_len.append(int(sched(row[None, :], sps, backend, mode=mode, history=hist).lengths[0]))
    lengths = torch.tensor(row_len, dtype=torch.int32)[inverse]
    lengths_of = {x: int(lengths[x1 == x][0]) for x in (0, 1) if bool((x1 == x).any())}
    # The verification below depends on the schedule only through lengths_of
    # (drafts and seeds are fixed): backends that schedule alike share it, as
    # the reference Philox costs seconds per 100k requests on CPU.
    key = (num_req, tuple(sorted(lengths_of.items())))
    if key not in _MC_CACHE:
        _MC_CACHE[key] = _verify_first_token_a(drafts, lengths)
    return _MC_CACHE[key], num_req, lengths_of


_MC_CACHE: dict = {}


def _verify_first_token_a(drafts: torch.Tensor, lengths: torch.Tensor) -> int:
    num_req = drafts.shape[0]
    cu = torch.zeros(num_req + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths + 1, 0)
    logits = P_TARGET.log().expand(int(cu[-1]), 2).contiguous()
    tokens, _ = dk.rejection_sample(
        logits, drafts, Q_DRAFT.expand(num_req, 2, 2).contiguous(), lengths, cu,
        torch.ones(num_req), torch.arange(num_req, dtype=torch.int64), torch.tensor(0, dtype=torch.int64),
    )
    first = tokens[:, 0]
    assert bool((first >= 0).all())
    return int((first == 0).sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lossless_monte_carlo(backend):
    n = 100_000
    # Exact enumeration, appendix A (R = 1, sps = [0, 1.0, 0.5, 0.45, ...]):
    #   x1 = A (q = 0.5): survival [0.8, 0.72]; x1 = B (q = 0.5): [0.8, 0.16].
    #   Causal: Θ_0 = 1.0 and Θ_1 = 1.8·0.5 = 0.9 for both rows, so ℓ = 0 for both
    #     and the first token is the bonus ~ p_t: P[A] = 0.7 (lossless).
    #   Unconstrained search (sees x1 through the survival of position 2):
    #     x1 = A: Θ = (1.0, 0.9, 2.52·0.45 = 1.134) -> ℓ = 2; x1 = A is accepted
    #       with min(1, 0.7/0.5) = 1, so the first token is A.
    #     x1 = B: Θ = (1.0, 0.9, 1.96·0.45 = 0.882) -> ℓ = 0, first token ~ p_t.
    #     P[A] = 0.5·1 + 0.5·0.7 = 0.85: the target's 0.7 is lost.
    assert exact_p_a({0: 0, 1: 0}) == pytest.approx(0.7)
    assert exact_p_a({0: 2, 1: 0}) == pytest.approx(0.85)
    assert exact_p_a({0: 2, 1: 2}) == pytest.approx(0.7)  # verifying both rows alike is lossless too

    sigma5 = 5 * math.sqrt(0.7 * 0.3 / n)
    hits, total, lengths_of = monte_carlo_first_token(backend, n, "causal")
    assert lengths_of == {0: 0, 1: 0}
    res = rate_test(hits, total, 0.7)
    assert abs(res.z) < 5, f"causal schedule is not lossless: P[A] = {res.rate:.4f} (z = {res.z:.1f})"
    assert abs(res.rate - 0.7) < sigma5 < 0.01  # tight: the 5σ interval is under ±0.01

    # The anticipating scheduler on the same rows: demonstrably biased.
    hits, total, lengths_of = monte_carlo_first_token(backend, n, "async", history_of=lambda row: row)
    assert lengths_of == {0: 2, 1: 0}
    want = exact_p_a(lengths_of)
    res = rate_test(hits, total, want)
    assert abs(res.z) < 5, f"P[A] = {res.rate:.4f}, exact {want:.4f} (z = {res.z:.1f})"
    assert res.rate > 0.8

    # Async with a history that does not reveal x1 (same for every request) is lossless.
    hits, total, lengths_of = monte_carlo_first_token(
        backend, 20_000, "async", history_of=lambda row: torch.tensor([0.8, 0.72])
    )
    assert lengths_of == {0: 2, 1: 2}
    assert abs(rate_test(hits, total, 0.7).z) < 5


# ---------------------------------------------------------------------------
# 6. Capturability proxies.
# ---------------------------------------------------------------------------


def _opcheck_args(mode, backend):
    surv = torch.tensor([[0.9, 0.6, 0.3], [0.8, 0.8, 0.1], [0.5, 0.0, 0.0]], device=DEVICE)
    sps = (1.0 / (1.0 + 0.2 * torch.arange(13, dtype=torch.float32))).to(DEVICE)
    hist = torch.tensor([[0.95, 0.5, 0.2], [0.7, 0.6, 0.6], [0.9, 0.9, 0.9]], device=DEVICE)
    max_len = torch.tensor([3, 2, 3], dtype=torch.int32, device=DEVICE)
    active = torch.tensor([True, True, False], device=DEVICE)
    if mode == "capacity":  # async with a given K instead of history
        return (surv, sps, "async", None, max_len, active, torch.tensor(4, dtype=torch.int32, device=DEVICE),
                backend)
    return (surv, sps, mode, hist if mode == "async" else None, max_len, active, None, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["causal", "async", "capacity"])
def test_opcheck(backend, mode):
    torch.library.opcheck(torch.ops.dspark.schedule_verify.default, _opcheck_args(mode, backend))


def _pipeline(mode, backend):
    def step(surv, sps, hist, max_len, active, anchor, drafts, start_pos):
        s = dk.schedule_verify(surv, sps, mode=mode, history=hist, max_len=max_len, active=active, backend=backend)
        vb = dk.pack_verify(anchor, drafts, s.lengths, s.cu_verify, start_pos)
        return (*s, *vb)

    return step


def _pipeline_inputs(rng, num_req, gamma, mode):
    surv = random_survival(rng, num_req, gamma, "cumprod")
    hist = random_survival(rng, num_req, gamma, "cumprod") if mode == "async" else None
    sps = random_sps(rng, num_req * (gamma + 1) + 1, "hyperbolic")
    max_len = torch.tensor(rng.integers(0, gamma + 1, num_req), dtype=torch.int32)
    active = torch.tensor(rng.uniform(size=num_req) < 0.8)
    anchor = torch.tensor(rng.integers(0, 1000, num_req), dtype=torch.int32)
    drafts = torch.tensor(rng.integers(0, 1000, (num_req, gamma)), dtype=torch.int32)
    start_pos = torch.tensor(rng.integers(0, 5000, num_req), dtype=torch.int32)
    return [surv, sps, hist, max_len, active, anchor, drafts, start_pos]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["causal", "async"])
def test_compile_fullgraph_matches_eager(backend, mode):
    torch._dynamo.reset()
    step = _pipeline(mode, backend)
    compiled = torch.compile(step, fullgraph=True)
    rng = np.random.default_rng(5)
    for trial in range(3):
        args = [None if a is None else a.to(DEVICE) for a in _pipeline_inputs(rng, 5, 4, mode)]
        want = step(*args)
        got = compiled(*args)
        assert len(got) == len(want) >= 7  # Schedule (4) + VerifyBatch
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)


def _needs_real_device(backend):
    if interpreted(backend):
        pytest.skip("the Triton interpreter copies tensors to the host by design")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["causal", "async", "capacity"])
def test_no_host_sync(backend, mode):
    """CPU proxy for CUDA-graph capture: the implementation (argument checks
    aside, which read values on CPU only) must not read a device value on the
    host (.item(), bool(), a 0-d tensor used as an index, nonzero, ...)."""
    _needs_real_device(backend)
    args = _opcheck_args(mode, backend)[:-1]
    with HostSyncSpy() as spy:
        op.OP.run(backend, op.OP.Args(*args))
    assert spy.syncs == [], f"host syncs inside schedule_verify ({backend}): {spy.syncs}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["causal", "async"])
def test_cuda_graph_capture(backend, mode):
    with debug_mode(False):  # value checks would sync
        _check_graph_capture(backend, mode)


def _check_graph_capture(backend, mode):
    rng = np.random.default_rng(17)
    num_req, gamma = 9, 5
    static = [None if a is None else a.cuda() for a in _pipeline_inputs(rng, num_req, gamma, mode)]
    step = _pipeline(mode, backend)
    graph, outs = capture_graph(lambda: step(*static))
    for trial in range(4):
        fresh = _pipeline_inputs(rng, num_req, gamma, mode)
        for dst, src in zip(static, fresh):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = step(*[None if a is None else a.cuda() for a in fresh])
        for g, w in zip(outs, want):
            assert torch.equal(g, w)
