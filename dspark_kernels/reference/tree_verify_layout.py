"""Reference tree_verify_layout: implements dspark_kernels.tree_verify_layout with torch ops (static shapes, no
host sync).

Per request, the ancestor set of every block row as a 64-bit mask and its
depth, built in one pass over the node index (a parent comes before its
children, so its row is final when a child reads it): row 0 (the anchor) is
bit 0 at depth 0, row 1 + i is row(1 + parent) | bit (1 + i) at depth(parent)
+ 1. Then every output row finds its request exactly as pack_verify's rows do
(reference.pack_verify.owner_of_rows, j clamped to [0, N]) and gathers its
mask and position; the mask is split into int32 words (bit j in word j // 32).
"""

from __future__ import annotations

import torch

from .pack_verify import MAX_POSITION, owner_of_rows


def default_cu_verify(num_nodes: torch.Tensor, n_max: int) -> torch.Tensor:
    """[R + 1] int32: 0, then + clamp(num_nodes, 0, N) + 1 per request (every request live)."""
    cu = torch.zeros(num_nodes.numel() + 1, dtype=torch.int32, device=num_nodes.device)
    cu[1:] = torch.cumsum(num_nodes.to(torch.int64).clamp(0, n_max) + 1, 0).to(torch.int32)
    return cu


def ancestor_masks(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [R, N + 1] int64, depth [R, N + 1] int64) of every block row; a parent outside [-1, i - 1]
    counts as -1 (the anchor)."""
    num_req, n_max = parents.shape
    device = parents.device
    mask = torch.ones(num_req, n_max + 1, dtype=torch.int64, device=device)
    depth = torch.zeros(num_req, n_max + 1, dtype=torch.int64, device=device)
    req = torch.arange(num_req, device=device)
    par = parents.to(torch.int64)
    for i in range(n_max):
        p = par[:, i]
        p = torch.where((p >= -1) & (p < i), p, -1)
        mask[:, i + 1] = mask[req, p + 1] | (1 << (i + 1))
        depth[:, i + 1] = depth[req, p + 1] + 1
    return mask, depth


def split_words(mask: torch.Tensor, words: int) -> torch.Tensor:
    """int64 masks [...] -> int32 words [..., W]: word w holds bits 32w .. 32w + 31 (two's complement)."""
    out = [((mask >> (32 * w)) & 0xFFFFFFFF) for w in range(words)]
    out = [torch.where(x >= 2**31, x - 2**32, x) for x in out]
    return torch.stack(out, dim=-1).to(torch.int32)


def tree_verify_layout(a):
    num_req, n_max = a.tree_parents.shape
    rows = a.num_rows
    words = (n_max + 1 + 31) // 32
    device = a.tree_parents.device
    cu = a.cu_verify if a.cu_verify is not None else default_cu_verify(a.num_nodes, n_max)
    t = torch.arange(rows, device=device, dtype=torch.int64)
    cu64 = cu.to(torch.int64)
    if num_req:
        r = owner_of_rows(cu64, t)
        live = (r < num_req) & (t < cu64[num_req])
        rc = r.clamp(max=num_req - 1)
        j = (t - cu64[rc]).clamp(0, n_max)
        mask, depth = ancestor_masks(a.tree_parents)
        m = mask[rc, j]
        pos = (a.start_pos.to(torch.int64)[rc] + depth[rc, j]).clamp(0, MAX_POSITION)
    else:
        live = torch.zeros_like(t, dtype=torch.bool)
        m = pos = torch.zeros_like(t)
    m = torch.where(live, m, 1)  # padding rows: bit 0 only (a well-formed row; verify_attention ignores it)
    return split_words(m, words), torch.where(live, pos, 0).to(torch.int32), cu.to(torch.int32).clone()
