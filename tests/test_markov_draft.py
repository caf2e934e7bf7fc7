"""dspark::markov_draft samples the DSpark Markov head exactly and deterministically.

Everything the op returns is checked against an independent float64
implementation of the formulas in the docstring of dspark_kernels.markov_draft
(DeepSpec semantics: w1 is the nn.Embedding [V, r], w2 the nn.Linear(r, V)
weight [V, r], so the Markov bias of token x is W2 · W1[x]):

    e_k = W1[x_{k-1}]                                   vanilla head
    e_k = σ(Wg·[h_k; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}]   gated head
    e_k = s_k = tanh(Wr·[W1[x_{k-1}]; s_{k-1}] + br)    RNN head, s_0 = 0
    z_k = U_k + W2·e_k,  x_k ~ softmax(z_k / T)  (first argmax of z_k when T = 0)
    c_k = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k),  a_k = Π_{i<=k} c_i

The float64 code (tests/markov_model.py) never calls the library's reference:
it splits the concatenations into two matmuls, works in float64 and enumerates
the whole tree of prefixes for the exact law of a block.

- Distribution (Monte Carlo): ONE op call on R requests with seeds 0..R-1 that
  share base logits and hidden states, so every request draws from the same
  law; the first token, every conditional x_k | x_1..x_{k-1} (prefixes with
  enough samples) and the joint law of the whole block are chi-square tested
  against the enumeration, per temperature group (T = 0 rows are greedy).
  A deliberately biased sampler (tests/biased.py) fed to the same check is
  rejected.
- Exact values: tokens follow the Gumbel-max contract on the DRAFT Philox
  stream; token_probs / draft_probs / draft_logits / confidence / survival
  match the float64 formulas along the sampled path; greedy equals a plain
  python DeepSpec-style loop for each head.
- Every other backend matches the reference token for token (the interpreted
  Triton backend on small shapes; Monte Carlo runs on compiled backends only).

Bad input and device mismatches: tests/test_validation.py.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import markov_draft as md_op

from biased import biased_markov_sampler
from markov_model import (
    Head,
    block_law,
    check_block,
    exact_path,
    f64,
    make_head,
    needs_hidden,
    race_margins,
    random_inputs,
    small_inputs,
    with_rnn_head,
)
from stats import ALPHA, assert_follows, counts_of
from support import available_backends, count_launches, interpreted as _interpreted, to_cpu, to_device

BACKENDS = available_backends(md_op)


# Monte Carlo and the larger tests run on the reference and compiled backends;
# an interpreted backend is held to token-for-token equality with the
# reference on small batches (test_backend_matches_reference_exactly), which
# carries the reference's statistical guarantees over to it.
MC_BACKENDS = [b for b in BACKENDS if not _interpreted(b)]
OTHER_BACKENDS = [b for b in BACKENDS if b != "reference"]

MC_R = 51_000  # Monte Carlo requests per statistical test (one op call)
# A near-tie margin: when the winner of a float64 recomputation of the race
# beats the runner-up by more than this, fp32 rounding (|error| <~ 1e-5 here)
# cannot change which token wins.
MARGIN = 1e-4

# ---------------------------------------------------------------------------
# Calling the op
# ---------------------------------------------------------------------------


def draft(backend, U, anchor, head, T, seed, offset=0, *, hidden=None, probs=False, logits=False, check=True,
          exact=True):
    """Run the public op on DEVICE and return a MarkovDraft of CPU tensors; check the output layout.
    exact=True (the token-for-token mode) unless a test is about the fast path."""
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor(offset, dtype=torch.int64)
    if not isinstance(T, torch.Tensor):
        T = torch.full((U.shape[0],), float(T))
    out = dk.markov_draft(*(to_device(t) for t in (U, anchor, head.w1, head.w2, T, seed, offset)),
                          hidden=to_device(hidden), **{k: to_device(v) for k, v in head.kwargs().items()},
                          return_draft_probs=probs, return_draft_logits=logits, exact=exact, backend=backend)
    out = dk.MarkovDraft(*(to_cpu(t) for t in out))
    if check:
        check_structure(out, U.shape, head, probs, logits)
    return out


def check_structure(out, shape, head, probs, logits):
    R, gamma, V = shape
    assert out.tokens.dtype == torch.int32 and out.tokens.shape == (R, gamma)
    assert out.token_probs.dtype == torch.float32 and out.token_probs.shape == (R, gamma)
    if out.tokens.numel():
        assert int(out.tokens.min()) >= 0 and int(out.tokens.max()) < V, "token id outside [0, V)"
    with_conf = head.conf_weight is not None
    for name in ("confidence", "survival"):
        t = getattr(out, name)
        assert (t is not None) == with_conf, name
        if with_conf:
            assert t.dtype == torch.float32 and t.shape == (R, gamma), name
    for name, wanted in (("draft_probs", probs), ("draft_logits", logits)):
        t = getattr(out, name)
        assert (t is not None) == bool(wanted), name
        if wanted:
            assert t.dtype == torch.float32 and t.shape == (R, gamma, V), name


def check_against_formulas(out, U, anchor, head, T, seed, offset, hidden, *, rtol, atol):
    """All outputs of one call vs the float64 formulas along the op's own token path."""
    z, p, conf = exact_path(U, anchor, head, T, out.tokens, hidden)
    took = p.gather(-1, out.tokens.long()[..., None]).squeeze(-1)
    assert bool((took > 0).all()), "a token of probability 0 was sampled"
    torch.testing.assert_close(out.token_probs.double(), took, rtol=rtol, atol=atol)
    if out.draft_logits is not None:
        torch.testing.assert_close(out.draft_logits.double(), z, rtol=rtol, atol=atol)
    if out.draft_probs is not None:
        torch.testing.assert_close(out.draft_probs.double(), p, rtol=rtol, atol=atol)
    if conf is not None:
        torch.testing.assert_close(out.confidence.double(), conf, rtol=rtol, atol=atol)
        torch.testing.assert_close(out.survival.double(), torch.cumprod(conf, dim=1), rtol=rtol, atol=atol)
    offset_t = torch.as_tensor(offset, dtype=torch.int64)
    win, margin = race_margins(z, T, seed, offset_t)
    clear = margin > MARGIN
    assert torch.equal(win[clear], out.tokens.long()[clear]), "tokens do not follow the Gumbel-max contract"
    return margin


