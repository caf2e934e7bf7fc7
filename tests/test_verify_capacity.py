"""verify_capacity: the paper's example, an independent brute force over random batches, the identity
with schedule_verify's async history path (on every backend), zero / NaN histories, and
capturability (opcheck, torch.compile, no host sync, CUDA-graph capture on a GPU).
Argument validation: tests/test_validation.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import verify_capacity as op

from host_sync import HostSyncSpy
from support import DEVICE, available_backends, capture_graph, debug_mode, interpreted

BACKENDS = available_backends(op)
PAPER_SPS = [0.0, 1.0, 0.5, 0.45]
# Θ' values closer than this (relative) are an fp32 coin flip against the fp64 brute force.
AMBIGUOUS_REL = 1e-5


def cases(n: int, backend: str) -> int:
    return min(n, 30) if interpreted(backend) else n


def cap(history, sps, backend, **kw):
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    k = dk.verify_capacity(history.to(DEVICE), sps.to(DEVICE), max_len=dev(kw.get("max_len")),
                           active=dev(kw.get("active")), backend=backend)
    assert k.dtype == torch.int32 and k.shape == () and k.device.type == torch.device(DEVICE).type
    return int(k)


def brute_capacity(hist, sps, max_len=None, active=None):
    """(K, N', ambiguous) from plain loops over lists: candidates with history > 0, sorted by
    (value descending, r, j); K = the first k maximising (A + Σ_{i<k} a_i) · sps[A + k]."""
    num_req = len(hist)
    gamma = len(hist[0]) if num_req else 0
    act = [True] * num_req if active is None else list(active)
    caps = [gamma] * num_req if max_len is None else [min(max(int(m), 0), gamma) for m in max_len]
    num_active = sum(act)
    cands = sorted(((r, j) for r in range(num_req) if act[r] for j in range(caps[r]) if hist[r][j] > 0),
                   key=lambda rj: (-hist[rj[0]][rj[1]], rj[0], rj[1]))
    tau = float(num_active)
    thetas = [tau * sps[num_active]]
    for k, (r, j) in enumerate(cands, start=1):
        tau += hist[r][j]
        thetas.append(tau * sps[num_active + k])
    best = max(range(len(thetas)), key=lambda k: (thetas[k], -k))
    top = thetas[best]
    ambiguous = any(t != top and abs(t - top) <= AMBIGUOUS_REL * max(abs(t), abs(top)) for t in thetas)
    return best, len(cands), ambiguous


def random_history(rng, num_req, gamma):
    kind = rng.integers(0, 4)
    if kind == 0:  # few distinct values: ties, and zeros (no candidates)
        vals = -np.sort(-rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(num_req, gamma)), axis=1)
        return torch.tensor(vals, dtype=torch.float32)
    conf = torch.tensor(rng.uniform(0.0, 1.0, (num_req, gamma)) ** rng.uniform(0.02, 1.0), dtype=torch.float32)
    hist = torch.cumprod(conf, 1)
    hist = torch.where(hist < 1e-4, torch.zeros_like(hist), hist)
    if kind == 2:  # a zero confidence kills the rest of the row
        cut = torch.tensor(rng.integers(0, gamma + 1, num_req))
        hist = torch.where(torch.arange(gamma)[None, :] >= cut[:, None], torch.zeros_like(hist), hist)
    return hist


def random_sps(rng, length):
    b = np.arange(length, dtype=np.float64)
    kind = rng.integers(0, 4)
    if kind == 0:
        vals = 1.0 / (1.0 + 10 ** rng.uniform(-3, 0.5) * b)
    elif kind == 1:  # dyadic plateaus: exact ties in Θ'
        vals = np.ones(length)
        for edge in np.sort(rng.integers(1, max(length, 2), rng.integers(1, 5))):
            vals[edge:] *= rng.choice([0.5, 0.75])
    elif kind == 2:
        vals = rng.uniform(0.05, 1.0, length)
    else:
        vals = np.exp(-10 ** rng.uniform(-3, -0.5) * b) * (1.0 + 0.3 * rng.uniform(size=length))
    return torch.tensor(vals, dtype=torch.float32)


def random_case(rng, num_req, gamma):
    hist = random_history(rng, num_req, gamma)
    sps = random_sps(rng, num_req * (gamma + 1) + 1 + int(rng.integers(0, 3)))
    max_len = torch.tensor(rng.integers(0, gamma + 3, num_req), dtype=torch.int32) if rng.uniform() < 0.5 else None
    active = torch.tensor(rng.uniform(size=num_req) < 0.7) if rng.uniform() < 0.5 else None
    if rng.uniform() < 0.1:
        hist = hist.to(rng.choice([torch.float16, torch.bfloat16, torch.float64]))
    return hist, sps, max_len, active


@pytest.mark.parametrize("backend", BACKENDS)
def test_paper_appendix_a(backend):
    sps = torch.tensor(PAPER_SPS)
    # Θ' = (1.0, 1.8·0.5 = 0.9, 2.52·0.45 = 1.134): both drafts; with 0.16: (1.0, 0.9, 0.882): none.
    assert cap(torch.tensor([[0.8, 0.72]]), sps, backend) == 2
    assert cap(torch.tensor([[0.8, 0.16]]), sps, backend) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_brute_force(backend):
    rng = np.random.default_rng(77)
    checked = partial = 0
    for case in range(cases(800, backend)):
        num_req = int(rng.integers(1, 5 if interpreted(backend) else 12))
        gamma = int(rng.integers(1, 9 if interpreted(backend) else 17))
        hist, sps, max_len, active = random_case(rng, num_req, gamma)
        want, n_cand, ambiguous = brute_capacity(hist.double().tolist(), sps.double().tolist(),
                                                 None if max_len is None else max_len.tolist(),
                                                 None if active is None else active.tolist())
        if ambiguous:
            continue
        got = cap(hist, sps, backend, max_len=max_len, active=active)
        assert got == want, (hist.tolist(), sps.tolist(), max_len, active)
        assert 0 <= got <= n_cand
        checked += 1
        partial += 0 < got < n_cand
    assert checked > 0.9 * cases(800, backend)
    assert partial > 0.2 * checked


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_req,gamma", [(64, 7), (512, 8), (1024, 16)])
def test_matches_reference_large(backend, num_req, gamma):
    if interpreted(backend) and num_req > 64:
        pytest.skip("R >= 512 takes long through the Triton interpreter (runs on a GPU)")
    rng = np.random.default_rng(num_req + gamma)
    for trial in range(3):
        hist, sps, max_len, active = random_case(rng, num_req, gamma)
        want = cap(hist, sps, "reference", max_len=max_len, active=active)
        assert cap(hist, sps, backend, max_len=max_len, active=active) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_schedule_verify_history_is_capacity_of_history(backend):
    """schedule_verify(async, history=h) admits what schedule_verify(async, capacity=verify_capacity(h))
    does: same lengths, cu_verify, total and expected tokens, bit for bit, on random inputs."""
    rng = np.random.default_rng(2027)
    for case in range(cases(300, backend)):
        num_req = int(rng.integers(1, 5 if interpreted(backend) else 12))
        gamma = int(rng.integers(1, 9 if interpreted(backend) else 17))
        hist, sps, max_len, active = random_case(rng, num_req, gamma)
        surv = random_history(rng, num_req, gamma)
        dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        kw = dict(mode="async", max_len=dev(max_len), active=dev(active), backend=backend)
        k = dk.verify_capacity(hist.to(DEVICE), sps.to(DEVICE), max_len=dev(max_len), active=dev(active),
                               backend=backend)
        a = dk.schedule_verify(surv.to(DEVICE), sps.to(DEVICE), history=hist.to(DEVICE), **kw)
        b = dk.schedule_verify(surv.to(DEVICE), sps.to(DEVICE), capacity=k, **kw)
        for x, y in zip(a, b):
            assert torch.equal(x, y), (x, y)
        # K' = min(K, current candidates), and every verify row fits in A + K.
        n_cur = int((surv.float() > 0).logical_and(dk_slots(num_req, gamma, max_len, active)).sum())
        assert int(a.lengths.sum()) == min(int(k), n_cur)


def dk_slots(num_req, gamma, max_len, active):
    act = torch.ones(num_req, dtype=torch.bool) if active is None else active
    caps = torch.full((num_req,), gamma) if max_len is None else max_len.long().clamp(0, gamma)
    return act[:, None] & (torch.arange(gamma)[None, :] < caps[:, None])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_history_is_no_candidate(backend):
    # A zero never raises τ', but a rising sps used to make it pay: sps[B] = B.
    hist = torch.tensor([[0.9, 0.0], [0.9, 0.8]])
    sps = torch.arange(7, dtype=torch.float32)
    assert cap(hist, sps, backend) == 3  # the three positive drafts, not the zero
    assert cap(torch.zeros(3, 4), torch.arange(16, dtype=torch.float32), backend) == 0
    # And capacity as schedule_verify's async path uses it: [1, 2], not [2, 2].
    s = dk.schedule_verify(hist.to(DEVICE), sps.to(DEVICE), mode="async", history=hist.to(DEVICE), backend=backend)
    assert s.lengths.tolist() == [1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_shapes(backend):
    assert cap(torch.empty(3, 0), torch.ones(4), backend) == 0  # γ = 0
    assert cap(torch.empty(0, 4), torch.ones(1), backend) == 0  # R = 0
    assert cap(torch.ones(2, 3), torch.ones(9), backend, active=torch.zeros(2, dtype=torch.bool)) == 0
    assert cap(torch.ones(2, 3), torch.ones(9), backend, max_len=torch.tensor([0, 2])) == 2  # flat sps: all
    # Every candidate of a full bucket (4 x 4 = 16 lanes, no padding): K = 16 with a rising sps.
    assert cap(torch.ones(4, 4), torch.arange(21, dtype=torch.float32), backend) == 16


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_nan_history_is_no_candidate(backend):
    """With value checks off a NaN history is defined: it is not a candidate (NaN > 0 is false)."""
    hist = torch.tensor([[0.9, float("nan")], [0.9, 0.8]])
    dk.set_value_checks(False)
    try:
        assert cap(hist, torch.arange(7, dtype=torch.float32), backend) == 3
    finally:
        dk.set_value_checks(None)


def test_triton_size_limit():
    from dspark_kernels.triton.verify_capacity import verify_capacity as launch

    rec = op.OP.record(history=torch.rand(16385, 1), sps=torch.ones(32771))
    with pytest.raises(ValueError, match="at most R\\*γ = 16384"):
        launch(rec)


# ---------------------------------------------------------------------------
# Capturability proxies.
# ---------------------------------------------------------------------------


def _args(backend):
    hist = torch.tensor([[0.95, 0.5, 0.2], [0.7, 0.6, 0.6], [0.9, 0.9, 0.9]], device=DEVICE)
    sps = (1.0 / (1.0 + 0.2 * torch.arange(13, dtype=torch.float32))).to(DEVICE)
    max_len = torch.tensor([3, 2, 3], dtype=torch.int32, device=DEVICE)
    active = torch.tensor([True, True, False], device=DEVICE)
    return (hist, sps, max_len, active, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    torch.library.opcheck(torch.ops.dspark.verify_capacity.default, _args(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def step(hist, sps, max_len, active, surv):
        k = dk.verify_capacity(hist, sps, max_len=max_len, active=active, backend=backend)
        return k, *dk.schedule_verify(surv, sps, mode="async", capacity=k, max_len=max_len, active=active,
                                      backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    hist, sps, max_len, active, _ = _args(backend)
    for surv in (hist, hist * 0.5, torch.zeros_like(hist)):
        want, got = step(hist, sps, max_len, active, surv), compiled(hist, sps, max_len, active, surv)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    if interpreted(backend):
        pytest.skip("the Triton interpreter copies tensors to the host by design")
    with HostSyncSpy() as spy:
        op.OP.run(backend, op.OP.Args(*_args(backend)[:-1]))
    assert spy.syncs == [], f"host syncs inside verify_capacity ({backend}): {spy.syncs}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture(backend):
    """verify_capacity + schedule_verify(capacity=K) captured once, replayed on fresh inputs."""
    rng = np.random.default_rng(3)
    num_req, gamma = 9, 5
    with debug_mode(False):
        fresh = lambda: [random_history(rng, num_req, gamma).cuda(), random_history(rng, num_req, gamma).cuda()]  # noqa
        sps = random_sps(rng, num_req * (gamma + 1) + 1).cuda()
        static = fresh()

        def step(hist, surv):
            k = dk.verify_capacity(hist, sps, backend=backend)
            return k, *dk.schedule_verify(surv, sps, mode="async", capacity=k, backend=backend)

        graph, outs = capture_graph(lambda: step(*static))
        for trial in range(4):
            new = fresh()
            for dst, src in zip(static, new):
                dst.copy_(src)
            graph.replay()
            torch.cuda.synchronize()
            for g, w in zip(outs, step(*new)):
                assert torch.equal(g, w)
