"""Philox-4x32-10 in Triton, bit-identical to dspark_kernels.rng (see its layout)."""

import triton
import triton.language as tl


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds on uint32 tensors; returns the four output lanes."""
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(a0, 0xD2511F53) ^ c3 ^ k1
        c1 = a2 * 0xCD9E8D57
        c3 = a0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
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
    k = (bits >> 9).to(tl.int32)
    return (k * 2 + 1).to(tl.float32) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def gumbel(u):
    """-log(-log(u)) in fp32: argmax(log w + gumbel) is an exact draw from w."""
    return -tl.log(-tl.log(u))
