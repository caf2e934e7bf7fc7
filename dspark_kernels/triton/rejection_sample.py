"""Triton rejection_sample: implements dspark_kernels.rejection_sample, token for token the reference.

Two kernels, no host sync, grids from static shapes only:

1. ``_row_stats_kernel``, one program per target row (all T rows in
   parallel): z = logits / T (IEEE division, as torch), its max m, first
   argmax, the exact top-k threshold (k-th largest z, by bisection over the
   order-preserving integer image of fp32), the normaliser S over the kept
   tokens, the exact top-p threshold (smallest p with strictly-greater mass
   < top_p, by bisection) and the top-p renormaliser Z2. Then
   p_t(i) = [z_i >= kth and p_i >= pthr] * exp(z_i - m) / S / Z2.
2. ``_chain_kernel``, one program per request: walks the drafts reading one
   target logit and one draft probability per draft (the acceptance test
   needs nothing else), stops at the first rejection, then makes one pass over
   the vocabulary of the final row for the residual or bonus Gumbel race.
   Draft rows are read only where needed: the one-hot mode reads none, the
   byte-minimal mode (draft_token_probs + draft_logits) reads one draft
   logits row per rejected request.

Uniforms and stream layout come from dspark_kernels.triton.rng, identical to
the reference, so the same seed gives the same tokens up to fp32 rounding of
the normalisers (which can only flip a near-tie).
"""

import torch
import triton
import triton.language as tl

from .. import constants as C
from . import rng
from .sampling import argmax_update, greedy_and_scale, key_to_float, ordered_key, scaled_tile, softmax_stats

# One tile of the vocabulary per loop iteration. 1024 fp32 lanes = 4 KB per
# tile keeps registers modest for 4 warps and needs 149 tiles at V = 151936.
BLOCK_V = 1024

STREAM_ACCEPT = tl.constexpr(C.STREAM_ACCEPT)
STREAM_RESIDUAL = tl.constexpr(C.STREAM_RESIDUAL)
STREAM_BONUS = tl.constexpr(C.STREAM_BONUS)


