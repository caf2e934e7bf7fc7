"""dspark::advance: the next round's per-request state from rejection_sample's outputs, on device."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._backend import Implementations
from .._op import BOOL, INT, INT64, Op, scalar_tensor, tensor
from ..reference.advance import advance as _reference

RESULT_TYPES = ("Advance",)  # exported by dspark_kernels beside advance

# Positions are int32 on every op; start_pos + γ + 1 must stay below this.
POSITION_LIMIT = 1 << 31


class Advance(NamedTuple):
    anchor: torch.Tensor  # [R] int32 next round's anchor (the last emitted token)
    num_emitted: torch.Tensor  # [R] int32 tokens emitted this round: tokens[r, :num_emitted[r]]
    start_pos: torch.Tensor  # [R] int32 position of the next anchor
    kv_lens: torch.Tensor  # [R] int32 committed keys in the cache (= start_pos)
    num_generated: torch.Tensor  # [R] int32 tokens generated so far
    active: torch.Tensor  # [R] bool active next round
    finished: torch.Tensor  # [R] bool finished this round (EOS, max_new_tokens or max_positions)
    offset: torch.Tensor  # [] int64 next round's Philox offset (offset + 1)


def _check(a, dims):
    if dims["G1"] < 1:
        raise ValueError("tokens must have γ + 1 >= 1 columns (rejection_sample's [R, γ+1] output)")


def _values(a):
    if not a.tokens.shape[0]:
        return
    gamma = a.tokens.shape[1] - 1
    acc = a.num_accepted
    if bool(((acc < 0) | (acc > gamma)).any()):
        raise ValueError(f"num_accepted must lie in [0, γ = {gamma}], got min {int(acc.min())}, max {int(acc.max())}")
    for name in ("start_pos", "num_generated"):
        t = getattr(a, name)
        if bool((t < 0).any()):
            raise ValueError(f"{name} must be >= 0, got min {int(t.min())}")
    if int(a.start_pos.max()) + gamma + 1 >= POSITION_LIMIT:
        raise ValueError(f"start_pos + γ + 1 must stay below 2**31 (positions are int32), got max start_pos "
                         f"{int(a.start_pos.max())}")


def _fake(a):
    num_req = a.tokens.shape[0]
    i32 = [a.tokens.new_empty((num_req,), dtype=torch.int32) for _ in range(5)]
    flags = [a.tokens.new_empty((num_req,), dtype=torch.bool) for _ in range(2)]
    return (*i32, *flags, a.tokens.new_empty((), dtype=torch.int64))


OP = Op(
    "advance",
    [
        tensor("tokens", "R, G1", INT),
        tensor("num_accepted", "R", INT),
        tensor("anchor", "R", INT),
        tensor("start_pos", "R", INT),
        tensor("num_generated", "R", INT),
        tensor("active", "R", BOOL),
        scalar_tensor("offset", INT64),
        tensor("eos_token_ids", "E", INT, optional=True),
        tensor("max_new_tokens", "R", INT, optional=True),
        tensor("max_positions", "R", INT, optional=True),
    ],
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    impls=Implementations("advance", reference=_reference, triton="dspark_kernels.triton.advance:advance"),
    fake=_fake,
    check=_check,
    values=_values,
    wrap=lambda out, kw: Advance(*out),
)
IMPLS = OP.impls


def advance(
    tokens: torch.Tensor,
    num_accepted: torch.Tensor,
    anchor: torch.Tensor,
    start_pos: torch.Tensor,
    num_generated: torch.Tensor,
    active: torch.Tensor,
    offset: torch.Tensor,
    *,
    eos_token_ids: torch.Tensor | None = None,
    max_new_tokens: torch.Tensor | None = None,
    max_positions: torch.Tensor | None = None,
    backend: str | None = None,
) -> Advance:
    """The next round's state from this round's verification, on the device (the host reads nothing).

    Math, per request r: rejection_sample offers n = num_accepted[r] + 1
    tokens, tokens[r, 0..n-1] (the accepted drafts, then the residual or
    bonus token). Let e be the first index j < n with tokens[r, j] in
    eos_token_ids (e = γ+1 if none) and m = max_new_tokens[r] -
    num_generated[r] (unbounded without max_new_tokens). Then

        num_emitted = min(n, e + 1, max(m, 0))  if active[r], else 0
        anchor'     = tokens[r, num_emitted - 1] if num_emitted > 0, else anchor[r]
        start_pos'  = start_pos[r] + num_emitted = kv_lens'
        generated'  = num_generated[r] + num_emitted
        finished    = active[r] and (e < num_emitted  or  generated' >= max_new_tokens[r]
                                     or  start_pos' + γ + 1 > max_positions[r])
        active'     = active[r] and not finished;   offset' = offset + 1

    What it expects: this round's verify block of request r sat at positions
    start_pos[r] .. start_pos[r] + lengths[r] (anchor first) and its keys and
    values were appended to the cache (append_verify_kv). The anchor and the
    accepted drafts are the n - 1 + 1 = n first of them, so keys at positions
    < start_pos' are the committed context (kv_lens') and the rejected
    drafts' keys past it are simply overwritten next round. The new anchor
    (the last emitted token) has no key yet: next round's verify block starts
    with it at start_pos'. The emitted text of the round is tokens[r,
    :num_emitted[r]]. A finished request emits up to and including its EOS
    (or its last allowed token) and is inactive from the next round on; its
    slot can be refilled by the host whenever it learns of it (e.g. through a
    lagged non-blocking copy of ``finished``). offset + 1 per round is all
    the randomness needs: markov_draft (stream 1) and rejection_sample
    (streams 2-4) draw on distinct Philox streams, so one round may share one
    offset between them, and the next round's offset is fresh for both.

    Args:
        tokens: [R, γ+1] int32/int64, rejection_sample's tokens.
        num_accepted: [R] int in [0, γ], rejection_sample's accepted counts
            (clamped to [0, γ] on the unchecked path).
        anchor: [R] int, this round's anchors (kept for requests that emit nothing).
        start_pos: [R] int >= 0, position of this round's anchor.
        num_generated: [R] int >= 0, tokens generated before this round.
        active: [R] bool, requests that took part in this round.
        offset: [] int64, this round's Philox offset.
        eos_token_ids: optional [E] int, ids that end a request (E >= 0).
        max_new_tokens: optional [R] int, the generation budget per request.
        max_positions: optional [R] int, positions the request's KV pages hold:
            it finishes when the next round's block (γ+1 positions) would not fit.
        backend: "auto" | "reference" | "triton".

    Returns:
        Advance(anchor, num_emitted, start_pos, kv_lens, num_generated [R] int32,
        active, finished [R] bool, offset [] int64), new tensors on the input
        device; static shapes, no host sync (capturable in a CUDA graph).

    Examples:
        Request 0 accepts 2 drafts and ends on EOS id 2; request 1 accepts
        everything; request 2 is inactive.

        >>> import torch, dspark_kernels as dk
        >>> tok = torch.tensor([[5, 2, 7, 9], [4, 4, 4, 8], [1, 1, 1, 1]])
        >>> nxt = dk.advance(tok, torch.tensor([2, 3, 0]), torch.tensor([3, 3, 3]), torch.tensor([10, 20, 30]),
        ...                  torch.tensor([0, 0, 0]), torch.tensor([True, True, False]), torch.tensor(7),
        ...                  eos_token_ids=torch.tensor([2]))
        >>> nxt.num_emitted.tolist(), nxt.anchor.tolist(), nxt.start_pos.tolist()
        ([2, 4, 0], [2, 8, 3], [12, 24, 30])
        >>> nxt.finished.tolist(), nxt.active.tolist(), int(nxt.offset)
        ([True, False, False], [False, True, False], 8)
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of advance (tests, overhead benchmark)."""
    i32 = dict(dtype=torch.int32, device=device)
    return dict(tokens=torch.tensor([[5, 2, 7, 9], [4, 4, 4, 8], [1, 1, 1, 1]], **i32),
                num_accepted=torch.tensor([2, 3, 0], **i32), anchor=torch.tensor([3, 3, 3], **i32),
                start_pos=torch.tensor([10, 20, 30], **i32), num_generated=torch.tensor([0, 5, 1], **i32),
                active=torch.tensor([True, True, False], device=device),
                offset=torch.tensor(7, dtype=torch.int64, device=device),
                eos_token_ids=torch.tensor([2], **i32), max_new_tokens=torch.tensor([50, 8, 50], **i32),
                max_positions=torch.tensor([64, 64, 64], **i32))
