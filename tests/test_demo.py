"""The demo is the package's main job on a fresh CPU machine: it must run the
draft -> verify loop, show the Markov head helping, verify through
verify_attention over a paged KV cache exactly as a sequential recompute
would, and its losslessness check must be able to fail."""

import pytest
import torch

from dspark_kernels.engine import demo
from dspark_kernels.ops import verify_attention as va_op


def test_demo_runs_and_passes(capsys):
    assert demo.main(["--rounds", "60", "--sched-rounds", "20", "--requests", "32"]) == 0
    out = capsys.readouterr().out
    assert "Markov head on" in out and "Markov head off" in out
    assert "heavy  async" in out
    assert "1 attention layer" in out
    assert "verify_attention pass vs sequential dense recompute" in out
    assert "verify_attention over the paged cache vs sequential recompute, all runs" in out
    assert "FAIL" not in out


def test_markov_head_raises_acceptance():
    target = demo.SyntheticTarget(vocab=48, rank=16, temperature=1.0, seed=0)
    kw = dict(rounds=60, requests=32, gamma=5, vocab=48, rank=16, temperature=1.0, seed=0,
              backend="reference", target=target)
    on = demo.run(markov_head=True, **kw).accepted
    off = demo.run(markov_head=False, **kw).accepted
    assert sum(on) / len(on) > sum(off) / len(off) + 0.1


def test_scheduler_trades_verify_tokens_for_throughput_under_heavy_load():
    target = demo.SyntheticTarget(vocab=48, rank=16, temperature=1.0, seed=0)
    kw = dict(rounds=40, requests=32, gamma=5, vocab=48, rank=16, temperature=1.0, seed=0,
              markov_head=True, backend="reference", target=target, load="heavy")
    top = 32 * 6

    def throughput(policy):
        res = demo.run(policy=policy, **kw)
        assert res.lossless_test()[2] > 1e-4
        assert res.max_logit_diff <= demo.LOGIT_TOL
        rate = sum((a + 1) / t for a, t in zip(res.accepted, res.times)) / len(res.times)
        return sum(res.verified) / len(res.verified), rate, res.rows

    fixed_tokens, fixed_rate, fixed_rows = throughput("fixed")
    assert fixed_rows == [top] * 40
    for policy in ("causal", "async"):
        tokens, rate, rows = throughput(policy)
        assert tokens < 0.6 * fixed_tokens  # the heavy curve makes long verifies unprofitable
        if policy == "async":
            # Its batch size is known two rounds ahead: the target processes a smaller bucket, and that pays.
            assert rows[:2] == [top, top] and max(rows[2:]) < top
            assert sum(rows) / len(rows) < 0.6 * top
            assert rate > 1.15 * fixed_rate
        else:
            # Causal decides inside the round: a graph-replaying engine must run the largest bucket.
            assert rows == [top] * 40


# ---------------------------------------------------------------------------
# The verification pass: pack_verify -> paged KV cache -> verify_attention.
# ---------------------------------------------------------------------------


def _small_run(target, **kw):
    """A few ragged rounds (causal scheduling under heavy load gives every
    request its own verify length) that outgrow the window set by the caller."""
    args = dict(rounds=8, requests=6, gamma=4, vocab=37, rank=8, temperature=1.0, seed=2, markov_head=True,
                backend="reference", target=target, policy="causal", load="heavy")
    args.update(kw)
    return demo.run(**args)


def _small_target(window=6):
    target = demo.SyntheticTarget(vocab=37, rank=8, temperature=1.0, seed=3)
    target.layer.window = window  # short, so that the text outgrows it within a few rounds
    return target


@pytest.mark.parametrize("backend", va_op.IMPLS.available("cpu"))
def test_verify_pass_matches_sequential_recompute(backend, monkeypatch):
    """Every verify row's logits from one verify_attention call over the paged
    cache equal the layer evaluated one token at a time on the text."""
    real = demo.verify_attention
    monkeypatch.setattr(demo, "verify_attention", lambda *a, **k: real(*a, **{**k, "backend": backend}))
    target = _small_target()
    res = _small_run(target)
    assert res.rows_checked == round(sum(res.verified) * 6)
    lengths = {round(v * 6) for v in res.verified}
    assert len(lengths) > 1  # ragged batches, not one fixed length
    assert res.max_logit_diff <= demo.LOGIT_TOL
    # The text outgrew the window, so the window rule was exercised.
    assert int(res.counts.sum()) / 6 > target.layer.window + 4


