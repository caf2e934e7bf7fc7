"""dspark::verify_capacity: the async scheduler's capacity K (total drafts admitted), on device."""

from __future__ import annotations

import torch

from .._backend import Implementations
from .._op import BOOL, FLOAT64, INT, Op, tensor
from ..reference.verify_capacity import verify_capacity as _reference
from .schedule_verify import check_sps_length, check_sps_values, check_survival_values


def _check(a, dims):
    check_sps_length(a.sps, dims)


def _values(a):
    check_survival_values("history", a.history)
    check_sps_values(a.sps)


OP = Op(
    "verify_capacity",
    [
        tensor("history", "R, G", FLOAT64),
        tensor("sps", "B", (torch.float32, torch.float64)),
        tensor("max_len", "R", INT, optional=True),
        tensor("active", "R", BOOL, optional=True),
    ],
    "Tensor",
    impls=Implementations(
        "verify_capacity",
        reference=_reference,
        triton="dspark_kernels.triton.verify_capacity:verify_capacity",
    ),
    fake=lambda a: a.history.new_empty((), dtype=torch.int32),
    check=_check,
    values=_values,
)
IMPLS = OP.impls


def verify_capacity(
    history: torch.Tensor,
    sps: torch.Tensor,
    *,
    max_len: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The capacity K of the async scheduler: how many drafts to admit in total, from `history`.

    Math (paper §5.2): the candidates are the drafts (r, j) of active
    requests with j < min(max_len[r], γ) and history[r, j] > 0 (Alg. 1 line
    4; compared in fp32), N' of them, ordered by history descending, then
    flat index r·γ + j. Admitting the first k gives τ'_k = A + Σ_{i<k} a_i
    (A = active requests, a_i the i-th candidate's history) and
    Θ'_k = τ'_k · sps[A + k]; K is the first argmax of Θ'_k over k = 0..N'
    (the smallest best k). schedule_verify(survival, sps, mode="async",
    capacity=K) then admits the top min(K, N) current candidates, exactly as
    schedule_verify(..., mode="async", history=history) does.
    Computed two steps ahead, K tells the host the next verify batch size
    (at most A + K tokens) before the step runs, so the engine can replay the
    CUDA graph of that bucket (dspark_kernels.CapacityPipe reads K on the host
    without blocking). On the device, no host sync, static shapes.

    Args:
        history: [R, γ] float (fp64/fp32/fp16/bf16) in [0, 1], non-increasing along γ
            (the survival of two steps earlier).
        sps: [Bmax + 1] fp32/fp64 steps/second for a verify batch of B tokens;
            Bmax >= R·(γ+1).
        max_len: [R] int cap on drafts per request (default γ).
        active: [R] bool; inactive requests contribute nothing and are not counted in A.
        backend: "auto" | "reference" | "triton".

    Returns:
        K: [] int32 in [0, N'] on the input device.

    Examples:
        Paper appendix A: with sps [0, 1, 0.5, 0.45], Θ' = (1.0, 0.9, 1.134):
        both drafts pay together; a less confident history buys none.

        >>> import torch, dspark_kernels as dk
        >>> sps = torch.tensor([0.0, 1.0, 0.5, 0.45])
        >>> int(dk.verify_capacity(torch.tensor([[0.8, 0.72]]), sps))
        2
        >>> int(dk.verify_capacity(torch.tensor([[0.8, 0.16]]), sps))
        0
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of verify_capacity (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(1)
    hist = torch.cumprod(0.5 + 0.5 * torch.rand(4, 3, generator=g), 1)
    sps = 1.0 / torch.clamp(torch.arange(17, dtype=torch.float32) / 6.0, min=1.0)
    return dict(history=hist.to(device), sps=sps.to(device),
                max_len=torch.tensor([3, 1, 2, 3], dtype=torch.int32, device=device),
                active=torch.tensor([True, True, False, True], device=device))
