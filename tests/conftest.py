"""Test setup: run Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(op_module) -> list[str]:
    """Concrete backends that can run ``op_module``'s op on DEVICE (reference always)."""
    return op_module.BACKENDS.available(torch.device(DEVICE).type)


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs through the Triton interpreter here (Triton on CPU
    tensors): correct, but ~10-100 ms per program, so tests keep it to small shapes."""
    return backend == "triton" and torch.device(DEVICE).type == "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
