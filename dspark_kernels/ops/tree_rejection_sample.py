"""dspark::tree_rejection_sample: lossless verification of a token tree (multi-step speculative sampling)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import _checks
from .._backend import Implementations
from .._op import FLOAT, FLOAT64, INT, INT64, Op, scalar_tensor, tensor
from ..reference.tree_rejection_sample import tree_rejection_sample as _reference

RESULT_TYPES = ("TreeVerdict",)  # exported by dspark_kernels beside tree_rejection_sample

# Sibling rows of draft_probs must agree to this (absolute, per element): they are one distribution, copied
# (markov_draft on repeated rows gives bit-equal rows; 1e-6 also admits a recomputation in another order).
SIBLING_TOL = 1e-6


class TreeVerdict(NamedTuple):
    tokens: torch.Tensor  # [R, N+1] int32: the accepted path's tokens, then the sampled token, then -1
    num_accepted: torch.Tensor  # [R] int32: accepted path length
    accepted_nodes: torch.Tensor  # [R, N] int32: the accepted nodes in path order, then -1


def _check(a, dims):
    if dims["V"] < 1:
        raise ValueError("target_logits must have a vocab dimension of at least 1")
    if dims["N"] >= 65535:
        # The depth is the RNG position (16 bits, dspark_kernels.rng); a path has at most N nodes.
        raise ValueError(f"tree_tokens allows at most 65534 nodes per request, got {dims['N']}")


def first_children(parents: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """[R, N] int64: for every node, the first (lowest-index) live node with the same parent."""
    n = parents.shape[1]
    same = (parents[:, :, None] == parents[:, None, :]) & live[:, None, :]
    # The first True along the last dimension (a node is its own sibling, so there always is one when live).
    idx = torch.arange(n, device=parents.device)
    return torch.where(same, idx[None, None, :], n).amin(dim=-1)


def check_num_nodes(num_nodes: torch.Tensor, n_max: int, what: str) -> torch.Tensor:
    """num_nodes in [0, N] (N = what's second dimension); returns it as int64."""
    nn = num_nodes.to(torch.int64)
    if int(nn.min()) < 0 or int(nn.max()) > n_max:
        raise ValueError(f"num_nodes must lie in [0, {n_max}] (N = {what}.shape[1]), got min {int(nn.min())}, "
                         f"max {int(nn.max())}")
    return nn


def check_tree_offsets(cu_verify: torch.Tensor, nn: torch.Tensor) -> torch.Tensor:
    """cu_verify starts at 0 and grows by num_nodes + 1 (or 0: inactive); returns it as int64."""
    cu = cu_verify.to(torch.int64)
    rows = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or not bool(((rows == nn + 1) | (rows == 0)).all()):
        raise ValueError("cu_verify must start at 0 and grow by num_nodes + 1 per request (anchor + nodes), "
                         "or by 0 for an inactive request")
    return cu


def check_tree_parents(tree_parents: torch.Tensor, nn: torch.Tensor) -> torch.Tensor:
    """Every live node's parent is -1 or an earlier node; returns the live mask [R, N]."""
    node = torch.arange(tree_parents.shape[1], device=nn.device)
    live = node[None, :] < nn[:, None]
    parents = tree_parents.to(torch.int64)
    bad = live & ((parents < -1) | (parents >= node[None, :]))
    if bool(bad.any()):
        r, i = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"tree_parents must be -1 (the anchor) or an earlier node (topological order: parent < own "
                         f"index): request {r}, node {i} has parent {int(parents[r, i])}")
    return live


def _values(a):
    """Checks that read values (see dspark_kernels._checks for when they run)."""
    num_req, n_max = a.tree_tokens.shape
    if num_req == 0:
        return
    num_rows, vocab = a.target_logits.shape
    nn = check_num_nodes(a.num_nodes, n_max, "tree_tokens")
    cu = check_tree_offsets(a.cu_verify, nn)
    if int(cu[-1]) > num_rows:
        raise ValueError(f"target_logits has {num_rows} rows but cu_verify needs {int(cu[-1])}")
    live = check_tree_parents(a.tree_parents, nn)
    parents = a.tree_parents.to(torch.int64)
    _checks.ids_in_range("tree_tokens", a.tree_tokens[live], vocab)
    _checks.verify_target(a, int(cu[-1]))
    if a.draft_probs is not None:
        _checks.distribution_rows("draft_probs", a.draft_probs, live, "nodes")
        first = first_children(parents, live).clamp(max=n_max - 1)
        req = torch.arange(num_req, device=nn.device)[:, None]
        diff = (a.draft_probs.float() - a.draft_probs[req, first].float()).abs().amax(dim=-1)
        bad = live & (diff > SIBLING_TOL)
        if bool(bad.any()):
            r, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"draft_probs rows of siblings must be equal (one distribution, i.i.d. draws; within "
                             f"{SIBLING_TOL}): request {r}, node {i} differs from its first sibling, node "
                             f"{int(first[r, i])}, by {float(diff[r, i]):.3g}")


