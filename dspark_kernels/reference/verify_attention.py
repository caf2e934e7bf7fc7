"""Reference verify_attention: implements dspark_kernels.verify_attention by gathering each request's keys, fp32 softmax.

One request at a time (host loop over cu_verify and kv_lens, so this path
syncs): the request's pages are gathered from the cache, logits are computed
for every key its block could see, the chain/tree/window rule masks them, and
torch.logsumexp normalises. Math in fp32 for every input dtype (fp64 inputs,
which the op rejects, stay fp64 when this function is called directly).
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
    page_size, num_kv = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    out = torch.zeros((num_rows, num_heads, head_dim), dtype=math_dtype, device=dev)
    lse = torch.full((num_rows, num_heads), float("-inf"), dtype=math_dtype, device=dev)
    cu = cu_verify.tolist()
    lens = kv_lens.tolist()
    for r in range(page_table.shape[0]):
        a, b = cu[r], cu[r + 1]
        n = b - a
        if n == 0:
            continue
        kv_len = lens[r]
        ctx = kv_len - n  # keys before the block
        # Keys below ctx + 1 - window are outside every row's window.
        lo = 0 if window < 0 else max(0, ctx + 1 - window)
        npages = math.ceil(kv_len / page_size)
        pages = page_table[r, :npages].long()
        k = k_cache[pages].reshape(npages * page_size, num_kv, head_dim)[lo:kv_len].to(math_dtype)
        v = v_cache[pages].reshape(npages * page_size, num_kv, head_dim)[lo:kv_len].to(math_dtype)
        qr = q[a:b].to(math_dtype).reshape(n, num_kv, group, head_dim)
        s = torch.einsum("nhgd,khd->hgnk", qr, k) * sm_scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        t = torch.arange(n, device=dev)
        if tree_mask is None:
            block = t[None, :] <= t[:, None]
        else:
            block = tree_bits(tree_mask[a:b], n)
        visible = torch.cat([torch.ones((n, ctx - lo), dtype=torch.bool, device=dev), block], dim=1)
        if window > 0:
            kpos = torch.arange(lo, kv_len, device=dev)
            visible &= kpos[None, :] > (ctx + t)[:, None] - window
        s = s.masked_fill(~visible, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [Hkv, G, n]; every row sees at least itself
        p = torch.exp(s - row_lse[..., None])
        out[a:b] = torch.einsum("hgnk,khd->nhgd", p, v).reshape(n, num_heads, head_dim)
        lse[a:b] = row_lse.permute(2, 0, 1).reshape(n, num_heads)
    return out.to(q.dtype), (lse if return_lse else lse.new_empty((0,)))
