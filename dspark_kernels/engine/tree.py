"""Multi-chain drafting: b independent Markov-head chains for each request, as one token tree.

A DSpark drafter proposes one chain per request. Sampling b chains for the
same request (the same base logits and anchor, repeated b times, each chain
with its own Philox key) gives b i.i.d. draws of the first draft token, all
from the same first-position distribution q_1(. | anchor): exactly the
i.i.d. siblings that SpecInfer's multi-step speculative sampling
(tree_rejection_sample) verifies losslessly. Below the root every chain node
has one child (its chain's next draft, drawn from q(. | its own prefix)), so
the tree is b chains glued at the anchor.

No prefix merging. Two chains that start with the same token could share
that node, but then the root's children would be the *distinct* first tokens,
no longer i.i.d. draws from q_1: after rejecting x the next sibling would be
known to differ from x, and the residual update that makes the walk exact
(p <- norm(max(p - q, 0)), with q the distribution of an independent draw)
would be wrong. Repeated tokens are kept as separate siblings; the walk
handles them exactly (a repeat of a rejected token is tried again against
the updated residual, where it may still be accepted).

Layout (depth-major, so the first b·ℓ nodes are the first ℓ drafts of every
chain and a per-request verify length ℓ_r is just num_nodes = b·ℓ_r): node
k·b + c is draft k + 1 of chain c; its parent is -1 for k = 0, else node
(k - 1)·b + c. For b = 1 this is the chain layout (parents -1, 0, 1, ...).

All of it is plain torch on the device: no host sync, capturable.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# 2^64 / golden ratio, odd: c -> c·K mod 2^64 is a bijection, so chain keys seed ^ (c·K) are distinct per chain.
_GOLDEN = 0x9E3779B97F4A7C15


class MultiChainTree(NamedTuple):
    tree_tokens: torch.Tensor  # [R, b·γ] int32
    tree_parents: torch.Tensor  # [R, b·γ] int32
    draft_probs: torch.Tensor | None  # [R, b·γ, V] (siblings' rows equal), or None
    num_nodes: torch.Tensor  # [R] int32: b·lengths


def chain_seeds(seed: torch.Tensor, num_chains: int) -> torch.Tensor:
    """[R, b] int64 Philox keys of the chains: chain 0 keeps seed[r] (so b = 1 drafts what a single chain
    would), chain c uses seed[r] ^ (c·K mod 2^64), K = 0x9E3779B97F4A7C15: distinct for distinct c."""
    keys = [((c * _GOLDEN) % 2**64) for c in range(num_chains)]
    keys = torch.tensor([k - 2**64 if k >= 2**63 else k for k in keys], dtype=torch.int64, device=seed.device)
    return torch.bitwise_xor(seed.to(torch.int64)[:, None], keys[None, :])


def chains_to_tree(tokens: torch.Tensor, draft_probs: torch.Tensor | None = None,
                   lengths: torch.Tensor | None = None) -> MultiChainTree:
    """b chains per request -> one tree per request (module docstring: layout, exactness).

    tokens [R, b, γ]: chain c's drafts; draft_probs [R, b, γ, V] or None: the
    distribution each draft was drawn from; lengths [R] (default γ): drafts
    verified per chain. The root children's rows are all chain 0's first row
    (the chains' first-position distributions are one distribution; the copy
    makes the sibling rows bit-equal, as tree_rejection_sample checks).
    """
    num_req, b, gamma = tokens.shape
    device = tokens.device
    tree_tokens = tokens.transpose(1, 2).reshape(num_req, gamma * b).to(torch.int32)
    node = torch.arange(gamma * b, device=device)
    parents = torch.where(node < b, -1, node - b).to(torch.int32).expand(num_req, gamma * b).contiguous()
    probs = None
    if draft_probs is not None:
        probs = draft_probs.transpose(1, 2).reshape(num_req, gamma * b, draft_probs.shape[-1])
        if gamma:
            probs = torch.cat([probs[:, :1].expand(num_req, b, probs.shape[-1]), probs[:, b:]], dim=1)
    if lengths is None:
        num_nodes = torch.full((num_req,), gamma * b, dtype=torch.int32, device=device)
    else:
        num_nodes = (lengths.to(torch.int32).clamp(0, gamma) * b).to(torch.int32)
    return MultiChainTree(tree_tokens, parents, probs, num_nodes)


def draft_multi_chain(num_chains: int, base_logits: torch.Tensor, anchor: torch.Tensor, w1: torch.Tensor,
                      w2: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor,
                      *, lengths: torch.Tensor | None = None, backend: str | None = None,
                      **head) -> MultiChainTree:
    """Sample num_chains chains per request with markov_draft (rows repeated, one key per chain from
    chain_seeds) and return them as a tree (chains_to_tree) with their exact draft distributions.

    base_logits [R, γ, V], anchor [R], w1, w2, temperature [R], seed [R], offset [] as markov_draft;
    head: markov_draft's other keywords (hidden [R, γ, d] and the gated / RNN head weights; tensors with a
    leading request dimension are repeated per chain). The draft stream (STREAM_DRAFT) is disjoint from the
    verifier's, so the chains' keys may share the request's seed.
    """
    from .. import markov_draft

    num_req = base_logits.shape[0]
    rep = lambda t: t.repeat_interleave(num_chains, dim=0)  # noqa: E731
    head = {k: (rep(v) if k == "hidden" and v is not None else v) for k, v in head.items()}
    out = markov_draft(rep(base_logits), rep(anchor), w1, w2, rep(temperature),
                       chain_seeds(seed, num_chains).reshape(-1), offset, return_draft_probs=True,
                       backend=backend, **head)
    gamma = base_logits.shape[1]
    tokens = out.tokens.reshape(num_req, num_chains, gamma)
    probs = out.draft_probs.reshape(num_req, num_chains, gamma, -1)
    return chains_to_tree(tokens, probs, lengths)
