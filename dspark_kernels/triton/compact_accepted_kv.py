"""Triton compact_accepted_kv: implements dspark_kernels.compact_accepted_kv in one launch.

Grid (R, tiles of Hkv·D): each program owns one request and one tile of the
flattened (head, dim) row and performs that request's moves in increasing k,
K and V together. Why this split is race-free in place: the moves of one
request touch one slot row each, and every element of a row is copied by the
same program and the same lane at every step, so the sequential order of the
reference holds per lane; no move reads a slot an earlier move wrote (a_j >=
j > k), so even a compiler that hoists loads earlier cannot read a stale
value, and every load precedes, in program order, the stores that may
overwrite its slot. The path check (strictly increasing in [0, N)) runs in
every program before any move, so a bad path moves nothing. A slot row of
8 kv heads x 128 dims is 2 KB in bf16: one tile of 1024 lanes moves half of
it per step, and a request moves at most n rows twice (K and V): the traffic
is 2·(rows moved)·Hkv·D·elt read and written, the floor of any compaction.
"""

import torch
import triton
import triton.language as tl

BLOCK_E = 1024  # (head, dim) elements per program: 4 KB of fp32, 8 lanes per thread at 4 warps


@triton.jit
def _slot(pt_ptr, stride_ptr, stride_ptp, r, pos, width, num_pages, page_size,
          stride_kp, stride_ks, stride_vp, stride_vs):
    """(k offset, v offset, ok) of cache position pos of request r."""
    col = pos // page_size
    ok = (pos >= 0) & (col < width)
    page = tl.load(pt_ptr + r * stride_ptr + tl.minimum(tl.maximum(col, 0), width - 1) * stride_ptp,
                   mask=ok, other=-1).to(tl.int64)
    ok = ok & (page >= 0) & (page < num_pages)
    s = pos % page_size
    return page * stride_kp + s * stride_ks, page * stride_vp + s * stride_vs, ok


@triton.jit
def _compact_kernel(
    k_ptr, v_ptr, stride_kp, stride_ks, stride_kh, stride_kd, stride_vp, stride_vs, stride_vh, stride_vd,
    pt_ptr, stride_ptr, stride_ptp, start_ptr, stride_s, nodes_ptr, stride_nr, stride_nn, nacc_ptr, stride_na,
    num_pages, page_size, width, n_max, head_dim, row_elems,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = e < row_elems
    h = e // head_dim
    d = e % head_dim
    k_lane = h * stride_kh + d * stride_kd
    v_lane = h * stride_vh + d * stride_vd
    n = tl.minimum(tl.maximum(tl.load(nacc_ptr + r * stride_na).to(tl.int64), 0), n_max)
    # The path must be strictly increasing inside [0, N): else the request moves nothing.
    ok = tl.full((), 1, tl.int1)
    prev = tl.full((), -1, tl.int64)
    for k in range(0, n):
        a = tl.load(nodes_ptr + r * stride_nr + k * stride_nn).to(tl.int64)
        ok = ok & (a > prev) & (a < n_max)
        prev = a
    start = tl.load(start_ptr + r * stride_s).to(tl.int64)
    if ok:
        for k in range(0, n):
            a = tl.load(nodes_ptr + r * stride_nr + k * stride_nn).to(tl.int64)
            k_src, v_src, ok_src = _slot(pt_ptr, stride_ptr, stride_ptp, r, start + 1 + a, width, num_pages,
                                         page_size, stride_kp, stride_ks, stride_vp, stride_vs)
            k_dst, v_dst, ok_dst = _slot(pt_ptr, stride_ptr, stride_ptp, r, start + 1 + k, width, num_pages,
                                         page_size, stride_kp, stride_ks, stride_vp, stride_vs)
            move = inside & ok_src & ok_dst & (a != k)
            kv = tl.load(k_ptr + k_src + k_lane, mask=move)
            vv = tl.load(v_ptr + v_src + v_lane, mask=move)
            tl.store(k_ptr + k_dst + k_lane, kv, mask=move)
            tl.store(v_ptr + v_dst + v_lane, vv, mask=move)


def compact_accepted_kv(a) -> None:
    k, v, pt = a.k_cache, a.v_cache, a.page_table
    num_req, n_max = a.accepted_nodes.shape
    num_pages, page_size, heads, dim = k.shape
    row_elems = heads * dim
    if num_req == 0 or n_max == 0 or row_elems == 0 or num_pages == 0:
        return None
    block = min(BLOCK_E, triton.next_power_of_2(row_elems))
    _compact_kernel[(num_req, triton.cdiv(row_elems, block))](
        k, v, *k.stride(), *v.stride(), pt, pt.stride(0), pt.stride(1), a.start_pos, a.start_pos.stride(0),
        a.accepted_nodes, a.accepted_nodes.stride(0), a.accepted_nodes.stride(1), a.num_accepted,
        a.num_accepted.stride(0), num_pages, page_size, pt.shape[1], n_max, dim, row_elems, BLOCK=block,
    )
    return None


def _compile_specs():
    """(kernel, signature, constexprs) tuples that tests compile for sm_90 ahead of time."""
    sig = {"k_ptr": "*bf16", "v_ptr": "*bf16"}
    for name in ("kp", "ks", "kh", "kd", "vp", "vs", "vh", "vd"):
        sig[f"stride_{name}"] = "i64"
    sig.update({"pt_ptr": "*i32", "stride_ptr": "i64", "stride_ptp": "i64", "start_ptr": "*i32", "stride_s": "i64",
                "nodes_ptr": "*i32", "stride_nr": "i64", "stride_nn": "i64", "nacc_ptr": "*i32", "stride_na": "i64",
                "num_pages": "i32", "page_size": "i32", "width": "i32", "n_max": "i32", "head_dim": "i32",
                "row_elems": "i32", "BLOCK": "constexpr"})
    return [(_compact_kernel, sig, {"BLOCK": BLOCK_E})]
