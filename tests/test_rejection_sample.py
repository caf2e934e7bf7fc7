"""dspark::rejection_sample is lossless and deterministic.

The statistical tests drive a toy autoregressive "target model" and "drafter"
over a small vocabulary (ChainModel, tests/rejection_model.py): every prefix of tokens is a state
with its own target logits and draft distribution, so target row j of a
request really is the target's prediction after drafts 1..j, and the drafts
are themselves sampled from q (torch.multinomial with a fixed generator).
Each Monte Carlo run is ONE vectorised op call on R identical requests with
seeds 0..R-1, and the emitted tokens are compared with

- the theory: the first emitted token follows p_0; among requests that
  accepted draft 1 (= a), the next emitted token follows p_1(.|a), with
  P(accept draft 1 = a) = min(p_0(a), q_1(a)); the acceptance rate of draft 1
  is sum_x min(p_0(x), q_1(x)); and the emitted block, completed to a fixed
  length by sampling the target, follows the target's joint distribution;
- a brute-force enumeration (python loops over the tree of outcomes) of the
  exact distribution of the whole emitted block under rejection sampling.

Expected target distributions come from rejection_model.expected_probs, an independent
implementation of the temperature / top-k / top-p semantics documented in the
module docstring of dspark_kernels/reference/sampling.py (pairwise
comparisons instead of sorting). A deliberately biased copy of the algorithm
(tests/biased.py) shows that the same checks reject a sampler that is not
lossless. Bad input and device mismatches: tests/test_validation.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import rejection_sample as rs_op

from biased import biased_rejection_sample
from rejection_model import Cfg, ChainModel, check_lossless, cu_from_lengths, expected_probs, random_batch
from stats import ALPHA, assert_follows, assert_rate, chi2_test, counts_of
from support import available_backends, interpreted as _interpreted, to_device

BACKENDS = available_backends(rs_op)


# Monte Carlo and the other large tests run on compiled backends only; an
# interpreted backend is held to token-for-token equality with the reference
# on small batches (test_backend_matches_reference_exactly), which carries the
# reference's statistical guarantees over to it.
MC_BACKENDS = [b for b in BACKENDS if not _interpreted(b)]
OTHER_BACKENDS = [b for b in BACKENDS if b != "reference"]

MC_R = 100_000  # Monte Carlo requests per statistical test (one op call)


# ---------------------------------------------------------------------------
# Calling the op
# ---------------------------------------------------------------------------


def call(backend, target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed,
         offset=0, *, check=True, **kw):
    """Run the public op on DEVICE, return CPU (tokens, num_accepted); check the output structure."""
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor(offset, dtype=torch.int64)
    tokens, n_acc = dk.rejection_sample(
        *(to_device(t) for t in (target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed,
                                 offset)),
        backend=backend, **{k: to_device(v) for k, v in kw.items()},
    )
    tokens, n_acc = tokens.cpu(), n_acc.cpu()
    if check:
        check_structure(tokens, n_acc, draft_tokens, lengths, cu_verify, target_logits.shape[1])
    return tokens, n_acc


def check_structure(tokens, n_acc, draft_tokens, lengths, cu_verify, vocab):
    """Output layout: accepted drafts, one emitted token in [0, V), then -1 padding."""
    R, gamma = draft_tokens.shape
    assert tokens.dtype == torch.int32 and tokens.shape == (R, gamma + 1)
    assert n_acc.dtype == torch.int32 and n_acc.shape == (R,)
    if R == 0:
        return
    assert int(tokens.min()) >= -1 and int(tokens.max()) < vocab, "token id out of [-1, V)"
    lengths = lengths.cpu().long()
    cu = cu_verify.cpu().long()
    active = (cu[1:] - cu[:-1]) > 0
    n = n_acc.long()
    assert bool(((n >= 0) & (n <= lengths)).all()), "num_accepted outside [0, lengths]"
    pos = torch.arange(gamma + 1)
    drafts = draft_tokens.cpu().long()
    accepted = pos[None, :gamma] < n[:, None]
    assert torch.equal(tokens[:, :gamma].long()[accepted], drafts[accepted]), "accepted tokens must be the drafts"
    last = tokens.long().gather(1, n[:, None]).squeeze(1)
    assert bool(((last[active] >= 0) & (last[active] < vocab)).all()), "the emitted token must be in [0, V)"
    assert bool((tokens[pos[None, :] > n[:, None]] == -1).all()), "positions past num_accepted must be -1"
    assert bool((tokens[~active] == -1).all()) and bool((n[~active] == 0).all()), "inactive requests emit nothing"


ENUM_CASES = [
    Cfg(V=6, gamma=2, L=0, seed=1),
    Cfg(V=6, gamma=1, L=1, seed=2),
    Cfg(V=2, gamma=3, L=3, seed=3),
    Cfg(V=5, gamma=3, L=2, T=0.5, top_k=3, seed=4),
    Cfg(V=5, gamma=3, L=3, T=2.0, top_p=0.8, seed=5),
    Cfg(V=4, gamma=4, L=4, T=1.0, top_k=3, top_p=0.9, seed=6),
    Cfg(V=6, gamma=2, L=2, mode="onehot", seed=7),
    Cfg(V=4, gamma=5, L=4, T=0.5, mode="onehot", seed=8),
    Cfg(V=5, gamma=3, L=3, mode="logits", draft_T=0.7, seed=9),
    Cfg(V=5, gamma=2, L=2, T=2.0, mode="logits", draft_T=None, top_k=4, seed=10),
    Cfg(V=5, gamma=2, L=2, T=1.0, mode="logits", draft_T=0.0, seed=11),
]


def _case_id(c: Cfg):
    s = f"{c.mode}-V{c.V}-g{c.gamma}-L{c.L}-T{c.T}"
    if c.top_k is not None:
        s += f"-k{c.top_k}"
    if c.top_p is not None:
        s += f"-p{c.top_p}"
    if c.mode == "logits":
        s += f"-Td{c.draft_T}"
    return s


def test_enumeration_matches_theory():
    """The brute-force enumerator itself: the rejection-sampling math is lossless."""
    for cfg in ENUM_CASES:
        model = ChainModel(cfg)
        table = model.enumerate_outcomes(cfg.L)
        assert abs(sum(table.values()) - 1.0) < 1e-9
        first = torch.zeros(cfg.V, dtype=torch.float64)
        for seq, prob in table.items():
            first[seq[0]] += prob
        assert torch.allclose(first, model.p[0], atol=1e-9), _case_id(cfg)
        dist = model.accepted_count_dist(cfg.L)
        by_len = [0.0] * (cfg.L + 1)
        for seq, prob in table.items():
            by_len[len(seq) - 1] += prob
        assert all(abs(a - b) < 1e-9 for a, b in zip(dist, by_len)), _case_id(cfg)


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("cfg", ENUM_CASES, ids=_case_id)
def test_lossless_against_exact_enumeration(backend, cfg):
    model = ChainModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    args, kw = model.inputs(MC_R, gen)
    tokens, n_acc = call(backend, *args, offset=cfg.seed, **kw)
    if cfg.L and (cfg.mode == "onehot" or (cfg.mode == "logits" and cfg.draft_T == 0)):
        assert bool((args[1][:, 0] == args[1][0, 0]).all())  # a point-mass drafter
    check_lossless(model, tokens, n_acc, gen)


# ---------------------------------------------------------------------------
# The harness can fail: a deliberately biased copy of the algorithm
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bug", [None, "residual_is_target", "ratio_inverted", "shared_coin", "bonus_off_by_one"])
def test_harness_rejects_biased_sampler(bug):
    cfg = Cfg(V=5, gamma=2, L=2, T=1.0, seed=21)
    model = ChainModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    args, kw = model.inputs(MC_R, gen)
    assert not kw
    tokens, n_acc = biased_rejection_sample(bug, *args, offset=3)
    if bug is None:
        check_lossless(model, tokens, n_acc, gen)  # the copy is right when nothing is planted
    else:
        with pytest.raises(AssertionError, match="chi-square|observed rate|probability 0|impossible"):
            check_lossless(model, tokens, n_acc, gen)


def test_harness_rejects_biased_first_token():
    """The first-token check alone catches the three bugs that bias the first token."""
    cfg = Cfg(V=5, gamma=2, L=2, T=1.0, seed=22)
    model = ChainModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    args, _ = model.inputs(MC_R, gen)
    for bug in ["residual_is_target", "ratio_inverted", "shared_coin"]:
        tokens, _ = biased_rejection_sample(bug, *args, offset=4)
        result = chi2_test(counts_of(tokens[:, 0], cfg.V), model.p[0])
        assert result.p_value < ALPHA, (bug, result.p_value)
        with pytest.raises(AssertionError, match="first"):
            assert_follows(counts_of(tokens[:, 0], cfg.V), model.p[0], ALPHA, what="first token")


# ---------------------------------------------------------------------------
# Long chains, mixed lengths, greedy rows, filters
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("gamma", [1, 5, 7, 16])
def test_long_chains(backend, gamma):
    """γ up to 16 on a Markov target/drafter: first token, P(num_accepted = j) exactly,
    the last emitted token's position-wise marginals after completion."""
    cfg = Cfg(V=4, gamma=gamma, L=gamma, T=1.0, markov=True, seed=30 + gamma)
    model = ChainModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    R = MC_R if gamma <= 7 else MC_R // 2
    args, kw = model.inputs(R, gen)
    tokens, n_acc = call(backend, *args, offset=gamma, **kw)
    assert_follows(counts_of(tokens[:, 0], cfg.V), model.p[0], ALPHA, what="first token")
    assert_follows(counts_of(n_acc, gamma + 1), torch.tensor(model.accepted_count_dist(gamma)), ALPHA,
                   what="num_accepted vs exact")
    seq = model.complete(tokens, n_acc, gamma + 1, gen)
    marginal = model.p[0]
    transition = model.p[1:]  # row 1 + a: next-token distribution after token a
    for k in range(gamma + 1):
        if k > 0:
            marginal = marginal @ transition
        assert_follows(counts_of(seq[:, k], cfg.V), marginal, ALPHA, what=f"completed token {k} marginal")
    k = gamma
    pair = seq[:, k - 1] * cfg.V + seq[:, k]
    prev = model.p[0]
    for _ in range(k - 1):
        prev = prev @ transition
    joint = (prev[:, None] * transition).reshape(-1)
    assert_follows(counts_of(pair, cfg.V * cfg.V), joint, ALPHA, what="last two completed tokens")


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_mixed_lengths_greedy_and_stochastic_rows(backend):
    """One batch: lengths 0..3 mixed, even rows greedy (T = 0), odd rows T = 1 with top-k."""
    cfg = Cfg(V=6, gamma=3, L=3, T=1.0, top_k=4, seed=40)
    model = ChainModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    R = MC_R
    lengths = torch.randint(0, cfg.gamma + 1, (R,), generator=gen, dtype=torch.int32)
    args, kw = model.inputs(R, gen, lengths=lengths)
    target_logits, drafts, draft_probs, lengths, cu, temperature, seed = args
    greedy = torch.arange(R) % 2 == 0
    temperature = torch.where(greedy, torch.zeros(R), temperature)
    tokens, n_acc = call(backend, target_logits, drafts, draft_probs, lengths, cu, temperature, seed, 9, **kw)

    # Greedy rows, exactly: accept while draft == argmax of the raw target row, then emit that argmax.
    pos = torch.arange(cfg.gamma + 1)
    rows = (cu[:-1].long()[:, None] + pos[None, :]).clamp(max=target_logits.shape[0] - 1)
    am = target_logits[rows].argmax(-1)  # torch.argmax: first maximal index
    match = (drafts.long() == am[:, : cfg.gamma]) & (pos[None, : cfg.gamma] < lengths.long()[:, None])
    n_exp = match.long().cumprod(-1).sum(-1)
    assert torch.equal(n_acc[greedy].long(), n_exp[greedy])
    emitted = tokens.long().gather(1, n_acc.long()[:, None]).squeeze(1)
    assert torch.equal(emitted[greedy], am[greedy].gather(1, n_exp[greedy][:, None]).squeeze(1))
    assert int(n_exp[greedy].sum()) > 0 and bool((n_exp[greedy] < lengths[greedy]).any())

    # Stochastic rows: whatever their length, the first emitted token follows p_0 (top-k 4).
    sto = ~greedy
    assert_follows(counts_of(tokens[sto, 0], cfg.V), model.p[0], ALPHA, what="first token, stochastic rows")
    with_draft = sto & (lengths > 0)
    keep = torch.minimum(model.p[0], model.q[0]).sum()
    assert_rate(int((n_acc[with_draft] >= 1).sum()), int(with_draft.sum()), float(keep), ALPHA,
                what="acceptance of draft 1")
    assert bool((n_acc[sto & (lengths == 0)] == 0).all())


