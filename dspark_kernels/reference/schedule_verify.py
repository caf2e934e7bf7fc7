"""Reference schedule_verify: implements dspark_kernels.schedule_verify (DSpark Algorithm 1, §3.2.2, §5.2).

Strategy: one stable sort of the masked [R, γ] survival (ties by flat index
r·γ + j, which is the contract's order), prefix sums of the gains for τ_k and
Θ_k = τ_k · sps[B_k] along the admission path, the admitted count K by a
cumprod of "Θ rises" (causal) or the first argmax of the history's path
(async), and a scatter back to per-request lengths. Sorts, scans and
scatters of static shape: no host sync, so the op is capturable in a CUDA graph.
"""

from __future__ import annotations

import torch


def candidate_order(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted values [N] and flat indices [N] of [R, γ] candidates.

    Order: value descending, then flat index r·γ + j ascending; invalid
    candidates last. Stable sort of the row-major flattening gives the ties.
    """
    flat = torch.where(valid, values.float(), torch.full_like(values.float(), float("-inf"))).reshape(-1)
    sorted_vals, idx = torch.sort(flat, descending=True, stable=True)
    return sorted_vals, idx


def admission_path(sorted_vals: torch.Tensor, num_active: torch.Tensor, sps: torch.Tensor, num_valid: torch.Tensor):
    """Throughput Θ_k = τ_k · sps[B_k] for k = 0..N admitted candidates, and τ_k."""
    n = sorted_vals.shape[0]
    gains = torch.where(torch.arange(n, device=sorted_vals.device) < num_valid, sorted_vals, torch.zeros_like(sorted_vals))
    tau = torch.cat([num_active.reshape(1).float(), num_active.float() + torch.cumsum(gains, 0)])
    batch = num_active + torch.arange(n + 1, device=sorted_vals.device)
    theta = tau * sps.float()[batch.clamp(max=sps.shape[0] - 1)]
    return theta, tau


def schedule_verify(a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    survival, sps, mode, history, max_len, active = a.survival, a.sps, a.mode, a.history, a.max_len, a.active
    num_req, gamma = survival.shape
    device = survival.device
    act = active.bool() if active is not None else torch.ones(num_req, dtype=torch.bool, device=device)
    cap = max_len.to(torch.int64).clamp(0, gamma) if max_len is not None else torch.full((num_req,), gamma, device=device)
    pos = torch.arange(gamma, device=device)
    valid = act[:, None] & (pos[None, :] < cap[:, None])
    num_active = act.sum()
    num_valid = valid.sum()
    n = num_req * gamma

    cur_vals, cur_idx = candidate_order(survival, valid)
    if mode == "causal":
        theta, tau = admission_path(cur_vals, num_active, sps, num_valid)
        rises = (theta[1:] > theta[:-1]) & (torch.arange(n, device=device) < num_valid)
        admitted = rises.to(torch.int64).cumprod(0).sum()
    else:
        hist_vals, _ = candidate_order(history, valid)
        theta_h, _ = admission_path(hist_vals, num_active, sps, num_valid)
        path = torch.arange(n + 1, device=device) <= num_valid
        theta_h = torch.where(path, theta_h, torch.full_like(theta_h, float("-inf")))
        admitted = torch.argmax(theta_h)  # first maximum: the smallest best K
        _, tau = admission_path(cur_vals, num_active, sps, num_valid)

    take = (torch.arange(n, device=device) < admitted).to(torch.int32)
    chosen_req = torch.div(cur_idx, max(gamma, 1), rounding_mode="floor")
    lengths = torch.zeros(num_req, dtype=torch.int32, device=device).scatter_add_(0, chosen_req, take)
    rows = torch.where(act, lengths + 1, torch.zeros_like(lengths))
    cu_verify = torch.zeros(num_req + 1, dtype=torch.int32, device=device)
    cu_verify[1:] = torch.cumsum(rows, 0)
    total = cu_verify[-1].clone()
    # gather, not tau[admitted]: indexing with a 0-d device tensor reads it on the host.
    expected = tau.gather(0, admitted.reshape(1)).reshape(()).to(torch.float32)
    return lengths, cu_verify, total, expected
