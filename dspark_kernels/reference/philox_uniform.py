"""Reference philox_uniform: implements dspark_kernels.philox_uniform with the PyTorch Philox of dspark_kernels.rng."""

import torch

from .. import rng


def philox_uniform(a) -> torch.Tensor:
    index = torch.arange(a.n, dtype=torch.int64, device=a.seed.device)
    return rng.uniform(a.seed[:, None], a.offset, a.stream, a.position, index[None, :])