def _fake(a):
    num_req, n_max = a.tree_tokens.shape
    new = a.tree_tokens.new_empty
    return (new((num_req, n_max + 1), dtype=torch.int32), new((num_req,), dtype=torch.int32),
            new((num_req, n_max), dtype=torch.int32))


OP = Op(
    "tree_rejection_sample",
    [
        tensor("target_logits", "T, V", FLOAT),
        tensor("tree_tokens", "R, N", INT),
        tensor("tree_parents", "R, N", INT),
        tensor("num_nodes", "R", INT),
        tensor("cu_verify", "R+1", INT),
        tensor("temperature", "R", FLOAT64),
        tensor("seed", "R", INT64),
        scalar_tensor("offset", INT64),
        tensor("draft_probs", "R, N, V", FLOAT, optional=True),
        tensor("top_k", "R", INT, optional=True),
        tensor("top_p", "R", FLOAT64, optional=True),
    ],
    "(Tensor, Tensor, Tensor)",
    impls=Implementations(
        "tree_rejection_sample",
        reference=_reference,
        triton="dspark_kernels.triton.tree_rejection_sample:tree_rejection_sample",
    ),
    fake=_fake,
    check=_check,
    values=_values,
    wrap=lambda out, kw: TreeVerdict(*out),
)
IMPLS = OP.impls


