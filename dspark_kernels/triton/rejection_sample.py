"""Triton rejection_sample: implements dspark_kernels.rejection_sample, token for token the reference.

Three launches, no host sync, grids from shapes only, no torch op in the
launcher beyond allocating outputs and workspaces:

1. ``_row_kernel``, one program per target row: finds the row's request by a
   binary search of cu_verify (rows owned by no request are never read), then
   one pass for the row's statistics (online max, normaliser and first argmax
   of z = logit · (1/T)). With top-k / top-p: a second pass builds a 2048-bin
   count histogram of m - z (bins of 1/64), which locates the bin of the k-th
   largest z (top-k) or the top 4096 tokens (top-p alone); a third pass copies
   the tokens of those bins (at most CAP = 4096) to a per-row workspace, and
   the exact selection runs there, on chip: the k-th token in the order
   (z descending, id ascending) by bisection on the ordered-key image of fp32
   and on the ids of its ties, then top-p over the k survivors (or over the
   candidates, when they hold at least top_p of the mass) by bisection on
   probability. Rows that do not fit (more than CAP tokens in the boundary
   bins: massive ties; or a top-p nucleus wider than 4096 tokens) take the
   slow path: the same bisections, each step a pass over the row.
2. ``_race_kernel``, S programs per request, each owning a vocabulary slice:
   every program walks the drafts (one target logit and one draft
   probability per draft, stopping at the first rejection; a draft id outside
   [0, V) is rejected), then races its slice of the final row for the
   residual or bonus token (Gumbel-max on one Philox block per 4 lanes). The
   draft row of a rejected request is read once, in slices: in the
   byte-minimal mode q_i = p_d(x)·exp(u_i - u_x) needs no normaliser pass.
3. ``_merge_kernel``, one program per request: the slices' winners (first
   slice wins ties), then the output row.

Uniforms and stream layout come from dspark_kernels.triton.rng, identical to
the reference, so the same seed gives the same tokens up to fp32 rounding of
the normalisers (which can only flip a near-tie).
"""

import torch
import triton
import triton.language as tl

from .. import constants as C
from . import rng
from .ragged import request_rows
from .sampling import argmax_update, greedy_and_inverse, key_to_float, ordered_key, scaled_tile_mul, softmax_stats

# One tile of the vocabulary per loop iteration. 1024 fp32 lanes = 4 KB per
# tile keeps registers modest for 4 warps and needs 149 tiles at V = 151936.
BLOCK_V = 1024
# Candidate selection: 8192 bins of width 1/256 nat in m - z cover 32 nats below
# the row's max (e^-32 ~ 1e-14 of the top token's probability); a bin spans a
# probability factor e^(1/256) = 1.004, which bounds top-p's mass sums to 0.4 %
# before any token is looked at. At most CAP candidates per row are copied out
# (32 KB of int64 per row).
NB = tl.constexpr(8192)
CAP = 4096
# Race programs: about this many in all (8 per SM of an H100), so small batches
# still fill the GPU; each request's slices are whole tiles.
TARGET_PROGRAMS = 1024

STREAM_ACCEPT = tl.constexpr(C.STREAM_ACCEPT)
STREAM_RESIDUAL = tl.constexpr(C.STREAM_RESIDUAL)
STREAM_BONUS = tl.constexpr(C.STREAM_BONUS)
_INT32_MIN = tl.constexpr(-(2**31))
_NO_KTH_ID = tl.constexpr(2**31 - 1)


@triton.jit
def _key(z):
    """Top-k's order key of z: the ordered-key image of fp32 with -0.0 folded into +0.0 (equal values, as
    the reference's stable sort sees them, so their tie is broken by id)."""
    return ordered_key(tl.where(z == 0.0, 0.0, z))


@triton.jit
def _keep_topk(key, idx, kth_key, kth_id):
    """In the top k: before the k-th token (kth_key, kth_id) in the order (z descending, id ascending)."""
    return (key > kth_key) | ((key == kth_key) & (idx <= kth_id))


@triton.jit
def load_row_stats(stats_f_ptr, stats_i_ptr, row, live):
    """The row statistics row_statistics stored for one target row (m, zk, pthr, z2 fp32; kth_key, kth_id
    int32: what _target_prob needs), neutral values where not live; the argmax (word 2) is loaded by the
    callers that need it."""
    m = tl.load(stats_f_ptr + row * 4, mask=live, other=0.0)
    zk = tl.load(stats_f_ptr + row * 4 + 1, mask=live, other=1.0)
    pthr = tl.load(stats_f_ptr + row * 4 + 2, mask=live, other=0.0)
    z2 = tl.load(stats_f_ptr + row * 4 + 3, mask=live, other=1.0)
    kth_key = tl.load(stats_i_ptr + row * 3, mask=live, other=_INT32_MIN)
    kth_id = tl.load(stats_i_ptr + row * 3 + 1, mask=live, other=_NO_KTH_ID)
    return m, zk, pthr, z2, kth_key, kth_id


