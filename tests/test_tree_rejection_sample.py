"""dspark::tree_rejection_sample is lossless, chain-exact and deterministic.

The toy model (tests/tree_model.py) puts a tree shape on rejection_model's
prefix states: every prefix is a state with its own target distribution and
draft distribution, so row 1 + i of a request's block really is the target's
prediction after the path to node i, and sampled siblings really are i.i.d.
draws from the draft (torch.multinomial, fixed generator).

- The exact law: tree_model.TreeModel.exact_law computes, in float64 and
  independently of the op, the distribution of the emitted block under the
  algorithm of the op's docstring; test_exact_law_is_lossless proves it
  lossless (the block completed by the target has exactly the target's joint
  law, to 1e-15) for every case, and shows that two planted bugs are not.
- The op against it: one vectorised op call on R = 100000 identical requests
  (seeds 0..R-1) per case; the first emitted token follows p_0, the second
  follows p(. | first) among requests that emitted two, the whole block
  follows the exact law, and the block completed by the target follows the
  target's joint law (chi-square, tests/stats.py).
- The same checks reject samplers with the planted bugs.
- Greedy rows (exact, against a walk by hand) mixed with sampled rows; the
  RNG layout (which uniform decides which sibling) pinned down exactly; the
  chain is rejection_sample, token for token, on every backend; Triton equals
  the reference token for token on random trees with filters.
"""

from __future__ import annotations

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels import rng
from dspark_kernels.ops import tree_rejection_sample as trs_op

from rejection_model import random_batch
from stats import ALPHA, assert_follows, counts_of
from support import available_backends, interpreted, to_device
from tree_model import TreeCfg, TreeModel, check_tree_lossless, greedy_walk, random_tree_batch, sample_law

BACKENDS = available_backends(trs_op)
MC_BACKENDS = [b for b in BACKENDS if not interpreted(b)]
OTHER_BACKENDS = [b for b in BACKENDS if b != "reference"]
MC_R = 100_000


@pytest.fixture(autouse=True)
def _one_thread():
    # Small tensors on a shared 2-core machine: OpenMP spin-waits cost 30x the work (35 s vs 1 s for one
    # R = 100000 call, measured); one intra-op thread is the fast setting here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def call(backend, kw, *, check=True):
    out = dk.tree_rejection_sample(**{k: to_device(v) for k, v in kw.items()}, backend=backend)
    out = type(out)(*(t.cpu() for t in out))
    if check:
        check_structure(out, kw)
    return out


def check_structure(out, kw):
    """Layout: the accepted nodes form a root path of live nodes, their tokens, one token in [0, V), then -1."""
    tokens, n_acc, nodes = out
    R, N = kw["tree_tokens"].shape
    V = kw["target_logits"].shape[1]
    assert tokens.shape == (R, N + 1) and n_acc.shape == (R,) and nodes.shape == (R, N)
    assert tokens.dtype == n_acc.dtype == nodes.dtype == torch.int32
    cu = kw["cu_verify"].long()
    live = cu[1:] > cu[:-1]
    n, nodes, tokens = n_acc.long(), nodes.long(), tokens.long()
    assert bool((n[~live] == 0).all()) and bool((tokens[~live] == -1).all()) and bool((nodes[~live] == -1).all())
    assert bool(((n >= 0) & (n <= kw["num_nodes"].long())).all())
    k = torch.arange(N)[None, :]
    on = k < n[:, None]
    assert bool((nodes[~on] == -1).all()) and bool(((nodes[on] >= 0) & (nodes[on] < N)).all())
    c = nodes.clamp(min=0)
    parent = kw["tree_parents"].long().gather(1, c)
    before = torch.cat([torch.full((R, 1), -1), nodes[:, :-1]], 1)
    assert bool((parent[on] == before[on]).all()), "accepted_nodes must be a root path"
    assert bool((c[on] < kw["num_nodes"].long()[:, None].expand(R, N)[on]).all())
    assert torch.equal(tokens[:, :N][on], kw["tree_tokens"].long().gather(1, c)[on])
    last = tokens.gather(1, n[:, None])[:, 0]
    assert bool(((last[live] >= 0) & (last[live] < V)).all())
    after = torch.arange(N + 1)[None, :] > n[:, None]
    assert bool((tokens[after] == -1).all())


