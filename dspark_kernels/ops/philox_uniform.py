"""dspark::philox_uniform: the shared counter-based RNG as an op.

Used by tests to prove that the reference, Triton and CUDA paths produce the
same bits, and by engines that need uniforms on the same streams.
"""

from __future__ import annotations

import torch

from .. import _validate as V
from .. import rng
from .._backend import OpBackends
from ..reference.philox_uniform import philox_uniform as _reference

BACKENDS = OpBackends(
    name="philox_uniform",
    reference=_reference,
    triton="dspark_kernels.triton.philox_uniform:philox_uniform",
    cuda="philox_uniform_cuda",
    # csrc/philox_uniform.cu compiles in CI but has not run on a GPU yet: explicit backend="cuda" only.
    not_auto=("cuda",),
)

torch.library.define(
    "dspark::philox_uniform_cuda",
    "(Tensor seed, Tensor offset, int stream, int position, int n) -> Tensor",
)


def _check(seed, offset, stream, position, n):
    V.tensor("seed", seed, ndim=1, dtypes=(torch.int64,))
    V.scalar_tensor("offset", offset, (torch.int64,))
    V.same_device("seed", seed, offset=offset)
    if not 0 <= stream < rng.MAX_STREAM:
        raise ValueError(f"stream must be in [0, {rng.MAX_STREAM}), got {stream}")
    if not 0 <= position < rng.MAX_POSITION:
        raise ValueError(f"position must be in [0, {rng.MAX_POSITION}), got {position}")
    if not 0 <= n < (1 << 34):
        raise ValueError(f"n must be in [0, 2**34), got {n}")
    if seed.shape[0] >= 65536:
        raise ValueError(f"seed may hold at most 65535 rows, got {seed.shape[0]}")


@torch.library.custom_op("dspark::philox_uniform", mutates_args=(), device_types=("cpu", "cuda"))
def _op(seed: torch.Tensor, offset: torch.Tensor, stream: int, position: int, n: int, backend: str) -> torch.Tensor:
    _check(seed, offset, stream, position, n)
    return BACKENDS.run(backend, seed.device.type, seed, offset.reshape(()), stream, position, n)


@_op.register_fake
def _fake(seed, offset, stream, position, n, backend):
    _check(seed, offset, stream, position, n)
    return seed.new_empty((seed.shape[0], n), dtype=torch.float32)


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

    Each value is (2k + 1) * 2**-24 for a 23-bit k, so 0 < u < 1 exactly; the
    key/counter layout is documented in dspark_kernels.rng.

    Args:
        seed: [R] int64, one key per request.
        offset: [] int64 device tensor (the engine advances it per round).
        stream: stream id (dspark_kernels.rng.STREAM_*), < 2**16.
        position: row inside the request, < 2**16.
        n: uniforms per request.
        backend: "auto" | "reference" | "triton" | "cuda" (default: DSPARK_BACKEND or auto).

    Returns:
        [R, n] float32.
    """
    V.tensor_args(seed=seed, offset=offset)
    return torch.ops.dspark.philox_uniform(seed, offset, stream, position, n, backend or "")
