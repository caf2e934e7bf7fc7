"""dspark::append_verify_kv: write the verify rows' keys and values into the paged KV cache, in place."""

from __future__ import annotations

import torch

from .._backend import Implementations
from .._op import FLOAT, INT, Op, tensor
from ..reference.append_verify_kv import append_verify_kv as _reference


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _check(a, dims):
    """Metadata the table cannot say (no device reads)."""
    for name in ("key", "value", "v_cache"):
        t = getattr(a, name)
        if t.dtype != a.k_cache.dtype:
            raise TypeError(f"{name} has dtype {_dtype_name(t.dtype)} but k_cache has {_dtype_name(a.k_cache.dtype)}; "
                            "key, value, k_cache and v_cache must share one dtype")
    if dims["S"] < 1:
        raise ValueError(f"k_cache must have a positive page size (dimension 1), got shape {tuple(a.k_cache.shape)}")


def _values(a):
    """Checks that read values (see dspark_kernels._checks for when they run)."""
    slots = a.slot_mapping
    if not slots.numel():
        return
    num_slots = a.k_cache.shape[0] * a.k_cache.shape[1]
    lo, hi = int(slots.min()), int(slots.max())
    if lo < 0 or hi >= num_slots:
        raise ValueError(f"slot_mapping holds slots outside [0, {num_slots}) (k_cache pages x page_size): "
                         f"min {lo}, max {hi}")


OP = Op(
    "append_verify_kv",
    [
        tensor("key", "T, Hkv, D", FLOAT),
        tensor("value", "T, Hkv, D", FLOAT),
        tensor("k_cache", "P, S, Hkv, D", FLOAT, mutated=True),
        tensor("v_cache", "P, S, Hkv, D", FLOAT, mutated=True),
        tensor("slot_mapping", "T", INT),
    ],
    "()",
    impls=Implementations("append_verify_kv", reference=_reference,
                          triton="dspark_kernels.triton.append_verify_kv:append_verify_kv"),
    fake=lambda a: None,
    check=_check,
    values=_values,
)
IMPLS = OP.impls


def append_verify_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    backend: str | None = None,
) -> None:
    """Scatter each verify row's key and value into its slot of the paged KV cache, in place.

    Math: for every row t with 0 <= s = slot_mapping[t] < P·S,

        k_cache[s // S, s % S] = key[t]        (= k_cache.view(-1, Hkv, D)[s] for a contiguous cache)
        v_cache[s // S, s % S] = value[t]

    as vLLM's reshape_and_cache / FlashInfer's append_paged_kv_cache, with the
    layout verify_attention reads (slot_mapping from pack_verify: padding rows
    carry the engine's scratch slot and simply write there). Nothing else of
    the cache changes. Rows that share a slot: one of them wins, which one is
    unspecified on a GPU (programs race, as in vLLM); the reference and the
    Triton interpreter keep the last row. A scratch slot shared by padding rows
    therefore ends up holding one padding row's key and value. No host sync, no
    allocation that depends on values (CUDA-graph capturable); one launch on
    the Triton path.

    Args:
        key, value: [T, Hkv, D] in the caches' dtype (fp32/fp16/bf16), any strides.
        k_cache, v_cache: [P, S, Hkv, D] (pages, page size, kv heads, head dim), written in
            place; any strides (k and v may be views into one interleaved buffer) but they
            must not overlap each other or key / value.
        slot_mapping: [T] int32/int64 slot per row, s = page · S + offset in the page.
        backend: "auto" | "reference" | "triton" | "cuda".

    Values (checked on CPU always, on CUDA in debug mode; set_value_checks):
    every slot in [0, P·S), else a ValueError naming slot_mapping.

    Unchecked path (value checks off): a row whose slot is outside [0, P·S)
    is skipped (reads nothing, writes nothing); no input reads or writes out of
    bounds.

    Returns:
        None (k_cache and v_cache are written in place).

    Examples:
        Two pages of 4 slots, one kv head of size 2; rows 0 and 1 go to slots 5
        and 2, the padding row to scratch slot 7.

        >>> import torch, dspark_kernels as dk
        >>> k = torch.zeros(2, 4, 1, 2); v = torch.zeros(2, 4, 1, 2)
        >>> key = torch.tensor([[[1., 2.]], [[3., 4.]], [[9., 9.]]]); value = -key
        >>> dk.append_verify_kv(key, value, k, v, torch.tensor([5, 2, 7]))
        >>> k[1, 1, 0].tolist(), k[0, 2, 0].tolist(), v[1, 1, 0].tolist(), int((k != 0).sum())
        ([1.0, 2.0], [3.0, 4.0], [-1.0, -2.0], 6)
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of append_verify_kv (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(0)
    return dict(key=torch.randn(5, 2, 8, generator=g).to(device), value=torch.randn(5, 2, 8, generator=g).to(device),
                k_cache=torch.zeros(3, 4, 2, 8, device=device), v_cache=torch.zeros(3, 4, 2, 8, device=device),
                slot_mapping=torch.tensor([9, 10, 2, 11, 11], dtype=torch.int64, device=device))
