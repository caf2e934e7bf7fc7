"""dspark::rejection_sample: lossless chain verification of a drafted block."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from .._backend import OpBackends
from ..reference.rejection_sample import rejection_sample as _reference

BACKENDS = OpBackends(
    name="rejection_sample",
    reference=_reference,
    triton="dspark_kernels.triton.rejection_sample:rejection_sample",
    cuda="rejection_sample_cuda",
    # csrc/rejection_sample.cu compiles in CI but has not run on a GPU yet: explicit backend="cuda" only.
    not_auto=("cuda",),
)

torch.library.define(
    "dspark::rejection_sample_cuda",
    "(Tensor target_logits, Tensor draft_tokens, Tensor? draft_probs, Tensor lengths, "
    "Tensor cu_verify, Tensor temperature, Tensor seed, Tensor offset, Tensor? top_k, "
    "Tensor? top_p, Tensor? draft_token_probs, Tensor? draft_logits, "
    "Tensor? draft_temperature) -> (Tensor, Tensor)",
)


def _check(
    target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed, offset,
    top_k, top_p, draft_token_probs, draft_logits, draft_temperature,
):
    """Metadata checks (no device reads); see _check_values for the rest."""
    V.tensor("target_logits", target_logits, ndim=2, dtypes=V.FLOAT_DTYPES)
    V.tensor("draft_tokens", draft_tokens, ndim=2, dtypes=V.INT_DTYPES)
    num_rows, vocab = target_logits.shape
    num_req, gamma = draft_tokens.shape
    if vocab < 1:
        raise ValueError("target_logits must have a vocab dimension of at least 1")
    if gamma >= 65535:
        raise ValueError(f"draft_tokens allows at most 65534 drafts per request, got {gamma}")
    V.tensor("lengths", lengths, ndim=1, dtypes=V.INT_DTYPES)
    V.shape("lengths", lengths, (num_req,))
    V.tensor("cu_verify", cu_verify, ndim=1, dtypes=V.INT_DTYPES)
    V.shape("cu_verify", cu_verify, (num_req + 1,))
    V.tensor("temperature", temperature, ndim=1, dtypes=V.FLOAT_DTYPES + (torch.float64,))
    V.shape("temperature", temperature, (num_req,))
    V.tensor("seed", seed, ndim=1, dtypes=(torch.int64,))
    V.shape("seed", seed, (num_req,))
    V.scalar_tensor("offset", offset, (torch.int64,))
    if top_k is not None:
        V.tensor("top_k", top_k, ndim=1, dtypes=V.INT_DTYPES)
        V.shape("top_k", top_k, (num_req,))
    if top_p is not None:
        V.tensor("top_p", top_p, ndim=1, dtypes=V.FLOAT_DTYPES + (torch.float64,))
        V.shape("top_p", top_p, (num_req,))
    if draft_probs is not None:
        if draft_token_probs is not None or draft_logits is not None:
            raise ValueError(
                "give either draft_probs or the draft_token_probs/draft_logits pair, not both"
            )
        V.tensor("draft_probs", draft_probs, ndim=3, dtypes=V.FLOAT_DTYPES)
        if draft_probs.shape[-1] != vocab:
            raise ValueError(
                f"draft_probs has vocab size {draft_probs.shape[-1]} but target_logits has {vocab}"
            )
        V.shape("draft_probs", draft_probs, (num_req, gamma, vocab))
    if draft_token_probs is not None:
        if draft_logits is None:
            raise ValueError(
                "draft_token_probs needs draft_logits: the residual at a rejection is computed from them"
            )
        V.tensor("draft_token_probs", draft_token_probs, ndim=2, dtypes=V.FLOAT_DTYPES)
        V.shape("draft_token_probs", draft_token_probs, (num_req, gamma))
    if draft_logits is not None:
        V.tensor("draft_logits", draft_logits, ndim=3, dtypes=V.FLOAT_DTYPES)
        if draft_logits.shape[-1] != vocab:
            raise ValueError(
                f"draft_logits has vocab size {draft_logits.shape[-1]} but target_logits has {vocab}"
            )
        V.shape("draft_logits", draft_logits, (num_req, gamma, vocab))
    if draft_temperature is not None:
        if draft_logits is None:
            raise ValueError("draft_temperature is used only with draft_logits")
        V.tensor("draft_temperature", draft_temperature, ndim=1, dtypes=V.FLOAT_DTYPES + (torch.float64,))
        V.shape("draft_temperature", draft_temperature, (num_req,))
    V.same_device(
        "target_logits", target_logits, draft_tokens=draft_tokens, draft_probs=draft_probs,
        lengths=lengths, cu_verify=cu_verify, temperature=temperature, seed=seed, offset=offset,
        top_k=top_k, top_p=top_p, draft_token_probs=draft_token_probs, draft_logits=draft_logits,
        draft_temperature=draft_temperature,
    )


def _check_values(
    target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed, offset,
    top_k, top_p, draft_token_probs, draft_logits, draft_temperature,
):
    """Checks that read values: always on CPU, on CUDA only in debug mode."""
    if not V.value_checks(target_logits) or draft_tokens.shape[0] == 0:
        return
    num_rows, vocab = target_logits.shape
    gamma = draft_tokens.shape[1]
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > gamma:
        raise ValueError(f"lengths must lie in [0, {gamma}] (gamma = draft_tokens.shape[1]), got min {lo}, max {hi}")
    cu = cu_verify.to(torch.int64)
    rows = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or not bool(((rows == lengths.to(torch.int64) + 1) | (rows == 0)).all()):
        raise ValueError(
            "cu_verify must start at 0 and grow by lengths + 1 per request "
            "(anchor + drafts), or by 0 for an inactive request"
        )
    if int(cu[-1]) > num_rows:
        raise ValueError(f"target_logits has {num_rows} rows but cu_verify needs {int(cu[-1])}")
    pos = torch.arange(gamma, device=draft_tokens.device)
    live = pos[None, :] < lengths[:, None]
    V.ids_in_range("draft_tokens", draft_tokens[live], vocab)
    used = target_logits[: int(cu[-1])]
    V.not_nan("target_logits", used)
    if used.numel():
        if bool(torch.isposinf(used).any()):
            raise ValueError("target_logits contains +Inf")
        if bool((used.amax(dim=-1) == float("-inf")).any()):
            raise ValueError("target_logits has a row with no finite logit")
    V.finite("temperature", temperature)
    if bool((temperature < 0).any()):
        raise ValueError("temperature must be >= 0 (0 means greedy)")
    if top_p is not None:
        V.not_nan("top_p", top_p)
        if bool(((top_p <= 0) | (top_p > 1)).any()):
            raise ValueError("top_p must lie in (0, 1]")
    if draft_probs is not None:
        V.finite("draft_probs", draft_probs)
        if bool((draft_probs < 0).any()):
            raise ValueError("draft_probs must be non-negative")
    if draft_token_probs is not None:
        V.finite("draft_token_probs", draft_token_probs)
        if bool((draft_token_probs[live] <= 0).any()) or bool((draft_token_probs > 1).any()):
            raise ValueError("draft_token_probs of live drafts must lie in (0, 1]")
    if draft_logits is not None:
        V.not_nan("draft_logits", draft_logits)
    if draft_temperature is not None:
        V.finite("draft_temperature", draft_temperature)
        if bool((draft_temperature < 0).any()):
            raise ValueError("draft_temperature must be >= 0 (0 means greedy)")


@torch.library.custom_op("dspark::rejection_sample", mutates_args=(), device_types=("cpu", "cuda"))
def _op(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    lengths: torch.Tensor,
    cu_verify: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    top_k: Optional[torch.Tensor],
    top_p: Optional[torch.Tensor],
    draft_token_probs: Optional[torch.Tensor],
    draft_logits: Optional[torch.Tensor],
    draft_temperature: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed,
            offset, top_k, top_p, draft_token_probs, draft_logits, draft_temperature)
    _check(*args)
    args = args[:7] + (offset.reshape(()),) + args[8:]
    _check_values(*args)
    return BACKENDS.run(backend, target_logits.device.type, *args)


@_op.register_fake
def _fake(target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed, offset,
          top_k, top_p, draft_token_probs, draft_logits, draft_temperature, backend):
    _check(target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed, offset,
           top_k, top_p, draft_token_probs, draft_logits, draft_temperature)
    num_req, gamma = draft_tokens.shape
    return (
        draft_tokens.new_empty((num_req, gamma + 1), dtype=torch.int32),
        draft_tokens.new_empty((num_req,), dtype=torch.int32),
    )


def rejection_sample(
    target_logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    lengths: torch.Tensor,
    cu_verify: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    draft_token_probs: torch.Tensor | None = None,
    draft_logits: torch.Tensor | None = None,
    draft_temperature: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless chain verification: accept a prefix of the drafts, then one more token.

    Math (per request r, l = lengths[r], p_j the target distribution of row
    cu_verify[r] + j after temperature/top-k/top-p, q_j the draft distribution
    of draft j): accept draft x_j with probability min(1, p_{j-1}(x_j) / q_j(x_j));
    at the first rejection emit a sample of norm(max(0, p_{j-1} - q_j)) (p_{j-1}
    if that has no mass); if all l are accepted emit a bonus sample of p_l.
    Temperature 0 rows are greedy: accept while x_j == argmax p_{j-1}, then emit
    that argmax. The emitted tokens follow the target distribution exactly.

    Args:
        target_logits: [T, V] bf16/fp16/fp32; row cu_verify[r] + j is the target's
            prediction after the anchor and drafts 1..j of request r. Rows past
            cu_verify[R] are ignored (static padded batches).
        draft_tokens: [R, γ] int32/int64; entries past lengths[r] are ignored.
        draft_probs: [R, γ, V] float, the exact distributions the drafts were
            sampled from, or None for one-hot drafts (or with draft_logits).
        lengths: [R] int32 in [0, γ], drafts to verify per request.
        cu_verify: [R + 1] int32, cu_verify[r+1] - cu_verify[r] = lengths[r] + 1,
            or 0 for an inactive request (which then emits nothing).
        temperature: [R] float, target temperature; T < 1e-5 (e.g. 0) = greedy.
        seed: [R] int64 per-request Philox key. offset: [] int64 device tensor.
        top_k: [R] int, <= 0 or >= V disables. top_p: [R] float in (0, 1], 1 disables.
        draft_token_probs: [R, γ] float, p_d of each draft (byte-minimal mode,
            together with draft_logits).
        draft_logits: [R, γ, V] float, pre-temperature draft logits; q is their
            softmax at draft_temperature ([R], default temperature).
        backend: "auto" | "reference" | "triton" | "cuda" (default: DSPARK_BACKEND or auto).

    Returns:
        tokens [R, γ + 1] int32 (accepted drafts, then the residual/bonus token,
        then -1), num_accepted [R] int32.
    """
    V.tensor_args(
        ("draft_probs", "top_k", "top_p", "draft_token_probs", "draft_logits", "draft_temperature"),
        target_logits=target_logits, draft_tokens=draft_tokens, draft_probs=draft_probs, lengths=lengths,
        cu_verify=cu_verify, temperature=temperature, seed=seed, offset=offset, top_k=top_k, top_p=top_p,
        draft_token_probs=draft_token_probs, draft_logits=draft_logits, draft_temperature=draft_temperature,
    )
    return torch.ops.dspark.rejection_sample(
        target_logits, draft_tokens, draft_probs, lengths, cu_verify, temperature, seed, offset,
        top_k, top_p, draft_token_probs, draft_logits, draft_temperature, backend or "",
    )
