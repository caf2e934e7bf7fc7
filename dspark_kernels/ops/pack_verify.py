"""dspark::pack_verify: the ragged verify batch (token ids, positions, owners, KV slots) in a static bucket."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from .._backend import Implementations
from .._op import INT, Op, tensor, value
from ..reference.pack_verify import MAX_POSITION, NO_PAGE_LIMIT
from ..reference.pack_verify import pack_verify as _reference

RESULT_TYPES = ("VerifyBatch",)  # exported by dspark_kernels beside pack_verify


class VerifyBatch(NamedTuple):
    token_ids: torch.Tensor  # [B] int32; pad_token on padding rows
    positions: torch.Tensor  # [B] int32; 0 on padding rows
    row_request: torch.Tensor  # [B] int32; -1 on padding rows (the padding marker)
    slot_mapping: torch.Tensor  # [B] int64 (scratch_slot on padding rows), or [0] without page_table


def _static_rows(a) -> int:
    """B: num_rows, or R·(γ+1) when it is None."""
    return a.num_rows if a.num_rows is not None else a.tokens.shape[0] * (a.tokens.shape[1] + 1)


def _check(a, dims):
    """Metadata the table cannot say (plain ints only, no device reads)."""
    if a.page_table is not None and a.num_pages is not None and a.scratch_slot >= a.num_pages * a.page_size:
        raise ValueError(f"scratch_slot must be a slot of the cache, in [0, num_pages * page_size) = "
                         f"[0, {a.num_pages * a.page_size}), got {a.scratch_slot}")


def _values(a):
    """Checks that read values (see dspark_kernels._checks for when they run); a is prepared (ints filled in)."""
    num_req, gamma = a.tokens.shape
    if not num_req:
        return
    cu = _checks.ragged_offsets(a.cu_verify, a.lengths, gamma)
    total = int(cu[-1])
    if total > a.num_rows:
        raise ValueError(f"num_rows = {a.num_rows} is smaller than the batch: cu_verify[R] = {total} live rows "
                         "(rows past num_rows would be dropped)")
    start = a.start_pos.to(torch.int64)
    if bool((start < 0).any()):
        raise ValueError("start_pos must be non-negative")
    if int(start.max()) + gamma > MAX_POSITION:
        raise ValueError(f"start_pos + gamma must be < 2^31 (positions are int32): max start_pos "
                         f"{int(start.max())}, gamma {gamma}")
    if a.page_table is None:
        return
    rows = cu[1:] - cu[:-1]
    page_size, width = a.page_size, a.page_table.shape[1]
    first_col = start // page_size
    last_col = (start + rows - 1) // page_size
    short = (rows > 0) & (last_col >= width)
    if bool(short.any()):
        r = int(short.nonzero()[0, 0])
        raise ValueError(f"page_table has {width} pages per request but request {r} writes position "
                         f"{int(start[r] + rows[r] - 1)}, in page column {int(last_col[r])} (page_size {page_size})")
    cols = torch.arange(width, device=start.device)
    used = (rows > 0)[:, None] & (cols[None, :] >= first_col[:, None]) & (cols[None, :] <= last_col[:, None])
    ids = a.page_table[used].to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= a.num_pages):
        bound = "2^31" if a.num_pages == NO_PAGE_LIMIT else str(a.num_pages)
        raise ValueError(f"page_table holds page ids outside [0, {bound}) (num_pages) in the pages the packed rows "
                         f"write: min {int(ids.min())}, max {int(ids.max())}")


def _fake(a):
    rows = _static_rows(a)
    out = tuple(a.tokens.new_empty((rows,), dtype=torch.int32) for _ in range(3))
    slots = a.tokens.new_empty((rows if a.page_table is not None else 0,), dtype=torch.int64)
    return (*out, slots)


def _prepare(a):
    """num_rows None -> R·(γ+1); num_pages None -> 2^31 (page ids must fit int32): implementations get ints."""
    return a._replace(num_rows=_static_rows(a), num_pages=a.num_pages if a.num_pages is not None else NO_PAGE_LIMIT)


OP = Op(
    "pack_verify",
    [
        tensor("anchor", "R", INT),
        tensor("tokens", "R, G", INT),
        tensor("lengths", "R", INT),
        tensor("cu_verify", "R+1", INT),
        tensor("start_pos", "R", INT),
        value("num_rows", "int", optional=True, lo=0, hi=MAX_POSITION),
        tensor("page_table", "R, M", INT, optional=True,
               requires=(("page_size", "a slot is page_table[r, p // page_size] * page_size + p % page_size"),)),
        value("page_size", "int", optional=True, lo=1, hi=MAX_POSITION,
              requires=(("page_table", "slots are computed from the page table"),)),
        value("num_pages", "int", optional=True, lo=1, hi=NO_PAGE_LIMIT,
              requires=(("page_table", "it bounds the page ids of page_table"),)),
        value("scratch_slot", "int", default=0, lo=0, hi=2**63 - 1),
        value("pad_token", "int", default=0, lo=0, hi=MAX_POSITION),
    ],
    "(Tensor, Tensor, Tensor, Tensor)",
    impls=Implementations("pack_verify", reference=_reference,
                          triton="dspark_kernels.triton.pack_verify:pack_verify"),
    fake=_fake,
    check=_check,
    values=_values,
    prepare=_prepare,
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
    num_rows: int | None = None,
    page_table: torch.Tensor | None = None,
    page_size: int | None = None,
    num_pages: int | None = None,
    scratch_slot: int = 0,
    pad_token: int = 0,
    backend: str | None = None,
) -> VerifyBatch:
    """Flatten each request's anchor and first lengths[r] drafts into the rows of a static verify bucket.

    Math: the output has B = num_rows rows (a python int, the engine's CUDA-graph
    bucket; default R·(γ+1)). Row t belongs to request r = the first r with
    cu_verify[r+1] > t (a binary search over cu_verify[1:]); it is live iff
    r < R and t < cu_verify[R], i.e. cu_verify[r] <= t < cu_verify[r+1]. A live
    row has local index j = t - cu_verify[r] and

        token_ids[t]    = anchor[r] if j == 0 else tokens[r, j - 1]
        positions[t]    = p = start_pos[r] + j
        row_request[t]  = r
        slot_mapping[t] = page_table[r, p // page_size] * page_size + p % page_size

    (slot_mapping as vLLM's slot_mapping: the row of k_cache.view(-1, Hkv, D)
    that append_verify_kv writes and verify_attention reads, with k_cache
    [pages, page_size, Hkv, D]). Padding rows t >= cu_verify[R] are safe to
    embed, rotate and write: token_ids = pad_token, positions = 0, slot_mapping
    = scratch_slot (a slot the engine reserves for garbage, e.g. one slot of a
    page no request owns), row_request = -1 (the one padding marker). Live rows
    past B are dropped: never written. Static shapes, no host sync, one launch
    on the Triton path.

    Args:
        anchor: [R] int32/int64; tokens: [R, γ] int drafts; lengths: [R] int in [0, γ].
        cu_verify: [R + 1] int32/int64 (from schedule_verify); start_pos: [R] int
            position of each anchor. Any strides.
        num_rows: B >= cu_verify[R], the static row count of every output (default R·(γ+1)).
        page_table: optional [R, max_pages] int32/int64 page ids per request; needs page_size.
        page_size: slots per page (with page_table).
        num_pages: optional number of pages of the cache (with page_table): bounds the page ids.
        scratch_slot: the slot padding rows write (>= 0; < num_pages·page_size when num_pages is given).
        pad_token: the token id of padding rows (a valid id of the vocabulary; default 0).
        backend: "auto" | "reference" | "triton" | "cuda".

    Values (checked on CPU always, on CUDA in debug mode; set_value_checks):
    lengths in [0, γ]; cu_verify starts at 0 and grows by lengths[r] + 1 (or 0
    for an inactive request); cu_verify[R] <= num_rows (error naming num_rows);
    start_pos >= 0 and start_pos + γ < 2^31 (positions are int32); with
    page_table, the page columns p // page_size of the live rows exist (<
    max_pages) and their ids lie in [0, num_pages) ([0, 2^31) without num_pages).

    Unchecked path (value checks off): no input reads or writes out of bounds,
    and the results are the math above with indices clamped, identical on every
    backend: the binary search returns some r in [0, R] whatever cu_verify holds;
    j is clamped to [0, γ]; positions are computed in int64 and saturated to
    [0, 2^31 - 1]; a live row whose page column is >= max_pages or whose page id
    is outside [0, num_pages) (num_pages None: [0, 2^31)) gets scratch_slot. So
    every position is in [0, 2^31), every row_request in [-1, R), every token id
    is an anchor, a draft or pad_token (cast to int32), and every slot is
    scratch_slot or in [0, num_pages·page_size) -- give num_pages to bound the
    slots by the cache (append_verify_kv skips slots outside its cache anyway).

    Returns:
        VerifyBatch(token_ids [B] int32, positions [B] int32, row_request [B] int32,
        slot_mapping [B] int64, or an empty [0] int64 tensor without page_table).

    Examples:
        >>> import torch, dspark_kernels as dk
        >>> b = dk.pack_verify(torch.tensor([5, 6]), torch.tensor([[7, 8], [9, 10]]), torch.tensor([2, 0]),
        ...                    torch.tensor([0, 3, 4], dtype=torch.int32), torch.tensor([5, 6]), num_rows=6,
        ...                    page_table=torch.tensor([[3, 0], [1, 2]]), page_size=4, scratch_slot=19)
        >>> b.token_ids.tolist(), b.positions.tolist(), b.row_request.tolist()
        ([5, 7, 8, 6, 0, 0], [5, 6, 7, 6, 0, 0], [0, 0, 0, 1, -1, -1])
        >>> b.slot_mapping.tolist()  # positions 5..7 of request 0: page 0, slots 1..3; 6 of request 1: page 2, slot 2
        [1, 2, 3, 10, 19, 19]
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of pack_verify (tests, overhead benchmark)."""
    i32 = dict(dtype=torch.int32, device=device)
    return dict(anchor=torch.tensor([5, 6, 7], **i32), tokens=torch.tensor([[7, 8], [9, 10], [11, 12]], **i32),
                lengths=torch.tensor([2, 0, 1], **i32), cu_verify=torch.tensor([0, 3, 4, 6], **i32),
                start_pos=torch.tensor([1, 6, 3], **i32), num_rows=8,
                page_table=torch.tensor([[4, 0], [1, 5], [2, 3]], **i32), page_size=4, num_pages=7,
                scratch_slot=27, pad_token=0)
