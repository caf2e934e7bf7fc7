"""Ragged paged verify batches for verify_attention: random trees packed into
tree-mask words, caches whose pages are scattered by a random permutation
(tests/test_verify_attention.py, and the bad-input table of tests/test_validation.py)."""

from __future__ import annotations

import math

import torch

from support import DEVICE


def random_parents(n: int, g: torch.Generator) -> list[int]:
    """A random tree over the block in topological order: parent[t] < t, token 0 is the root."""
    return [-1] + [int(torch.randint(0, t, (1,), generator=g)) for t in range(1, n)]


def ancestors(parents: list[int], t: int) -> set[int]:
    out = {t}
    while parents[t] >= 0:
        t = parents[t]
        out.add(t)
    return out


def pack_rows(rows: list[set[int]], words: int) -> torch.Tensor:
    """Bit j of word j // 32 for each j in the row's set, as int32 (two's complement)."""
    packed = torch.zeros((len(rows), words), dtype=torch.int64)
    for i, row in enumerate(rows):
        for j in row:
            packed[i, j // 32] += 1 << (j % 32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def make_batch(ns, ctx, *, hkv=2, group=4, dim=16, page_size=3, tree=False, words=2, pad_rows=2,
               noncontig=False, dtype=torch.float32, qscale=1.0, seed=0, index_dtype=torch.int32,
               spare_pages=3, max_pages=None, rows=None):
    """Random ragged batch; pages of every request scattered by a random permutation.

    max_pages / rows fix the page-table width and q's row count (capacity for
    CUDA-graph replays with other lengths); noncontig makes every tensor a
    strided view (q, caches, page table, tree mask, kv_lens, cu_verify)."""
    g = torch.Generator().manual_seed(seed)
    num_req = len(ns)
    kv_lens = [c + n for c, n in zip(ctx, ns)]
    need = [math.ceil(L / page_size) for L in kv_lens]
    max_pages = max(need + [0]) + 1 if max_pages is None else max_pages
    assert max_pages >= max(need + [0])
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=g)
    page_table = torch.full((num_req, max_pages), -1, dtype=torch.int32)  # unused entries: never read
    used = 0
    for r in range(num_req):
        page_table[r, : need[r]] = perm[used: used + need[r]].to(torch.int32)
        used += need[r]
    cu = [0]
    for n in ns:
        cu.append(cu[-1] + n)
    rows = cu[-1] + pad_rows if rows is None else rows
    assert rows >= cu[-1]
    hq = hkv * group
    parents = [random_parents(n, g) if tree else None for n in ns]
    tree_mask = None
    if tree:
        sets = [ancestors(p, t) for p, n in zip(parents, ns) for t in range(n)] + [set()] * (rows - cu[-1])
        tree_mask = pack_rows(sets, words)
    kv_lens = torch.tensor(kv_lens, dtype=index_dtype)
    cu = torch.tensor(cu, dtype=index_dtype)
    page_table = page_table.to(index_dtype)
    to = lambda t: None if t is None else t.to(DEVICE)
    if noncontig:  # views made on the device: .to(device) would make them contiguous
        # q with every stride != the contiguous one; k/v interleaved in one buffer
        q = to((torch.randn(hq, rows, 2 * dim, generator=g) * qscale).to(dtype)).transpose(0, 1)[..., ::2]
        kv = to(torch.randn(num_pages, page_size, 2, hkv, dim, generator=g).to(dtype))
        k, v = kv[:, :, 0], kv[:, :, 1]
        page_table = to(torch.stack([page_table, torch.full_like(page_table, 10**6)], -1))[..., 0]
        kv_lens = to(torch.stack([kv_lens, -kv_lens], -1))[:, 0]
        cu = to(torch.stack([cu, -cu], -1))[:, 0]
        if tree_mask is not None:
            tree_mask = to(tree_mask.T.contiguous()).T
        assert not any(t.is_contiguous() for t in (q, k, v, page_table))
    else:
        q = to((torch.randn(rows, hq, dim, generator=g) * qscale).to(dtype))
        k = to(torch.randn(num_pages, page_size, hkv, dim, generator=g).to(dtype))
        v = to(torch.randn(num_pages, page_size, hkv, dim, generator=g).to(dtype))
        page_table, kv_lens, cu, tree_mask = to(page_table), to(kv_lens), to(cu), to(tree_mask)
    args = dict(q=q, k_cache=k, v_cache=v, page_table=page_table, kv_lens=kv_lens, cu_verify=cu,
                tree_mask=tree_mask)
    return args, parents
