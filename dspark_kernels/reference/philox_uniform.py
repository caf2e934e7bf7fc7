"""Reference philox_uniform: the RNG itself, evaluated in PyTorch."""

import torch

from .. import rng


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor, stream: int, position: int, n: int) -> torch.Tensor:
    index = torch.arange(n, dtype=torch.int64, device=seed.device)
    return rng.uniform(seed[:, None], offset, stream, position, index[None, :])
