"""Triton helpers for ragged verify batches (rows grouped by request through cu_verify).

Not an op: jit functions shared by the kernels whose programs cover rows, not requests
(pack_verify, tree_verify_layout).
"""

import triton
import triton.language as tl


@triton.jit
def row_owner(cu_ptr, stride_cu, num_req, t64, search_steps, BLOCK: tl.constexpr):
    """(r, rc, total) for rows t64 [BLOCK] int64: r = the request owning each row, found by an upper-bound
    binary search over cu_verify[1:] step for step as the reference's owner_of_rows (search_steps =
    R.bit_length() iterations, a runtime loop: no unrolling); rc = r clamped to a valid request (loads with it
    stay in bounds whatever cu_verify holds); total = cu_verify[R]. A row is live iff r < R and t < total."""
    last = tl.maximum(num_req - 1, 0)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + num_req
    for _ in range(search_steps):
        active = lo < hi
        mid = (lo + hi) // 2
        end = tl.load(cu_ptr + (tl.minimum(mid, last) + 1).to(tl.int64) * stride_cu, mask=active, other=0)
        right = end.to(tl.int64) <= t64
        lo = tl.where(active & right, mid + 1, lo)
        hi = tl.where(active & (~right), mid, hi)
    total = tl.load(cu_ptr + num_req.to(tl.int64) * stride_cu).to(tl.int64)
    return lo, tl.minimum(lo, last).to(tl.int64), total