@triton.jit
def _row_stats_kernel(
    x_ptr, stride_x, vocab,
    temp_ptr, topk_ptr, topp_ptr,
    m_ptr, s_ptr, kth_ptr, pthr_ptr, z2_ptr, amax_ptr,
    HAS_TOPK: tl.constexpr, HAS_TOPP: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_x
    _row_greedy, t = greedy_and_scale(tl.load(temp_ptr + row))
    offs = tl.arange(0, BLOCK)

    # Pass 1: max, first argmax (of z; same as of the raw logits since T > 0).
    m = tl.full((), float("-inf"), tl.float32)
    amax = tl.full((), 0, tl.int32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        z = scaled_tile(base, idx, idx < vocab, t)
        m, amax = argmax_update(m, amax, z, v0)

    # Top-k: the k-th largest z is the largest key t with count(z >= t) >= k.
    kth = tl.full((), float("-inf"), tl.float32)
    if HAS_TOPK:
        k = tl.load(topk_ptr + row).to(tl.int64)
        if (k > 0) & (k < vocab):
            # Keys span up to 2**32 values: bisect in int64 so hi - lo + 1 cannot overflow.
            lo = ordered_key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
            hi = ordered_key(m).to(tl.int64)
            for _ in range(32):
                mid = lo + (hi - lo + 1) // 2
                thr = key_to_float(mid)
                cnt = tl.full((), 0, tl.int64)
                for v0 in range(0, vocab, BLOCK):
                    idx = v0 + offs
                    z = scaled_tile(base, idx, idx < vocab, t)
                    cnt += tl.sum(((z >= thr) & (idx < vocab)).to(tl.int64), 0)
                ok = cnt >= k
                active = lo < hi
                lo = tl.where(active & ok, mid, lo)
                hi = tl.where(active & ~ok, mid - 1, hi)
            kth = key_to_float(lo)

    # Normaliser over the top-k survivors.
    s = tl.full((), 0.0, tl.float32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        z = scaled_tile(base, idx, idx < vocab, t)
        s += tl.sum(tl.where((z >= kth) & (idx < vocab), tl.exp(z - m), 0.0), 0)

    # Top-p: smallest threshold v with mass(p > v) < top_p; keep p >= v.
    pthr = tl.full((), 0.0, tl.float32)
    z2 = tl.full((), 1.0, tl.float32)
    if HAS_TOPP:
        top_p = tl.load(topp_ptr + row).to(tl.float32)
        if top_p < 1.0:
            lo = tl.full((), 0, tl.int32)
            hi = tl.full((), 0x3F800000, tl.int32)  # key of 1.0: mass(p > 1) = 0 < top_p
            for _ in range(31):
                mid = (lo + hi) // 2
                thr = mid.to(tl.float32, bitcast=True)
                mass = tl.full((), 0.0, tl.float32)
                for v0 in range(0, vocab, BLOCK):
                    idx = v0 + offs
                    z = scaled_tile(base, idx, idx < vocab, t)
                    p = tl.where((z >= kth) & (idx < vocab), tl.exp(z - m) / s, 0.0)
                    mass += tl.sum(tl.where(p > thr, p, 0.0), 0)
                below = mass < top_p
                active = lo < hi
                hi = tl.where(active & below, mid, hi)
                lo = tl.where(active & ~below, mid + 1, lo)
            pthr = lo.to(tl.float32, bitcast=True)
        # The reference renormalises every row once top_p is given (1 included).
        z2 = tl.full((), 0.0, tl.float32)
        for v0 in range(0, vocab, BLOCK):
            idx = v0 + offs
            z = scaled_tile(base, idx, idx < vocab, t)
            p = tl.where((z >= kth) & (idx < vocab), tl.exp(z - m) / s, 0.0)
            z2 += tl.sum(tl.where(p >= pthr, p, 0.0), 0)

    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(kth_ptr + row, kth)
    tl.store(pthr_ptr + row, pthr)
    tl.store(z2_ptr + row, z2)
    tl.store(amax_ptr + row, amax.to(tl.int32))


@triton.jit
def _target_prob(z, m, s, kth, pthr, z2):
    p = tl.exp(z - m) / s
    keep = (z >= kth) & (p >= pthr)
    return tl.where(keep, p / z2, 0.0)


@triton.jit
def _chain_kernel(
    logits_ptr, stride_l, num_rows, vocab,
    m_ptr, s_ptr, kth_ptr, pthr_ptr, z2_ptr, amax_ptr,
    drafts_ptr, stride_dr, stride_dj,
    dprobs_ptr, stride_pr, stride_pj,
    dtp_ptr, stride_tr, stride_tj,
    dlogits_ptr, stride_gr, stride_gj,
    dtemp_ptr,
    lengths_ptr, cu_ptr, temp_ptr, seed_ptr, offset_ptr,
    tokens_ptr, stride_out, nacc_ptr,
    gamma,
    MODE: tl.constexpr,  # 0 one-hot drafts, 1 draft_probs, 2 draft_logits
    HAS_DTP: tl.constexpr,  # draft_token_probs given (MODE 2)
    BLOCK: tl.constexpr,
):
    r = tl.program_id(0)
    start = tl.load(cu_ptr + r).to(tl.int64)
    nrows = tl.load(cu_ptr + r + 1).to(tl.int64) - start
    # Inputs are trusted only as far as the value checks went: clamp every
    # index so that inconsistent lengths/cu_verify can never read out of bounds.
    live = (nrows > 0) & (start >= 0) & (start < num_rows)
    length = tl.minimum(tl.maximum(tl.load(lengths_ptr + r).to(tl.int64), 0), gamma)
    length = tl.where(live, tl.minimum(length, num_rows - 1 - start), 0)
    greedy, t = greedy_and_scale(tl.load(temp_ptr + r))
    seed = tl.load(seed_ptr + r)
    offset = tl.load(offset_ptr)
    if MODE == 2:
        d_greedy, d_t = greedy_and_scale(tl.load(dtemp_ptr + r))

    n_acc = tl.full((), 0, tl.int64)
    still = live
    for j in range(0, length):
        row = start + j
        x = tl.load(drafts_ptr + r * stride_dr + j * stride_dj).to(tl.int64)
        x = tl.minimum(tl.maximum(x, 0), vocab - 1)
        z_x = scaled_tile(logits_ptr + row * stride_l, x, True, t)
        p_t = _target_prob(z_x, tl.load(m_ptr + row), tl.load(s_ptr + row), tl.load(kth_ptr + row),
                           tl.load(pthr_ptr + row), tl.load(z2_ptr + row))
        if MODE == 0:
            p_d = 1.0
        elif MODE == 1:
            p_d = tl.load(dprobs_ptr + r * stride_pr + j * stride_pj + x).to(tl.float32)
        else:
            if HAS_DTP:
                p_d = tl.load(dtp_ptr + r * stride_tr + j * stride_tj).to(tl.float32)
            else:
                dbase = dlogits_ptr + r * stride_gr + j * stride_gj
                dm, ds, damax = softmax_stats(dbase, vocab, d_t, True, BLOCK)
                dz = scaled_tile(dbase, x, True, d_t)
                p_d = tl.where(d_greedy, tl.where(damax == x, 1.0, 0.0), tl.exp(dz - dm) / ds)
        coin = rng.uniform(seed, offset, STREAM_ACCEPT, j, 0)
        amax_row = tl.load(amax_ptr + row).to(tl.int64)
        accept = tl.where(greedy, amax_row == x, coin * p_d < p_t)
        still = still & accept
        n_acc += still.to(tl.int64)

    # One more token at local position n_acc of the final row.
    row = tl.where(live, start + n_acc, 0)
    rejected = n_acc < length
    m = tl.load(m_ptr + row, mask=live, other=0.0)
    s = tl.load(s_ptr + row, mask=live, other=1.0)
    kth = tl.load(kth_ptr + row, mask=live, other=0.0)
    pthr = tl.load(pthr_ptr + row, mask=live, other=0.0)
    z2 = tl.load(z2_ptr + row, mask=live, other=1.0)
    stream = tl.where(rejected, STREAM_RESIDUAL, STREAM_BONUS)
    j_rej = tl.maximum(tl.minimum(n_acc, gamma - 1), 0)
    x_rej = tl.load(drafts_ptr + r * stride_dr + j_rej * stride_dj, mask=rejected, other=0).to(tl.int64)
    if MODE == 2:
        dbase = dlogits_ptr + r * stride_gr + j_rej * stride_gj
        dm, ds, damax = softmax_stats(dbase, vocab, d_t, rejected, BLOCK)
    offs = tl.arange(0, BLOCK)
    best_w = tl.full((), float("-inf"), tl.float32)
    arg_w = tl.full((), 0, tl.int32)
    best_p = tl.full((), float("-inf"), tl.float32)
    arg_p = tl.full((), 0, tl.int32)
    mass_w = tl.full((), 0.0, tl.float32)
    if ~greedy & live:
        for v0 in range(0, vocab, BLOCK):
            idx = v0 + offs
            inside = idx < vocab
            z = scaled_tile(logits_ptr + row * stride_l, idx, inside, t)
            p = tl.where(inside, _target_prob(z, m, s, kth, pthr, z2), 0.0)
            if MODE == 0:
                q = tl.where(idx == x_rej, 1.0, 0.0)
            elif MODE == 1:
                q = tl.load(dprobs_ptr + r * stride_pr + j_rej * stride_pj + idx, mask=inside & rejected, other=0.0).to(tl.float32)
            else:
                dz = scaled_tile(dbase, idx, inside & rejected, d_t)
                q = tl.where(d_greedy, tl.where(idx == damax, 1.0, 0.0), tl.exp(dz - dm) / ds)
            q = tl.where(rejected, q, 0.0)
            w = tl.maximum(p - q, 0.0)
            mass_w += tl.sum(w, 0)
            g = rng.gumbel(rng.uniform(seed, offset, stream, n_acc, idx))
            score_w = tl.where(inside, tl.log(w) + g, float("-inf"))
            score_p = tl.where(inside, tl.log(p) + g, float("-inf"))
            best_w, arg_w = argmax_update(best_w, arg_w, score_w, v0)
            best_p, arg_p = argmax_update(best_p, arg_p, score_p, v0)
    # Without residual mass the reference falls back to p_t (same stream).
    y = tl.where(mass_w > 0, arg_w, arg_p).to(tl.int64)
    y = tl.where(greedy, tl.load(amax_ptr + row, mask=live, other=0).to(tl.int64), y)
    y = tl.where(live, y, -1)

    out = tokens_ptr + r * stride_out
    for j in range(0, gamma + 1):
        d = tl.load(drafts_ptr + r * stride_dr + j * stride_dj, mask=j < n_acc, other=-1)
        val = tl.where(j < n_acc, d.to(tl.int64), tl.where(j == n_acc, y, -1))
        tl.store(out + j, val.to(tl.int32))
    tl.store(nacc_ptr + r, n_acc.to(tl.int32))


def rejection_sample(a):
    device = a.target_logits.device
    num_rows, vocab = a.target_logits.shape
    num_req, gamma = a.draft_tokens.shape
    tokens = torch.empty((num_req, gamma + 1), dtype=torch.int32, device=device)
    num_accepted = torch.empty((num_req,), dtype=torch.int32, device=device)
    if num_req == 0:
        return tokens, num_accepted
    logits = _unit_last_stride(a.target_logits)

    # Per-row sampling parameters: row t belongs to the request whose block holds it
    # (rows past cu_verify[R] borrow the last request's; their stats are never read).
    cu = a.cu_verify.to(torch.int64)
    row_req = torch.searchsorted(cu[1:].contiguous(), torch.arange(num_rows, device=device), right=True)
    row_req = row_req.clamp(max=num_req - 1)
    temp = a.temperature.float().contiguous()
    temp_row = temp[row_req]
    topk_row = a.top_k.to(torch.int64)[row_req].contiguous() if a.top_k is not None else temp_row
    topp_row = a.top_p.float()[row_req].contiguous() if a.top_p is not None else temp_row
    f32 = dict(dtype=torch.float32, device=device)
    stats = [torch.empty(num_rows, **f32) for _ in range(5)]
    amax = torch.empty(num_rows, dtype=torch.int32, device=device)
    if num_rows:
        _row_stats_kernel[(num_rows,)](
            logits, logits.stride(0), vocab, temp_row, topk_row, topp_row, *stats, amax,
            HAS_TOPK=a.top_k is not None, HAS_TOPP=a.top_p is not None, BLOCK=BLOCK_V,
        )

    dummy = torch.empty((1, 1, 1), **f32)  # never read: the MODE / HAS_DTP constexprs drop its loads
    mode = 1 if a.draft_probs is not None else (2 if a.draft_logits is not None else 0)
    dprobs = _unit_last_stride(a.draft_probs if a.draft_probs is not None else dummy)
    dlogits = _unit_last_stride(a.draft_logits if a.draft_logits is not None else dummy)
    dtp = a.draft_token_probs if a.draft_token_probs is not None else dummy[0]
    dtemp = a.draft_temperature.float().contiguous() if a.draft_temperature is not None else temp
    drafts = a.draft_tokens
    _chain_kernel[(num_req,)](
        logits, logits.stride(0), num_rows, vocab, *stats, amax,
        drafts, drafts.stride(0), drafts.stride(1),
        dprobs, dprobs.stride(0), dprobs.stride(1),
        dtp, dtp.stride(0), dtp.stride(1),
        dlogits, dlogits.stride(0), dlogits.stride(1),
        dtemp, a.lengths.contiguous(), a.cu_verify.contiguous(), temp,
        a.seed.contiguous(), a.offset.reshape(1), tokens, tokens.stride(0), num_accepted, gamma,
        MODE=mode, HAS_DTP=a.draft_token_probs is not None, BLOCK=BLOCK_V,
    )
    return tokens, num_accepted


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Vocab rows with unit stride (the kernels index ids directly); copied only when not."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _compile_specs():
    """(kernel, signature, constexprs) triples that tests compile for sm_90 ahead of time."""
    stats = {"x_ptr": "*bf16", "stride_x": "i64", "vocab": "i32", "temp_ptr": "*fp32", "topk_ptr": "*i64",
             "topp_ptr": "*fp32", "m_ptr": "*fp32", "s_ptr": "*fp32", "kth_ptr": "*fp32", "pthr_ptr": "*fp32",
             "z2_ptr": "*fp32", "amax_ptr": "*i32", "HAS_TOPK": "constexpr", "HAS_TOPP": "constexpr",
             "BLOCK": "constexpr"}
    chain = {"logits_ptr": "*bf16", "stride_l": "i64", "num_rows": "i32", "vocab": "i32",
             "m_ptr": "*fp32", "s_ptr": "*fp32", "kth_ptr": "*fp32", "pthr_ptr": "*fp32", "z2_ptr": "*fp32",
             "amax_ptr": "*i32", "drafts_ptr": "*i64", "stride_dr": "i64", "stride_dj": "i64",
             "dprobs_ptr": "*fp32", "stride_pr": "i64", "stride_pj": "i64",
             "dtp_ptr": "*fp32", "stride_tr": "i64", "stride_tj": "i64",
             "dlogits_ptr": "*fp32", "stride_gr": "i64", "stride_gj": "i64", "dtemp_ptr": "*fp32",
             "lengths_ptr": "*i32", "cu_ptr": "*i32", "temp_ptr": "*fp32", "seed_ptr": "*i64", "offset_ptr": "*i64",
             "tokens_ptr": "*i32", "stride_out": "i64", "nacc_ptr": "*i32", "gamma": "i32",
             "MODE": "constexpr", "HAS_DTP": "constexpr", "BLOCK": "constexpr"}
    specs = []
    for topk in (False, True):
        for topp in (False, True):
            specs.append((_row_stats_kernel, stats, {"HAS_TOPK": topk, "HAS_TOPP": topp, "BLOCK": BLOCK_V}))
    for mode, dtp in ((0, False), (1, False), (2, False), (2, True)):
        specs.append((_chain_kernel, chain, {"MODE": mode, "HAS_DTP": dtp, "BLOCK": BLOCK_V}))
    return specs
