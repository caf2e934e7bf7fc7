"""Sampling building blocks shared by the reference ops (fp32 math).

These formulas are the contract the Triton and CUDA kernels reproduce:

- scaled logits: z = logits · (1 / T), the reciprocal taken once per row in
  fp32 (one multiply per element, on every backend); rows with T below
  GREEDY_TEMPERATURE (e.g. 0) are greedy and use T = 1 for their statistics.
- target distribution of a row (filtered_probs): top-k keeps exactly k tokens,
  the first k in the order (z descending, token id ascending), so ties at the
  k-th value go to the lower ids and top_k = 1 is the greedy token (k <= 0 or
  k >= V: off); top-p then keeps, among those survivors, token i iff the mass
  of the survivors strictly more probable than i is < top_p, so tokens tied in
  probability are kept or dropped together (top_p >= 1: off); the kept
  probabilities are renormalised. A greedy row is a one-hot at the first
  index of its largest logit.
- an exact draw from weights w >= 0 is argmax_i(log w_i + G_i) with
  G_i = -log(-log u_i) and u_i the counter-based uniform of vocab id i
  (Gumbel-max); w_i == 0 gives -inf and can never win, and neither can a
  vocab id >= V because no such lane exists.
"""

from __future__ import annotations

import torch

from .. import rng
from ..constants import GREEDY_TEMPERATURE  # noqa: F401  (T below it is greedy; re-exported)


def greedy_onehot(logits: torch.Tensor) -> torch.Tensor:
    """One-hot [N, V] fp32 at the first index of each row's maximum."""
    out = torch.zeros_like(logits, dtype=torch.float32)
    if logits.shape[-1]:
        out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return out


def request_rows(cu_verify: torch.Tensor, counts: torch.Tensor, count_max: int,
                 num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts [R] int64, live [R] bool, counts [R] int64) of each request's verify rows on the unchecked
    path, where metadata is trusted only as far as it stays in bounds: a request is live when it has rows
    and its first row exists; its count (drafts or tree nodes) is clamped to [0, count_max], to its rows
    less one and to the rows left in the logits, and is 0 when not live (triton/ragged.request_rows)."""
    cu = cu_verify.to(torch.int64)
    starts = cu[:-1]
    live = (cu[1:] - starts > 0) & (starts >= 0) & (starts < num_rows)
    room = torch.minimum(num_rows - 1 - starts.clamp(0, num_rows - 1), cu[1:] - starts - 1)
    counts = torch.minimum(counts.to(torch.int64).clamp(0, count_max), room)
    return starts, live, torch.where(live, counts, torch.zeros_like(counts))


def inverse_temperature(temperature: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy [N] bool, 1 / T [N] fp32 with T = 1 on greedy rows): z = logits * inv_t."""
    t = temperature.float()
    greedy = t < GREEDY_TEMPERATURE
    return greedy, 1.0 / torch.where(greedy, torch.ones_like(t), t)


def topk_mask(z: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """[N, V] bool: the first k of each row in the order (z descending, id ascending); all when k <= 0 or >= V."""
    vocab = z.shape[-1]
    k = top_k.to(torch.int64)
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices  # stable: lower ids first on ties
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(vocab, device=z.device).expand_as(order))
    off = (k <= 0) | (k >= vocab)
    return (rank < k[:, None]) | off[:, None]


def topp_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[N, V] bool: token i kept iff the mass of tokens strictly more probable than i is < top_p."""
    p_sorted = torch.sort(probs, dim=-1, descending=True).values
    mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
    keep_sorted = mass_before < top_p.float()[:, None]
    # The kept set is a prefix of the sorted order; its smallest member is the
    # threshold, and every token tied with it stays too.
    last = keep_sorted.sum(dim=-1, keepdim=True).clamp(min=1) - 1
    threshold = p_sorted.gather(-1, last)
    return (probs >= threshold) | (top_p.float() >= 1.0)[:, None]  # rows at top_p >= 1 keep everything


def filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampling distribution [N, V] fp32 of each row (see the module docstring).

    logits [N, V] (any float dtype, read in fp32), temperature [N] fp32
    (below GREEDY_TEMPERATURE: greedy), top_k [N] int (<= 0 or >= V: off),
    top_p [N] float (>= 1: off).
    """
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy, inv_t = inverse_temperature(temperature)
    z = logits * inv_t[:, None]
    if top_k is not None and vocab:
        z = z.masked_fill(~topk_mask(z, top_k), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p is not None and vocab:
        kept = probs * topp_mask(probs, top_p)
        on = (top_p.float() < 1.0)[:, None]
        probs = torch.where(on, kept / kept.sum(dim=-1, keepdim=True), probs)
    return torch.where(greedy[:, None], greedy_onehot(logits), probs)


def gumbel_sample(
    weights: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    stream: int,
    position: torch.Tensor,
) -> torch.Tensor:
    """Exact draw [N] int64 from unnormalised weights [N, V] >= 0.

    Row n uses uniforms (seed[n], offset, stream, position[n], vocab id).
    """
    vocab = weights.shape[-1]
    index = torch.arange(vocab, dtype=torch.int64, device=weights.device)
    u = rng.uniform(seed[:, None], offset, stream, position[:, None], index[None, :])
    scores = torch.log(weights.float()) + rng.gumbel(u)
    return scores.argmax(dim=-1)


def gumbel_sample_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    stream: int,
    position: torch.Tensor | int,
) -> torch.Tensor:
    """Exact draw [N] int64 from softmax(logits / T); greedy rows take the first argmax.

    One pass over the logits: argmax_i(z_i + G_i) with z = logits * (1 / T) needs no normaliser.
    """
    n, vocab = logits.shape
    logits = logits.float()
    greedy, inv_t = inverse_temperature(temperature)
    index = torch.arange(vocab, dtype=torch.int64, device=logits.device)
    position = torch.as_tensor(position, dtype=torch.int64, device=logits.device).expand(n)
    u = rng.uniform(seed[:, None], offset, stream, position[:, None], index[None, :])
    sampled = (logits * inv_t[:, None] + rng.gumbel(u)).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
