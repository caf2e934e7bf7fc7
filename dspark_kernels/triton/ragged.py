"""Triton helpers for ragged verify batches (rows grouped by request through cu_verify).

Not an op: jit functions shared by the kernels whose programs cover rows (pack_verify,
tree_verify_layout: row_owner) or one request each (rejection_sample, tree_rejection_sample:
request_rows).
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


@triton.jit
def request_rows(cu_ptr, stride_cu, r, num_rows, count, count_max):
    """(start, live, count) of request r's verify rows cu_verify[r] .. cu_verify[r+1], trusted only as far as
    the value checks went: live iff the request has rows and its first row is in [0, num_rows); count (its
    drafts or tree nodes, int) clamped to [0, count_max], to the rows it has less one and to the rows left in
    the logits, and 0 when not live, so no index derived from it reads out of bounds."""
    start = tl.load(cu_ptr + r * stride_cu).to(tl.int64)
    nrows = tl.load(cu_ptr + (r + 1) * stride_cu).to(tl.int64) - start
    live = (nrows > 0) & (start >= 0) & (start < num_rows)
    count = tl.minimum(tl.maximum(count.to(tl.int64), 0), count_max)
    count = tl.where(live, tl.minimum(tl.minimum(count, num_rows - 1 - start), nrows - 1), 0)
    return start, live, count
