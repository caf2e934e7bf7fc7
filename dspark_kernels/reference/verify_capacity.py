"""Reference verify_capacity: implements dspark_kernels.verify_capacity (DSpark §5.2, the capacity K).

Strategy: the history pass of the reference schedule_verify, shared with it
(reference/schedule_verify.py: ``requests`` for the admissible positions and
A, ``capacity`` for the candidates with history > 0, their stable sort by
value descending then flat index, the prefix sums τ'_k, Θ'_k = τ'_k ·
sps[A + k] and the first argmax over k = 0..N'), so mode="async" with
history and with capacity=verify_capacity(history) cannot disagree. Sort,
scan and argmax of static shape: no host sync, capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

from .schedule_verify import capacity, requests


def verify_capacity(a) -> torch.Tensor:
    num_req, gamma = a.history.shape
    slots, act = requests(num_req, gamma, a.max_len, a.active, a.history.device)
    return capacity(a.history, slots, act.sum(), a.sps).to(torch.int32)
