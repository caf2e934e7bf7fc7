"""Deliberately biased samplers: each plants one bug, so the statistical harnesses
(markov_model.check_block, rejection_model.check_lossless) can be shown to reject
a sampler that does not follow the law (and to accept the copy with no bug)."""

from __future__ import annotations

import torch

from dspark_kernels import rng

from markov_model import f64


def biased_markov_sampler(bug, U, anchor_id, head, T, R, gen):
    """A vanilla Markov-head sampler (inverse CDF, torch.Generator) with one planted bug:

    None: correct; "no_bias": ignores the W2·W1 term; "wrong_temperature": samples at
    T = 1; "stale_prev": conditions every step on the anchor instead of x_{k-1};
    "transposed_w2": bias_v = W2[x]·W1[v] (embedding and unembedding swapped);
    "shared_uniform": one uniform per request for all steps (steps not independent).
    """
    w1, w2 = f64(head.w1), f64(head.w2)
    U = f64(U)
    gamma, V = U.shape
    prev = torch.full((R,), anchor_id, dtype=torch.int64)
    shared = torch.rand(R, generator=gen, dtype=torch.float64)
    tokens = torch.empty(R, gamma, dtype=torch.int64)
    for k in range(gamma):
        src = torch.full_like(prev, anchor_id) if bug == "stale_prev" else prev
        bias = w1[src] @ w2.T
        if bug == "no_bias":
            bias = torch.zeros_like(bias)
        if bug == "transposed_w2":
            bias = w2[src] @ w1.T
        t = 1.0 if bug == "wrong_temperature" else T
        p = torch.softmax((U[k] + bias) / t, dim=-1)
        u = shared if bug == "shared_uniform" else torch.rand(R, generator=gen, dtype=torch.float64)
        x = (torch.cumsum(p, -1) < u[:, None]).sum(-1).clamp(max=V - 1)
        tokens[:, k] = x
        prev = x
    return tokens


def biased_rejection_sample(bug, target_logits, draft_tokens, draft_probs, lengths, cu_verify,
                            temperature, seed, offset):
    """Chain rejection sampling (draft_probs mode, no top-k/top-p), with one planted bug:

    None: correct; "residual_is_target": residual = p instead of max(0, p - q);
    "ratio_inverted": accept iff u * p < q; "shared_coin": the residual is
    drawn by inverse CDF with the acceptance coin (shared stream);
    "bonus_off_by_one": the bonus is drawn from p_{l-1} instead of p_l.
    """
    R, gamma = draft_tokens.shape
    V = target_logits.shape[1]
    offset = torch.as_tensor(offset, dtype=torch.int64)
    pos = torch.arange(gamma + 1)
    req = torch.arange(R)
    rows = (cu_verify[:-1].long()[:, None] + pos[None, :]).clamp(max=target_logits.shape[0] - 1)
    p = torch.softmax(target_logits[rows].float() / temperature.float()[:, None, None], dim=-1)
    x = draft_tokens.long()
    p_x = p[:, :gamma].gather(-1, x[..., None]).squeeze(-1)
    q_x = draft_probs.float().gather(-1, x[..., None]).squeeze(-1)
    coin = rng.uniform(seed[:, None], offset, rng.STREAM_ACCEPT, pos[None, :gamma], 0)
    accept = (coin * p_x < q_x) if bug == "ratio_inverted" else (coin * q_x < p_x)
    accept &= pos[None, :gamma] < lengths.long()[:, None]
    n = accept.long().cumprod(-1).sum(-1)
    rejected = n < lengths.long()
    final_row = n
    if bug == "bonus_off_by_one":
        final_row = torch.where(rejected, n, (n - 1).clamp(min=0))
    p_final = p[req, final_row]
    j = n.clamp(max=gamma - 1)
    residual = p_final if bug == "residual_is_target" else (p_final - draft_probs[req, j].float()).clamp(min=0)
    empty = residual.sum(-1, keepdim=True) <= 0
    residual = torch.where(empty, p_final, residual)
    vocab_ids = torch.arange(V)

    def gumbel_draw(weights, stream):
        u = rng.uniform(seed[:, None], offset, stream, n[:, None], vocab_ids[None, :])
        return (torch.log(weights) - torch.log(-torch.log(u))).argmax(-1)

    if bug == "shared_coin":
        u = coin[req, j]
        cdf = torch.cumsum(residual / residual.sum(-1, keepdim=True), -1)
        y_res = (cdf < u[:, None]).sum(-1).clamp(max=V - 1)
    else:
        y_res = gumbel_draw(residual, rng.STREAM_RESIDUAL)
    y_bonus = gumbel_draw(p_final, rng.STREAM_BONUS)
    y = torch.where(rejected, y_res, y_bonus)
    tokens = torch.full((R, gamma + 1), -1, dtype=torch.int32)
    tokens[:, :gamma] = torch.where(pos[None, :gamma] < n[:, None], x, -1).to(torch.int32)
    tokens.scatter_(1, n[:, None], y[:, None].to(torch.int32))
    return tokens, n.to(torch.int32)
