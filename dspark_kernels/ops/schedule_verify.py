"""dspark::schedule_verify: per-request verify lengths maximising τ·SPS(B), on device."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _validate as V
from .._backend import OpBackends
from ..reference.schedule_verify import schedule_verify as _reference

BACKENDS = OpBackends(
    name="schedule_verify",
    reference=_reference,
    triton="dspark_kernels.triton.schedule_verify:schedule_verify",
    cuda="schedule_verify_cuda",
    # csrc/schedule_verify.cu compiles in CI but has not run on a GPU yet: explicit backend="cuda" only.
    not_auto=("cuda",),
)

torch.library.define(
    "dspark::schedule_verify_cuda",
    "(Tensor survival, Tensor sps, str mode, Tensor? history, Tensor? max_len, Tensor? active)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
)
MODES = ("causal", "async")


class Schedule(NamedTuple):
    lengths: torch.Tensor  # [R] int32 drafts each request verifies
    cu_verify: torch.Tensor  # [R + 1] int32 ragged offsets (inactive rows: 0 rows)
    total: torch.Tensor  # [] int32 verify tokens B = cu_verify[R]
    expected_tokens: torch.Tensor  # [] fp32 expected emitted tokens τ


def _check(survival, sps, mode, history, max_len, active):
    V.tensor("survival", survival, ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    num_req, gamma = survival.shape
    V.tensor("sps", sps, ndim=1, dtypes=(torch.float32, torch.float64))
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    need = num_req * (gamma + 1)
    if sps.shape[0] < need + 1:
        raise ValueError(
            f"sps must cover batches up to R*(γ+1) = {need} tokens (length >= {need + 1}), got {sps.shape[0]}"
        )
    if mode == "async":
        if history is None:
            raise ValueError("mode='async' needs history (the survival of two steps earlier)")
    if history is not None:
        V.tensor("history", history, ndim=2, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        V.shape("history", history, (num_req, gamma))
    if max_len is not None:
        V.tensor("max_len", max_len, ndim=1, dtypes=V.INT_DTYPES)
        V.shape("max_len", max_len, (num_req,))
    if active is not None:
        V.tensor("active", active, ndim=1, dtypes=(torch.bool,))
        V.shape("active", active, (num_req,))
    V.same_device("survival", survival, sps=sps, history=history, max_len=max_len, active=active)


def _check_values(survival, sps, history):
    for name, t in (("survival", survival), ("history", history)):
        if t is None or not t.numel() or not V.value_checks(t):
            continue
        V.finite(name, t)
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"{name} must lie in [0, 1]")
        if t.shape[1] > 1 and bool((t[:, 1:] > t[:, :-1]).any()):
            raise ValueError(f"{name} must be non-increasing along the draft position (a cumulative product)")
    if V.value_checks(sps):
        V.finite("sps", sps)
        if bool((sps < 0).any()):
            raise ValueError("sps must be non-negative steps per second")


@torch.library.custom_op("dspark::schedule_verify", mutates_args=(), device_types=("cpu", "cuda"))
def _op(
    survival: torch.Tensor,
    sps: torch.Tensor,
    mode: str,
    history: Optional[torch.Tensor],
    max_len: Optional[torch.Tensor],
    active: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(survival, sps, mode, history, max_len, active)
    _check_values(survival, sps, history)
    return BACKENDS.run(backend, survival.device.type, survival, sps, mode, history, max_len, active)


@_op.register_fake
def _fake(survival, sps, mode, history, max_len, active, backend):
    _check(survival, sps, mode, history, max_len, active)
    num_req = survival.shape[0]
    return (
        survival.new_empty((num_req,), dtype=torch.int32),
        survival.new_empty((num_req + 1,), dtype=torch.int32),
        survival.new_empty((), dtype=torch.int32),
        survival.new_empty((), dtype=torch.float32),
    )


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

    Math: candidates (r, j) of active requests, j < max_len[r], are worth their
    survival a[r, j]; in order (survival desc, request, position), admitting k
    of them gives B_k = A + k verify tokens and τ_k = A + Σ a expected tokens
    (A = active requests, each verifying its anchor). "causal" (paper Alg. 1)
    admits while τ·sps[B] rises and stops at the first candidate that does not
    raise it; "async" (paper §5.2) picks K = argmax_k τ_k·sps[B_k] over the whole
    path of `history` (survival two steps earlier), then admits the top-K
    candidates by current survival. Admission is prefix-closed per request.

    Args:
        survival: [R, γ] fp32 in [0, 1], non-increasing along γ (Π c_i).
        sps: [Bmax + 1] fp32 steps/second for a verify batch of B tokens;
            Bmax >= R·(γ+1).
        mode: "causal" or "async". history: [R, γ], required for "async".
        max_len: [R] int cap on drafts per request (default γ).
        active: [R] bool; inactive requests verify nothing (0 rows).
        backend: "auto" | "reference" | "triton" | "cuda".

    Returns:
        Schedule(lengths [R] int32, cu_verify [R+1] int32, total [] int32,
        expected_tokens [] fp32), all on the input device; no host sync.
    """
    V.tensor_args(("history", "max_len", "active"), survival=survival, sps=sps, history=history, max_len=max_len,
                  active=active)
    return Schedule(*torch.ops.dspark.schedule_verify(survival, sps, mode, history, max_len, active, backend or ""))
