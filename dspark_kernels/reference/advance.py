"""Reference advance: implements dspark_kernels.advance with torch ops (static shapes, no host sync).

Per request r, with n = clamp(num_accepted[r], 0, γ) + 1 tokens offered by
rejection_sample (tokens[r, 0..n-1]: the accepted drafts, then the residual
or bonus token):

    cut      = min(n, e + 1 if an EOS id sits at the first offered index e else n,
                   max(max_new_tokens[r] - num_generated[r], 0))
    emitted  = cut if active[r] else 0
    anchor'  = tokens[r, emitted - 1] if emitted > 0 else anchor[r]
    start'   = start_pos[r] + emitted          (= kv_lens': keys 0..start'-1 are committed)
    gen'     = num_generated[r] + emitted
    finished = active[r] and (an EOS was emitted, or gen' >= max_new_tokens[r],
                              or start' + γ + 1 > max_positions[r])
    active'  = active[r] and not finished
    offset'  = offset + 1

Everything is computed in int64 and stored as int32 (positions are checked
below 2**31 by the op's value checks).
"""

from __future__ import annotations

import torch


def advance(a):
    tokens = a.tokens.to(torch.int64)
    num_req, width = tokens.shape
    device = tokens.device
    gamma = width - 1
    j = torch.arange(width, device=device)
    offered = a.num_accepted.to(torch.int64).clamp(0, gamma) + 1  # [R]
    cut = offered
    eos_at = torch.full((num_req,), width, dtype=torch.int64, device=device)
    if a.eos_token_ids is not None and a.eos_token_ids.numel():
        # A broadcast compare, not torch.isin: isin may sort and unique (a host sync on CUDA); E is small.
        is_eos = (tokens[:, :, None] == a.eos_token_ids.to(torch.int64)[None, None, :]).any(-1)
        is_eos &= j[None, :] < offered[:, None]
        eos_at = torch.where(is_eos, j[None, :], width).amin(dim=1)
        cut = torch.minimum(cut, eos_at + 1)
    generated = a.num_generated.to(torch.int64)
    if a.max_new_tokens is not None:
        cut = torch.minimum(cut, (a.max_new_tokens.to(torch.int64) - generated).clamp(min=0))
    act = a.active.to(torch.bool)
    emitted = torch.where(act, cut, torch.zeros_like(cut))
    picked = tokens.gather(1, (emitted - 1).clamp(min=0)[:, None])[:, 0]  # the op checks width >= 1
    anchor = torch.where(emitted > 0, picked, a.anchor.to(torch.int64))
    start = a.start_pos.to(torch.int64) + emitted
    gen = generated + emitted
    done = eos_at < emitted  # the EOS at index e was emitted iff e < emitted
    if a.max_new_tokens is not None:
        done = done | (gen >= a.max_new_tokens.to(torch.int64))
    if a.max_positions is not None:
        done = done | (start + width > a.max_positions.to(torch.int64))
    finished = act & done
    i32 = torch.int32
    start32 = start.to(i32)
    return (anchor.to(i32), emitted.to(i32), start32, start32.clone(), gen.to(i32), act & ~finished, finished,
            a.offset.reshape(()).to(torch.int64) + 1)
