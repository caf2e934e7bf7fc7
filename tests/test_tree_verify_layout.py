"""dspark::tree_verify_layout: tree masks and positions from parents, checked three ways.

1. Against a Python construction: each row's ancestor set by following the
   parent pointers one node at a time (tests/paged_batch.ancestors, pack_rows),
   its depth as the length of that walk, rows placed by cu_verify; random
   trees, inactive requests, padding rows, one and two mask words (N = 63).
2. The rows line up with pack_verify's: same request, same local index,
   whatever cu_verify holds.
3. End to end through verify_attention: the layout's mask over a paged cache
   gives, for every node, the dense softmax over the context, the anchor, its
   ancestors and itself (float64 on the host), and the same output as
   verifying that node's root path alone as a chain.
"""

from __future__ import annotations

import math

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import tree_verify_layout as tvl_op

from paged_batch import pack_rows
from support import available_backends, interpreted, to_device
from tree_model import random_parents

BACKENDS = available_backends(tvl_op)


def call(backend, **kw):
    out = dk.tree_verify_layout(**{k: to_device(v) for k, v in kw.items()}, backend=backend)
    return type(out)(*(t.cpu() for t in out))


def by_hand(parents, num_nodes, start_pos, cu, rows):
    """(tree_mask, positions) by following parent pointers, one row at a time."""
    R, N = parents.shape
    words = (N + 1 + 31) // 32
    sets, pos = [{0} for _ in range(rows)], [0] * rows
    for r in range(R):
        if cu[r + 1] == cu[r]:
            continue
        for j in range(int(num_nodes[r]) + 1):
            anc, depth, i = {0}, 0, j - 1
            while i >= 0:
                anc.add(i + 1)
                depth += 1
                i = int(parents[r, i])
            sets[cu[r] + j] = anc
            pos[cu[r] + j] = int(start_pos[r]) + depth
    return pack_rows(sets, words), torch.tensor(pos, dtype=torch.int32)