@triton.jit
def _target_prob(z, idx, m, zk, pthr, z2, kth_key, kth_id):
    """The filtered target probability of tokens idx with scaled logits z (the reference's filtered_probs)."""
    pk = tl.exp(z - m) / zk
    keep = _keep_topk(_key(z), idx, kth_key, kth_id) & (pk >= pthr)
    return tl.where(keep, pk / z2, 0.0)


@triton.jit
def _bins(z, m):
    """Histogram bin of m - z: width 1/256 nat, the last bin for everything 32 nats down (and -inf, NaN)."""
    d = tl.minimum((m - z) * 256.0, NB - 1.0)
    return tl.where(d == d, d, NB - 1.0).to(tl.int32)


# --------------------------------------------------------------------------- selection on the candidates (on chip)


@triton.jit
def _kth_in(key, ids, present, k):
    """(key, id) of the k-th of the present tokens in the order (key descending, id ascending)."""
    lo = tl.min(tl.where(present, key, 2**31 - 1), 0).to(tl.int64)
    hi = tl.max(tl.where(present, key, -(2**31)), 0).to(tl.int64)
    for _ in range(32):  # largest t with count(key >= t) >= k
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((present & (key >= mid)).to(tl.int64), 0) >= k
        active = lo < hi
        lo = tl.where(active & ok, mid, lo)
        hi = tl.where(active & ~ok, mid - 1, hi)
    kth_key = lo.to(tl.int32)
    need = k - tl.sum((present & (key > kth_key)).to(tl.int64), 0)
    tied = present & (key == kth_key)
    lo = tl.min(tl.where(tied, ids, 2**31 - 1), 0).to(tl.int64)
    hi = tl.max(tl.where(tied, ids, 0), 0).to(tl.int64)
    for _ in range(32):  # smallest id with count(tied, id <= it) >= need
        mid = (lo + hi) // 2
        ok = tl.sum((tied & (ids <= mid)).to(tl.int64), 0) >= need
        active = lo < hi
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid + 1, lo)
    return kth_key, lo.to(tl.int32)


@triton.jit
def _topp_in(pk, survivors, top_p, sure):
    """Smallest threshold t with mass(p > t) < top_p over the survivors, and the kept mass (p >= t).

    sure: the mass of the tokens known to be kept and more probable than every survivor here
    (0 when the survivors are the whole top k); the threshold always lies among the survivors."""
    lo = tl.full((), 0, tl.int32)
    hi = tl.full((), 0x3F800000, tl.int32)  # key of 1.0: mass(p > 1) = 0 < top_p
    for _ in range(31):
        mid = (lo + hi) // 2
        mass = sure + tl.sum(tl.where(survivors & (pk > mid.to(tl.float32, bitcast=True)), pk, 0.0), 0)
        below = mass < top_p
        active = lo < hi
        hi = tl.where(active & below, mid, hi)
        lo = tl.where(active & ~below, mid + 1, lo)
    pthr = lo.to(tl.float32, bitcast=True)
    return pthr, sure + tl.sum(tl.where(survivors & (pk >= pthr), pk, 0.0), 0)


# --------------------------------------------------------------------------- the slow path: one pass per bisection step


