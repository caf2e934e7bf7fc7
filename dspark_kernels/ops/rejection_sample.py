"""dspark::rejection_sample: lossless chain verification of a drafted block."""

from __future__ import annotations

import torch

from .. import _checks
from .._backend import Implementations
from .._op import FLOAT, FLOAT64, INT, INT64, Op, scalar_tensor, tensor
from ..reference.rejection_sample import rejection_sample as _reference


def _check(a, dims):
    if dims["V"] < 1:
        raise ValueError("target_logits must have a vocab dimension of at least 1")
    if dims["G"] >= 65535:
        raise ValueError(f"draft_tokens allows at most 65534 drafts per request, got {dims['G']}")
    if a.draft_probs is not None and (a.draft_token_probs is not None or a.draft_logits is not None):
        raise ValueError("give either draft_probs or the draft_token_probs/draft_logits pair, not both")


def _values(a):
    """Checks that read values (see dspark_kernels._checks for when they run)."""
    num_req, gamma = a.draft_tokens.shape
    if num_req == 0:
        return
    num_rows, vocab = a.target_logits.shape
    cu = _checks.ragged_offsets(a.cu_verify, a.lengths, gamma)
    if int(cu[-1]) > num_rows:
        raise ValueError(f"target_logits has {num_rows} rows but cu_verify needs {int(cu[-1])}")
    live = torch.arange(gamma, device=a.draft_tokens.device)[None, :] < a.lengths[:, None]
    _checks.ids_in_range("draft_tokens", a.draft_tokens[live], vocab)
    _checks.verify_target(a, int(cu[-1]))
    if a.draft_probs is not None:
        _checks.distribution_rows("draft_probs", a.draft_probs, live, "drafts")
    if a.draft_token_probs is not None:
        _checks.finite("draft_token_probs", a.draft_token_probs)
        if bool((a.draft_token_probs[live] <= 0).any()) or bool((a.draft_token_probs > 1).any()):
            raise ValueError("draft_token_probs of live drafts must lie in (0, 1]")
        _check_token_probs(a, live)
    _checks.not_nan("draft_logits", a.draft_logits)
    _checks.temperatures("draft_temperature", a.draft_temperature)


def _check_token_probs(a, live):
    """draft_token_probs must be softmax(draft_logits / T_d) at the draft (what markov_draft returns):
    the residual takes its normaliser from them."""
    from ..reference.sampling import inverse_temperature

    t = a.draft_temperature if a.draft_temperature is not None else a.temperature
    greedy, inv_t = inverse_temperature(t)
    u = a.draft_logits.float() * inv_t[:, None, None]
    x = a.draft_tokens.long().clamp(0, a.draft_logits.shape[-1] - 1)
    want = torch.softmax(u, -1).gather(-1, x[..., None])[..., 0]
    want = torch.where(greedy[:, None], torch.ones_like(want), want)
    got = a.draft_token_probs.float()
    bad = live & ((got - want).abs() > 1e-3 * want + 1e-6)
    if bool(bad.any()):
        r, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"draft_token_probs disagree with draft_logits (softmax at the draft temperature): request "
                         f"{r}, draft {j}: given {float(got[r, j]):.6g}, the logits give {float(want[r, j]):.6g}")


def _fake(a):
    num_req, gamma = a.draft_tokens.shape
    return (
        a.draft_tokens.new_empty((num_req, gamma + 1), dtype=torch.int32),
        a.draft_tokens.new_empty((num_req,), dtype=torch.int32),
    )


