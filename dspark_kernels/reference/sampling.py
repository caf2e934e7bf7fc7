"""Sampling building blocks shared by the reference ops (fp32 math).

The formulas here are the contract the Triton and CUDA kernels reproduce:

- target distribution of a row: z = logits / T (T >= 1e-5); top-k keeps every
  token whose z is >= the k-th largest z (ties at the boundary are kept;
  k <= 0 or k >= V disables it); then top-p keeps token i iff the mass of the
  tokens strictly more probable than i is < top_p (ties are kept together;
  top_p >= 1 disables it); the kept probabilities are renormalised. T < 1e-5
  (GREEDY_TEMPERATURE; e.g. 0) means greedy: a one-hot at the first index of the largest logit.
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


def filtered_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampling distribution [N, V] fp32 of each row (see module docstring).

    logits [N, V] (any float dtype, read in fp32), temperature [N] fp32
    (0 = greedy), top_k [N] int (<= 0 or >= V: off), top_p [N] float (>= 1: off).
    """
    logits = logits.float()
    n, vocab = logits.shape
    greedy = temperature.float() < GREEDY_TEMPERATURE
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    z = logits / safe_t[:, None]
    if top_k is not None and vocab:
        k = top_k.to(torch.int64)
        active = (k > 0) & (k < vocab)
        kth = torch.sort(z, dim=-1, descending=True).values.gather(-1, (k.clamp(1, vocab) - 1)[:, None])
        kth = torch.where(active[:, None], kth, torch.full_like(kth, float("-inf")))
        z = z.masked_fill(z < kth, float("-inf"))
    probs = torch.softmax(z, dim=-1)
    if top_p is not None and vocab:
        p_sorted = torch.sort(probs, dim=-1, descending=True).values
        mass_before = torch.cumsum(p_sorted, dim=-1) - p_sorted
        keep_sorted = mass_before < top_p.float()[:, None]
        # The kept set is a prefix of the sorted order; its smallest member is
        # the threshold, and every token tied with it stays too.
        last = keep_sorted.sum(dim=-1, keepdim=True).clamp(min=1) - 1
        threshold = p_sorted.gather(-1, last)
        active = top_p.float() < 1.0
        keep = (probs >= threshold) | ~active[:, None]
        probs = probs * keep
        probs = probs / probs.sum(dim=-1, keepdim=True)
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
    """Exact draw [N] int64 from softmax(logits / T); rows with T == 0 take the argmax.

    One pass over the logits: argmax_i(z_i / T + G_i) needs no normaliser.
    """
    n, vocab = logits.shape
    logits = logits.float()
    greedy = temperature.float() < GREEDY_TEMPERATURE
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)
    index = torch.arange(vocab, dtype=torch.int64, device=logits.device)
    position = torch.as_tensor(position, dtype=torch.int64, device=logits.device).expand(n)
    u = rng.uniform(seed[:, None], offset, stream, position[:, None], index[None, :])
    sampled = (logits / safe_t[:, None] + rng.gumbel(u)).argmax(dim=-1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)
