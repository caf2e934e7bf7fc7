"""dspark::tree_verify_layout: verify_attention's tree mask and each row's position, from the trees' parents."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import Implementations
from .._op import INT, Op, tensor, value
from ..reference.pack_verify import MAX_POSITION
from ..reference.tree_verify_layout import tree_verify_layout as _reference
from .tree_rejection_sample import check_num_nodes, check_tree_offsets, check_tree_parents
from .verify_attention import MAX_TREE_TOKENS

RESULT_TYPES = ("TreeLayout",)  # exported by dspark_kernels beside tree_verify_layout


class TreeLayout(NamedTuple):
    tree_mask: torch.Tensor  # [B, W] int32, W = ceil((N + 1) / 32): verify_attention's tree_mask
    positions: torch.Tensor  # [B] int32: start_pos + depth (0 on padding rows)
    cu_verify: torch.Tensor  # [R + 1] int32: the row offsets used (given, or 0, + num_nodes + 1 ...)


def _rows(a) -> int:
    return a.num_rows if a.num_rows is not None else a.tree_parents.shape[0] * (a.tree_parents.shape[1] + 1)


def _check(a, dims):
    if dims["N"] + 1 > MAX_TREE_TOKENS:
        raise ValueError(f"tree_parents allows at most {MAX_TREE_TOKENS - 1} nodes per request (verify_attention's "
                         f"tree mask holds {MAX_TREE_TOKENS} tokens: the anchor and the nodes), got {dims['N']}")


def _values(a):
    """Checks that read values (see dspark_kernels._checks for when they run); a is prepared."""
    num_req, n_max = a.tree_parents.shape
    if not num_req:
        return
    nn = check_num_nodes(a.num_nodes, n_max, "tree_parents")
    total = int(check_tree_offsets(a.cu_verify, nn)[-1]) if a.cu_verify is not None else int((nn + 1).sum())
    if total > a.num_rows:
        raise ValueError(f"num_rows = {a.num_rows} is smaller than the batch: {total} live rows")
    check_tree_parents(a.tree_parents, nn)
    start = a.start_pos.to(torch.int64)
    if bool((start < 0).any()):
        raise ValueError("start_pos must be non-negative")
    if int(start.max()) + n_max > MAX_POSITION:
        raise ValueError(f"start_pos + N must be < 2^31 (positions are int32): max start_pos {int(start.max())}, "
                         f"N {n_max}")


def _fake(a):
    num_req, n_max = a.tree_parents.shape
    rows, words = _rows(a), (n_max + 1 + 31) // 32
    new = a.tree_parents.new_empty
    return (new((rows, words), dtype=torch.int32), new((rows,), dtype=torch.int32),
            new((num_req + 1,), dtype=torch.int32))


OP = Op(
    "tree_verify_layout",
    [
        tensor("tree_parents", "R, N", INT),
        tensor("num_nodes", "R", INT),
        tensor("start_pos", "R", INT),
        tensor("cu_verify", "R+1", INT, optional=True),
        value("num_rows", "int", optional=True, lo=0, hi=MAX_POSITION),
    ],
    "(Tensor, Tensor, Tensor)",
    impls=Implementations("tree_verify_layout", reference=_reference,
                          triton="dspark_kernels.triton.tree_verify_layout:tree_verify_layout"),
    fake=_fake,
    check=_check,
    values=_values,
    prepare=lambda a: a._replace(num_rows=_rows(a)),
    wrap=lambda out, kw: TreeLayout(*out),
)
IMPLS = OP.impls


def tree_verify_layout(
    tree_parents: torch.Tensor,
    num_nodes: torch.Tensor,
    start_pos: torch.Tensor,
    *,
    cu_verify: torch.Tensor | None = None,
    num_rows: int | None = None,
    backend: str | None = None,
) -> TreeLayout:
    """verify_attention's tree mask and the RoPE position of every row of a tree verify batch.

    Math: request r's block is its anchor (local row 0) and its nodes (row 1 + i
    for node i < num_nodes[r]), in the rows cu_verify[r] .. cu_verify[r+1] - 1
    of a static batch of B = num_rows rows: the rows pack_verify(anchor,
    tree_tokens, num_nodes, cu_verify, start_pos, num_rows=B) fills (token
    ids, slot mapping: node i's K/V go to cache position start_pos[r] + 1 + i).
    With anc(0) = {0} and anc(1 + i) = anc(1 + parent[i]) ∪ {1 + i}, depth(0) = 0
    and depth(1 + i) = depth(1 + parent[i]) + 1, row t = cu_verify[r] + j gets

        tree_mask[t]  = the bits anc(j): bit k in word k // 32, bit k % 32  (int32 words)
        positions[t]  = start_pos[r] + depth(j)

    so row j sees the anchor, its ancestors and itself (and, in verify_attention,
    every context key), and is rotated at its depth: the target computes each
    node exactly as it would at the end of its own root path. Rows past
    cu_verify[R] (padding) get tree_mask bit 0 and position 0. W =
    ceil((N + 1) / 32) words (N <= 63: verify_attention's 64-token limit).
    Rows find their request as pack_verify's do (a binary search over
    cu_verify), so the two ops' rows always line up. No host sync, static
    shapes, one launch on the Triton path (plus a cumsum when cu_verify is None).
    verify_attention's sliding window counts cache positions (block row t sees
    context keys > C + t - window), not these depths: with window > 0 a tree row
    at depth d < t misses up to t - d context keys; use window = -1 for trees.

    Args:
        tree_parents: [R, N] int32/int64, -1 (the anchor) or an earlier node;
            entries past num_nodes[r] are ignored.
        num_nodes: [R] int in [0, N].
        start_pos: [R] int, position of each anchor (>= 0).
        cu_verify: optional [R + 1] int32 row offsets, growing by num_nodes[r] + 1
            (or 0 for an inactive request); None: 0, then + num_nodes[r] + 1 for
            every request (the offsets tree_rejection_sample and pack_verify take).
        num_rows: B >= cu_verify[R], the static row count (default R·(N+1)).
        backend: "auto" | "reference" | "triton" | "cuda".

    Values (checked on CPU always, on CUDA in debug mode; set_value_checks):
    num_nodes in [0, N]; parents of live nodes -1 or an earlier node;
    cu_verify (when given) starting at 0 and growing by num_nodes + 1 or 0;
    cu_verify[R] <= num_rows; start_pos >= 0 and start_pos + N < 2^31.

    Unchecked path (value checks off): nothing reads or writes out of bounds and
    every row is a well-formed tree row (bit j set, no bit above it): a parent
    outside [-1, i - 1] counts as the anchor, the local row index is clamped to
    [0, N] (as pack_verify clamps it to [0, γ]), positions saturate to
    [0, 2^31 - 1], a default cu_verify clamps num_nodes to [0, N].

    Returns:
        TreeLayout(tree_mask [B, W] int32, positions [B] int32, cu_verify [R + 1] int32).

    Examples:
        Anchor at position 10 with nodes 0, 1 under it and node 2 under node 1 (rows 0..3):

        >>> import torch, dspark_kernels as dk
        >>> lay = dk.tree_verify_layout(torch.tensor([[-1, -1, 1]]), torch.tensor([3]), torch.tensor([10]))
        >>> lay.tree_mask[:, 0].tolist(), lay.positions.tolist(), lay.cu_verify.tolist()
        ([1, 3, 5, 13], [10, 11, 11, 12], [0, 4])
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of tree_verify_layout (tests, overhead benchmark)."""
    i32 = dict(dtype=torch.int32, device=device)
    return dict(tree_parents=torch.tensor([[-1, -1, 0, 1, 3], [-1, 0, 1, 2, 3], [-1, -1, -1, 0, 9]], **i32),
                num_nodes=torch.tensor([5, 0, 4], **i32), start_pos=torch.tensor([3, 9, 0], **i32),
                cu_verify=torch.tensor([0, 6, 7, 12], **i32), num_rows=14)
