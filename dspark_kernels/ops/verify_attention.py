"""dspark::verify_attention: ragged chain/tree verification attention over a paged KV cache."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _validate as V
from .._backend import OpBackends
from ..reference.verify_attention import tree_bits
from ..reference.verify_attention import verify_attention as _reference

BACKENDS = OpBackends(
    name="verify_attention",
    reference=_reference,
    triton="dspark_kernels.triton.verify_attention:verify_attention",
)

# A tree mask row is two int32 words: at most 64 verify tokens per request.
MAX_TREE_TOKENS = 64


def _check(q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask, sm_scale, window, softcap):
    """Metadata checks (no device reads); see _check_values for the rest."""
    V.tensor("q", q, ndim=3, dtypes=V.FLOAT_DTYPES)
    V.tensor("k_cache", k_cache, ndim=4, dtypes=V.FLOAT_DTYPES)
    V.tensor("v_cache", v_cache, ndim=4, dtypes=V.FLOAT_DTYPES)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but q has "
                            f"{str(q.dtype).replace('torch.', '')}; q, k_cache and v_cache must share one dtype")
    num_rows, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv, kv_dim = k_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"k_cache has head dim {kv_dim} but q has {head_dim}")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}")
    if head_dim < 1 or page_size < 1 or num_kv < 1:
        raise ValueError(f"k_cache dims must be positive, got shape {tuple(k_cache.shape)}")
    if num_heads < 1 or num_heads % num_kv:
        raise ValueError(f"q has {num_heads} heads, not a positive multiple of the {num_kv} kv heads of k_cache (GQA)")
    V.tensor("page_table", page_table, ndim=2, dtypes=V.INT_DTYPES)
    num_req = page_table.shape[0]
    V.tensor("kv_lens", kv_lens, ndim=1, dtypes=V.INT_DTYPES)
    V.shape("kv_lens", kv_lens, (num_req,))
    V.tensor("cu_verify", cu_verify, ndim=1, dtypes=V.INT_DTYPES)
    V.shape("cu_verify", cu_verify, (num_req + 1,))
    if tree_mask is not None:
        V.tensor("tree_mask", tree_mask, ndim=2, dtypes=(torch.int32,))
        if tree_mask.shape[0] != num_rows or not 1 <= tree_mask.shape[1] <= MAX_TREE_TOKENS // 32:
            raise ValueError(f"tree_mask must have shape ({num_rows}, W) with W in 1..{MAX_TREE_TOKENS // 32} "
                             f"int32 words, got {tuple(tree_mask.shape)}")
    if sm_scale is not None and not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite float or None, got {sm_scale}")
    if window != -1 and window < 1:
        raise ValueError(f"window must be -1 (off) or >= 1, got {window}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be 0 (off) or a positive finite float, got {softcap}")
    V.same_device("q", q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, kv_lens=kv_lens,
                  cu_verify=cu_verify, tree_mask=tree_mask)


def _check_values(q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask):
    """Checks that read values: always on CPU, on CUDA only in debug mode."""
    if not V.value_checks(q):
        return
    num_rows = q.shape[0]
    num_pages, page_size = k_cache.shape[:2]
    cu = cu_verify.to(torch.int64)
    if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) > num_rows:
        raise ValueError(f"cu_verify must start at 0, never decrease and end at most at q.shape[0] = {num_rows}, "
                         f"got {cu.tolist() if cu.numel() <= 16 else 'a tensor that does not'}")
    if page_table.shape[0] == 0:
        return
    n = cu[1:] - cu[:-1]
    lens = kv_lens.to(torch.int64)
    if bool((lens < 0).any()):
        raise ValueError(f"kv_lens must be >= 0, got min {int(lens.min())}")
    if bool((lens < n).any()):
        r = int((lens < n).nonzero()[0, 0])
        raise ValueError(f"kv_lens must include the verify tokens (kv_lens[r] >= n_r): request {r} has "
                         f"kv_lens {int(lens[r])} < n_r {int(n[r])}")
    used = (lens + page_size - 1) // page_size
    if int(used.max()) > page_table.shape[1]:
        raise ValueError(f"page_table has {page_table.shape[1]} pages per request but kv_lens needs up to "
                         f"{int(used.max())} pages of {page_size}")
    live = torch.arange(page_table.shape[1], device=q.device)[None, :] < used[:, None]
    ids = page_table[live]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
        raise ValueError(f"page_table holds page ids outside [0, {num_pages}) (k_cache pages) within kv_lens: "
                         f"min {int(ids.min())}, max {int(ids.max())}")
    if tree_mask is None:
        return
    if int(n.max()) > 32 * tree_mask.shape[1]:
        raise ValueError(f"tree_mask holds {32 * tree_mask.shape[1]} tokens per row but a request verifies "
                         f"{int(n.max())} (at most {MAX_TREE_TOKENS} with a tree)")
    total = int(cu[-1])
    if total:
        row_req = torch.repeat_interleave(torch.arange(n.numel(), device=q.device), n)
        local = torch.arange(total, device=q.device) - cu[:-1][row_req]
        bits = tree_bits(tree_mask[:total], 32 * tree_mask.shape[1])
        j = torch.arange(bits.shape[1], device=q.device)
        if not bool(bits[torch.arange(total, device=q.device), local].all()):
            raise ValueError("tree_mask row t must set bit t (every verify token sees itself)")
        if bool((bits & (j[None, :] > local[:, None])).any()):
            raise ValueError("tree_mask row t may set only bits j <= t (ancestors come earlier in the block)")


@torch.library.custom_op("dspark::verify_attention", mutates_args=(), device_types=("cpu", "cuda"))
def _op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    cu_verify: torch.Tensor,
    tree_mask: Optional[torch.Tensor],
    sm_scale: Optional[float],
    window: int,
    softcap: float,
    return_lse: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask, sm_scale, window, softcap)
    _check_values(q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask)
    scale = sm_scale if sm_scale is not None else q.shape[-1] ** -0.5
    return BACKENDS.run(backend, q.device.type, q, k_cache, v_cache, page_table, kv_lens, cu_verify,
                        tree_mask, float(scale), int(window), float(softcap), bool(return_lse))


@_op.register_fake
def _fake(q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask, sm_scale, window, softcap,
          return_lse, backend):
    _check(q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask, sm_scale, window, softcap)
    lse_shape = (q.shape[0], q.shape[1]) if return_lse else (0,)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


def verify_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    kv_lens: torch.Tensor,
    cu_verify: torch.Tensor,
    *,
    tree_mask: torch.Tensor | None = None,
    sm_scale: float | None = None,
    window: int = -1,
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of every request's verify block over its paged KV cache.

    Math (request r, its rows cu_verify[r] .. cu_verify[r+1]-1, n = n_r of
    them, L = kv_lens[r] keys of which the last n are the block, C = L - n):
    local query t (key position p = C + t) sees key position k iff

        (k < C  or  [tree_mask is None and k - C <= t]
                or  [tree_mask given and bit (k - C) of row cu_verify[r]+t is set])
        and (window == -1  or  p - window < k <= p).

    Bit j of a tree row lives in word j // 32, bit j % 32; row t must set bit t
    and no bit j > t (the block is in topological order: ancestors first).
    Logits z = sm_scale * q·k (sm_scale default 1/sqrt(D)); with softcap > 0,
    z = softcap * tanh(z / softcap). out = softmax(z over visible keys) @ V in
    fp32, cast to q's dtype; lse = log Σ exp(z) (natural log, fp32). Query head
    h reads kv head h // (Hq / Hkv). Rows from cu_verify[R] to T are padding:
    out 0, lse -inf.

    Args:
        q: [T, Hq, D] fp16/bf16/fp32, any strides.
        k_cache, v_cache: [pages, page_size, Hkv, D], q's dtype, any strides (k and v
            may be views into one interleaved buffer); key position k of request r
            is slot k % page_size of page page_table[r, k // page_size].
        page_table: [R, max_pages] int32 (int64 accepted); entries past
            ceil(kv_lens[r] / page_size) are never read.
        kv_lens: [R] int32, keys per request including its n_r verify tokens
            (already written to the cache).
        cu_verify: [R + 1] int32 row offsets (n_r = 0 for inactive requests).
        tree_mask: optional [T, W] int32, W in {1, 2} (at most 32·W verify
            tokens per request); None means a causal chain. Integer inputs
            (page_table, kv_lens, cu_verify, tree_mask) may be strided views.
        sm_scale: logit scale (None: 1/sqrt(D)).
        window: sliding window in keys (-1: off), as above.
        softcap: logit soft-cap (0: off).
        return_lse: also return lse [T, Hq] fp32.
        backend: "auto" | "reference" | "triton" | "cuda". Triton on CPU tensors
            (the interpreter) takes fp32 and fp16 only: it refuses bf16, which the
            interpreter emulates wrongly.

    Values (kv_lens >= n_r >= 0, pages in range, tree rows well formed,
    cu_verify monotone) are checked on CPU always and on CUDA only in debug
    mode. Outside debug mode the Triton path reads no device value (no host
    sync: its grid and split count come from shapes alone, so the call can be
    captured in a CUDA graph and replayed with new lengths of the same
    shapes); the reference loops over requests on the host and does sync.

    NaN policy (all backends): non-finite values are neither checked nor
    masked, they propagate. A NaN/Inf in q[i, h] reaches only out[i, h] and
    lse[i, h]. A NaN/Inf key or value that request r reads may reach every
    row of request r (a key masked for one row still enters the P·V product
    with weight 0, and 0·NaN = NaN, as in FlashAttention) but never another
    request. What a request does not read cannot leak in, whatever it holds:
    cache slots past kv_lens[r] in its last page, page_table entries past
    ceil(kv_lens[r] / page_size), pages it does not list, keys before the
    window of its first verify row (position < kv_lens[r] - n_r + 1 - window),
    q and tree_mask rows past cu_verify[R]; so an uninitialised (NaN) cache
    tail or -1 padding in the page table is harmless.

    Returns:
        out [T, Hq, D] in q's dtype, or (out, lse) when return_lse.
    """
    V.tensor_args(("tree_mask",), q=q, k_cache=k_cache, v_cache=v_cache, page_table=page_table, kv_lens=kv_lens,
                  cu_verify=cu_verify, tree_mask=tree_mask)
    out, lse = torch.ops.dspark.verify_attention(q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask,
                                                 sm_scale, window, softcap, return_lse, backend or "")
    return (out, lse) if return_lse else out
