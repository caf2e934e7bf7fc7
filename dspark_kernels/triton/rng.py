"""Philox-4x32-10 in Triton: implements dspark_kernels.rng bit for bit (the layout is documented there)."""

import triton
import triton.language as tl

from .. import constants as C

_M0 = tl.constexpr(C.PHILOX_M0)
_M1 = tl.constexpr(C.PHILOX_M1)
_W0 = tl.constexpr(C.PHILOX_W0)
_W1 = tl.constexpr(C.PHILOX_W1)
_ROUNDS = tl.constexpr(C.PHILOX_ROUNDS)
_SHIFT = tl.constexpr(C.UNIFORM_SHIFT)
_SCALE = tl.constexpr(C.UNIFORM_SCALE)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; returns the four output lanes."""
    for _ in tl.static_range(_ROUNDS):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, _M1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, _M0) ^ c3 ^ k1
        c1 = a2 * _M1
        c3 = a0 * _M0
        k0 = k0 + _W0
        k1 = k1 + _W1
    return c0, c1, c2, c3


@triton.jit
def uniform(seed, offset, stream, position, index):
    """fp32 uniforms (2*(x>>9)+1) * 2**-24 for int64 seed/offset/position/index.

    Arguments broadcast; ``stream`` may be a constant or a runtime value.
    """
    # Adding an int64 zero promotes plain ints (loop counters) and narrower ints alike.
    zero = tl.zeros((), tl.int64)
    seed = seed + zero
    offset = offset + zero
    index = index + zero
    position = position + zero
    c0 = (index >> 2).to(tl.uint32)
    c1 = ((position & 0xFFFF) | (stream * 65536)).to(tl.uint32)
    c2 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, k0, k1)
    lane = index & 3
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    k = (bits >> _SHIFT).to(tl.int32)
    return (k * 2 + 1).to(tl.float32) * _SCALE


@triton.jit
def gumbel(u):
    """-log(-log(u)) in fp32: argmax(log w + gumbel) is an exact draw from w."""
    return -tl.log(-tl.log(u))


@triton.jit
def _counter(seed, offset, stream, position, index4):
    """The Philox counter and key of (seed, offset, stream, position) for blocks index4 (= index // 4)."""
    zero = tl.zeros((), tl.int64)
    seed = seed + zero
    offset = offset + zero
    position = position + zero
    c0 = (index4 + zero).to(tl.uint32)
    c1 = ((position & 0xFFFF) | (stream * 65536)).to(tl.uint32)
    c2 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return c0, c1, c2, c3, k0, k1


@triton.jit
def _to_uniform(bits):
    return ((bits >> _SHIFT).to(tl.int32) * 2 + 1).to(tl.float32) * _SCALE


@triton.jit
def uniform_tile(seed, offset, stream, position, v0, BLOCK: tl.constexpr):
    """[BLOCK] uniforms of indices v0 .. v0 + BLOCK - 1 (v0 a multiple of 4): the same values as
    uniform(..., index), from one Philox block per 4 lanes instead of one per lane."""
    index4 = v0 // 4 + tl.arange(0, BLOCK // 4)
    c0, c1, c2, c3, k0, k1 = _counter(seed, offset, stream, position, index4)
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, k0, k1)
    # Lane l of block c is index 4c + l: interleave the four outputs.
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
    return _to_uniform(bits)


@triton.jit
def uniform_tile_rows(seed, offset, stream, position, v0, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """[ROWS, BLOCK] uniforms for per-row keys seed [ROWS, 1] (position scalar or [ROWS, 1]) and
    indices v0 .. v0 + BLOCK - 1 (v0 a multiple of 4): one Philox block per 4 lanes."""
    index4 = v0 // 4 + tl.arange(0, BLOCK // 4)[None, :]
    c0, c1, c2, c3, k0, k1 = _counter(seed, offset, stream, position, index4)
    c1 = c1 + tl.zeros((ROWS, BLOCK // 4), tl.uint32)
    c0 = c0 + tl.zeros((ROWS, BLOCK // 4), tl.uint32)
    r0, r1, r2, r3 = philox4x32(c0, c1, c2, c3, k0, k1)
    bits = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [ROWS, BLOCK])
    return _to_uniform(bits)
