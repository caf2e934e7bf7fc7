"""dspark::schedule_verify: per-request verify lengths maximising τ·SPS(B), on device."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from .. import constants as C
from .._backend import Implementations
from .._op import BOOL, FLOAT64, INT, Op, scalar_tensor, tensor, value
from ..reference.schedule_verify import schedule_verify as _reference

MODES = ("causal", "async")


RESULT_TYPES = ("Schedule",)  # exported by dspark_kernels beside schedule_verify


class Schedule(NamedTuple):
    lengths: torch.Tensor  # [R] int32 drafts each request verifies
    cu_verify: torch.Tensor  # [R + 1] int32 ragged offsets (inactive rows: 0 rows)
    total: torch.Tensor  # [] int32 verify tokens B = cu_verify[R]
    expected_tokens: torch.Tensor  # [] fp32 expected emitted tokens τ


def check_sps_length(sps, dims):
    """sps covers every batch size the path can reach: B_k = A + k <= R·(γ+1)."""
    need = dims["R"] * (dims["G"] + 1)
    if sps.shape[0] < need + 1:
        raise ValueError(
            f"sps must cover batches up to R*(γ+1) = {need} tokens (length >= {need + 1}), got {sps.shape[0]}"
        )


def _check(a, dims):
    check_sps_length(a.sps, dims)
    if a.mode == "async" and (a.history is None) == (a.capacity is None):
        raise ValueError("mode='async' needs exactly one of history (the survival of two steps earlier) and "
                         "capacity (verify_capacity of it), got " + ("both" if a.history is not None else "neither"))
    if a.mode != "async" and a.capacity is not None:
        raise ValueError("capacity is for mode='async' only: mode='causal' decides K from the current survival")


def check_survival_values(name, t):
    """Value checks of a survival table: finite (no NaN), in [0, 1], non-increasing along γ."""
    if t is None or not t.numel():
        return
    _checks.finite(name, t)
    if bool(((t < 0) | (t > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1]")
    if t.shape[1] > 1 and bool((t[:, 1:] > t[:, :-1]).any()):
        raise ValueError(f"{name} must be non-increasing along the draft position (a cumulative product)")


def check_sps_values(sps):
    _checks.finite("sps", sps)
    if bool((sps < 0).any()):
        raise ValueError("sps must be non-negative steps per second")


def _values(a):
    check_survival_values("survival", a.survival)
    check_survival_values("history", a.history)
    check_sps_values(a.sps)
    if a.capacity is not None and int(a.capacity) < 0:
        raise ValueError(f"capacity must be >= 0 (a number of drafts), got {int(a.capacity)}")


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
        scalar_tensor("capacity", INT, optional=True),
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
    capacity: torch.Tensor | None = None,
    backend: str | None = None,
) -> Schedule:
    """Choose how many drafts each request verifies, maximising τ·sps[B].

    Math: the candidates are the drafts (r, j) of active requests with
    j < min(max_len[r], γ) and survival a[r, j] > 0 (paper Alg. 1 line 4,
    E = {(r, j) | a_{r,j} > 0}; compared in fp32, so a NaN is not one either).
    Each is worth its survival (the probability that drafts 1..j+1 are all
    accepted: the expected extra token). They are admitted in one order:
    survival descending, then request, then position (prefix-closed per
    request, since survival is non-increasing along j). Admitting the first k
    of the N candidates gives B_k = A + k verify tokens and τ_k = A +
    Σ_{i<k} a_i expected tokens (A = active requests, each verifying its
    anchor), and Θ_k = τ_k · sps[B_k].
    "causal" (paper Alg. 1): admit while Θ_k > Θ_{k-1} and stop at the first
    candidate that does not raise it (the early stop keeps the decision
    independent of unrealised drafts: paper appendix A).
    "async" (paper §5.2): admit the top min(K, N) candidates by current
    survival, for a capacity K that does not depend on it: either
    ``capacity`` (a device tensor, typically verify_capacity of the survival
    two steps earlier, computed ahead so that the host knows the batch size
    bound A + K in advance), or K = verify_capacity(history, sps,
    max_len=max_len, active=active) computed here (the same K, bit for bit,
    on every backend).
    Static shapes, no host sync: capturable in a CUDA graph.

    Args:
        survival: [R, γ] float (fp64/fp32/fp16/bf16) in [0, 1], non-increasing along γ (Π c_i).
        sps: [Bmax + 1] fp32/fp64 steps/second for a verify batch of B tokens;
            Bmax >= R·(γ+1).
        mode: "causal" or "async".
        history: [R, γ] like survival (survival two steps earlier); read in async
            mode only, exclusive with capacity there.
        max_len: [R] int cap on drafts per request (default γ).
        active: [R] bool; inactive requests verify nothing (0 rows).
        capacity: [] int32/int64 K >= 0 on the device; async only, exclusive with
            history. Unchecked (value checks off): K is clamped to [0, N]; NaN and
            values <= 0 in survival / history are no candidates, +inf ones are.
        backend: "auto" | "reference" | "triton" | "cuda".

    Returns:
        Schedule(lengths [R] int32, cu_verify [R+1] int32, total [] int32,
        expected_tokens [] fp32), all on the input device; no host sync.
        total <= A + K in async mode.

    Examples:
        Paper appendix A: verifying the draft does not pay at this sps table.

        >>> import torch, dspark_kernels as dk
        >>> s = dk.schedule_verify(torch.tensor([[0.8, 0.72]]), torch.tensor([0.0, 1.0, 0.5, 0.45]))
        >>> s.lengths.tolist(), s.cu_verify.tolist(), int(s.total)
        ([0], [0, 1], 1)

        Async with a capacity of 3 drafts: the zero-survival draft is no candidate.

        >>> surv = torch.tensor([[0.9, 0.0], [0.9, 0.8]])
        >>> k = torch.tensor(3, dtype=torch.int32)
        >>> dk.schedule_verify(surv, torch.ones(7), mode="async", capacity=k).lengths.tolist()
        [1, 2]
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
