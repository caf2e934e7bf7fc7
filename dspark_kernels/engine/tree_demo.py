"""Tree verification end to end on the demo's synthetic target: b Markov-head chains per request, one tree round.

The target and the draft are dspark_kernels.engine.demo's SyntheticTarget (a
first-order chain plus one attention layer with RoPE over a paged KV cache;
the Markov head knows only the chain). Each round, for R requests:

1. draft: dspark_kernels.engine.tree.draft_multi_chain samples b chains of γ
   drafts with markov_draft (repeated rows, one Philox key per chain) and lays
   them out as one tree per request (b i.i.d. root children, no merging);
2. layout: tree_verify_layout gives every verify row its tree mask and RoPE
   position (start_pos + depth); pack_verify gives the token ids and the KV
   slots (node i at position start_pos + 1 + i) in the same rows;
3. the target's verify pass: q, k, v of every row, append_verify_kv,
   verify_attention with the tree mask, logits;
4. tree_rejection_sample on those logits with the chains' exact draft
   distributions;
5. compact_accepted_kv moves the accepted path's K/V next to the anchor, and
   advance makes the next round's anchors and positions.

Checks, every round: each node's verify logits equal a sequential dense
recompute of its own root path (so the mask, the positions and, from the
second round on, the compacted cache are all right), and the emitted
transitions follow the target's exact conditionals (the demo's chi-square
test, transition_test). The same rounds with b = 1 are the chain, beside
which the demo reports the mean accepted length.

The attention layer keeps its sliding window (32 keys): verify_attention
counts a window over each row's own text (context, then its ancestors), so a
tree row at block index j and depth d sees the keys its root path would see
verified as a chain, which the sequential recompute checks every round.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import NamedTuple

import torch

from dspark_kernels import (advance, append_verify_kv, compact_accepted_kv, pack_verify, tree_rejection_sample,
                            tree_verify_layout, verify_attention)

from .demo import LOGIT_TOL, SyntheticTarget, add_target_arguments, transition_test
from .tree import draft_multi_chain


class TreeRunResult(NamedTuple):
    chains: int
    accepted: list  # mean accepted length per round (all requests)
    counts: torch.Tensor  # [V, V] observed transitions
    expected: torch.Tensor  # [V, V] Σ p_i per previous token (transition_test)
    outer: torch.Tensor  # [V, V, V] Σ p_i p_iᵀ
    max_logit_diff: float  # every node's verify row vs a sequential recompute of its root path
    rows_checked: int
    second_sibling: float  # fraction of rounds x requests whose path starts at a root child other than the first

    def lossless_test(self):
        return transition_test(self.counts, expected=self.expected, outer=self.outer)


def _path_to(parents: torch.Tensor, tokens: torch.Tensor, node: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [R, N] of the root path to `node` (padded with 0) and its depth [R]."""
    num_req, n = parents.shape
    path = torch.zeros(num_req, n, dtype=torch.int64)
    depth = torch.zeros(num_req, dtype=torch.int64)
    chain = []
    cur = torch.full((num_req,), node, dtype=torch.int64)
    for _ in range(n):
        live = cur >= 0
        chain.append(torch.where(live, tokens.gather(1, cur.clamp(min=0)[:, None])[:, 0].long(), -1))
        depth += live.long()
        cur = torch.where(live, parents.gather(1, cur.clamp(min=0)[:, None])[:, 0].long(), -1)
    chain = torch.stack(chain[::-1], 1)  # root first, -1 (none) at the front
    for r in range(num_req):
        toks = chain[r][chain[r] >= 0]
        path[r, : toks.numel()] = toks
    return path, depth


