"""dspark_kernels: GPU kernels for DSpark-style speculative decoding.

Every op is a torch op in the ``dspark`` namespace (torch.ops.dspark.<name>)
with a fake implementation for torch.compile and CUDA graphs; the functions
here are the stable Python API, one per entry of the op registry
(dspark_kernels.ops.OPS), each documented by its docstring. Choose the
implementation with ``backend=`` or DSPARK_BACKEND: "auto", "reference",
"triton", "cuda".

A released DeepSpec DSpark checkpoint drafts in two calls:
``head = dspark_kernels.load_deepspec(path)`` then ``head.draft(U, anchor,
temperature, seed, offset, hidden=h)`` (dspark_kernels.engine.deepspec).
"""

import importlib as _importlib

from ._backend import BACKENDS, BackendUnavailableError
from ._checks import debug_enabled, set_debug, set_value_checks, value_checks_enabled
from .ops import OPS as _OPS

__version__ = "0.1.0"


def _export() -> list[str]:
    """Each registered op's public function, and the result types its module declares."""
    names = []
    for op in _OPS:
        module = _importlib.import_module(f".ops.{op}", __name__)
        for name in (op, *getattr(module, "RESULT_TYPES", ())):
            globals()[name] = getattr(module, name)
            names.append(name)
    return names


# Engine modules whose ENGINE_EXPORTS are reached as dspark_kernels.<name>.
_ENGINE_MODULES = ("deepspec", "capacity", "round")


def _export_engine() -> list[str]:
    """Engine helpers a user reaches in one call (load_deepspec, DraftHead, CapacityPipe, DSparkRound), from the
    ENGINE_EXPORTS of each module in _ENGINE_MODULES."""
    names = []
    for stem in _ENGINE_MODULES:
        module = _importlib.import_module(f".engine.{stem}", __name__)
        for name in module.ENGINE_EXPORTS:
            globals()[name] = getattr(module, name)
            names.append(name)
    return names


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "debug_enabled",
    "set_debug",
    "set_value_checks",
    "value_checks_enabled",
    *_export(),
    *_export_engine(),
]
