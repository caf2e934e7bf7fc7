"""dspark::compact_accepted_kv: after tree verification, move the accepted path's K/V next to the anchor, in place."""

from __future__ import annotations

import torch

from .._backend import Implementations
from .._op import FLOAT, INT, Op, tensor
from ..reference.compact_accepted_kv import compact_accepted_kv as _reference
from ..reference.compact_accepted_kv import valid_paths


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _check(a, dims):
    if a.v_cache.dtype != a.k_cache.dtype:
        raise TypeError(f"v_cache has dtype {_dtype_name(a.v_cache.dtype)} but k_cache has "
                        f"{_dtype_name(a.k_cache.dtype)}; they must share one dtype")
    if dims["S"] < 1:
        raise ValueError(f"k_cache must have a positive page size (dimension 1), got shape {tuple(a.k_cache.shape)}")


def _values(a):
    """Checks that read values (see dspark_kernels._checks for when they run)."""
    num_req, n_max = a.accepted_nodes.shape
    if not num_req:
        return
    acc = a.num_accepted.to(torch.int64)
    if int(acc.min()) < 0 or int(acc.max()) > n_max:
        raise ValueError(f"num_accepted must lie in [0, {n_max}] (N = accepted_nodes.shape[1]), got min "
                         f"{int(acc.min())}, max {int(acc.max())}")
    _, ok = valid_paths(a.accepted_nodes, a.num_accepted)
    if not bool(ok.all()):
        r = int((~ok).nonzero()[0, 0])
        raise ValueError(f"accepted_nodes[r, :num_accepted[r]] must be strictly increasing node indices in [0, "
                         f"{n_max}) (a root path of the tree, as tree_rejection_sample returns it): request {r} has "
                         f"{a.accepted_nodes[r, : int(acc[r])].tolist()}")
    start = a.start_pos.to(torch.int64)
    if bool((start < 0).any()):
        raise ValueError("start_pos must be non-negative")
    num_pages, page_size = a.k_cache.shape[:2]
    width = a.page_table.shape[1]
    # Positions touched: start + 1 .. start + 1 + (last accepted node); the last node is the largest.
    last = a.accepted_nodes.to(torch.int64).gather(1, (acc - 1).clamp(min=0)[:, None])[:, 0]
    moving = acc > 0
    end = start + 1 + last
    short = moving & (end // page_size >= width)
    if bool(short.any()):
        r = int(short.nonzero()[0, 0])
        raise ValueError(f"page_table has {width} pages per request but request {r} reads position {int(end[r])} "
                         f"(page column {int(end[r]) // page_size}, page_size {page_size})")
    cols = torch.arange(width, device=start.device)[None, :]
    used = moving[:, None] & (cols >= ((start + 1) // page_size)[:, None]) & (cols <= (end // page_size)[:, None])
    ids = a.page_table[used].to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
        raise ValueError(f"page_table holds page ids outside [0, {num_pages}) (k_cache pages) in the pages the "
                         f"accepted path occupies: min {int(ids.min())}, max {int(ids.max())}")


OP = Op(
    "compact_accepted_kv",
    [
        tensor("k_cache", "P, S, Hkv, D", FLOAT, mutated=True),
        tensor("v_cache", "P, S, Hkv, D", FLOAT, mutated=True),
        tensor("page_table", "R, M", INT),
        tensor("start_pos", "R", INT),
        tensor("accepted_nodes", "R, N", INT),
        tensor("num_accepted", "R", INT),
    ],
    "()",
    impls=Implementations("compact_accepted_kv", reference=_reference,
                          triton="dspark_kernels.triton.compact_accepted_kv:compact_accepted_kv"),
    fake=lambda a: None,
    check=_check,
    values=_values,
)
IMPLS = OP.impls


def compact_accepted_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    start_pos: torch.Tensor,
    accepted_nodes: torch.Tensor,
    num_accepted: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Move the accepted nodes' keys and values to the positions right after the anchor, in place.

    Math: request r's verify block sits at cache positions s + j, s = start_pos[r]
    (the anchor at j = 0, node i at j = 1 + i: pack_verify's slot mapping), and
    tree_rejection_sample accepted the root path a_0 < a_1 < ... < a_{n-1},
    n = num_accepted[r], a = accepted_nodes[r]. Afterwards, for k < n,

        K[s + 1 + k] = K_before[s + 1 + a_k]       (likewise V; position p is slot p % S
                                                     of page page_table[r, p // S])

    so the cache holds the context, the anchor and exactly the accepted path,
    in order, at positions s .. s + n (each key already rotated at its depth
    s + 1 + k, tree_verify_layout's position: nothing needs re-rotating).
    Nothing else changes; slots s + n + 1 .. of the block keep stale values
    (the next round overwrites them). Moves are done in increasing k, which is
    safe in place: a_j >= j > k, so no move reads a slot that an earlier move
    wrote. A move with a_k = k is skipped (a chain, or the accepted prefix of
    a tree laid out depth first, moves nothing). No host sync, static shapes,
    one launch on the Triton path (CUDA-graph capturable).

    Args:
        k_cache, v_cache: [pages, page_size, Hkv, D] fp32/fp16/bf16, written in
            place; any strides (k and v may be views into one buffer).
        page_table: [R, max_pages] int32/int64 page ids per request.
        start_pos: [R] int, the anchor's position (tree_verify_layout's start_pos).
        accepted_nodes: [R, N] int, tree_rejection_sample's accepted_nodes
            (entries past num_accepted[r] are ignored).
        num_accepted: [R] int in [0, N].
        backend: "auto" | "reference" | "triton" | "cuda".

    Values (checked on CPU always, on CUDA in debug mode; set_value_checks):
    num_accepted in [0, N]; accepted_nodes[r, :n] strictly increasing in
    [0, N); start_pos >= 0; the page columns of the positions moved exist and
    hold page ids in [0, pages). The pages holding positions s + 1 onwards
    must belong to request r alone (as for append_verify_kv).

    Unchecked path (value checks off): nothing reads or writes out of bounds.
    num_accepted is clamped to [0, N]; a request whose accepted_nodes[r, :n]
    is not strictly increasing in [0, N) moves nothing; a single move whose
    source or destination position is negative, past the page table or on a
    page id outside [0, pages) is skipped. Requests that share slots race
    (unspecified which write wins).

    Returns:
        None (k_cache and v_cache are written in place).

    Examples:
        One request, anchor at position 2, pages of 4 slots: the path is nodes 1 and 3
        (positions 4 and 6), which move to positions 3 and 4.

        >>> import torch, dspark_kernels as dk
        >>> k = torch.arange(8.0).reshape(2, 4, 1, 1); v = -k
        >>> dk.compact_accepted_kv(k, v, torch.tensor([[0, 1]]), torch.tensor([2]), torch.tensor([[1, 3, -1, -1]]),
        ...                        torch.tensor([2]))
        >>> k.flatten().tolist(), v.flatten().tolist()[3:5]
        ([0.0, 1.0, 2.0, 4.0, 6.0, 5.0, 6.0, 7.0], [-4.0, -6.0])
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of compact_accepted_kv (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(0)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(k_cache=torch.randn(8, 4, 2, 8, generator=g).to(device),
                v_cache=torch.randn(8, 4, 2, 8, generator=g).to(device),
                page_table=torch.tensor([[4, 0, 2], [1, 5, 3], [6, 7, 0]], **i32),
                start_pos=torch.tensor([1, 3, 0], **i32),
                accepted_nodes=torch.tensor([[0, 2, 4, -1, -1], [-1, -1, -1, -1, -1], [1, 2, -1, -1, -1]], **i32),
                num_accepted=torch.tensor([3, 0, 2], **i32))
