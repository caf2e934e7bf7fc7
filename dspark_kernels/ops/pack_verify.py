"""dspark::pack_verify: the ragged verify batch (token ids, positions, owners)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from .._backend import Implementations
from .._op import INT, Op, tensor
from ..reference.pack_verify import pack_verify as _reference


RESULT_TYPES = ("VerifyBatch",)  # exported by dspark_kernels beside pack_verify


class VerifyBatch(NamedTuple):
    token_ids: torch.Tensor  # [R·(γ+1)] int32, -1 past cu_verify[R]
    positions: torch.Tensor  # [R·(γ+1)] int32, -1 past cu_verify[R]
    row_request: torch.Tensor  # [R·(γ+1)] int32, -1 past cu_verify[R]


def _values(a):
    if not a.tokens.shape[0]:
        return
    _checks.ragged_offsets(a.cu_verify, a.lengths, a.tokens.shape[1])
    if bool((a.start_pos < 0).any()):
        raise ValueError("start_pos must be non-negative")


def _fake(a):
    size = a.tokens.shape[0] * (a.tokens.shape[1] + 1)
    return tuple(a.tokens.new_empty((size,), dtype=torch.int32) for _ in range(3))


OP = Op(
    "pack_verify",
    [
        tensor("anchor", "R", INT),
        tensor("tokens", "R, G", INT),
        tensor("lengths", "R", INT),
        tensor("cu_verify", "R+1", INT),
        tensor("start_pos", "R", INT),
    ],
    "(Tensor, Tensor, Tensor)",
    impls=Implementations("pack_verify", reference=_reference),
    fake=_fake,
    values=_values,
    wrap=lambda out, kw: VerifyBatch(*out),
)
IMPLS = OP.impls


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
    of request r: token anchor[r] (j = 0) or tokens[r, j-1], position
    start_pos[r] + j, owner r. Rows from cu_verify[R] to the static size
    R·(γ+1) are padding (-1 in all three outputs). Static shapes, no host sync.

    Args:
        anchor: [R] int32/int64; tokens: [R, γ] int drafts; lengths: [R] int in [0, γ];
        cu_verify: [R + 1] int32/int64 (from schedule_verify); start_pos: [R] int
        position of each anchor.
        backend: "auto" | "reference" | "triton" | "cuda".

    Returns:
        VerifyBatch(token_ids, positions, row_request), each [R·(γ+1)] int32.

    Examples:
        >>> import torch, dspark_kernels as dk
        >>> b = dk.pack_verify(torch.tensor([5, 6]), torch.tensor([[7, 8], [9, 10]]), torch.tensor([2, 0]),
        ...                    torch.tensor([0, 3, 4], dtype=torch.int32), torch.tensor([100, 200]))
        >>> b.token_ids.tolist(), b.positions.tolist()
        ([5, 7, 8, 6, -1, -1], [100, 101, 102, 200, -1, -1])
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of pack_verify (tests, overhead benchmark)."""
    i32 = dict(dtype=torch.int32, device=device)
    return dict(anchor=torch.tensor([5, 6, 7], **i32), tokens=torch.tensor([[7, 8], [9, 10], [11, 12]], **i32),
                lengths=torch.tensor([2, 0, 1], **i32), cu_verify=torch.tensor([0, 3, 4, 6], **i32),
                start_pos=torch.tensor([100, 200, 300], **i32))
