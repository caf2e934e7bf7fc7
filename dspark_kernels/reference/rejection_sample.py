"""Reference rejection_sample: implements dspark_kernels.rejection_sample (Leviathan et al. 2023;
Chen et al. 2023), vectorised over requests in fp32.

Strategy: the target distribution of every verify row (filtered_probs), the
acceptance of every draft at once, the accepted prefix as a cumprod of the
accept flags, then one Gumbel race per request for the residual (rejected) or
the bonus (all accepted) token, and a final select. Every row and draft is
read whatever the outcome: the reference is the definition, not the fast path.
"""

from __future__ import annotations

import torch

from .. import rng
from .sampling import GREEDY_TEMPERATURE, filtered_probs, gumbel_sample


def _draft_dist(draft_logits: torch.Tensor, draft_temperature: torch.Tensor) -> torch.Tensor:
    """q [N, V] fp32 from pre-temperature draft logits [N, V] and T_d [N]."""
    return filtered_probs(draft_logits, draft_temperature)


def rejection_sample(a) -> tuple[torch.Tensor, torch.Tensor]:
    target_logits, draft_tokens, draft_probs, lengths, cu_verify = (
        a.target_logits, a.draft_tokens, a.draft_probs, a.lengths, a.cu_verify)
    temperature, seed, offset, top_k, top_p = a.temperature, a.seed, a.offset, a.top_k, a.top_p
    draft_token_probs, draft_logits, draft_temperature = a.draft_token_probs, a.draft_logits, a.draft_temperature
    device = target_logits.device
    num_rows, vocab = target_logits.shape
    num_req, gamma = draft_tokens.shape
    tokens = torch.full((num_req, gamma + 1), -1, dtype=torch.int32, device=device)
    num_accepted = torch.zeros(num_req, dtype=torch.int32, device=device)
    if num_req == 0 or num_rows == 0:  # no verify rows at all: every request is inactive
        return tokens, num_accepted

    temperature = temperature.float()
    lengths = lengths.to(torch.int64).clamp(0, gamma)
    starts = cu_verify[:-1].to(torch.int64)
    greedy = temperature < GREEDY_TEMPERATURE
    req = torch.arange(num_req, device=device)
    pos = torch.arange(gamma + 1, device=device)

    # Target distribution of every verify row that exists: rows[r, j] = cu[r] + j.
    rows = (starts[:, None] + pos[None, :]).clamp(max=max(num_rows - 1, 0))
    flat_rows = rows.reshape(-1)
    expand = lambda t: None if t is None else t[:, None].expand(num_req, gamma + 1).reshape(-1)
    p_target = filtered_probs(
        target_logits[flat_rows], expand(temperature), expand(top_k), expand(top_p)
    ).reshape(num_req, gamma + 1, vocab)

    # Acceptance of each draft j (0-based) against target row j.
    drafts = draft_tokens.to(torch.int64).clamp(0, max(vocab - 1, 0))
    p_t_x = p_target[:, :gamma].gather(-1, drafts[..., None]).squeeze(-1)
    if draft_probs is not None:
        p_d_x = draft_probs.float().gather(-1, drafts[..., None]).squeeze(-1)
    elif draft_token_probs is not None:
        p_d_x = draft_token_probs.float()
    elif draft_logits is not None:
        t_d = (draft_temperature if draft_temperature is not None else temperature).float()
        q_all = _draft_dist(
            draft_logits.reshape(num_req * gamma, vocab), t_d[:, None].expand(num_req, gamma).reshape(-1)
        ).reshape(num_req, gamma, vocab)
        p_d_x = q_all.gather(-1, drafts[..., None]).squeeze(-1)
    else:
        p_d_x = torch.ones_like(p_t_x)
    coin = rng.uniform(seed[:, None], offset, rng.STREAM_ACCEPT, pos[None, :gamma], 0)
    target_argmax = p_target[:, :gamma].argmax(dim=-1)
    accept = torch.where(greedy[:, None], target_argmax == drafts, coin * p_d_x < p_t_x)
    accept &= pos[None, :gamma] < lengths[:, None]
    n_acc = accept.to(torch.int64).cumprod(dim=-1).sum(dim=-1)  # leading accepts

    # One more token at position n_acc: a residual draw if n_acc < l, else the bonus.
    p_final = p_target[req, n_acc]  # [R, V]
    rejected = n_acc < lengths
    j_rej = n_acc.clamp(max=max(gamma - 1, 0))
    if gamma == 0:  # nothing drafted, nothing rejected: only the bonus is drawn
        q_rej = torch.zeros_like(p_final)
    elif draft_probs is not None:
        q_rej = draft_probs[req, j_rej].float()
    elif draft_logits is not None:
        t_d = (draft_temperature if draft_temperature is not None else temperature).float()
        q_rej = _draft_dist(draft_logits[req, j_rej], t_d)
    else:
        q_rej = torch.zeros_like(p_final).scatter_(-1, drafts[req, j_rej][:, None], 1.0)
    residual = (p_final - q_rej).clamp(min=0.0)
    no_mass = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(no_mass, p_final, residual)
    y_res = gumbel_sample(residual, seed, offset, rng.STREAM_RESIDUAL, n_acc)
    y_bonus = gumbel_sample(p_final, seed, offset, rng.STREAM_BONUS, n_acc)
    y = torch.where(rejected, y_res, y_bonus)
    y = torch.where(greedy, p_final.argmax(dim=-1), y)

    # Requests with no verify rows (inactive in the schedule) emit nothing.
    live = (cu_verify[1:] - cu_verify[:-1]) > 0
    n_acc = torch.where(live, n_acc, torch.zeros_like(n_acc))
    y = torch.where(live, y, torch.full_like(y, -1))
    keep_draft = pos[None, :gamma] < n_acc[:, None]
    tokens[:, :gamma] = torch.where(keep_draft, drafts, -1).to(torch.int32)
    tokens.scatter_(1, n_acc[:, None], y[:, None].to(torch.int32))
    num_accepted.copy_(n_acc.to(torch.int32))
    return tokens, num_accepted