def test_verify_pass_without_window_matches_sequential_recompute():
    target = _small_target(window=-1)
    assert _small_run(target).max_logit_diff <= demo.LOGIT_TOL


def _mutant(bug):
    """A wrong attention: what a kernel bug would do to the verify pass."""
    real = demo.verify_attention

    def wrong(q, k_cache, v_cache, page_table, kv_lens, cu_verify, **kw):
        if bug == "no_window":
            kw["window"] = -1
        elif bug == "page_order":
            page_table = page_table.roll(1, dims=1)
        elif bug == "scale":
            kw["sm_scale"] = 1.0
        elif bug == "star_mask":  # each draft sees the anchor and itself, not the drafts before it
            n = cu_verify[1:] - cu_verify[:-1]
            total = int(cu_verify[-1])
            req = torch.repeat_interleave(torch.arange(n.numel()), n.long())
            local = torch.arange(total) - cu_verify[:-1].long()[req]
            mask = torch.zeros(q.shape[0], 1, dtype=torch.int32)
            mask[:total, 0] = (1 | (1 << local)).to(torch.int32)
            kw["tree_mask"] = mask
        elif bug == "window_off_by_one":  # the oldest key of the window dropped
            kw["window"] = kw["window"] - 1
        out = real(q, k_cache, v_cache, page_table, kv_lens, cu_verify, **kw)
        if bug == "nan_row":
            out[int(cu_verify[-1]) - 1] = float("nan")
        return out

    return wrong


@pytest.mark.parametrize("bug", ["no_window", "page_order", "scale", "star_mask", "window_off_by_one"])
def test_sequential_check_catches_a_wrong_verify_attention(bug, monkeypatch):
    monkeypatch.setattr(demo, "verify_attention", _mutant(bug))
    res = _small_run(_small_target())
    assert res.max_logit_diff > 100 * demo.LOGIT_TOL


def test_nan_from_the_verify_pass_fails_the_check(monkeypatch):
    """On CUDA the sampler does not scan its inputs for NaN (debug mode only);
    the comparison must not let a NaN row through either."""
    monkeypatch.setattr(demo, "verify_attention", _mutant("nan_row"))
    from dspark_kernels.engine import round as round_mod

    real_sample = round_mod.rejection_sample
    monkeypatch.setattr(round_mod, "rejection_sample",
                        lambda logits, *a, **k: real_sample(logits.nan_to_num(), *a, **k))
    res = _small_run(_small_target())
    assert not res.max_logit_diff <= demo.LOGIT_TOL


def test_demo_fails_when_verify_attention_is_wrong(monkeypatch, capsys):
    monkeypatch.setattr(demo, "verify_attention", _mutant("page_order"))
    assert demo.main(["--rounds", "6", "--sched-rounds", "3", "--requests", "8"]) == 1
    lines = [line for line in capsys.readouterr().out.splitlines() if "Δ logit" in line]
    assert lines and all("FAIL" in line for line in lines)


def test_paged_cache_pages_are_shuffled_and_disjoint():
    cache = demo.PagedKVCache(requests=5, max_len=23, kv_heads=2, head_dim=8,
                              generator=torch.Generator().manual_seed(0))
    ids = cache.page_table.flatten()
    assert cache.page_table.shape == (5, 6) and ids.unique().numel() == ids.numel()
    assert not torch.equal(ids, ids.sort().values)  # not handed out in order


# ---------------------------------------------------------------------------
# The losslessness check.
# ---------------------------------------------------------------------------


def _pearson(counts, probs, min_expected=5.0):
    """The plain Pearson statistic with the same bin merging (first-order chain)."""
    stat, dof = 0.0, 0
    for prev in range(counts.shape[0]):
        n = float(counts[prev].sum())
        if n == 0:
            continue
        e, o = probs[prev].double() * n, counts[prev].double()
        big = e >= min_expected
        e = torch.cat([e[big], e[~big].sum().reshape(1)])
        o = torch.cat([o[big], o[~big].sum().reshape(1)])
        keep = e > 0
        e, o = e[keep], o[keep]
        if e.numel() >= 2:
            stat += float(((o - e) ** 2 / e).sum())
            dof += e.numel() - 1
    return stat, dof


