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
from .sampling import filtered_probs, greedy_onehot, gumbel_sample, inverse_temperature, request_rows


def rejection_sample(a) -> tuple[torch.Tensor, torch.Tensor]:
    device = a.target_logits.device
    num_rows, vocab = a.target_logits.shape
    num_req, gamma = a.draft_tokens.shape
    tokens = torch.full((num_req, gamma + 1), -1, dtype=torch.int32, device=device)
    num_accepted = torch.zeros(num_req, dtype=torch.int32, device=device)
    if num_req == 0 or num_rows == 0:  # no verify rows at all: every request is inactive
        return tokens, num_accepted

    req = torch.arange(num_req, device=device)
    pos = torch.arange(gamma + 1, device=device)
    # Unchecked path: a request verifies at most the drafts whose target rows exist.
    starts, live, lengths = request_rows(a.cu_verify, a.lengths, gamma, num_rows)
    greedy, _ = inverse_temperature(a.temperature)

    # Target distribution of every row a request may read: rows[r, j] = cu[r] + j.
    rows = (starts.clamp(0, num_rows - 1)[:, None] + pos[None, :]).clamp(max=num_rows - 1).reshape(-1)
    expand = lambda t: None if t is None else t[:, None].expand(num_req, gamma + 1).reshape(-1)  # noqa: E731
    p_target = filtered_probs(a.target_logits[rows], expand(a.temperature), expand(a.top_k), expand(a.top_p))
    p_target = p_target.reshape(num_req, gamma + 1, vocab)

    # Acceptance of draft j (0-based) against target row j. A draft id outside [0, V) is rejected.
    drafts = a.draft_tokens.to(torch.int64)
    valid = (drafts >= 0) & (drafts < vocab)
    x = drafts.clamp(0, vocab - 1)
    p_t_x = p_target[:, :gamma].gather(-1, x[..., None]).squeeze(-1)
    q_all = None
    if a.draft_probs is not None:
        p_d_x = a.draft_probs.float().gather(-1, x[..., None]).squeeze(-1)
    elif a.draft_token_probs is not None:
        p_d_x = a.draft_token_probs.float()
    elif a.draft_logits is not None:
        q_all = _draft_softmax(a, torch.arange(num_req * gamma, device=device) // gamma,
                               a.draft_logits.reshape(num_req * gamma, vocab)).reshape(num_req, gamma, vocab)
        p_d_x = q_all.gather(-1, x[..., None]).squeeze(-1)
    else:
        p_d_x = torch.ones_like(p_t_x)
    coin = rng.uniform(a.seed[:, None], a.offset, rng.STREAM_ACCEPT, pos[None, :gamma], 0)
    target_argmax = p_target[:, :gamma].argmax(dim=-1)
    accept = torch.where(greedy[:, None], target_argmax == x, coin * p_d_x < p_t_x)
    accept &= valid & (pos[None, :gamma] < lengths[:, None])
    n_acc = accept.to(torch.int64).cumprod(dim=-1).sum(dim=-1)  # leading accepts

    # One more token at position n_acc: a residual draw if n_acc < l, else the bonus.
    p_final = p_target[req, n_acc]  # [R, V]
    rejected = n_acc < lengths
    j_rej = n_acc.clamp(max=max(gamma - 1, 0))
    q_rej = torch.zeros_like(p_final)
    if gamma:
        if a.draft_probs is not None:
            q_rej = a.draft_probs[req, j_rej].float()
        elif a.draft_token_probs is not None:
            q_rej = _draft_implied(a, req, j_rej, x[req, j_rej], p_d_x[req, j_rej])
        elif q_all is not None:
            q_rej = q_all[req, j_rej]
        else:
            q_rej = q_rej.scatter(-1, x[req, j_rej][:, None], 1.0)
        # An invalid draft carries no draft distribution: the residual is the target itself.
        q_rej = torch.where(valid[req, j_rej][:, None], q_rej, torch.zeros_like(q_rej))
    residual = torch.where(p_final > q_rej, p_final - q_rej, torch.zeros_like(p_final))
    no_mass = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(no_mass, p_final, residual)
    y_res = gumbel_sample(residual, a.seed, a.offset, rng.STREAM_RESIDUAL, n_acc)
    y_bonus = gumbel_sample(p_final, a.seed, a.offset, rng.STREAM_BONUS, n_acc)
    y = torch.where(rejected, y_res, y_bonus)
    y = torch.where(greedy, p_final.argmax(dim=-1), y)

    # Requests with no verify rows (inactive in the schedule) emit nothing.
    n_acc = torch.where(live, n_acc, torch.zeros_like(n_acc))
    y = torch.where(live, y, torch.full_like(y, -1))
    keep_draft = pos[None, :gamma] < n_acc[:, None]
    tokens[:, :gamma] = torch.where(keep_draft, drafts, -1).to(torch.int32)
    tokens.scatter_(1, n_acc[:, None], y[:, None].to(torch.int32))
    num_accepted.copy_(n_acc.to(torch.int32))
    return tokens, num_accepted


def _draft_inverse_temperature(a, req: torch.Tensor):
    t = a.draft_temperature if a.draft_temperature is not None else a.temperature
    return inverse_temperature(t[req])


def _draft_softmax(a, req: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """q = softmax(draft_logits · (1 / T_d)) of the given rows (one-hot at their argmax when greedy)."""
    greedy, inv_t = _draft_inverse_temperature(a, req)
    probs = torch.softmax(logits.float() * inv_t[:, None], dim=-1)
    return torch.where(greedy[:, None], greedy_onehot(logits), probs)


def _draft_implied(a, req, j, x, p_d_x) -> torch.Tensor:
    """Byte-minimal mode: q_i = p_d(x) · exp(u_i - u_x), u = draft_logits · (1 / T_d): the draft
    distribution whose value at x is the given p_d(x) (softmax(u) when p_d is consistent with the logits;
    its normaliser needs no pass over the row). Greedy draft rows: one-hot at x."""
    greedy, inv_t = _draft_inverse_temperature(a, req)
    u = a.draft_logits[req, j].float() * inv_t[:, None]
    u_x = u.gather(-1, x[:, None])
    q = p_d_x[:, None] * torch.exp(u - u_x)
    onehot = torch.zeros_like(q).scatter_(-1, x[:, None], 1.0)
    return torch.where(greedy[:, None], onehot, q)