def tree_rejection_sample(
    target_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    tree_parents: torch.Tensor,
    num_nodes: torch.Tensor,
    cu_verify: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    *,
    draft_probs: torch.Tensor | None = None,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    backend: str | None = None,
) -> TreeVerdict:
    """Lossless verification of a token tree: accept a root path, then one more token.

    Math (SpecInfer's multi-step speculative sampling; per request r, n =
    num_nodes[r]): node i < n carries token x_i = tree_tokens[r, i] and parent
    tree_parents[r, i] in {-1 (the anchor), 0, ..., i-1}; its children are
    the nodes whose parent it is, tried in increasing index order. p_v is the
    target distribution of row cu_verify[r] + 1 + v (row cu_verify[r] for the
    anchor, v = -1) after temperature / top-k / top-p, exactly as
    rejection_sample defines them. The walk starts at the anchor with w = p_v,
    M = 1 and, for each child c of the current node v in order:

        accept c  iff  u_c · q(x_c) · M < w(x_c)         (prob. min(1, p'(x_c)/q(x_c)), p' = w / M)
        accepted: emit x_c, descend to c (w = p_c, M = 1)
        rejected: w <- max(w - M·q, 0), M <- Σ w          (p' <- normalise(max(p' - q, 0)))

    where q is the draft distribution of v's children: draft_probs[r, c0] for
    c0 the first child of v (siblings are i.i.d. draws from one distribution,
    so their rows are equal; only c0's row is read), or the one-hot e_{x_c}
    when draft_probs is None (deterministic candidates: a rejected token is
    zeroed and the rest renormalised; a repeated sibling token is then never
    accepted, which keeps the law exact). When every child of the final node
    was rejected the walk emits a sample of w (p_v if w has no mass); at a
    leaf it emits a bonus sample of p_v. Greedy rows (T < 1e-5) accept the
    first child whose token is the argmax of the raw target row and emit the
    argmax at the end. For i.i.d. siblings (or fixed candidates) the emitted
    tokens follow the target distribution exactly. A chain (parents
    [-1, 0, 1, ...]) is the degenerate tree: same tokens as rejection_sample
    for the same seed and offset, bit for bit. A node whose token lies outside
    [0, V) is rejected and leaves w unchanged (it has no draft distribution).

    Randomness (Philox, dspark_kernels.rng), at depth d = the accepted path
    length so far: the coin u_c of the first child of a node is uniform
    (seed[r], offset, STREAM_ACCEPT, position d, index 0) -- rejection_sample's
    coin of draft d -- and of every later sibling c (seed[r], offset,
    STREAM_TREE_ACCEPT, position d, index c); the final draw is a Gumbel-max
    race on STREAM_RESIDUAL (a child was tried) or STREAM_BONUS (a leaf) at
    position num_accepted, as in rejection_sample. Every draw of one walk has
    its own counter. STREAM_TREE_RESIDUAL stays reserved: one walk makes one
    final draw, so the residual stream needs no second layout. Same seed and
    offset, same tokens on every backend (up to fp32 rounding of the
    normalisers, which can only flip a near-tie).

    Args:
        target_logits: [T, V] bf16/fp16/fp32; request r's verify block is rows
            cu_verify[r] .. cu_verify[r] + n: row 0 after the anchor, row 1 + i
            after node i. Rows past cu_verify[R] are ignored.
        tree_tokens: [R, N] int32/int64 node tokens; entries past num_nodes[r] are ignored.
        tree_parents: [R, N] int32/int64, -1 or an earlier node.
        num_nodes: [R] int in [0, N].
        cu_verify: [R + 1] int32, cu_verify[r+1] - cu_verify[r] = num_nodes[r] + 1,
            or 0 for an inactive request (which then emits nothing).
        temperature: [R] float, target temperature; T < 1e-5 (e.g. 0) = greedy.
        seed: [R] int64 per-request Philox key. offset: [] int64 device tensor.
        draft_probs: [R, N, V] float, the distribution node i was drawn from
            (equal rows for siblings), or None for deterministic candidates.
        top_k: [R] int, <= 0 or >= V disables. top_p: [R] float in (0, 1], 1 disables.
        backend: "auto" | "reference" | "triton" | "cuda" (default: DSPARK_BACKEND or auto).

    Returns:
        TreeVerdict(tokens [R, N + 1] int32: the accepted path's tokens, then the
        sampled token, then -1; num_accepted [R] int32: the path length;
        accepted_nodes [R, N] int32: the path's node indices in order, then -1
        -- what compact_accepted_kv takes).

    Value checks (dspark_kernels.set_value_checks) reject num_nodes outside
    [0, N], cu_verify that does not grow by num_nodes + 1 (or 0), parents that
    are not -1 or an earlier node, token ids outside [0, V), NaN/Inf, bad
    temperatures / top_p, draft_probs rows of live nodes that do not sum to 1
    (within 1e-2) and sibling rows that differ (by more than 1e-6). Without
    them (the default on CUDA) nothing reads or writes out of bounds and every
    emitted id is in [0, V) or -1: num_nodes is clamped to [0, N] and to the
    request's rows, a request whose rows do not start inside target_logits is
    inactive, a node whose parent is not -1 or an earlier node is never
    reached, NaN scores never win; unnormalised or unequal sibling rows are
    used as given (first child's row), and the tokens then follow the residual
    they define, not the target distribution.

    Examples:
        Greedy target: after the anchor it predicts 2, after 2 it predicts 3, after 3 it
        predicts 5. Root children 4 (node 0) and 2 (node 1); node 2 (token 3) hangs under node 1.

        >>> import torch, dspark_kernels as dk
        >>> logits = torch.zeros(4, 6)
        >>> logits[0, 2] = logits[2, 3] = logits[3, 5] = 9.0
        >>> v = dk.tree_rejection_sample(logits, torch.tensor([[4, 2, 3]]), torch.tensor([[-1, -1, 1]]),
        ...                              torch.tensor([3]), torch.tensor([0, 4]), torch.tensor([0.0]),
        ...                              torch.tensor([7]), torch.tensor(0))
        >>> v.tokens.tolist(), v.num_accepted.tolist(), v.accepted_nodes.tolist()
        ([[2, 3, 5, -1]], [2], [[1, 2, -1]])
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of tree_rejection_sample (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(2)
    parents = torch.tensor([[-1, -1, 0, 0, 2], [-1, 0, 1, 2, 3], [-1, -1, -1, 0, 1]])
    num_nodes = torch.tensor([5, 0, 4], dtype=torch.int32)
    cu = torch.tensor([0, 6, 7, 12], dtype=torch.int32)
    q = torch.softmax(torch.randn(3, 5, 13, generator=g), -1)
    first = first_children(parents, torch.ones(3, 5, dtype=torch.bool))
    q = q[torch.arange(3)[:, None], first]  # siblings share their first sibling's row
    x = dict(target_logits=torch.randn(12, 13, generator=g), tree_tokens=torch.randint(0, 13, (3, 5), generator=g),
             tree_parents=parents, num_nodes=num_nodes, cu_verify=cu, temperature=torch.tensor([1.0, 0.0, 0.7]),
             seed=torch.arange(3, dtype=torch.int64) + 21, offset=torch.tensor(3, dtype=torch.int64), draft_probs=q,
             top_k=torch.tensor([3, 0, 5]), top_p=torch.tensor([0.9, 1.0, 0.8]))
    return {k: v.to(device) for k, v in x.items()}
