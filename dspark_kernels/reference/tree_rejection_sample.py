"""Reference tree_rejection_sample: implements dspark_kernels.tree_rejection_sample (SpecInfer's multi-step
speculative sampling, Miao et al. 2024), vectorised over requests in fp32.

Strategy: the filtered target distribution of every verify row a request may
read (filtered_probs, as rejection_sample), then ONE scan over the node index
j = 0 .. N-1 for all requests at once. The walk never needs a second scan: the
children of a node have larger indices than the node, so when the walk
descends into node j, every node it can still visit lies after j. Per request
the scan keeps the current node, its depth, and the residual state of the
current node's children:

- sampled drafts (draft_probs): siblings are i.i.d. from one q, so after k
  rejections the residual is w = max(p - S·q, 0) for one scalar S (the sum of
  the residual masses M_0 .. M_{k-1} of the rejected siblings; M_0 = 1); the
  next sibling is accepted iff u·q(x)·M_k < w(x), M_k = Σ w;
- deterministic candidates (draft_probs None): the rejected tokens are zeroed
  (a [R, V] mask), M_{k+1} = M_k - w_k(x_k).

Then one Gumbel race per request for the residual (some child of the final
node was tried) or the bonus (the final node is a leaf), and the outputs.
"""

from __future__ import annotations

import torch

from .. import rng
from .sampling import filtered_probs, gumbel_sample, inverse_temperature, request_rows


