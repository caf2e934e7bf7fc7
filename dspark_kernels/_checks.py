"""Value checks: the argument checks that read tensor values.

Metadata checks (rank, shape, dtype, device; dspark_kernels._op) cost no
device work and always run. Checks that read values (token ids in range,
lengths, NaN) force a host sync on a GPU, which would stall the engine and
break graph capture, so they are switched:

- default: on for CPU tensors; on CUDA tensors only in debug mode
  (DSPARK_DEBUG=1 or ``set_debug(True)``);
- ``set_value_checks(True | False)`` or DSPARK_VALUE_CHECKS=1 / 0 forces them
  on or off on every device (False: the unchecked fast path, testable on
  CPU); ``set_value_checks(None)`` restores the default.

Every message names the argument.
"""

from __future__ import annotations

import os

import torch


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None or value == "" else value not in ("0", "false", "False")


_STATE = {"debug": bool(_env_flag("DSPARK_DEBUG")), "forced": _env_flag("DSPARK_VALUE_CHECKS")}


def set_debug(on: bool) -> None:
    """Enable value checks (host syncs) on CUDA tensors too (unless forced by set_value_checks)."""
    _STATE["debug"] = bool(on)


def debug_enabled() -> bool:
    return _STATE["debug"]


def set_value_checks(on: bool | None) -> None:
    """True / False: value checks on / off on every device; None: the default (see module docstring)."""
    if on is not None and not isinstance(on, bool):
        raise TypeError(f"set_value_checks takes True, False or None, got {on!r}")
    _STATE["forced"] = on


def value_checks_enabled(device_type: str) -> bool:
    """Whether value-reading checks run for tensors on this device type."""
    forced = _STATE["forced"]
    if forced is not None:
        return forced
    return device_type == "cpu" or _STATE["debug"]


def value_checks(t: torch.Tensor) -> bool:
    """Whether value-reading checks should run for tensors on t's device."""
    return value_checks_enabled(t.device.type)


def ids_in_range(name: str, t: torch.Tensor, upper: int) -> None:
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} holds token ids outside [0, {upper}): min {lo}, max {hi}")


def finite(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def not_nan(name: str, t: torch.Tensor | None) -> None:
    if t is not None and t.numel() and bool(torch.isnan(t).any()):
        raise ValueError(f"{name} contains NaN")


def logits_rows(name: str, t: torch.Tensor, what: str = "row") -> None:
    """NaN, +Inf, or a row with no finite logit: none has a distribution to sample."""
    not_nan(name, t)
    if t.numel():
        if bool(torch.isposinf(t).any()):
            raise ValueError(f"{name} contains +Inf")
        if bool((t.amax(dim=-1) == float("-inf")).any()):
            raise ValueError(f"{name} has a {what} with no finite logit")


def temperatures(name: str, t: torch.Tensor | None, *, zero_ok: bool = True) -> None:
    if t is None:
        return
    finite(name, t)
    if zero_ok and bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0 (0 means greedy)")
    if not zero_ok and bool((t <= 0).any()):
        raise ValueError(f"{name} must be > 0")


def ragged_offsets(cu_verify: torch.Tensor, lengths: torch.Tensor, gamma: int) -> torch.Tensor:
    """lengths in [0, γ] and cu_verify = 0, then + lengths + 1 per request (or + 0: inactive); returns cu int64."""
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 0 or hi > gamma:
        raise ValueError(f"lengths must lie in [0, {gamma}] (gamma = the draft dimension), got min {lo}, max {hi}")
    cu = cu_verify.to(torch.int64)
    rows = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or not bool(((rows == lengths.to(torch.int64) + 1) | (rows == 0)).all()):
        raise ValueError(
            "cu_verify must start at 0 and grow by lengths + 1 per request "
            "(anchor + drafts), or by 0 for an inactive request"
        )
    return cu


def verify_target(a, total: int) -> None:
    """The target side of a verification sampler (rejection_sample, tree_rejection_sample): its first
    `total` logits rows, temperature and top_p."""
    logits_rows("target_logits", a.target_logits[:total])
    temperatures("temperature", a.temperature)
    if a.top_p is not None:
        not_nan("top_p", a.top_p)
        if bool(((a.top_p <= 0) | (a.top_p > 1)).any()):
            raise ValueError("top_p must lie in (0, 1]")


def distribution_rows(name: str, probs: torch.Tensor, live: torch.Tensor, what: str) -> None:
    """probs [..., V] finite and non-negative, and its rows where `live` sum to 1 within 1e-2: that admits
    probabilities rounded to bf16 (relative 2^-9 per element) and catches logits or unnormalised weights
    passed by mistake, with which the residual would not be lossless. `what` names the rows (drafts, nodes)."""
    finite(name, probs)
    if bool((probs < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    sums = probs[live].double().sum(-1)
    tol = 1e-2
    if sums.numel() and float((sums - 1).abs().max()) > tol:
        raise ValueError(f"{name} rows of live {what} must sum to 1 (within {tol}): the residual would not be "
                         f"lossless; got sums from {float(sums.min()):.6g} to {float(sums.max()):.6g}")
