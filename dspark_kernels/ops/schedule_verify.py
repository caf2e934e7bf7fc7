"""dspark::schedule_verify: per-request verify lengths maximising τ·SPS(B), on device."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from .. import constants as C
from .._backend import Implementations
from .._op import BOOL, FLOAT64, INT, Op, tensor, value
from ..reference.schedule_verify import schedule_verify as _reference

MODES = ("causal", "async")


RESULT_TYPES = ("Schedule",)  # exported by dspark_kernels beside schedule_verify


class Schedule(NamedTuple):
    lengths: torch.Tensor  # [R] int32 drafts each request verifies
    cu_verify: torch.Tensor  # [R + 1] int32 ragged offsets (inactive rows: 0 rows)
    total: torch.Tensor  # [] int32 verify tokens B = cu_verify[R]
    expected_tokens: torch.Tensor  # [] fp32 expected emitted tokens τ


def _check(a, dims):
    need = dims["R"] * (dims["G"] + 1)
    if a.sps.shape[0] < need + 1:
        raise ValueError(
            f"sps must cover batches up to R*(γ+1) = {need} tokens (length >= {need + 1}), got {a.sps.shape[0]}"
        )
    if a.mode == "async" and a.history is None:
        raise ValueError("mode='async' needs history (the survival of two steps earlier)")


def _values(a):
    for name, t in (("survival", a.survival), ("history", a.history)):
        if t is None or not t.numel():
            continue
        _checks.finite(name, t)
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"{name} must lie in [0, 1]")
        if t.shape[1] > 1 and bool((t[:, 1:] > t[:, :-1]).any()):
            raise ValueError(f"{name} must be non-increasing along the draft position (a cumulative product)")
    _checks.finite("sps", a.sps)
    if bool((a.sps < 0).any()):
        raise ValueError("sps must be non-negative steps per second")


def _fake(a):
    num_req = a.survival.shape[0]
    return (
        a.survival.new_empty((num_req,), dtype=torch.int32),
        a.survival.new_empty((num_req + 1,), dtype=torch.int32),
        a.survival.new_empty((), dtype=torch.int32),
        a.survival.new_empty((), dtype=torch.float32),
    )


OP = Op(
    "schedule_verify",
    [
        tensor("survival", "R, G", FLOAT64),
        tensor("sps", "B", (torch.float32, torch.float64)),
        value("mode", "str", choices=MODES, default="causal"),
        tensor("history", "R, G", FLOAT64, optional=True),
        tensor("max_len", "R", INT, optional=True),
        tensor("active", "R", BOOL, optional=True),
    ],
    "(Tensor, Tensor, Tensor, Tensor)",
    impls=Implementations(
        "schedule_verify",
        reference=_reference,
        triton="dspark_kernels.triton.schedule_verify:schedule_verify",
        cuda="dspark_kernels.ops.schedule_verify:schedule_verify_cuda",
        not_auto=("cuda",),  # csrc/schedule_verify.cu compiles in CI but has not run on a GPU yet
    ),
    fake=_fake,
    check=_check,
    values=_values,
    wrap=lambda out, kw: Schedule(*out),
    kernel_op="schedule_verify_cuda",
)
IMPLS = OP.impls


def schedule_verify_cuda(a):
    """csrc/schedule_verify.cu: one thread block sorts every candidate, so R·γ is bounded."""
    n = a.survival.shape[0] * a.survival.shape[1]
    if n > C.SCHEDULE_MAX_CANDIDATES:
        raise ValueError(f"the CUDA schedule_verify sorts every candidate in one thread block: at most R*γ = "
                         f"{C.SCHEDULE_MAX_CANDIDATES}, got {n} (use backend='reference' for larger batches)")
    return torch.ops.dspark.schedule_verify_cuda(*a)


def schedule_verify(
    survival: torch.Tensor,
    sps: torch.Tensor,
    *,
    mode: str = "causal",
    history: torch.Tensor | None = None,
    max_len: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
    backend: str | None = None,
) -> Schedule:
    """Choose how many drafts each request verifies, maximising τ·sps[B].

    Math: candidates (r, j) of active requests, j < min(max_len[r], γ), are
    worth their survival a[r, j] (the probability that drafts 1..j+1 are all
    accepted: the expected extra token). They are admitted in one order:
    survival descending, then request, then position (prefix-closed per
    request, since survival is non-increasing along j). Admitting the first k
    gives B_k = A + k verify tokens and τ_k = A + Σ_{i<k} a_i expected tokens
    (A = active requests, each verifying its anchor).
    "causal" (paper Alg. 1): admit while τ_k·sps[B_k] > τ_{k-1}·sps[B_{k-1}]
    and stop at the first candidate that does not raise it (the early stop
    keeps the decision independent of unrealised drafts: paper appendix A).
    "async" (paper §5.2): K = argmax_k τ'_k·sps[B_k] over the whole admission
    path of `history` (survival two steps earlier; first maximum on ties),
    then admit the top-K candidates by current survival.
    Static shapes, no host sync: capturable in a CUDA graph.

    Args:
        survival: [R, γ] float (fp64/fp32/fp16/bf16) in [0, 1], non-increasing along γ (Π c_i).
        sps: [Bmax + 1] fp32/fp64 steps/second for a verify batch of B tokens;
            Bmax >= R·(γ+1).
        mode: "causal" or "async". history: [R, γ], required for "async".
        max_len: [R] int cap on drafts per request (default γ).
        active: [R] bool; inactive requests verify nothing (0 rows).
        backend: "auto" | "reference" | "triton" | "cuda".

    Returns:
        Schedule(lengths [R] int32, cu_verify [R+1] int32, total [] int32,
        expected_tokens [] fp32), all on the input device; no host sync.

    Examples:
        Paper appendix A: verifying the draft does not pay at this sps table.

        >>> import torch, dspark_kernels as dk
        >>> s = dk.schedule_verify(torch.tensor([[0.8, 0.72]]), torch.tensor([0.0, 1.0, 0.5, 0.45]))
        >>> s.lengths.tolist(), s.cu_verify.tolist(), int(s.total)
        ([0], [0, 1], 1)
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of schedule_verify (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(0)
    surv = torch.cumprod(0.5 + 0.5 * torch.rand(4, 3, generator=g), 1)
    hist = torch.cumprod(0.5 + 0.5 * torch.rand(4, 3, generator=g), 1)
    sps = 1.0 / torch.clamp(torch.arange(17, dtype=torch.float32) / 6.0, min=1.0)
    return dict(survival=surv.to(device), sps=sps.to(device), mode="async", history=hist.to(device),
                max_len=torch.tensor([3, 1, 2, 3], dtype=torch.int32, device=device),
                active=torch.tensor([True, True, False, True], device=device))
