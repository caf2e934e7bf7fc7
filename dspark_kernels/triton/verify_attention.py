"""Triton verify_attention: implements dspark_kernels.verify_attention; one tensor-core tile per
(request, kv head), paged KV, flash-decoding splits.

Layout of the work, all grids from static shapes (no host sync, capturable):

1. ``_verify_attn_kernel``, grid (R, Hkv, S). Program (r, h, s) stacks the n_r
   verify rows of request r times the G query heads of kv head h into one
   [BLOCK_M, D] query tile (tile row i = local query i // G, head h·G + i % G;
   8 rows × G 4 = 32), so each key/value chunk it reads serves every query
   that needs it: a tl.dot tile, not a GEMV. It walks its share s of the
   request's key range in BLOCK_N chunks, gathering key rows through the page
   table (any page size; one key row is D contiguous elements), and keeps an
   online softmax (FlashAttention-2) in fp32 with exp2. Masks are computed per
   element from positions: context keys always visible, block keys by the
   causal rule or the tree bits loaded once per query row, then the window.
   Requests with more than BLOCK_M rows loop over row tiles (the bound is read
   on device, so it costs a sync of nothing).
2. With S > 1 (flash-decoding: few requests, long contexts), each program
   writes a partial (out, lse) into an fp32 workspace and
   ``_merge_kernel``, grid (T, Hq / BLOCK_H), combines the S partials with
   their LSEs; it also writes the padding rows past cu_verify[R] (0, -inf).

S is chosen on the host from static bounds only: enough programs to fill the
GPU twice, at most one split per 256 keys of the page table's capacity.

Memory safety without value checks: the kernel clamps a request's rows to
[0, T) (row0 = clamp(cu[r], 0, T), end = clamp(cu[r+1], row0, T)) and its
kv_len to [0, max_pages * page_size], so every page-table column, q row, tree
row and output row it touches exists, and it masks keys whose page id lies
outside [0, P) (they read nothing and are invisible). Two scalar clamps per
program and two compares per key chunk: free beside the tile work.
"""

