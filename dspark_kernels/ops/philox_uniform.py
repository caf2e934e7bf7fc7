"""dspark::philox_uniform: the shared counter-based RNG as an op.

Used by tests to prove that the reference, Triton and CUDA paths produce the
same bits, and by engines that need uniforms on the same streams.
"""

from __future__ import annotations

import torch

from .. import rng
from .._backend import Implementations
from .._op import INT64, Op, scalar_tensor, tensor, value
from ..reference.philox_uniform import philox_uniform as _reference


def _check(a, dims):
    if dims["R"] >= rng.MAX_ROWS:
        raise ValueError(f"seed may hold at most {rng.MAX_ROWS - 1} rows, got {dims['R']}")


OP = Op(
    "philox_uniform",
    [
        tensor("seed", "R", INT64),
        scalar_tensor("offset", INT64),
        value("stream", "int", lo=0, hi=rng.MAX_STREAM - 1),
        value("position", "int", lo=0, hi=rng.MAX_POSITION - 1, default=0),
        value("n", "int", lo=0, hi=rng.MAX_INDEX - 1),
    ],
    "Tensor",
    impls=Implementations(
        "philox_uniform",
        reference=_reference,
        triton="dspark_kernels.triton.philox_uniform:philox_uniform",
        cuda="philox_uniform_cuda",
        not_auto=("cuda",),  # csrc/philox_uniform.cu compiles in CI but has not run on a GPU yet
    ),
    fake=lambda a: a.seed.new_empty((a.seed.shape[0], a.n), dtype=torch.float32),
    check=_check,
)
IMPLS = OP.impls


def philox_uniform(
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    stream: int,
    position: int = 0,
    n: int,
    backend: str | None = None,
) -> torch.Tensor:
    """u[r, i] = Philox-4x32-10 uniform for (seed[r], offset, stream, position, i).

    Math: key (seed[r] low, high 32 bits), counter (i // 4, stream << 16 |
    position, offset low, high), lane i % 4 of the output; the 32-bit lane x
    becomes u = (2 (x >> 9) + 1) * 2**-24, so 0 < u < 1 exactly
    (dspark_kernels.rng documents the layout). Every sampler of the package
    draws its uniforms this way.

    Args:
        seed: [R] int64, one key per request (R < 65536).
        offset: [] int64 device tensor (the engine advances it per round).
        stream: stream id (dspark_kernels.rng.STREAM_*), in [0, 2**16).
        position: row inside the request, in [0, 2**16).
        n: uniforms per request, in [0, 2**34).
        backend: "auto" | "reference" | "triton" | "cuda" (default: DSPARK_BACKEND or auto).

    Returns:
        [R, n] float32.

    Examples:
        >>> import torch, dspark_kernels as dk
        >>> u = dk.philox_uniform(torch.tensor([7]), torch.tensor(0), stream=1, n=4)
        >>> u.shape, bool(((u > 0) & (u < 1)).all())
        (torch.Size([1, 4]), True)
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of philox_uniform (tests, overhead benchmark)."""
    return dict(seed=torch.arange(3, dtype=torch.int64, device=device) + 5,
                offset=torch.tensor(2, dtype=torch.int64, device=device), stream=rng.STREAM_ACCEPT, position=1, n=9)
