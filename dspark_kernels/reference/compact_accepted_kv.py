"""Reference compact_accepted_kv: implements dspark_kernels.compact_accepted_kv, one move at a time on the host.

The definition, written as a loop: request by request, path step by path step
(k increasing), copy the key and value at block position 1 + a_k to block
position 1 + k. In that order no move reads a slot an earlier move wrote
(a_j >= j > k for a strictly increasing path), so the sequential result is
the gather "new[1 + k] = old[1 + a_k]". Requests whose path is not strictly
increasing inside [0, N), and single moves whose slot is outside the page
table or the cache, are skipped exactly as in the Triton kernel. The loop
reads metadata on the host (a sync on a GPU); the Triton path does not.
"""

from __future__ import annotations

import torch


def valid_paths(accepted_nodes: torch.Tensor, num_accepted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n [R] int64 = clamp(num_accepted, 0, N), ok [R] bool: accepted_nodes[r, :n] strictly increasing in [0, N))."""
    num_req, n_max = accepted_nodes.shape
    n = num_accepted.to(torch.int64).clamp(0, n_max)
    nodes = accepted_nodes.to(torch.int64)
    k = torch.arange(n_max, device=nodes.device)[None, :]
    on = k < n[:, None]
    in_range = (nodes >= 0) & (nodes < n_max)
    prev = torch.cat([torch.full_like(nodes[:, :1], -1), nodes[:, :-1]], dim=1)
    ok = ((in_range & (nodes > prev)) | ~on).all(dim=1)
    return n, ok


def compact_accepted_kv(a) -> None:
    k_cache, v_cache, page_table = a.k_cache, a.v_cache, a.page_table
    num_pages, page_size = k_cache.shape[:2]
    width = page_table.shape[1]
    n, ok = valid_paths(a.accepted_nodes, a.num_accepted)
    nodes = a.accepted_nodes.to(torch.int64).tolist()
    starts = a.start_pos.to(torch.int64).tolist()
    table = page_table.to(torch.int64).tolist()
    for r, (count, good) in enumerate(zip(n.tolist(), ok.tolist())):
        if not good:
            continue

        def slot(pos):
            col = pos // page_size
            if pos < 0 or col >= width or not 0 <= table[r][col] < num_pages:
                return None
            return table[r][col], pos % page_size

        for k in range(count):
            if nodes[r][k] == k:
                continue  # already in place (a chain moves nothing)
            src, dst = slot(starts[r] + 1 + nodes[r][k]), slot(starts[r] + 1 + k)
            if src is None or dst is None:
                continue
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]
