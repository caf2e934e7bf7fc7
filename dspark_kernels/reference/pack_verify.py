"""Reference pack_verify: implements dspark_kernels.pack_verify with torch ops (static shapes).

Row t < cu_verify[R] belongs to the request r with cu_verify[r] <= t <
cu_verify[r+1]; its local index is j = t - cu_verify[r]:

    token_ids[t]   = anchor[r] if j == 0 else tokens[r, j - 1]
    positions[t]   = start_pos[r] + j
    row_request[t] = r

Rows t >= cu_verify[R] up to the static size R·(γ+1) are padding: -1 in all
three outputs. Static shapes, no host sync.
"""

from __future__ import annotations

import torch


def pack_verify(a):
    anchor, tokens, cu_verify, start_pos = a.anchor, a.tokens, a.cu_verify, a.start_pos
    num_req, gamma = tokens.shape
    device = tokens.device
    size = num_req * (gamma + 1)
    if num_req == 0:
        empty = torch.empty(0, dtype=torch.int32, device=device)
        return empty, empty.clone(), empty.clone()
    t = torch.arange(size, device=device, dtype=torch.int64)
    cu = cu_verify.to(torch.int64)
    r = torch.searchsorted(cu[1:].contiguous(), t, right=True).clamp(max=num_req - 1)
    j = t - cu[r]
    live = t < cu[-1]
    anchors = anchor.to(torch.int64)[r]
    if gamma:
        drafts = tokens.to(torch.int64)[r, (j - 1).clamp(0, gamma - 1)]
        tok = torch.where(j == 0, anchors, drafts)
    else:
        tok = anchors
    minus = torch.full_like(t, -1)
    token_ids = torch.where(live, tok, minus).to(torch.int32)
    positions = torch.where(live, start_pos.to(torch.int64)[r] + j, minus).to(torch.int32)
    row_request = torch.where(live, r, minus).to(torch.int32)
    return token_ids, positions, row_request
