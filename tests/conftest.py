"""Test setup: run Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here.

The ``gpu`` marker means "needs a CUDA GPU": such tests are skipped (with
that reason) where torch sees none, and ``python -m bench.gpu_proof`` runs
them first (``pytest -m gpu``) when a GPU is lent.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(op_module) -> list[str]:
    """Concrete backends that can run ``op_module``'s op on DEVICE (reference always)."""
    return op_module.IMPLS.available(torch.device(DEVICE).type)


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs through the Triton interpreter here (Triton on CPU
    tensors): correct, but ~10-100 ms per program, so tests keep it to small shapes."""
    return backend == "triton" and torch.device(DEVICE).type == "cpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; skipped without one, run first by bench.gpu_proof")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE
