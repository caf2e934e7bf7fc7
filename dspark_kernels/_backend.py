"""Backend choice: which implementation of an op runs.

Each op has up to three implementations: "reference" (plain PyTorch, fp32
math, any device; the definition of correct), "triton" and "cuda" (kernels of
the dspark_kernels._C extension). Callers choose with the ``backend=`` keyword
of the public function or the DSPARK_BACKEND environment variable (the
keyword wins); "auto" picks the fastest one that is present for the tensors'
device: cuda, then triton, then reference on CUDA tensors, and reference on
CPU. "auto" never picks an implementation that is not built, nor one listed
in ``not_auto`` (built but not yet verified on a GPU); an explicit choice
that cannot run raises BackendUnavailableError saying what is missing.

Resolution is cached per (backend, device type, DSPARK_BACKEND,
TRITON_INTERPRET): a call pays a dict lookup, not an environment scan and an
import. ``Implementations.cache_clear()`` forgets the bindings (tests that
fake a missing extension use it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

BACKENDS = ("auto", "reference", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """True when Triton kernels run on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_extension():
    """The loaded dspark_kernels._C library, or None when it was not built."""
    from . import _extension

    return _extension.load()


def _import(target: str) -> Callable:
    """A "module:function" path, imported; or the name of a torch.ops.dspark op (the CUDA
    extension's kernel op), called with the argument record's fields in order."""
    if ":" not in target:
        import torch

        op = getattr(torch.ops.dspark, target)
        return lambda a: op(*a)
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


@dataclass(frozen=True)
class Implementations:
    """Where one op's implementations live; each takes the op's argument record.

    reference: the callable. triton / cuda: "module:function" imported on
    first use (importing triton costs ~1 s); cuda may instead name the
    extension's op (torch.ops.dspark.<cuda>, schema = the record's fields,
    defined by dspark_kernels._op). not_auto: backends "auto" must not pick
    yet (built and callable explicitly, not yet verified on a GPU).
    """

    name: str
    reference: Callable
    triton: str | None = None
    cuda: str | None = None
    not_auto: tuple[str, ...] = ()
    _bound: dict = field(default_factory=dict, compare=False, repr=False)

    def missing(self, backend: str, device_type: str) -> str | None:
        """Why ``backend`` cannot run this op on ``device_type``; None if it can."""
        if backend == "reference":
            return None
        if backend == "triton":
            if self.triton is None:
                return f"{self.name} has no Triton implementation yet"
            if not _triton_importable():
                return "triton is not installed"
            if device_type == "cpu" and not triton_interpret():
                return (
                    "Triton kernels run on CPU tensors only under the interpreter: "
                    "set TRITON_INTERPRET=1 before triton is first imported"
                )
            if device_type not in ("cpu", "cuda"):
                return f"Triton does not run on device type {device_type!r}"
            return None
        if backend == "cuda":
            if self.cuda is None:
                return f"{self.name} has no CUDA (csrc/) implementation yet"
            if device_type != "cuda":
                return f"the cuda backend needs CUDA tensors, got {device_type} tensors"
            if cuda_extension() is None:
                from . import _extension

                return (
                    "the CUDA extension dspark_kernels._C is not built "
                    f"({_extension.why_missing()}); reinstall with DSPARK_BUILD_CUDA=1 "
                    "on a machine with CUDA torch and nvcc"
                )
            return None
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")

    def resolve(self, backend: str, device_type: str) -> str:
        """Concrete backend for this call; raises if an explicit one cannot run."""
        if not backend:
            backend = os.environ.get("DSPARK_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            order = ("cuda", "triton", "reference") if device_type == "cuda" else ("reference",)
            return next(b for b in order if b not in self.not_auto and self.missing(b, device_type) is None)
        why = self.missing(backend, device_type)
        if why is not None:
            raise BackendUnavailableError(f"backend={backend!r} for {self.name}: {why}")
        return backend

    def bound(self, backend: str, device_type: str) -> Callable:
        """The implementation callable for this call (cached; raises like resolve)."""
        key = (backend, device_type, os.environ.get("DSPARK_BACKEND"), os.environ.get("TRITON_INTERPRET"))
        fn = self._bound.get(key)
        if fn is None:
            chosen = self.resolve(backend, device_type)
            fn = self.reference if chosen == "reference" else _import(getattr(self, chosen))
            self._bound[key] = fn
        return fn

    def cache_clear(self) -> None:
        self._bound.clear()

    def available(self, device_type: str) -> list[str]:
        return [b for b in BACKENDS[1:] if self.missing(b, device_type) is None]