def test_greedy_ties_take_first_index_and_ignore_filters():
    V = 4
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    drafts = torch.tensor([[1, 0], [2, 0]], dtype=torch.int32)  # request 0 accepts 1, then 0 == argmax row 1
    lengths = torch.tensor([2, 0], dtype=torch.int32)
    logits = torch.cat([logits, torch.tensor([[5.0, 1.0, 7.0, 7.0]])])
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    for backend in MC_BACKENDS:
        for extra in ({}, {"top_k": torch.tensor([1, 1]), "top_p": torch.tensor([0.1, 0.1])}):
            tokens, n_acc = call(backend, logits, drafts, None, lengths, cu, torch.zeros(2),
                                 torch.tensor([5, 6]), 0, **extra)
            assert tokens.tolist() == [[1, 0, 0], [2, -1, -1]]
            assert n_acc.tolist() == [2, 0]


FILTER_LOGITS = torch.tensor(
    [
        [2.0, 1.0, 1.0, 0.5, 0.5, 0.5, -1.0, 3.0],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        [1.0, -math.inf, 2.0, -math.inf, 0.0, 1.0, -math.inf, 0.5],
    ]
)
# (logits row, T, top_k, top_p): boundary ties at k, ties at the top-p boundary, disabled values
FILTER_GROUPS = [
    (0, 1.0, 0, 1.0),
    (0, 0.5, 2, 1.0),  # 3.0 and 2.0 kept
    (0, 1.0, 3, 1.0),  # k-th value 1.0 is tied: exactly 3 kept, the lower id (1) of the tie
    (0, 2.0, 8, 1.0),  # k == V: off
    (0, 1.0, -1, 1.0),  # k < 0: off
    (0, 1.0, 0, 0.6),
    (0, 1.0, 0, 0.75),
    (0, 0.7, 5, 0.5),
    (0, 1.0, 0, 1e-6),  # only the top token
    (1, 1.0, 0, 0.3),  # all tied: everything kept
    (1, 1.0, 2, 1.0),  # all tied at the k-th value: ids 0 and 1
    (1, 1.0, 1, 1.0),  # top_k = 1 is the greedy token, ties included (vLLM #5404)
    (0, 0.9, 1, 1.0),  # top_k = 1 at T > 0: always the argmax
    (2, 1.0, 0, 1.0),  # -inf logits never win
    (2, 1.0, 2, 0.9),
]


