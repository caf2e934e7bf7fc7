"""dspark::pack_verify: the ragged verify batch (token ids, positions, owners)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _validate as V
from .._backend import OpBackends
from ..reference.pack_verify import pack_verify as _reference

BACKENDS = OpBackends(name="pack_verify", reference=_reference)


class VerifyBatch(NamedTuple):
    token_ids: torch.Tensor  # [R·(γ+1)] int32, -1 past cu_verify[R]
    positions: torch.Tensor  # [R·(γ+1)] int32, -1 past cu_verify[R]
    row_request: torch.Tensor  # [R·(γ+1)] int32, -1 past cu_verify[R]


def _check(anchor, tokens, lengths, cu_verify, start_pos):
    V.tensor("tokens", tokens, ndim=2, dtypes=V.INT_DTYPES)
    num_req = tokens.shape[0]
    for name, t, dt in (("anchor", anchor, V.INT_DTYPES), ("lengths", lengths, V.INT_DTYPES),
                        ("start_pos", start_pos, V.INT_DTYPES)):
        V.tensor(name, t, ndim=1, dtypes=dt)
        V.shape(name, t, (num_req,))
    V.tensor("cu_verify", cu_verify, ndim=1, dtypes=V.INT_DTYPES)
    V.shape("cu_verify", cu_verify, (num_req + 1,))
    V.same_device("tokens", tokens, anchor=anchor, lengths=lengths, cu_verify=cu_verify, start_pos=start_pos)


def _check_values(anchor, tokens, lengths, cu_verify, start_pos):
    if not tokens.shape[0] or not V.value_checks(tokens):
        return
    gamma = tokens.shape[1]
    if int(lengths.min()) < 0 or int(lengths.max()) > gamma:
        raise ValueError(f"lengths must lie in [0, {gamma}]")
    cu = cu_verify.to(torch.int64)
    rows = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or not bool(((rows == lengths.to(torch.int64) + 1) | (rows == 0)).all()):
        raise ValueError("cu_verify must start at 0 and grow by lengths + 1 per request (0 for inactive requests)")
    if bool((start_pos < 0).any()):
        raise ValueError("start_pos must be non-negative")


@torch.library.custom_op("dspark::pack_verify", mutates_args=(), device_types=("cpu", "cuda"))
def _op(anchor: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, cu_verify: torch.Tensor,
        start_pos: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(anchor, tokens, lengths, cu_verify, start_pos)
    _check_values(anchor, tokens, lengths, cu_verify, start_pos)
    return BACKENDS.run(backend, tokens.device.type, anchor, tokens, lengths, cu_verify, start_pos)


@_op.register_fake
def _fake(anchor, tokens, lengths, cu_verify, start_pos, backend):
    _check(anchor, tokens, lengths, cu_verify, start_pos)
    size = tokens.shape[0] * (tokens.shape[1] + 1)
    return tuple(tokens.new_empty((size,), dtype=torch.int32) for _ in range(3))


def pack_verify(
    anchor: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    cu_verify: torch.Tensor,
    start_pos: torch.Tensor,
    *,
    backend: str | None = None,
) -> VerifyBatch:
    """Flatten each request's anchor and first lengths[r] drafts into verify rows.

    Math: row t in [cu_verify[r], cu_verify[r+1]) is local index j = t - cu_verify[r]
    of request r: token anchor[r] (j = 0) or tokens[r, j-1], position start_pos[r] + j.
    Rows from cu_verify[R] to the static size R·(γ+1) are padding (-1).

    Args:
        anchor: [R] int; tokens: [R, γ] int drafts; lengths: [R] int in [0, γ];
        cu_verify: [R + 1] int32 (from schedule_verify); start_pos: [R] int
        position of each anchor.
        backend: "auto" | "reference" | "triton" | "cuda".

    Returns:
        VerifyBatch(token_ids, positions, row_request), each [R·(γ+1)] int32.
    """
    V.tensor_args(anchor=anchor, tokens=tokens, lengths=lengths, cu_verify=cu_verify, start_pos=start_pos)
    return VerifyBatch(*torch.ops.dspark.pack_verify(anchor, tokens, lengths, cu_verify, start_pos, backend or ""))