import math

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tanh(x):
    """tanh in fp32 to ~1e-7 relative: odd Taylor series near 0, exp form elsewhere."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    mag = tl.where(ax < 0.125, small, big)
    return tl.where(x < 0, -mag, mag)


@triton.jit
def _popcount(w):
    """Set bits of each int32 word (SWAR on the unsigned bits: 5 shifts, 3 masks, 1 multiply)."""
    x = w.to(tl.uint32, bitcast=True)
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _verify_attn_kernel(
    q_ptr, k_ptr, v_ptr, pt_ptr, kvlen_ptr, cu_ptr, tree_ptr,
    scale, softcap, window, head_dim, num_rows, num_pages, max_keys,
    stride_qt, stride_qh, stride_qd,
    stride_kp, stride_ks, stride_kh, stride_kd,
    stride_vp, stride_vs, stride_vh, stride_vd,
    stride_ptr, stride_ptp, stride_tt, stride_tw,
    out_ptr, lse_ptr, stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
    GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr, TREE_WORDS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    # Clamped so that no metadata can send a load or store out of bounds (value checks off):
    # rows [row0, row0 + n) inside [0, T), keys [0, kv_len) inside the page table's
    # max_pages * PAGE_SIZE; for valid metadata these clamps change nothing.
    row0 = tl.minimum(tl.maximum(tl.load(cu_ptr + r), 0), num_rows)
    n = tl.minimum(tl.maximum(tl.load(cu_ptr + r + 1), row0), num_rows) - row0
    kv_len = tl.minimum(tl.maximum(tl.load(kvlen_ptr + r), 0), max_keys)
    ctx = kv_len - n

    # This program's key range: the split s share of [lo, kv_len) in BLOCK_N multiples,
    # where lo is the first key inside any row's window (row 0 has the lowest).
    lo = ctx * 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx + 1 - window, 0)
    per_split = tl.cdiv(tl.cdiv(kv_len - lo, num_splits), BLOCK_N) * BLOCK_N
    k_lo = lo + split * per_split
    k_hi = tl.minimum(k_lo + per_split, kv_len)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    pt_row = pt_ptr + r.to(tl.int64) * stride_ptr
    k_head = k_ptr + kvh.to(tl.int64) * stride_kh
    v_head = v_ptr + kvh.to(tl.int64) * stride_vh

    for m0 in range(0, n * GROUP, BLOCK_M):
        m = m0 + offs_m
        t = m // GROUP
        head = kvh * GROUP + m % GROUP
        row_ok = t < n
        row = (row0 + t).to(tl.int64)
        q = tl.load(q_ptr + row[:, None] * stride_qt + head[:, None].to(tl.int64) * stride_qh
                    + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qpos = ctx + t
        if TREE_WORDS > 0:
            w0 = tl.load(tree_ptr + row * stride_tt, mask=row_ok, other=0)
            depth = _popcount(w0)
            if TREE_WORDS > 1:
                w1 = tl.load(tree_ptr + row * stride_tt + stride_tw, mask=row_ok, other=0)
                depth += _popcount(w1)
            # A tree row's logical position is ctx + depth (its ancestors in the block, the anchor
            # included, are depth + 1 bits): the window is over logical positions.
            qpos = ctx + depth - 1

        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for n0 in range(k_lo, k_hi, BLOCK_N):
            kpos = n0 + offs_n
            k_in = kpos < k_hi
            page = tl.load(pt_row + (kpos // PAGE_SIZE) * stride_ptp, mask=k_in, other=0).to(tl.int64)
            # A page id outside [0, P) (unchecked path) reads nothing: its keys are masked.
            page_ok = (page >= 0) & (page < num_pages)
            k_ok = k_in & page_ok
            page = tl.where(page_ok, page, 0)
            slot = (kpos % PAGE_SIZE).to(tl.int64)
            k = tl.load(k_head + page[None, :] * stride_kp + slot[None, :] * stride_ks
                        + offs_d[:, None] * stride_kd, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, k, input_precision=DOT_PRECISION)
            if HAS_SOFTCAP:
                s = (softcap * LOG2E) * _tanh(s * (scale / softcap))
            else:
                s = s * (scale * LOG2E)
            # s is now the logit in log2 units; decide visibility per element.
            j = kpos - ctx  # index inside the block; negative for context keys
            if TREE_WORDS > 0:
                jj = tl.where(j < 0, 0, j)
                bit = (w0[:, None] >> (jj[None, :] & 31)) & 1
                if TREE_WORDS > 1:
                    bit = tl.where(jj[None, :] < 32, bit, (w1[:, None] >> (jj[None, :] & 31)) & 1)
                else:
                    bit = tl.where(jj[None, :] < 32, bit, 0)
                # Block keys past the mask's 32 * TREE_WORDS bits (only with n_r beyond the checked limit) are hidden.
                visible = (j[None, :] < 0) | ((bit != 0) & (jj[None, :] < 32 * TREE_WORDS))
            else:
                visible = j[None, :] <= t[:, None]
            visible = visible & k_ok[None, :]
            if HAS_WINDOW:
                lpos = kpos
                if TREE_WORDS > 0:
                    # Block key j's logical position is ctx + its depth (its tree row's bits - 1): a masked gather
                    # of at most n <= 64 words, and nothing for context keys.
                    in_block = (j >= 0) & (j < n)
                    krow = (row0 + tl.where(in_block, j, 0)).to(tl.int64)
                    kd = _popcount(tl.load(tree_ptr + krow * stride_tt, mask=in_block, other=0))
                    if TREE_WORDS > 1:
                        kd += _popcount(tl.load(tree_ptr + krow * stride_tt + stride_tw, mask=in_block, other=0))
                    lpos = tl.where(in_block, ctx + kd - 1, kpos)
                visible = visible & (lpos[None, :] > qpos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + page[:, None] * stride_vp + slot[:, None] * stride_vs
                        + offs_d[None, :] * stride_vd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * LN2)
        head64 = head.to(tl.int64)
        base = split.to(tl.int64) * stride_os + row * stride_ot + head64 * stride_oh
        tl.store(out_ptr + base[:, None] + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        if STORE_LSE:
            tl.store(lse_ptr + split.to(tl.int64) * stride_ls + row * stride_lt + head64, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    po_ptr, pl_ptr, out_ptr, lse_ptr, cu_ptr, num_req, num_heads, head_dim,
    stride_ps, stride_pt, stride_ph, stride_qs, stride_qt, stride_ot, stride_oh,
    NUM_SPLITS: tl.constexpr, STORE_LSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    live = row < tl.load(cu_ptr + num_req)  # rows past cu_verify[R] were never written
    h_ok = (offs_h < num_heads) & live
    d_ok = offs_d < head_dim
    row64 = row.to(tl.int64)
    l_base = pl_ptr + row64 * stride_qt + offs_h
    o_base = po_ptr + row64 * stride_pt + offs_h[:, None].to(tl.int64) * stride_ph + offs_d[None, :]

    mx = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    for s in range(NUM_SPLITS):
        mx = tl.maximum(mx, tl.load(l_base + s * stride_qs, mask=h_ok, other=float("-inf")))
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    wsum = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), tl.float32)
    for s in range(NUM_SPLITS):
        w = tl.exp(tl.load(l_base + s * stride_qs, mask=h_ok, other=float("-inf")) - mx_safe)
        part = tl.load(o_base + s * stride_ps, mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        acc += w[:, None] * part
        wsum += w
    empty = wsum == 0.0
    o = acc / tl.where(empty, 1.0, wsum)[:, None]
    tl.store(out_ptr + row64 * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=(offs_h < num_heads)[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse = tl.where(empty, float("-inf"), mx_safe + tl.log(tl.where(empty, 1.0, wsum)))
        tl.store(lse_ptr + row64 * num_heads + offs_h, lse, mask=offs_h < num_heads)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a token count so CPU runs also exercise the split path


def choose_num_splits(num_req: int, num_kv: int, max_keys: int, device: torch.device) -> int:
    """Flash-decoding splits from static bounds: fill the GPU twice, >= 256 keys per split, <= 64."""
    programs = max(1, num_req * num_kv)
    want = -(-2 * _num_sms(device) // programs)
    return max(1, min(want, max_keys // 256, 64))


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def launch_config(dtype: torch.dtype, head_dim: int, group: int, max_rows: int, interp: bool) -> dict:
    """Tile sizes (and warps / stages on a GPU) from static facts only.

    Up to 16 rows x G share one [BLOCK_M, D] query tile (one pass over the keys);
    requests with more rows loop over row tiles. The same function feeds the
    launcher and _compile_specs, so the sm_90 compile check covers the launched
    configurations.
    """
    block_d = max(16, _next_pow2(head_dim))
    block_m = min(max(16, _next_pow2(min(max_rows, 16) * group)), 32 if interp else 64)
    block_n = 32 if interp or dtype == torch.float32 or block_d > 128 else 64
    cfg = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    if not interp:
        cfg.update(num_warps=4 if block_m * block_d <= 64 * 128 else 8, num_stages=2)
    return cfg


def verify_attention(a, *, num_splits=None, block_m=None, block_n=None):
    """Implements dspark_kernels.verify_attention; keywords after * are tuning knobs for tests and benchmarks.

    Reads no tensor value on the host: every launch parameter below comes from
    shapes, dtypes, strides and the scalar arguments.
    """
    q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask = (
        a.q, a.k_cache, a.v_cache, a.page_table, a.kv_lens, a.cu_verify, a.tree_mask)
    sm_scale, window, softcap, return_lse = a.sm_scale, a.window, a.softcap, a.return_lse
    num_rows, num_heads, head_dim = q.shape
    page_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    num_req, max_pages = page_table.shape
    group = num_heads // num_kv
    dev = q.device
    interp = dev.type == "cpu"
    if interp and q.dtype == torch.bfloat16:
        # The interpreter emulates bf16 tl.dot wrongly (off by orders of magnitude under
        # Triton 3.x): refuse rather than return garbage. fp32 and fp16 are fine there.
        raise TypeError("q has dtype bfloat16, which the Triton interpreter (CPU tensors) cannot run; "
                        "use float32 or float16 on CPU, the reference backend, or a GPU")
    lse_shape = (num_rows, num_heads) if return_lse else (0,)
    if num_rows == 0 or num_req == 0:
        lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=dev)
        return torch.zeros_like(q, memory_format=torch.contiguous_format), lse

    tree_words = 0 if tree_mask is None else tree_mask.shape[1]
    # Static bound on one request's rows: the whole batch, or 64 with a tree.
    max_rows = min(num_rows, 64 if tree_mask is not None else num_rows)
    cfg = launch_config(q.dtype, head_dim, group, max_rows, interp)
    if block_m is not None:
        cfg["BLOCK_M"] = block_m
    if block_n is not None:
        cfg["BLOCK_N"] = block_n
    block_d = cfg["BLOCK_D"]
    max_keys = max_pages * page_size
    if window > 0:
        max_keys = min(max_keys, window - 1 + max_rows)
    if num_splits is None:
        num_splits = choose_num_splits(num_req, num_kv, max_keys, dev)

    page_table = page_table.to(torch.int32)
    kv_lens = kv_lens.to(torch.int32).contiguous()
    cu = cu_verify.to(torch.int32).contiguous()
    tree = tree_mask if tree_mask is not None else cu  # never read without a tree
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    meta = dict(GROUP=group, PAGE_SIZE=page_size, TREE_WORDS=tree_words, HAS_SOFTCAP=softcap > 0,
                HAS_WINDOW=window > 0, DOT_PRECISION=dot_precision, **cfg)
    common = (q, k_cache, v_cache, page_table, kv_lens, cu, tree, sm_scale, softcap if softcap > 0 else 1.0,
              window, head_dim, num_rows, k_cache.shape[0], max_pages * page_size,
              *q.stride(), *k_cache.stride(), *v_cache.stride(), *page_table.stride(),
              tree.stride(0), tree.stride(1) if tree.dim() > 1 else 1)
    grid = (num_req, num_kv, num_splits)

    if num_splits == 1:
        out = torch.zeros((num_rows, num_heads, head_dim), dtype=q.dtype, device=dev)
        lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=dev)
        _verify_attn_kernel[grid](*common, out, lse, 0, out.stride(0), out.stride(1), 0, num_heads,
                                  STORE_LSE=return_lse, **meta)
        return out, lse

    part_out = torch.empty((num_splits, num_rows, num_heads, head_dim), dtype=torch.float32, device=dev)
    part_lse = torch.empty((num_splits, num_rows, num_heads), dtype=torch.float32, device=dev)
    _verify_attn_kernel[grid](*common, part_out, part_lse, *part_out.stride()[:3], *part_lse.stride()[:2],
                              STORE_LSE=True, **meta)
    out = torch.empty((num_rows, num_heads, head_dim), dtype=q.dtype, device=dev)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=dev)
    block_h = min(_next_pow2(num_heads), max(1, 4096 // block_d))
    _merge_kernel[(num_rows, triton.cdiv(num_heads, block_h))](
        part_out, part_lse, out, lse, cu, num_req, num_heads, head_dim,
        *part_out.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, STORE_LSE=return_lse, BLOCK_H=block_h, BLOCK_D=block_d)
    return out, lse


def _compile_specs():
    """(kernel, signature, constexprs) triples that tests compile for sm_90 ahead of time."""
    names = ("q_ptr k_ptr v_ptr pt_ptr kvlen_ptr cu_ptr tree_ptr scale softcap window head_dim num_rows num_pages "
             "max_keys "
             "stride_qt stride_qh stride_qd stride_kp stride_ks stride_kh stride_kd stride_vp stride_vs stride_vh "
             "stride_vd stride_ptr stride_ptp stride_tt stride_tw out_ptr lse_ptr stride_os stride_ot stride_oh "
             "stride_ls stride_lt").split()
    specs = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # (q dtype, out dtype, head dim, GQA group, page size, max rows, tree words, softcap+window):
    # the split path writes fp32 partials; head dims 64/128/256, groups 1/4/8, pages 1..256.
    for dtype, out_dtype, head_dim, group, page_size, max_rows, tree_words, extras in (
            ("bf16", "bf16", 128, 4, 16, 8, 0, False), ("bf16", "fp32", 128, 4, 16, 64, 2, True),
            ("fp16", "fp16", 128, 4, 16, 8, 0, False), ("fp32", "fp32", 128, 4, 16, 8, 2, True),
            ("bf16", "bf16", 64, 8, 1, 64, 2, True), ("fp16", "fp32", 64, 1, 256, 1, 0, False),
            ("bf16", "bf16", 256, 8, 256, 64, 0, True), ("fp16", "fp16", 256, 1, 1, 64, 1, False),
            ("fp32", "fp32", 256, 8, 5, 64, 2, True)):
        sig = {k: "i32" for k in names}
        sig.update(q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", pt_ptr="*i32", kvlen_ptr="*i32",
                   cu_ptr="*i32", tree_ptr="*i32", out_ptr=f"*{out_dtype}", lse_ptr="*fp32", scale="fp32",
                   softcap="fp32")
        for k in names:
            if k.startswith("stride_") and k not in ("stride_ptp", "stride_tw"):
                sig[k] = "i64"
        cfg = launch_config(dtypes[dtype], head_dim, group, max_rows, interp=False)
        options = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        const = dict(GROUP=group, PAGE_SIZE=page_size, TREE_WORDS=tree_words, HAS_SOFTCAP=extras,
                     HAS_WINDOW=extras, STORE_LSE=True, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **cfg)
        sig.update({k: "constexpr" for k in const})
        specs.append((_verify_attn_kernel, sig, const, options))
    merge = {"po_ptr": "*fp32", "pl_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32", "cu_ptr": "*i32",
             "num_req": "i32", "num_heads": "i32", "head_dim": "i32", "stride_ps": "i64", "stride_pt": "i64",
             "stride_ph": "i64", "stride_qs": "i64", "stride_qt": "i64", "stride_ot": "i64", "stride_oh": "i64",
             "NUM_SPLITS": "constexpr", "STORE_LSE": "constexpr", "BLOCK_H": "constexpr", "BLOCK_D": "constexpr"}
    specs.append((_merge_kernel, merge, {"NUM_SPLITS": 16, "STORE_LSE": True, "BLOCK_H": 32, "BLOCK_D": 128}))
    specs.append((_merge_kernel, dict(merge, out_ptr="*fp16"),
                  {"NUM_SPLITS": 64, "STORE_LSE": False, "BLOCK_H": 16, "BLOCK_D": 256}))
    return specs
