"""A toy target and drafter for token trees, the exact law of tree verification, and the lossless checks.

TreeModel puts a tree shape (parents, children tried in index order) on
rejection_model.ChainModel's prefix states: every prefix is a state with its
own target distribution p (independent top-k / top-p semantics:
rejection_model.expected_probs) and draft distribution q. A drafted tree is

- "probs": every node's token drawn from q(state of its parent), siblings
  i.i.d. (torch.multinomial, fixed generator); draft_probs of a node = that q;
- "onehot": deterministic candidates, the k-th child of a node carries the
  k-th most likely draft token at the node's state (distinct siblings).

exact_law computes, in float64 and independently of the op, the exact
distribution of the emitted block (accepted path + the final token) under the
algorithm of the op's docstring, by recursion over the tree: at a node with
residual w, a child's token x (summed over x ~ q for sampled drafts) is
accepted with probability min(1, w(x)/q(x)); the rejected branch continues
with normalise(max(w - q, 0)), which for sampled drafts does not depend on x
(that is why siblings must be i.i.d.), so the recursion is polynomial. The
same function with ``bug=`` gives the law of a planted bug:

- "residual_not_updated": every sibling is tested against the node's own p
  (the final draw still uses the right residual);
- "mass_not_renormalised": the residual w <- max(w - q, 0) is not
  renormalised (the op's M is dropped), so later siblings are accepted with
  min(1, w(x)/q(x)) for a w of mass < 1.

lossless_gap compares a law, completed by the target to a fixed length, with
the target's joint distribution (0 up to float64 rounding iff lossless).
check_tree_lossless runs every statistical check on op samples; sampling
from a biased exact law (sample_law) gives a sampler with that bug, which
the same checks must reject.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from rejection_model import Cfg, ChainModel, _encode, _follows_table, cu_from_lengths
from stats import ALPHA, assert_follows, counts_of


@dataclass(frozen=True)
class TreeCfg:
    parents: tuple  # the tree shape, topologically ordered
    V: int = 4
    T: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    mode: str = "probs"  # "probs" (sampled siblings) or "onehot" (deterministic candidates)
    seed: int = 0

    @property
    def depth(self) -> int:
        return max(depth_of(self.parents), default=0)


def depth_of(parents) -> list:
    """Depth of each node (root children: 1)."""
    d = []
    for i, par in enumerate(parents):
        d.append(1 if par < 0 else d[par] + 1)
    return d


def children_of(parents) -> dict:
    """{node (-1 = anchor): its children in index order}."""
    kids = defaultdict(list)
    for i, par in enumerate(parents):
        kids[par].append(i)
    return kids


def sibling_rank(parents) -> list:
    kids = children_of(parents)
    return [kids[par].index(i) for i, par in enumerate(parents)]


class TreeModel:
    def __init__(self, cfg: TreeCfg):
        self.cfg = cfg
        self.N = len(cfg.parents)
        self.chain = ChainModel(Cfg(V=cfg.V, gamma=cfg.depth, L=cfg.depth, T=cfg.T, top_k=cfg.top_k,
                                    top_p=cfg.top_p, mode="probs", draft_T=1.0, seed=cfg.seed))
        self.p = self.chain.p  # [S, V] float64 target distribution of every prefix state
        self.q = self.chain.q  # [S, V] float64 draft distribution
        self._p, self._q = self.p.tolist(), self.q.tolist()
        # Deterministic candidates: the draft's tokens by decreasing probability (ties: lower id).
        order = torch.sort(self.chain.draft_logits.double(), dim=-1, descending=True, stable=True).indices
        self._cand = order.tolist()
        self.kids = children_of(cfg.parents)
        self.rank = sibling_rank(cfg.parents)

    def child(self, state, token):
        return self.chain.child(state, token)

    # -- op inputs --------------------------------------------------------------

    def inputs(self, R, gen, num_nodes=None):
        """Op keyword arguments for R requests of this tree (seeds 0..R-1)."""
        cfg, N, V = self.cfg, self.N, self.cfg.V
        tokens = torch.zeros(R, N, dtype=torch.int64)
        states = torch.zeros(R, N + 1, dtype=torch.int64)  # column 0: the anchor, 1 + i: node i
        probs = torch.zeros(R, N, V, dtype=torch.float32)
        for i, par in enumerate(cfg.parents):
            s = states[:, par + 1]
            if cfg.mode == "probs":
                x = torch.multinomial(self.q[s], 1, generator=gen)[:, 0]
                probs[:, i] = self.q[s].float()
            else:
                x = torch.tensor(self._cand)[s, self.rank[i]]
            tokens[:, i] = x
            states[:, i + 1] = self.child(s, x)
        if num_nodes is None:
            num_nodes = torch.full((R,), N, dtype=torch.int32)
        cu = cu_from_lengths(num_nodes)
        live = torch.arange(N + 1)[None, :] <= num_nodes.long()[:, None]
        kw = dict(target_logits=self.chain.target_logits[states[live]], tree_tokens=tokens.to(torch.int32),
                  tree_parents=torch.tensor(cfg.parents, dtype=torch.int32).expand(R, N).contiguous(),
                  num_nodes=num_nodes, cu_verify=cu, temperature=torch.full((R,), float(cfg.T)),
                  seed=torch.arange(R, dtype=torch.int64), offset=torch.tensor(cfg.seed, dtype=torch.int64))
        if cfg.mode == "probs":
            kw["draft_probs"] = probs
        if cfg.top_k is not None:
            kw["top_k"] = torch.full((R,), cfg.top_k, dtype=torch.int32)
        if cfg.top_p is not None:
            kw["top_p"] = torch.full((R,), cfg.top_p)
        return kw, states

    # -- the exact law ------------------------------------------------------------

    def exact_law(self, bug=None) -> dict:
        """{emitted block (tuple): probability} of the algorithm (or of a planted bug), float64."""
        V, stochastic = self.cfg.V, self.cfg.mode == "probs"
        out = defaultdict(float)

        def emit(prefix, w, prob):
            mass = sum(w)
            for y in range(V):
                if w[y] > 0:
                    out[prefix + (y,)] += prob * w[y] / mass

        def node(v, state, prefix, prob):
            p = self._p[state]
            kids = self.kids.get(v, [])
            if not kids:
                emit(prefix, p, prob)
            else:
                siblings(kids, 0, state, p, p, prefix, prob)

        def siblings(kids, k, state, p, w, prefix, prob):
            """Child kids[k] of the node at `state`; w is the residual so far (normalised unless a bug)."""
            if k == len(kids):
                emit(prefix, w if sum(w) > 0 else p, prob)
                return
            c = kids[k]
            test = p if bug == "residual_not_updated" else w
            if stochastic:
                q = self._q[state]
                rest = 0.0
                for x in range(V):
                    if q[x] <= 0:
                        continue
                    acc = min(1.0, test[x] / q[x])
                    if acc > 0:
                        node(c, self.child(state, x), prefix + (x,), prob * q[x] * acc)
                    rest += q[x] * (1.0 - acc)
                nxt = [max(0.0, w[i] - q[i]) for i in range(V)]
            else:
                x = self._cand[state][self.rank[c]]
                acc = min(1.0, test[x])
                if acc > 0:
                    node(c, self.child(state, x), prefix + (x,), prob * acc)
                rest = 1.0 - acc
                nxt = [0.0 if i == x else w[i] for i in range(V)]
            total = sum(nxt)
            if total <= 0:
                nxt = w  # no residual mass: rejection had probability 0 (the op then keeps w too)
            elif bug != "mass_not_renormalised":
                nxt = [v / total for v in nxt]
            if rest > 1e-300:
                siblings(kids, k + 1, state, p, nxt, prefix, prob * rest)

        node(-1, 0, (), 1.0)
        return dict(out)

    def lossless_gap(self, law) -> float:
        """max |P(completed block = s) - P_target(s)| over sequences s of length depth + 1."""
        L = self.cfg.depth + 1
        joint = self.chain.target_joint(L)
        completed = defaultdict(float)
        for block, prob in law.items():
            for seq, tail in _completions(self, block, L):
                completed[seq] += prob * tail
        return max(abs(completed.get(s, 0.0) - v) for s, v in joint.items())


def _completions(model, block, L):
    """(sequence of length L extending block, target probability of the extension)."""
    V = model.cfg.V
    state = 0
    for y in block[:-1]:
        state = model.child(state, y)
    todo = [(tuple(block), state, 1.0)]
    while todo:
        seq, s, prob = todo.pop()
        if len(seq) == L:
            yield seq, prob
            continue
        s = model.child(s, seq[-1])
        for y in range(V):
            if model._p[s][y] > 0:
                todo.append((seq + (y,), s, prob * model._p[s][y]))


def sample_law(law, R, gen, width):
    """R blocks drawn from an exact law: (tokens [R, width] -1 padded, num_accepted [R]) as the op returns them."""
    keys = list(law)
    probs = torch.tensor([law[k] for k in keys], dtype=torch.float64)
    pick = torch.multinomial(probs / probs.sum(), R, replacement=True, generator=gen)
    table = torch.full((len(keys), width), -1, dtype=torch.int32)
    for i, k in enumerate(keys):
        table[i, : len(k)] = torch.tensor(k, dtype=torch.int32)
    lengths = torch.tensor([len(k) - 1 for k in keys], dtype=torch.int32)
    return table[pick], lengths[pick]


def check_tree_lossless(model: TreeModel, tokens, n_acc, gen, law=None):
    """Every statistical check of one Monte Carlo run (raises AssertionError)."""
    V = model.cfg.V
    first = tokens[:, 0].long()
    # 1. The first emitted token follows p_0.
    assert_follows(counts_of(first, V), model.p[0], ALPHA, what="first emitted token vs p_0")
    # 2. Among rows that emitted two tokens (first accepted = a), the second follows p(. | a): a test
    #    conditional on how often each a was accepted.
    two = n_acc >= 1
    if int(two.sum()):
        a, b = first[two], tokens[two, 1].long()
        n_a = counts_of(a, V).double()
        children = torch.tensor([model.child(0, x) for x in range(V)])
        expected = (n_a[:, None] / n_a.sum()) * model.p[children]
        assert_follows(counts_of(a * V + b, V * V), expected.reshape(-1), ALPHA,
                       labels=[f"{i},{j}" for i in range(V) for j in range(V)],
                       what="second token given the first was accepted vs p(.|first)")
    # 3. The whole emitted block vs the exact law of the algorithm.
    law = model.exact_law() if law is None else law
    width = max(len(k) for k in law)
    _follows_table(_encode(tokens[:, :width], V), law, "emitted block vs exact law", V)
    # 4. Completed with target samples, the block follows the target's joint distribution.
    L = model.cfg.depth + 1
    seq = model.chain.complete(tokens, n_acc, L, gen)
    _follows_table(_encode(seq, V), model.chain.target_joint(L), "completed block vs target joint", V)


# ---------------------------------------------------------------------------------- random batches


def random_parents(g, n):
    """A random topologically ordered tree of n nodes (parent of i uniform in -1 .. i-1, biased to shallow)."""
    out = []
    for i in range(n):
        out.append(int(torch.randint(-1, i, (1,), generator=g)) if i else -1)
    return out


def random_tree_batch(R=16, V=11, N=6, seed=0, mode="probs", filters=True):
    """Random trees of mixed sizes, temperatures (some greedy), top-k / top-p; siblings share q."""
    g = torch.Generator().manual_seed(seed)
    num_nodes = torch.randint(0, N + 1, (R,), generator=g, dtype=torch.int32)
    parents = torch.tensor([random_parents(g, N) for _ in range(R)], dtype=torch.int32)
    cu = cu_from_lengths(num_nodes)
    T = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (R,), generator=g)]
    target_logits = 1.5 * torch.randn(int(cu[-1]), V, generator=g)
    # q per node = q of its parent (one distribution per set of siblings); targets correlated with it.
    q_parent = torch.softmax(1.5 * torch.randn(R, N + 1, V, generator=g), -1)
    probs = q_parent[torch.arange(R)[:, None], parents.long() + 1]
    tokens = torch.multinomial(probs.reshape(-1, V), 1, generator=g).reshape(R, N).to(torch.int32)
    if mode == "onehot":
        probs = None
    kw = dict(target_logits=target_logits, tree_tokens=tokens, tree_parents=parents, num_nodes=num_nodes,
              cu_verify=cu, temperature=T, seed=torch.randint(-(2**62), 2**62, (R,), generator=g),
              offset=torch.tensor(5, dtype=torch.int64), draft_probs=probs)
    if filters:
        kw["top_k"] = torch.tensor([0, 2, V - 1, V + 3], dtype=torch.int32)[torch.randint(0, 4, (R,), generator=g)]
        kw["top_p"] = torch.tensor([1.0, 0.7, 0.9])[torch.randint(0, 3, (R,), generator=g)]
    return kw


def greedy_walk(kw):
    """Greedy rows by hand: follow the first child whose token is the raw argmax; emit the argmax."""
    R, N = kw["tree_tokens"].shape
    cu = kw["cu_verify"].tolist()
    out_tokens = torch.full((R, N + 1), -1, dtype=torch.int32)
    out_n = torch.zeros(R, dtype=torch.int32)
    out_nodes = torch.full((R, N), -1, dtype=torch.int32)
    for r in range(R):
        n = int(kw["num_nodes"][r])
        if cu[r + 1] == cu[r]:
            continue
        parents = kw["tree_parents"][r].tolist()
        toks = kw["tree_tokens"][r].tolist()
        cur, path = -1, []
        while True:
            best = int(kw["target_logits"][cu[r] + 1 + cur].argmax())
            nxt = [c for c in range(n) if parents[c] == cur and toks[c] == best]
            if not nxt:
                break
            cur = nxt[0]
            path.append(cur)
        out_n[r] = len(path)
        out_nodes[r, : len(path)] = torch.tensor(path, dtype=torch.int32)
        out_tokens[r, : len(path)] = torch.tensor([toks[c] for c in path], dtype=torch.int32)
        out_tokens[r, len(path)] = best
    return out_tokens, out_n, out_nodes

