"""The tree demo (dspark_kernels.engine.tree_demo) and the multi-chain helper (dspark_kernels.engine.tree).

- chains_to_tree lays b chains out depth-major with the root children's rows equal; b = 1 is the chain;
  chain_seeds gives distinct keys with chain 0's = the request's seed; draft_multi_chain's chains are
  markov_draft's, and its root children are i.i.d. (the first-position distribution is the same for all).
- A short tree run through the whole round (layout -> verify_attention -> tree_rejection_sample ->
  compaction -> advance) is lossless (chi-square on the transitions), every node's verify row equals a
  sequential recompute of its root path, and b = 3 chains accept more than one.
- The checks have teeth: without compaction the next rounds' logits are wrong and the demo says so.
"""

from __future__ import annotations

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.engine import tree_demo
from dspark_kernels.engine.demo import LOGIT_TOL, SyntheticTarget
from dspark_kernels.engine.tree import chain_seeds, chains_to_tree, draft_multi_chain


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared machine (see test_tree_rejection_sample.py)
    yield
    torch.set_num_threads(threads)


def test_chains_to_tree_layout():
    tokens = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    probs = torch.softmax(torch.randn(2, 3, 4, 5), -1)
    t = chains_to_tree(tokens, probs, lengths=torch.tensor([4, 2]))
    assert t.tree_parents[0].tolist() == [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert t.tree_tokens[0].tolist() == tokens[0].T.reshape(-1).tolist()  # node k·b + c = draft k of chain c
    assert t.num_nodes.tolist() == [12, 6]
    assert all(torch.equal(t.draft_probs[r, c], probs[r, 0, 0]) for r in range(2) for c in range(3))
    assert torch.equal(t.draft_probs[:, 3:], probs.transpose(1, 2).reshape(2, 12, 5)[:, 3:])
    one = chains_to_tree(tokens[:, :1], None)
    assert one.tree_parents[0].tolist() == [-1, 0, 1, 2] and one.draft_probs is None


def test_chain_seeds_distinct_and_chain_zero_is_the_seed():
    seed = torch.tensor([0, 7, -(2**62), 2**62])
    s = chain_seeds(seed, 8)
    assert torch.equal(s[:, 0], seed)
    assert all(len(set(row)) == 8 for row in s.tolist())


def test_draft_multi_chain_root_children_are_iid():
    """First tokens of the chains of one request, over many requests with the same inputs: i.i.d. draws from
    q_1 (each chain's marginal is q_1, and the pair (chain 0, chain 1) is the product law)."""
    from stats import ALPHA, assert_follows, counts_of

    target = SyntheticTarget(12, 4, 1.0, seed=3, attention=False)
    R, b, gamma = 6000, 2, 2
    anchor = torch.full((R,), 5, dtype=torch.int32)
    base = 0.25 * target.marginal_logits(anchor.long(), gamma)
    tree = draft_multi_chain(b, base, anchor, target.w1, target.w2, torch.ones(R), torch.arange(R) * 3 + 1,
                             torch.tensor(4))
    q1 = tree.draft_probs[0, 0].double()
    assert_follows(counts_of(tree.tree_tokens[:, 0], 12), q1, ALPHA, what="chain 0, first token")
    assert_follows(counts_of(tree.tree_tokens[:, 1], 12), q1, ALPHA, what="chain 1, first token")
    pair = tree.tree_tokens[:, 0].long() * 12 + tree.tree_tokens[:, 1].long()
    assert_follows(counts_of(pair, 144), (q1[:, None] * q1[None, :]).reshape(-1), ALPHA, what="independence")
    # Chain 0 is what markov_draft drafts for the request's own seed.
    single = dk.markov_draft(base, anchor, target.w1, target.w2, torch.ones(R), torch.arange(R) * 3 + 1,
                             torch.tensor(4))
    assert torch.equal(tree.tree_tokens[:, 0::b], single.tokens)


def _target():
    target = SyntheticTarget(24, 8, 1.0, seed=2)
    target.layer.window = -1
    return target


def test_tree_round_is_lossless_and_exact():
    target = _target()
    chain = tree_demo.run_tree(25, 12, 1, 3, 1.0, 5, None, target)
    tree = tree_demo.run_tree(25, 12, 3, 3, 1.0, 5, None, target)
    for res in (chain, tree):
        assert res.lossless_test()[2] > 1e-3
        assert res.max_logit_diff <= LOGIT_TOL and res.rows_checked > 0
    assert sum(tree.accepted) > sum(chain.accepted) and tree.second_sibling > 0


def test_the_demo_catches_a_missing_compaction(monkeypatch):
    monkeypatch.setattr(tree_demo, "compact_accepted_kv", lambda *a, **k: None)
    res = tree_demo.run_tree(6, 8, 3, 3, 1.0, 5, None, _target())
    assert res.max_logit_diff > 100 * LOGIT_TOL