def test_transition_check_rejects_a_wrong_chain():
    target = demo.SyntheticTarget(vocab=16, rank=8, temperature=1.0, seed=1)
    g = torch.Generator().manual_seed(0)
    n = 2000
    good = torch.stack([torch.bincount(torch.multinomial(target.probs[i], n, True, generator=g), minlength=16)
                        for i in range(16)])
    assert demo.transition_test(good, target.probs)[2] > 1e-3
    skewed = torch.softmax(target.logits / 1.3, dim=-1)  # a slightly cooler chain
    bad = torch.stack([torch.bincount(torch.multinomial(skewed[i], n, True, generator=g), minlength=16)
                       for i in range(16)])
    assert demo.transition_test(bad, target.probs)[2] < 1e-6


def test_conditional_form_is_pearson_for_a_chain():
    """With equal conditionals the covariance-weighted statistic is exactly
    Pearson's, through either way of giving the target."""
    target = demo.SyntheticTarget(vocab=16, rank=8, temperature=1.0, seed=1)
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 400, (16,), generator=g)
    counts = torch.stack([torch.bincount(torch.multinomial(target.probs[i], int(sizes[i]) + 1, True, generator=g),
                                         minlength=16) for i in range(16)])
    n = counts.sum(1).double()
    p = target.probs.double()
    p = p / p.sum(1, keepdim=True)  # the identity needs rows summing to 1 beyond fp32 rounding
    stat, dof, _ = demo.transition_test(counts, p)
    ref_stat, ref_dof = _pearson(counts, p)
    assert dof == ref_dof and stat == pytest.approx(ref_stat, rel=1e-9)
    stat2, dof2, _ = demo.transition_test(counts, expected=p * n[:, None],
                                          outer=n[:, None, None] * p[:, :, None] * p[:, None, :])
    assert dof2 == ref_dof and stat2 == pytest.approx(ref_stat, rel=1e-9)


def _sample_text(target, requests, length, temperature, seed):
    """Sample from the context-dependent target at `temperature`, token by
    token; return counts and the true (T = target.temperature) conditionals."""
    vocab = target.logits.shape[0]
    g = torch.Generator().manual_seed(seed)
    history = torch.full((requests, length), -1, dtype=torch.int64)
    tok = torch.randint(0, vocab, (requests,), generator=g)
    no_drafts = torch.empty(requests, 0, dtype=torch.int64)
    zero = torch.zeros(requests, dtype=torch.int32)
    counts = torch.zeros(vocab, vocab, dtype=torch.int64)
    expected = torch.zeros(vocab, vocab, dtype=torch.float64)
    outer = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    for t in range(length):
        logits = target.sequential_logits(history, tok, no_drafts, zero, zero + t)[:, 0]
        p = torch.softmax(logits.double() / target.temperature, dim=-1)
        nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=g)[:, 0]
        counts.index_put_((tok, nxt), torch.ones_like(nxt), accumulate=True)
        expected.index_add_(0, tok, p)
        outer.index_add_(0, tok, p[:, :, None] * p[:, None, :])
        tok = nxt
    return counts, expected, outer


def test_transition_check_is_exact_for_the_context_dependent_target():
    """Text drawn from the target's true conditionals passes; text drawn a
    little cooler fails; and the context really matters (the chain alone as
    the hypothesis is rejected for text from the full target)."""
    target = demo.SyntheticTarget(vocab=16, rank=8, temperature=1.0, seed=1)
    target.layer.strength = 0.3  # a strong correction, so that ignoring it is detectable here
    counts, expected, outer = _sample_text(target, requests=64, length=300, temperature=1.0, seed=0)
    assert demo.transition_test(counts, expected=expected, outer=outer)[2] > 1e-3
    assert demo.transition_test(counts, target.probs)[2] < 1e-6
    counts, expected, outer = _sample_text(target, requests=64, length=300, temperature=1.3, seed=1)
    assert demo.transition_test(counts, expected=expected, outer=outer)[2] < 1e-6


def test_transition_check_needs_one_form_of_the_target():
    counts = torch.zeros(4, 4, dtype=torch.int64)
    with pytest.raises(ValueError):
        demo.transition_test(counts)
    with pytest.raises(ValueError):
        demo.transition_test(counts, torch.full((4, 4), 0.25), expected=torch.zeros(4, 4))
