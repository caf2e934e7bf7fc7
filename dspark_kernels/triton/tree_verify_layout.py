"""Triton tree_verify_layout: implements dspark_kernels.tree_verify_layout in one launch, one program per block of rows.

Each program takes BLOCK consecutive rows of the static batch, finds each
row's request by pack_verify's binary search (so the rows line up with
pack_verify's, whatever cu_verify holds), then walks the row's ancestors up
the parent pointers: at most N steps (a parent index is smaller than its
child's), one int32 load per step and lane, accumulating the 64-bit ancestor
mask and the depth; the mask is split into the W int32 words. Rows are
independent, so nothing waits on another program, and every output row is
written exactly once. With N <= 63 a walk is at most 63 dependent loads of a
[R, N] table that stays in L1/L2 (R = 64: 16 KB); the op is launch-bound.
"""

import torch
import triton
import triton.language as tl

from .ragged import row_owner

from ..reference.pack_verify import MAX_POSITION, search_steps
from ..reference.tree_verify_layout import default_cu_verify

BLOCK_ROWS = 128  # rows per program: 4 programs for a 512-row bucket
POSITION_CAP = tl.constexpr(MAX_POSITION)


@triton.jit
def _layout_kernel(
    par_ptr, stride_pr, stride_pn, cu_ptr, stride_cu, start_ptr, stride_s,
    mask_ptr, stride_m, pos_ptr,
    num_req, n_max, num_rows, search_steps,
    WORDS: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_bucket = t < num_rows
    t64 = t.to(tl.int64)
    r, rc, total = row_owner(cu_ptr, stride_cu, num_req, t64, search_steps, BLOCK)
    live = in_bucket & (r < num_req) & (t64 < total)
    begin = tl.load(cu_ptr + rc * stride_cu, mask=live, other=0).to(tl.int64)
    j = tl.minimum(tl.maximum(t64 - begin, 0), n_max)

    # The ancestor walk: node i = j - 1 up to the anchor (i = -1).
    bits = tl.full([BLOCK], 1, tl.int64)  # bit 0: the anchor, an ancestor of every row
    depth = tl.zeros([BLOCK], dtype=tl.int64)
    i = tl.where(live, j - 1, -1)
    for _ in range(n_max):
        walking = i >= 0
        bits = bits | tl.where(walking, tl.full([BLOCK], 1, tl.int64) << (i + 1), 0)
        depth += walking.to(tl.int64)
        p = tl.load(par_ptr + rc * stride_pr + tl.maximum(i, 0) * stride_pn, mask=walking, other=-1).to(tl.int64)
        i = tl.where(walking & (p >= -1) & (p < i), p, -1)  # a parent that is not earlier counts as the anchor
    pos = tl.load(start_ptr + rc * stride_s, mask=live, other=0).to(tl.int64) + depth
    pos = tl.minimum(tl.maximum(pos, 0), POSITION_CAP)
    tl.store(pos_ptr + t64, tl.where(live, pos, 0).to(tl.int32), mask=in_bucket)
    bits = tl.where(live, bits, 1)
    for w in tl.static_range(WORDS):
        word = ((bits >> (32 * w)) & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
        tl.store(mask_ptr + t64 * stride_m + w, word, mask=in_bucket)


def tree_verify_layout(a):
    num_req, n_max = a.tree_parents.shape
    rows = a.num_rows
    words = (n_max + 1 + 31) // 32
    device = a.tree_parents.device
    cu = a.cu_verify if a.cu_verify is not None else default_cu_verify(a.num_nodes, n_max)
    mask = torch.empty((rows, words), dtype=torch.int32, device=device)
    positions = torch.empty((rows,), dtype=torch.int32, device=device)
    if rows:
        par = a.tree_parents
        _layout_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            par, par.stride(0), par.stride(1), cu, cu.stride(0), a.start_pos, a.start_pos.stride(0),
            mask, mask.stride(0), positions, num_req, n_max, rows, search_steps(num_req),
            WORDS=words, BLOCK=BLOCK_ROWS,
        )
    return mask, positions, cu.to(torch.int32).clone() if cu.dtype != torch.int32 or a.cu_verify is not None else cu


def _compile_specs():
    """(kernel, signature, constexprs) tuples that tests compile for sm_90 ahead of time."""
    sig = {"par_ptr": "*i32", "stride_pr": "i64", "stride_pn": "i64", "cu_ptr": "*i32", "stride_cu": "i64",
           "start_ptr": "*i32", "stride_s": "i64", "mask_ptr": "*i32", "stride_m": "i64", "pos_ptr": "*i32",
           "num_req": "i32", "n_max": "i32", "num_rows": "i32", "search_steps": "i32",
           "WORDS": "constexpr", "BLOCK": "constexpr"}
    return [(_layout_kernel, sig, {"WORDS": w, "BLOCK": BLOCK_ROWS}) for w in (1, 2)]