def test_expected_probs_semantics():
    """Spot checks of the independent filter implementation against hand-computed sets."""
    row = FILTER_LOGITS[0]
    support = lambda p: set(torch.nonzero(p[0] > 0).reshape(-1).tolist())
    assert support(expected_probs(row, 0.5, 2)) == {0, 7}
    assert support(expected_probs(row, 1.0, 3)) == {0, 1, 7}  # exactly 3: the tie at 1.0 goes to id 1
    assert support(expected_probs(row, 1.0, 0, 1e-6)) == {7}
    assert support(expected_probs(FILTER_LOGITS[1], 1.0, 2)) == {0, 1}
    assert support(expected_probs(FILTER_LOGITS[1], 1.0, 1)) == {0}
    p = expected_probs(row, 1.0)
    # top_p between mass(3.0) and mass(3.0, 2.0): keeps both (mass above 2.0 < top_p).
    assert support(expected_probs(row, 1.0, 0, float(p[0, 7]) + 1e-3)) == {0, 7}
    assert support(expected_probs(row, 1.0, 0, float(p[0, 7]) - 1e-3)) == {7}
    # tokens 1 and 2 are tied: keeping one keeps both.
    cut = float(p[0, 7] + p[0, 0]) + 1e-3
    assert support(expected_probs(row, 1.0, 0, cut)) == {0, 1, 2, 7}


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_temperature_top_k_top_p_per_request(backend):
    """Plain sampling (length 0: the bonus only), per-request T / top-k / top-p in one batch."""
    per = 12_000
    G = len(FILTER_GROUPS)
    R = per * G
    V = FILTER_LOGITS.shape[1]
    group = torch.arange(R) // per
    rows = torch.tensor([g[0] for g in FILTER_GROUPS])[group]
    T = torch.tensor([g[1] for g in FILTER_GROUPS])[group]
    top_k = torch.tensor([g[2] for g in FILTER_GROUPS], dtype=torch.int32)[group]
    top_p = torch.tensor([g[3] for g in FILTER_GROUPS])[group]
    lengths = torch.zeros(R, dtype=torch.int32)
    drafts = torch.zeros(R, 2, dtype=torch.int32)
    tokens, n_acc = call(backend, FILTER_LOGITS[rows], drafts, None, lengths, cu_from_lengths(lengths), T,
                         torch.arange(R, dtype=torch.int64), 17, top_k=top_k, top_p=top_p)
    assert bool((n_acc == 0).all())
    for gi, (row, t, k, p) in enumerate(FILTER_GROUPS):
        expected = expected_probs(FILTER_LOGITS[row], t, k, p)[0]
        assert_follows(counts_of(tokens[group == gi, 0], V), expected, ALPHA,
                       what=f"row {row}, T={t}, top_k={k}, top_p={p}")


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_gamma_zero_is_plain_sampling(backend):
    V, R = 5, 50_000
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.0, 1.1]])
    lengths = torch.zeros(R, dtype=torch.int32)
    cu = cu_from_lengths(lengths)
    for mode in ("onehot", "probs", "logits"):
        kw = {}
        dp = torch.zeros(R, 0, V) if mode == "probs" else None
        if mode == "logits":
            kw = dict(draft_logits=torch.zeros(R, 0, V), draft_token_probs=torch.zeros(R, 0))
        tokens, n_acc = call(backend, logits.expand(R, V), torch.zeros(R, 0, dtype=torch.int32), dp, lengths, cu,
                             torch.full((R,), 1.5), torch.arange(R, dtype=torch.int64), 1, **kw)
        assert tokens.shape == (R, 1)
        assert_follows(counts_of(tokens[:, 0], V), expected_probs(logits, 1.5)[0], ALPHA, what=f"gamma=0 {mode}")