@triton.jit
def _kth_slow(base, vocab, inv_t, m, k, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    lo = ordered_key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
    hi = _key(m).to(tl.int64)
    for _ in range(32):
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.full((), 0, tl.int64)
        for v0 in range(0, vocab, BLOCK):
            idx = v0 + offs
            z = scaled_tile_mul(base, idx, idx < vocab, inv_t)
            cnt += tl.sum(((_key(z) >= mid) & (idx < vocab)).to(tl.int64), 0)
        ok = cnt >= k
        active = lo < hi
        lo = tl.where(active & ok, mid, lo)
        hi = tl.where(active & ~ok, mid - 1, hi)
    kth_key = lo.to(tl.int32)
    greater = tl.full((), 0, tl.int64)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        z = scaled_tile_mul(base, idx, idx < vocab, inv_t)
        greater += tl.sum(((_key(z) > kth_key) & (idx < vocab)).to(tl.int64), 0)
    need = k - greater
    lo = tl.full((), 0, tl.int64)
    hi = (vocab - 1).to(tl.int64)
    for _ in range(32):
        mid = (lo + hi) // 2
        cnt = tl.full((), 0, tl.int64)
        for v0 in range(0, vocab, BLOCK):
            idx = v0 + offs
            z = scaled_tile_mul(base, idx, idx < vocab, inv_t)
            cnt += tl.sum(((_key(z) == kth_key) & (idx <= mid) & (idx < vocab)).to(tl.int64), 0)
        ok = cnt >= need
        active = lo < hi
        hi = tl.where(active & ok, mid, hi)
        lo = tl.where(active & ~ok, mid + 1, lo)
    return kth_key, lo.to(tl.int32)


@triton.jit
def _topk_mass_slow(base, vocab, inv_t, m, kth_key, kth_id, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    zk = tl.full((), 0.0, tl.float32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        z = scaled_tile_mul(base, idx, idx < vocab, inv_t)
        keep = _keep_topk(_key(z), idx, kth_key, kth_id) & (idx < vocab)
        zk += tl.sum(tl.where(keep, tl.exp(z - m), 0.0), 0)
    return zk


@triton.jit
def _topp_slow(base, vocab, inv_t, m, zk, kth_key, kth_id, top_p, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    lo = tl.full((), 0, tl.int32)
    hi = tl.full((), 0x3F800000, tl.int32)
    for _ in range(31):
        mid = (lo + hi) // 2
        thr = mid.to(tl.float32, bitcast=True)
        mass = tl.full((), 0.0, tl.float32)
        for v0 in range(0, vocab, BLOCK):
            idx = v0 + offs
            z = scaled_tile_mul(base, idx, idx < vocab, inv_t)
            keep = _keep_topk(_key(z), idx, kth_key, kth_id) & (idx < vocab)
            pk = tl.where(keep, tl.exp(z - m) / zk, 0.0)
            mass += tl.sum(tl.where(pk > thr, pk, 0.0), 0)
        below = mass < top_p
        active = lo < hi
        hi = tl.where(active & below, mid, hi)
        lo = tl.where(active & ~below, mid + 1, lo)
    pthr = lo.to(tl.float32, bitcast=True)
    z2 = tl.full((), 0.0, tl.float32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        z = scaled_tile_mul(base, idx, idx < vocab, inv_t)
        keep = _keep_topk(_key(z), idx, kth_key, kth_id) & (idx < vocab)
        pk = tl.where(keep, tl.exp(z - m) / zk, 0.0)
        z2 += tl.sum(tl.where(pk >= pthr, pk, 0.0), 0)
    return pthr, z2


# --------------------------------------------------------------------------- kernel 1: per-row statistics


@triton.jit
def _row_kernel(
    x_ptr, stride_x, num_rows, vocab,
    cu_ptr, stride_cu, num_req,
    temp_ptr, stride_temp, topk_ptr, stride_topk, topp_ptr, stride_topp,
    stats_f_ptr, stats_i_ptr, cand_ptr, cand32_ptr,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, LOG_R: tl.constexpr, BLOCK: tl.constexpr,
    CAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # The owner: the last request r with cu[r] <= row (binary search; checked below, so a
    # cu_verify that is not monotone on the unchecked path only leaves rows unowned).
    lo = tl.full((), 0, tl.int64)
    hi = num_req.to(tl.int64)
    for _ in range(LOG_R):
        mid = (lo + hi) // 2
        step = (hi - lo > 1) & (tl.load(cu_ptr + mid * stride_cu).to(tl.int64) <= row)
        shrink = (hi - lo > 1) & ~step
        lo = tl.where(step, mid, lo)
        hi = tl.where(shrink, mid, hi)
    r = lo
    owned = (tl.load(cu_ptr + r * stride_cu).to(tl.int64) <= row) & \
        (row < tl.load(cu_ptr + (r + 1) * stride_cu).to(tl.int64))
    if owned:
        base = x_ptr + row * stride_x
        _greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + r * stride_temp))
        offs = tl.arange(0, BLOCK)
        m, s, amax = softmax_stats(base, vocab, inv_t, BLOCK)  # pass 1

        kth_key = tl.full((), _INT32_MIN, tl.int32)
        kth_id = tl.full((), _NO_KTH_ID, tl.int32)
        zk = s
        pthr = tl.full((), 0.0, tl.float32)
        z2 = tl.full((), 1.0, tl.float32)
        k = tl.full((), 0, tl.int64)
        top_p = tl.full((), 1.0, tl.float32)
        if HAS_TOPK:
            k = tl.load(topk_ptr + r * stride_topk).to(tl.int64)
        if HAS_TOPP:
            top_p = tl.load(topp_ptr + r * stride_topp).to(tl.float32)
        on_k = (k > 0) & (k < vocab)
        on_p = top_p < 1.0
        if on_k | on_p:
            # Pass 2: where the boundary lies, from a count histogram of m - z (bins of 1/256 nat;
            # lanes past V land in the last bin, as z = -inf, and are taken out after the loop).
            hist = tl.zeros((NB,), tl.int32)
            for v0 in range(0, vocab, BLOCK):
                idx = v0 + offs
                hist += tl.histogram(_bins(scaled_tile_mul(base, idx, idx < vocab, inv_t), m), NB)
            bin_ids = tl.arange(0, NB)
            hist -= tl.where(bin_ids == NB - 1, tl.cdiv(vocab, BLOCK) * BLOCK - vocab, 0)
            cum = tl.cumsum(hist, 0)
            if on_k:
                # Every token of the bins up to the k-th largest z's (complete bins: nothing outside
                # them can be in the top k); none is surely kept without looking.
                first_bin = tl.full((), 0, tl.int32)
                last_bin = tl.min(tl.where(cum >= k, bin_ids, NB), 0)
            else:
                # Top-p alone: a token of bin b has mass above it in [sum of lower bounds of the bins
                # before b, sum of upper bounds of the bins up to b] (each bin spans a factor e^(1/256)
                # of probability); bins whose upper sum stays below top_p are surely kept, bins whose
                # lower sum reaches it surely dropped; the ones in between are the candidates.
                hi_bin = tl.exp(-bin_ids.to(tl.float32) / 256.0) * 1.00001
                lo_bin = tl.where(bin_ids == NB - 1, 0.0, tl.exp(-(bin_ids + 1).to(tl.float32) / 256.0) * 0.99999)
                upper = tl.cumsum(hist.to(tl.float32) * hi_bin, 0) / s  # mass of bins <= b, at most
                lower = tl.cumsum(hist.to(tl.float32) * lo_bin, 0) / s - hist.to(tl.float32) * lo_bin / s
                # A relative margin of 1e-3 on the mass covers the fp32 rounding of these sums.
                first_bin = tl.min(tl.where(upper >= top_p * 0.999, bin_ids, NB - 1), 0)
                last_bin = tl.max(tl.where(lower < top_p * 1.001, bin_ids, 0), 0)
            count = tl.sum(tl.where((bin_ids >= first_bin) & (bin_ids <= last_bin), hist, 0), 0)
            fast = count <= CAP
            if fast:
                # Pass 3: the candidates to the workspace, and the exact mass of the surely kept tokens.
                cbase = cand_ptr + row * CAP
                n = tl.full((), 0, tl.int32)
                sure = tl.full((), 0.0, tl.float32)
                for v0 in range(0, vocab, BLOCK):
                    idx = v0 + offs
                    z = scaled_tile_mul(base, idx, idx < vocab, inv_t)
                    b = _bins(z, m)
                    sel = (idx < vocab) & (b >= first_bin) & (b <= last_bin)
                    sure += tl.sum(tl.where((idx < vocab) & (b < first_bin), tl.exp(z - m) / zk, 0.0), 0)
                    at = n + tl.cumsum(sel.to(tl.int32), 0) - 1
                    if on_k:
                        # One int64 per candidate: the key in the high half, 2^31 - 1 - id in the low.
                        comp = (_key(z).to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)
                        tl.store(cbase + at, comp, mask=sel)
                    else:
                        # Top-p alone never breaks ties by id: the key alone (4 bytes).
                        tl.store(cand32_ptr + row * CAP + at, _key(z), mask=sel)
                    n += tl.sum(sel.to(tl.int32), 0)
                lane = tl.arange(0, CAP)
                present = lane < n
                if on_k:
                    comp = tl.load(cbase + lane, mask=present, other=0)
                    key = (comp >> 32).to(tl.int32)
                    ids = (2147483647 - (comp & 2147483647)).to(tl.int32)
                else:
                    key = tl.load(cand32_ptr + row * CAP + lane, mask=present, other=0)
                    ids = lane
                if on_k:
                    kth_key, kth_id = _kth_in(key, ids, present, k)
                survivors = present & _keep_topk(key, ids, kth_key, kth_id)
                e = tl.where(survivors, tl.exp(key_to_float(key) - m), 0.0)
                if on_k:
                    zk = tl.sum(e, 0)
                if on_p:
                    pthr, z2 = _topp_in(e / zk, survivors, top_p, sure)
            else:
                if on_k:
                    kth_key, kth_id = _kth_slow(base, vocab, inv_t, m, k, BLOCK)
                    zk = _topk_mass_slow(base, vocab, inv_t, m, kth_key, kth_id, BLOCK)
                if on_p:
                    pthr, z2 = _topp_slow(base, vocab, inv_t, m, zk, kth_key, kth_id, top_p, BLOCK)
        tl.store(stats_f_ptr + row * 4 + 0, m)
        tl.store(stats_f_ptr + row * 4 + 1, zk)
        tl.store(stats_f_ptr + row * 4 + 2, pthr)
        tl.store(stats_f_ptr + row * 4 + 3, z2)
        tl.store(stats_i_ptr + row * 3 + 0, kth_key)
        tl.store(stats_i_ptr + row * 3 + 1, kth_id)
        tl.store(stats_i_ptr + row * 3 + 2, amax)


# --------------------------------------------------------------------------- kernel 2: walk the drafts, race a slice


@triton.jit
def _race_kernel(
    logits_ptr, stride_l, num_rows, vocab, stats_f_ptr, stats_i_ptr,
    drafts_ptr, stride_dr, stride_dj,
    dprobs_ptr, stride_pr, stride_pj, stride_pv,
    dtp_ptr, stride_tr, stride_tj,
    dlogits_ptr, stride_gr, stride_gj, stride_gv,
    dtemp_ptr, stride_dt,
    lengths_ptr, stride_len, cu_ptr, stride_cu, temp_ptr, stride_temp, seed_ptr, stride_seed, offset_ptr,
    part_f_ptr, part_i_ptr, walk_ptr,
    gamma, slice_width, num_slices,
    MODE: tl.constexpr,  # 0 one-hot drafts, 1 draft_probs, 2 draft_logits
    HAS_DTP: tl.constexpr,  # draft_token_probs given (MODE 2: the byte-minimal mode)
    HAS_DTEMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    sl = tl.program_id(1).to(tl.int64)
    # Inputs are trusted only as far as the value checks went: every index is clamped so that
    # inconsistent lengths / cu_verify can never read out of bounds.
    start, live, length = request_rows(cu_ptr, stride_cu, r, num_rows, tl.load(lengths_ptr + r * stride_len), gamma)
    greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + r * stride_temp))
    seed = tl.load(seed_ptr + r * stride_seed)
    offset = tl.load(offset_ptr)
    d_greedy = greedy
    d_inv = inv_t
    if MODE == 2:
        if HAS_DTEMP:
            d_greedy, d_inv = greedy_and_inverse(tl.load(dtemp_ptr + r * stride_dt))

    # The walk: one target logit and one draft probability per draft, up to the first rejection.
    n_acc = tl.full((), 0, tl.int64)
    still = live & (length > 0)
    while still:
        row = start + n_acc
        x = tl.load(drafts_ptr + r * stride_dr + n_acc * stride_dj).to(tl.int64)
        valid = (x >= 0) & (x < vocab)
        xc = tl.minimum(tl.maximum(x, 0), vocab - 1)
        z_x = tl.load(logits_ptr + row * stride_l + xc).to(tl.float32) * inv_t
        p_t = _target_prob(z_x, xc, tl.load(stats_f_ptr + row * 4), tl.load(stats_f_ptr + row * 4 + 1),
                           tl.load(stats_f_ptr + row * 4 + 2), tl.load(stats_f_ptr + row * 4 + 3),
                           tl.load(stats_i_ptr + row * 3), tl.load(stats_i_ptr + row * 3 + 1))
        if MODE == 0:
            p_d = 1.0
        elif MODE == 1:
            p_d = tl.load(dprobs_ptr + r * stride_pr + n_acc * stride_pj + xc * stride_pv).to(tl.float32)
        else:
            if HAS_DTP:
                p_d = tl.load(dtp_ptr + r * stride_tr + n_acc * stride_tj).to(tl.float32)
            else:
                dbase = dlogits_ptr + r * stride_gr + n_acc * stride_gj
                dm, ds, damax = softmax_stats(dbase, vocab, d_inv, BLOCK)
                u_x = tl.load(dbase + xc * stride_gv).to(tl.float32) * d_inv
                p_d = tl.where(d_greedy, tl.where(damax == xc, 1.0, 0.0), tl.exp(u_x - dm) / ds)
        coin = rng.uniform(seed, offset, STREAM_ACCEPT, n_acc, 0)
        amax_row = tl.load(stats_i_ptr + row * 3 + 2).to(tl.int64)
        accept = valid & tl.where(greedy, amax_row == xc, coin * p_d < p_t)
        n_acc += accept.to(tl.int64)
        still = accept & (n_acc < length)

    # One more token at local position n_acc of the final row.
    row = tl.where(live, start + n_acc, 0)
    rejected = n_acc < length
    j_rej = tl.maximum(tl.minimum(n_acc, gamma - 1), 0)
    x_rej = tl.load(drafts_ptr + r * stride_dr + j_rej * stride_dj, mask=rejected, other=0).to(tl.int64)
    has_q = rejected & (x_rej >= 0) & (x_rej < vocab)  # an invalid draft has no draft distribution
    x_rej = tl.minimum(tl.maximum(x_rej, 0), vocab - 1)
    m, zk, pthr, z2, kth_key, kth_id = load_row_stats(stats_f_ptr, stats_i_ptr, row, live)
    dbase = dlogits_ptr + r * stride_gr + j_rej * stride_gj
    p_dx = tl.full((), 1.0, tl.float32)
    u_x = tl.full((), 0.0, tl.float32)
    dm = tl.full((), 0.0, tl.float32)
    ds = tl.full((), 1.0, tl.float32)
    damax = tl.full((), 0, tl.int32)
    if MODE == 2:
        if HAS_DTP:
            p_dx = tl.load(dtp_ptr + r * stride_tr + j_rej * stride_tj, mask=has_q, other=1.0).to(tl.float32)
            u_x = tl.load(dbase + x_rej * stride_gv, mask=has_q, other=0.0).to(tl.float32) * d_inv
        else:
            if has_q:
                dm, ds, damax = softmax_stats(dbase, vocab, d_inv, BLOCK)

    v_lo = sl * slice_width
    v_hi = tl.minimum(v_lo + slice_width, vocab)
    offs = tl.arange(0, BLOCK)
    stream = tl.where(rejected, STREAM_RESIDUAL, STREAM_BONUS)
    best_w = tl.full((), float("-inf"), tl.float32)
    arg_w = v_lo.to(tl.int32)
    best_p = tl.full((), float("-inf"), tl.float32)
    arg_p = v_lo.to(tl.int32)
    mass_w = tl.full((), 0.0, tl.float32)
    if ~greedy & live:
        for v0 in range(v_lo, v_hi, BLOCK):
            idx = v0 + offs
            inside = idx < v_hi
            z = scaled_tile_mul(logits_ptr + row * stride_l, idx, inside, inv_t)
            p = tl.where(inside, _target_prob(z, idx, m, zk, pthr, z2, kth_key, kth_id), 0.0)
            if MODE == 0:
                q = tl.where(has_q & (idx == x_rej), 1.0, 0.0)
            elif MODE == 1:
                q = tl.load(dprobs_ptr + r * stride_pr + j_rej * stride_pj + idx * stride_pv,
                            mask=inside & has_q, other=0.0).to(tl.float32)
            else:
                u = tl.load(dbase + idx * stride_gv, mask=inside & has_q, other=float("-inf")).to(tl.float32) * d_inv
                if HAS_DTP:
                    q = tl.where(d_greedy, tl.where(idx == x_rej, 1.0, 0.0), p_dx * tl.exp(u - u_x))
                else:
                    q = tl.where(d_greedy, tl.where(idx == damax, 1.0, 0.0), tl.exp(u - dm) / ds)
                q = tl.where(inside & has_q, q, 0.0)
            w = tl.where(p > q, p - q, 0.0)
            mass_w += tl.sum(w, 0)
            best_w, arg_w, best_p, arg_p = race_tile(best_w, arg_w, best_p, arg_p, w, p, inside, seed, offset,
                                                     stream, n_acc, v0, BLOCK)
    store_race_partials(part_f_ptr, part_i_ptr, r * num_slices + sl, best_w, best_p, mass_w, arg_w, arg_p)
    if sl == 0:
        # The walk's outcome, for the merge: n_acc, and the token when no race decides it.
        amax_final = tl.load(stats_i_ptr + row * 3 + 2, mask=live, other=0)
        amax_final = tl.minimum(tl.maximum(amax_final, 0), vocab - 1)
        direct = tl.where(live, tl.where(greedy, amax_final, -2), -1)
        tl.store(walk_ptr + r * 2, n_acc.to(tl.int32))
        tl.store(walk_ptr + r * 2 + 1, direct.to(tl.int32))


# --------------------------------------------------------------------------- kernel 3: merge the slices


@triton.jit
def race_tile(best_w, arg_w, best_p, arg_p, w, p, inside, seed, offset, stream, position, v0, BLOCK: tl.constexpr):
    """One vocabulary tile of the residual / bonus race: the same Gumbel noise (stream, position, token)
    offered to the residual weights w and to the target probabilities p; running first-index argmaxes."""
    g = rng.gumbel(rng.uniform_tile(seed, offset, stream, position, v0, BLOCK))
    best_w, arg_w = argmax_update(best_w, arg_w, tl.where(inside, tl.log(w) + g, float("-inf")), v0)
    best_p, arg_p = argmax_update(best_p, arg_p, tl.where(inside, tl.log(p) + g, float("-inf")), v0)
    return best_w, arg_w, best_p, arg_p


@triton.jit
def store_race_partials(part_f_ptr, part_i_ptr, slot, best_w, best_p, mass_w, arg_w, arg_p):
    """A slice program's race result at ``slot`` = request·num_slices + slice (3 words each), for merged_token."""
    out = slot * 3
    tl.store(part_f_ptr + out, best_w)
    tl.store(part_f_ptr + out + 1, best_p)
    tl.store(part_f_ptr + out + 2, mass_w)
    tl.store(part_i_ptr + out, arg_w)
    tl.store(part_i_ptr + out + 1, arg_p)


@triton.jit
def merged_token(part_f_ptr, part_i_ptr, r, num_slices, direct, BLOCK_S: tl.constexpr):
    """The residual/bonus token of request r from its num_slices race slices (kernel 2's partials: per slice
    [best residual key, best p key, residual mass] and their ids), or ``direct`` when it is not -2 (a token
    the walk settled without a race). Shared with the tree sampler, whose race writes the same partials."""
    best_w = tl.full((), float("-inf"), tl.float32)
    arg_w = tl.full((), 0, tl.int32)
    best_p = tl.full((), float("-inf"), tl.float32)
    arg_p = tl.full((), 0, tl.int32)
    mass = tl.full((), 0.0, tl.float32)
    for s0 in range(0, num_slices, BLOCK_S):
        sl = s0 + tl.arange(0, BLOCK_S)
        ok = sl < num_slices
        at = (r * num_slices + sl) * 3
        bw = tl.load(part_f_ptr + at, mask=ok, other=float("-inf"))
        bp = tl.load(part_f_ptr + at + 1, mask=ok, other=float("-inf"))
        mass += tl.sum(tl.load(part_f_ptr + at + 2, mask=ok, other=0.0), 0)
        aw = tl.load(part_i_ptr + at, mask=ok, other=0)
        ap = tl.load(part_i_ptr + at + 1, mask=ok, other=0)
        # Slices are in vocabulary order: a strict > keeps the earlier one on ties.
        tw, iw = tl.max(bw, 0, return_indices=True, return_indices_tie_break_left=True)
        tp, ip = tl.max(bp, 0, return_indices=True, return_indices_tie_break_left=True)
        lane = tl.arange(0, BLOCK_S)
        cw = tl.sum(tl.where(lane == iw, aw, 0), 0)
        cp = tl.sum(tl.where(lane == ip, ap, 0), 0)
        take_w = (tw > best_w) | (s0 == 0)
        take_p = (tp > best_p) | (s0 == 0)
        arg_w = tl.where(take_w, cw, arg_w)
        best_w = tl.where(take_w, tw, best_w)
        arg_p = tl.where(take_p, cp, arg_p)
        best_p = tl.where(take_p, tp, best_p)
    # Without residual mass the reference falls back to p_t (same stream).
    y = tl.where(mass > 0, arg_w, arg_p).to(tl.int64)
    y = tl.where(direct != -2, direct.to(tl.int64), y)
    return y


@triton.jit
def _merge_kernel(
    part_f_ptr, part_i_ptr, walk_ptr, drafts_ptr, stride_dr, stride_dj, tokens_ptr, stride_out, nacc_ptr,
    gamma, num_slices, BLOCK_S: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    n_acc = tl.load(walk_ptr + r * 2).to(tl.int64)
    direct = tl.load(walk_ptr + r * 2 + 1)
    y = merged_token(part_f_ptr, part_i_ptr, r, num_slices, direct, BLOCK_S)
    out = tokens_ptr + r * stride_out
    for j in range(0, gamma + 1):
        d = tl.load(drafts_ptr + r * stride_dr + j * stride_dj, mask=j < n_acc, other=-1)
        val = tl.where(j < n_acc, d.to(tl.int64), tl.where(j == n_acc, y, -1))
        tl.store(out + j, val.to(tl.int32))
    tl.store(nacc_ptr + r, n_acc.to(tl.int32))


# --------------------------------------------------------------------------- launcher


def _slices(num_req: int, vocab: int, mode: int, has_dtp: bool) -> tuple[int, int]:
    """(slice width, slices per request): ~TARGET_PROGRAMS race programs, whole tiles per slice.
    The logits-only draft mode needs the draft row's normaliser in every program: one slice."""
    tiles = triton.cdiv(vocab, BLOCK_V)
    want = 1 if (mode == 2 and not has_dtp) else max(1, min(tiles, triton.cdiv(TARGET_PROGRAMS, max(num_req, 1))))
    width = triton.cdiv(tiles, want) * BLOCK_V
    return width, triton.cdiv(vocab, width)


def row_statistics(a, num_rows: int, vocab: int, num_req: int):
    """Kernel 1 over every target row (one program per row, rows mapped to requests in the kernel):
    (logits with a unit last stride, stats_f [rows, 4], stats_i [rows, 3], top-k/top-p candidates). The
    tree sampler runs the same pass on its rows, so both read each target row once for its statistics."""
    device = a.target_logits.device
    logits = _unit_last_stride(a.target_logits)
    filters = a.top_k is not None or a.top_p is not None
    stats_f = torch.empty((max(num_rows, 1), 4), dtype=torch.float32, device=device)
    stats_i = torch.empty((max(num_rows, 1), 3), dtype=torch.int32, device=device)
    cand = torch.empty((max(num_rows, 1) if filters else 1, CAP), dtype=torch.int64, device=device)
    topk = a.top_k if a.top_k is not None else a.temperature
    topp = a.top_p if a.top_p is not None else a.temperature
    if num_rows:
        _row_kernel[(num_rows,)](
            logits, logits.stride(0), num_rows, vocab, a.cu_verify, a.cu_verify.stride(0), num_req,
            a.temperature, a.temperature.stride(0), topk, topk.stride(0), topp, topp.stride(0),
            stats_f, stats_i, cand, cand.view(torch.int32),
            HAS_TOPK=a.top_k is not None, HAS_TOPP=a.top_p is not None, LOG_R=max(1, num_req.bit_length()),
            BLOCK=BLOCK_V, CAP=CAP, num_warps=8 if filters else 4,
        )
    return logits, stats_f, stats_i, cand


def rejection_sample(a):
    device = a.target_logits.device
    num_rows, vocab = a.target_logits.shape
    num_req, gamma = a.draft_tokens.shape
    tokens = torch.empty((num_req, gamma + 1), dtype=torch.int32, device=device)
    num_accepted = torch.empty((num_req,), dtype=torch.int32, device=device)
    if num_req == 0:
        return tokens, num_accepted
    logits, stats_f, stats_i, cand = row_statistics(a, num_rows, vocab, num_req)
    mode = 1 if a.draft_probs is not None else (2 if a.draft_logits is not None else 0)
    has_dtp = a.draft_token_probs is not None
    width, num_slices = _slices(num_req, vocab, mode, has_dtp)
    part_f = torch.empty((num_req, num_slices, 3), dtype=torch.float32, device=device)
    part_i = torch.empty((num_req, num_slices, 3), dtype=torch.int32, device=device)
    walk = torch.empty((num_req, 2), dtype=torch.int32, device=device)
    dummy = stats_f  # never read: the MODE / HAS_* constexprs drop its loads
    dprobs = a.draft_probs if a.draft_probs is not None else dummy[None]
    dlogits = a.draft_logits if a.draft_logits is not None else dummy[None]
    dtp = a.draft_token_probs if has_dtp else dummy
    dtemp = a.draft_temperature if a.draft_temperature is not None else a.temperature
    drafts = a.draft_tokens
    _race_kernel[(num_req, num_slices)](
        logits, logits.stride(0), num_rows, vocab, stats_f, stats_i,
        drafts, drafts.stride(0), drafts.stride(1),
        dprobs, dprobs.stride(0), dprobs.stride(1), dprobs.stride(2),
        dtp, dtp.stride(0), dtp.stride(1),
        dlogits, dlogits.stride(0), dlogits.stride(1), dlogits.stride(2),
        dtemp, dtemp.stride(0),
        a.lengths, a.lengths.stride(0), a.cu_verify, a.cu_verify.stride(0), a.temperature, a.temperature.stride(0),
        a.seed, a.seed.stride(0), a.offset,
        part_f, part_i, walk, gamma, width, num_slices,
        MODE=mode, HAS_DTP=has_dtp, HAS_DTEMP=a.draft_temperature is not None, BLOCK=BLOCK_V,
    )
    _merge_kernel[(num_req,)](
        part_f, part_i, walk, drafts, drafts.stride(0), drafts.stride(1), tokens, tokens.stride(0), num_accepted,
        gamma, num_slices, BLOCK_S=min(1024, triton.next_power_of_2(num_slices)),
    )
    return tokens, num_accepted


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Vocab rows with unit stride (the kernels index ids directly); copied only when not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _compile_specs():
    """(kernel, signature, constexprs[, options]) tuples that tests compile for sm_90 ahead of time."""
    row = {"x_ptr": "*bf16", "stride_x": "i64", "num_rows": "i32", "vocab": "i32", "cu_ptr": "*i32",
           "stride_cu": "i64", "num_req": "i32", "temp_ptr": "*fp32", "stride_temp": "i64", "topk_ptr": "*i32",
           "stride_topk": "i64", "topp_ptr": "*fp32", "stride_topp": "i64", "stats_f_ptr": "*fp32",
           "stats_i_ptr": "*i32", "cand_ptr": "*i64", "cand32_ptr": "*i32", "HAS_TOPK": "constexpr", "HAS_TOPP": "constexpr",
           "LOG_R": "constexpr", "BLOCK": "constexpr", "CAP": "constexpr"}
    race = {"logits_ptr": "*bf16", "stride_l": "i64", "num_rows": "i32", "vocab": "i32", "stats_f_ptr": "*fp32",
            "stats_i_ptr": "*i32", "drafts_ptr": "*i32", "stride_dr": "i64", "stride_dj": "i64",
            "dprobs_ptr": "*fp32", "stride_pr": "i64", "stride_pj": "i64", "stride_pv": "i64",
            "dtp_ptr": "*fp32", "stride_tr": "i64", "stride_tj": "i64",
            "dlogits_ptr": "*fp32", "stride_gr": "i64", "stride_gj": "i64", "stride_gv": "i64",
            "dtemp_ptr": "*fp32", "stride_dt": "i64", "lengths_ptr": "*i32", "stride_len": "i64",
            "cu_ptr": "*i32", "stride_cu": "i64", "temp_ptr": "*fp32", "stride_temp": "i64",
            "seed_ptr": "*i64", "stride_seed": "i64", "offset_ptr": "*i64",
            "part_f_ptr": "*fp32", "part_i_ptr": "*i32", "walk_ptr": "*i32",
            "gamma": "i32", "slice_width": "i32", "num_slices": "i32",
            "MODE": "constexpr", "HAS_DTP": "constexpr", "HAS_DTEMP": "constexpr", "BLOCK": "constexpr"}
    merge = {"part_f_ptr": "*fp32", "part_i_ptr": "*i32", "walk_ptr": "*i32", "drafts_ptr": "*i32",
             "stride_dr": "i64", "stride_dj": "i64", "tokens_ptr": "*i32", "stride_out": "i64", "nacc_ptr": "*i32",
             "gamma": "i32", "num_slices": "i32", "BLOCK_S": "constexpr"}
    specs = []
    for topk, topp in ((False, False), (True, False), (False, True), (True, True)):
        specs.append((_row_kernel, row, {"HAS_TOPK": topk, "HAS_TOPP": topp, "LOG_R": 7, "BLOCK": BLOCK_V, "CAP": CAP},
                      {"num_warps": 8 if topk or topp else 4}))
    for mode, dtp in ((0, False), (1, False), (2, False), (2, True)):
        specs.append((_race_kernel, race, {"MODE": mode, "HAS_DTP": dtp, "HAS_DTEMP": False, "BLOCK": BLOCK_V}))
    specs.append((_merge_kernel, merge, {"BLOCK_S": 16}))
    return specs
