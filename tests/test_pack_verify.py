"""pack_verify: equality with a plain Python loop on random ragged batches
(empty, single, large; inactive requests with 0 rows), -1 padding up to the
static size R·(γ+1), non-contiguous inputs, and capturability proxies
(opcheck, torch.compile fullgraph, no host sync). Argument validation:
tests/test_validation.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import pack_verify as op

from host_sync import HostSyncSpy
from support import DEVICE, available_backends, interpreted

BACKENDS = available_backends(op)


def loop_pack(anchor, tokens, cu_verify, start_pos):
    """Row cu[r] + j of request r: anchor (j = 0) or draft j - 1, at position
    start_pos[r] + j; everything else up to R·(γ+1) rows is -1."""
    num_req, gamma = len(tokens), (len(tokens[0]) if tokens else 0)
    size = num_req * (gamma + 1)
    tok, pos, req = [-1] * size, [-1] * size, [-1] * size
    for r in range(num_req):
        for j in range(cu_verify[r + 1] - cu_verify[r]):
            t = cu_verify[r] + j
            tok[t] = anchor[r] if j == 0 else tokens[r][j - 1]
            pos[t] = start_pos[r] + j
            req[t] = r
    return tok, pos, req


def random_batch(rng: np.random.Generator, num_req: int, gamma: int, *, dtype=torch.int32,
                 inactive_frac: float = 0.2, zero_frac: float = 0.2, vocab: int = 151936):
    lengths = rng.integers(0, gamma + 1, num_req)
    lengths[rng.uniform(size=num_req) < zero_frac] = 0
    active = rng.uniform(size=num_req) >= inactive_frac
    # Inactive requests: 0 rows; their lengths may be anything in range.
    rows = np.where(active, lengths + 1, 0)
    cu = np.zeros(num_req + 1, dtype=np.int64)
    cu[1:] = np.cumsum(rows)
    anchor = rng.integers(0, vocab, num_req)
    tokens = rng.integers(0, vocab, (num_req, gamma))
    start_pos = rng.integers(0, 100_000, num_req)
    t = lambda a: torch.tensor(a, dtype=dtype).reshape(a.shape)
    return t(anchor), t(tokens), t(lengths), torch.tensor(cu, dtype=torch.int32), t(start_pos)


def run_pack(backend, anchor, tokens, lengths, cu, start_pos):
    out = dk.pack_verify(*(x.to(DEVICE) for x in (anchor, tokens, lengths, cu)), start_pos.to(DEVICE),
                         backend=backend)
    return dk.VerifyBatch(*(o.cpu() for o in out))


def check(backend, anchor, tokens, lengths, cu, start_pos):
    num_req, gamma = tokens.shape
    got = run_pack(backend, anchor, tokens, lengths, cu, start_pos)
    want = loop_pack(anchor.tolist(), tokens.tolist(), cu.tolist(), start_pos.tolist())
    size = num_req * (gamma + 1)
    for name, g, w in zip(("token_ids", "positions", "row_request"), got, want):
        assert g.dtype == torch.int32 and g.shape == (size,), (name, g.dtype, g.shape)
        assert g.tolist() == w, name
    used = int(cu[-1]) if num_req else 0
    for g in got:  # padding is -1 in all three outputs
        assert bool((g[used:] == -1).all())
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_req", [0, 1, 7, 300])
@pytest.mark.parametrize("gamma", [0, 1, 5, 16])
def test_matches_loop(backend, num_req, gamma):
    rng = np.random.default_rng(num_req * 17 + gamma)
    for trial in range(4 if num_req < 300 else 2):
        dtype = (torch.int32, torch.int64)[trial % 2]
        batch = random_batch(rng, num_req, gamma, dtype=dtype, inactive_frac=(0.0, 0.2, 0.5, 1.0)[trial])
        check(backend, *batch)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_batch(backend):
    rng = np.random.default_rng(3)
    check(backend, *random_batch(rng, 2048, 16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_handmade(backend):
    anchor = torch.tensor([10, 20, 30, 40], dtype=torch.int32)
    tokens = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33], [41, 42, 43]], dtype=torch.int32)
    lengths = torch.tensor([2, 3, 0, 1], dtype=torch.int32)
    cu = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)  # request 1 inactive (0 rows)
    start = torch.tensor([100, 200, 300, 400], dtype=torch.int32)
    got = run_pack(backend, anchor, tokens, lengths, cu, start)
    pad = [-1] * 10
    assert got.token_ids.tolist() == [10, 11, 12, 30, 40, 41] + pad
    assert got.positions.tolist() == [100, 101, 102, 300, 400, 401] + pad
    assert got.row_request.tolist() == [0, 0, 0, 2, 3, 3] + pad


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(8)
    anchor, tokens, lengths, cu, start_pos = random_batch(rng, 9, 5, dtype=torch.int64)
    wide = torch.zeros(9, 10, dtype=torch.int64)
    wide[:, ::2] = tokens
    strided = wide[:, ::2]  # stride (10, 2)
    transposed = tokens.t().contiguous().t()  # stride (1, 9)
    anchor_strided = torch.stack([anchor, -anchor], dim=1)[:, 0]
    for toks in (strided, transposed):
        assert not toks.is_contiguous()
        got = check(backend, anchor_strided, toks, lengths, cu, start_pos)
        want = run_pack(backend, anchor, tokens, lengths, cu, start_pos)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_schedule_to_pack():
    """The cu_verify of a schedule (inactive requests included) packs as is."""
    surv = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.5, 0.5], [0.7, 0.7, 0.7], [0.3, 0.2, 0.1]])
    sps = 1.0 / (1.0 + 0.05 * torch.arange(17, dtype=torch.float32))
    active = torch.tensor([True, False, True, True])
    s = dk.schedule_verify(surv, sps, active=active)
    anchor = torch.tensor([1, 2, 3, 4])
    tokens = torch.arange(12).reshape(4, 3) + 100
    start = torch.tensor([5, 6, 7, 8])
    got = check("reference", anchor, tokens, s.lengths, s.cu_verify, start)
    assert int((got.row_request >= 0).sum()) == int(s.total)
    assert 1 not in got.row_request.tolist()  # the inactive request has no rows


def _opcheck_args(backend, num_req=6, gamma=4):
    rng = np.random.default_rng(num_req + gamma)
    batch = random_batch(rng, num_req, gamma)
    return (*(t.to(DEVICE) for t in batch), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_req,gamma", [(6, 4), (1, 0), (0, 3)])
def test_opcheck(backend, num_req, gamma):
    torch.library.opcheck(torch.ops.dspark.pack_verify.default, _opcheck_args(backend, num_req, gamma))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def step(anchor, tokens, lengths, cu, start_pos):
        vb = dk.pack_verify(anchor, tokens, lengths, cu, start_pos, backend=backend)
        return vb.token_ids, vb.positions, vb.row_request

    compiled = torch.compile(step, fullgraph=True)
    rng = np.random.default_rng(21)
    for trial in range(3):
        batch = [t.to(DEVICE) for t in random_batch(rng, 11, 5)]
        for g, w in zip(compiled(*batch), step(*batch)):
            assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    """CPU proxy for CUDA-graph capture: the implementation itself (argument
    checks aside) reads no device value on the host."""
    if interpreted(backend):
        pytest.skip("the Triton interpreter copies tensors to the host by design")
    args = _opcheck_args(backend)[:-1]
    with HostSyncSpy() as spy:
        op.OP.run(backend, op.OP.Args(*args))
    assert spy.syncs == [], spy.syncs