# 2-3 children at a node, depth 1-3, sampled and deterministic drafts, top-k / top-p.
ENUM_CASES = [
    TreeCfg((-1, -1, -1), V=4, seed=1),  # three i.i.d. root children
    TreeCfg((-1, -1, 0, 0, 1, 1), V=4, seed=2),  # 2 x 2, depth 2
    TreeCfg((-1, -1, 0, 1, 2, 2), V=3, seed=3),  # depth 3, siblings at the root and at depth 3
    TreeCfg((-1, 0, -1, 2, -1, 4), V=4, seed=4),  # three chains of two (the multi-chain shape)
    TreeCfg((-1, -1, -1, 0, 0), V=5, mode="onehot", seed=5),  # three candidates, two under the first
    TreeCfg((-1, -1, 0, 0, 2, 2), V=4, mode="onehot", seed=6),  # candidates to depth 3
    TreeCfg((-1, -1, -1, 0, 1), V=5, T=0.7, top_k=3, seed=7),
    TreeCfg((-1, -1, 0, 0, 1), V=5, T=1.3, top_p=0.8, seed=8),
    TreeCfg((-1, -1, -1, 1, 1), V=5, T=1.0, top_k=4, top_p=0.9, mode="onehot", seed=9),
]


def _case_id(c: TreeCfg):
    s = f"{c.mode}-V{c.V}-{''.join('r' if p < 0 else str(p) for p in c.parents)}-T{c.T}"
    return s + (f"-k{c.top_k}" if c.top_k else "") + (f"-p{c.top_p}" if c.top_p else "")


BUGS = ("residual_not_updated", "mass_not_renormalised")


def test_exact_law_is_lossless_and_the_bugs_are_not():
    """The algorithm as documented is lossless on every case (float64, exact recursion over the tree); the
    planted bugs are not (on at least the cases with a second sibling whose residual matters)."""
    worst_bug = dict.fromkeys(BUGS, 0.0)
    for cfg in ENUM_CASES:
        model = TreeModel(cfg)
        law = model.exact_law()
        assert abs(sum(law.values()) - 1.0) < 1e-12, _case_id(cfg)
        assert model.lossless_gap(law) < 1e-15, _case_id(cfg)
        for bug in BUGS:
            biased = model.exact_law(bug)
            assert abs(sum(biased.values()) - 1.0) < 1e-12
            worst_bug[bug] = max(worst_bug[bug], model.lossless_gap(biased))
    assert worst_bug["residual_not_updated"] > 0.05 and worst_bug["mass_not_renormalised"] > 0.005, worst_bug


@pytest.mark.parametrize("backend", MC_BACKENDS)
@pytest.mark.parametrize("cfg", ENUM_CASES, ids=_case_id)
def test_lossless_against_exact_law(backend, cfg):
    model = TreeModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    kw, _ = model.inputs(MC_R, gen)
    out = call(backend, kw)
    if cfg.mode == "onehot":
        assert "draft_probs" not in kw
    # Not vacuous: siblings after the first are reached and accepted, and paths reach depth >= 2.
    rank = torch.tensor([sorted(i for i, p in enumerate(cfg.parents) if p == cfg.parents[c]).index(c)
                         for c in range(len(cfg.parents))])
    first_node = out.accepted_nodes[:, 0].long()
    assert int((rank[first_node.clamp(min=0)][first_node >= 0] > 0).sum()) > 100
    if cfg.depth >= 2:
        assert int((out.num_accepted >= 2).sum()) > 1000
    check_tree_lossless(model, out.tokens, out.num_accepted, gen)


