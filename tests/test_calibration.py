"""STS calibration (DSpark §3.2.1): metrics on hand examples, temperature recovery, plots."""

import inspect
import json
import math
import sys

import pytest
import torch

import dspark_kernels
from dspark_kernels.engine.calibration import (
    DEFAULT_N_BINS,
    STS_FILENAME,
    STSResult,
    alive_outcomes,
    auroc,
    brier,
    calibration_metrics,
    default_temperature_grid,
    ece,
    fit_sts,
    load_sts,
    observed_lengths,
    observed_mask,
    reliability_bins,
    reliability_diagram,
    save_sts,
    survival_from_logits,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TRUE_TAUS = (0.5, 2.0, 1.3)


def synthetic_rounds(num, taus, seed, mean=3.0, std=3.0):
    """Logits l[n, k] ~ N(mean, std); draft k is accepted with probability σ(l/τ*_k).

    A round stops at its first reject, so the accepted length is the count of
    leading accepts.
    """
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num, len(taus), generator=g) * std + mean
    accept_prob = torch.sigmoid(logits / torch.tensor(taus))
    accepted = torch.rand(num, len(taus), generator=g) < accept_prob
    lengths = torch.cumprod(accepted.to(torch.int64), dim=1).sum(dim=1)
    return logits, lengths


@pytest.fixture(scope="module")
def fitted():
    logits, lengths = synthetic_rounds(20000, TRUE_TAUS, seed=1234)
    return logits, lengths, fit_sts(logits, lengths)


