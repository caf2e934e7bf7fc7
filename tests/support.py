"""Plain helpers shared by the test files: where tests run, which backends, moving tensors.

A module, not conftest.py: conftest.py holds only pytest hooks and fixtures
(and the TRITON_INTERPRET setup, which must run before triton is imported),
so nothing imports from it. Models, batch builders and harnesses live in
their own modules (markov_model, rejection_model, paged_batch, biased,
stats, host_sync).
"""

from __future__ import annotations

import contextlib

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def available_backends(op_module) -> list[str]:
    """Concrete backends that can run ``op_module``'s op on DEVICE (reference always)."""
    return op_module.IMPLS.available(torch.device(DEVICE).type)


def interpreted(backend: str) -> bool:
    """Whether ``backend`` runs through the Triton interpreter here (Triton on CPU
    tensors): correct, but ~10-100 ms per program, so tests keep it to small shapes."""
    return backend == "triton" and torch.device(DEVICE).type == "cpu"


def to_device(t, device=DEVICE):
    """A tensor moved to ``device`` (DEVICE by default); anything else (None, numbers) as is."""
    return t.to(device) if isinstance(t, torch.Tensor) else t


def to_cpu(t):
    """A tensor moved to the CPU; anything else (None, numbers) as is."""
    return t.cpu() if isinstance(t, torch.Tensor) else t


@contextlib.contextmanager
def debug_mode(on: bool):
    """dspark_kernels debug mode on or off for the block, then as it was.

    On: value checks (reading tensor values) run on CUDA tensors too (they
    always run on CPU tensors). Off: no value check syncs a CUDA device (graph
    capture, host-sync tests).
    """
    import dspark_kernels as dk

    was = dk.debug_enabled()
    dk.set_debug(on)
    try:
        yield
    finally:
        dk.set_debug(was)


def capture_graph(fn, warmup: int = 3):
    """(graph, outputs): fn() warmed up ``warmup`` times on a side stream (Triton compiles, the caching
    allocator settles; the torch.cuda.graphs recipe), then captured once. Replaying the graph rewrites
    ``outputs`` in place from whatever the captured input tensors hold."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@contextlib.contextmanager
def count_launches():
    """Counts Triton kernel launches in the block: a list whose length is the count, one kernel
    name per launch (interpreted grids on CPU, compiled launches on a GPU)."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    names: list[str] = []
    grid_call, run = interp.GridExecutor.__call__, jit.JITFunction.run

    def counted_grid(self, *a, **k):
        names.append(getattr(self.fn, "__name__", "?"))
        return grid_call(self, *a, **k)

    def counted_run(self, *a, **k):
        if not k.get("warmup", False):
            names.append(self.fn.__name__)
        return run(self, *a, **k)

    interp.GridExecutor.__call__, jit.JITFunction.run = counted_grid, counted_run
    try:
        yield names
    finally:
        interp.GridExecutor.__call__, jit.JITFunction.run = grid_call, run