def run_tree(rounds: int, requests: int, chains: int, gamma: int, temperature: float, seed: int,
             backend: str | None, target: SyntheticTarget, check_nodes: bool = True) -> TreeRunResult:
    vocab = target.probs.shape[0]
    layer = target.layer
    g = torch.Generator().manual_seed(seed + 1)
    anchor = torch.randint(0, vocab, (requests,), generator=g).to(torch.int32)
    n_max = chains * gamma
    rows = requests * (n_max + 1)
    # A round advances a request by at most γ + 1 positions; the block spans n_max + 1 of them.
    max_len = rounds * (gamma + 1) + n_max + 1
    cache = target.new_cache(requests, max_len, seed)
    start_pos = torch.zeros(requests, dtype=torch.int32)
    generated = torch.zeros(requests, dtype=torch.int32)
    active = torch.ones(requests, dtype=torch.bool)
    offset = torch.tensor(0, dtype=torch.int64)
    seeds = 1000 * seed + torch.arange(requests, dtype=torch.int64)
    temp = torch.full((requests,), float(temperature))
    history = torch.full((requests, max_len), -1, dtype=torch.int64)
    counts = torch.zeros(vocab, vocab, dtype=torch.int64)
    expected = torch.zeros(vocab, vocab, dtype=torch.float64)
    outer = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    accepted, max_diff, rows_checked, second = [], 0.0, 0, 0
    local = torch.arange(n_max + 1)
    for _ in range(rounds):
        base = 0.25 * target.marginal_logits(anchor.long(), gamma)  # as the demo: the head carries the chain
        tree = draft_multi_chain(chains, base, anchor, target.w1, target.w2, temp, seeds, offset, backend=backend)
        layout = tree_verify_layout(tree.tree_parents, tree.num_nodes, start_pos, num_rows=rows, backend=backend)
        cu = layout.cu_verify
        batch = pack_verify(anchor, tree.tree_tokens, tree.num_nodes, cu, start_pos, num_rows=rows,
                            page_table=cache.page_table, page_size=cache.page_size, scratch_slot=cache.scratch_slot,
                            backend=backend)
        kv_lens = start_pos + tree.num_nodes + 1
        q, k, v = layer.project(batch.token_ids.long(), layout.positions.long())
        append_verify_kv(k, v, cache.k, cache.v, batch.slot_mapping, backend=backend)
        out = verify_attention(q, cache.k, cache.v, cache.page_table, kv_lens, cu, tree_mask=layout.tree_mask,
                               window=layer.window, backend=backend)
        logits = target.logits[batch.token_ids.long()] + layer.readout(out)
        verdict = tree_rejection_sample(logits, tree.tree_tokens, tree.tree_parents, tree.num_nodes, cu, temp, seeds,
                                        offset, draft_probs=tree.draft_probs, backend=backend)
        first_row = cu[:-1].long()
        if check_nodes:
            # Every node's row against its own root path, recomputed one token at a time with dense attention.
            for j in range(n_max + 1):  # block row j: the anchor (j = 0), then node j - 1
                if j == 0:
                    path = torch.zeros(requests, n_max, dtype=torch.int64)
                    depth = torch.zeros(requests, dtype=torch.int64)
                else:
                    path, depth = _path_to(tree.tree_parents, tree.tree_tokens, j - 1)
                ref = target.sequential_logits(history.clone(), anchor, path, depth, start_pos)
                got = logits[first_row + j]
                want = ref[torch.arange(requests), depth]
                diff = float((got - want).abs().max())
                max_diff = max(max_diff, diff if math.isfinite(diff) else math.inf)
                rows_checked += requests
        compact_accepted_kv(cache.k, cache.v, cache.page_table, start_pos, verdict.accepted_nodes,
                            verdict.num_accepted, backend=backend)
        # The emitted tokens' exact conditionals: the sequential target along the accepted path.
        n_acc = verdict.num_accepted.long()
        path = verdict.tokens[:, :n_max].long().clamp(min=0)
        ref = target.sequential_logits(history, anchor, path, n_acc, start_pos)  # writes the path into history
        emit = local[None, :] <= n_acc[:, None]
        prev = torch.cat([anchor[:, None].long(), verdict.tokens[:, :n_max].long()], 1)[emit]
        nxt = verdict.tokens.long()[emit]
        counts.index_put_((prev, nxt), torch.ones_like(nxt), accumulate=True)
        p = torch.softmax(ref[emit].double() / temperature, dim=-1)
        expected.index_add_(0, prev, p)
        outer.index_add_(0, prev, p[:, :, None] * p[:, None, :])
        accepted.append(float(n_acc.float().mean()))
        second += int((verdict.accepted_nodes[:, 0] > 0).sum()) if chains > 1 else 0
        state = advance(verdict.tokens, verdict.num_accepted, anchor, start_pos, generated, active, offset,
                        backend=backend)
        anchor, start_pos, generated, offset = state.anchor, state.start_pos, state.num_generated, state.offset
    return TreeRunResult(chains, accepted, counts, expected, outer, max_diff, rows_checked,
                         second / (rounds * requests))


