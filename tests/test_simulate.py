"""The serving simulator (dspark_kernels.engine.simulator): claims of issue 16 on the default profiles,
the models' formulas against closed forms, determinism, file formats and the command line.

Sweeps here are smaller than the CLI default (request_rounds 2048, at most 256 rounds a point) so the
file runs in well under a minute on a 2-core CPU; every comparison's tolerance is computed from the
points' own standard errors (batch means), so fewer rounds widen it rather than make it flaky.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

from dspark_kernels.engine.sps_table import profile_sps
from dspark_kernels.engine.simulator import (WORKLOADS, AcceptanceModel, TableStepModel, fit_acceptance,
                                             load_acceptance_log, load_sps_json, named_profile, parse_policies,
                                             save_sps_json, simulate, throughput_at)
from dspark_kernels.engine.simulator.core import simulate_point
from dspark_kernels.engine.simulator.run import DEFAULT_PROFILES
from dspark_kernels.engine.simulator.steptime import TARGETS, expert_padded_rows, experts_touched

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICIES = "mtp1,fixed3,fixed5,causal,async"
SMALL = dict(request_rounds=2048, min_rounds=32, max_rounds=256)
# One-sided comparisons at 3 standard errors of the difference: a false alarm has probability
# 0.13 % per comparison if the two policies were equal (they are not: the true gaps are what is tested).
SIGMAS = 3.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as the simulator's own sweep uses: the tensors here are small, and on a
    loaded 2-core CPU OpenMP spin-waits cost more than their work. Restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sweep(**kw):
    return simulate(None, profiles=DEFAULT_PROFILES, policies=POLICIES, plots=False, **SMALL, **kw)


@pytest.fixture(scope="module")
def modelled():
    """The default profiles, drafters costed by their rooflines (the CLI's default sweep, smaller)."""
    return _sweep()


@pytest.fixture(scope="module")
def equal_draft():
    """The same, with the DSpark drafter costing what MTP-1's does: only the scheduling differs."""
    return _sweep(dspark_draft_cost="mtp")


def _by(points, profile, workload, policy):
    out = [p for p in points if p["profile"] == profile and p["workload"] == workload and p["policy"] == policy]
    return sorted(out, key=lambda p: p["concurrency"])


def _se_at(pts, s):
    """Standard error of the frontier near per-user speed s: the larger of the two bracketing points'."""
    speeds = [p["per_user_tok_s"] for p in pts]
    near = [p for p, q in zip(pts, pts[1:]) if min(p["per_user_tok_s"], q["per_user_tok_s"]) <= s
            <= max(p["per_user_tok_s"], q["per_user_tok_s"])]
    near = near or [pts[min(range(len(pts)), key=lambda i: abs(speeds[i] - s))]]
    i = pts.index(near[0])
    return max(p["throughput_se"] for p in pts[i:i + 2])


def _worst_gap(dspark_curves, base, samples=60):
    """min over per-user speeds reached by both of (T_dspark(s) - T_base(s)) / tolerance(s), with the
    DSpark frontier the better of the given curves at each s; > -1 means "on or above within 3σ"."""
    lo = max(max(min(p["per_user_tok_s"] for p in c) for c in dspark_curves),
             min(p["per_user_tok_s"] for p in base))
    hi = min(max(max(p["per_user_tok_s"] for p in c) for c in dspark_curves),
             max(p["per_user_tok_s"] for p in base))
    assert hi > lo, "the frontiers do not overlap"
    worst = (math.inf, None)
    for k in range(samples):
        s = min(hi, max(lo, lo * (hi / lo) ** (k / (samples - 1))))  # rounding must not leave [lo, hi]
        options = [(throughput_at(c, s), _se_at(c, s)) for c in dspark_curves]
        t_d, se_d = max((o for o in options if o[0] is not None), key=lambda o: o[0])
        t_b, se_b = throughput_at(base, s), _se_at(base, s)
        tol = SIGMAS * math.hypot(se_d, se_b)
        worst = min(worst, ((t_d - t_b) / tol, s), key=lambda w: w[0])
    return worst


@pytest.mark.parametrize("profile", DEFAULT_PROFILES)
def test_async_frontier_on_or_above_mtp1_and_fixed_gamma_at_equal_drafting_cost(equal_draft, profile):
    """The scheduler's claim, isolated: with every drafter costing what MTP-1's does, DSpark-async's
    frontier (the paper's production scheduler, §5.2) is on or above MTP-1's, fixed γ=3's and γ=5's at every
    per-user speed both reach."""
    for workload in WORKLOADS:
        asy = [_by(equal_draft.points, profile, workload, "async")]
        for base in ("mtp1", "fixed3", "fixed5"):
            gap, s = _worst_gap(asy, _by(equal_draft.points, profile, workload, base))
            assert gap > -1.0, (profile, workload, base, f"{gap:.2f} tolerances below at {s:.1f} tok/s/user")


# The one frontier cell where DSpark-async with its own drafter falls below a baseline (README): chat on
# the MoE at its KV-cache limit, where verification is compute-bound, the scheduler verifies 1.7 drafts a
# request, and drafting 5 positions through 3 MoE layers costs more than the extra accepted drafts return.
DRAFT_COST_EXCEPTION = ("deepseek-v3@h200", "chat", "mtp1")


def test_async_frontier_on_or_above_baselines_with_its_drafting_cost(modelled):
    """Both default profiles with the DSpark drafter's own cost (the paper's drafter sizes): async is on or
    above every baseline at every per-user speed, except DRAFT_COST_EXCEPTION, which is pinned: a deficit
    of 0-5 % and only at the largest simulated concurrency (the equal-cost test shows it is the drafter's)."""
    for profile in DEFAULT_PROFILES:
        for workload in WORKLOADS:
            asy = _by(modelled.points, profile, workload, "async")
            for base in ("mtp1", "fixed3", "fixed5"):
                ref = _by(modelled.points, profile, workload, base)
                gap, s = _worst_gap([asy], ref)
                if (profile, workload, base) != DRAFT_COST_EXCEPTION:
                    assert gap > -1.0, (profile, workload, base, gap, s)
                    continue
                assert gap < -1.0, "the documented exception is gone: update the README and this test"
                below = [(a["concurrency"], a["throughput_tok_s_gpu"] / b["throughput_tok_s_gpu"] - 1.0)
                         for a, b in zip(asy, ref) if a["throughput_tok_s_gpu"] < b["throughput_tok_s_gpu"]]
                assert [c for c, _ in below] == [asy[-1]["concurrency"]], below
                assert -0.05 < below[0][1] < 0.0, below


def test_gamma7_drafting_puts_the_dense_chat_frontier_below_mtp1_at_the_kv_limit():
    """README: with Table 1's block size (--gamma 7) the dense 8B drafts 7 positions through 5 layers, and at
    its KV limit (chat, C = 416) async falls below MTP-1 (about −3 %); at the default γ = 5 it does not."""
    kw = dict(profiles=["llama3-8b@h100"], workloads=["chat"], policies="mtp1,async", concurrency=[416], plots=False,
              **SMALL)
    for gamma, below in ((7, True), (5, False)):
        pts = {p["policy"]: p for p in simulate(None, gamma=gamma, **kw).points}
        ratio = pts["async"]["throughput_tok_s_gpu"] / pts["mtp1"]["throughput_tok_s_gpu"] - 1.0
        tol = SIGMAS * math.hypot(pts["async"]["throughput_se"], pts["mtp1"]["throughput_se"]) \
            / pts["mtp1"]["throughput_tok_s_gpu"]
        assert (-0.08 < ratio < -tol) if below else (ratio > tol), (gamma, ratio, tol)


def test_async_capacity_from_one_request_two_rounds_old_costs_a_few_percent_at_concurrency_one():
    """The other documented shortfall (README): at C = 1 on the MoE, where every extra verify token reads new
    experts, async's capacity comes from a single block two rounds old, so it is below fixed γ = 5 and below
    causal (which sees the current block). 4000 rounds on common random numbers; over seeds 0-9 the per-user
    ratio async/fixed5 − 1 was −0.58 % ± 0.09 % (math), −0.84 % ± 0.09 % (code), −3.2 % ± 0.26 % (chat), and
    async/causal − 1 −0.76 % ± 0.11 %, −1.1 % ± 0.10 %, −5.4 % ± 0.27 % (mean ± sd): the upper bounds below
    (−0.1 %, −0.2 %) are at least 4.8 sd from every mean."""
    model = named_profile("deepseek-v3@h200")
    pols = {p.name: p for p in parse_policies("fixed5,causal,async", 5)}
    for name, wl in WORKLOADS.items():
        wl = wl.with_overrides(output_tokens=10 ** 6)  # no request ends: every round uses all five positions
        draws = wl.draw(1, 4002, 5, seed=21)
        got = {k: simulate_point(model, wl, p, 1, draws)["per_user_tok_s"] for k, p in pols.items()}
        for base, upper in (("fixed5", -0.001), ("causal", -0.002)):
            ratio = got["async"] / got[base] - 1.0
            assert -0.10 < ratio < upper, (name, base, ratio)


def test_causal_early_stop_falls_below_mtp1_where_the_staircase_is_compute_bound(modelled):
    """Paper §5.2: Algorithm 1's break finds the global optimum only if Θ is unimodal, and the SPS curve is a
    staircase; production removed the break (async). At the MoE's largest concurrency causal admits almost
    nothing (the next draft would start a new tile) and is below MTP-1 by > 3σ, while async is above causal."""
    for workload in WORKLOADS:
        cau = _by(modelled.points, "deepseek-v3@h200", workload, "causal")[-1]
        asy = _by(modelled.points, "deepseek-v3@h200", workload, "async")[-1]
        mtp = _by(modelled.points, "deepseek-v3@h200", workload, "mtp1")[-1]
        assert cau["verify_budget"] < 0.2, cau
        for lower, upper in ((cau, mtp), (cau, asy)):
            gap = upper["throughput_tok_s_gpu"] - lower["throughput_tok_s_gpu"]
            assert gap > SIGMAS * math.hypot(upper["throughput_se"], lower["throughput_se"]), (workload, lower, upper)


def _budget_monotone(pts, start_index=0):
    """Verify budget non-increasing in C from start_index on. On a staircase SPS the best batch is a tile
    boundary, so the best budget moves in steps of one 128-row tile spread over C requests (128/C drafts
    per request), plus 0.05 for the end-of-request cap (max_len = remaining - 1 in a request's last round)."""
    for a, b in zip(pts[start_index:], pts[start_index + 1:]):
        slack = 128 / b["concurrency"] + 0.05
        assert b["verify_budget"] <= a["verify_budget"] + slack, (a["concurrency"], a["verify_budget"],
                                                                  b["concurrency"], b["verify_budget"])
    return pts[start_index]["verify_budget"] - pts[-1]["verify_budget"]


def _budget_falls_from_peak(pts, start_index):
    """Async's weaker form: after C* no point exceeds the peak budget (+ the same slack), and at the largest
    C the budget is below 60 % of the peak. Its K is a global optimum over a compute-bound staircase, which
    can tick up between the two largest concurrencies (DeepSeek-V3 math: 2.50 -> 2.62 -> 2.75 at
    C = 512, 1024, 2048 in this sweep), so consecutive monotonicity is not a property of it."""
    peak = max(p["verify_budget"] for p in pts[start_index:])
    for p in pts[start_index:]:
        assert p["verify_budget"] <= peak + 128 / p["concurrency"] + 0.05, (p["concurrency"], p["verify_budget"])
    assert pts[-1]["verify_budget"] < 0.6 * peak, (pts[-1]["verify_budget"], peak)


@pytest.mark.parametrize("policy", ["causal", "async"])
def test_verify_budget_falls_as_concurrency_rises(modelled, policy):
    """Dense target: from C = 1, consecutive points. MoE target: from the concurrency whose anchors alone
    touch ≥ 99 % of the experts (1 - (1 - k/E)^C ≥ 0.99, C ≥ 146 for DeepSeek-V3); below it every extra
    verify token reads new experts, so the budget first rises with C (README)."""
    v3 = TARGETS["deepseek-v3"]
    c_star = math.log(0.01) / math.log(1 - v3.experts_per_token / v3.experts)
    for workload in WORKLOADS:
        dense = _by(modelled.points, "llama3-8b@h100", workload, policy)
        # Chat (L̄ = 1024) reaches C = 416 and compute-bound verification: the budget falls by more than half.
        # Math and code (L̄ = 2048) fill the KV cache at C = 208, just past the ridge: it falls by ~0.5.
        assert _budget_monotone(dense) > (2.5 if workload == "chat" else 0.3), (workload, dense[-1])
        # Memory-bound (C <= 32 here: flat SPS) every draft with survival > 0 is worth verifying: budget γ
        # less the end-of-request cap (ℓ <= remaining - 1 in a request's last rounds), which costs
        # 0.00-0.15 drafts a round in this sweep (chat, with 512-token outputs, the most).
        assert all(p["verify_budget"] > p["gamma"] - 0.2 for p in dense if p["concurrency"] <= 32), dense
        moe = _by(modelled.points, "deepseek-v3@h200", workload, policy)
        first = next(i for i, p in enumerate(moe) if p["concurrency"] >= c_star)
        if policy == "causal":
            assert _budget_monotone(moe, first) > 1.0, (workload, moe[first], moe[-1])
        else:
            _budget_falls_from_peak(moe, first)
        assert max(p["verify_budget"] for p in moe[:first]) > moe[0]["verify_budget"], "no rise below C*"


def test_moe_verify_budget_has_the_shape_of_the_papers_figure_8(modelled):
    """Paper Fig. 8 (V4, γ = 5): below ~150-200 concurrent requests the budget expands "from MTP-1's static 2
    tokens to roughly 4–6 tokens per request" and then "decreases smoothly with load". On the MoE profile
    async verifies at least 4 tokens a request (anchor + drafts; at most γ + 1 = 6) at every C <= 256, close to
    6 at some, and fewer than 4 at the largest C."""
    for workload in WORKLOADS:
        pts = _by(modelled.points, "deepseek-v3@h200", workload, "async")
        assert all(p["gamma"] == 5 for p in pts)
        low = [p["verify_tokens_per_request"] for p in pts if p["concurrency"] <= 256]
        assert all(v >= 4.0 for v in low) and max(low) > 5.5, (workload, low)  # (≤ γ + 1 = 6 by construction)
        assert pts[-1]["verify_tokens_per_request"] < 4.0, (workload, pts[-1])
        # MTP-1: 2 tokens a request, a little less because a request's last round verifies its anchor only.
        assert all(1.95 < p["verify_tokens_per_request"] <= 2.0
                   for p in _by(modelled.points, "deepseek-v3@h200", workload, "mtp1"))


def test_fixed_gamma5_loses_throughput_to_mtp1_at_high_concurrency(modelled):
    """At the largest simulated concurrency of the MoE profile (every workload) and of the dense profile
    with short contexts (chat, L̄ = 1024), fixed γ = 5 has lower throughput than MTP-1 by more than 3σ.
    Dense math/code (L̄ = 2048) run out of KV cache before verification is compute-bound (README)."""
    cases = [("deepseek-v3@h200", w) for w in WORKLOADS] + [("llama3-8b@h100", "chat")]
    for profile, workload in cases:
        f5 = _by(modelled.points, profile, workload, "fixed5")[-1]
        m1 = _by(modelled.points, profile, workload, "mtp1")[-1]
        gap = m1["throughput_tok_s_gpu"] - f5["throughput_tok_s_gpu"]
        assert gap > SIGMAS * math.hypot(m1["throughput_se"], f5["throughput_se"]), (profile, workload, f5, m1)


def _jagged_table(max_batch: int) -> TableStepModel:
    """t(B) = 2 ms + 1 ms per started 64-token tile: a staircase where one token past a tile costs a tile."""
    b = torch.arange(max_batch + 1, dtype=torch.float64)
    seconds = 2e-3 + 1e-3 * torch.ceil(b / 64)
    sps = torch.zeros(max_batch + 1, dtype=torch.float64)
    sps[1:] = 1.0 / seconds[1:]
    return TableStepModel(sps, "jagged")


def test_async_beats_causal_on_a_jagged_sps_curve():
    """C = 64 anchors fill one tile exactly, so causal's early stop (the next draft costs a whole tile)
    admits nothing; async's global search over the history fills further tiles. At C = 40 and 100 the
    anchors leave part of a tile free and async must still be no worse."""
    model = _jagged_table(8 * 100)
    wl = WORKLOADS["code"].with_overrides(output_tokens=10 ** 6)  # no request ends: no cap noise
    pols = {p.name: p for p in parse_policies("causal,async", 7)}
    for c in (40, 64, 100):
        draws = wl.draw(c, 130, 7, seed=c)
        cau = simulate_point(model, wl, pols["causal"], c, draws)
        asy = simulate_point(model, wl, pols["async"], c, draws)
        tol = SIGMAS * math.hypot(cau["throughput_se"], asy["throughput_se"])
        assert asy["throughput_tok_s_gpu"] >= cau["throughput_tok_s_gpu"] - tol, (c, cau, asy)
        if c == 64:
            assert cau["verify_budget"] == 0.0
            assert asy["throughput_tok_s_gpu"] > 1.2 * cau["throughput_tok_s_gpu"], (cau, asy)


@pytest.mark.parametrize("policy,gamma,drafter", [("fixed5", 5, "dspark"), ("mtp1", 1, "mtp"), ("fixed7", 7, "dspark")])
def test_fixed_policy_accepted_length_matches_the_closed_form(policy, gamma, drafter):
    """E[L + 1] = 1 + Σ_{k≤γ} Π_{i≤k} p_i. N = C·rounds i.i.d. rounds (no request ends: no cap), so the
    sample mean is within 4 standard errors √(Var[L+1]/N) (two-sided p ≈ 6e-5) of it."""
    wl = WORKLOADS["code"].with_overrides(output_tokens=10 ** 6)
    model = named_profile("llama3-8b@h100")
    pol = parse_policies(policy, 7)[0]
    c, rounds = 64, 200
    point = simulate_point(model, wl, pol, c, wl.draw(c, rounds + 2, 7, seed=11))
    expected = wl.expected_accepted_length(gamma, drafter=drafter)
    bound = 4 * wl.accepted_length_std(gamma, drafter=drafter) / math.sqrt(c * rounds)
    assert abs(point["mean_accepted_length"] - expected) < bound, (point["mean_accepted_length"], expected, bound)
    # γ every round, except where a slot's first request (started part-way) reaches its end.
    assert gamma - 0.01 < point["verify_budget"] <= gamma


def test_closed_forms_of_the_acceptance_model():
    wl = AcceptanceModel("t", (0.5, 0.5))
    assert wl.survival(2) == [0.5, 0.25]
    assert wl.expected_accepted_length(2) == pytest.approx(1.75)
    # L ∈ {0, 1, 2} with probabilities 1/2, 1/4, 1/4: Var[L + 1] = E[L²] - E[L]² = 1.25 - 0.75².
    assert wl.accepted_length_std(2) ** 2 == pytest.approx(0.5 * 0 + 0.25 * 1 + 0.25 * 4 - 0.75 ** 2)


def test_confidence_head_has_the_stated_auroc_and_ece():
    """Measured on 140 000 fresh samples: AUROC within 0.01 at each position (its standard error at 20 000
    samples a position is ~0.003-0.006) and pooled ECE within 0.006 (the sampling floor of a calibrated head
    is 0.002-0.004 on these models). The default is the paper's per-position Fig. 6 values and ECE 0.01."""
    cases = [(0.86, 0.02), (0.81, 0.05), (0.91, 0.0), (None, None)]
    for auroc, ece in cases:
        wl = WORKLOADS["code"].with_overrides(auroc=auroc, ece=ece)
        want = wl.aurocs(wl.gamma_max)
        m = wl.metrics()
        for k, (got, exp) in enumerate(zip(m["auroc_per_position"], want)):
            assert abs(got - exp) < 0.01, (auroc, k, got, exp)
        assert abs(m["ece_pooled"] - max(wl.ece, 0.0026)) < 0.006, (ece, m)
        probit = torch.special.ndtri(torch.tensor(want, dtype=torch.float64))
        assert m["mu"] == pytest.approx((math.sqrt(2) * probit).tolist())  # AUROC_k = Φ(μ_k/√2)


def test_defaults_are_the_papers_numbers():
    """Table 1 (Qwen3-8B, DSpark, γ = 7): τ per domain is the mean of its benchmarks, within the 4-decimal
    rounding of the rates; math starts at Fig. 2's 0.93; code and chat are Fig. 2's DFlash linear shapes
    (0.87 -> 0.78, 0.72 -> 0.63) shifted by one constant in logit; Fig. 6's AUROC at positions 1, 3, 5, 7;
    the drafters are 5 layers (dense, Table 1 setup) and 3 layers with a 128-token window (MoE, production)."""
    table1 = {"math": (6.17, 5.78, 5.01), "code": (5.16, 5.52, 5.17), "chat": (3.72, 3.58, 3.21)}
    for name, values in table1.items():
        assert WORKLOADS[name].expected_accepted_length(7) == pytest.approx(sum(values) / 3, abs=1e-3)
    assert WORKLOADS["math"].accept[0] == 0.93
    for name, (first, last) in (("code", (0.87, 0.78)), ("chat", (0.72, 0.63))):
        shape = torch.linspace(first, last, 7, dtype=torch.float64)
        shift = torch.logit(torch.tensor(WORKLOADS[name].accept, dtype=torch.float64)) - torch.logit(shape)
        assert float(shift.max() - shift.min()) < 1e-3 and float(shift.min()) > 0, (name, shift)
    assert [WORKLOADS["chat"].aurocs(7)[k] for k in (0, 2, 4, 6)] == [0.818, 0.812, 0.864, 0.907]
    assert WORKLOADS["chat"].ece == 0.01
    assert (TARGETS["llama3-8b"].dspark_layers, TARGETS["llama3-8b"].dspark_window) == (5, None)
    assert (TARGETS["deepseek-v3"].dspark_layers, TARGETS["deepseek-v3"].dspark_window) == (3, 128)


def test_the_drafter_window_limits_the_drafters_attention_cost():
    """The MoE drafter attends over min(L̄, 128) tokens: its cost does not grow with the context past 128,
    while MTP-1's (full attention) does."""
    m = named_profile("deepseek-v3@h200")
    short, long = (m.draft_seconds(d, 5, 512, ctx) for d in ("dspark",) for ctx in (128.0, 8192.0))
    assert long == pytest.approx(short, rel=1e-12)
    assert m.draft_seconds("mtp", 1, 512, 8192.0) > m.draft_seconds("mtp", 1, 512, 128.0)


def _synthetic_log(wl: AcceptanceModel, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor(wl.accept, dtype=torch.float64)
    y = torch.rand(n, wl.gamma_max, generator=g, dtype=torch.float64) < p
    conf = wl.confidences(y, torch.randn(n, wl.gamma_max, generator=g, dtype=torch.float64))
    return torch.cumprod(y.to(torch.int64), 1).sum(1), conf


def test_fit_acceptance_recovers_a_known_model(tmp_path):
    """A log drawn from a model fits back to it: rates within 4 binomial standard errors, AUROC within
    0.02 and ECE within 0.01 (fewer informative samples at late positions widen both)."""
    wl = WORKLOADS["math"].with_overrides(auroc=0.84, ece=0.03)
    accepted, conf = _synthetic_log(wl, 30000, seed=5)
    fit = fit_acceptance(accepted, conf, name="fit")
    reached = 30000
    for k, (p, q) in enumerate(zip(wl.accept, fit.accept)):
        assert abs(p - q) < 4 * math.sqrt(p * (1 - p) / reached), (k, p, q)
        reached = int((accepted > k).sum())
    # Per position: 30 000 rounds at position 1 down to ~17 000 at position 7 (math's survival): AUROC standard
    # errors 0.003-0.005, inside 0.02.
    assert len(fit.auroc) == wl.gamma_max and all(abs(a - 0.84) < 0.02 for a in fit.auroc), fit.auroc
    assert abs(fit.ece - 0.03) < 0.01, fit.ece
    path = tmp_path / "log.json"
    path.write_text(json.dumps({"accepted_len": accepted.tolist(), "confidence": conf.tolist(), "name": "mine"}))
    loaded = load_acceptance_log(path)
    assert loaded.name == "mine" and loaded.accept == fit.accept
    with pytest.raises(ValueError, match="accepted_len"):
        fit_acceptance(torch.tensor([9]), torch.rand(1, 7))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        load_acceptance_log(bad)


def test_roofline_shapes_match_the_model_cards():
    """Llama-3.1-8B: 8.03B parameters; DeepSeek-V3: 671B total, 37B active (36.6B without the MTP
    module, its weight README) — from the shapes, within 0.5 %."""
    assert TARGETS["llama3-8b"].total_params == pytest.approx(8.03e9, rel=0.005)
    v3 = TARGETS["deepseek-v3"]
    assert v3.total_params == pytest.approx(671e9, rel=0.005)
    assert v3.active_params == pytest.approx(36.6e9, rel=0.005)


def test_expert_formulas_against_monte_carlo():
    """E_touched(T) = E(1 - (1 - k/E)^T) and the padded expert rows against routing T tokens to k distinct
    of E experts uniformly at random (50 trials: relative standard error of the mean below 0.5 %, far
    inside the 2 % tolerance). T = 2100 puts λ = T·k/E = 65.6 just past one 64-row tile."""
    g = torch.Generator().manual_seed(0)
    for tokens in (1, 7, 60, 300, 2100):
        counts = torch.zeros(50, 256)
        for trial in range(50):
            picks = torch.rand(tokens, 256, generator=g).argsort(dim=1)[:, :8]
            counts[trial] = torch.bincount(picks.reshape(-1), minlength=256).float()
        touched = float((counts > 0).double().sum(1).mean())
        padded = float((torch.ceil(counts / 64) * 64).sum(1).mean())
        t = torch.tensor([tokens])
        assert float(experts_touched(t, 256, 8)) == pytest.approx(touched, rel=0.02, abs=0.5)
        assert float(expert_padded_rows(t, 256, 8)) == pytest.approx(padded, rel=0.02)


def test_roofline_step_is_a_staircase_where_compute_bound():
    m = named_profile("llama3-8b@h200")
    t = m.target_seconds(torch.tensor([1, 128, 129, 256, 1024, 1025, 1152]), 256, 1024.0)
    assert t[0] == t[1]  # memory-bound: one token costs what 128 do
    # a row past a tile costs the whole tile; inside a tile only the attention FLOPs (B·L̄·f) still grow
    assert t[5] - t[4] > 10 * (t[6] - t[5]) > 0
    with pytest.raises(ValueError, match="unknown profile"):
        named_profile("llama3-8b@a100")


def test_sps_json_round_trip_and_simulation(tmp_path):
    """A profile_sps result (fake clock: t(B) = 1 ms + B/64 ms) saved, loaded, and simulated."""
    clock = {"t": 0.0, "b": 0}

    def step(b):
        clock["b"] = b

    def timer():
        clock["t"] += 0.5 * (1e-3 + clock["b"] / 64e3)  # called twice per step: half the step each time
        return clock["t"]

    prof = profile_sps(step, 8 * 16, device="cpu", warmup=0, repeats=1, timer=timer)
    path = save_sps_json(prof, tmp_path / "table.json", name="fake", gpus=2, draft_seconds={"dspark": 1e-4})
    model = load_sps_json(path)
    assert model.name == "fake" and model.gpus == 2 and model.max_batch == 128
    assert torch.allclose(model.sps, prof.sps.double())
    sim = simulate(None, profiles=[], sps_json=[path], workloads=["code"], policies="mtp1,async",
                   concurrency=[4, 16, 32], slas=[100], plots=False, request_rounds=256, min_rounds=16, max_rounds=32)
    assert {p["concurrency"] for p in sim.points} == {4, 16}  # 32 x 8 > 128: over the table's range
    assert sim.skipped and sim.skipped[0][2] == 32
    for text, match in (("[]", "not an SPS table"), (json.dumps({"format": "dspark_kernels.sps_table", "version": 1,
                                                                  "sps": [0, 1, -1]}), "> 0")):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_sps_json(bad)


def test_same_seed_gives_the_same_json(tmp_path):
    kw = dict(profiles=["deepseek-v3@h200"], workloads=["chat"], policies="mtp1,causal,async", concurrency=[2, 64],
              plots=False, request_rounds=256, min_rounds=16, max_rounds=64)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    simulate(a, seed=3, **kw)
    simulate(b, seed=3, **kw)
    simulate(c, seed=4, **kw)
    for name in ("points.json", "run.json", "sla.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "points.json").read_bytes() != (c / "points.json").read_bytes()


def test_frontier_interpolation():
    pts = [{"per_user_tok_s": u, "throughput_tok_s_gpu": t} for u, t in ((100.0, 10.0), (50.0, 30.0), (20.0, 25.0))]
    assert throughput_at(pts, 120.0) is None
    assert throughput_at(pts, 75.0) == pytest.approx(20.0)
    assert throughput_at(pts, 30.0) == pytest.approx(30.0)  # the 50 tok/s point meets an SLA of 30
    assert throughput_at(pts, 10.0) == pytest.approx(30.0)


def _cli(*args):
    extra = os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
    env = dict(os.environ, PYTHONPATH=ROOT + extra)
    return subprocess.run([sys.executable, "-m", "dspark_kernels", "simulate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_smoke(tmp_path):
    out = tmp_path / "sim"
    res = _cli("--out", str(out), "--profiles", "llama3-8b@h100", "--workloads", "code", "--concurrency", "1,8",
               "--request-rounds", "64", "--min-rounds", "16", "--max-rounds", "32", "--sla", "100,300")
    assert res.returncode == 0, res.stderr
    assert "SLA tok/s/user" in res.stdout and "async" in res.stdout and "(+" in res.stdout
    assert "[" in res.stderr and "done" in res.stderr  # the progress bar
    points = json.loads((out / "points.json").read_text())
    assert len(points) == 2 * 5
    keys = {"policy", "profile", "workload", "concurrency", "throughput_tok_s_gpu", "per_user_tok_s",
            "verify_budget", "mean_accepted_length"}
    assert all(keys <= set(p) for p in points)
    for png in ("frontier.png", "concurrency.png"):
        head = (out / png).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 100
    bad = _cli("--out", str(tmp_path / "x"), "--profiles", "nope@h100", "--quiet")
    assert bad.returncode == 2 and "unknown profile 'nope@h100'" in bad.stderr


def test_draft_seconds_per_concurrency_round_trip_and_interpolation(tmp_path):
    """meta.draft_seconds may be [C, seconds] lists (bench/sps_profile.py writes them): linear in C between
    the measured C, held constant past either end, validated on save and on load."""
    from dspark_kernels.engine.simulator.steptime import draft_at
    pairs = [[1, 1e-3], [4, 4e-3], [8, 6e-3]]
    assert draft_at(pairs, 1) == 1e-3 and draft_at(pairs, 2) == pytest.approx(2e-3)
    assert draft_at(pairs, 6) == pytest.approx(5e-3) and draft_at(pairs, 100) == 6e-3 and draft_at(2e-3, 9) == 2e-3
    sps = [0.0] + [1.0 / (1e-3 * (1 + b / 32)) for b in range(1, 65)]
    path = save_sps_json(sps, tmp_path / "t.json", draft_seconds={"dspark": pairs, "mtp": 5e-4})
    model = load_sps_json(path)
    t = model.round_seconds("dspark", 5, 6, 0.0)
    assert t[7] == pytest.approx(1e-3 * (1 + 7 / 32) + 5e-3)
    assert model.round_seconds("mtp", 1, 6, 0.0)[7] == pytest.approx(1e-3 * (1 + 7 / 32) + 5e-4)
    for bad in ([[4, 1e-3], [2, 1e-3]], [[1, -1.0]], [], [[1, 2, 3]]):
        with pytest.raises(ValueError, match="draft_seconds"):
            save_sps_json(sps, tmp_path / "bad.json", draft_seconds={"dspark": bad})
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="kv_seconds_per_token"):
            save_sps_json(sps, tmp_path / "bad.json", meta={"kv_seconds_per_token": bad})
    doc = json.loads(path.read_text())
    doc["meta"]["draft_seconds"]["dspark"] = [[2, 1e-3], [1, 1e-3]]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="C ascending"):
        load_sps_json(path)


def test_sps_profile_smoke_writes_a_table_the_simulator_reads(tmp_path):
    """bench/sps_profile.py on CPU (tiny shapes): every B to Bmax in the table (measured or interpolated),
    non-increasing, drafters per C, and the simulator runs on it. The GPU run is bench.gpu_proof's stage 6."""
    sys.path.insert(0, ROOT)
    from bench import sps_profile
    assert sps_profile.measured_sizes(20, 8, 4) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20]
    assert sps_profile.main(["--out", str(tmp_path / "s.json"), "--smoke"]) == 0
    model = load_sps_json(tmp_path / "s.json")
    assert model.max_batch == 24 and model.meta["gamma"] == 5
    assert [c for c, _ in model.draft_seconds["dspark"]] == [1, 2, 4]
    assert model.meta["layer_scale"] == 2.0 and model.meta["cuda_graphs"] is False
    assert model.meta["overhead_seconds"] == 3e-4 and model.meta["kv_seconds_per_token"] >= 0
    # The kv term: one cached token of one request adds kv seconds to every round.
    kv, over = model.meta["kv_seconds_per_token"], model.meta["overhead_seconds"]
    t = model.round_seconds("mtp", 1, 2, 100.0)
    assert t[3] == pytest.approx(1.0 / float(model.sps[3]) + over + kv * 2 * 100.0
                                 + model.draft_seconds["mtp"][1][1])
    with pytest.raises(ValueError, match="γ = 5"):
        simulate(None, profiles=[], sps_json=[tmp_path / "s.json"], gamma=4, plots=False)
    sim = simulate(None, profiles=[], sps_json=[tmp_path / "s.json"], workloads=["code"], policies="mtp1,async",
                   plots=False, request_rounds=64, min_rounds=8, max_rounds=16)
    assert {p["concurrency"] for p in sim.points} <= {1, 2, 4} and sim.points


@pytest.mark.gpu
def test_sps_profile_times_cuda_graphs_on_a_gpu(tmp_path):
    """bench/sps_profile.py --tiny on the GPU: every timed unit (layers with verify_attention, head,
    attention alone, both drafters with markov_draft) is captured as a CUDA graph, none falls back."""
    sys.path.insert(0, ROOT)
    from bench import sps_profile
    assert sps_profile.main(["--out", str(tmp_path / "g.json"), "--tiny"]) == 0
    meta = load_sps_json(tmp_path / "g.json").meta
    assert meta["cuda_graphs"] is True and meta["graph_failures"] == [], meta["graph_failures"]
    assert meta["kv_seconds_per_token"] > 0


def test_acceptance_log_records_conditional_confidence_and_observed_positions(tmp_path):
    """AcceptanceLog.record: c_k = a_k / a_{k-1} (0 after a zero survival), observed = drafts verified,
    requests that verified nothing are skipped; save -> load_acceptance_log fits the same model as fit()."""
    from dspark_kernels.engine.simulator import AcceptanceLog
    log = AcceptanceLog()
    survival = torch.tensor([[0.8, 0.4, 0.2], [0.5, 0.0, 0.0], [0.9, 0.9, 0.9]])
    log.record(num_accepted=torch.tensor([2, 0, 0]), lengths=torch.tensor([3, 1, 0], dtype=torch.int32),
               survival=survival)
    accepted, conf, observed = log.tensors()
    assert accepted.tolist() == [2, 0] and observed.tolist() == [3, 1] and len(log) == 2
    assert torch.allclose(conf, torch.tensor([[0.8, 0.5, 0.5], [0.5, 0.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="num_accepted"):
        log.record(num_accepted=torch.tensor([2]), lengths=torch.tensor([1]), survival=torch.ones(1, 3))
    with pytest.raises(ValueError, match="γ changed"):
        log.record(num_accepted=torch.tensor([0]), lengths=torch.tensor([1]), survival=torch.ones(1, 2))
    with pytest.raises(ValueError, match="confidence head"):
        log.record(num_accepted=torch.tensor([0]), lengths=torch.tensor([1]), survival=None)
    for _ in range(40):  # enough rounds with both outcomes at position 0 for an AUROC
        log.record(num_accepted=torch.tensor([1, 0]), lengths=torch.tensor([3, 3]),
                   survival=torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.1, 0.05]]))
    path = log.save(tmp_path / "log.json", name="unit", context_tokens=512)
    loaded, fitted = load_acceptance_log(path), log.fit(name="unit", context_tokens=512)
    assert loaded.accept == fitted.accept and loaded.auroc == fitted.auroc and loaded.context_tokens == 512


def test_demo_acceptance_log_feeds_the_simulator(tmp_path):
    """The loop the issue asks for: DSparkRound rounds (the demo's synthetic target, every draft verified)
    -> AcceptanceLog -> a fitted workload -> simulate --acceptance-log. The log's accepted lengths match
    the run's own count, and the fitted rates are those the run realised."""
    from dspark_kernels.engine.demo import SyntheticTarget, run
    from dspark_kernels.engine.simulator import AcceptanceLog
    log = AcceptanceLog()
    target = SyntheticTarget(48, 16, 1.0, 0)
    res = run(30, 8, 4, 48, 16, 1.0, 0, True, "reference", target, log=log)
    accepted, _, observed = log.tensors()
    assert len(log) == 30 * 8 and bool((observed == 4).all())
    assert float(accepted.double().mean()) == pytest.approx(sum(res.accepted) / len(res.accepted))
    path = log.save(tmp_path / "demo.json", name="demo")
    sim = simulate(None, profiles=["llama3-8b@h100"], workloads=[], acceptance_logs=[path], gamma=4,
                   policies="mtp1,async", concurrency=[4], plots=False, request_rounds=64, min_rounds=8, max_rounds=16)
    assert {p["workload"] for p in sim.points} == {"demo"}
    fitted = load_acceptance_log(path)
    assert fitted.accept[0] == pytest.approx(float((accepted > 0).double().mean()))
