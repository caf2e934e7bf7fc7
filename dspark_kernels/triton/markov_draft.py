"""Triton markov_draft: implements dspark_kernels.markov_draft's vocabulary-wide step; the block loop
(head input, confidence, survival) is the reference's draft_block, shared by every backend.

Per draft step k:

1. ``_step_tile_kernel``, grid (vocab tiles, request tiles): z = U_k + e_k·W2ᵀ
   for a [BLOCK_R, BLOCK_V] tile with tl.dot at IEEE fp32 precision (TF32 would
   move z by ~1e-3 and change tokens versus the fp32 reference), so W2 is read
   once per step for the whole batch; per request and tile it writes the Gumbel
   race winner (z/T + G, stream DRAFT, position k), the softmax partials
   (max and sum of exp(z/T - max)) and the greedy argmax of z;
2. ``_step_reduce_kernel``, one program per request: combines the partials
   (first index wins ties, like torch.argmax) into x_k and p_d(x_k).

Optional draft_logits / draft_probs outputs are written by the tile kernel
(z) and normalised by ``_probs_kernel`` once all steps are done.
No host sync anywhere; grids depend on shapes only.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import constants as C
from ..reference.markov_draft import Block, Steps, draft_block
from . import rng
from .sampling import greedy_and_inverse, no_nan, scaled_tile_mul, softmax_stats

STREAM_DRAFT = tl.constexpr(C.STREAM_DRAFT)

# 16 requests x 128 vocab ids per tile: tl.dot needs >= 16 on each side, and
# 128 fp32 columns x 64-wide K chunks keeps the W2 tile at 32 KB in registers.
BLOCK_R = 16
BLOCK_V = 128
BLOCK_K = 64


@triton.jit
def _step_tile_kernel(
    u_ptr, stride_ur, stride_uv,  # U[:, k] view: [R, V]
    e_ptr, stride_er,  # e_k [R, r] fp32
    w2_ptr, stride_w2v, stride_w2k,  # W2 [V, r]
    temp_ptr, seed_ptr, offset_ptr,
    part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr, part_garg_ptr,
    logits_ptr, stride_lr, stride_lv,  # draft_logits[:, k] view (when STORE_LOGITS)
    num_req, vocab, rank, step, num_tiles,
    STORE_LOGITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile_v = tl.program_id(0)
    tile_r = tl.program_id(1)
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < num_req
    col_ok = cols < vocab
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    acc = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    for k0 in range(0, rank, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < rank
        e = tl.load(e_ptr + rows64[:, None] * stride_er + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w2_ptr + cols64[None, :] * stride_w2v + ks[:, None] * stride_w2k,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(e, w, acc, input_precision="ieee")
    ok = row_ok[:, None] & col_ok[None, :]
    u = tl.load(u_ptr + rows64[:, None] * stride_ur + cols64[None, :] * stride_uv, mask=ok, other=0.0).to(tl.float32)
    z = tl.where(ok, u + acc, float("-inf"))
    if STORE_LOGITS:
        tl.store(logits_ptr + rows64[:, None] * stride_lr + cols64[None, :] * stride_lv, z, mask=ok)

    _rows_greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + rows, mask=row_ok, other=1.0))
    zt = z * inv_t[:, None]
    seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
    offset = tl.load(offset_ptr)
    g = rng.gumbel(rng.uniform_tile_rows(seed[:, None], offset, STREAM_DRAFT, step, tile_v * BLOCK_V, BLOCK_R, BLOCK_V))
    score = tl.where(ok, zt + g, float("-inf"))
    best, best_i = tl.max(no_nan(score), 1, return_indices=True, return_indices_tie_break_left=True)
    z_best = tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == best_i[:, None], z, 0.0), 1)
    m = tl.max(zt, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ssum = tl.sum(tl.where(ok, tl.exp(zt - m_safe[:, None]), 0.0), 1)
    gmax, g_i = tl.max(no_nan(z), 1, return_indices=True, return_indices_tie_break_left=True)

    out = rows64 * num_tiles + tile_v
    tl.store(part_score_ptr + out, best, mask=row_ok)
    tl.store(part_arg_ptr + out, (tile_v * BLOCK_V + best_i).to(tl.int32), mask=row_ok)
    tl.store(part_zbest_ptr + out, z_best, mask=row_ok)
    tl.store(part_max_ptr + out, m, mask=row_ok)
    tl.store(part_sum_ptr + out, ssum, mask=row_ok)
    tl.store(part_gmax_ptr + out, gmax, mask=row_ok)
    tl.store(part_garg_ptr + out, (tile_v * BLOCK_V + g_i).to(tl.int32), mask=row_ok)


@triton.jit
def _step_reduce_kernel(
    part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr, part_garg_ptr,
    temp_ptr, tokens_ptr, stride_tr, probs_ptr, stride_pr, step, num_tiles,
    BLOCK_T: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + r))
    base = r * num_tiles
    best = tl.full((), float("-inf"), tl.float32)
    best_arg = tl.full((), 0, tl.int32)
    z_best = tl.full((), 0.0, tl.float32)
    gbest = tl.full((), float("-inf"), tl.float32)
    garg = tl.full((), 0, tl.int32)
    m = tl.full((), float("-inf"), tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        idx = t0 + tl.arange(0, BLOCK_T)
        ok = idx < num_tiles
        sc = tl.load(part_score_ptr + base + idx, mask=ok, other=float("-inf"))
        tile_best, i = tl.max(no_nan(sc), 0, return_indices=True, return_indices_tie_break_left=True)
        # Tiles are in vocab order, so a strict > keeps the first index on ties.
        better = tile_best > best
        sel = tl.arange(0, BLOCK_T) == i
        best_arg = tl.where(better, tl.sum(tl.where(sel, tl.load(part_arg_ptr + base + idx, mask=ok, other=0), 0), 0), best_arg)
        z_best = tl.where(better, tl.sum(tl.where(sel, tl.load(part_zbest_ptr + base + idx, mask=ok, other=0.0), 0.0), 0), z_best)
        best = tl.where(better, tile_best, best)
        gm = tl.load(part_gmax_ptr + base + idx, mask=ok, other=float("-inf"))
        tile_g, gi = tl.max(no_nan(gm), 0, return_indices=True, return_indices_tie_break_left=True)
        gsel = tl.arange(0, BLOCK_T) == gi
        gbetter = tile_g > gbest
        garg = tl.where(gbetter, tl.sum(tl.where(gsel, tl.load(part_garg_ptr + base + idx, mask=ok, other=0), 0), 0), garg)
        gbest = tl.where(gbetter, tile_g, gbest)
        m = tl.maximum(m, tl.max(tl.load(part_max_ptr + base + idx, mask=ok, other=float("-inf")), 0))
    s = tl.full((), 0.0, tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        idx = t0 + tl.arange(0, BLOCK_T)
        ok = idx < num_tiles
        pm = tl.load(part_max_ptr + base + idx, mask=ok, other=float("-inf"))
        ps = tl.load(part_sum_ptr + base + idx, mask=ok, other=0.0)
        s += tl.sum(tl.where(ok & (pm > float("-inf")), ps * tl.exp(pm - m), 0.0), 0)
    p_x = tl.exp(z_best * inv_t - m) / s
    token = tl.where(greedy, garg, best_arg)
    tl.store(tokens_ptr + r * stride_tr + step, token)
    tl.store(probs_ptr + r * stride_pr + step, tl.where(greedy, 1.0, p_x))


@triton.jit
def _probs_kernel(logits_ptr, probs_ptr, temp_ptr, tokens_ptr, gamma, vocab, BLOCK: tl.constexpr):
    """draft_probs[r, k] = softmax(z / T) from the stored z (one-hot at x_k for greedy rows)."""
    row = tl.program_id(0)  # r * gamma + k
    greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + row // gamma))
    x = tl.load(tokens_ptr + row)
    base = logits_ptr + row.to(tl.int64) * vocab
    m, s, _first_max = softmax_stats(base, vocab, inv_t, BLOCK)
    offs = tl.arange(0, BLOCK)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        p = tl.exp(scaled_tile_mul(base, idx, idx < vocab, inv_t) - m) / s
        p = tl.where(greedy, tl.where(idx == x, 1.0, 0.0), p)
        tl.store(probs_ptr + row.to(tl.int64) * vocab + idx, p, mask=idx < vocab)


class _Workspace(NamedTuple):
    temperature: torch.Tensor  # [R] fp32 contiguous
    seed: torch.Tensor
    offset: torch.Tensor  # [1] int64
    parts: list  # per (request, vocab tile) partials of the tile kernel
    num_tiles: int
    grid: tuple
    block_t: int
    scratch: torch.Tensor  # z destination when z is not kept (never written: STORE_LOGITS is off)


def _prepare(a) -> _Workspace:
    num_req, _, vocab = a.base_logits.shape
    device = a.base_logits.device
    num_tiles = triton.cdiv(vocab, BLOCK_V)
    parts = [torch.empty((num_req, num_tiles), dtype=torch.float32, device=device) for _ in range(7)]
    parts[1] = torch.empty((num_req, num_tiles), dtype=torch.int32, device=device)
    parts[6] = torch.empty((num_req, num_tiles), dtype=torch.int32, device=device)
    return _Workspace(a.temperature.float().contiguous(), a.seed.contiguous(), a.offset.reshape(1), parts,
                      num_tiles, (num_tiles, triton.cdiv(num_req, BLOCK_R)),
                      min(1024, triton.next_power_of_2(num_tiles)),
                      torch.empty((1, 1), dtype=torch.float32, device=device))


def _step(a, ws: _Workspace, k: int, e: torch.Tensor, block) -> None:
    num_req, _, vocab = a.base_logits.shape
    u, w2 = a.base_logits[:, k], a.w2
    zk = block.z[:, k] if block.z is not None else ws.scratch
    _step_tile_kernel[ws.grid](
        u, u.stride(0), u.stride(1), e, e.stride(0), w2, w2.stride(0), w2.stride(1),
        ws.temperature, ws.seed, ws.offset, *ws.parts, zk, zk.stride(0), zk.stride(1),
        num_req, vocab, w2.shape[1], k, ws.num_tiles,
        STORE_LOGITS=block.z is not None, BLOCK_R=BLOCK_R, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K,
    )
    _step_reduce_kernel[(num_req,)](
        *ws.parts, ws.temperature, block.tokens, block.tokens.stride(0), block.token_probs,
        block.token_probs.stride(0), k, ws.num_tiles, BLOCK_T=ws.block_t,
    )


def _probs(a, ws: _Workspace, block) -> None:
    num_req, gamma, vocab = a.base_logits.shape
    _probs_kernel[(num_req * gamma,)](block.z, block.draft_probs, ws.temperature, block.tokens, gamma, vocab,
                                      BLOCK=1024)


STEPS = Steps(_prepare, _step, _probs)


def markov_draft(a) -> tuple:
    """exact: the shared loop with bitwise-reference steps; else the fused fast path."""
    return draft_block(a, STEPS) if a.exact else _fast(a)


# --------------------------------------------------------------------------- the fast path: fused, tensor cores
#
# Per draft step two launches: _head_kernel (the previous step's reduction into x_{k-1} and p_d, then
# W1[x_{k-1}], the gated / RNN head and the confidence, all on chip) and _fast_tile_kernel (one program
# per vocabulary tile: its W2 tile is loaded once and used for every request tile, so W2 is
# read once per step for the whole batch, the e·W2ᵀ products on the tensor cores with W2's dtype as
# operands and fp32 accumulation); then one final _head_kernel (the last reduction and the survival).
# Not bitwise the reference (the head runs in Triton's fp32 dot order, e is rounded to W2's dtype),
# but self-consistent: every reported probability and logit is the one its token was drawn from.

FAST_BLOCK_V = 128
FAST_BLOCK_R = 16
HOLD_R = 64
HOLD_SUB = 8
HEAD_BLOCK_R = 16
VANILLA, GATED, RNN = 0, 1, 2


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _reduce_rows(part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr,
                 part_garg_ptr, rows, row_ok, num_tiles, greedy, inv_t, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """x_k and p_d(x_k) of BLOCK_R requests from the per-tile partials (first index wins ties)."""
    base = rows.to(tl.int64)[:, None] * num_tiles
    best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    best_arg = tl.zeros((BLOCK_R,), tl.int32)
    z_best = tl.zeros((BLOCK_R,), tl.float32)
    gbest = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    garg = tl.zeros((BLOCK_R,), tl.int32)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    lane = tl.arange(0, BLOCK_T)[None, :]
    for t0 in range(0, num_tiles, BLOCK_T):
        ok = row_ok[:, None] & (t0 + lane < num_tiles)
        at = base + t0 + lane
        tb, i = tl.max(no_nan(tl.load(part_score_ptr + at, mask=ok, other=float("-inf"))), 1,
                       return_indices=True, return_indices_tie_break_left=True)
        sel = lane == i[:, None]
        better = tb > best
        best_arg = tl.where(better, tl.sum(tl.where(sel, tl.load(part_arg_ptr + at, mask=ok, other=0), 0), 1), best_arg)
        z_best = tl.where(better, tl.sum(tl.where(sel, tl.load(part_zbest_ptr + at, mask=ok, other=0.0), 0.0), 1), z_best)
        best = tl.where(better, tb, best)
        tg, gi = tl.max(no_nan(tl.load(part_gmax_ptr + at, mask=ok, other=float("-inf"))), 1,
                        return_indices=True, return_indices_tie_break_left=True)
        gbetter = tg > gbest
        garg = tl.where(gbetter, tl.sum(tl.where(lane == gi[:, None], tl.load(part_garg_ptr + at, mask=ok, other=0), 0), 1), garg)
        gbest = tl.where(gbetter, tg, gbest)
        m = tl.maximum(m, tl.max(tl.load(part_max_ptr + at, mask=ok, other=float("-inf")), 1))
    s = tl.zeros((BLOCK_R,), tl.float32)
    for t0 in range(0, num_tiles, BLOCK_T):
        ok = row_ok[:, None] & (t0 + lane < num_tiles)
        at = base + t0 + lane
        pm = tl.load(part_max_ptr + at, mask=ok, other=float("-inf"))
        ps = tl.load(part_sum_ptr + at, mask=ok, other=0.0)
        s += tl.sum(tl.where(ok & (pm > float("-inf")), ps * tl.exp(pm - m[:, None]), 0.0), 1)
    p_x = tl.exp(z_best * inv_t - m) / s
    return tl.where(greedy, garg, best_arg), tl.where(greedy, 1.0, p_x)


@triton.jit
def _rnn_gate(sbase, wbase, hbase, stride_w1k, stride_hd, rw_ptr, stride_rw0, stride_rw1, rb_ptr, which, rank, dim,
              row_ok, ks, k_ok, HAS_RB: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_D: tl.constexpr):
    """Rows ``which*r .. which*r + r - 1`` of Wr·[s_{k-1}; W1[x]; h_k] + br for BLOCK_R rows: fp32, ieee."""
    acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    for c0 in range(0, 2 * rank + dim, BLOCK_D):
        cs = c0 + tl.arange(0, BLOCK_D)
        from_s = cs < rank
        from_w1 = (cs >= rank) & (cs < 2 * rank)
        from_h = (cs >= 2 * rank) & (cs < 2 * rank + dim)
        x = tl.load(sbase + cs[None, :], mask=row_ok[:, None] & from_s[None, :], other=0.0)
        x += tl.load(wbase + (cs - rank)[None, :] * stride_w1k, mask=row_ok[:, None] & from_w1[None, :],
                     other=0.0).to(tl.float32)
        x += tl.load(hbase + (cs - 2 * rank)[None, :] * stride_hd, mask=row_ok[:, None] & from_h[None, :],
                     other=0.0).to(tl.float32)
        w = tl.load(rw_ptr + (which * rank + ks)[:, None] * stride_rw0 + cs[None, :] * stride_rw1,
                    mask=k_ok[:, None] & (cs < 2 * rank + dim)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    if HAS_RB:
        acc += tl.load(rb_ptr + which * rank + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _head_kernel(
    step, num_req, vocab, rank, dim, gamma,
    part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr, part_garg_ptr,
    num_tiles, temp_ptr,
    tokens_ptr, probs_ptr, conf_ptr, surv_ptr,
    anchor_ptr, w1_ptr, stride_w1v, stride_w1k,
    hidden_ptr, stride_hr, stride_hj, stride_hd,
    gw_ptr, stride_gw0, stride_gw1, gb_ptr,
    rw_ptr, stride_rw0, stride_rw1, rb_ptr,
    cw_ptr, cb_ptr, sts_ptr,
    e_ptr, state_ptr,
    HEAD: tl.constexpr, HAS_GB: tl.constexpr, HAS_RB: tl.constexpr, HAS_CONF: tl.constexpr,
    HAS_CB: tl.constexpr, HAS_STS: tl.constexpr, CONF_MARKOV: tl.constexpr, REDUCE: tl.constexpr,
    NEXT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_req
    rows64 = rows.to(tl.int64)
    greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + rows, mask=row_ok, other=1.0))
    # outputs are [R, gamma] contiguous
    if REDUCE:  # the previous step's token and its probability
        prev, p_x = _reduce_rows(part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr,
                                 part_gmax_ptr, part_garg_ptr, rows, row_ok, num_tiles, greedy, inv_t, BLOCK_R, BLOCK_T)
        prev = tl.minimum(tl.maximum(prev, 0), vocab - 1)
        tl.store(tokens_ptr + rows64 * gamma + step - 1, prev, mask=row_ok)
        tl.store(probs_ptr + rows64 * gamma + step - 1, p_x, mask=row_ok)
    else:
        # Unchecked path: an anchor outside [0, V) is clamped, never an out-of-bounds read of W1.
        prev = tl.load(anchor_ptr + rows, mask=row_ok, other=0).to(tl.int32)
        prev = tl.minimum(tl.maximum(prev, 0), vocab - 1)
    if NEXT:  # the head input e_k and the confidence c_k of this step
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < rank
        ok2 = row_ok[:, None] & k_ok[None, :]
        emb = tl.load(w1_ptr + prev.to(tl.int64)[:, None] * stride_w1v + ks[None, :] * stride_w1k, mask=ok2,
                      other=0.0).to(tl.float32)
        hbase = hidden_ptr + rows64[:, None] * stride_hr + step * stride_hj
        wbase = w1_ptr + prev.to(tl.int64)[:, None] * stride_w1v
        e = emb
        # The head's projections run over input chunks of BLOCK_D (a [r, BLOCK_D] weight slice at a
        # time: 16 KB in fp32 at r = 256, BLOCK_D = 16; 32 spilled 48 B at sm_90) so no weight matrix has
        # to fit on chip.
        if HEAD == 1:  # gate = σ(Wg·[h_k; W1[x]] + bg), e = gate ⊙ W1[x]
            acc = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
            for c0 in range(0, dim + rank, BLOCK_D):
                cs = c0 + tl.arange(0, BLOCK_D)
                from_h = cs < dim
                c_ok = cs < dim + rank
                x = tl.where(from_h[None, :],
                             tl.load(hbase + cs[None, :] * stride_hd, mask=row_ok[:, None] & from_h[None, :],
                                     other=0.0).to(tl.float32),
                             tl.load(wbase + (cs - dim)[None, :] * stride_w1k,
                                     mask=row_ok[:, None] & ~from_h[None, :] & c_ok[None, :], other=0.0).to(tl.float32))
                wg = tl.load(gw_ptr + ks[:, None] * stride_gw0 + cs[None, :] * stride_gw1,
                             mask=k_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
                acc = tl.dot(x, tl.trans(wg), acc, input_precision="ieee")
            if HAS_GB:
                acc += tl.load(gb_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            e = tl.sigmoid(acc) * emb
        if HEAD == 2:  # [g; c; o] = Wr·[s_{k-1}; W1[x]; h_k] + br; s_k = σ(g) s_{k-1} + (1 - σ(g)) tanh(c)
            sbase = state_ptr + rows64[:, None] * BLOCK_K
            # One gate at a time (g, then c, then o): one [BLOCK_R, r] accumulator and one weight slice
            # live. All three at once needed 255 registers and spilled 124 B at sm_90; re-reading the
            # [BLOCK_R, 2r + d] input three times costs 3 x 16 x 768 x 4 B = 147 KB of L2 reads at
            # r = 256, d = 256, against 2.4 MB of fp32 weight read once.
            acc_g = _rnn_gate(sbase, wbase, hbase, stride_w1k, stride_hd, rw_ptr, stride_rw0, stride_rw1, rb_ptr,
                              0, rank, dim, row_ok, ks, k_ok, HAS_RB, BLOCK_R, BLOCK_K, BLOCK_D)
            gate = tl.sigmoid(acc_g)
            acc_c = _rnn_gate(sbase, wbase, hbase, stride_w1k, stride_hd, rw_ptr, stride_rw0, stride_rw1, rb_ptr,
                              1, rank, dim, row_ok, ks, k_ok, HAS_RB, BLOCK_R, BLOCK_K, BLOCK_D)
            state = tl.load(sbase + ks[None, :], mask=ok2, other=0.0)
            state = tl.where(ok2, gate * state + (1.0 - gate) * _tanh(acc_c), 0.0)
            acc_o = _rnn_gate(sbase, wbase, hbase, stride_w1k, stride_hd, rw_ptr, stride_rw0, stride_rw1, rb_ptr,
                              2, rank, dim, row_ok, ks, k_ok, HAS_RB, BLOCK_R, BLOCK_K, BLOCK_D)
            e = tl.where(ok2, _tanh(acc_o), 0.0)  # e_k = tanh(o)
            tl.debug_barrier()  # every lane has read s_{k-1} above before any writes s_k
            tl.store(sbase + ks[None, :], state, mask=ok2)
        tl.store(e_ptr + rows64[:, None] * BLOCK_K + ks[None, :], e.to(e_ptr.dtype.element_ty), mask=ok2)
        if HAS_CONF:  # c_k = σ((w·[h_k; W1[x]] + b) / τ_k), or w·h_k without the Markov feature
            logit = tl.zeros((BLOCK_R,), tl.float32)
            if CONF_MARKOV:
                logit += tl.sum(emb * tl.load(cw_ptr + dim + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :], 1)
            for d0 in range(0, dim, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                d_ok = ds < dim
                h = tl.load(hbase + ds[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                logit += tl.sum(h.to(tl.float32) * tl.load(cw_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)[None, :], 1)
            if HAS_CB:
                logit += tl.load(cb_ptr).to(tl.float32)
            if HAS_STS:
                logit = logit / tl.load(sts_ptr + step).to(tl.float32)
            tl.store(conf_ptr + rows64 * gamma + step, tl.sigmoid(logit), mask=row_ok)
    else:
        if HAS_CONF:  # the last launch: survival a_k = Π_{i<=k} c_i
            a = tl.full((BLOCK_R,), 1.0, tl.float32)
            for j in range(0, gamma):
                a = a * tl.load(conf_ptr + rows64 * gamma + j, mask=row_ok, other=1.0)
                tl.store(surv_ptr + rows64 * gamma + j, a, mask=row_ok)


@triton.jit
def _race_tile(z, ok, inv_t, seed, offset, step, v0, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """One [BLOCK_R, BLOCK_V] tile of z (columns v0 ...) as per-row partials: the Gumbel race winner
    (score, id, z), the softmax partials (max, sum) of z / T and the greedy argmax of z (one Philox
    block per 4 lanes)."""
    zt = z * inv_t[:, None]
    g = rng.gumbel(rng.uniform_tile_rows(seed[:, None], offset, STREAM_DRAFT, step, v0, BLOCK_R, BLOCK_V))
    score = tl.where(ok, zt + g, float("-inf"))
    best, best_i = tl.max(no_nan(score), 1, return_indices=True, return_indices_tie_break_left=True)
    z_best = tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == best_i[:, None], z, 0.0), 1)
    m = tl.max(no_nan(zt), 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ssum = tl.sum(tl.where(ok, tl.exp(zt - m_safe[:, None]), 0.0), 1)
    gmax, g_i = tl.max(no_nan(z), 1, return_indices=True, return_indices_tie_break_left=True)
    return best, (v0 + best_i).to(tl.int32), z_best, m, ssum, gmax, (v0 + g_i).to(tl.int32)


@triton.jit
def _combine(b0, a0, zb0, m0, s0, g0, ga0, b1, a1, zb1, m1, s1, g1, ga1):
    """Partials of columns before (0) and after (1): the earlier wins ties, as the reduction does."""
    take = b1 > b0
    gtake = g1 > g0
    m = tl.maximum(m0, m1)
    fin = m > float("-inf")
    s = tl.where(fin, s0 * tl.exp(tl.where(m0 > float("-inf"), m0 - m, float("-inf"))) +
                 s1 * tl.exp(tl.where(m1 > float("-inf"), m1 - m, float("-inf"))), 0.0)
    return (tl.where(take, b1, b0), tl.where(take, a1, a0), tl.where(take, zb1, zb0), m, s,
            tl.where(gtake, g1, g0), tl.where(gtake, ga1, ga0))


@triton.jit
def _store_partials(out, row_ok, best, arg, zb, m, s, gmax, garg,
                    part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr,
                    part_garg_ptr):
    tl.store(part_score_ptr + out, best, mask=row_ok)
    tl.store(part_arg_ptr + out, arg, mask=row_ok)
    tl.store(part_zbest_ptr + out, zb, mask=row_ok)
    tl.store(part_max_ptr + out, m, mask=row_ok)
    tl.store(part_sum_ptr + out, s, mask=row_ok)
    tl.store(part_gmax_ptr + out, gmax, mask=row_ok)
    tl.store(part_garg_ptr + out, garg, mask=row_ok)


@triton.jit
def _logits_tile(e, w, rows64, row_ok, cols64, col_ok, u_ptr, stride_ur, stride_uk, stride_uv, step, logits_ptr,
                 gamma, vocab, STORE_LOGITS: tl.constexpr, TF32: tl.constexpr):
    """z = U_k + e·W2ᵀ for one [rows, cols] tile (-inf outside), stored to draft_logits when asked."""
    if TF32:
        acc = tl.dot(e, tl.trans(w), input_precision="tf32")
    else:
        acc = tl.dot(e, tl.trans(w))
    ok = row_ok[:, None] & col_ok[None, :]
    u = tl.load(u_ptr + rows64[:, None] * stride_ur + step * stride_uk + cols64[None, :] * stride_uv, mask=ok,
                other=0.0).to(tl.float32)
    z = tl.where(ok, u + acc, float("-inf"))
    if STORE_LOGITS:
        tl.store(logits_ptr + (rows64[:, None] * gamma + step) * vocab + cols64[None, :], z, mask=ok)
    return z, ok


@triton.jit
def _fast_tile_kernel(
    u_ptr, stride_ur, stride_uk, stride_uv, step,
    e_ptr, w2_ptr, stride_w2v, stride_w2k,
    temp_ptr, seed_ptr, offset_ptr,
    part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr, part_garg_ptr,
    logits_ptr, num_req, vocab, rank, gamma, num_tiles,
    STORE_LOGITS: tl.constexpr, TF32: tl.constexpr, HOLD_E: tl.constexpr, SUB: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """z = U_k + e·W2ᵀ on the tensor cores, then the race partials.

    HOLD_E (R <= BLOCK_R): the program keeps every request's e on chip and covers SUB vocabulary tiles,
    so e is read once per SUB·BLOCK_V columns and W2 once. Else: the program keeps its one W2 tile and
    loops over the request tiles, so W2 is read once and e once per BLOCK_V columns."""
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < rank
    offset = tl.load(offset_ptr)
    if HOLD_E:
        rows = tl.arange(0, BLOCK_R)
        row_ok = rows < num_req
        rows64 = rows.to(tl.int64)
        e = tl.load(e_ptr + rows64[:, None] * BLOCK_K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        _rows_greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + rows, mask=row_ok, other=1.0))
        seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_R,), tl.int32) + tl.program_id(0) * SUB * BLOCK_V
        zb = tl.zeros((BLOCK_R,), tl.float32)
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        ssum = tl.zeros((BLOCK_R,), tl.float32)
        gmax = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        garg = tl.zeros((BLOCK_R,), tl.int32) + tl.program_id(0) * SUB * BLOCK_V
        for sv in range(0, SUB):
            tile_v = tl.program_id(0) * SUB + sv
            cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < vocab
            cols64 = cols.to(tl.int64)
            w = tl.load(w2_ptr + cols64[:, None] * stride_w2v + ks[None, :] * stride_w2k,
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            z, ok = _logits_tile(e, w, rows64, row_ok, cols64, col_ok, u_ptr, stride_ur, stride_uk, stride_uv, step,
                                 logits_ptr, gamma, vocab, STORE_LOGITS, TF32)
            b1, a1, zb1, m1, s1, g1, ga1 = _race_tile(z, ok, inv_t, seed, offset, step, tile_v * BLOCK_V, BLOCK_R,
                                                      BLOCK_V)
            best, arg, zb, m, ssum, gmax, garg = _combine(best, arg, zb, m, ssum, gmax, garg,
                                                          b1, a1, zb1, m1, s1, g1, ga1)
        # One partial per program (SUB tiles): num_tiles counts programs here.
        _store_partials(rows64 * num_tiles + tl.program_id(0), row_ok, best, arg, zb, m, ssum, gmax, garg,
                        part_score_ptr, part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr,
                        part_garg_ptr)
    else:
        tile_v = tl.program_id(0)
        cols = tile_v * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        cols64 = cols.to(tl.int64)
        # This tile of W2, read once for the whole batch.
        w = tl.load(w2_ptr + cols64[:, None] * stride_w2v + ks[None, :] * stride_w2k,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        for r0 in range(0, num_req, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            row_ok = rows < num_req
            rows64 = rows.to(tl.int64)
            e = tl.load(e_ptr + rows64[:, None] * BLOCK_K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            z, ok = _logits_tile(e, w, rows64, row_ok, cols64, col_ok, u_ptr, stride_ur, stride_uk, stride_uv, step,
                                 logits_ptr, gamma, vocab, STORE_LOGITS, TF32)
            _rows_greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + rows, mask=row_ok, other=1.0))
            seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
            b1, a1, zb1, m1, s1, g1, ga1 = _race_tile(z, ok, inv_t, seed, offset, step, tile_v * BLOCK_V, BLOCK_R,
                                                      BLOCK_V)
            _store_partials(rows64 * num_tiles + tile_v, row_ok, b1, a1, zb1, m1, s1, g1, ga1, part_score_ptr,
                            part_arg_ptr, part_zbest_ptr, part_max_ptr, part_sum_ptr, part_gmax_ptr, part_garg_ptr)


def _fast(a) -> tuple:
    """The fused fast path (see above): 2 launches per draft step + 1 (+1 for draft_probs)."""
    block = Block(a)
    num_req, gamma, vocab = a.base_logits.shape
    device = a.base_logits.device
    if num_req == 0 or gamma == 0:
        return block.outputs(a)
    rank = a.w1.shape[1]
    dim = a.hidden.shape[2] if a.hidden is not None else 0
    block_k = max(16, triton.next_power_of_2(rank))
    half = a.w2.dtype in (torch.bfloat16, torch.float16)
    # Up to HOLD_R requests: every e stays on chip and a program covers SUB tiles of 64 columns (e read once
    # per 512 columns: 1/8 of W2's bytes at R = 64). More requests: a program keeps one W2 tile (128 bf16
    # columns x r = 256: 64 KB; 256 columns spilled 1.6 KB of registers and took 160 KB of shared memory
    # at sm_90; 64 for fp32 / tf32) and loops over request tiles.
    hold_e = num_req <= HOLD_R
    block_v = 64 if hold_e or not half else FAST_BLOCK_V
    sub = HOLD_SUB if hold_e else 1
    e_ws = torch.empty((num_req, block_k), dtype=a.w2.dtype if half else torch.float32, device=device)
    state_ws = torch.zeros((num_req, block_k), dtype=torch.float32, device=device) if a.rnn_weight is not None \
        else e_ws
    num_tiles = triton.cdiv(vocab, block_v)
    programs = triton.cdiv(num_tiles, sub)
    num_parts = programs if hold_e else num_tiles  # partial columns the reduction reads
    f32 = dict(dtype=torch.float32, device=device)
    parts = [torch.empty((num_req, num_parts), **f32) for _ in range(7)]
    parts[1] = torch.empty((num_req, num_parts), dtype=torch.int32, device=device)
    parts[6] = torch.empty((num_req, num_parts), dtype=torch.int32, device=device)
    survival = torch.empty((num_req, gamma), **f32) if a.conf_weight is not None else block.confidence
    z = block.z if block.z is not None else parts[0]  # never written without STORE_LOGITS
    dummy = parts[0]
    head = GATED if a.gate_weight is not None else (RNN if a.rnn_weight is not None else VANILLA)
    hid = a.hidden if a.hidden is not None else dummy[:, :, None]
    gw = a.gate_weight if a.gate_weight is not None else dummy
    rw = a.rnn_weight if a.rnn_weight is not None else dummy
    opt = lambda t: dummy if t is None else (t if t.is_contiguous() else t.contiguous())  # noqa: E731
    u = a.base_logits
    # The kernels index per-request vectors as contiguous (a copy only for a strided view).
    temperature, seed, anchor = (t if t.is_contiguous() else t.contiguous() for t in (a.temperature, a.seed, a.anchor))

    def head_launch(step, reduce, nxt):
        _head_kernel[(triton.cdiv(num_req, HEAD_BLOCK_R),)](
            step, num_req, vocab, rank, dim, gamma, *parts, num_parts, temperature,
            block.tokens, block.token_probs, block.confidence, survival,
            anchor, a.w1, a.w1.stride(0), a.w1.stride(1),
            hid, hid.stride(0), hid.stride(1), hid.stride(2),
            gw, gw.stride(0), gw.stride(1), opt(a.gate_bias),
            rw, rw.stride(0), rw.stride(1), opt(a.rnn_bias),
            opt(a.conf_weight), opt(a.conf_bias), opt(a.sts_temperature),
            e_ws, state_ws,
            HEAD=head, HAS_GB=a.gate_bias is not None, HAS_RB=a.rnn_bias is not None,
            HAS_CONF=a.conf_weight is not None, HAS_CB=a.conf_bias is not None,
            HAS_STS=a.sts_temperature is not None,
            CONF_MARKOV=a.conf_weight is not None and a.conf_weight.shape[0] == dim + rank, REDUCE=reduce, NEXT=nxt,
            BLOCK_R=HEAD_BLOCK_R, BLOCK_K=block_k, BLOCK_D=16, BLOCK_T=64, num_warps=8,
        )

    for k in range(gamma):
        head_launch(k, k > 0, True)
        _fast_tile_kernel[(programs,)](
            u, u.stride(0), u.stride(1), u.stride(2), k, e_ws, a.w2, a.w2.stride(0), a.w2.stride(1),
            temperature, seed, a.offset, *parts, z, num_req, vocab, rank, gamma, num_parts if hold_e else num_tiles,
            STORE_LOGITS=block.z is not None, TF32=not half, HOLD_E=hold_e, SUB=sub,
            BLOCK_R=max(16, triton.next_power_of_2(num_req)) if hold_e else FAST_BLOCK_R, BLOCK_V=block_v,
            BLOCK_K=block_k, num_warps=8 if hold_e else 16,
        )
    head_launch(gamma, True, False)
    if a.return_draft_probs:
        _probs_kernel[(num_req * gamma,)](block.z, block.draft_probs, temperature, block.tokens, gamma, vocab,
                                          BLOCK=1024)
    f32e = torch.empty(0, **f32)
    return (block.tokens, block.token_probs, block.confidence, survival if a.conf_weight is not None else f32e,
            block.draft_probs, block.z if a.return_draft_logits else f32e)


def _compile_specs():
    """(kernel, signature, constexprs) triples that tests compile for sm_90 ahead of time."""
    tile = {"u_ptr": "*bf16", "stride_ur": "i64", "stride_uv": "i64", "e_ptr": "*fp32", "stride_er": "i64",
            "w2_ptr": "*bf16", "stride_w2v": "i64", "stride_w2k": "i64", "temp_ptr": "*fp32", "seed_ptr": "*i64",
            "offset_ptr": "*i64", "part_score_ptr": "*fp32", "part_arg_ptr": "*i32", "part_zbest_ptr": "*fp32",
            "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_gmax_ptr": "*fp32", "part_garg_ptr": "*i32",
            "logits_ptr": "*fp32", "stride_lr": "i64", "stride_lv": "i64", "num_req": "i32", "vocab": "i32",
            "rank": "i32", "step": "i32", "num_tiles": "i32", "STORE_LOGITS": "constexpr", "BLOCK_R": "constexpr",
            "BLOCK_V": "constexpr", "BLOCK_K": "constexpr"}
    reduce = {"part_score_ptr": "*fp32", "part_arg_ptr": "*i32", "part_zbest_ptr": "*fp32", "part_max_ptr": "*fp32",
              "part_sum_ptr": "*fp32", "part_gmax_ptr": "*fp32", "part_garg_ptr": "*i32", "temp_ptr": "*fp32",
              "tokens_ptr": "*i32", "stride_tr": "i64", "probs_ptr": "*fp32", "stride_pr": "i64", "step": "i32",
              "num_tiles": "i32", "BLOCK_T": "constexpr"}
    probs = {"logits_ptr": "*fp32", "probs_ptr": "*fp32", "temp_ptr": "*fp32", "tokens_ptr": "*i32", "gamma": "i32",
             "vocab": "i32", "BLOCK": "constexpr"}
    return [
        (_step_tile_kernel, tile, {"STORE_LOGITS": s, "BLOCK_R": BLOCK_R, "BLOCK_V": BLOCK_V, "BLOCK_K": BLOCK_K})
        for s in (False, True)
    ] + [(_step_reduce_kernel, reduce, {"BLOCK_T": 1024}), (_probs_kernel, probs, {"BLOCK": 1024})] + \
        _fast_compile_specs()


def _fast_compile_specs():
    """The fast path's kernels at the headline shape (bf16 W2, r = 256), both tile variants and every head."""
    head = {"step": "i32", "num_req": "i32", "vocab": "i32", "rank": "i32", "dim": "i32", "gamma": "i32",
            "part_score_ptr": "*fp32", "part_arg_ptr": "*i32", "part_zbest_ptr": "*fp32", "part_max_ptr": "*fp32",
            "part_sum_ptr": "*fp32", "part_gmax_ptr": "*fp32", "part_garg_ptr": "*i32", "num_tiles": "i32",
            "temp_ptr": "*fp32", "tokens_ptr": "*i32", "probs_ptr": "*fp32", "conf_ptr": "*fp32", "surv_ptr": "*fp32",
            "anchor_ptr": "*i64", "w1_ptr": "*bf16", "stride_w1v": "i64", "stride_w1k": "i64",
            "hidden_ptr": "*bf16", "stride_hr": "i64", "stride_hj": "i64", "stride_hd": "i64",
            "gw_ptr": "*bf16", "stride_gw0": "i64", "stride_gw1": "i64", "gb_ptr": "*bf16",
            "rw_ptr": "*bf16", "stride_rw0": "i64", "stride_rw1": "i64", "rb_ptr": "*bf16",
            "cw_ptr": "*bf16", "cb_ptr": "*bf16", "sts_ptr": "*fp32", "e_ptr": "*bf16", "state_ptr": "*fp32",
            "HEAD": "constexpr", "HAS_GB": "constexpr", "HAS_RB": "constexpr", "HAS_CONF": "constexpr",
            "HAS_CB": "constexpr", "HAS_STS": "constexpr", "CONF_MARKOV": "constexpr", "REDUCE": "constexpr",
            "NEXT": "constexpr",
            "BLOCK_R": "constexpr", "BLOCK_K": "constexpr", "BLOCK_D": "constexpr", "BLOCK_T": "constexpr"}
    tile = {"u_ptr": "*bf16", "stride_ur": "i64", "stride_uk": "i64", "stride_uv": "i64", "step": "i32",
            "e_ptr": "*bf16", "w2_ptr": "*bf16", "stride_w2v": "i64", "stride_w2k": "i64", "temp_ptr": "*fp32",
            "seed_ptr": "*i64", "offset_ptr": "*i64", "part_score_ptr": "*fp32", "part_arg_ptr": "*i32",
            "part_zbest_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_gmax_ptr": "*fp32",
            "part_garg_ptr": "*i32", "logits_ptr": "*fp32", "num_req": "i32", "vocab": "i32", "rank": "i32",
            "gamma": "i32", "num_tiles": "i32", "STORE_LOGITS": "constexpr", "TF32": "constexpr",
            "HOLD_E": "constexpr", "SUB": "constexpr", "BLOCK_R": "constexpr", "BLOCK_V": "constexpr",
            "BLOCK_K": "constexpr"}
    specs = []
    for kind, flags in ((VANILLA, {}), (GATED, {"HAS_GB": True, "HAS_CONF": True, "HAS_CB": True, "HAS_STS": True}),
                        (RNN, {"HAS_RB": True, "HAS_CONF": True, "HAS_CB": True, "HAS_STS": True})):
        c = {"HEAD": kind, "HAS_GB": False, "HAS_RB": False, "HAS_CONF": False, "HAS_CB": False, "HAS_STS": False,
             "CONF_MARKOV": True,
             "REDUCE": True, "NEXT": True, "BLOCK_R": HEAD_BLOCK_R, "BLOCK_K": 256, "BLOCK_D": 16, "BLOCK_T": 64}
        specs.append((_head_kernel, head, {**c, **flags}, {"num_warps": 8}))
    for hold, block_r, block_v, sub in ((True, 64, 64, HOLD_SUB), (False, FAST_BLOCK_R, FAST_BLOCK_V, 1)):
        specs.append((_fast_tile_kernel, tile, {"STORE_LOGITS": False, "TF32": False, "HOLD_E": hold, "SUB": sub,
                                                "BLOCK_R": block_r, "BLOCK_V": block_v, "BLOCK_K": 256},
                      {"num_warps": 8 if hold else 16}))
    return specs