def random_layout_case(R, N, seed, inactive=()):
    g = torch.Generator().manual_seed(seed)
    parents = torch.tensor([random_parents(g, N) for _ in range(R)], dtype=torch.int32)
    num_nodes = torch.randint(0, N + 1, (R,), generator=g, dtype=torch.int32)
    sizes = num_nodes.long() + 1
    for r in inactive:
        sizes[r] = 0
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(sizes, 0)
    start = torch.randint(0, 1000, (R,), generator=g, dtype=torch.int32)
    # Entries past num_nodes are garbage: ignored.
    dead = torch.arange(N)[None, :] >= num_nodes[:, None]
    parents = torch.where(dead, torch.randint(-5, 2 * N, (R, N), generator=g, dtype=torch.int32), parents)
    return parents, num_nodes, start, cu


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [1, 6, 31, 32, 63])
def test_against_python_construction(backend, N):
    R = 5 if interpreted(backend) else 40
    parents, num_nodes, start, cu = random_layout_case(R, N, seed=N, inactive=(1,))
    rows = int(cu[-1]) + 7
    out = call(backend, tree_parents=parents, num_nodes=num_nodes, start_pos=start, cu_verify=cu, num_rows=rows)
    want_mask, want_pos = by_hand(parents, num_nodes, start, cu.tolist(), rows)
    assert out.tree_mask.shape == (rows, (N + 1 + 31) // 32)
    assert torch.equal(out.tree_mask, want_mask) and torch.equal(out.positions, want_pos)
    assert torch.equal(out.cu_verify, cu)
    # Default offsets: every request live, rows = R·(N+1).
    out = call(backend, tree_parents=parents, num_nodes=num_nodes, start_pos=start)
    cu2 = [0]
    for n in num_nodes.tolist():
        cu2.append(cu2[-1] + n + 1)
    want_mask, want_pos = by_hand(parents, num_nodes, start, cu2, R * (N + 1))
    assert torch.equal(out.tree_mask, want_mask) and torch.equal(out.positions, want_pos)
    assert out.cu_verify.tolist() == cu2


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_line_up_with_pack_verify(backend):
    """Same owner and local index as pack_verify for every row: chain positions of the anchor row agree, the
    padding rows agree (position 0), and the depth never exceeds the local index."""
    R, N = 6, 7
    parents, num_nodes, start, cu = random_layout_case(R, N, seed=3, inactive=(2, 4))
    rows = int(cu[-1]) + 5
    lay = call(backend, tree_parents=parents, num_nodes=num_nodes, start_pos=start, cu_verify=cu, num_rows=rows)
    tokens = torch.arange(R * N, dtype=torch.int32).reshape(R, N)
    batch = dk.pack_verify(torch.arange(R) + 100, tokens, num_nodes, cu, start, num_rows=rows, backend=backend)
    chain_pos = batch.positions.long()
    live = batch.row_request >= 0
    anchor_rows = batch.token_ids >= 100
    assert torch.equal(lay.positions[anchor_rows], batch.positions[anchor_rows])
    assert bool((lay.positions[~live] == 0).all()) and bool((lay.tree_mask[~live] == torch.tensor([1])).all())
    depth = lay.positions.long() - start.long()[batch.row_request.long().clamp(min=0)]
    assert bool((depth[live] <= chain_pos[live] - start.long()[batch.row_request[live].long()]).all())


def _attention_case(seed, page_size, R=4, N=9, hkv=2, group=2, dim=16):
    """A paged cache holding, per request, a context then its tree block; queries for every block row."""
    g = torch.Generator().manual_seed(seed)
    parents, num_nodes, _, cu = random_layout_case(R, N, seed, inactive=())
    ctx = torch.randint(0, 12, (R,), generator=g)
    kv_lens = ctx + num_nodes.long() + 1
    pages_per = math.ceil(int(kv_lens.max()) / page_size)
    perm = torch.randperm(R * pages_per + 2, generator=g)
    page_table = perm[: R * pages_per].reshape(R, pages_per).to(torch.int32)
    k = torch.randn(R * pages_per + 2, page_size, hkv, dim, generator=g)
    v = torch.randn_like(k)
    q = torch.randn(int(cu[-1]), hkv * group, dim, generator=g)
    return dict(parents=parents, num_nodes=num_nodes, cu=cu, ctx=ctx, kv_lens=kv_lens.to(torch.int32),
                page_table=page_table, k=k, v=v, q=q)


def _keys(c, r, positions):
    """K and V [len, Hkv, D] of request r at cache positions."""
    pos = torch.as_tensor(positions, dtype=torch.int64)
    page = c["page_table"][r, pos // c["k"].shape[1]].long()
    return c["k"][page, pos % c["k"].shape[1]], c["v"][page, pos % c["k"].shape[1]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size, window", [(1, -1), (5, -1), (16, -1), (5, 4), (16, 9)])
def test_end_to_end_with_verify_attention(backend, page_size, window):
    # With a sliding window, a tree row must see exactly what its root path sees verified as a chain: the
    # window counts the path's positions (context, then ancestors), not the block's cache slots.
    c = _attention_case(seed=page_size, page_size=page_size)
    lay = call(backend, tree_parents=c["parents"], num_nodes=c["num_nodes"], start_pos=c["ctx"].to(torch.int32),
               cu_verify=c["cu"], num_rows=c["q"].shape[0])
    out = dk.verify_attention(*(to_device(t) for t in (c["q"], c["k"], c["v"], c["page_table"], c["kv_lens"],
                                                     c["cu"])), tree_mask=to_device(lay.tree_mask),
                              window=window, backend=backend).cpu()
    R = c["parents"].shape[0]
    hq, dim = c["q"].shape[1:]
    group = hq // c["k"].shape[2]
    for r in range(R):
        ctx, n = int(c["ctx"][r]), int(c["num_nodes"][r])
        for j in range(n + 1):
            seen, i = [ctx], j - 1  # the anchor's cache position
            while i >= 0:
                seen.append(ctx + 1 + i)
                i = int(c["parents"][r, i])
            path = list(range(ctx)) + sorted(seen)
            kk, vv = _keys(c, r, path)
            qq = c["q"][int(c["cu"][r]) + j].double()
            kk = kk.double().repeat_interleave(group, 1)
            vv = vv.double().repeat_interleave(group, 1)
            s = torch.einsum("hd,khd->hk", qq, kk) / math.sqrt(dim)
            want = torch.einsum("hk,khd->hd", torch.softmax(s, -1), vv)
            if window == -1:  # the dense check has no window; the chain check below has the same one
                assert torch.allclose(out[int(c["cu"][r]) + j].double(), want, atol=2e-5), (r, j)
            # The same row as the last query of its root path verified alone as a chain (no mask).
            chain_rows = len(seen)
            pt = torch.zeros(1, math.ceil(len(path) / page_size) + 1, dtype=torch.int32)
            kc = torch.zeros(pt.shape[1], page_size, *c["k"].shape[2:])
            vc = torch.zeros_like(kc)
            kk1, vv1 = _keys(c, r, path)
            pt[0] = torch.arange(pt.shape[1], dtype=torch.int32)
            kc.view(-1, *c["k"].shape[2:])[: len(path)] = kk1
            vc.view(-1, *c["k"].shape[2:])[: len(path)] = vv1
            qc = torch.zeros(chain_rows, hq, dim)
            qc[-1] = c["q"][int(c["cu"][r]) + j]
            chain = dk.verify_attention(qc, kc, vc, pt, torch.tensor([len(path)], dtype=torch.int32),
                                        torch.tensor([0, chain_rows], dtype=torch.int32), window=window,
                                        backend="reference")
            assert torch.allclose(chain[-1], out[int(c["cu"][r]) + j], atol=2e-5), (r, j)


def test_compile_fullgraph():
    kw = tvl_op.example()
    eager = dk.tree_verify_layout(**kw)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(kw):
        return dk.tree_verify_layout(**kw)

    assert all(torch.equal(a, b) for a, b in zip(eager, f(kw)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    """CPU proxy for CUDA-graph capture: the implementation itself reads no device value on the host."""
    from host_sync import HostSyncSpy

    if interpreted(backend):
        pytest.skip("the Triton interpreter copies tensors to the host by design")
    for with_cu in (True, False):
        kw = {k: to_device(v) for k, v in tvl_op.example().items()}
        if not with_cu:
            kw["cu_verify"] = None
        with HostSyncSpy() as spy:
            tvl_op.OP.run(backend, tvl_op.OP.record(**kw))
        assert spy.syncs == [], spy.syncs
