"""dspark::markov_draft samples the DSpark Markov head exactly, deterministically,
and rejects bad input.

Everything the op returns is checked against an independent float64
implementation of the formulas in the docstring of dspark_kernels.markov_draft
(DeepSpec semantics: w1 is the nn.Embedding [V, r], w2 the nn.Linear(r, V)
weight [V, r], so the Markov bias of token x is W2 · W1[x]):

    e_k = W1[x_{k-1}]                                   vanilla head
    e_k = σ(Wg·[h_k; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}]   gated head
    e_k = s_k = tanh(Wr·[W1[x_{k-1}]; s_{k-1}] + br)    RNN head, s_0 = 0
    z_k = U_k + W2·e_k,  x_k ~ softmax(z_k / T)  (first argmax of z_k when T = 0)
    c_k = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k),  a_k = Π_{i<=k} c_i

The float64 code below never calls the library's reference: it splits the
concatenations into two matmuls, works in float64 and enumerates the whole
tree of prefixes for the exact law of a block.

- Distribution (Monte Carlo): ONE op call on R requests with seeds 0..R-1 that
  share base logits and hidden states, so every request draws from the same
  law; the first token, every conditional x_k | x_1..x_{k-1} (prefixes with
  enough samples) and the joint law of the whole block are chi-square tested
  against the enumeration, per temperature group (T = 0 rows are greedy).
  A deliberately biased sampler fed to the same check is rejected.
- Exact values: tokens follow the Gumbel-max contract on the DRAFT Philox
  stream; token_probs / draft_probs / draft_logits / confidence / survival
  match the float64 formulas along the sampled path; greedy equals a plain
  python DeepSpec-style loop for each head.
- Every other backend matches the reference token for token (the interpreted
  Triton backend on small shapes; Monte Carlo runs on compiled backends only).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import rng
from dspark_kernels.ops import markov_draft as md_op

from stats import assert_follows, counts_of

from conftest import DEVICE, available_backends, interpreted as _interpreted

BACKENDS = available_backends(md_op)


# Monte Carlo and the larger tests run on the reference and compiled backends;
# an interpreted backend is held to token-for-token equality with the
# reference on small batches (test_backend_matches_reference_exactly), which
# carries the reference's statistical guarantees over to it.
MC_BACKENDS = [b for b in BACKENDS if not _interpreted(b)]
OTHER_BACKENDS = [b for b in BACKENDS if b != "reference"]

ALPHA = 1e-4
MC_R = 51_000  # Monte Carlo requests per statistical test (one op call)
# A near-tie margin: when the winner of a float64 recomputation of the race
# beats the runner-up by more than this, fp32 rounding (|error| <~ 1e-5 here)
# cannot change which token wins.
MARGIN = 1e-4


# ---------------------------------------------------------------------------
# Inputs: head weights and calling the op
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """The weights of one Markov head (CPU tensors)."""

    kind: str  # "vanilla" | "gated" | "rnn"
    w1: torch.Tensor  # [V, r] embedding
    w2: torch.Tensor  # [V, r] nn.Linear(r, V).weight
    gate_weight: torch.Tensor | None = None  # [r, d + r]
    gate_bias: torch.Tensor | None = None  # [r]
    rnn_weight: torch.Tensor | None = None  # [r, 2r]
    rnn_bias: torch.Tensor | None = None  # [r]
    conf_weight: torch.Tensor | None = None  # [d + r]
    conf_bias: torch.Tensor | None = None  # [] or [1]
    sts: torch.Tensor | None = None  # [γ]

    @property
    def rank(self):
        return self.w1.shape[1]

    def kwargs(self):
        return dict(gate_weight=self.gate_weight, gate_bias=self.gate_bias, rnn_weight=self.rnn_weight,
                    rnn_bias=self.rnn_bias, conf_weight=self.conf_weight, conf_bias=self.conf_bias,
                    sts_temperature=self.sts)


def make_head(kind, V, r, d, gen, *, bias=True, conf=False, conf_bias=True, sts=None, markov_scale=1.0):
    """Random head: W2·W1[x] ~ N(0, markov_scale²) per vocab id, gates and the RNN state well inside
    their non-linear range, a confidence logit of order 1."""
    w1 = torch.randn(V, r, generator=gen)
    w2 = markov_scale * torch.randn(V, r, generator=gen) / math.sqrt(r)
    kw = {}
    if kind == "gated":
        kw["gate_weight"] = 1.5 * torch.randn(r, d + r, generator=gen) / math.sqrt(d + r)
        if bias:
            kw["gate_bias"] = 0.5 * torch.randn(r, generator=gen)
    elif kind == "rnn":
        kw["rnn_weight"] = 2.0 * torch.randn(r, 2 * r, generator=gen) / math.sqrt(2 * r)
        if bias:
            kw["rnn_bias"] = 0.5 * torch.randn(r, generator=gen)
    else:
        assert kind == "vanilla"
    if conf:
        kw["conf_weight"] = torch.randn(d + r, generator=gen) / math.sqrt(d + r)
        if conf_bias:
            kw["conf_bias"] = torch.tensor(0.3)
        if sts is not None:
            kw["sts"] = torch.as_tensor(sts, dtype=torch.float32)
    return Head(kind, w1, w2, **kw)


def needs_hidden(head):
    return head.kind == "gated" or head.conf_weight is not None


def _dev(t):
    return t.to(DEVICE) if isinstance(t, torch.Tensor) else t


def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def draft(backend, U, anchor, head, T, seed, offset=0, *, hidden=None, probs=False, logits=False, check=True):
    """Run the public op on DEVICE and return a MarkovDraft of CPU tensors; check the output layout."""
    if not isinstance(offset, torch.Tensor):
        offset = torch.tensor(offset, dtype=torch.int64)
    if not isinstance(T, torch.Tensor):
        T = torch.full((U.shape[0],), float(T))
    out = dk.markov_draft(_dev(U), _dev(anchor), _dev(head.w1), _dev(head.w2), _dev(T), _dev(seed), _dev(offset),
                          hidden=_dev(hidden), **{k: _dev(v) for k, v in head.kwargs().items()},
                          return_draft_probs=probs, return_draft_logits=logits, backend=backend)
    out = dk.MarkovDraft(*(_cpu(t) for t in out))
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


# ---------------------------------------------------------------------------
# The formulas, independently, in float64
# ---------------------------------------------------------------------------


def f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def head_input64(head, emb, h, state):
    """e_k [N, r] and the next RNN state; emb = W1[x_{k-1}] [N, r], h = h_k [N, d] (float64)."""
    r = head.rank
    if head.kind == "gated":
        wg = f64(head.gate_weight)
        d = wg.shape[1] - r
        pre = h @ wg[:, :d].T + emb @ wg[:, d:].T
        if head.gate_bias is not None:
            pre = pre + f64(head.gate_bias)
        return torch.sigmoid(pre) * emb, state
    if head.kind == "rnn":
        wr = f64(head.rnn_weight)
        pre = emb @ wr[:, :r].T + state @ wr[:, r:].T
        if head.rnn_bias is not None:
            pre = pre + f64(head.rnn_bias)
        state = torch.tanh(pre)
        return state, state
    return emb, state


def confidence64(head, emb, h, k):
    cw = f64(head.conf_weight)
    d = cw.numel() - head.rank
    logit = h @ cw[:d] + emb @ cw[d:]
    if head.conf_bias is not None:
        logit = logit + float(head.conf_bias.reshape(()))
    if head.sts is not None:
        logit = logit / float(head.sts[k])
    return torch.sigmoid(logit)


def law64(z, T):
    """The sampling distribution of logits z [..., V] at temperatures T [...] (float64):
    softmax(z / T), or a one-hot at the first index of the maximum where T == 0."""
    T = torch.as_tensor(T, dtype=torch.float64).expand(z.shape[:-1])
    greedy = T == 0
    safe = torch.where(greedy, torch.ones_like(T), T)
    soft = torch.softmax(z / safe[..., None], dim=-1)
    onehot = torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)  # argmax: first maximal index
    return torch.where(greedy[..., None], onehot, soft)


def exact_path(U, anchor, head, T, tokens, hidden=None):
    """Teacher-forced along `tokens` [R, γ]: z_k [R, γ, V], the law of x_k [R, γ, V] and
    c_k [R, γ] (None without a confidence head), all float64."""
    U = f64(U)
    R, gamma, V = U.shape
    w1, w2 = f64(head.w1), f64(head.w2)
    prev = anchor.cpu().long()
    state = torch.zeros(R, head.rank, dtype=torch.float64)
    z = torch.empty(R, gamma, V, dtype=torch.float64)
    conf = torch.empty(R, gamma, dtype=torch.float64) if head.conf_weight is not None else None
    for k in range(gamma):
        emb = w1[prev]
        h = f64(hidden[:, k]) if hidden is not None else None
        e, state = head_input64(head, emb, h, state)
        z[:, k] = U[:, k] + e @ w2.T
        if conf is not None:
            conf[:, k] = confidence64(head, emb, h, k)
        prev = tokens[:, k].cpu().long()
    T = f64(torch.as_tensor(T))
    T = T[:, None].expand(R, gamma) if T.dim() else T.expand(R, gamma)
    return z, law64(z, T), conf


def block_law(U, h, anchor, head, T):
    """Exact law of a block when every request shares U [γ, V], h [γ, d] and the anchor,
    by enumerating the tree of prefixes: {prefix: law of the next token [V]} and the
    joint law [V**γ] (codes sum_k x_k V**(γ-1-k))."""
    U = f64(U)
    gamma, V = U.shape
    w1, w2 = f64(head.w1), f64(head.w2)
    prefixes = [()]
    prev = torch.tensor([int(anchor)])
    state = torch.zeros(1, head.rank, dtype=torch.float64)
    mass = torch.ones(1, dtype=torch.float64)
    cond = {}
    for k in range(gamma):
        n = len(prefixes)
        emb = w1[prev]
        hk = f64(h[k]).expand(n, -1) if h is not None else None
        e, state = head_input64(head, emb, hk, state)
        p = law64(U[k] + e @ w2.T, float(T))  # [n, V]
        for i, pre in enumerate(prefixes):
            cond[pre] = p[i]
        mass = (mass[:, None] * p).reshape(-1)
        prefixes = [pre + (x,) for pre in prefixes for x in range(V)]
        prev = torch.arange(V).repeat(n)
        state = state.repeat_interleave(V, 0)
    return cond, mass


def encode(tokens, V):
    weights = V ** torch.arange(tokens.shape[1] - 1, -1, -1, dtype=torch.int64)
    return (tokens.long() * weights).sum(1)


MIN_CONDITIONAL = 2000  # prefixes with fewer samples are covered by the joint test only


def check_block(tokens, law, what):
    """Chi-square tests of sampled blocks [N, γ] against block_law (raises AssertionError)."""
    cond, joint = law
    N, gamma = tokens.shape
    V = cond[()].numel()
    assert_follows(counts_of(tokens[:, 0], V), cond[()], ALPHA, what=f"{what}: x_1")
    codes_so_far = torch.zeros(N, dtype=torch.int64)
    for k in range(1, gamma):
        codes_so_far = codes_so_far * V + tokens[:, k - 1].long()
        for pre in itertools.product(range(V), repeat=k):
            code = 0
            for x in pre:
                code = code * V + x
            sel = codes_so_far == code
            if int(sel.sum()) >= MIN_CONDITIONAL:
                assert_follows(counts_of(tokens[sel, k], V), cond[pre], ALPHA,
                               what=f"{what}: x_{k + 1} given prefix {pre}")
    labels = ["".join(map(str, p)) for p in itertools.product(range(V), repeat=gamma)]
    assert_follows(counts_of(encode(tokens, V), V**gamma), joint, ALPHA, labels=labels, what=f"{what}: joint")


def gumbel_race64(z, T, seed, offset, step):
    """The documented draw of step `step` recomputed in float64: scores z/T + G with
    G = -log(-log u), u = uniform(seed, offset, DRAFT, step, vocab id); z for T == 0.
    Returns (winner [R], margin over the runner-up [R])."""
    R, V = z.shape
    T = f64(torch.as_tensor(T)).expand(R)
    u = rng.uniform(seed.cpu()[:, None], offset.cpu(), rng.STREAM_DRAFT, step, torch.arange(V)[None, :])
    g = -torch.log(-torch.log(u.double()))
    greedy = T == 0
    scores = torch.where(greedy[:, None], z, z / torch.where(greedy, 1.0, T)[:, None] + g)
    if V == 1:
        return torch.zeros(R, dtype=torch.int64), torch.full((R,), math.inf, dtype=torch.float64)
    top = scores.topk(2, dim=-1)
    return scores.argmax(-1), top.values[:, 0] - top.values[:, 1]


def race_margins(z, T, seed, offset):
    """gumbel_race64 at every step of teacher-forced logits z [R, γ, V]: winners and margins [R, γ]."""
    R, gamma, V = z.shape
    win = torch.empty(R, gamma, dtype=torch.int64)
    margin = torch.empty(R, gamma, dtype=torch.float64)
    for k in range(gamma):
        win[:, k], margin[:, k] = gumbel_race64(z[:, k], T, seed, offset, k)
    return win, margin


def random_inputs(R, gamma, V, r, d, head_kind, gen, *, T_choices=(0.0, 0.5, 1.0, 2.0), u_scale=1.5, **head_kw):
    """Per-request random base logits, hidden states, anchors, temperatures and seeds."""
    head = make_head(head_kind, V, r, d, gen, **head_kw)
    U = u_scale * torch.randn(R, gamma, V, generator=gen)
    hidden = torch.randn(R, gamma, d, generator=gen)
    anchor = torch.randint(0, V, (R,), generator=gen)
    T = torch.tensor(T_choices)[torch.randint(0, len(T_choices), (R,), generator=gen)]
    seed = torch.randint(-(2**62), 2**62, (R,), generator=gen)
    return U, anchor, head, T, seed, hidden


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


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("kind", ["vanilla", "gated", "rnn"])
def test_block_follows_exact_law(backend, kind):
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
    out = draft(backend, U.expand(R, -1, -1), anchor, head, T, seed, 11, hidden=hidden)
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


def biased_markov_sampler(bug, U, anchor_id, head, T, R, gen):
    """A vanilla Markov-head sampler (inverse CDF, torch.Generator) with one planted bug:

    None: correct; "no_bias": ignores the W2·W1 term; "wrong_temperature": samples at
    T = 1; "stale_prev": conditions every step on the anchor instead of x_{k-1};
    "transposed_w2": bias_v = W2[x]·W1[v] (embedding and unembedding swapped);
    "shared_uniform": one uniform per request for all steps (steps not independent).
    """
    w1, w2 = f64(head.w1), f64(head.w2)
    U = f64(U)
    gamma, V = U.shape
    prev = torch.full((R,), anchor_id, dtype=torch.int64)
    shared = torch.rand(R, generator=gen, dtype=torch.float64)
    tokens = torch.empty(R, gamma, dtype=torch.int64)
    for k in range(gamma):
        src = torch.full_like(prev, anchor_id) if bug == "stale_prev" else prev
        bias = w1[src] @ w2.T
        if bug == "no_bias":
            bias = torch.zeros_like(bias)
        if bug == "transposed_w2":
            bias = w2[src] @ w1.T
        t = 1.0 if bug == "wrong_temperature" else T
        p = torch.softmax((U[k] + bias) / t, dim=-1)
        u = shared if bug == "shared_uniform" else torch.rand(R, generator=gen, dtype=torch.float64)
        x = (torch.cumsum(p, -1) < u[:, None]).sum(-1).clamp(max=V - 1)
        tokens[:, k] = x
        prev = x
    return tokens


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
]


def _head_id(c):
    parts = [c["head_kind"]]
    if "bias" in c:
        parts.append("bias" if c["bias"] else "nobias")
    if c.get("conf"):
        parts.append("conf" + ("" if c.get("conf_bias", True) else "-nob") + ("-sts" if "sts" in c else ""))
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
    rb = head.rnn_bias.double().tolist() if head.rnn_bias is not None else [0.0] * r
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
                x_in = emb + state
                state = [math.tanh(sum(a * b for a, b in zip(rw[j], x_in)) + rb[j]) for j in range(r)]
                e = state
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
    out = draft(backend, U, anchor, head, T, seed, 3, hidden=hidden if kind == "gated" else None, probs=True)
    assert torch.equal(out.tokens, expected)
    assert bool((out.token_probs == 1).all())
    onehot = torch.zeros(R, gamma, V).scatter_(-1, expected.long()[..., None], 1.0)
    assert torch.equal(out.draft_probs, onehot)
    # Markov dependence matters: with the bias removed the path changes somewhere.
    plain = U.argmax(-1).to(torch.int32)
    assert not torch.equal(plain, expected)
    other = draft(backend, U, anchor, head, T, seed * 3 + 1, 2**40, hidden=hidden if kind == "gated" else None)
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
# 9. Bad input
# ---------------------------------------------------------------------------

BR, BG, BV, BRANK, BD = 3, 2, 6, 4, 5


def _good(kind="gated"):
    gen = torch.Generator().manual_seed(61)
    head = make_head(kind, BV, BRANK, BD, gen, conf=True, sts=[1.0, 2.0])
    return dict(
        base_logits=torch.randn(BR, BG, BV, generator=gen),
        anchor=torch.tensor([0, 5, 2]),
        w1=head.w1,
        w2=head.w2,
        temperature=torch.tensor([1.0, 0.0, 0.5]),
        seed=torch.tensor([1, 2, 3]),
        offset=torch.tensor(0),
        hidden=torch.randn(BR, BG, BD, generator=gen),
        **head.kwargs(),
    )


def _set(name, value):
    return lambda d: {**d, name: value(d[name]) if callable(value) else value}


def _at(i, v):
    """Replace element i of a 1-d tensor (or of the flattened tensor) by v."""

    def f(t):
        t = t.clone()
        t.view(-1)[i] = v
        return t

    return f


def _rnn(d):
    d = dict(d, gate_weight=None, gate_bias=None)
    gen = torch.Generator().manual_seed(62)
    d["rnn_weight"] = torch.randn(BRANK, 2 * BRANK, generator=gen)
    d["rnn_bias"] = torch.randn(BRANK, generator=gen)
    return d


def _too_long(d):
    return dict(base_logits=torch.zeros(0, rng.MAX_POSITION, BV), anchor=torch.zeros(0, dtype=torch.int64),
                w1=d["w1"], w2=d["w2"], temperature=torch.zeros(0), seed=torch.zeros(0, dtype=torch.int64),
                offset=d["offset"])


BAD_INPUTS = [
    # base_logits
    ("base_logits_rank", _set("base_logits", lambda t: t[:, 0]), ValueError, "base_logits"),
    ("base_logits_dtype_int", _set("base_logits", lambda t: t.long()), TypeError, "base_logits"),
    ("base_logits_dtype_f64", _set("base_logits", lambda t: t.double()), TypeError, "base_logits"),
    ("base_logits_no_vocab", _set("base_logits", lambda t: t[..., :0]), ValueError, "base_logits"),
    ("base_logits_gamma_too_long", _too_long, ValueError, "base_logits"),
    ("base_logits_nan", _set("base_logits", _at(7, math.nan)), ValueError, "base_logits"),
    ("base_logits_pos_inf", _set("base_logits", _at(7, math.inf)), ValueError, "base_logits"),
    ("base_logits_row_all_neg_inf", _set("base_logits", lambda t: t.index_fill(1, torch.tensor([1]), -math.inf)),
     ValueError, "base_logits"),
    ("w1_nan", _set("w1", _at(3, math.nan)), ValueError, "w1"),
    ("w2_nan", _set("w2", _at(5, math.nan)), ValueError, "w2"),
    ("w2_inf", _set("w2", _at(5, math.inf)), ValueError, "w2"),
    ("hidden_nan", _set("hidden", _at(2, math.nan)), ValueError, "hidden"),
    ("conf_weight_nan", _set("conf_weight", _at(1, math.nan)), ValueError, "conf_weight"),
    ("gate_weight_nan", _set("gate_weight", _at(4, math.nan)), ValueError, "gate_weight"),
    # anchor
    ("anchor_rank", _set("anchor", lambda t: t[:, None]), ValueError, "anchor"),
    ("anchor_shape", _set("anchor", lambda t: t[:-1]), ValueError, "anchor"),
    ("anchor_dtype_float", _set("anchor", lambda t: t.float()), TypeError, "anchor"),
    ("anchor_dtype_int16", _set("anchor", lambda t: t.to(torch.int16)), TypeError, "anchor"),
    ("anchor_negative", _set("anchor", _at(1, -1)), ValueError, "anchor"),
    ("anchor_equal_to_vocab", _set("anchor", _at(1, BV)), ValueError, "anchor"),
    # weights
    ("w1_rank", _set("w1", lambda t: t[:, 0]), ValueError, "w1"),
    ("w1_dtype", _set("w1", lambda t: t.double()), TypeError, "w1"),
    ("w1_vocab_mismatch", _set("w1", lambda t: torch.cat([t, t[:1]])), ValueError, "w1"),
    ("w2_rank", _set("w2", lambda t: t[None]), ValueError, "w2"),
    ("w2_dtype", _set("w2", lambda t: t.long()), TypeError, "w2"),
    ("w2_vocab_mismatch", _set("w2", lambda t: t[:-1]), ValueError, "w2"),
    ("w2_rank_mismatch", _set("w2", lambda t: torch.cat([t, t[:, :1]], 1)), ValueError, "w2"),
    ("w2_transposed_layout", _set("w2", lambda t: t.t().contiguous()), ValueError, "w2"),
    # temperature
    ("temperature_rank", _set("temperature", lambda t: t[None]), ValueError, "temperature"),
    ("temperature_shape", _set("temperature", lambda t: t[:-1]), ValueError, "temperature"),
    ("temperature_dtype", _set("temperature", lambda t: t.long()), TypeError, "temperature"),
    ("temperature_nan", _set("temperature", _at(0, math.nan)), ValueError, "temperature"),
    ("temperature_inf", _set("temperature", _at(0, math.inf)), ValueError, "temperature"),
    ("temperature_neg_inf", _set("temperature", _at(0, -math.inf)), ValueError, "temperature"),
    ("temperature_negative", _set("temperature", _at(2, -0.5)), ValueError, "temperature"),
    # seed, offset
    ("seed_rank", _set("seed", lambda t: t[:, None]), ValueError, "seed"),
    ("seed_shape", _set("seed", lambda t: torch.cat([t, t])), ValueError, "seed"),
    ("seed_dtype_int32", _set("seed", lambda t: t.int()), TypeError, "seed"),
    ("seed_dtype_float", _set("seed", lambda t: t.double()), TypeError, "seed"),
    ("offset_shape", _set("offset", torch.tensor([0, 1])), ValueError, "offset"),
    ("offset_rank", _set("offset", torch.tensor([[0]])), ValueError, "offset"),
    ("offset_dtype", _set("offset", torch.tensor(0, dtype=torch.int32)), TypeError, "offset"),
    # hidden
    ("hidden_rank", _set("hidden", lambda t: t[:, 0]), ValueError, "hidden"),
    ("hidden_shape", _set("hidden", lambda t: t[:, :1]), ValueError, "hidden"),
    ("hidden_dtype", _set("hidden", lambda t: t.double()), TypeError, "hidden"),
    # confidence head
    ("conf_weight_shape", _set("conf_weight", lambda t: t[:-1]), ValueError, "conf_weight"),
    ("conf_weight_rank", _set("conf_weight", lambda t: t[None]), ValueError, "conf_weight"),
    ("conf_weight_dtype", _set("conf_weight", lambda t: t.double()), TypeError, "conf_weight"),
    ("conf_weight_without_hidden", lambda d: dict(d, hidden=None, gate_weight=None, gate_bias=None), ValueError,
     "conf_weight"),
    ("conf_bias_shape", _set("conf_bias", torch.tensor([0.1, 0.2])), ValueError, "conf_bias"),
    ("conf_bias_rank", _set("conf_bias", torch.tensor([[0.1]])), ValueError, "conf_bias"),
    ("conf_bias_dtype", _set("conf_bias", torch.tensor(1)), TypeError, "conf_bias"),
    ("conf_bias_without_conf_weight", lambda d: dict(d, conf_weight=None, sts_temperature=None), ValueError,
     "conf_bias"),
    ("sts_temperature_shape", _set("sts_temperature", torch.ones(BG + 1)), ValueError, "sts_temperature"),
    ("sts_temperature_rank", _set("sts_temperature", torch.ones(1, BG)), ValueError, "sts_temperature"),
    ("sts_temperature_dtype", _set("sts_temperature", torch.ones(BG, dtype=torch.int64)), TypeError,
     "sts_temperature"),
    ("sts_temperature_zero", _set("sts_temperature", _at(1, 0.0)), ValueError, "sts_temperature"),
    ("sts_temperature_negative", _set("sts_temperature", _at(0, -1.0)), ValueError, "sts_temperature"),
    ("sts_temperature_nan", _set("sts_temperature", _at(0, math.nan)), ValueError, "sts_temperature"),
    ("sts_temperature_inf", _set("sts_temperature", _at(0, math.inf)), ValueError, "sts_temperature"),
    ("sts_temperature_without_conf_weight", lambda d: dict(d, conf_weight=None, conf_bias=None), ValueError,
     "sts_temperature"),
    # gated head
    ("gate_weight_shape", _set("gate_weight", lambda t: t[:, :BD]), ValueError, "gate_weight"),
    ("gate_weight_rank", _set("gate_weight", lambda t: t[0]), ValueError, "gate_weight"),
    ("gate_weight_dtype", _set("gate_weight", lambda t: t.double()), TypeError, "gate_weight"),
    ("gate_weight_without_hidden",
     lambda d: dict(d, hidden=None, conf_weight=None, conf_bias=None, sts_temperature=None), ValueError,
     "gate_weight"),
    ("gate_bias_shape", _set("gate_bias", lambda t: t[:-1]), ValueError, "gate_bias"),
    ("gate_bias_dtype", _set("gate_bias", lambda t: t.double()), TypeError, "gate_bias"),
    ("gate_bias_without_gate_weight", lambda d: dict(d, gate_weight=None), ValueError, "gate_bias"),
    ("gate_and_rnn_weight", lambda d: dict(_rnn(d), gate_weight=d["gate_weight"]), ValueError,
     "gate_weight.*rnn_weight"),
    # RNN head
    ("rnn_weight_shape", lambda d: dict(_rnn(d), rnn_weight=torch.zeros(BRANK, BRANK)), ValueError, "rnn_weight"),
    ("rnn_weight_rank", lambda d: dict(_rnn(d), rnn_weight=torch.zeros(2 * BRANK)), ValueError, "rnn_weight"),
    ("rnn_weight_dtype", lambda d: dict(_rnn(d), rnn_weight=torch.zeros(BRANK, 2 * BRANK, dtype=torch.float64)),
     TypeError, "rnn_weight"),
    ("rnn_bias_shape", lambda d: dict(_rnn(d), rnn_bias=torch.zeros(2 * BRANK)), ValueError, "rnn_bias"),
    ("rnn_bias_dtype", lambda d: dict(_rnn(d), rnn_bias=torch.zeros(BRANK, dtype=torch.int32)), TypeError,
     "rnn_bias"),
    ("rnn_bias_without_rnn_weight", lambda d: dict(_rnn(d), rnn_weight=None), ValueError, "rnn_bias"),
]


@pytest.fixture
def value_checks_on():
    """Value checks run on CPU always; on CUDA only in debug mode."""
    was = dk.debug_enabled()
    dk.set_debug(True)
    yield
    dk.set_debug(was)


def _call_raw(backend, d):
    return dk.markov_draft(**{k: _dev(v) for k, v in d.items()}, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mutate,exc,match", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(backend, mutate, exc, match, value_checks_on):
    d = _good()
    if not _interpreted(backend):
        _call_raw(backend, d)  # the unmodified inputs are fine
        _call_raw(backend, _rnn(d))
    with pytest.raises(exc, match=match):
        _call_raw(backend, mutate(dict(d)))


def test_allowed_edge_values(value_checks_on):
    """-inf logits (masked tokens), temperature 0 and sts/conf_bias as one-element tensors are valid;
    a masked token is never drawn and has draft probability 0."""
    d = _good()
    d["base_logits"][:, :, 1] = -math.inf
    d["conf_bias"] = torch.tensor([0.2])
    out = _call_raw("reference", dict(d, return_draft_probs=True))
    assert not bool((out.tokens == 1).any())
    assert bool((out.draft_probs[..., 1] == 0).all())


ARGUMENTS = ["base_logits", "anchor", "w1", "w2", "temperature", "seed", "offset", "hidden", "conf_weight",
             "conf_bias", "sts_temperature", "gate_weight", "gate_bias", "rnn_weight", "rnn_bias"]


@pytest.mark.parametrize("name", ARGUMENTS)
def test_device_mismatch_names_the_argument(name):
    """One argument on another device. With CUDA: that argument on the CPU; without it, on the
    meta device (the op then dispatches to its fake, which runs the same argument checks)."""
    d = _rnn(_good()) if name.startswith("rnn") else _good()
    if torch.cuda.is_available():
        d = {k: (v.cuda() if k != name and isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    else:
        d[name] = d[name].to("meta")
    with pytest.raises(ValueError, match=f"{name}.*device|device.*{name}"):
        dk.markov_draft(**d, backend="reference")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="a mismatch between two real accelerators needs two GPUs")
def test_device_mismatch_between_gpus():
    d = {k: (v.to("cuda:0") if isinstance(v, torch.Tensor) else v) for k, v in _good().items()}
    d["seed"] = d["seed"].to("cuda:1")
    with pytest.raises(ValueError, match="seed"):
        dk.markov_draft(**d, backend="reference")


# ---------------------------------------------------------------------------
# 10. opcheck for the variants test_registry.py does not cover
# ---------------------------------------------------------------------------
# tests/test_registry.py runs opcheck and torch.compile(fullgraph=True) on the
# gated head with a confidence head and both draft outputs. The fake's other
# branches (no confidence head and no draft outputs: 0-element outputs; the RNN
# head; an empty batch) are checked here.


def _raw_args(d, probs, logits):
    names = ["base_logits", "anchor", "w1", "w2", "temperature", "seed", "offset", "hidden", "conf_weight",
             "conf_bias", "sts_temperature", "gate_weight", "gate_bias", "rnn_weight", "rnn_bias"]
    return tuple(d.get(n) for n in names) + (probs, logits, "")


@pytest.mark.parametrize("variant", ["vanilla-bare", "rnn-conf-logits", "empty-batch"])
def test_opcheck_other_variants(variant):
    d = _good()
    d.update(gate_weight=None, gate_bias=None)
    if variant == "vanilla-bare":
        d.update(hidden=None, conf_weight=None, conf_bias=None, sts_temperature=None)
        args = _raw_args(d, False, False)
    elif variant == "rnn-conf-logits":
        args = _raw_args(_rnn(d), False, True)
    else:
        d.update(base_logits=d["base_logits"][:0], anchor=d["anchor"][:0], temperature=d["temperature"][:0],
                 seed=d["seed"][:0], hidden=d["hidden"][:0])
        args = _raw_args(d, True, False)
    torch.library.opcheck(torch.ops.dspark.markov_draft.default, args)
