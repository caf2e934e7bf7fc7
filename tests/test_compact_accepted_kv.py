"""dspark::compact_accepted_kv against a naive gather, on every backend.

The naive gather reads the whole cache before writing anything (so it does
not depend on the order of the moves): new[s + 1 + k] = old[s + 1 + a_k]
for every request r and k < n, every other slot unchanged. Paths come from
tree_rejection_sample itself (random trees, sampled), so they are the root
paths an engine compacts; page sizes 1, 16 and odd (5), pages scattered by a
random permutation, K and V interleaved in one buffer, fp32 / fp16 / bf16
(a copy is exact in every dtype).
"""

from __future__ import annotations

import math

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import compact_accepted_kv as cak_op

from support import available_backends, interpreted, to_device
from tree_model import random_tree_batch

BACKENDS = available_backends(cak_op)


def naive(k_cache, v_cache, page_table, start_pos, accepted_nodes, num_accepted):
    nodes, n_acc = accepted_nodes, num_accepted
    k, v = k_cache.clone(), v_cache.clone()
    S = k_cache.shape[1]
    for r in range(page_table.shape[0]):
        for j in range(int(n_acc[r])):
            src, dst = int(start_pos[r]) + 1 + int(nodes[r, j]), int(start_pos[r]) + 1 + j
            ps, pd = int(page_table[r, src // S]), int(page_table[r, dst // S])
            k[pd, dst % S] = k_cache[ps, src % S]
            v[pd, dst % S] = v_cache[ps, src % S]
    return k, v


def make_case(R, N, page_size, seed, dtype=torch.float32, interleaved=False, heads=2, dim=12):
    """Accepted paths from tree_rejection_sample on random trees; a cache big enough for every block."""
    kw = random_tree_batch(R=R, V=8, N=N, seed=seed)
    kw["temperature"] = torch.where(kw["temperature"] == 0, 0.0, 3.0)  # flat targets: long, branching paths
    verdict = dk.tree_rejection_sample(**kw)
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 3 * page_size + 2, (R,), generator=g, dtype=torch.int32)
    per = math.ceil((int(start.max()) + N + 1) / page_size)
    pages = R * per + 2
    page_table = torch.randperm(pages, generator=g)[: R * per].reshape(R, per).to(torch.int32)
    if interleaved:
        buf = torch.randn(pages, page_size, 2, heads, dim, generator=g).to(dtype)
        k, v = buf[:, :, 0], buf[:, :, 1]
    else:
        k = torch.randn(pages, page_size, heads, dim, generator=g).to(dtype)
        v = torch.randn(pages, page_size, heads, dim, generator=g).to(dtype)
    return dict(k_cache=k, v_cache=v, page_table=page_table, start_pos=start, accepted_nodes=verdict.accepted_nodes,
                num_accepted=verdict.num_accepted)


def run(backend, case):
    dev = {k: to_device(v) for k, v in case.items()}
    dk.compact_accepted_kv(**dev, backend=backend)
    return dev["k_cache"].cpu(), dev["v_cache"].cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_against_naive_gather(backend, page_size):
    case = make_case(R=16 if interpreted(backend) else 64, N=8, page_size=page_size, seed=page_size)
    want = naive(**{k: v.clone() if k.endswith("cache") else v for k, v in case.items()})
    got = run(backend, {k: v.clone() if k.endswith("cache") else v for k, v in case.items()})
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # Not vacuous: some node moved (a path that skipped a sibling), and something stayed.
    moved = (case["accepted_nodes"].long() != torch.arange(8)[None]) & (case["accepted_nodes"] >= 0)
    assert bool(moved.any())
    assert not torch.equal(want[0], case["k_cache"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtypes_and_interleaved_caches(backend, dtype):
    """K and V as views into one [pages, S, 2, Hkv, D] buffer; a copy is bit-exact in every dtype."""
    case = make_case(R=3, N=6, page_size=5, seed=7, dtype=dtype, interleaved=True)
    buf = to_device(case["k_cache"]._base.clone())
    want = naive(buf[:, :, 0].cpu(), buf[:, :, 1].cpu(), case["page_table"], case["start_pos"],
                 case["accepted_nodes"], case["num_accepted"])
    k, v = buf[:, :, 0], buf[:, :, 1]
    assert not k.is_contiguous()
    dk.compact_accepted_kv(k, v, *(to_device(case[n]) for n in ("page_table", "start_pos", "accepted_nodes",
                                                                 "num_accepted")), backend=backend)
    assert torch.equal(buf[:, :, 0].cpu(), want[0]) and torch.equal(buf[:, :, 1].cpu(), want[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_chain_moves_nothing_and_prefix_paths_are_in_place(backend):
    """accepted_nodes = 0 .. n - 1 (a chain, or a tree's first-child path): the cache is unchanged."""
    case = make_case(R=3, N=6, page_size=4, seed=9)
    case["accepted_nodes"] = torch.where(torch.arange(6)[None] < 4, torch.arange(6)[None], -1).expand(3, 6)
    case["num_accepted"] = torch.tensor([4, 0, 2], dtype=torch.int32)
    before = case["k_cache"].clone(), case["v_cache"].clone()
    got = run(backend, case)
    assert torch.equal(got[0], before[0]) and torch.equal(got[1], before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_worst_case_overlap_in_place(backend):
    """Path [1, 2, 3, 4] after an anchor at 0: every destination is the source of the previous move (the
    in-place hazard that the increasing order avoids): the block comes out shifted by one."""
    k = to_device(torch.arange(12.0).reshape(3, 4, 1, 1))
    v = -k
    dk.compact_accepted_kv(k, v, to_device(torch.tensor([[0, 1, 2]])), to_device(torch.tensor([0])),
                           to_device(torch.tensor([[1, 2, 3, 4, -1]])), to_device(torch.tensor([4])), backend=backend)
    assert k.cpu().flatten().tolist()[:7] == [0.0, 2.0, 3.0, 4.0, 5.0, 5.0, 6.0]
    assert v.cpu().flatten().tolist()[:7] == [-0.0, -2.0, -3.0, -4.0, -5.0, -5.0, -6.0]


def test_compile_fullgraph_mutates_in_place():
    kw = cak_op.example()
    want = cak_op.example()
    dk.compact_accepted_kv(**want)

    @torch.compile(fullgraph=True, backend="inductor")
    def f(kw):
        dk.compact_accepted_kv(**kw)
        return kw["k_cache"] * 1

    out = f(kw)
    assert torch.equal(out, want["k_cache"]) and torch.equal(kw["v_cache"], want["v_cache"])
