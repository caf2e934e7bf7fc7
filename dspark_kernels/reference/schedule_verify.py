"""Reference schedule_verify: implements dspark_kernels.schedule_verify (DSpark Algorithm 1, §3.2.2, §5.2).

Strategy: the candidates (active request, j < cap, fp32 value > 0: Alg. 1
line 4), one stable sort of the masked [R, γ] survival (ties by flat index
r·γ + j, which is the contract's order), prefix sums of the gains for τ_k and
Θ_k = τ_k · sps[B_k] along the admission path, the admitted count K by a
cumprod of "Θ rises" (causal), or min(capacity, candidates) in async mode with
capacity = the first argmax of the history's own path (``capacity``, which
reference/verify_capacity.py runs too) or the given tensor, and a scatter
back to per-request lengths. Sorts, scans and scatters of static shape: no
host sync, so the op is capturable in a CUDA graph.
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


def requests(num_req: int, gamma: int, max_len, active, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, γ] mask of the positions that may hold a candidate (active, j < clamp(max_len, 0, γ)), and active [R]."""
    act = active.bool() if active is not None else torch.ones(num_req, dtype=torch.bool, device=device)
    cap = max_len.to(torch.int64).clamp(0, gamma) if max_len is not None else torch.full((num_req,), gamma, device=device)
    pos = torch.arange(gamma, device=device)
    return act[:, None] & (pos[None, :] < cap[:, None]), act


def candidates(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Candidates among `slots`: fp32 value > 0 (Alg. 1 line 4; NaN, zeros and negatives are not)."""
    return slots & (values.float() > 0)


def capacity(values: torch.Tensor, slots: torch.Tensor, num_active: torch.Tensor, sps: torch.Tensor) -> torch.Tensor:
    """K = the first argmax of Θ_k, k = 0..N, over `values`' own admission path (N its candidates): 0-d int64."""
    valid = candidates(values, slots)
    num_valid = valid.sum()
    vals, _ = candidate_order(values, valid)
    theta, _ = admission_path(vals, num_active, sps, num_valid)
    path = torch.arange(theta.shape[0], device=theta.device) <= num_valid
    theta = torch.where(path, theta, torch.full_like(theta, float("-inf")))
    return torch.argmax(theta)  # first maximum: the smallest best K (a NaN wins, the first one)


def schedule_verify(a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    survival, sps, mode, history, max_len, active, given = (
        a.survival, a.sps, a.mode, a.history, a.max_len, a.active, a.capacity)
    num_req, gamma = survival.shape
    device = survival.device
    slots, act = requests(num_req, gamma, max_len, active, device)
    num_active = act.sum()
    valid = candidates(survival, slots)
    num_valid = valid.sum()
    n = num_req * gamma

    cur_vals, cur_idx = candidate_order(survival, valid)
    theta, tau = admission_path(cur_vals, num_active, sps, num_valid)
    if mode == "causal":
        rises = (theta[1:] > theta[:-1]) & (torch.arange(n, device=device) < num_valid)
        admitted = rises.to(torch.int64).cumprod(0).sum()
    else:
        k = capacity(history, slots, num_active, sps) if given is None else given.to(torch.int64)
        admitted = torch.minimum(k.clamp(min=0), num_valid)

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
