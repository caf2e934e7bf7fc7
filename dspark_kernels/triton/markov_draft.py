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
from ..reference.markov_draft import Steps, draft_block
from . import rng
from .sampling import greedy_and_inverse, scaled_tile_mul, softmax_stats

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
    g = rng.gumbel(rng.uniform(seed[:, None], offset, STREAM_DRAFT, step, cols64[None, :]))
    score = tl.where(ok, zt + g, float("-inf"))
    best, best_i = tl.max(score, 1, return_indices=True, return_indices_tie_break_left=True)
    z_best = tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == best_i[:, None], z, 0.0), 1)
    m = tl.max(zt, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    ssum = tl.sum(tl.where(ok, tl.exp(zt - m_safe[:, None]), 0.0), 1)
    gmax, g_i = tl.max(z, 1, return_indices=True, return_indices_tie_break_left=True)

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
    r = tl.program_id(0)
    greedy, inv_t = greedy_and_inverse(tl.load(temp_ptr + r))
    base = r.to(tl.int64) * num_tiles
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
        tile_best, i = tl.max(sc, 0, return_indices=True, return_indices_tie_break_left=True)
        # Tiles are in vocab order, so a strict > keeps the first index on ties.
        better = tile_best > best
        sel = tl.arange(0, BLOCK_T) == i
        best_arg = tl.where(better, tl.sum(tl.where(sel, tl.load(part_arg_ptr + base + idx, mask=ok, other=0), 0), 0), best_arg)
        z_best = tl.where(better, tl.sum(tl.where(sel, tl.load(part_zbest_ptr + base + idx, mask=ok, other=0.0), 0.0), 0), z_best)
        best = tl.where(better, tile_best, best)
        gm = tl.load(part_gmax_ptr + base + idx, mask=ok, other=float("-inf"))
        tile_g, gi = tl.max(gm, 0, return_indices=True, return_indices_tie_break_left=True)
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
    return draft_block(a, STEPS)


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
    ] + [(_step_reduce_kernel, reduce, {"BLOCK_T": 1024}), (_probs_kernel, probs, {"BLOCK": 1024})]
