"""A toy target model and drafter for rejection sampling, and the lossless checks.

ChainModel drives a toy autoregressive "target model" and "drafter" over a
small vocabulary: every prefix of tokens is a state with its own target
logits and draft distribution, so target row j of a request really is the
target's prediction after drafts 1..j, and the drafts are themselves sampled
from q (torch.multinomial with a fixed generator).

- expected_probs / softmax_t: an independent implementation of the
  temperature / top-k / top-p semantics documented in the module docstring of
  dspark_kernels/reference/sampling.py (pairwise comparisons, no sorting);
- Cfg, ChainModel: the model, its op inputs, and its exact answers
  (brute-force enumeration of the emitted block, target joint, P(num_accepted));
- check_lossless: every statistical check of one Monte Carlo run (of the real
  op, and of biased.biased_rejection_sample, which it must reject);
- cu_from_lengths, random_batch: ragged offsets and random mixed batches.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from stats import ALPHA, assert_follows, assert_rate, counts_of


def cu_from_lengths(lengths):
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths.long() + 1, 0)
    return cu


def expected_probs(logits, temperature, top_k=None, top_p=None):
    """Target distribution [N, V] float64 of logits [N, V] (reference/sampling.py docstring).

    z = logits / T; top-k keeps exactly k tokens: z_i iff fewer than k tokens
    come before i in the order (z descending, id ascending), so ties at the
    k-th value go to the lower ids (k <= 0 or k >= V: off); top-p then keeps i
    iff the mass of the survivors strictly more probable than i is < top_p
    (top_p >= 1: off); renormalise. T == 0: one-hot at the first argmax.
    """
    logits = torch.as_tensor(logits).to(torch.float64)
    if logits.dim() == 1:
        logits = logits[None]
    n, vocab = logits.shape
    if temperature == 0:
        out = torch.zeros_like(logits)
        for i in range(n):
            row = logits[i].tolist()
            out[i, row.index(max(row))] = 1.0
        return out
    z = logits / float(temperature)
    if top_k is not None and 0 < int(top_k) < vocab:
        ids = torch.arange(vocab)
        before = (z[:, None, :] > z[:, :, None]) | ((z[:, None, :] == z[:, :, None]) & (ids[None, :] < ids[:, None]))
        rank = before.sum(-1)  # [n, i] = #{j before i}
        z = torch.where(rank < int(top_k), z, torch.full_like(z, -math.inf))
    p = torch.softmax(z, dim=-1)
    if top_p is not None and float(top_p) < 1.0:
        mass_above = (p[:, None, :] * (p[:, None, :] > p[:, :, None])).sum(-1)
        p = torch.where(mass_above < float(top_p), p, torch.zeros_like(p))
        p = p / p.sum(-1, keepdim=True)
    return p


def softmax_t(logits, temperature):
    """softmax(logits / T) in float64; T == 0: one-hot at the first argmax."""
    return expected_probs(logits, temperature)


@dataclass(frozen=True)
class Cfg:
    V: int = 5
    gamma: int = 2
    L: int = 2  # lengths of every request (drafts past L are ignored)
    T: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    mode: str = "probs"  # "probs" (draft_probs), "onehot" (None), "logits" (byte-minimal)
    draft_T: float | None = 1.0  # drafter temperature ("logits" mode: None = default T)
    markov: bool = False  # state = last token only (long chains) instead of the whole prefix
    seed: int = 0

    @property
    def q_temperature(self):
        if self.mode == "logits" and self.draft_T is None:
            return self.T
        return self.draft_T


class ChainModel:
    """States are prefixes: 0 is the anchor, child(s, x) = s * V + 1 + x (a V-ary tree),
    or, with markov=True, child(s, x) = 1 + x (the last token only)."""

    def __init__(self, cfg: Cfg):
        self.cfg = cfg
        V = cfg.V
        self.n_states = V + 1 if cfg.markov else sum(V**j for j in range(cfg.gamma + 1))
        g = torch.Generator().manual_seed(1000 + cfg.seed)
        base = torch.randn(self.n_states, V, generator=g, dtype=torch.float64)
        self.target_logits = (1.4 * base).float()
        # A drafter correlated with the target, so that acceptance is neither 0 nor 1.
        self.draft_logits = (1.2 * base + 0.9 * torch.randn(self.n_states, V, generator=g, dtype=torch.float64)).float()
        self.p = expected_probs(self.target_logits, cfg.T, cfg.top_k, cfg.top_p)  # [S, V]
        if cfg.mode == "onehot":
            self.q = softmax_t(self.draft_logits, 0.0)  # the drafter is greedy: q is a point mass
        else:
            self.q = softmax_t(self.draft_logits, cfg.q_temperature)
        self._p_list = self.p.tolist()
        self._q_list = self.q.tolist()

    def child(self, state, token):
        if self.cfg.markov:
            return 1 + token
        return state * self.cfg.V + 1 + token

    # -- Monte Carlo --------------------------------------------------------

    def draft(self, R, gen):
        """Sample drafts from q: tokens [R, γ] and the state of every target row [R, γ + 1]."""
        state = torch.zeros(R, dtype=torch.int64)
        states, tokens = [state], []
        for _ in range(self.cfg.gamma):
            x = torch.multinomial(self.q[state], 1, generator=gen).squeeze(1)
            tokens.append(x)
            state = self.child(state, x)
            states.append(state)
        gamma = self.cfg.gamma
        drafts = torch.stack(tokens, 1) if gamma else torch.zeros(R, 0, dtype=torch.int64)
        return drafts, torch.stack(states, 1)

    def inputs(self, R, gen, lengths=None):
        """Op arguments for R requests (same model, drafts sampled from q, seeds 0..R-1)."""
        cfg = self.cfg
        drafts, states = self.draft(R, gen)
        if lengths is None:
            lengths = torch.full((R,), cfg.L, dtype=torch.int32)
        cu = cu_from_lengths(lengths)
        live_rows = torch.arange(cfg.gamma + 1)[None, :] <= lengths[:, None].long()
        target_logits = self.target_logits[states[live_rows]]  # row cu[r] + j <- state of prefix j
        kw = {}
        draft_states = states[:, : cfg.gamma]
        if cfg.mode == "probs":
            draft_probs = self.q[draft_states].float()
        else:
            draft_probs = None
        if cfg.mode == "logits":
            kw["draft_logits"] = self.draft_logits[draft_states]
            kw["draft_token_probs"] = self.q[draft_states].gather(-1, drafts[..., None]).squeeze(-1).float()
            if cfg.draft_T is not None:
                kw["draft_temperature"] = torch.full((R,), cfg.draft_T)
        if cfg.top_k is not None:
            kw["top_k"] = torch.full((R,), cfg.top_k, dtype=torch.int32)
        if cfg.top_p is not None:
            kw["top_p"] = torch.full((R,), cfg.top_p)
        args = (target_logits, drafts.to(torch.int32), draft_probs, lengths, cu,
                torch.full((R,), float(cfg.T)), torch.arange(R, dtype=torch.int64))
        return args, kw

    def complete(self, tokens, n_acc, length, gen):
        """Extend each emitted block to `length` tokens by sampling the target itself."""
        R = tokens.shape[0]
        seq = torch.zeros(R, length, dtype=torch.int64)
        state = torch.zeros(R, dtype=torch.int64)
        n = n_acc.long()
        for k in range(length):
            drawn = torch.multinomial(self.p[state], 1, generator=gen).squeeze(1)
            seq[:, k] = torch.where(k <= n, tokens[:, k].long(), drawn)
            if k + 1 < length:
                state = self.child(state, seq[:, k])
        return seq

    # -- exact answers --------------------------------------------------------

    def enumerate_outcomes(self, L):
        """Exact distribution {emitted block (tuple): probability} by brute force.

        Walks the tree of outcomes of the algorithm: draft x ~ q, accept with
        probability min(1, p(x)/q(x)), else emit one token of
        norm(max(0, p - q)) (p when that is empty), or the bonus from p after
        L acceptances.
        """
        V = self.cfg.V
        out = defaultdict(float)

        def visit(state, depth, prefix, prob):
            p = self._p_list[state]
            if depth == L:
                for y in range(V):
                    if p[y] > 0:
                        out[prefix + (y,)] += prob * p[y]
                return
            q = self._q_list[state]
            residual = [max(0.0, p[y] - q[y]) for y in range(V)]
            mass = sum(residual)
            if mass <= 0:
                residual, mass = list(p), 1.0
            for x in range(V):
                if q[x] <= 0:
                    continue
                a = min(1.0, p[x] / q[x])
                if a > 0:
                    visit(self.child(state, x), depth + 1, prefix + (x,), prob * q[x] * a)
                if a < 1:
                    for y in range(V):
                        if residual[y] > 0:
                            out[prefix + (y,)] += prob * q[x] * (1 - a) * residual[y] / mass

        visit(0, 0, (), 1.0)
        return dict(out)

    def target_joint(self, length):
        """{sequence: probability} of `length` tokens sampled autoregressively from the target."""
        V = self.cfg.V
        out = {}
        for seq in itertools.product(range(V), repeat=length):
            prob, state = 1.0, 0
            for k, y in enumerate(seq):
                prob *= self._p_list[state][y]
                if prob == 0:
                    break
                if k + 1 < length:
                    state = self.child(state, y)
            out[seq] = prob
        return out

    def accepted_count_dist(self, L):
        """Exact P(num_accepted = j), j = 0..L (dynamic programming over states)."""
        mass = {0: 1.0}
        dist = [0.0] * (L + 1)
        for j in range(L):
            nxt = defaultdict(float)
            for s, m in mass.items():
                p, q = self._p_list[s], self._q_list[s]
                keep = [min(a, b) for a, b in zip(p, q)]
                dist[j] += m * (1.0 - sum(keep))
                for x, k in enumerate(keep):
                    if k > 0:
                        nxt[self.child(s, x)] += m * k
            mass = nxt
        dist[L] = sum(mass.values())
        return dist


def _encode(seqs, V):
    """Blocks [R, n] with -1 padding -> integer codes (base V + 1, digit = token + 1)."""
    seqs = seqs.long()
    weights = (V + 1) ** torch.arange(seqs.shape[1], dtype=torch.int64)
    return ((seqs + 1) * weights).sum(1)


def _follows_table(samples_codes, table, what, V):
    keys = list(table.keys())
    probs = torch.tensor([table[k] for k in keys], dtype=torch.float64)
    key_codes = _encode(_pad_keys(keys), V)
    index = {int(c): i for i, c in enumerate(key_codes.tolist())}
    uniq, cnt = torch.unique(samples_codes, return_counts=True)
    counts = torch.zeros(len(keys), dtype=torch.float64)
    unknown = []
    for c, n in zip(uniq.tolist(), cnt.tolist()):
        if c in index:
            counts[index[c]] += n
        else:
            unknown.append((c, n))
    assert not unknown, f"{what}: {len(unknown)} emitted blocks are impossible (codes {unknown[:5]})"
    labels = ["".join(map(str, k)) for k in keys]
    assert_follows(counts, probs, ALPHA, labels=labels, what=what)


def _pad_keys(keys):
    width = max(len(k) for k in keys)
    return torch.tensor([list(k) + [-1] * (width - len(k)) for k in keys])


def check_lossless(model: ChainModel, tokens, n_acc, gen, *, enumeration=True):
    """All the statistical checks of one Monte Carlo run (raises AssertionError)."""
    cfg = model.cfg
    V, L = cfg.V, cfg.L
    R = tokens.shape[0]
    first = tokens[:, 0].long()
    # 1. The first emitted token (accepted draft 1, residual or bonus) follows p_0.
    assert_follows(counts_of(first, V), model.p[0], ALPHA, what="first emitted token vs p_0")
    if L >= 1:
        accepted = n_acc >= 1
        keep = torch.minimum(model.p[0], model.q[0])
        # 2. Acceptance rate of draft 1 = sum_x min(p_0(x), q_1(x)).
        assert_rate(int(accepted.sum()), R, float(keep.sum()), ALPHA, what="acceptance rate of draft 1")
        # 3. Among accepted rows: P(draft 1 = a, next token = b) ∝ min(p_0, q_1)(a) * p_1(b | a).
        children = torch.tensor([model.child(0, a) for a in range(V)])
        joint = keep[:, None] * model.p[children]
        pair = first[accepted] * V + tokens[accepted, 1].long()
        assert_follows(counts_of(pair, V * V), (joint / joint.sum()).reshape(-1), ALPHA,
                       labels=[f"{a},{b}" for a in range(V) for b in range(V)],
                       what="(draft 1, next token) given draft 1 accepted vs min(p0,q1)*p1(.|a)")
    # 4. The whole emitted block vs the brute-force enumeration of the algorithm.
    if enumeration:
        block = tokens[:, : L + 1]
        _follows_table(_encode(block, V), model.enumerate_outcomes(L), "emitted block vs exact enumeration", V)
    # 5. Completed with target samples, the block follows the target's joint distribution.
    seq = model.complete(tokens, n_acc, L + 1, gen)
    _follows_table(_encode(seq, V), model.target_joint(L + 1), "completed block vs target joint", V)


def random_batch(R=64, V=7, gamma=4, seed=0, mode="probs"):
    """Random requests of mixed lengths, temperatures (some greedy), top-k and top-p."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, gamma + 1, (R,), generator=g, dtype=torch.int32)
    cu = cu_from_lengths(lengths)
    T = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (R,), generator=g)]
    top_k = torch.tensor([0, 2, V - 1, V + 3], dtype=torch.int32)[torch.randint(0, 4, (R,), generator=g)]
    top_p = torch.tensor([1.0, 0.7, 0.9])[torch.randint(0, 3, (R,), generator=g)]
    target_logits = 1.5 * torch.randn(int(cu[-1]), V, generator=g)
    q_logits = 1.5 * torch.randn(R, gamma, V, generator=g)
    q = torch.softmax(q_logits, -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(R, gamma).to(torch.int32)
    seeds = torch.randint(-(2**62), 2**62, (R,), generator=g)
    kw = dict(top_k=top_k, top_p=top_p)
    probs = None
    if mode == "probs":
        probs = q
    elif mode == "logits":
        kw.update(draft_logits=q_logits, draft_token_probs=q.gather(-1, drafts.long()[..., None]).squeeze(-1),
                  draft_temperature=torch.ones(R))
    return [target_logits, drafts, probs, lengths, cu, T, seeds], kw