def test_survival_is_cumulative_product_of_scaled_sigmoids():
    logits = torch.tensor([[0.3, -1.2, 2.0], [4.0, 0.0, -0.5]])
    temps = torch.tensor([0.5, 2.0, 1.3])
    expected = torch.empty(2, 3)
    for n in range(2):
        running = 1.0
        for k in range(3):
            running *= 1.0 / (1.0 + math.exp(-float(logits[n, k]) / float(temps[k])))
            expected[n, k] = running
    got = survival_from_logits(logits, temps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(survival_from_logits(logits), survival_from_logits(logits, torch.ones(3)))
    assert bool((got[:, 1:] <= got[:, :-1]).all())


def test_survival_rejects_bad_temperatures():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        survival_from_logits(logits, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError):
        survival_from_logits(logits, torch.ones(4))


def test_alive_outcomes_from_accepted_lengths():
    got = alive_outcomes(torch.tensor([0, 2, 3, 1]), 3)
    expected = torch.tensor([[0, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError):
        alive_outcomes(torch.tensor([0, 4]), 3)
    with pytest.raises(ValueError):
        alive_outcomes(torch.tensor([-1, 0]), 3)
    with pytest.raises(ValueError):
        alive_outcomes(torch.tensor([0.0, 1.0]), 3)


def test_ece_hand_example():
    # Bins of width 0.1: {0.1, 0.1} predicts 0.1, observes 0.5 → 0.4 · 2/4;
    # {0.9, 0.9} predicts 0.9, observes 1.0 → 0.1 · 2/4.
    prob = torch.tensor([0.1, 0.1, 0.9, 0.9], dtype=torch.float64)
    outcome = torch.tensor([0, 1, 1, 1])
    assert ece(prob, outcome, n_bins=10) == pytest.approx(0.25, abs=1e-12)
    # One bin: |mean p - mean y| = |0.5 - 0.75|.
    assert ece(prob, outcome, n_bins=1) == pytest.approx(0.25, abs=1e-12)


def test_ece_bin_edges():
    # p = 1 lands in the last bin and p = 0 in the first; both match their outcome exactly.
    assert ece(torch.tensor([0.0, 1.0]), torch.tensor([False, True]), n_bins=15) == 0.0
    # 0.5 with 2 bins opens the upper bin [0.5, 1]: mean 0.75 vs observed 1 → 0.25 · 2/3;
    # the lower bin holds 0.2 vs 0 → 0.2 · 1/3.
    got = ece(torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64), torch.tensor([0, 1, 1]), n_bins=2)
    assert got == pytest.approx(0.25 * 2 / 3 + 0.2 / 3, abs=1e-12)


def test_ece_small_for_calibrated_and_large_for_miscalibrated():
    g = torch.Generator().manual_seed(7)
    prob = torch.rand(100000, generator=g, dtype=torch.float64)
    outcome = torch.rand(100000, generator=g, dtype=torch.float64) < prob
    assert ece(prob, outcome) < 0.01
    assert ece(prob ** 3, outcome) > 0.1


def test_brier_hand_example():
    prob = torch.tensor([0.2, 0.7, 1.0], dtype=torch.float64)
    outcome = torch.tensor([0, 1, 1])
    assert brier(prob, outcome) == pytest.approx((0.04 + 0.09 + 0.0) / 3, abs=1e-12)


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError):
        ece(torch.tensor([0.5, 1.5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        brier(torch.tensor([0.5, 0.5]), torch.tensor([0, 2]))
    with pytest.raises(ValueError):
        auroc(torch.tensor([0.5, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        ece(torch.tensor([0.5]), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        ece(torch.tensor([0.5]), torch.tensor([1]), n_bins=0)


def test_auroc_hand_example_without_ties():
    # Pairs (positive, negative): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, ·) yes twice → 3/4.
    score = torch.tensor([0.1, 0.4, 0.35, 0.8])
    outcome = torch.tensor([0, 0, 1, 1])
    assert auroc(score, outcome) == pytest.approx(0.75, abs=1e-12)


def test_auroc_hand_example_with_ties():
    # Positives {0.5, 0.9}, negatives {0.2, 0.5, 0.5}: 0.5 beats 0.2 (1) and ties
    # two 0.5s (1/2 each); 0.9 beats all three → (1 + 0.5 + 0.5 + 3) / 6.
    score = torch.tensor([0.2, 0.5, 0.5, 0.9, 0.5])
    outcome = torch.tensor([0, 1, 0, 1, 0])
    assert auroc(score, outcome) == pytest.approx(5 / 6, abs=1e-12)
    # All scores tied: every pair is a half.
    assert auroc(torch.ones(4), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.5, abs=1e-12)


def test_auroc_matches_pairwise_count_on_random_ties():
    g = torch.Generator().manual_seed(3)
    score = torch.randint(0, 6, (200,), generator=g).double()
    outcome = torch.rand(200, generator=g) < 0.4
    pos = score[outcome]
    neg = score[~outcome]
    wins = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    assert auroc(score, outcome) == pytest.approx(float(wins) / (pos.numel() * neg.numel()), abs=1e-12)


def test_auroc_extremes_and_degenerate():
    outcome = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([1.0, 2.0, 3.0, 4.0]), outcome) == 1.0
    assert auroc(torch.tensor([4.0, 3.0, 2.0, 1.0]), outcome) == 0.0
    assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    assert math.isnan(auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 0])))


def test_calibration_metrics_per_position_match_scalar_metrics():
    g = torch.Generator().manual_seed(5)
    survival = torch.rand(500, 3, generator=g, dtype=torch.float64)
    alive = torch.rand(500, 3, generator=g, dtype=torch.float64) < survival
    m = calibration_metrics(survival, alive, n_bins=10)
    for k in range(3):
        assert float(m.ece[k]) == pytest.approx(ece(survival[:, k], alive[:, k], n_bins=10), abs=1e-12)
        assert float(m.auroc[k]) == pytest.approx(auroc(survival[:, k], alive[:, k]), abs=1e-12)
        assert float(m.brier[k]) == pytest.approx(brier(survival[:, k], alive[:, k]), abs=1e-12)
        assert float(m.base_rate[k]) == pytest.approx(float(alive[:, k].double().mean()), abs=1e-12)
    bins = reliability_bins(survival, alive, n_bins=10)
    assert bins.count.shape == (3, 10) and int(bins.count.sum()) == 1500


def test_default_grid_is_symmetric_and_contains_one():
    grid = default_temperature_grid()
    assert grid.dtype == torch.float64 and bool((grid > 0).all())
    assert bool((grid[1:] > grid[:-1]).all())
    assert float(grid[grid.shape[0] // 2]) == 1.0
    torch.testing.assert_close(grid.log(), -grid.log().flip(0))
    with pytest.raises(ValueError):
        default_temperature_grid(num=10)


def test_fit_recovers_known_temperatures(fitted):
    _, _, res = fitted
    assert isinstance(res, STSResult)
    temps = res.temperatures
    assert temps.dtype == torch.float32 and temps.shape == (3,) and bool((temps > 0).all())
    # Grid ratio is 2.5 %; sampling noise at N = 20000 is a few percent, a
    # wrong fit (e.g. τ = 1 at the last position) is off by > 25 %.
    log_err = (temps.double().log() - torch.tensor(TRUE_TAUS, dtype=torch.float64).log()).abs()
    assert bool((log_err < 0.12).all()), temps


def test_fit_reduces_ece_and_reports_metrics(fitted):
    _, _, res = fitted
    for metrics in (res.before, res.after):
        for field in (metrics.ece, metrics.auroc, metrics.brier, metrics.base_rate):
            assert field.shape == (3,) and field.dtype == torch.float64
    assert bool((res.after.ece < res.before.ece).all())
    assert bool((res.after.ece < 0.015).all())
    assert bool((res.before.ece > 0.02).all())
    assert bool((res.after.brier <= res.before.brier + 1e-4).all())
    # Position 0's ranking does not depend on τ_0 > 0, so neither does its AUROC.
    assert float(res.after.auroc[0]) == pytest.approx(float(res.before.auroc[0]), abs=1e-12)
    torch.testing.assert_close(res.before.base_rate, res.after.base_rate)


def test_fit_matches_brute_force_sequential_search():
    # Each τ_k must be the grid point minimising the ECE of a_k given the
    # already fitted τ_0..τ_{k-1} (recomputed here with the public metrics).
    logits, lengths = synthetic_rounds(3000, (0.7, 1.6, 1.0, 0.4), seed=11)
    grid = torch.tensor([0.3, 0.4, 0.5, 0.7, 1.0, 1.3, 1.6, 2.0, 3.0])
    res = fit_sts(logits, lengths, grid=grid, n_bins=10)
    alive = alive_outcomes(lengths, 4)
    prev = torch.ones(3000, dtype=torch.float64)
    for k in range(4):
        errors = [ece(prev * torch.sigmoid(logits[:, k].double() / t), alive[:, k], n_bins=10) for t in grid.tolist()]
        best = min(range(len(errors)), key=lambda i: (errors[i], abs(math.log(grid[i]))))
        assert float(res.temperatures[k]) == pytest.approx(float(grid[best]))
        prev = prev * torch.sigmoid(logits[:, k].double() / float(res.temperatures[k]))
    assert set(res.temperatures.tolist()) <= set(grid.tolist())


def test_fit_keeps_calibrated_positions_near_one():
    logits, lengths = synthetic_rounds(10000, (1.0, 1.0), seed=21)
    res = fit_sts(logits, lengths, grid=default_temperature_grid(81))
    assert bool(((res.temperatures.log()).abs() < 0.12).all()), res.temperatures
    assert bool((res.before.ece < 0.02).all())


def test_fit_uninformative_logits_keep_unit_temperature():
    # σ(0 / τ) = 1/2 for every τ: every grid point ties, the tie-break keeps τ = 1.
    logits = torch.zeros(100, 2)
    lengths = torch.randint(0, 3, (100,), generator=torch.Generator().manual_seed(0))
    res = fit_sts(logits, lengths)
    assert res.temperatures.tolist() == [1.0, 1.0]


def test_fit_rejects_bad_input():
    logits = torch.zeros(4, 2)
    with pytest.raises(ValueError):
        fit_sts(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError):
        fit_sts(logits, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError):
        fit_sts(torch.tensor([[0.0, float("inf")]] * 4), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError):
        fit_sts(logits, torch.tensor([0, 1, 2, 2]), grid=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError):
        fit_sts(logits.long(), torch.tensor([0, 1, 2, 2]))


def test_fitted_temperatures_drive_markov_draft_survival(fitted):
    # The fit's output plugs into markov_draft(sts_temperature=...) and the op's
    # survival equals survival_from_logits of the confidence logits it saw.
    _, _, res = fitted
    g = torch.Generator().manual_seed(2)
    num_req, gamma, vocab, rank, hid = 5, 3, 37, 6, 4
    base = torch.randn(num_req, gamma, vocab, generator=g)
    anchor = torch.randint(0, vocab, (num_req,), generator=g)
    w1 = torch.randn(vocab, rank, generator=g)
    w2 = torch.randn(vocab, rank, generator=g) * 0.1
    hidden = torch.randn(num_req, gamma, hid, generator=g)
    conf_w = torch.randn(hid + rank, generator=g)
    conf_b = torch.tensor(0.3)
    out = dspark_kernels.markov_draft(
        base, anchor, w1, w2, torch.ones(num_req), torch.arange(num_req, dtype=torch.int64),
        torch.tensor(0, dtype=torch.int64), hidden=hidden, conf_weight=conf_w, conf_bias=conf_b,
        sts_temperature=res.temperatures, backend="reference",
    )
    prev_tokens = torch.cat([anchor[:, None], out.tokens[:, :-1].long()], dim=1)
    conf_logits = torch.cat([hidden, w1[prev_tokens]], dim=-1) @ conf_w + conf_b
    torch.testing.assert_close(out.survival, survival_from_logits(conf_logits, res.temperatures))


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000


def test_reliability_diagram_from_result(fitted, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, res = fitted
    out = reliability_diagram(res, tmp_path / "sts.png")
    assert out == tmp_path / "sts.png"
    _assert_png(tmp_path / "sts.png")


def test_reliability_diagram_from_data(fitted, tmp_path):
    pytest.importorskip("matplotlib")
    logits, lengths, res = fitted
    reliability_diagram((logits[:2000], lengths[:2000]), tmp_path / "before.png")
    _assert_png(tmp_path / "before.png")
    reliability_diagram((logits[:2000], lengths[:2000]), str(tmp_path / "both.png"), temperatures=res.temperatures)
    _assert_png(tmp_path / "both.png")
    with pytest.raises(TypeError):
        reliability_diagram(42, tmp_path / "bad.png")


def test_reliability_diagram_without_matplotlib_says_how_to_install(fitted, tmp_path, monkeypatch):
    _, _, res = fitted
    # A None entry in sys.modules makes that import fail, as if not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        reliability_diagram(res, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


# --------------------------------------------------------------------------- ECE bins, observed positions, storage


def test_default_ece_bins_are_deepspecs_20():
    assert DEFAULT_N_BINS == 20
    for fn in (ece, calibration_metrics, reliability_bins, fit_sts, reliability_diagram):
        assert inspect.signature(fn).parameters["n_bins"].default == 20, fn.__name__
    assert "20" in fit_sts.__doc__ and "20" in ece.__doc__
    res = fit_sts(torch.zeros(10, 2), torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(0)))
    assert res.n_bins == 20 and res.reliability_after.count.shape == (2, 20)


def _truncated_rounds(kind, num=20000, seed=1234):
    """Rounds of synthetic_rounds whose scheduler verified only m drafts: the accepted length is min(L, m)."""
    logits, lengths = synthetic_rounds(num, TRUE_TAUS, seed=seed)
    gamma = len(TRUE_TAUS)
    if kind == "random":  # e.g. a per-request max_len
        proposal = torch.randint(1, gamma + 1, (num,), generator=torch.Generator().manual_seed(seed + 1))
    else:  # a survival threshold on the uncalibrated head, as a scheduler would do
        proposal = (survival_from_logits(logits) > 0.85).long().cumprod(1).sum(1).clamp(min=1)
    assert 0 < float((proposal < gamma).double().mean()) < 1
    return logits, torch.minimum(lengths, proposal), proposal


@pytest.mark.parametrize("kind", ["random", "scheduler"])
def test_fit_ignores_positions_beyond_the_proposal_length(kind):
    logits, accepted, proposal = _truncated_rounds(kind)
    res = fit_sts(logits, accepted, observed_len=proposal)
    log_err = (res.temperatures.double().log() - torch.tensor(TRUE_TAUS, dtype=torch.float64).log()).abs()
    assert bool((log_err < 0.12).all()), res.temperatures
    assert bool((res.after.ece < 0.02).all()), res.after.ece
    assert res.after.count.tolist() == [int((proposal > k).sum()) for k in range(3)]
    # Counting the unverified positions as rejected (the full-γ assumption) fits something else.
    full_gamma = fit_sts(logits, accepted)
    wrong = (full_gamma.temperatures.double().log() - torch.tensor(TRUE_TAUS, dtype=torch.float64).log()).abs()
    assert float(wrong.max()) > 0.5, full_gamma.temperatures


def test_fit_with_every_position_observed_is_the_default():
    logits, lengths = synthetic_rounds(3000, (0.7, 1.6, 1.0), seed=4)
    a = fit_sts(logits, lengths, n_bins=15)
    b = fit_sts(logits, lengths, observed_len=torch.full((3000,), 3), n_bins=15)
    assert torch.equal(a.temperatures, b.temperatures)
    for m, n in ((a.before, b.before), (a.after, b.after)):
        for field in ("ece", "auroc", "brier", "base_rate", "count"):
            assert torch.equal(getattr(m, field), getattr(n, field)), field


def test_fit_matches_brute_force_on_the_observed_subsets():
    logits, accepted, proposal = _truncated_rounds("random", num=3000, seed=8)
    grid = torch.tensor([0.3, 0.5, 0.7, 1.0, 1.3, 2.0, 3.0])
    res = fit_sts(logits, accepted, observed_len=proposal, grid=grid, n_bins=10)
    alive = alive_outcomes(accepted, 3)
    prev = torch.ones(3000, dtype=torch.float64)
    for k in range(3):
        rows = proposal > k
        errors = [ece((prev * torch.sigmoid(logits[:, k].double() / t))[rows], alive[rows, k], n_bins=10)
                  for t in grid.tolist()]
        best = min(range(len(errors)), key=lambda i: (errors[i], abs(math.log(grid[i]))))
        assert float(res.temperatures[k]) == pytest.approx(float(grid[best]))
        prev = prev * torch.sigmoid(logits[:, k].double() / float(res.temperatures[k]))


def test_a_position_nobody_observed_keeps_unit_temperature():
    logits, lengths = synthetic_rounds(2000, (0.5, 2.0, 1.3), seed=6)
    observed = torch.full((2000,), 2)
    res = fit_sts(logits, torch.minimum(lengths, observed), observed_len=observed)
    assert float(res.temperatures[2]) == 1.0
    assert res.after.count.tolist() == [2000, 2000, 0]
    assert math.isnan(float(res.after.ece[2])) and math.isnan(float(res.after.base_rate[2]))
    assert int(res.reliability_after.count[2].sum()) == 0


def test_metrics_over_observed_positions_are_the_subset_metrics():
    g = torch.Generator().manual_seed(9)
    survival = torch.rand(400, 3, generator=g, dtype=torch.float64)
    alive = torch.rand(400, 3, generator=g, dtype=torch.float64) < survival
    mask = observed_mask(torch.randint(0, 4, (400,), generator=g), 400, 3)
    m = calibration_metrics(survival, alive, n_bins=10, observed=mask)
    bins = reliability_bins(survival, alive, n_bins=10, observed=mask)
    for k in range(3):
        rows = mask[:, k]
        assert float(m.ece[k]) == pytest.approx(ece(survival[rows, k], alive[rows, k], n_bins=10), abs=1e-12)
        assert float(m.auroc[k]) == pytest.approx(auroc(survival[rows, k], alive[rows, k]), abs=1e-12)
        assert float(m.brier[k]) == pytest.approx(brier(survival[rows, k], alive[rows, k]), abs=1e-12)
        assert int(m.count[k]) == int(rows.sum()) == int(bins.count[k].sum())
    with pytest.raises(ValueError):
        calibration_metrics(survival, alive, observed=mask[:, :2])


def test_observed_lengths_cut_after_an_accepted_eos():
    eos = 2
    tokens = torch.tensor([[5, 2, 7, 7], [5, 6, 2, 7], [2, 6, 6, 6], [5, 6, 7, 8], [3, 9, 2, 2]])
    proposal = torch.tensor([4, 4, 3, 2, 4])
    accepted = torch.tensor([3, 1, 0, 2, 4])
    # row 0: EOS at 1 accepted -> 2; row 1: EOS at 2 rejected (L = 1) -> 4; row 2: EOS at 0 rejected -> 3;
    # row 3: no EOS -> its proposal 2; row 4: first accepted EOS at 2 -> 3 (eos ids may be a set).
    got = observed_lengths(proposal, accepted_len=accepted, draft_tokens=tokens, eos_token_id=eos)
    assert got.tolist() == [2, 4, 3, 2, 3]
    assert observed_lengths(proposal, accepted_len=accepted, draft_tokens=tokens,
                            eos_token_id={eos, 9}).tolist() == [2, 4, 3, 2, 2]
    assert observed_lengths(proposal).tolist() == proposal.tolist()
    with pytest.raises(ValueError, match="come together"):
        observed_lengths(proposal, draft_tokens=tokens)
    with pytest.raises(ValueError):
        observed_lengths(torch.tensor([1.0, 2.0]))
    assert observed_mask(got, 5, 4).sum(1).tolist() == got.tolist()


def test_fit_rejects_bad_observed_len():
    logits = torch.zeros(4, 2)
    lengths = torch.tensor([0, 1, 2, 2])
    for bad in (torch.tensor([1, 2, 3, 1]), torch.tensor([1, 2, 2]), torch.tensor([1.0, 2.0, 2.0, 1.0])):
        with pytest.raises(ValueError, match="observed_len"):
            fit_sts(logits, lengths, observed_len=bad)


def test_reliability_diagram_with_observed_positions(tmp_path):
    pytest.importorskip("matplotlib")
    logits, accepted, proposal = _truncated_rounds("random", num=2000)
    reliability_diagram((logits, accepted), tmp_path / "obs.png", observed_len=proposal,
                        temperatures=torch.tensor(TRUE_TAUS))
    _assert_png(tmp_path / "obs.png")


def test_save_and_load_sts_round_trip_bit_exactly(fitted, tmp_path):
    _, _, res = fitted
    path = save_sts(res, tmp_path, metadata={"dataset": "synthetic"})
    assert path == tmp_path / STS_FILENAME
    temps, meta = load_sts(tmp_path)
    assert temps.dtype == torch.float32 and torch.equal(temps, res.temperatures)
    assert meta["n_bins"] == res.n_bins == 20 and meta["num_samples"] == 20000 and meta["dataset"] == "synthetic"
    assert meta["ece_after"] == pytest.approx(res.after.ece.tolist())
    assert meta["grid"] == {"size": 241, "min": pytest.approx(0.05), "max": pytest.approx(20.0)}
    doc = json.loads(path.read_text())
    assert doc["format"] == "dspark_kernels.sts_temperature" and doc["gamma"] == 3
    # Odd fp32 values survive the decimal round trip too.
    odd = torch.tensor([0.1, 1 / 3, 2.7182817], dtype=torch.float32)
    assert torch.equal(load_sts(save_sts(odd, tmp_path / "odd.json"))[0], odd)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(survival_from_logits(x, load_sts(tmp_path / "odd.json")[0]), survival_from_logits(x, odd))


def test_load_sts_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.json"
    for text, match in (("[1, 2]", "not an STS temperature file"),
                        ('{"format": "dspark_kernels.sts_temperature", "version": 9}', "version"),
                        ('{"format": "dspark_kernels.sts_temperature", "version": 1, "gamma": 3, '
                         '"temperatures": [1.0, 2.0]}', "gamma=3"),
                        ('{"format": "dspark_kernels.sts_temperature", "version": 1, "gamma": 2, '
                         '"temperatures": [1.0, -2.0]}', "finite and > 0"),
                        ("{oops", "cannot read")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_sts(bad)
    with pytest.raises(ValueError):
        save_sts(torch.tensor([1.0, 0.0]), tmp_path / "zero.json")
