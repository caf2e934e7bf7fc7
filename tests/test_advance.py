"""advance: equality with a plain Python loop (EOS ids, max new tokens, max positions, inactive requests),
every backend token-identical, odd shapes (R = 0, γ = 0, non-contiguous tokens, int64 inputs), the value
checks, the unchecked path, and capturability proxies (opcheck, torch.compile, no host sync)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import advance as op

from host_sync import HostSyncSpy
from support import DEVICE, available_backends, interpreted, to_cpu

BACKENDS = available_backends(op)
FIELDS = dk.Advance._fields


def loop_advance(tokens, num_accepted, anchor, start_pos, num_generated, active, offset, eos=None,
                 max_new=None, max_pos=None):
    """The contract one request at a time, in Python integers."""
    out = {f: [] for f in FIELDS if f != "offset"}
    for r in range(len(tokens)):
        row = tokens[r]
        gamma = len(row) - 1
        n = min(max(num_accepted[r], 0), gamma) + 1
        emit, hit_eos = 0, False
        if active[r]:
            for j in range(n):
                if max_new is not None and num_generated[r] + emit >= max_new[r]:
                    break
                emit += 1
                if eos is not None and row[j] in eos:
                    hit_eos = True
                    break
        start = start_pos[r] + emit
        gen = num_generated[r] + emit
        done = hit_eos or (max_new is not None and gen >= max_new[r]) or \
            (max_pos is not None and start + gamma + 1 > max_pos[r])
        finished = bool(active[r]) and done
        out["anchor"].append(row[emit - 1] if emit else anchor[r])
        out["num_emitted"].append(emit)
        out["start_pos"].append(start)
        out["kv_lens"].append(start)
        out["num_generated"].append(gen)
        out["active"].append(bool(active[r]) and not finished)
        out["finished"].append(finished)
    out["offset"] = offset + 1
    return out


def random_case(rng, num_req, gamma, *, dtype=torch.int32, vocab=20, eos=True, max_new=True, max_pos=True):
    """Small vocabularies so EOS ids are common; budgets near the generated counts so all cuts happen."""
    t = lambda a, d=dtype: torch.tensor(np.asarray(a), dtype=d).reshape(np.shape(a))
    case = dict(
        tokens=t(rng.integers(0, vocab, (num_req, gamma + 1))),
        num_accepted=t(rng.integers(0, gamma + 1, num_req)),
        anchor=t(rng.integers(0, vocab, num_req)),
        start_pos=t(rng.integers(0, 60, num_req)),
        num_generated=t(rng.integers(0, 12, num_req)),
        active=torch.tensor(rng.uniform(size=num_req) < 0.8, dtype=torch.bool),
        offset=torch.tensor(int(rng.integers(0, 1 << 40)), dtype=torch.int64),
    )
    if eos:
        case["eos_token_ids"] = t(rng.choice(vocab, size=int(rng.integers(0, 4)), replace=False))
    if max_new:
        case["max_new_tokens"] = case["num_generated"] + t(rng.integers(0, gamma + 3, num_req))
    if max_pos:
        case["max_positions"] = case["start_pos"] + t(rng.integers(gamma, 2 * gamma + 4, num_req))
    return case


def expected(case):
    lists = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    return loop_advance(lists["tokens"], lists["num_accepted"], lists["anchor"], lists["start_pos"],
                        lists["num_generated"], lists["active"], lists["offset"], lists.get("eos_token_ids"),
                        lists.get("max_new_tokens"), lists.get("max_positions"))


def run(backend, case):
    out = dk.advance(**{k: v.to(DEVICE) for k, v in case.items()}, backend=backend)
    return dk.Advance(*(to_cpu(t) for t in out))


def check(backend, case):
    got = run(backend, case)
    want = expected(case)
    num_req = case["tokens"].shape[0]
    for name in FIELDS:
        g = getattr(got, name)
        if name == "offset":
            assert g.dtype == torch.int64 and g.shape == () and int(g) == want["offset"]
            continue
        dtype = torch.bool if name in ("active", "finished") else torch.int32
        assert g.dtype == dtype and g.shape == (num_req,), (name, g.dtype, g.shape)
        assert g.tolist() == want[name], (name, g.tolist(), want[name])
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_req", [0, 1, 7, 300])
@pytest.mark.parametrize("gamma", [0, 1, 5, 8])
def test_matches_loop(backend, num_req, gamma):
    rng = np.random.default_rng(num_req * 31 + gamma)
    for trial in range(4):
        flags = dict(eos=trial != 1, max_new=trial != 2, max_pos=trial != 3)
        check(backend, random_case(rng, num_req, gamma, dtype=(torch.int32, torch.int64)[trial % 2], **flags))


@pytest.mark.parametrize("backend", BACKENDS)
def test_handmade(backend):
    # r0: EOS (id 2) at index 1 of 3 offered -> emits 2, finished. r1: all 4 offered, no limit hit.
    # r2: inactive -> nothing, keeps its anchor. r3: budget of 1 token left -> emits 1, finished.
    # r4: the next block would pass max_positions -> emits everything, finished.
    case = dict(tokens=torch.tensor([[5, 2, 7, 9], [4, 4, 4, 8], [1, 1, 1, 1], [6, 7, 8, 9], [3, 3, 3, 3]]),
                num_accepted=torch.tensor([2, 3, 0, 3, 1]), anchor=torch.tensor([10, 11, 12, 13, 14]),
                start_pos=torch.tensor([10, 20, 30, 40, 50]), num_generated=torch.tensor([0, 0, 0, 9, 0]),
                active=torch.tensor([True, True, False, True, True]), offset=torch.tensor(41),
                eos_token_ids=torch.tensor([2, 99]), max_new_tokens=torch.tensor([100, 100, 100, 10, 100]),
                max_positions=torch.tensor([100, 100, 100, 100, 54]))
    got = check(backend, case)
    assert got.num_emitted.tolist() == [2, 4, 0, 1, 2]
    assert got.anchor.tolist() == [2, 8, 12, 6, 3]
    assert got.finished.tolist() == [True, False, False, True, True]
    assert got.active.tolist() == [False, True, False, False, False]
    assert got.start_pos.tolist() == [12, 24, 30, 41, 52] and int(got.offset) == 42


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_after_the_offered_tokens_does_not_count(backend):
    # tokens past num_accepted + 1 are rejected drafts: an EOS there ends nothing.
    case = dict(tokens=torch.tensor([[5, 6, 2, 2]]), num_accepted=torch.tensor([1]), anchor=torch.tensor([0]),
                start_pos=torch.tensor([0]), num_generated=torch.tensor([0]), active=torch.tensor([True]),
                offset=torch.tensor(0), eos_token_ids=torch.tensor([2]))
    got = check(backend, case)
    assert got.num_emitted.tolist() == [2] and got.finished.tolist() == [False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_tokens(backend):
    rng = np.random.default_rng(5)
    case = random_case(rng, 9, 5, dtype=torch.int64)
    wide = torch.zeros(9, 12, dtype=torch.int64)
    wide[:, ::2] = case["tokens"]
    for toks in (wide[:, ::2], case["tokens"].t().contiguous().t()):
        assert not toks.is_contiguous()
        check(backend, dict(case, tokens=toks))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_large_batch(backend):
    rng = np.random.default_rng(11)
    case = random_case(rng, 2048, 7)
    want = run("reference", case)
    for g, w in zip(run(backend, case), want):
        assert torch.equal(g, w)


def _bad(**over):
    case = dict(tokens=torch.zeros(2, 3, dtype=torch.int32), num_accepted=torch.tensor([0, 1]),
                anchor=torch.tensor([0, 0]), start_pos=torch.tensor([0, 0]), num_generated=torch.tensor([0, 0]),
                active=torch.tensor([True, True]), offset=torch.tensor(0))
    case.update(over)
    return case


@pytest.mark.parametrize("over, match", [
    (dict(num_accepted=torch.tensor([0, 3])), "num_accepted must lie in"),
    (dict(num_accepted=torch.tensor([-1, 0])), "num_accepted must lie in"),
    (dict(start_pos=torch.tensor([-1, 0])), "start_pos must be >= 0"),
    (dict(num_generated=torch.tensor([0, -2])), "num_generated must be >= 0"),
    (dict(start_pos=torch.tensor([0, 2**31 - 3])), "below 2\\*\\*31"),
    (dict(tokens=torch.zeros(2, 0, dtype=torch.int32)), "γ \\+ 1 >= 1"),
    (dict(active=torch.tensor([1, 1])), "active must have dtype"),
    (dict(offset=torch.tensor([0, 1])), "offset must be a 0-d"),
    (dict(max_new_tokens=torch.tensor([1, 2, 3])), "max_new_tokens must have shape"),
])
def test_errors_name_the_argument(over, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dk.advance(**_bad(**over))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_path_clamps_num_accepted(backend):
    # Checks off: num_accepted outside [0, γ] is clamped, never an out-of-bounds read of tokens.
    rng = np.random.default_rng(2)
    case = random_case(rng, 40, 4)
    wild = torch.tensor(rng.integers(-(1 << 20), 1 << 20, 40), dtype=torch.int32)
    dk.set_value_checks(False)
    try:
        got = run(backend, dict(case, num_accepted=wild))
    finally:
        dk.set_value_checks(None)
    want = expected(dict(case, num_accepted=wild.clamp(0, 4)))
    assert got.num_emitted.tolist() == want["num_emitted"] and got.anchor.tolist() == want["anchor"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    case = random_case(np.random.default_rng(1), 6, 3)
    torch.library.opcheck(torch.ops.dspark.advance.default,
                          tuple(v.to(DEVICE) for v in op.OP.record(**case)) + (backend,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()

    def step(**kw):
        return tuple(dk.advance(**kw, backend=backend))

    compiled = torch.compile(step, fullgraph=True)
    case = {k: v.to(DEVICE) for k, v in random_case(np.random.default_rng(3), 11, 5).items()}
    for g, w in zip(compiled(**case), step(**case)):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend):
    """CPU proxy for CUDA-graph capture: the implementation reads no device value on the host."""
    if interpreted(backend):
        pytest.skip("the Triton interpreter copies tensors to the host by design")
    case = {k: v.to(DEVICE) for k, v in random_case(np.random.default_rng(4), 16, 5).items()}
    with HostSyncSpy() as spy:
        op.OP.run(backend, op.OP.record(**case))
    assert spy.syncs == [], spy.syncs