# ---------------------------------------------------------------------------
# Determinism, seeds, offsets, batch invariance
# ---------------------------------------------------------------------------


def _slice_request(args, kw, i):
    target_logits, drafts, probs, lengths, cu, T, seeds = args
    a, b = int(cu[i]), int(cu[i + 1])
    one = [target_logits[a:b], drafts[i : i + 1], None if probs is None else probs[i : i + 1],
           lengths[i : i + 1], torch.tensor([0, b - a], dtype=torch.int32), T[i : i + 1], seeds[i : i + 1]]
    return one, {k: v[i : i + 1] for k, v in kw.items()}


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("mode", ["probs", "onehot", "logits"])
def test_deterministic_and_offset_sensitive(backend, mode):
    args, kw = random_batch(R=4000, seed=1, mode=mode)
    a = call(backend, *args, 123, **kw)
    b = call(backend, *args, 123, **kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    stochastic = args[5] > 0
    for other in (124, 123 + 2**32, 2**40):
        c = call(backend, *args, other, **kw)
        differ = (c[0] != a[0]).any(1)
        assert float(differ[stochastic].float().mean()) > 0.25, other
        assert not bool(differ[~stochastic].any()), "greedy rows do not depend on the offset"


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_batch_invariance_and_per_request_seeds(backend):
    args, kw = random_batch(R=48, seed=2)
    tokens, n_acc = call(backend, *args, 7, **kw)
    for i in range(48):
        one, one_kw = _slice_request(args, kw, i)
        t1, n1 = call(backend, *one, 7, **one_kw)
        assert torch.equal(t1[0], tokens[i]) and int(n1[0]) == int(n_acc[i]), i
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    pargs = list(args)
    parts = [_slice_request(args, kw, int(i)) for i in perm]
    pargs[0] = torch.cat([p[0][0] for p in parts])
    for j in (1, 3, 5, 6):
        pargs[j] = args[j][perm]
    pargs[2] = args[2][perm]
    pargs[4] = cu_from_lengths(pargs[3])
    pkw = {k: v[perm] for k, v in kw.items()}
    pt, pn = call(backend, *pargs, 7, **pkw)
    assert torch.equal(pt, tokens[perm]) and torch.equal(pn, n_acc[perm])


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_seeds_and_offsets_give_independent_draws(backend):
    """Identical requests (same fixed draft x): equal seeds -> equal draws; seeds 2i and
    2i+1 (and offsets o, o+1) give independent draws: the pair of first tokens follows
    d x d, d the law of the first token given the draft x."""
    cfg = Cfg(V=6, gamma=1, L=1, T=1.0, seed=50)
    model = ChainModel(cfg)
    R = 60_000
    gen = torch.Generator().manual_seed(cfg.seed)
    args, kw = model.inputs(R, gen)
    drafts = args[1][:1].expand(R, 1).contiguous()  # every request drafts the same token
    target = args[0].reshape(R, 2, cfg.V)[:1].expand(R, 2, cfg.V).reshape(2 * R, cfg.V)
    probs = args[2][:1].expand(R, 1, cfg.V)
    base = [target, drafts, probs, *args[3:6]]
    dup = torch.arange(R, dtype=torch.int64) // 2  # pairs share a seed
    t_dup, _ = call(backend, *base, dup, 0)
    assert torch.equal(t_dup[0::2], t_dup[1::2])
    t0, _ = call(backend, *base, torch.arange(R, dtype=torch.int64), 0)
    t1, _ = call(backend, *base, torch.arange(R, dtype=torch.int64), 1)
    # The draft is fixed to x, so the first token follows the law given x:
    # x with probability a = min(1, p(x)/q(x)), else the normalised residual.
    x = int(drafts[0, 0])
    p, q = model.p[0], model.q[0]
    a = min(1.0, float(p[x] / q[x]))
    resid = (p - q).clamp_min(0)
    p0 = (1 - a) * resid / resid.sum()
    p0[x] += a
    outer = (p0[:, None] * p0[None, :]).reshape(-1)
    V = cfg.V
    assert_follows(counts_of(t0[0::2, 0].long() * V + t0[1::2, 0].long(), V * V), outer, ALPHA,
                   what="seeds 2i, 2i+1")
    assert_follows(counts_of(t0[:, 0].long() * V + t1[:, 0].long(), V * V), outer, ALPHA, what="offsets 0, 1")
    assert_follows(counts_of(t1[:, 0], V), p0, ALPHA, what="offset 1 first token")
    assert float((t0 != t1).any(1).float().mean()) > 0.3
    hi = torch.arange(R, dtype=torch.int64) + 2**32  # seeds differing only in the high word
    t_hi, _ = call(backend, *base, hi, 0)
    assert float((t_hi != t0).any(1).float().mean()) > 0.3


# ---------------------------------------------------------------------------
# Odd sizes and layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_temperature_is_greedy(backend):
    """T < 1e-5 (GREEDY_TEMPERATURE) behaves exactly as T = 0, for target and draft
    temperatures: at 1e-39 the division z / T would overflow fp32 and tie every lane."""
    cfg = Cfg(V=7, gamma=3, L=3, T=1.0, mode="logits", seed=80)
    model = ChainModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    args, kw = model.inputs(12, gen)
    args = list(args)
    outs = []
    for t in (0.0, 1e-39, 9e-6):
        args[5] = torch.full((12,), t)
        # A greedy draft row's draft_token_probs are 1 (consistent inputs; the value checks insist).
        kw_t = dict(kw, draft_temperature=torch.full((12,), t))
        if kw_t.get("draft_token_probs") is not None:
            kw_t["draft_token_probs"] = torch.ones_like(kw_t["draft_token_probs"])
        outs.append(call(backend, *args, **kw_t))
    for tokens, n_acc in outs[1:]:
        assert torch.equal(tokens, outs[0][0]) and torch.equal(n_acc, outs[0][1])


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_vocab_of_one(backend):
    R, gamma = 5, 3
    lengths = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)
    cu = cu_from_lengths(lengths)
    logits = torch.randn(int(cu[-1]), 1)
    drafts = torch.zeros(R, gamma, dtype=torch.int32)
    T = torch.tensor([1.0, 0.0, 2.0, 0.5, 1.0])
    seed = torch.arange(R, dtype=torch.int64)
    expected = torch.full((R, gamma + 1), -1, dtype=torch.int32)
    for i, l in enumerate(lengths.tolist()):
        expected[i, : l + 1] = 0
    for probs, kw in ((None, {}), (torch.ones(R, gamma, 1), {}),
                      (None, dict(draft_logits=torch.randn(R, gamma, 1), draft_token_probs=torch.ones(R, gamma)))):
        tokens, n_acc = call(backend, logits, drafts, probs, lengths, cu, T, seed, 0, **kw)
        assert torch.equal(tokens, expected) and torch.equal(n_acc, lengths)


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_vocab_257(backend):
    """V = 257 (one lane past a power of two); heavy mass on the last lane."""
    cfg = Cfg(V=257, gamma=2, L=2, T=1.0, markov=True, seed=60)
    model = ChainModel(cfg)
    boost = torch.zeros(257)
    boost[256] = 4.0
    boost[255] = 2.0
    model.target_logits = model.target_logits + boost
    model.p = expected_probs(model.target_logits, cfg.T)
    gen = torch.Generator().manual_seed(cfg.seed)
    R = 4000
    args, kw = model.inputs(R, gen)
    tokens, n_acc = call(backend, *args, 5, **kw)
    assert_follows(counts_of(tokens[:, 0], 257), model.p[0], ALPHA, what="first token, V=257")
    keep = torch.minimum(model.p[0], model.q[0]).sum()
    assert_rate(int((n_acc >= 1).sum()), R, float(keep), ALPHA, what="acceptance, V=257")
    assert int((tokens == 256).sum()) > 0


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("V", [1001, 3 * 5 * 7 * 11])
def test_no_token_id_at_or_above_vocab(backend, V):
    """All mass on the last vocab lanes: residual and bonus draws stay below V."""
    R, gamma = 400, 3
    g = torch.Generator().manual_seed(V)
    lengths = torch.randint(0, gamma + 1, (R,), generator=g, dtype=torch.int32)
    cu = cu_from_lengths(lengths)
    logits = torch.randn(int(cu[-1]), V, generator=g)
    logits[:, -3:] += 12.0
    q = torch.softmax(torch.randn(R, gamma, V, generator=g), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(R, gamma)
    tokens, n_acc = call(backend, logits, drafts, q, lengths, cu, torch.full((R,), 1.0),
                         torch.arange(R, dtype=torch.int64), 0)
    assert int(tokens.max()) < V and int(tokens.min()) >= -1
    emitted = tokens.long().gather(1, n_acc.long()[:, None]).squeeze(1)
    assert float((emitted >= V - 3).float().mean()) > 0.95


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("V", [129280, 151936])
def test_real_vocab_sizes(backend, V):
    R, gamma = 2, 3
    lengths = torch.tensor([3, 3], dtype=torch.int32)
    cu = cu_from_lengths(lengths)
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(8, V, generator=g)
    # Request 0, greedy: argmaxes planted at 7, V - 2, V - 1, V - 3; drafts 7, V - 2, 5.
    for row, tok in enumerate([7, V - 2, V - 1, V - 3]):
        logits[row, tok] = 20.0
    # Request 1, T = 1, top-k 3: rows 4..7 keep {V-3, V-2, V-1} only; one-hot drafts V-1.
    logits[4:, V - 3 :] = torch.tensor([9.0, 9.5, 10.0])
    drafts = torch.tensor([[7, V - 2, 5], [V - 1, V - 1, V - 1]], dtype=torch.int32)
    T = torch.tensor([0.0, 1.0])
    top_k = torch.tensor([0, 3], dtype=torch.int32)
    for offset in range(2):
        tokens, n_acc = call(backend, logits, drafts, None, lengths, cu, T, torch.tensor([11, 12]), offset,
                             top_k=top_k)
        assert tokens[0].tolist() == [7, V - 2, V - 1, -1] and int(n_acc[0]) == 2
        n = int(n_acc[1])
        last = int(tokens[1, n])
        assert V - 3 <= last < V
        if n < 3:
            assert last != V - 1  # one-hot residual: the rejected draft has no mass
    # The same at bf16 (the real dtype of target logits).
    tokens, n_acc = call(backend, logits.bfloat16(), drafts, None, lengths, cu, T, torch.tensor([11, 12]), 0,
                         top_k=top_k)
    assert tokens[0].tolist() == [7, V - 2, V - 1, -1]


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_single_and_empty_batches(backend):
    V = 9
    logits = torch.tensor([[0.0] * 8 + [4.0]])
    tokens, n_acc = call(backend, logits, torch.zeros(1, 2, dtype=torch.int32), None,
                         torch.tensor([0], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                         torch.tensor([0.0]), torch.tensor([3]), 0)
    assert tokens.tolist() == [[8, -1, -1]] and n_acc.tolist() == [0]
    tokens, n_acc = call(backend, torch.zeros(0, V), torch.zeros(0, 3, dtype=torch.int32), None,
                         torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                         torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0)
    assert tokens.shape == (0, 4) and n_acc.shape == (0,)


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_inactive_requests_emit_nothing(backend):
    """cu_verify growing by 0 marks an inactive request: all -1, num_accepted 0,
    and its neighbours are unaffected."""
    args, kw = random_batch(R=12, seed=4)
    target_logits, drafts, probs, lengths, cu, T, seeds = args
    ref_tokens, ref_n = call(backend, *args, 2, **kw)
    inactive = torch.tensor([0, 5, 11])
    rows_per = (lengths.long() + 1).clone()
    rows_per[inactive] = 0
    cu2 = torch.zeros(13, dtype=torch.int32)
    cu2[1:] = torch.cumsum(rows_per, 0)
    keep_rows = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in range(12) if i not in inactive.tolist()])
    tokens, n_acc = call(backend, target_logits[keep_rows], drafts, probs, lengths, cu2, T, seeds, 2, **kw)
    active = torch.ones(12, dtype=torch.bool)
    active[inactive] = False
    assert bool((tokens[~active] == -1).all()) and bool((n_acc[~active] == 0).all())
    assert torch.equal(tokens[active], ref_tokens[active]) and torch.equal(n_acc[active], ref_n[active])


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_padding_rows_and_padded_drafts_are_ignored(backend):
    """Rows past cu_verify[R] (NaN here) and draft entries past lengths (-1 / huge) are never used."""
    args, kw = random_batch(R=40, seed=5)
    target_logits, drafts, probs, lengths, cu, T, seeds = args
    ref = call(backend, *args, 8, **kw)
    padded = torch.cat([target_logits, torch.full((13, target_logits.shape[1]), math.nan)])
    out = call(backend, padded, *args[1:], 8, **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    dead = torch.arange(drafts.shape[1])[None, :] >= lengths.long()[:, None]
    for fill in (-1, 10**6):
        d2 = drafts.clone()
        d2[dead] = fill
        out = call(backend, target_logits, d2, *args[2:], 8, **kw)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("mode", ["probs", "logits"])
def test_non_contiguous_inputs(backend, mode):
    args, kw = random_batch(R=30, seed=6, mode=mode)
    target_logits, drafts, probs, lengths, cu, T, seeds = args
    ref = call(backend, *args, 9, **kw)

    def strided(t):  # same values, every other element of a larger buffer
        buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]) if t.dim() else (2,), dtype=t.dtype)
        buf[..., ::2] = t
        out = buf[..., ::2]
        assert not out.is_contiguous() or out.numel() <= 1
        return out

    tl = target_logits.t().contiguous().t()  # transposed view
    assert not tl.is_contiguous()
    nc = [tl, strided(drafts), None if probs is None else probs.transpose(0, 1).contiguous().transpose(0, 1),
          strided(lengths), strided(cu), strided(T), strided(seeds)]
    nkw = {k: (v.transpose(0, 1).contiguous().transpose(0, 1) if v.dim() == 3 else strided(v)) for k, v in kw.items()}
    offset = torch.tensor([0, 9], dtype=torch.int64)[1:]  # a one-element view
    out = call(backend, *nc, offset, **nkw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    # Broadcast (stride 0) temperature.
    one_t = call(backend, *args[:5], torch.tensor(1.0).expand(30), seeds, 9, **kw)
    ref_t = call(backend, *args[:5], torch.ones(30), seeds, 9, **kw)
    assert torch.equal(one_t[0], ref_t[0])


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_input_dtypes(backend):
    """bf16/fp16 logits and probs are read in fp32; int32/int64 ids, fp64 parameters."""
    args, kw = random_batch(R=50, seed=7)
    target_logits, drafts, probs, lengths, cu, T, seeds = args
    for dt in (torch.bfloat16, torch.float16):
        low = target_logits.to(dt)
        a = call(backend, low, *args[1:], 4, **kw)
        b = call(backend, low.float(), *args[1:], 4, **kw)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), dt
        lp = probs.to(dt)
        a = call(backend, target_logits, drafts, lp, *args[3:], 4, **kw)
        b = call(backend, target_logits, drafts, lp.float(), *args[3:], 4, **kw)
        assert torch.equal(a[0], b[0]), dt
    ref = call(backend, *args, 4, **kw)
    wide = [target_logits, drafts.long(), probs, lengths.long(), cu.long(), T.double(), seeds]
    wkw = dict(top_k=kw["top_k"].long(), top_p=kw["top_p"].double())
    out = call(backend, *wide, 4, **wkw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("mode", ["probs", "onehot", "logits"])
def test_backend_matches_reference_exactly(backend, mode):
    """Same seeds, same tokens on every backend (counter-based RNG): mixed lengths,
    greedy and stochastic rows, top-k / top-p, an odd vocabulary past one tile."""
    if _interpreted(backend):
        args, kw = random_batch(R=4, V=1031, gamma=3, seed=8, mode=mode)  # interpreter: keep it tiny
    else:
        args, kw = random_batch(R=300, V=1031, gamma=5, seed=8, mode=mode)
    ref = call("reference", *args, 2**33 + 1, **kw)
    out = call(backend, *args, 2**33 + 1, **kw)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# ---------------------------------------------------------------------------
# Every path of the compiled backends' top-k / top-p selection against the reference
# ---------------------------------------------------------------------------


def _filter_case(name):
    """(logits [R, V], top_k [R] or None, top_p [R] or None): each exercises one selection path."""
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    R = 24
    if name == "topk_ties_slow":  # more than CAP tokens tied at the k-th value: the bisection path
        logits = torch.zeros(R, 5000)
        logits[:, ::7] = 1.0
        return logits, torch.full((R,), 900), None
    if name == "topp_ties_slow":  # the boundary inside a bin of 5000 tied tokens (> CAP): the bisection path
        logits = torch.zeros(R, 7503)
        logits[:, :3] = 5.0
        logits[:, 3:5003] = 1.0  # kept whole (ties by probability stay together); the 0.0 tail is dropped
        return logits, None, torch.full((R,), 0.6)
    if name == "topp_wide_nucleus":  # a peak plus a flat tail: thousands of tokens surely kept, candidates between
        logits = torch.randn(R, 20000, generator=g)
        logits[:, 3] += 11.0
        return logits, None, torch.full((R,), 0.9)
    if name == "topk_ties_fast":  # ties at the k-th value, few candidates
        logits = torch.randint(0, 4, (R, 3000), generator=g).float()
        return logits, torch.randint(1, 40, (R,), generator=g), None
    if name == "both":
        logits = 2.0 * torch.randn(R, 6000, generator=g)
        return logits, torch.randint(1, 1200, (R,), generator=g), torch.rand(R, generator=g) * 0.9 + 0.05
    raise ValueError(name)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("name", ["topk_ties_slow", "topp_ties_slow", "topp_wide_nucleus", "topk_ties_fast", "both"])
def test_filter_selection_paths_match_reference(backend, name):
    """The histogram / candidate / bisection paths of the compiled kernels give the reference's tokens:
    plain sampling (length 0: the bonus token) from the filtered target, every request its own seed."""
    logits, top_k, top_p = _filter_case(name)
    R, V = logits.shape
    lengths = torch.zeros(R, dtype=torch.int32)
    drafts = torch.zeros(R, 1, dtype=torch.int32)
    kw = {k: v for k, v in (("top_k", top_k), ("top_p", top_p)) if v is not None}
    args = (logits, drafts, None, lengths, cu_from_lengths(lengths), torch.full((R,), 0.8),
            torch.arange(R, dtype=torch.int64) + 5, 3)
    want, _ = call("reference", *args, **kw)
    got, _ = call(backend, *args, **kw)
    assert torch.equal(got, want), (got[:, 0], want[:, 0])
    # The draws come from the filtered set, and the filter really removed tokens (the case is not vacuous).
    from dspark_kernels.reference.sampling import filtered_probs

    probs = filtered_probs(logits, torch.full((R,), 0.8), top_k, top_p)
    assert bool((probs.gather(1, want[:, :1].long()) > 0).all())
    assert bool(((probs == 0).sum(1) > 0).all())


@pytest.mark.parametrize("backend", [b for b in OTHER_BACKENDS if b == "triton"])
@pytest.mark.parametrize("mode", ["onehot", "probs", "logits"])
def test_three_launches_and_no_torch_op_in_the_launcher(backend, mode):
    """Row statistics, the sliced race, the merge: 3 launches per call, whatever the filters; the
    launcher runs no torch op on the inputs (rows are mapped to requests in the kernels)."""
    from host_sync import HostSyncSpy

    from support import count_launches

    args, kw = random_batch(R=5, V=300, gamma=3, seed=2, mode=mode)
    names7 = ["target_logits", "draft_tokens", "draft_probs", "lengths", "cu_verify", "temperature", "seed"]
    x = {k: to_device(v) for k, v in dict(zip(names7, args), offset=torch.tensor(0), **kw).items()}
    for filters in (False, True):
        rec = rs_op.OP.record(**{k: v for k, v in x.items() if filters or k not in ("top_k", "top_p")})
        with count_launches() as names, HostSyncSpy() as spy:
            rs_op.OP.run(backend, rec)
        assert names == ["_row_kernel", "_race_kernel", "_merge_kernel"], names
        # Allocation and views only (the interpreter adds its own host copies: copy_, set_).
        # (Metadata only: views; a dtype view of the workspace dispatches as detach + view.)
        allowed = ("aten.empty.", "aten.new_empty.", "aten.unsqueeze.", "aten.view.", "aten.select.", "aten.slice.",
                   "aten.detach.")
        if _interpreted(backend):
            allowed += ("aten.copy_.", "aten.set_.")
        assert [op for op in spy.ops if not op.startswith(allowed)] == [], spy.ops
        assert any(op.startswith("aten.empty.") for op in spy.ops)
