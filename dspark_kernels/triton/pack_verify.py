"""Triton pack_verify: implements dspark_kernels.pack_verify in one launch, one program per block of output rows.

Each program takes BLOCK consecutive rows of the static bucket and finds each
row's request by the binary search of the reference (owner_of_rows: first r
with cu_verify[r+1] > t), then gathers anchor / draft / start position / page
id and writes all four outputs, padding included. Why rows and not one
program per request writing its own rows:

- every output row is written exactly once, by one program, whatever
  cu_verify holds: the padding rows need no second pass, and garbage metadata
  (overlapping or decreasing offsets, unchecked path) cannot make two programs
  race on a row, so the result is deterministic and equal to the reference;
- the grid is cdiv(B, BLOCK) from the static bucket size alone (a per-request
  grid would need R programs plus padding programs, and γ + 1 lanes each,
  mostly idle for short schedules).

The price is R.bit_length() dependent loads of cu_verify per row (10 at
R = 512): R + 1 int32 values that stay in L1/L2, against 20 bytes written
per row; the op is launch-bound (~2-3 us) either way.

Memory safety on the unchecked path: every index used for a load is clamped
(request to [0, R - 1], draft column to [0, γ - 1], page column to
[0, max_pages - 1]) or masked, and stores are masked to t < B.
"""

import torch
import triton
import triton.language as tl

from .ragged import row_owner

from ..reference.pack_verify import MAX_POSITION, search_steps

BLOCK_ROWS = 256  # rows per program: 16 programs for a 4096-row bucket, 1 for <= 256
POSITION_CAP = tl.constexpr(MAX_POSITION)  # positions saturate at 2^31 - 1 (int32 outputs)


@triton.jit
def _pack_verify_kernel(
    anchor_ptr, tokens_ptr, cu_ptr, start_ptr, pt_ptr,
    tok_out, pos_out, req_out, slot_out,
    num_req, gamma, num_rows, max_pages, page_size, num_pages, scratch_slot, pad_token, search_steps,
    stride_a, stride_tr, stride_tg, stride_cu, stride_s, stride_ptr, stride_ptp,
    HAS_PAGES: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bucket = t < num_rows
    t64 = t.to(tl.int64)

    r, rc, total = row_owner(cu_ptr, stride_cu, num_req, t64, search_steps, BLOCK)
    live = in_bucket & (r < num_req) & (t64 < total)

    begin = tl.load(cu_ptr + rc * stride_cu, mask=live, other=0).to(tl.int64)
    j = tl.minimum(tl.maximum(t64 - begin, 0), gamma)
    anchor = tl.load(anchor_ptr + rc * stride_a, mask=live, other=0).to(tl.int64)
    col = tl.maximum(j - 1, 0)
    draft = tl.load(tokens_ptr + rc * stride_tr + col * stride_tg, mask=live & (j > 0), other=0).to(tl.int64)
    tok = tl.where(j == 0, anchor, draft)
    start = tl.load(start_ptr + rc * stride_s, mask=live, other=0).to(tl.int64)
    pos = tl.minimum(tl.maximum(start + j, 0), POSITION_CAP)

    tl.store(tok_out + t, tl.where(live, tok, pad_token).to(tl.int32), mask=in_bucket)
    tl.store(pos_out + t, tl.where(live, pos, 0).to(tl.int32), mask=in_bucket)
    tl.store(req_out + t, tl.where(live, r, -1), mask=in_bucket)
    if HAS_PAGES:
        page_col = pos // page_size
        col_ok = live & (page_col < max_pages)
        page = tl.load(pt_ptr + rc * stride_ptr + tl.minimum(page_col, max_pages - 1) * stride_ptp,
                       mask=col_ok, other=-1).to(tl.int64)
        ok = col_ok & (page >= 0) & (page < num_pages)
        slot = tl.where(ok, page * page_size + pos % page_size, scratch_slot)
        tl.store(slot_out + t, slot, mask=in_bucket)


def pack_verify(a):
    """Implements dspark_kernels.pack_verify; a is the prepared record (num_rows and num_pages are ints)."""
    anchor, tokens, cu_verify, start_pos, page_table = a.anchor, a.tokens, a.cu_verify, a.start_pos, a.page_table
    num_req, gamma = tokens.shape
    rows = a.num_rows
    dev = tokens.device
    token_ids = torch.empty(rows, dtype=torch.int32, device=dev)
    positions = torch.empty(rows, dtype=torch.int32, device=dev)
    row_request = torch.empty(rows, dtype=torch.int32, device=dev)
    has_pages = page_table is not None
    slot_mapping = torch.empty(rows if has_pages else 0, dtype=torch.int64, device=dev)
    if rows == 0:
        return token_ids, positions, row_request, slot_mapping
    pt = page_table if has_pages else cu_verify  # never read without pages
    max_pages = pt.shape[1] if has_pages else 1
    _pack_verify_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
        anchor, tokens, cu_verify, start_pos, pt, token_ids, positions, row_request, slot_mapping,
        num_req, gamma, rows, max_pages, a.page_size if has_pages else 1, a.num_pages if has_pages else 1,
        a.scratch_slot, a.pad_token, search_steps(num_req),
        anchor.stride(0), tokens.stride(0), tokens.stride(1), cu_verify.stride(0), start_pos.stride(0),
        pt.stride(0), pt.stride(1) if pt.dim() > 1 else 1,
        HAS_PAGES=has_pages, BLOCK=BLOCK_ROWS)
    return token_ids, positions, row_request, slot_mapping


def _compile_specs():
    """(kernel, signature, constexprs) triples that tests compile for sm_90 ahead of time."""
    names = ("anchor_ptr tokens_ptr cu_ptr start_ptr pt_ptr tok_out pos_out req_out slot_out num_req gamma num_rows "
             "max_pages page_size num_pages scratch_slot pad_token search_steps stride_a stride_tr stride_tg "
             "stride_cu stride_s stride_ptr stride_ptp").split()
    specs = []
    # int32 metadata with a page table (the engine's case) and int64 metadata without one.
    for idx, has_pages in (("i32", True), ("i64", False)):
        sig = {k: "i32" for k in names}
        sig.update(anchor_ptr=f"*{idx}", tokens_ptr=f"*{idx}", cu_ptr="*i32", start_ptr=f"*{idx}", pt_ptr=f"*{idx}",
                   tok_out="*i32", pos_out="*i32", req_out="*i32", slot_out="*i64", num_pages="i64",
                   scratch_slot="i64")
        const = dict(HAS_PAGES=has_pages, BLOCK=BLOCK_ROWS)
        sig.update({k: "constexpr" for k in const})
        aligned = tuple(k for k in names if k.endswith(("_ptr", "_out")))  # fresh torch tensors are 16-byte aligned
        specs.append((_pack_verify_kernel, sig, const, {"divisible_by_16": aligned}))
    return specs
