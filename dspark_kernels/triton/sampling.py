"""Sampling building blocks of the Triton kernels: the twin of csrc/sampling.cuh.

The formulas are the reference's (dspark_kernels/reference/sampling.py):
z = logit · (1 / T) with the reciprocal IEEE-rounded once per row (as torch
computes 1.0 / t), rows below GREEDY_TEMPERATURE greedy with their statistics
taken at T = 1, ties of an argmax won by the first index (torch.argmax), and float
comparisons done on the order-preserving integer image of fp32 where a
search needs integers.
"""

import triton
import triton.language as tl

from .. import constants as C

GREEDY_TEMPERATURE = tl.constexpr(C.GREEDY_TEMPERATURE)


@triton.jit
def ordered_key(x):
    """Monotone int32 image of fp32: a < b (no NaN) iff key(a) < key(b) (negative floats flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def key_to_float(key):
    """Inverse of ordered_key; takes the key in int64 (bisection midpoints need 33 bits)."""
    k32 = key.to(tl.int32)
    return tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def no_nan(x):
    """NaN as -inf: a NaN score or logit (only on the unchecked path) never wins and never poisons a max."""
    return tl.where(x == x, x, float("-inf"))


@triton.jit
def argmax_update(best, best_idx, scores, v0):
    """Running first-index argmax over tiles starting at v0 (strict > keeps the earlier tile)."""
    tile_best, tile_idx = tl.max(no_nan(scores), 0, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, (v0 + tile_idx).to(best_idx.dtype), best_idx)


@triton.jit
def greedy_and_inverse(temperature):
    """(greedy?, 1 / T: the multiplier of the logits, 1 on greedy rows); the reciprocal is IEEE-rounded
    once per row, so z = logit * (1 / T) is the reference's product on every element."""
    t = temperature.to(tl.float32)
    greedy = t < GREEDY_TEMPERATURE
    return greedy, tl.where(greedy, 1.0, tl.math.div_rn(1.0, tl.where(greedy, 1.0, t)))


@triton.jit
def scaled_tile_mul(base, idx, mask, inv_t):
    """z = row[idx] * (1 / T) in fp32 for a tile of any float dtype; -inf where not mask."""
    return tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_t


@triton.jit
def online_softmax_update(m, s, amax, z, v0):
    """One tile into the running (max, sum of exp(z - max), first argmax) of a row: a single pass."""
    z = no_nan(z)
    tile_max, tile_idx = tl.max(z, 0, return_indices=True, return_indices_tie_break_left=True)
    better = tile_max > m
    m_new = tl.maximum(m, tile_max)
    # -inf lanes add nothing; while the max is still -inf (no finite logit yet) the sum stays 0.
    tile_sum = tl.sum(tl.where(z > float("-inf"), tl.exp(z - m_new), 0.0), 0)
    s = tl.where(m_new > float("-inf"), s * tl.exp(m - m_new) + tile_sum, 0.0)
    return m_new, s, tl.where(better, (v0 + tile_idx).to(amax.dtype), amax)


@triton.jit
def softmax_stats(base, vocab, inv_t, BLOCK: tl.constexpr):
    """(max, normaliser, first argmax) of z = row · (1 / T) over one row, in one pass."""
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.full((), 0.0, tl.float32)
    amax = tl.full((), 0, tl.int32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        m, s, amax = online_softmax_update(m, s, amax, scaled_tile_mul(base, idx, idx < vocab, inv_t), v0)
    return m, s, amax
