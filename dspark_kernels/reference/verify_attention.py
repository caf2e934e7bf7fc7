"""Reference verify_attention: implements dspark_kernels.verify_attention by gathering each request's keys, fp32 softmax.

One request at a time (host loop over cu_verify and kv_lens, so this path
syncs): the request's pages are gathered from the cache, logits are computed
for every key its block could see, the chain/tree/window rule masks them, and
torch.logsumexp normalises. Math in fp32 for every input dtype (fp64 inputs,
which the op rejects, stay fp64 when this function is called directly).

Metadata is clamped exactly as in the Triton kernel, so that bad values
(value checks off) index nothing out of bounds: request r's rows are
[a, b) with a = clamp(cu[r], 0, T), b = clamp(cu[r+1], a, T); its key count is
clamp(kv_lens[r], 0, max_pages * page_size); keys on a page id outside
[0, P) are masked (and read as 0); a row that sees no key gets out 0, lse -inf.
For valid metadata none of this changes a value.
"""

import math

import torch


def tree_bits(words: torch.Tensor, n: int) -> torch.Tensor:
    """[rows, W] int32 bit-packed rows -> [rows, n] bool; bit j of word j // 32."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = (words.to(torch.int32)[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :n].bool()


def verify_attention(a):
    q, k_cache, v_cache, page_table, kv_lens, cu_verify, tree_mask = (
        a.q, a.k_cache, a.v_cache, a.page_table, a.kv_lens, a.cu_verify, a.tree_mask)
    sm_scale, window, softcap, return_lse = a.sm_scale, a.window, a.softcap, a.return_lse
    num_rows, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv = k_cache.shape[:3]
    max_keys = page_table.shape[1] * page_size
    group = num_heads // num_kv
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    out = torch.zeros((num_rows, num_heads, head_dim), dtype=math_dtype, device=dev)
    lse = torch.full((num_rows, num_heads), float("-inf"), dtype=math_dtype, device=dev)
    cu = cu_verify.tolist()
    lens = kv_lens.tolist()
    tree_len = 0 if tree_mask is None else 32 * tree_mask.shape[1]
    for r in range(page_table.shape[0]):
        a = min(max(cu[r], 0), num_rows)
        b = min(max(cu[r + 1], a), num_rows)
        n = b - a
        if n == 0:
            continue
        kv_len = min(max(lens[r], 0), max_keys)
        ctx = kv_len - n  # keys before the block (negative only for bad metadata)
        # Keys below ctx + 1 - window are outside every row's window.
        lo = 0 if window < 0 else max(0, ctx + 1 - window)
        npages = math.ceil(kv_len / page_size)
        pages = page_table[r, :npages].long()
        page_ok = (pages >= 0) & (pages < num_pages)
        key_ok = page_ok.repeat_interleave(page_size)[lo:kv_len]
        if num_pages:
            pages = torch.where(page_ok, pages, 0)
            k = k_cache[pages].reshape(npages * page_size, num_kv, head_dim)[lo:kv_len].to(math_dtype)
            v = v_cache[pages].reshape(npages * page_size, num_kv, head_dim)[lo:kv_len].to(math_dtype)
            k = torch.where(key_ok[:, None, None], k, 0.0)
            v = torch.where(key_ok[:, None, None], v, 0.0)
        else:  # an empty cache: every key is masked
            k = v = torch.zeros((kv_len - lo, num_kv, head_dim), dtype=math_dtype, device=dev)
        qr = q[a:b].to(math_dtype).reshape(n, num_kv, group, head_dim)
        s = torch.einsum("nhgd,khd->hgnk", qr, k) * sm_scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        t = torch.arange(n, device=dev)
        kpos = torch.arange(lo, kv_len, device=dev)
        j = kpos - ctx  # index inside the block; negative for context keys
        if tree_mask is None:
            block = j[None, :] <= t[:, None]
            depth = t
        else:
            bits = tree_bits(tree_mask[a:b], tree_len)
            block = bits.gather(1, j.clamp(0, tree_len - 1)[None, :].expand(n, -1)) & (j < tree_len)[None, :]
            depth = bits.sum(1) - 1  # ancestors in the block, the anchor included: the row's depth
        visible = ((j[None, :] < 0) | block) & key_ok[None, :]
        if window > 0:
            # The window is over logical positions: row t sits at ctx + depth_t, block key j at ctx + depth_j
            # (both = cache positions on a chain), context keys at their own position.
            key_depth = depth.gather(0, j.clamp(0, n - 1))
            logical = torch.where(j >= 0, ctx + key_depth, kpos)
            visible &= logical[None, :] > (ctx + depth)[:, None] - window
        s = s.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, n]; -inf only for a row that sees no key
        p = torch.exp(s - row_lse.masked_fill(row_lse == float("-inf"), 0.0)[..., None])
        out[a:b] = torch.einsum("hgnk,khd->nhgd", p, v).reshape(n, num_heads, head_dim)
        lse[a:b] = row_lse.permute(2, 0, 1).reshape(n, num_heads)
    return out.to(q.dtype), (lse if return_lse else lse.new_empty((0,)))
