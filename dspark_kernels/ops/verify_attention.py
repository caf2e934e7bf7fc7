"""dspark::verify_attention: ragged chain/tree verification attention over a paged KV cache."""

from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _checks
from .._backend import Implementations
from .._op import FLOAT, INT, Op, tensor, value
from ..reference.verify_attention import tree_bits
from ..reference.verify_attention import verify_attention as _reference

# A tree mask row is two int32 words: at most 64 verify tokens per request.
MAX_TREE_TOKENS = 64


def _check(a, dims):
    """Metadata the table cannot say (no device reads); _values has the rest."""
    for name in ("k_cache", "v_cache"):
        t = getattr(a, name)
        if t.dtype != a.q.dtype:
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but q has "
                            f"{str(a.q.dtype).replace('torch.', '')}; q, k_cache and v_cache must share one dtype")
    if dims["D"] < 1 or dims["S"] < 1 or dims["Hkv"] < 1:
        raise ValueError(f"k_cache dims must be positive, got shape {tuple(a.k_cache.shape)}")
    if dims["Hq"] < 1 or dims["Hq"] % dims["Hkv"]:
        raise ValueError(f"q has {dims['Hq']} heads, not a positive multiple of the {dims['Hkv']} kv heads of "
                         "k_cache (GQA)")
    if a.tree_mask is not None and not 1 <= dims["W"] <= MAX_TREE_TOKENS // 32:
        raise ValueError(f"tree_mask must have shape ({dims['T']}, W) with W in 1..{MAX_TREE_TOKENS // 32} "
                         f"int32 words, got {tuple(a.tree_mask.shape)}")
    if a.sm_scale is not None and not (math.isfinite(a.sm_scale) and a.sm_scale > 0):
        raise ValueError(f"sm_scale must be a positive finite float or None, got {a.sm_scale}")
    if a.window != -1 and a.window < 1:
        raise ValueError(f"window must be -1 (off) or >= 1, got {a.window}")
    if not (math.isfinite(a.softcap) and a.softcap >= 0):
        raise ValueError(f"softcap must be 0 (off) or a positive finite float, got {a.softcap}")


def _values(a):
    """Checks that read values (see dspark_kernels._checks for when they run)."""
    q, k_cache, page_table, kv_lens, cu_verify, tree_mask = a.q, a.k_cache, a.page_table, a.kv_lens, a.cu_verify, \
        a.tree_mask
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


def _fake(a):
    lse_shape = (a.q.shape[0], a.q.shape[1]) if a.return_lse else (0,)
    return a.q.new_empty(a.q.shape), a.q.new_empty(lse_shape, dtype=torch.float32)


OP = Op(
    "verify_attention",
    [
        tensor("q", "T, Hq, D", FLOAT),
        tensor("k_cache", "P, S, Hkv, D", FLOAT),
        tensor("v_cache", "P, S, Hkv, D", FLOAT),
        tensor("page_table", "R, M", INT),
        tensor("kv_lens", "R", INT),
        tensor("cu_verify", "R+1", INT),
        tensor("tree_mask", "T, W", (torch.int32,), optional=True),
        value("sm_scale", "float", optional=True),
        value("window", "int", default=-1),
        value("softcap", "float", default=0.0),
        value("return_lse", "bool", default=False),
    ],
    "(Tensor, Tensor)",
    impls=Implementations(
        "verify_attention",
        reference=_reference,
        triton="dspark_kernels.triton.verify_attention:verify_attention",
    ),
    fake=_fake,
    check=_check,
    values=_values,
    # sm_scale None means 1/sqrt(D); implementations always get a float.
    prepare=lambda a: a._replace(sm_scale=float(a.sm_scale if a.sm_scale is not None else a.q.shape[-1] ** -0.5),
                                 softcap=float(a.softcap)),
    wrap=lambda out, kw: out if kw["return_lse"] else out[0],
)
IMPLS = OP.impls


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
    local query t at logical position p = C + d_t sees key position k iff

        (k < C  or  [tree_mask is None and k - C <= t]
                or  [tree_mask given and bit (k - C) of row cu_verify[r]+t is set])
        and (window == -1  or  pos(k) > p - window),

    where pos(k) = k for a context key and C + d_j for block key j = k - C,
    and d_t = t on a chain or, with a tree, row t's depth: its set bits minus
    one (the anchor is depth 0). So a window counts the positions of the
    row's own text (its context, then its ancestors), not cache slots: a tree
    row deep in a wide block sees as much context as the same path verified
    as a chain. On a chain pos(k) = k and p = C + t, the plain sliding window.
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

    Unchecked path (value checks off, bad metadata): nothing is read or written
    out of bounds, on every backend, and the outputs are garbage but defined
    by clamping: request r's rows are [a, b) with a = clamp(cu_verify[r], 0, T)
    and b = clamp(cu_verify[r+1], a, T) (rows past q.shape[0] are never
    written); its key count is clamp(kv_lens[r], 0, max_pages·page_size) (a
    kv_lens beyond the page table reads only the pages it has); keys whose page
    id lies outside [0, pages) are masked (read nothing, seen by no row); a row
    that then sees no key gets out 0 and lse -inf. With finite q and caches,
    every row some request covers is finite. Rows that two requests cover (a
    decreasing cu_verify) hold one of the two results; rows below cu_verify[R]
    that no request covers hold 0 / -inf, except on the Triton split path
    (flash-decoding, chosen from shapes), whose workspace is not initialised:
    unspecified values there.

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

    Examples:
        One request, 2 context keys then a 2-token chain, one page of 4 slots:
        the first verify row sees 3 keys, the second all 4.

        >>> import torch, dspark_kernels as dk
        >>> q = torch.randn(2, 1, 8); k = torch.randn(1, 4, 1, 8); v = torch.randn(1, 4, 1, 8)
        >>> out, lse = dk.verify_attention(q, k, v, torch.tensor([[0]], dtype=torch.int32),
        ...                                torch.tensor([4], dtype=torch.int32),
        ...                                torch.tensor([0, 2], dtype=torch.int32), return_lse=True)
        >>> z = (q[:, 0] @ k[0, :, 0].T) / 8 ** 0.5
        >>> bool(torch.allclose(lse[:, 0], torch.stack([z[0, :3].logsumexp(0), z[1].logsumexp(0)]), atol=1e-5))
        True
    """
    return OP(locals())


def example(device="cpu") -> dict:
    """Small valid keyword arguments of verify_attention (tests, overhead benchmark)."""
    g = torch.Generator().manual_seed(0)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(q=torch.randn(5, 4, 8, generator=g).to(device), k_cache=torch.randn(3, 4, 2, 8, generator=g).to(device),
                v_cache=torch.randn(3, 4, 2, 8, generator=g).to(device),
                page_table=torch.tensor([[0, 1], [2, 0]], **i32), kv_lens=torch.tensor([6, 3], **i32),
                cu_verify=torch.tensor([0, 3, 5], **i32), tree_mask=torch.tensor([[1], [3], [5], [1], [3]], **i32),
                window=5, softcap=10.0, return_lse=True)