_RESIDUAL = "the residual at a rejection is computed from them"
OP = Op(
    "rejection_sample",
    [
        tensor("target_logits", "T, V", FLOAT),
        tensor("draft_tokens", "R, G", INT),
        tensor("draft_probs", "R, G, V", FLOAT, optional=True),
        tensor("lengths", "R", INT),
        tensor("cu_verify", "R+1", INT),
        tensor("temperature", "R", FLOAT64),
        tensor("seed", "R", INT64),
        scalar_tensor("offset", INT64),
        tensor("top_k", "R", INT, optional=True),
        tensor("top_p", "R", FLOAT64, optional=True),
        tensor("draft_token_probs", "R, G", FLOAT, optional=True, requires=(("draft_logits", _RESIDUAL),)),
        tensor("draft_logits", "R, G, V", FLOAT, optional=True),
        tensor("draft_temperature", "R", FLOAT64, optional=True,
               requires=(("draft_logits", "it is the temperature of draft_logits"),)),
    ],
    "(Tensor, Tensor)",
    impls=Implementations(
        "rejection_sample",
        reference=_reference,
        triton="dspark_kernels.triton.rejection_sample:rejection_sample",
        cuda="rejection_sample_cuda",
        not_auto=("cuda",),  # csrc/rejection_sample.cu compiles in CI but has not run on a GPU yet
    ),
    fake=_fake,
    check=_check,
    values=_values,
)
IMPLS = OP.impls


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
    A request with no verify rows emits nothing (all -1, num_accepted 0).

    Target distribution of a row: z = logits · (1 / T), the reciprocal rounded
    once per row; top-k keeps exactly k tokens, the first k in the order
    (z descending, token id ascending), so ties at the k-th value go to the
    lower ids and top_k = 1 is the greedy token; top-p then keeps, among the
    survivors, token i iff the mass of the survivors strictly more probable
    than i is < top_p, so tokens tied in probability are kept or dropped
    together; the kept probabilities are renormalised (rows at top_p >= 1 are
    left as they are). Draft distribution q_j: draft_probs[r, j]; or, in the
    byte-minimal mode (draft_token_probs + draft_logits), q_i = p_d(x_j) ·
    exp(u_i - u_{x_j}) with u = draft_logits[r, j] · (1 / T_d): the
    distribution whose value at x_j is the given p_d(x_j), equal to
    softmax(u) when they are consistent (as markov_draft's are), read only at
    the first rejection and with no pass for its normaliser (one-hot at x_j
    on greedy draft rows); with draft_logits alone, q = softmax(u) (one-hot at
    its first argmax when greedy); or e_{x_j} (one-hot drafts) when neither is
    given. A draft id outside [0, V) is rejected and has no draft
    distribution: the token emitted at its position is drawn from p_{j-1}.

    Randomness (Philox, dspark_kernels.rng): the coin of draft j is uniform
    (seed[r], offset, STREAM_ACCEPT, position j-1, index 0), accepting iff
    u · q_j(x_j) < p_{j-1}(x_j); the residual and bonus draws are Gumbel-max
    races over vocab ids on STREAM_RESIDUAL / STREAM_BONUS at position n_acc.
    The same seed and offset give the same tokens on every backend (up to fp32
    rounding of the normalisers, which can only flip a near-tie).

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

    Value checks (dspark_kernels.set_value_checks) reject inconsistent
    metadata, ids outside [0, V), NaN/Inf, draft_probs rows of live drafts that
    do not sum to 1 (within 1e-2) and draft_token_probs that disagree with
    draft_logits (relative 1e-3). Without them (the default on CUDA) nothing
    reads or writes out of bounds and every emitted id is in [0, V) or -1:
    lengths are clamped to [0, γ] and to the request's rows, a request whose
    rows do not start inside target_logits is inactive, NaN scores never win;
    unnormalised draft_probs or inconsistent draft_token_probs are used as
    given, so the emitted tokens then follow the residual they define, not the
    target distribution.

    Examples:
        Greedy target (temperature 0) whose argmax after the anchor is 2, then 3:
        draft [2, 5] keeps 2, rejects 5 and emits the target's 3.

        >>> import torch, dspark_kernels as dk
        >>> logits = torch.full((3, 6), -5.0)
        >>> logits[0, 2] = logits[1, 3] = logits[2, 1] = 5.0
        >>> tokens, n = dk.rejection_sample(logits, torch.tensor([[2, 5]]), None, torch.tensor([2]),
        ...                                 torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0.0]),
        ...                                 torch.tensor([7]), torch.tensor(0))
        >>> tokens.tolist(), n.tolist()
        ([[2, 3, -1]], [1])
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of rejection_sample (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([4, 0, 2], dtype=torch.int32)
    cu = torch.tensor([0, 5, 6, 9], dtype=torch.int32)
    x = dict(target_logits=torch.randn(11, 13, generator=g), draft_tokens=torch.randint(0, 13, (3, 4), generator=g),
             draft_probs=torch.softmax(torch.randn(3, 4, 13, generator=g), -1), lengths=lengths, cu_verify=cu,
             temperature=torch.tensor([1.0, 0.0, 0.7]), seed=torch.arange(3, dtype=torch.int64) + 11,
             offset=torch.tensor(3, dtype=torch.int64), top_k=torch.tensor([3, 0, 5]),
             top_p=torch.tensor([0.9, 1.0, 0.8]))
    return {k: v.to(device) for k, v in x.items()}