# Tolerances against float64. z is an fp32 sum of r + 1 terms of size <~ 3: its
# absolute error is <~ (r + 1) * 3 * 6e-8 (<~ 1.2e-5 for r <= 65, ~1e-6 seen);
# a probability's relative error is about the absolute error of z/T (T >= 0.3
# here), so <~ 4e-5 in the worst case and <= 2e-6 seen; confidence and survival
# are a few fp32 ops and a γ-fold product (<= 5e-7 seen). Triton's tl.dot sums
# in another order, within the same bound (the same maxima were seen on the
# interpreter). ATOL covers z near 0 and probabilities near 0.
RTOL, ATOL = 3e-5, 3e-6


# ---------------------------------------------------------------------------
# 1-2. The law of the block (Monte Carlo) and the harness rejecting bias
# ---------------------------------------------------------------------------

MC_V, MC_GAMMA, MC_R_RANK, MC_D = 5, 3, 4, 3
# Per-request temperatures in one call: three stochastic groups and a greedy one.
MC_GROUPS = (1.0, 0.6, 1.7, 0.0)
MC_GREEDY_ROWS = 3000


def mc_setup(kind, seed, conf=True):
    gen = torch.Generator().manual_seed(seed)
    head = make_head(kind, MC_V, MC_R_RANK, MC_D, gen, conf=conf, markov_scale=1.3)
    U = 0.8 * torch.randn(MC_GAMMA, MC_V, generator=gen)
    h = torch.randn(MC_GAMMA, MC_D, generator=gen)
    return head, U, h


def mc_temperatures():
    per = (MC_R - MC_GREEDY_ROWS) // 3
    sizes = [per, per, MC_R - MC_GREEDY_ROWS - 2 * per, MC_GREEDY_ROWS]
    return torch.cat([torch.full((n,), t) for n, t in zip(sizes, MC_GROUPS)])


# Every compiled backend in its exact mode and (Triton) its fast path; the reference is exact either way.
MC_MODES = [(b, True) for b in MC_BACKENDS] + [(b, False) for b in MC_BACKENDS if b == "triton"]


@pytest.mark.parametrize("backend,exact", MC_MODES)
@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_block_follows_exact_law(backend, exact, kind):
    """Per temperature group: x_1, every x_k | prefix and the joint block vs the enumeration;
    greedy rows are the argmax path; token_probs are p_d(x_k) of that same law."""
    head, U, h = mc_setup(kind, {"vanilla": 1, "gated": 2, "rnn": 3}[kind])
    anchor_id = {"vanilla": 2, "gated": 4, "rnn": 0}[kind]
    if kind == "vanilla":
        U[1, 3] = -math.inf  # a masked lane: token 3 can never be x_2
    R = MC_R
    T = mc_temperatures()
    anchor = torch.full((R,), anchor_id, dtype=torch.int64)
    seed = torch.arange(R, dtype=torch.int64)
    hidden = h.expand(R, -1, -1)
    out = draft(backend, U.expand(R, -1, -1), anchor, head, T, seed, 11, hidden=hidden, exact=exact)
    for t in MC_GROUPS:
        rows = T == t
        law = block_law(U, h, anchor_id, head, t)
        if t == 0:
            # Greedy: every row is the argmax path, which has probability 1 under the law.
            path = torch.tensor(next(p for p, q in zip(itertools.product(range(MC_V), repeat=MC_GAMMA), law[1])
                                     if q == 1.0))
            assert bool((out.tokens[rows] == path).all())
            assert bool((out.token_probs[rows] == 1.0).all())
        else:
            check_block(out.tokens[rows], law, f"{kind}, T={t}")
    if kind == "vanilla":
        assert not bool((out.tokens[:, 1] == 3).any())
    # token_probs: p_d(x_k) of exactly the law the chi-square tests accepted.
    conds = [block_law(U, h, anchor_id, head, t)[0] for t in MC_GROUPS]
    group = sum((T == t).long() * g for g, t in enumerate(MC_GROUPS))
    for i in range(0, R, 97):
        toks, cond = out.tokens[i].tolist(), conds[int(group[i])]
        expected = [float(cond[tuple(toks[:k])][toks[k]]) for k in range(MC_GAMMA)]
        torch.testing.assert_close(out.token_probs[i].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bug", [None, "no_bias", "wrong_temperature", "stale_prev", "transposed_w2",
                                 "shared_uniform"])
def test_harness_rejects_biased_sampler(bug):
    head, U, h = mc_setup("vanilla", 5)
    T = 0.6
    law = block_law(U, h, 1, head, T)
    tokens = biased_markov_sampler(bug, U, 1, head, T, 40_000, torch.Generator().manual_seed(6))
    if bug is None:
        check_block(tokens, law, "correct sampler")  # the copy is right when nothing is planted
    else:
        with pytest.raises(AssertionError, match="chi-square|probability 0"):
            check_block(tokens, law, f"bug {bug}")


