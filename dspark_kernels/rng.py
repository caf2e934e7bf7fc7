"""Counter-based randomness shared by every backend.

One generator, Philox-4x32-10 (Salmon et al., SC'11), is evaluated from a
128-bit counter and a 64-bit key with no state, so the reference (PyTorch),
Triton and CUDA paths produce the same bits for the same inputs, and a
captured CUDA graph draws fresh numbers whenever the engine bumps ``offset``
on the device.

Key and counter layout (one Philox call yields four 32-bit lanes)::

    key     = (seed & 0xffffffff, seed >> 32)          seed[r], per request
    counter = (index // 4,                             vocab index or draw index
               (stream << 16) | position,              stream id, row inside request
               offset & 0xffffffff, offset >> 32)      offset[], advanced by the engine
    lane    = index % 4

The request index is not part of the counter: a request's draws depend on its
own seed only, never on where it sits in the batch (batch invariance).
``position`` < 2**16 and ``index`` < 2**34 are enforced by the op validators.

Streams never share counters, because sharing them biases the output: the
acceptance coin of a draft and the residual sample drawn after it being
rejected would be correlated (the bug of vllm PRs #47386, #54282).
"""

from __future__ import annotations

import torch

from .constants import (  # noqa: F401  (re-exported: rng.STREAM_* is how callers name streams)
    MAX_INDEX,
    MAX_POSITION,
    MAX_ROWS,
    MAX_STREAM,
    PHILOX_M0,
    PHILOX_M1,
    PHILOX_ROUNDS,
    PHILOX_W0,
    PHILOX_W1,
    STREAM_ACCEPT,
    STREAM_BONUS,
    STREAM_DRAFT,
    STREAM_RESIDUAL,
    STREAM_TREE_ACCEPT,
    STREAM_TREE_RESIDUAL,
    UNIFORM_SCALE,
    UNIFORM_SHIFT,
)

_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # int64 holds the full 64-bit product of two uint32 only up to 2**63; a < 2**32
    # and b < 2**32 can reach 2**64, so split b to keep every partial product exact.
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & _MASK32
    hi = (p_hi + (p_lo >> 16)) >> 16
    return hi & _MASK32, lo


def philox4x32(
    c0: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    c3: torch.Tensor,
    k0: torch.Tensor,
    k1: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding uint32 values (broadcasting).

    Returns the four output lanes as int64 tensors in [0, 2**32).
    """
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(
        *(t.to(torch.int64) & _MASK32 for t in (c0, c1, c2, c3, k0, k1))
    )
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 values (in int64) -> fp32 uniforms (2*(x>>9)+1) * 2**-24 in (0, 1)."""
    return ((bits >> UNIFORM_SHIFT) * 2 + 1).to(torch.float32) * UNIFORM_SCALE


def uniform(
    seed: torch.Tensor,
    offset: torch.Tensor,
    stream: int,
    position: torch.Tensor | int,
    index: torch.Tensor | int,
) -> torch.Tensor:
    """fp32 uniforms in (0, 1) for the counter layout in the module docstring.

    seed, position and index broadcast against each other (int64 tensors);
    offset is a 0-d int64 tensor. Draws are elementwise: the result has the
    broadcast shape. This is the definition every kernel must match bit for bit.
    """
    device = seed.device
    seed = seed.to(torch.int64)
    position = torch.as_tensor(position, dtype=torch.int64, device=device)
    index = torch.as_tensor(index, dtype=torch.int64, device=device)
    off = offset.to(device=device, dtype=torch.int64)
    seed, position, index = torch.broadcast_tensors(seed, position, index)
    lanes = philox4x32(
        index >> 2,
        (position & 0xFFFF) | (stream << 16),
        off & _MASK32,
        (off >> 32) & _MASK32,
        seed & _MASK32,
        (seed >> 32) & _MASK32,
    )
    lane = index & 3
    bits = torch.where(
        lane == 0,
        lanes[0],
        torch.where(lane == 1, lanes[1], torch.where(lane == 2, lanes[2], lanes[3])),
    )
    return bits_to_uniform(bits)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) from uniforms in (0, 1), in fp32.

    argmax(logits + gumbel) is an exact sample from softmax(logits)
    (the Gumbel-max trick); it needs no normaliser, so one pass suffices.
    """
    return -torch.log(-torch.log(u))
