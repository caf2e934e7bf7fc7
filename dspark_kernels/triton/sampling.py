"""Sampling building blocks of the Triton kernels: the twin of csrc/sampling.cuh.

The formulas are the reference's (dspark_kernels/reference/sampling.py):
z = logit / T by IEEE round-to-nearest division (tl.math.div_rn, as torch
divides), rows below GREEDY_TEMPERATURE greedy with their statistics taken at
T = 1, ties of an argmax won by the first index (torch.argmax), and float
comparisons done on the order-preserving integer image of fp32 where a
search needs integers.
"""

import triton
import triton.language as tl

from .. import constants as C

GREEDY_TEMPERATURE = tl.constexpr(C.GREEDY_TEMPERATURE)


@triton.jit
def greedy_and_scale(temperature):
    """(greedy?, the temperature to divide by: 1 on greedy rows)."""
    t = temperature.to(tl.float32)
    greedy = t < GREEDY_TEMPERATURE
    return greedy, tl.where(greedy, 1.0, t)


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
def argmax_update(best, best_idx, scores, v0):
    """Running first-index argmax over tiles starting at v0 (strict > keeps the earlier tile)."""
    tile_best, tile_idx = tl.max(scores, 0, return_indices=True, return_indices_tie_break_left=True)
    better = tile_best > best
    return tl.where(better, tile_best, best), tl.where(better, v0 + tile_idx, best_idx)


@triton.jit
def scaled_tile(base, idx, mask, t):
    """z = row[idx] / t in fp32 for a tile of any float dtype; -inf where not mask."""
    return tl.math.div_rn(tl.load(base + idx, mask=mask, other=float("-inf")).to(tl.float32), t)


@triton.jit
def softmax_stats(base, vocab, t, valid, BLOCK: tl.constexpr):
    """(max, normaliser, first argmax) of z = row / t over one row (no reads unless valid)."""
    offs = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    amax = tl.full((), 0, tl.int32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        m, amax = argmax_update(m, amax, scaled_tile(base, idx, (idx < vocab) & valid, t), v0)
    s = tl.full((), 0.0, tl.float32)
    for v0 in range(0, vocab, BLOCK):
        idx = v0 + offs
        z = scaled_tile(base, idx, (idx < vocab) & valid, t)
        s += tl.sum(tl.where((idx < vocab) & valid, tl.exp(z - m), 0.0), 0)
    return m, s, amax
