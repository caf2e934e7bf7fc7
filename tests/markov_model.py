"""The Markov head as a model: weights, random inputs, and its law in float64.

The float64 code never calls the library's reference: it splits the
concatenations into two matmuls, works in float64 and enumerates the whole
tree of prefixes for the exact law of a block (DeepSpec semantics: w1 is the
nn.Embedding [V, r], w2 the nn.Linear(r, V) weight [V, r], so the Markov bias
of token x is W2 · W1[x]):

    e_k = W1[x_{k-1}]                                   vanilla head
    e_k = σ(Wg·[h_k; W1[x_{k-1}]] + bg) ⊙ W1[x_{k-1}]   gated head
    e_k = s_k = tanh(Wr·[W1[x_{k-1}]; s_{k-1}] + br)    RNN head, s_0 = 0
    z_k = U_k + W2·e_k,  x_k ~ softmax(z_k / T)  (first argmax of z_k when T = 0)
    c_k = σ((w·[h_k; W1[x_{k-1}]] + b) / τ_k),  a_k = Π_{i<=k} c_i

- Head, make_head, needs_hidden, random_inputs: head weights and op inputs;
- head_input64, confidence64, law64, exact_path, block_law: the formulas;
- gumbel_race64, race_margins: the documented Gumbel-max draw, recomputed;
- check_block: the chi-square harness of sampled blocks against block_law (its
  test_harness_rejects_biased_sampler feeds it biased.biased_markov_sampler);
- small_inputs, with_rnn_head: small valid keyword arguments (bad-input table, opcheck).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from dspark_kernels import rng

from stats import ALPHA, assert_follows, counts_of


@dataclass(frozen=True)
class Head:
    """The weights of one Markov head (CPU tensors)."""

    kind: str  # "vanilla" | "gated" | "rnn"
    w1: torch.Tensor  # [V, r] embedding
    w2: torch.Tensor  # [V, r] nn.Linear(r, V).weight
    gate_weight: torch.Tensor | None = None  # [r, d + r]
    gate_bias: torch.Tensor | None = None  # [r]
    rnn_weight: torch.Tensor | None = None  # [3r, 2r + d]: DeepSpec's joint_proj (rows gate, candidate, output)
    rnn_bias: torch.Tensor | None = None  # [3r]
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


def make_head(kind, V, r, d, gen, *, bias=True, conf=False, conf_bias=True, sts=None, markov_scale=1.0,
              conf_markov=True):
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
        kw["rnn_weight"] = 2.0 * torch.randn(3 * r, 2 * r + d, generator=gen) / math.sqrt(2 * r + d)
        if bias:
            kw["rnn_bias"] = 0.5 * torch.randn(3 * r, generator=gen)
    else:
        assert kind == "vanilla"
    if conf:
        # conf_markov=False: DeepSpec's confidence head without the Markov feature (weight [1, d]).
        n = d + r if conf_markov else d
        kw["conf_weight"] = torch.randn(n, generator=gen) / math.sqrt(n)
        if conf_bias:
            kw["conf_bias"] = torch.tensor(0.3)
        if sts is not None:
            kw["sts"] = torch.as_tensor(sts, dtype=torch.float32)
    return Head(kind, w1, w2, **kw)


def needs_hidden(head):
    return head.kind in ("gated", "rnn") or head.conf_weight is not None


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
        # DSpark eq. 6 / DeepSpec RNNHead, written out: z = [s; emb; h], [g; c; o] = Wr z + br,
        # s' = σ(g) s + (1 - σ(g)) tanh(c), e = tanh(o).
        wr = f64(head.rnn_weight)
        pre = state @ wr[:, :r].T + emb @ wr[:, r:2 * r].T + h @ wr[:, 2 * r:].T
        if head.rnn_bias is not None:
            pre = pre + f64(head.rnn_bias)
        g, c, o = pre[:, :r], pre[:, r:2 * r], pre[:, 2 * r:]
        state = torch.sigmoid(g) * state + (1 - torch.sigmoid(g)) * torch.tanh(c)
        return torch.tanh(o), state
    return emb, state


def confidence64(head, emb, h, k):
    cw = f64(head.conf_weight)
    d = h.shape[-1]
    logit = h @ cw[:d] + (emb @ cw[d:] if cw.numel() > d else 0.0)  # [d] alone: no Markov feature
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


# Small inputs: the base of the bad-input table (tests/test_validation.py) and of opcheck.
SMALL_R, SMALL_G, SMALL_V, SMALL_RANK, SMALL_D = 3, 2, 6, 4, 5


def small_inputs(kind="gated"):
    """Keyword arguments of dk.markov_draft (CPU): R = 3 requests, γ = 2, V = 6, a `kind` head
    (rank 4) with a confidence head (d = 5) and STS temperatures."""
    gen = torch.Generator().manual_seed(61)
    head = make_head(kind, SMALL_V, SMALL_RANK, SMALL_D, gen, conf=True, sts=[1.0, 2.0])
    return dict(
        base_logits=torch.randn(SMALL_R, SMALL_G, SMALL_V, generator=gen),
        anchor=torch.tensor([0, 5, 2]),
        w1=head.w1,
        w2=head.w2,
        temperature=torch.tensor([1.0, 0.0, 0.5]),
        seed=torch.tensor([1, 2, 3]),
        offset=torch.tensor(0),
        hidden=torch.randn(SMALL_R, SMALL_G, SMALL_D, generator=gen),
        **head.kwargs(),
    )


def with_rnn_head(d):
    """small_inputs with the gate replaced by an RNN head (rnn_weight [3r, 2r + d], rnn_bias [3r])."""
    d = dict(d, gate_weight=None, gate_bias=None)
    gen = torch.Generator().manual_seed(62)
    d["rnn_weight"] = torch.randn(3 * SMALL_RANK, 2 * SMALL_RANK + SMALL_D, generator=gen)
    d["rnn_bias"] = torch.randn(3 * SMALL_RANK, generator=gen)
    return d
