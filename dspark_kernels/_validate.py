"""Argument checks shared by the ops.

Metadata checks (rank, shape, dtype, device) cost no device work and always
run. Checks that read tensor values (token ids in range, lengths, NaN) run
always for CPU tensors and, for CUDA tensors, only in debug mode
(DSPARK_DEBUG=1 or dspark_kernels.set_debug(True)), because reading a device
value forces a host sync that would stall the engine and break graph capture.
Every message names the argument.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch

_DEBUG = {"on": os.environ.get("DSPARK_DEBUG", "0") not in ("", "0")}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT_DTYPES = (torch.int32, torch.int64)


def set_debug(on: bool) -> None:
    """Enable value checks (host syncs) on CUDA tensors too."""
    _DEBUG["on"] = bool(on)


def debug_enabled() -> bool:
    return _DEBUG["on"]


def value_checks(t: torch.Tensor) -> bool:
    """Whether value-reading checks should run for tensors on t's device."""
    return t.device.type == "cpu" or _DEBUG["on"]


def tensor(name: str, t, *, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def tensor_args(optional: Iterable[str] = (), **args) -> None:
    """Public wrappers call this before dispatch: a non-tensor argument is then a
    TypeError naming it instead of the dispatcher's schema cast error. Only
    isinstance checks, so the op's own metadata checks are not run twice."""
    optional = set(optional)
    for name, t in args.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must share one device")


def scalar_tensor(name: str, t, dtypes) -> None:
    tensor(name, t, dtypes=dtypes)
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{name} must be a 0-d (or one-element) tensor, got shape {tuple(t.shape)}")


def ids_in_range(name: str, t: torch.Tensor, upper: int) -> None:
    if t.numel() and value_checks(t):
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} holds token ids outside [0, {upper}): min {lo}, max {hi}")


def finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and value_checks(t) and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def not_nan(name: str, t: torch.Tensor) -> None:
    if t.numel() and value_checks(t) and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")
