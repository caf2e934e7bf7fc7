"""Triton advance: implements dspark_kernels.advance, one program per BLOCK requests, one launch.

Each program loads its [BLOCK, γ+1] tile of tokens once, finds the first
offered EOS by a loop over the (few) EOS ids that compares the whole tile per
id, and writes the eight outputs; program 0 also writes offset + 1. The work
is ~R·(γ+1)·4 bytes in and R·22 bytes out: at R = 1024, γ = 7 about 55 KB,
so the launch (~3 us eager, ~1 us in a graph) is the floor, and one launch
is what this design spends. Indices are clamped before every load
(num_accepted to [0, γ]), so bad metadata on the unchecked path reads only
inside tokens.
"""

import torch
import triton
import triton.language as tl

# 128 requests per program: R = 1024 fills 8 programs, and a [128, 8] int32
# tile is 4 KB of registers across 4 warps (8 values per thread).
BLOCK = 128


@triton.jit
def _advance_kernel(tokens_ptr, stride_tr, stride_tj, num_acc_ptr, anchor_ptr, start_ptr, gen_ptr, active_ptr,
                    offset_ptr, eos_ptr, num_eos, max_new_ptr, max_pos_ptr,
                    out_anchor_ptr, out_emitted_ptr, out_start_ptr, out_kv_ptr, out_gen_ptr, out_active_ptr,
                    out_finished_ptr, out_offset_ptr, num_req, width,
                    HAS_MAX_NEW: tl.constexpr, HAS_MAX_POS: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_J: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    live = r < num_req
    r64 = r.to(tl.int64)
    j = tl.arange(0, BLOCK_J)
    acc = tl.load(num_acc_ptr + r64, mask=live, other=0).to(tl.int64)
    offered = tl.minimum(tl.maximum(acc, 0), width - 1) + 1
    in_row = (j[None, :] < width) & live[:, None]
    tok = tl.load(tokens_ptr + r64[:, None] * stride_tr + j[None, :].to(tl.int64) * stride_tj, mask=in_row,
                  other=0).to(tl.int64)
    offered_j = j[None, :] < offered[:, None]
    eos_at = tl.full([BLOCK_R], 0, tl.int64) + width
    for e in range(num_eos):
        eid = tl.load(eos_ptr + e).to(tl.int64)
        hit = (tok == eid) & offered_j & in_row
        eos_at = tl.minimum(eos_at, tl.min(tl.where(hit, j[None, :].to(tl.int64), width), axis=1))
    cut = tl.minimum(offered, eos_at + 1)
    gen = tl.load(gen_ptr + r64, mask=live, other=0).to(tl.int64)
    if HAS_MAX_NEW:
        max_new = tl.load(max_new_ptr + r64, mask=live, other=0).to(tl.int64)
        cut = tl.minimum(cut, tl.maximum(max_new - gen, 0))
    act = tl.load(active_ptr + r64, mask=live, other=0) != 0
    emitted = tl.where(act, cut, 0)
    # tokens[r, emitted - 1] from the tile already in registers (no second load).
    last = tl.sum(tl.where(j[None, :] == (emitted - 1)[:, None], tok, 0), axis=1)
    old_anchor = tl.load(anchor_ptr + r64, mask=live, other=0).to(tl.int64)
    anchor = tl.where(emitted > 0, last, old_anchor)
    start = tl.load(start_ptr + r64, mask=live, other=0).to(tl.int64) + emitted
    gen_next = gen + emitted
    done = eos_at < emitted
    if HAS_MAX_NEW:
        done = done | (gen_next >= max_new)
    if HAS_MAX_POS:
        max_pos = tl.load(max_pos_ptr + r64, mask=live, other=0).to(tl.int64)
        done = done | (start + width > max_pos)
    finished = act & done
    tl.store(out_anchor_ptr + r64, anchor.to(tl.int32), mask=live)
    tl.store(out_emitted_ptr + r64, emitted.to(tl.int32), mask=live)
    tl.store(out_start_ptr + r64, start.to(tl.int32), mask=live)
    tl.store(out_kv_ptr + r64, start.to(tl.int32), mask=live)
    tl.store(out_gen_ptr + r64, gen_next.to(tl.int32), mask=live)
    tl.store(out_active_ptr + r64, (act & ~finished).to(tl.int8), mask=live)
    tl.store(out_finished_ptr + r64, finished.to(tl.int8), mask=live)
    if pid == 0:
        tl.store(out_offset_ptr, tl.load(offset_ptr) + 1)


def advance(a):
    num_req, width = a.tokens.shape
    device = a.tokens.device
    i32 = dict(dtype=torch.int32, device=device)
    outs = [torch.empty(num_req, **i32) for _ in range(5)]
    active_out = torch.empty(num_req, dtype=torch.bool, device=device)
    finished = torch.empty(num_req, dtype=torch.bool, device=device)
    offset = torch.empty((), dtype=torch.int64, device=device)
    eos = a.eos_token_ids if a.eos_token_ids is not None else a.tokens.new_empty(0)
    grid = (max(1, triton.cdiv(num_req, BLOCK)),)  # >= 1 program so the offset is always bumped
    _advance_kernel[grid](
        a.tokens, a.tokens.stride(0), a.tokens.stride(1), a.num_accepted, a.anchor, a.start_pos, a.num_generated,
        a.active.view(torch.int8), a.offset.reshape(1), eos.contiguous(), eos.numel(),
        a.max_new_tokens if a.max_new_tokens is not None else a.num_generated,
        a.max_positions if a.max_positions is not None else a.start_pos,
        *outs, active_out.view(torch.int8), finished.view(torch.int8), offset, num_req, width,
        HAS_MAX_NEW=a.max_new_tokens is not None, HAS_MAX_POS=a.max_positions is not None, BLOCK_R=BLOCK,
        BLOCK_J=max(2, triton.next_power_of_2(width)))
    anchor, emitted, start, kv_lens, gen = outs
    return anchor, emitted, start, kv_lens, gen, active_out, finished, offset


def _compile_specs():
    """(kernel, signature, constexprs) triples that tests compile for sm_90 ahead of time."""
    ptr = {n: "*i32" for n in ("tokens_ptr", "num_acc_ptr", "anchor_ptr", "start_ptr", "gen_ptr", "eos_ptr",
                               "max_new_ptr", "max_pos_ptr", "out_anchor_ptr", "out_emitted_ptr", "out_start_ptr",
                               "out_kv_ptr", "out_gen_ptr")}
    sig = {**ptr, "stride_tr": "i64", "stride_tj": "i64", "active_ptr": "*i8", "offset_ptr": "*i64",
           "num_eos": "i32", "out_active_ptr": "*i8", "out_finished_ptr": "*i8", "out_offset_ptr": "*i64",
           "num_req": "i32", "width": "i32", "HAS_MAX_NEW": "constexpr", "HAS_MAX_POS": "constexpr",
           "BLOCK_R": "constexpr", "BLOCK_J": "constexpr"}
    order = ["tokens_ptr", "stride_tr", "stride_tj", "num_acc_ptr", "anchor_ptr", "start_ptr", "gen_ptr",
             "active_ptr", "offset_ptr", "eos_ptr", "num_eos", "max_new_ptr", "max_pos_ptr", "out_anchor_ptr",
             "out_emitted_ptr", "out_start_ptr", "out_kv_ptr", "out_gen_ptr", "out_active_ptr", "out_finished_ptr",
             "out_offset_ptr", "num_req", "width", "HAS_MAX_NEW", "HAS_MAX_POS", "BLOCK_R", "BLOCK_J"]
    sig = {k: sig[k] for k in order}
    return [(_advance_kernel, sig, {"HAS_MAX_NEW": True, "HAS_MAX_POS": True, "BLOCK_R": BLOCK, "BLOCK_J": 8})]