def test_block_law_enumeration():
    """The enumerator itself: sums to 1, its first-token law is softmax((U_1 + W2·W1[x_0])/T),
    x_2's marginal is the mixture over x_1, and T = 0 concentrates on the argmax path."""
    head, U, h = mc_setup("vanilla", 7)
    w1, w2 = f64(head.w1), f64(head.w2)
    cond, joint = block_law(U, h, 3, head, 0.6)
    assert abs(float(joint.sum()) - 1.0) < 1e-12
    p1 = torch.softmax((f64(U[0]) + w2 @ w1[3]) / 0.6, -1)
    torch.testing.assert_close(cond[()], p1, rtol=1e-12, atol=0)
    p2 = sum(p1[a] * torch.softmax((f64(U[1]) + w2 @ w1[a]) / 0.6, -1) for a in range(MC_V))
    torch.testing.assert_close(joint.reshape(MC_V, MC_V, MC_V).sum((0, 2)), p2, rtol=1e-12, atol=1e-15)
    _, greedy = block_law(U, h, 3, head, 0.0)
    assert sorted(greedy.tolist())[-1] == 1.0 and float(greedy.sum()) == 1.0


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_offsets_and_seeds_give_independent_draws(backend):
    """Identical requests: x_1 at offsets o and o + 1 (and at seeds 2i, 2i + 1) are independent
    draws of the same law: the pair follows p ⊗ p; equal seeds give equal blocks."""
    head, U, h = mc_setup("vanilla", 8, conf=False)
    R = 30_000
    U = U[:1]  # γ = 1
    anchor = torch.full((R,), 2, dtype=torch.int64)
    seed = torch.arange(R, dtype=torch.int64)
    p = block_law(U, None, 2, head, 1.0)[0][()]
    outer = (p[:, None] * p[None, :]).reshape(-1)
    a = draft(backend, U.expand(R, -1, -1), anchor, head, 1.0, seed, 5).tokens[:, 0].long()
    b = draft(backend, U.expand(R, -1, -1), anchor, head, 1.0, seed, 6).tokens[:, 0].long()
    assert_follows(counts_of(a, MC_V), p, ALPHA, what="offset 5")
    assert_follows(counts_of(a * MC_V + b, MC_V**2), outer, ALPHA, what="offsets 5, 6")
    assert_follows(counts_of(a[0::2] * MC_V + a[1::2], MC_V**2), outer, ALPHA, what="seeds 2i, 2i+1")
    dup = draft(backend, U.expand(R, -1, -1), anchor, head, 1.0, seed // 2, 5).tokens
    assert torch.equal(dup[0::2], dup[1::2])


# ---------------------------------------------------------------------------
# 3, 5. Exact outputs vs the float64 formulas, per head variant
# ---------------------------------------------------------------------------

HEAD_CASES = [
    dict(head_kind="vanilla"),
    dict(head_kind="vanilla", conf=True, conf_bias=False),
    dict(head_kind="vanilla", conf=True, sts=[0.7, 1.0, 1.6, 2.5, 0.9]),
    dict(head_kind="gated", bias=True, conf=True, sts=[1.2, 0.8, 1.0, 3.0, 1.1]),
    dict(head_kind="gated", bias=False),
    dict(head_kind="rnn", bias=True, conf=True),
    dict(head_kind="rnn", bias=False, conf=True, conf_bias=False, sts=[2.0, 2.0, 0.5, 1.0, 1.0]),
    dict(head_kind="gated", bias=True, conf=True, conf_markov=False),  # confidence from h_k alone ([d])
    dict(head_kind="vanilla", bias=True, conf=True, conf_markov=False),
]


def _head_id(c):
    parts = [c["head_kind"]]
    if "bias" in c:
        parts.append("bias" if c["bias"] else "nobias")
    if c.get("conf"):
        parts.append("conf" + ("" if c.get("conf_bias", True) else "-nob") + ("-sts" if "sts" in c else ""))
    if c.get("conf_markov") is False:
        parts.append("nomarkov")
    return "-".join(parts)


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("case", HEAD_CASES, ids=_head_id)
def test_outputs_match_formulas(backend, case):
    """token_probs, draft_probs, draft_logits, confidence, survival vs float64 along the sampled
    path; tokens are the Gumbel-max winners of the DRAFT stream at position k."""
    gen = torch.Generator().manual_seed(100 + HEAD_CASES.index(case))
    U, anchor, head, T, seed, hidden = random_inputs(96, 5, 23, 12, 6, gen=gen, **case)
    hidden = hidden if needs_hidden(head) else None
    out = draft(backend, U, anchor, head, T, seed, 2**33 + 7, hidden=hidden, probs=True, logits=True)
    margin = check_against_formulas(out, U, anchor, head, T, seed, 2**33 + 7, hidden, rtol=RTOL, atol=ATOL)
    assert float((margin > MARGIN).double().mean()) > 0.99  # the contract check above covered almost every draw
    greedy = T == 0
    assert bool((out.token_probs[greedy] == 1).all())
    # The same call without the optional outputs gives the same tokens and probabilities.
    lean = draft(backend, U, anchor, head, T, seed, 2**33 + 7, hidden=hidden)
    assert torch.equal(lean.tokens, out.tokens) and torch.equal(lean.token_probs, out.token_probs)
    if head.conf_weight is not None:
        assert torch.equal(lean.confidence, out.confidence)
        # survival is the running product of exactly the confidences returned
        torch.testing.assert_close(out.survival, torch.cumprod(out.confidence, 1), rtol=1e-6, atol=0)
        assert bool((out.survival[:, 1:] <= out.survival[:, :-1]).all())


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_confidence_ignores_the_head_variant_and_temperature(backend):
    """c_k reads [h_k; W1[x_{k-1}]] only: with the same path it does not depend on T, the seed,
    base logits or the gate; STS divides the logit by τ_k (checked against the un-scaled run)."""
    gen = torch.Generator().manual_seed(3)
    U, anchor, head, T, seed, hidden = random_inputs(40, 4, 17, 8, 5, "gated", gen, conf=True,
                                                     sts=[1.0, 1.0, 1.0, 1.0])
    greedy = torch.zeros(40)
    a = draft(backend, U, anchor, head, greedy, seed, 0, hidden=hidden)
    b = draft(backend, torch.randn(U.shape, generator=gen), anchor,
              replace(head, gate_weight=torch.zeros_like(head.gate_weight)), torch.full((40,), 1.3), seed + 1, 9,
              hidden=hidden)
    # The paths differ from step 1 on, so compare c_1: it reads only h_1 and the anchor.
    torch.testing.assert_close(a.confidence[:, 0], b.confidence[:, 0], rtol=1e-6, atol=1e-7)
    taus = torch.tensor([0.5, 2.0, 4.0, 0.25])
    c = draft(backend, U, anchor, replace(head, sts=taus), greedy, seed, 0, hidden=hidden)
    assert torch.equal(c.tokens, a.tokens)
    logit = torch.logit(a.confidence.double())
    torch.testing.assert_close(c.confidence.double(), torch.sigmoid(logit / taus.double()), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# 4. Greedy = a plain python DeepSpec-style loop
# ---------------------------------------------------------------------------


def python_greedy(U, anchor, head, hidden):
    """DeepSpec markov_head inference at T = 0, one request and one step at a time, plain python:
    z_k[v] = U_k[v] + sum_j W2[v][j] e_k[j]; x_k = first argmax. Also returns the smallest
    gap between the best and second-best z seen (to prove the inputs have no near-ties)."""
    R, gamma, V = U.shape
    w1, w2 = head.w1.double().tolist(), head.w2.double().tolist()
    r = len(w1[0])
    gw = head.gate_weight.double().tolist() if head.gate_weight is not None else None
    gb = head.gate_bias.double().tolist() if head.gate_bias is not None else [0.0] * r
    rw = head.rnn_weight.double().tolist() if head.rnn_weight is not None else None
    rb = head.rnn_bias.double().tolist() if head.rnn_bias is not None else [0.0] * (3 * r)
    out, min_gap = [], math.inf
    for i in range(R):
        prev, state, row = int(anchor[i]), [0.0] * r, []
        for k in range(gamma):
            emb = w1[prev]
            if head.kind == "gated":
                hk = hidden[i, k].double().tolist()
                x_in = hk + emb
                e = [emb[j] / (1.0 + math.exp(-(sum(a * b for a, b in zip(gw[j], x_in)) + gb[j]))) for j in range(r)]
            elif head.kind == "rnn":
                # DeepSpec RNNHead: joint_proj([s; emb; h]) -> gate, candidate, output.
                x_in = state + emb + hidden[i, k].double().tolist()
                pre = [sum(a * b for a, b in zip(rw[j], x_in)) + rb[j] for j in range(3 * r)]
                gate = [1.0 / (1.0 + math.exp(-v)) for v in pre[:r]]
                state = [gate[j] * state[j] + (1.0 - gate[j]) * math.tanh(pre[r + j]) for j in range(r)]
                e = [math.tanh(v) for v in pre[2 * r:]]
            else:
                e = emb
            z = [float(U[i, k, v]) + sum(a * b for a, b in zip(w2[v], e)) for v in range(V)]
            best = max(z)
            x = z.index(best)
            if V > 1:
                min_gap = min(min_gap, best - max(z[:x] + z[x + 1:]))
            row.append(x)
            prev = x
        out.append(row)
    return torch.tensor(out, dtype=torch.int32), min_gap


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_greedy_is_the_deepspec_loop(backend, kind):
    """T = 0: argmax of U_k + W2·e_k step by step; token_probs 1 and draft_probs one-hot;
    seeds and offsets are irrelevant."""
    small = _interpreted(backend)
    R, gamma, V = (4, 3, 40) if small else (24, 6, 61)
    gen = torch.Generator().manual_seed({"vanilla": 11, "gated": 12, "rnn": 13}[kind])
    U, anchor, head, _, seed, hidden = random_inputs(R, gamma, V, 8, 5, kind, gen, markov_scale=2.0)
    T = torch.zeros(R)
    expected, gap = python_greedy(U, anchor, head, hidden)
    # No near-ties: the best z beats the second best by > MARGIN = 1e-4 at every step (checked),
    # far above the fp32 error of z (<~ 1e-5), so the op's fp32 argmax is the float64 one.
    assert gap > MARGIN, gap
    out = draft(backend, U, anchor, head, T, seed, 3, hidden=hidden if kind != "vanilla" else None, probs=True)
    assert torch.equal(out.tokens, expected)
    assert bool((out.token_probs == 1).all())
    onehot = torch.zeros(R, gamma, V).scatter_(-1, expected.long()[..., None], 1.0)
    assert torch.equal(out.draft_probs, onehot)
    # Markov dependence matters: with the bias removed the path changes somewhere.
    plain = U.argmax(-1).to(torch.int32)
    assert not torch.equal(plain, expected)
    other = draft(backend, U, anchor, head, T, seed * 3 + 1, 2**40, hidden=hidden if kind != "vanilla" else None)
    assert torch.equal(other.tokens, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_exact_ties_take_the_first_index(backend):
    """Exact ties in z (identical U columns and W2 rows) resolve to the first index, as
    torch.argmax; with W2 = 0 the path is argmax U_k, ties across tile borders included."""
    V = 300
    # Small integers everywhere: every product and sum is exact in fp32, in any order.
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randint(-3, 4, (V, 4), generator=gen).float()
    U = torch.zeros(2, 3, V)
    U[0, 0, [7, 200, 299]] = 5.0  # first of three equal maxima, in different vocab tiles
    U[0, 1, [130, 131]] = 2.0
    U[0, 2, :] = 1.0  # all tied
    U[1, :, [299, 256]] = 3.0
    head = Head("vanilla", w1, torch.zeros(V, 4))
    out = draft(backend, U, torch.tensor([0, 299]), head, torch.zeros(2), torch.tensor([1, 2]), 0)
    assert out.tokens.tolist() == [[7, 130, 0], [256, 256, 256]]
    # Non-zero W2 with duplicated rows: z ties exactly between ids 10 and 250.
    w2 = torch.randint(-3, 4, (V, 4), generator=gen).float()
    w2[250] = w2[10]
    U2 = torch.full((2, 3, V), -100.0)
    U2[:, :, 10] = 6.0
    U2[:, :, 250] = 6.0
    out = draft(backend, U2, torch.tensor([0, 299]), Head("vanilla", head.w1, w2), torch.zeros(2),
                torch.tensor([1, 2]), 0)
    assert bool((out.tokens == 10).all())


# ---------------------------------------------------------------------------
# 6. Determinism, offsets, per-request seeds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_deterministic_offset_sensitive_and_batch_invariant(backend):
    gen = torch.Generator().manual_seed(21)
    R = 600
    U, anchor, head, T, seed, hidden = random_inputs(R, 4, 9, 6, 4, "rnn", gen, conf=True)
    run = lambda *a, **k: draft(backend, *a, hidden=hidden, probs=True, **k)  # noqa: E731
    a = run(U, anchor, head, T, seed, 123)
    b = run(U, anchor, head, T, seed, 123)
    for x, y in zip(a, b):
        assert (x is None and y is None) or torch.equal(x, y)
    stochastic = T > 0
    for other in (124, 123 + 2**32, 2**40):
        c = run(U, anchor, head, T, seed, other)
        differ = (c.tokens != a.tokens).any(1)
        assert float(differ[stochastic].double().mean()) > 0.5, other
        assert not bool(differ[~stochastic].any()), "greedy rows do not depend on the offset"
    hi = run(U, anchor, head, T, seed ^ (1 << 40), 123)  # seeds differing in the high word only
    assert float((hi.tokens != a.tokens).any(1)[stochastic].double().mean()) > 0.5
    # Request i's draws depend on seed[i] only, not on its position in the batch.
    # Tokens must be identical. Float outputs only up to fp32 rounding: torch's matmul (and a
    # kernel's tiling) may sum e·W2ᵀ and the confidence dot product in another order for
    # another batch size or row position (observed: ~1 ulp on the reference).
    perm = torch.randperm(R, generator=gen)
    p = draft(backend, U[perm], anchor[perm], head, T[perm], seed[perm], 123, hidden=hidden[perm], probs=True)
    assert torch.equal(p.tokens, a.tokens[perm])
    for x, y in zip(p[1:], a[1:]):
        assert (x is None and y is None) or torch.allclose(x, y[perm], rtol=1e-6, atol=1e-6)
    for i in (0, 17, R - 1):
        one = draft(backend, U[i:i + 1], anchor[i:i + 1], head, T[i:i + 1], seed[i:i + 1], 123,
                    hidden=hidden[i:i + 1])
        assert torch.equal(one.tokens[0], a.tokens[i])
        assert torch.allclose(one.token_probs[0], a.token_probs[i], rtol=1e-6, atol=1e-6)
    # Two requests with equal inputs and seeds draw the same block, whatever their neighbours.
    twin = draft(backend, U[[5, 9, 5]], anchor[[5, 9, 5]], head, T[[5, 9, 5]], seed[[5, 9, 5]], 123,
                 hidden=hidden[[5, 9, 5]])
    assert torch.equal(twin.tokens[0], a.tokens[5]) and torch.equal(twin.tokens[2], a.tokens[5])


# ---------------------------------------------------------------------------
# 7. Every backend = the reference, token for token
# ---------------------------------------------------------------------------

# (R, γ, V, r, d, head kwargs, dtype of U and weights, draft outputs, temperature choices)
CROSS_CASES = [
    ("vanilla-V300", 8, 5, 300, 16, dict(head_kind="vanilla"), torch.float32, (True, True), (0.0, 0.5, 1.0, 2.0)),
    ("gated-conf-sts-bf16", 5, 4, 130, 8, dict(head_kind="gated", conf=True, sts=[0.5, 1.0, 2.0, 1.3]),
     torch.bfloat16, (True, False), (0.0, 0.7, 1.0)),
    ("rnn-conf-fp16-V257", 3, 3, 257, 20, dict(head_kind="rnn", conf=True, conf_bias=False), torch.float16,
     (False, True), (1.0, 1.4)),
    ("rnn-nobias-greedy", 4, 5, 97, 65, dict(head_kind="rnn", bias=False), torch.float32, (True, True), (0.0,)),
    ("gated-nobias-R17", 17, 2, 40, 4, dict(head_kind="gated", bias=False, conf=True), torch.float32,
     (False, False), (0.0, 1.0, 0.3)),
]


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("case", CROSS_CASES, ids=[c[0] for c in CROSS_CASES])
def test_backend_matches_reference_exactly(backend, case):
    """Same seeds, same tokens on every backend (counter-based RNG): all three heads, greedy
    rows, STS temperatures, bf16/fp16 inputs, draft_probs/logits, vocab sizes past one tile,
    more requests than one request tile, seeds and offsets past 32 bits."""
    name, R, gamma, V, r, hk, dtype, (want_p, want_l), temps = case
    gen = torch.Generator().manual_seed(len(name) * 7 + R)
    U, anchor, head, T, seed, hidden = random_inputs(R, gamma, V, r, 6, gen=gen, T_choices=temps, **hk)
    if dtype != torch.float32:
        U = U.to(dtype)
        head = replace(head, w1=head.w1.to(dtype), w2=head.w2.to(dtype))
    hidden = hidden.to(dtype) if needs_hidden(head) else None
    offset = 2**33 + 3
    ref = draft("reference", U, anchor, head, T, seed, offset, hidden=hidden, probs=want_p, logits=want_l)
    # No near-ties: in float64 the reference's winner beats the runner-up by more than
    # MARGIN at every step (asserted), so fp32 rounding differences between backends
    # (tl.dot vs torch matmul, <~ 1e-5 on z) cannot flip an argmax. Seeds picked to hold.
    _, margin = race_margins(exact_path(U, anchor, head, T, ref.tokens, hidden)[0], T, seed, torch.tensor(offset))
    assert float(margin.min()) > MARGIN, float(margin.min())
    out = draft(backend, U, anchor, head, T, seed, offset, hidden=hidden, probs=want_p, logits=want_l)
    assert torch.equal(out.tokens, ref.tokens)
    # Floats: the kernel's fp32 tl.dot sums z in another order than torch's matmul; both
    # are within ~1e-5 of float64 on z, so ~2e-5 relative on probabilities (exp of z/T).
    for field in ("token_probs", "confidence", "survival", "draft_probs", "draft_logits"):
        a, b = getattr(out, field), getattr(ref, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=field)
    check_against_formulas(out, U, anchor, head, T, seed, offset, hidden, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------
# 8. Odd sizes and layouts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [1, 2, 257])
def test_small_and_odd_vocab(backend, V):
    """V = 1 (a single possible token), V = 2, V = 257 (one lane past two 128-wide tiles)
    with the mass on the last lanes: no id >= V, values match the formulas."""
    gen = torch.Generator().manual_seed(V)
    R, gamma = 5, 3
    U, anchor, head, _, seed, hidden = random_inputs(R, gamma, V, 4, 3, "vanilla", gen, conf=True)
    T = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0])
    if V > 2:
        U[..., -1] += 6.0
        U[..., -2] += 5.0
    out = draft(backend, U, anchor, head, T, seed, 1, hidden=hidden, probs=True, logits=True)
    check_against_formulas(out, U, anchor, head, T, seed, 1, hidden, rtol=RTOL, atol=ATOL)
    if V == 1:
        assert bool((out.tokens == 0).all()) and bool((out.token_probs == 1).all())
        assert bool((out.draft_probs == 1).all())
    if V == 257:
        assert int((out.tokens >= V - 2).sum()) >= R * gamma // 2
    if backend != "reference":
        ref = draft("reference", U, anchor, head, T, seed, 1, hidden=hidden, probs=True, logits=True)
        assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("V", [129280, 151936])
def test_real_vocab_sizes(backend, V):
    """DeepSeek-V3 and Qwen3 vocabularies, R = 2, γ = 2, r = 8: a greedy request with
    argmaxes planted at both ends, a stochastic one whose mass sits on the last 3 ids."""
    gen = torch.Generator().manual_seed(V)
    R, gamma, r = 2, 2, 8
    head = make_head("vanilla", V, r, 1, gen, markov_scale=0.3)
    U = torch.randn(R, gamma, V, generator=gen)
    for k, tok in enumerate([V - 1, 3]):
        U[0, k, tok] = 30.0
    U[1, :, V - 3:] += 40.0  # the rest of the vocabulary holds < 1e-9 of the mass
    T = torch.tensor([0.0, 1.0])
    seed = torch.tensor([5, 6])
    out = draft(backend, U, torch.tensor([0, V - 1]), head, T, seed, 0, logits=True)
    assert out.tokens[0].tolist() == [V - 1, 3]
    assert bool((out.tokens[1] >= V - 3).all())
    z, p, _ = exact_path(U, torch.tensor([0, V - 1]), head, T, out.tokens)
    took = p.gather(-1, out.tokens.long()[..., None]).squeeze(-1)
    torch.testing.assert_close(out.token_probs.double(), took, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out.draft_logits.double(), z, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [1, 5, 7, 16])
def test_draft_lengths(backend, gamma):
    gen = torch.Generator().manual_seed(gamma)
    R = 3 if _interpreted(backend) else 40
    sts = torch.linspace(0.5, 2.0, gamma).tolist()
    U, anchor, head, T, seed, hidden = random_inputs(R, gamma, 7, 5, 3, "rnn", gen, conf=True, sts=sts)
    out = draft(backend, U, anchor, head, T, seed, gamma, hidden=hidden, probs=not _interpreted(backend))
    check_against_formulas(out, U, anchor, head, T, seed, gamma, hidden, rtol=RTOL, atol=ATOL)
    if backend != "reference":
        ref = draft("reference", U, anchor, head, T, seed, gamma, hidden=hidden)
        assert torch.equal(out.tokens, ref.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_request_empty_batch_and_zero_length(backend):
    gen = torch.Generator().manual_seed(31)
    U, anchor, head, T, seed, hidden = random_inputs(1, 4, 11, 4, 3, "gated", gen, conf=True)
    T = torch.tensor([0.8])
    one = draft(backend, U, anchor, head, T, seed, 0, hidden=hidden, probs=True, logits=True)
    check_against_formulas(one, U, anchor, head, T, seed, 0, hidden, rtol=RTOL, atol=ATOL)
    for R, gamma in ((0, 4), (0, 0), (3, 0)):
        out = draft(backend, torch.zeros(R, gamma, 11), torch.zeros(R, dtype=torch.int64), head, torch.ones(R),
                    torch.arange(R), 0, hidden=torch.zeros(R, gamma, 3), probs=True, logits=True)
        assert out.tokens.numel() == 0 and out.confidence.shape == (R, gamma)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed / strided / broadcast views give exactly the results of contiguous copies."""
    gen = torch.Generator().manual_seed(41)
    R, gamma, V, r, d = (3, 2, 150, 6, 4) if _interpreted(backend) else (32, 4, 150, 6, 4)
    U, anchor, head, T, seed, hidden = random_inputs(R, gamma, V, r, d, "gated", gen, conf=True,
                                                     sts=[1.0, 0.5, 2.0, 1.5][:gamma])
    offset = 77
    ref = draft(backend, U, anchor, head, T, seed, offset, hidden=hidden, probs=True, logits=True)

    def strided(t):  # same values, every other element of a larger buffer
        buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        buf[..., ::2] = t
        return buf[..., ::2]

    nc_U = U.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # vocab-major storage
    nc_head = replace(head, w1=head.w1.t().contiguous().t(), w2=strided(head.w2),
                      gate_weight=head.gate_weight.t().contiguous().t(), gate_bias=strided(head.gate_bias),
                      conf_weight=strided(head.conf_weight), sts=strided(head.sts))
    nc = dict(anchor=strided(anchor), T=strided(T), seed=strided(seed), hidden=hidden.transpose(0, 1).contiguous()
              .transpose(0, 1), offset=torch.tensor([0, offset])[1:])
    for t in (nc_U, nc_head.w1, nc_head.w2, nc_head.gate_weight, nc["anchor"], nc["T"], nc["seed"], nc["hidden"]):
        assert not t.is_contiguous()
    out = draft(backend, nc_U, nc["anchor"], nc_head, nc["T"], nc["seed"], nc["offset"], hidden=nc["hidden"],
                probs=True, logits=True)
    assert torch.equal(out.tokens, ref.tokens)
    for field in ("token_probs", "confidence", "survival", "draft_probs", "draft_logits"):
        torch.testing.assert_close(getattr(out, field), getattr(ref, field), rtol=1e-5, atol=1e-7, msg=field)
    # Broadcast views: stride-0 base logits and temperature, a strided slice of a wider vocab.
    row = U[:1]
    b = draft(backend, row.expand(R, -1, -1), anchor, head, torch.tensor(0.9).expand(R), seed, offset, hidden=hidden)
    c = draft(backend, row.repeat(R, 1, 1), anchor, head, torch.full((R,), 0.9), seed, offset, hidden=hidden)
    assert torch.equal(b.tokens, c.tokens)
    wide = torch.randn(R, gamma, 2 * V, generator=gen)
    wide[..., 1::2] = U
    s = draft(backend, wide[..., 1::2], anchor, head, T, seed, offset, hidden=hidden)
    assert torch.equal(s.tokens, ref.tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_dtypes(backend):
    """bf16/fp16 logits and weights are read as fp32; int32 anchors, fp64 temperatures and
    a one-element offset are accepted and change nothing."""
    gen = torch.Generator().manual_seed(51)
    R = 3 if _interpreted(backend) else 24
    U, anchor, head, T, seed, hidden = random_inputs(R, 2, 45, 6, 3, "vanilla", gen, conf=True)
    ref = draft(backend, U, anchor, head, T, seed, 4, hidden=hidden)
    wide = draft(backend, U, anchor.int(), head, T.double(), seed, torch.tensor([4]), hidden=hidden)
    for x, y in zip(wide, ref):
        assert (x is None and y is None) or torch.equal(x, y)
    for dt in (torch.bfloat16, torch.float16):
        low_head = replace(head, w1=head.w1.to(dt), w2=head.w2.to(dt), conf_weight=head.conf_weight.to(dt))
        a = draft(backend, U.to(dt), anchor, low_head, T, seed, 4, hidden=hidden.to(dt))
        up_head = replace(head, w1=low_head.w1.float(), w2=low_head.w2.float(),
                          conf_weight=low_head.conf_weight.float())
        b = draft(backend, U.to(dt).float(), anchor, up_head, T, seed, 4, hidden=hidden.to(dt).float())
        assert torch.equal(a.tokens, b.tokens), dt
        torch.testing.assert_close(a.token_probs, b.token_probs, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.confidence, b.confidence, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_positive_temperature_is_greedy(backend):
    """T < 1e-5 is greedy (GREEDY_TEMPERATURE): at T = 1e-39 the division z / T would overflow
    fp32 and tie every lane at +inf, so the token must be the argmax with p_d = 1; just above
    the threshold the row samples (a near-one-hot softmax, p_d in (0, 1])."""
    U = torch.tensor([[[1.0, 2.0, 0.5, 1.5]]])
    head = Head("vanilla", torch.zeros(4, 2), torch.zeros(4, 2))
    for t in (1e-39, 9e-6, 0.0):
        out = draft(backend, U, torch.tensor([0]), head, torch.tensor([t]), torch.tensor([0]), 0)
        assert out.tokens.tolist() == [[1]]
        assert float(out.token_probs[0, 0]) == 1.0
    out = draft(backend, U, torch.tensor([0]), head, torch.tensor([2e-5]), torch.tensor([0]), 0)
    assert out.tokens.tolist() == [[1]]
    assert 0.0 < float(out.token_probs[0, 0]) <= 1.0


# ---------------------------------------------------------------------------
# 9. opcheck for the variants test_registry.py does not cover
# ---------------------------------------------------------------------------
# tests/test_registry.py runs opcheck and torch.compile(fullgraph=True) on the
# gated head with a confidence head and both draft outputs. The fake's other
# branches (no confidence head and no draft outputs: 0-element outputs; the RNN
# head; an empty batch) are checked here.


def _raw_args(d, probs, logits):
    """The positional arguments of torch.ops.dspark.markov_draft, in the op table's order."""
    return tuple(md_op.OP.record(**d, return_draft_probs=probs, return_draft_logits=logits, exact=False)) + ("",)


@pytest.mark.parametrize("variant", ["vanilla-bare", "rnn-conf-logits", "empty-batch"])
def test_opcheck_other_variants(variant):
    d = small_inputs()
    d.update(gate_weight=None, gate_bias=None)
    if variant == "vanilla-bare":
        d.update(hidden=None, conf_weight=None, conf_bias=None, sts_temperature=None)
        args = _raw_args(d, False, False)
    elif variant == "rnn-conf-logits":
        args = _raw_args(with_rnn_head(d), False, True)
    else:
        d.update(base_logits=d["base_logits"][:0], anchor=d["anchor"][:0], temperature=d["temperature"][:0],
                 seed=d["seed"][:0], hidden=d["hidden"][:0])
        args = _raw_args(d, True, False)
    torch.library.opcheck(torch.ops.dspark.markov_draft.default, args)



# ---------------------------------------------------------------------------
# The fast path (exact=False): self-consistent, close to the reference, 2 launches per step
# ---------------------------------------------------------------------------


def _cast_head(head, dtype):
    return replace(head, **{f: getattr(head, f).to(dtype) for f in ("w1", "w2", "gate_weight", "gate_bias",
                                                                     "rnn_weight", "rnn_bias")
                            if getattr(head, f) is not None})


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fast_path_reports_the_distribution_it_samples(backend, kind, dtype):
    """What verification needs: token_probs, draft_probs and draft_logits are exactly the distribution
    each token was drawn from (recomputed here from the returned logits), greedy rows take its argmax;
    and the logits are within the operands' rounding of the float64 formulas along the same tokens."""
    gen = torch.Generator().manual_seed(31 + ["vanilla", "gated", "rnn"].index(kind))
    R, gamma, V, r, d = 6, 3, 300, 16, 24
    U, anchor, head, T, seed, hidden = random_inputs(R, gamma, V, r, d, kind, gen, conf=True, sts=[1.0, 1.5, 0.7])
    head = _cast_head(head, dtype)
    out = draft(backend, U, anchor, head, T, seed, 5, hidden=hidden, probs=True, logits=True, exact=False)
    z = out.draft_logits.double()
    greedy = T < 1e-5
    inv_t = 1.0 / torch.where(greedy, torch.ones_like(T), T).double()
    law = torch.softmax(z * inv_t[:, None, None], -1)
    x = out.tokens.long()
    stoch = ~greedy
    torch.testing.assert_close(out.token_probs[stoch].double(), law[stoch].gather(-1, x[stoch][..., None])[..., 0],
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.draft_probs[stoch].double(), law[stoch], rtol=1e-5, atol=1e-7)
    assert torch.equal(x[greedy], z[greedy].argmax(-1))
    assert bool((out.token_probs[greedy] == 1).all())
    z64, _, conf64 = exact_path(U, anchor, head, T, out.tokens, hidden)
    # e is rounded to W2's dtype (fp16: 2^-11; fp32 weights run as tf32 on a GPU: 2^-11 too) before the product.
    bound = 4 * 2.0**-11 * r * float(head.w2.abs().max()) * max(1.0, float(head.w1.abs().max())) + 1e-4
    assert float((z - z64).abs().max()) <= bound, (float((z - z64).abs().max()), bound)
    torch.testing.assert_close(out.confidence.double(), conf64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.survival.double(), torch.cumprod(conf64, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_fast_path_is_token_exact_when_the_products_are(backend):
    """Vanilla head, W1 entries in {-1, 0, 1}, W2 and U multiples of 1/8 in fp16: every product and sum is
    exact, so the tensor-core path draws the reference's tokens."""
    gen = torch.Generator().manual_seed(7)
    R, gamma, V, r = 9, 4, 333, 16
    w1 = torch.randint(-1, 2, (V, r), generator=gen).to(torch.float16)
    w2 = (torch.randint(-8, 9, (V, r), generator=gen) / 8).to(torch.float16)
    U = (torch.randint(-16, 17, (R, gamma, V), generator=gen) / 8).to(torch.float16)
    anchor = torch.randint(0, V, (R,), generator=gen)
    T = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0, 0.0, 0.7, 1.3, 1.0])
    seed = torch.arange(R, dtype=torch.int64) * 97
    x = [to_device(t) for t in (U, anchor, w1, w2, T, seed, torch.tensor(3))]
    fast = dk.markov_draft(*x, exact=False, backend=backend)
    ref = dk.markov_draft(*x, backend="reference")
    assert torch.equal(fast.tokens.cpu(), ref.tokens.cpu())
    torch.testing.assert_close(fast.token_probs.cpu(), ref.token_probs.cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", [b for b in OTHER_BACKENDS if b == "triton"])
@pytest.mark.parametrize("probs", [False, True])
def test_launches_per_call(backend, probs):
    """Fast path: 2 launches per draft step + 1 (+1 for draft_probs); nothing else in Triton."""
    gen = torch.Generator().manual_seed(3)
    R, gamma, V, r, d = 4, 3, 200, 16, 8
    U, anchor, head, T, seed, hidden = random_inputs(R, gamma, V, r, d, "gated", gen, conf=True)
    with count_launches() as names:
        draft(backend, U, anchor, head, T, seed, hidden=hidden, probs=probs, exact=False)
    assert len(names) == 2 * gamma + 1 + probs, names
