"""Reference pack_verify: implements dspark_kernels.pack_verify with torch ops (static shapes, no host sync).

Row t of the B = num_rows output rows finds its request by a binary search
over cu_verify[1:] written out below (owner_of_rows), so that the result is
defined, and the same on every backend, for any cu_verify: a valid one is
non-decreasing and the search returns the r with cu_verify[r] <= t <
cu_verify[r+1]; for a garbage one (unchecked path) it still returns some r in
[0, R], the same r as the Triton kernel's identical search. Then, for a live
row (r < R and t < cu_verify[R]), with j = clamp(t - cu_verify[r], 0, γ):

    token_ids[t]    = anchor[r] if j == 0 else tokens[r, j - 1]
    positions[t]    = p = clamp(start_pos[r] + j, 0, 2^31 - 1)   (int64 math)
    row_request[t]  = r
    slot_mapping[t] = page_table[r, p // S] * S + p % S, or scratch_slot when
                      p // S >= max_pages or the page id is outside [0, num_pages)

and padding rows get pad_token, 0, -1, scratch_slot. For valid inputs the
clamps change nothing (the op's value checks guarantee it).
"""

from __future__ import annotations

import torch

MAX_POSITION = 2**31 - 1  # positions and token ids are int32
NO_PAGE_LIMIT = 2**31  # num_pages None: page ids must fit int32 (no cache has 2^31 pages)


def search_steps(num_req: int) -> int:
    """Halvings that close the search interval: it starts with R candidates and
    each step leaves at most floor(size / 2), so R.bit_length() steps reach 0."""
    return num_req.bit_length()


def owner_of_rows(cu: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """r[t] = the first r in [0, R] with cu[r + 1] > t, by the binary search (upper bound)
    that the Triton kernel runs: lo, hi = 0, R; mid = (lo + hi) // 2; go right iff cu[mid+1] <= t."""
    num_req = cu.numel() - 1
    ends = cu[1:]
    lo = torch.zeros_like(t)
    hi = torch.full_like(t, num_req)
    for _ in range(search_steps(num_req)):
        active = lo < hi
        mid = (lo + hi) // 2
        right = ends[mid.clamp(max=num_req - 1)] <= t
        lo = torch.where(active & right, mid + 1, lo)
        hi = torch.where(active & ~right, mid, hi)
    return lo


def pack_verify(a):
    anchor, tokens, cu_verify, start_pos = a.anchor, a.tokens, a.cu_verify, a.start_pos
    num_req, gamma = tokens.shape
    rows = a.num_rows
    device = tokens.device
    t = torch.arange(rows, device=device, dtype=torch.int64)
    cu = cu_verify.to(torch.int64)
    if num_req:
        r = owner_of_rows(cu, t)
        live = (r < num_req) & (t < cu[num_req])
        rc = r.clamp(max=num_req - 1)  # the index used for loads: always a request
        j = (t - cu[rc]).clamp(0, gamma)
        tok = anchor.to(torch.int64)[rc]
        if gamma:
            tok = torch.where(j == 0, tok, tokens.to(torch.int64)[rc, (j - 1).clamp(min=0)])
        pos = (start_pos.to(torch.int64)[rc] + j).clamp(0, MAX_POSITION)
    else:  # no request: every row is padding
        r = rc = torch.zeros_like(t)
        live = torch.zeros_like(t, dtype=torch.bool)
        tok = pos = r
    token_ids = torch.where(live, tok, a.pad_token).to(torch.int32)
    positions = torch.where(live, pos, 0).to(torch.int32)
    row_request = torch.where(live, r, -1).to(torch.int32)
    if a.page_table is None:
        return token_ids, positions, row_request, torch.empty(0, dtype=torch.int64, device=device)
    page_size, width = a.page_size, a.page_table.shape[1]
    col = pos // page_size
    col_ok = live & (col < width)
    if width and num_req:
        page = a.page_table.to(torch.int64)[rc, col.clamp(max=width - 1)]
    else:
        page = torch.full_like(t, -1)
    ok = col_ok & (page >= 0) & (page < a.num_pages)
    slot_mapping = torch.where(ok, page * page_size + pos % page_size, a.scratch_slot)
    return token_ids, positions, row_request, slot_mapping