def tree_rejection_sample(a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    device = a.target_logits.device
    num_rows, vocab = a.target_logits.shape
    num_req, num_nodes_max = a.tree_tokens.shape
    tokens = torch.full((num_req, num_nodes_max + 1), -1, dtype=torch.int32, device=device)
    num_accepted = torch.zeros(num_req, dtype=torch.int32, device=device)
    accepted_nodes = torch.full((num_req, num_nodes_max), -1, dtype=torch.int32, device=device)
    if num_req == 0 or num_rows == 0:  # no verify rows at all: every request is inactive
        return tokens, num_accepted, accepted_nodes

    req = torch.arange(num_req, device=device)
    # Unchecked path, as rejection_sample: a request verifies at most the nodes whose target rows exist.
    starts, live, n = request_rows(a.cu_verify, a.num_nodes, num_nodes_max, num_rows)
    greedy, _ = inverse_temperature(a.temperature)

    width = num_nodes_max + 1
    rows = (starts.clamp(0, num_rows - 1)[:, None] + torch.arange(width, device=device)[None, :])
    rows = rows.clamp(max=num_rows - 1).reshape(-1)
    expand = lambda t: None if t is None else t[:, None].expand(num_req, width).reshape(-1)  # noqa: E731
    p_all = filtered_probs(a.target_logits[rows], expand(a.temperature), expand(a.top_k), expand(a.top_p))
    p_all = p_all.reshape(num_req, width, vocab)
    amax_all = p_all.argmax(dim=-1)  # greedy rows: one-hot at the first argmax of the raw logits

    parents = a.tree_parents.to(torch.int64)
    nodes = a.tree_tokens.to(torch.int64)
    stochastic = a.draft_probs is not None
    cur = torch.full((num_req,), -1, dtype=torch.int64, device=device)  # -1: the anchor
    depth = torch.zeros(num_req, dtype=torch.int64, device=device)
    tried = torch.zeros(num_req, dtype=torch.bool, device=device)  # a child of cur was tested
    first = torch.zeros(num_req, dtype=torch.int64, device=device)  # cur's first child: its q row
    big_s = torch.zeros(num_req, dtype=torch.float32, device=device)
    mass = torch.ones(num_req, dtype=torch.float32, device=device)
    zeroed = torch.zeros(num_req, vocab, dtype=torch.bool, device=device)
    path = torch.full((num_req, num_nodes_max), -1, dtype=torch.int64, device=device)
    vocab_ids = torch.arange(vocab, device=device)
    node_ids = torch.arange(num_nodes_max, device=device)
    # No host sync anywhere (the op is capturable on every backend): masks, no boolean indexing.
    for j in range(num_nodes_max):
        child = (j < n) & (parents[:, j] == cur)
        x = nodes[:, j]
        valid = (x >= 0) & (x < vocab)
        xc = x.clamp(0, vocab - 1)
        first = torch.where(child & ~tried, torch.full_like(first, j), first)
        p_cur = p_all[req, cur + 1]  # [R, V]
        p_x = p_cur.gather(1, xc[:, None])[:, 0]
        # The first child's coin is rejection_sample's coin at this depth; later siblings draw on their own stream.
        coin = torch.where(tried, rng.uniform(a.seed, a.offset, rng.STREAM_TREE_ACCEPT, depth, j),
                           rng.uniform(a.seed, a.offset, rng.STREAM_ACCEPT, depth, 0))
        if stochastic:
            q = a.draft_probs[req, first].float()  # [R, V]: the siblings' shared distribution
            q_x = q.gather(1, xc[:, None])[:, 0]
            sq = big_s * q_x
            w_x = torch.where(p_x > sq, p_x - sq, torch.zeros_like(p_x))
            fresh = valid
        else:
            q_x = torch.ones_like(p_x)
            dup = zeroed.gather(1, xc[:, None])[:, 0]
            w_x = torch.where(dup, torch.zeros_like(p_x), p_x)
            fresh = valid & ~dup
        accept = torch.where(greedy, xc == amax_all[req, cur + 1], coin * q_x * mass < w_x)
        accept &= child & valid
        reject = child & ~accept
        # Rejected: the residual of the next sibling (and of the final draw) loses this sibling's share.
        upd = reject & fresh
        if stochastic:
            new_s = big_s + mass
            sq = new_s[:, None] * q
            w = torch.where(p_cur > sq, p_cur - sq, torch.zeros_like(p_cur))
            big_s = torch.where(upd, new_s, big_s)
            mass = torch.where(upd, w.sum(dim=-1), mass)
        else:
            mass = torch.where(upd, (mass - w_x).clamp(min=0.0), mass)
            zeroed |= (vocab_ids[None, :] == xc[:, None]) & upd[:, None]
        tried |= reject
        # Accepted: descend, and the new node's children start from its own target distribution.
        path = torch.where(accept[:, None] & (node_ids[None, :] == depth[:, None]), j, path)
        cur = torch.where(accept, torch.full_like(cur, j), cur)
        depth += accept.to(torch.int64)
        tried &= ~accept
        big_s = torch.where(accept, torch.zeros_like(big_s), big_s)
        mass = torch.where(accept, torch.ones_like(mass), mass)
        zeroed &= ~accept[:, None]

    # One more token from the final node: its residual if a child was tried, else the bonus.
    p_final = p_all[req, cur + 1]
    if stochastic and num_nodes_max:
        sq = big_s[:, None] * a.draft_probs[req, first].float()
        residual = torch.where(p_final > sq, p_final - sq, torch.zeros_like(p_final))
    else:
        residual = torch.where(zeroed, torch.zeros_like(p_final), p_final)
    no_mass = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(no_mass, p_final, residual)
    y_res = gumbel_sample(residual, a.seed, a.offset, rng.STREAM_RESIDUAL, depth)
    y_bonus = gumbel_sample(p_final, a.seed, a.offset, rng.STREAM_BONUS, depth)
    y = torch.where(tried, y_res, y_bonus)
    y = torch.where(greedy, amax_all[req, cur + 1], y)

    depth = torch.where(live, depth, torch.zeros_like(depth))
    y = torch.where(live, y, torch.full_like(y, -1))
    on_path = node_ids[None, :] < depth[:, None]
    path_tokens = nodes.gather(1, path.clamp(min=0))
    tokens[:, :num_nodes_max] = torch.where(on_path, path_tokens, -1).to(torch.int32)
    tokens.scatter_(1, depth[:, None], y[:, None].to(torch.int32))
    num_accepted.copy_(depth.to(torch.int32))
    accepted_nodes.copy_(torch.where(on_path, path, -1).to(torch.int32))
    return tokens, num_accepted, accepted_nodes