DESCRIPTION = (
    "Runs tree verification rounds on the demo's synthetic target: b Markov-head chains per request drafted with "
    "markov_draft (draft_multi_chain) -> tree_verify_layout + pack_verify -> append_verify_kv + verify_attention "
    "with the tree mask over a paged KV cache -> tree_rejection_sample -> compact_accepted_kv -> advance; reports "
    "the mean accepted length beside the chain (b = 1), checks every node's verify logits against a sequential "
    "recompute of its root path and the output against the target (chi-square). Exits 1 if a check fails."
)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The tree demo's options: the synthetic target's (demo.add_target_arguments) plus --chains."""
    add_target_arguments(p, rounds=60, rounds_help="rounds per run", requests=32, gamma=4,
                         gamma_help="drafts per chain, γ")
    p.add_argument("--chains", type=int, default=3, help="chains per request in tree mode, b (default 3)")
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_kernels tree-demo", description=DESCRIPTION)
    return run_tree_demo(add_arguments(p).parse_args(argv))


def run_tree_demo(args: argparse.Namespace) -> int:
    """The tree demo on parsed options; 0 if every check passes, else 1."""
    torch.set_num_threads(1)  # tiny tensors: OpenMP spin-waits cost more than the work (demo.py measured 10x)
    target = SyntheticTarget(args.vocab, args.rank, args.temperature, args.seed)
    print(f"DSpark tree demo: V={args.vocab}, {args.chains} chains x γ={args.gamma} per request, {args.requests} "
          f"requests x {args.rounds} rounds, T={args.temperature}, backend={args.backend or 'auto'}")
    ok = True
    results = []
    for chains in (1, args.chains):
        t0 = time.perf_counter()
        res = run_tree(args.rounds, args.requests, chains, args.gamma, args.temperature, args.seed, args.backend,
                       target)
        secs = time.perf_counter() - t0
        stat, dof, pval = res.lossless_test()
        mean = sum(res.accepted) / len(res.accepted)
        good = res.max_logit_diff <= LOGIT_TOL
        ok &= pval > 1e-3 and good
        label = "chain (b = 1)" if chains == 1 else f"tree (b = {chains})"
        print(f"\n{label}: mean accepted length {mean:.3f} (+1 emitted = {mean + 1:.3f} tokens/round), "
              f"{secs:.1f} s" + (f"; path through a later root child in {res.second_sibling:.1%} of walks"
                                 if chains > 1 else ""))
        print(f"  generated {int(res.counts.sum())} tokens; transitions vs target conditionals: chi2 = {stat:.1f} "
              f"on {dof} dof, p = {pval:.3f} -> {'PASS' if pval > 1e-3 else 'FAIL'}")
        print(f"  every node's verify row vs its root path recomputed densely: max |Δ logit| = "
              f"{res.max_logit_diff:.2e} over {res.rows_checked} rows -> {'PASS' if good else 'FAIL'}")
        results.append((chains, mean))
    (_, chain_mean), (b, tree_mean) = results
    print(f"\nmean accepted length: chain {chain_mean:.3f}, tree of {b} chains {tree_mean:.3f} "
          f"({tree_mean / max(chain_mean, 1e-9):.2f}x); verify rows per request {args.gamma + 1} vs "
          f"{b * args.gamma + 1}")
    return 0 if ok else 1