@pytest.mark.parametrize("bug", BUGS)
@pytest.mark.parametrize("cfg", [ENUM_CASES[1], ENUM_CASES[4]], ids=_case_id)
def test_checks_reject_biased_samplers(cfg, bug):
    """A sampler with a planted bug (drawn from the bug's exact law) fails the same checks; one drawn
    from the right law passes them."""
    model = TreeModel(cfg)
    gen = torch.Generator().manual_seed(50 + cfg.seed)
    width = len(cfg.parents) + 1
    tokens, n_acc = sample_law(model.exact_law(), MC_R, gen, width)
    check_tree_lossless(model, tokens, n_acc, gen)
    biased = model.exact_law(bug)
    if model.lossless_gap(biased) < 1e-3:
        pytest.skip(f"{bug} happens to be harmless on this case")
    tokens, n_acc = sample_law(biased, MC_R, gen, width)
    with pytest.raises(AssertionError, match="chi-square|probability 0|impossible"):
        check_tree_lossless(model, tokens, n_acc, gen, law=model.exact_law())


@pytest.mark.parametrize("backend", MC_BACKENDS)
def test_greedy_rows_exact_beside_sampled_rows(backend):
    """One batch: even requests greedy (exact walk by hand), odd ones sampled with top-k (first token law)."""
    cfg = TreeCfg((-1, -1, -1, 0, 0, 1), V=5, T=1.0, top_k=4, seed=40)
    model = TreeModel(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    R = 20_000
    kw, _ = model.inputs(R, gen, num_nodes=torch.randint(0, 7, (R,), generator=gen, dtype=torch.int32))
    greedy = torch.arange(R) % 2 == 0
    kw["temperature"] = torch.where(greedy, torch.zeros(R), kw["temperature"])
    out = call(backend, kw)
    want = greedy_walk(kw)  # every row, by hand, as if greedy; compared on the greedy ones
    assert torch.equal(out.tokens[greedy], want[0][greedy]) and torch.equal(out.num_accepted[greedy], want[1][greedy])
    assert torch.equal(out.accepted_nodes[greedy], want[2][greedy])
    # Not vacuous: greedy rows accept later siblings, and paths of depth 2.
    assert int((out.accepted_nodes[greedy, 0] > 0).sum()) > 100 and int((want[1][greedy] >= 2).sum()) > 100
    sto = ~greedy
    assert_follows(counts_of(out.tokens[sto, 0], cfg.V), model.p[0], ALPHA, what="first token, sampled rows")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rng_layout_decides_the_siblings(backend):
    """The documented counters, exactly: deterministic candidates [a, b, c] at the root with p(a) = 1/2,
    p(b) = 1/4 (exact in fp32): a is accepted iff u0 < 1/2 with u0 on STREAM_ACCEPT (position 0, index 0);
    else b iff u1 · (1/2) < 1/4 with u1 on STREAM_TREE_ACCEPT (position 0, index 1); else c iff
    u2 · (1/4) < 1/8 (index 2). Under a also sits child d (node 3) at depth 1, tested with STREAM_ACCEPT
    position 1 against p(d | a) = 1/2."""
    R = 64 if not interpreted(backend) else 8
    import math

    V = 8
    logits = torch.full((5, V), -math.inf)
    logits[0, :4] = torch.log(torch.tensor([0.5, 0.25, 0.125, 0.125]))  # row 0: after the anchor
    logits[1, :2] = 0.0  # row 1: after node 0 (token 0): tokens 0 and 1 at 1/2
    logits[2:, 0] = 0.0
    kw = dict(target_logits=logits.repeat(R, 1), tree_tokens=torch.tensor([[0, 1, 2, 1]]).repeat(R, 1),
              tree_parents=torch.tensor([[-1, -1, -1, 0]]).repeat(R, 1), num_nodes=torch.full((R,), 4),
              cu_verify=torch.arange(R + 1) * 5, temperature=torch.ones(R),
              seed=torch.arange(R, dtype=torch.int64) * 7919 + 3, offset=torch.tensor(11))
    out = call(backend, kw)
    seed, off = kw["seed"], kw["offset"]
    u0 = rng.uniform(seed, off, rng.STREAM_ACCEPT, 0, 0)
    u1 = rng.uniform(seed, off, rng.STREAM_TREE_ACCEPT, 0, 1)
    u2 = rng.uniform(seed, off, rng.STREAM_TREE_ACCEPT, 0, 2)
    u3 = rng.uniform(seed, off, rng.STREAM_ACCEPT, 1, 0)
    first = torch.where(u0 < 0.5, 0, torch.where(u1 * 0.5 < 0.25, 1, torch.where(u2 * 0.25 < 0.125, 2, -1)))
    second = torch.where((first == 0) & (u3 < 0.5), 3, -1)
    assert torch.equal(out.accepted_nodes[:, 0].long(), first)
    assert torch.equal(out.accepted_nodes[:, 1].long(), second)
    assert bool((first == -1).any() | (R < 64)) and bool((first == 2).any() | (R < 64))
    # Every root child rejected: the residual has only token 3 left (a, b, c zeroed), drawn on STREAM_RESIDUAL.
    assert bool((out.tokens[first == -1, 0] == 3).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["probs", "onehot"])
def test_chain_is_rejection_sample(backend, mode):
    """Parents [-1, 0, 1, ...]: exactly rejection_sample's tokens and num_accepted for the same seeds, on
    mixed lengths, greedy rows, top-k / top-p; accepted_nodes = 0 .. n - 1."""
    R = 6 if interpreted(backend) else 400
    args, kw = random_batch(R=R, V=13, gamma=5, seed=8, mode=mode)
    logits, drafts, probs, lengths, cu, T, seeds = args
    offset = torch.tensor(2**33 + 1)
    want_tokens, want_n = dk.rejection_sample(*args, offset, **kw, backend=backend)
    parents = (torch.arange(5) - 1).expand(R, 5)
    tree = dict(target_logits=logits, tree_tokens=drafts, tree_parents=parents, num_nodes=lengths, cu_verify=cu,
                temperature=T, seed=seeds, offset=offset, draft_probs=probs, **kw)
    out = call(backend, tree)
    assert torch.equal(out.tokens, want_tokens.cpu()) and torch.equal(out.num_accepted, want_n.cpu())
    pos = torch.arange(5)[None, :]
    assert torch.equal(out.accepted_nodes.long(), torch.where(pos < want_n.cpu().long()[:, None], pos, -1))
    assert int(want_n.sum()) > 0


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("mode", ["probs", "onehot"])
def test_backend_matches_reference_exactly(backend, mode):
    """Random trees (mixed sizes, greedy and sampled rows, top-k / top-p, a vocabulary past one tile): the
    same tokens on every backend."""
    small = interpreted(backend)
    kw = random_tree_batch(R=5 if small else 300, V=1031 if small else 5000, N=6, seed=11, mode=mode)
    ref = call("reference", kw)
    out = call(backend, kw)
    for a, b in zip(out, ref):
        assert torch.equal(a, b), (a, b)


def wide_tree_batch(R, mode, seed=14, V=40):
    """Four root children with two children each under the first two, at T = 2: drafts near the target, so
    rejections are followed by accepted siblings (the residual-mass pass; the repeated-token scan)."""
    g = torch.Generator().manual_seed(seed)
    parents = torch.tensor([-1, -1, -1, -1, 0, 0, 1, 1]).expand(R, 8).contiguous()
    logits = torch.randn(R * 9, V, generator=g) * 2.0
    rows0 = logits[::9]  # each request's anchor row
    kw = dict(target_logits=logits, tree_parents=parents, num_nodes=torch.full((R,), 8),
              cu_verify=torch.arange(R + 1) * 9, temperature=torch.full((R,), 2.0),
              seed=torch.randint(0, 2**62, (R,), generator=g), offset=torch.tensor(9))
    if mode == "probs":
        q = torch.softmax((rows0 + torch.randn(R, V, generator=g)) / 2.0, -1)  # near p_0 at T = 2
        kw["draft_probs"] = q[:, None].expand(R, 8, V).contiguous()  # every node: its parent is 0, 1 or the anchor
        kw["tree_tokens"] = torch.multinomial(q, 8, replacement=True, generator=g)
    else:
        top = rows0.argsort(-1, descending=True)[:, :4]
        # The target's top 4 tokens as candidates, the best one last, and a repeat of the first at node 2.
        kw["tree_tokens"] = torch.cat([top[:, [1, 2, 1, 0]], top[:, :4]], 1)
    return kw


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
@pytest.mark.parametrize("mode", ["probs", "onehot"])
def test_siblings_after_rejections_match_reference(backend, mode):
    """Later siblings tested after rejections: the same tokens as the reference, and they are accepted."""
    kw = wide_tree_batch(8 if interpreted(backend) else 400, mode)
    ref = call("reference", kw)
    out = call(backend, kw)
    for a, b in zip(out, ref):
        assert torch.equal(a, b), (mode, a, b)
    assert int((ref.accepted_nodes[:, 0] > 0).sum()) > 0


def test_batch_invariance_and_determinism():
    """A request's outcome depends on its own seed only: permuting the batch permutes the outputs."""
    kw = random_tree_batch(R=50, V=17, N=6, seed=13)
    ref = call("reference", kw)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    sizes = (kw["cu_verify"][1:] - kw["cu_verify"][:-1])[perm]
    rows = torch.cat([torch.arange(int(kw["cu_verify"][r]), int(kw["cu_verify"][r + 1])) for r in perm.tolist()])
    cu = torch.zeros(51, dtype=torch.int32)
    cu[1:] = torch.cumsum(sizes, 0)
    pkw = {k: (v[perm] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 50 else v) for k, v in kw.items()}
    pkw.update(target_logits=kw["target_logits"][rows], cu_verify=cu)
    out = call("reference", pkw)
    for a, b in zip(out, ref):
        assert torch.equal(a, b[perm])
    again = call("reference", kw)
    assert all(torch.equal(a, b) for a, b in zip(again, ref))


def test_compile_fullgraph_and_opcheck():
    kw = trs_op.example()
    eager = dk.tree_rejection_sample(**kw)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(kw):
        return dk.tree_rejection_sample(**kw)

    out = f(kw)
    assert all(torch.equal(a, b) for a, b in zip(eager, out))
    torch.library.opcheck(torch.ops.dspark.tree_rejection_sample.default, tuple(trs_op.OP.record(**kw)) + ("",))


def test_inactive_and_empty():
    kw = random_tree_batch(R=6, V=9, N=4, seed=14)
    kw["num_nodes"] = torch.tensor([2, 0, 4, 1, 3, 0], dtype=torch.int32)
    sizes = kw["num_nodes"].long() + 1
    sizes[2] = 0  # request 2 inactive
    cu = torch.zeros(7, dtype=torch.int32)
    cu[1:] = torch.cumsum(sizes, 0)
    kw.update(cu_verify=cu, target_logits=torch.randn(int(cu[-1]), 9))
    for backend in BACKENDS:
        out = call(backend, kw)
        assert bool((out.tokens[2] == -1).all()) and int(out.num_accepted[2]) == 0
        assert bool((out.tokens[[1, 5], 1:] == -1).all()) and bool((out.tokens[[1, 5], 0] >= 0).all())
    empty = dict(kw, target_logits=torch.zeros(0, 9), tree_tokens=torch.zeros(0, 4, dtype=torch.int32),
                 tree_parents=torch.zeros(0, 4, dtype=torch.int32), num_nodes=torch.zeros(0, dtype=torch.int32),
                 cu_verify=torch.zeros(1, dtype=torch.int32), temperature=torch.zeros(0),
                 seed=torch.zeros(0, dtype=torch.int64), draft_probs=torch.zeros(0, 4, 9), top_k=None, top_p=None)
    for backend in BACKENDS:
        out = call(backend, empty)
        assert out.tokens.shape == (0, 5) and out.accepted_nodes.shape == (0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    """CPU proxy for CUDA-graph capture: the implementation itself reads no device value on the host."""
    from host_sync import HostSyncSpy

    if interpreted(backend):
        pytest.skip("the Triton interpreter copies tensors to the host by design")
    for mode in ("probs", "onehot"):
        kw = {k: to_device(v) for k, v in random_tree_batch(R=6, V=9, N=5, seed=15, mode=mode).items()}
        with HostSyncSpy() as spy:
            trs_op.OP.run(backend, trs_op.OP.record(**kw))
        assert spy.syncs == [], spy.syncs
