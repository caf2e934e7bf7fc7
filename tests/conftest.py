"""Test setup: run Triton kernels through the interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, hence here.
This file holds only pytest hooks and fixtures; the helpers that tests import
live in plain modules (support.py and the model / harness modules beside it).

The ``gpu`` marker means "needs a CUDA GPU": such tests are skipped (with
that reason) where torch sees none, and ``python -m bench.gpu_proof`` runs
them first (``pytest -m gpu``) when a GPU is lent.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from support import DEVICE, debug_mode  # noqa: E402


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


@pytest.fixture
def value_checks_on():
    """Value checks for the test: they run on CPU always; on CUDA only in debug mode."""
    with debug_mode(True):
        yield
