"""CUDA-graph capture of markov_draft, rejection_sample and a whole verify round.

An engine captures its decode step once and replays it: every input lives in a
static tensor that the engine overwrites in place (copy_) before a replay, and
randomness advances through the device tensor ``offset`` that the engine bumps
with an in-place op (offset.add_(1)), either between replays or as the last
op of the captured step. For every compiled GPU backend ("triton", and "cuda"
where the extension is built) the tests below check that:

1. the op captures (debug value checks off, warm-up on a side stream first,
   as the torch.cuda.graphs documentation prescribes);
2. two replays with the offset bumped in between (outside the graph, or by an
   add_ captured inside it) draw different tokens on every stochastic row of a
   batch where agreement by chance is out of the question (V = 1000, R = 64),
   while greedy rows are unchanged;
3. a replay at the same offset draws the same tokens, and every output
   (tokens and floats, bit for bit) equals an eager call at that offset;
4. after fresh inputs are copied into the static tensors, a replay equals the
   eager call on those inputs, bit for bit (the same kernels run).

The last test chains schedule_verify -> pack_verify -> a toy target (a logits
table looked up by the packed token ids) -> rejection_sample in one graph: a
whole verify round minus attention, with the offset bumped inside the graph.
(tests/test_schedule_verify.py::test_cuda_graph_capture covers
schedule_verify + pack_verify alone.)

Every check is a function ``_check_xxx(device, backend, capture)``; with
capture=False it runs the same sequence of steps eagerly, which is how
test_checks_pass_eagerly_on_cpu exercises the test logic itself on a machine
without a GPU. The GPU tests are skipped there.
"""

from __future__ import annotations

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.ops import markov_draft as md_op
from dspark_kernels.ops import rejection_sample as rs_op
from dspark_kernels.ops import schedule_verify as sv_op

from support import capture_graph, debug_mode


# Compiled backends under test; each test skips one that cannot run its ops here.
GPU_BACKENDS = ("triton", "cuda")
BUMPS = ("outside", "inside")  # where the engine advances the offset: between replays, or in the graph
RS_MODES = ("probs", "logits")  # rejection_sample with draft_probs, or draft_token_probs + draft_logits
SCHEDULE_MODES = ("causal", "async")

OFFSET0 = 2**33 + 5  # past 32 bits: the high word of the offset is live too
NUM_REQ, GAMMA, VOCAB = 64, 4, 1000
MIN_DIFFER = 0.5  # fraction of stochastic rows whose draws must change with the offset (~0.92-1.0 seen)


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


class _Step:
    """One engine step over static tensors, run as a replayed CUDA graph (capture=True)
    or eagerly (capture=False). Calling it runs the step once and returns clones of the
    outputs (the graph's output tensors are overwritten by the next replay)."""

    def __init__(self, fn, capture: bool, warmup: int = 3):
        self.fn = fn
        self.graph = None
        self.outputs = None
        if not capture:
            return
        if not torch.cuda.is_available():
            raise RuntimeError("capture=True needs a CUDA GPU")
        assert not dk.debug_enabled(), "value checks read device values (host syncs): turn debug off to capture"
        self.graph, self.outputs = capture_graph(self.fn, warmup)

    def __call__(self) -> tuple[torch.Tensor, ...]:
        if self.graph is None:
            out = self.fn()
        else:
            self.graph.replay()
            out = self.outputs
        return tuple(t.clone() for t in out)


def _require(backend: str, *ops) -> None:
    for op in ops:
        why = op.IMPLS.missing(backend, "cuda")
        if why is not None:
            pytest.skip(f"backend {backend!r} cannot run {op.IMPLS.name} on CUDA tensors: {why}")


def _offset(value: int, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.int64, device=device)


def _to(d: dict, device) -> dict:
    return {k: v.to(device) for k, v in d.items()}


def _load(static: dict, fresh: dict) -> None:
    """Copy fresh CPU inputs into the static device tensors, in place (what an engine does)."""
    for name, value in fresh.items():
        static[name].copy_(value)


def _assert_same(got, want, names, what: str) -> None:
    """Bit-for-bit equality of two output tuples."""
    assert len(got) == len(want) == len(names), what
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, (
            f"{what}: {name} is {g.dtype}{tuple(g.shape)}, expected {w.dtype}{tuple(w.shape)}"
        )
        if torch.equal(g, w):
            continue
        bad = g != w
        msg = f"{what}: {name} differs at {int(bad.sum())} of {g.numel()} entries"
        if g.is_floating_point():
            msg += f" (max |diff| {float((g.double() - w.double()).abs().max()):.3g})"
        raise AssertionError(msg)


def _assert_offset_sensitive(first, second, temperature, live, what: str) -> None:
    """Stochastic live rows draw new tokens at a new offset; greedy rows do not change."""
    first, second, temperature, live = first.cpu(), second.cpu(), temperature.cpu(), live.cpu()
    differ = (first != second).any(dim=1)
    stochastic = (temperature > 0) & live
    greedy = (temperature == 0) & live
    assert int(stochastic.sum()) >= 32 and int(greedy.sum()) >= 4, "the batch needs both kinds of row"
    frac = float(differ[stochastic].double().mean())
    assert frac > MIN_DIFFER, f"{what}: only {frac:.2f} of the stochastic rows changed with the offset"
    assert not bool(differ[greedy].any()), f"{what}: greedy rows changed with the offset"


def _temperatures(gen, num_req):
    """Every 8th request greedy (T = 0), the others stochastic."""
    t = torch.tensor([0.7, 1.0, 1.3])[torch.randint(0, 3, (num_req,), generator=gen)]
    t[::8] = 0.0
    return t


def _seeds(gen, num_req):
    return torch.randint(-(2**62), 2**62, (num_req,), generator=gen, dtype=torch.int64)


# ---------------------------------------------------------------------------
# markov_draft
# ---------------------------------------------------------------------------

MD_FIELDS = ("tokens", "token_probs", "confidence", "survival", "draft_probs", "draft_logits")
MD_RANK, MD_HIDDEN = 16, 32


def _markov_weights(gen, vocab, gamma):
    """A gated head with a confidence head and per-position STS temperatures (fixed weights)."""
    r, d = MD_RANK, MD_HIDDEN
    return dict(
        w1=torch.randn(vocab, r, generator=gen),
        w2=torch.randn(vocab, r, generator=gen) / r**0.5,
        gate_weight=1.5 * torch.randn(r, d + r, generator=gen) / (d + r) ** 0.5,
        gate_bias=0.5 * torch.randn(r, generator=gen),
        conf_weight=torch.randn(d + r, generator=gen) / (d + r) ** 0.5,
        conf_bias=torch.tensor(0.3),
        sts_temperature=torch.linspace(0.8, 1.5, gamma),
    )


def _markov_inputs(gen, num_req, gamma, vocab):
    """Per-step inputs: what the engine copies into the static tensors before a replay."""
    return dict(
        base_logits=1.5 * torch.randn(num_req, gamma, vocab, generator=gen),
        anchor=torch.randint(0, vocab, (num_req,), generator=gen, dtype=torch.int32),
        hidden=torch.randn(num_req, gamma, MD_HIDDEN, generator=gen),
        temperature=_temperatures(gen, num_req),
        seed=_seeds(gen, num_req),
    )


def _markov_call(inp, weights, offset, backend):
    out = dk.markov_draft(
        inp["base_logits"], inp["anchor"], weights["w1"], weights["w2"], inp["temperature"], inp["seed"], offset,
        hidden=inp["hidden"], conf_weight=weights["conf_weight"], conf_bias=weights["conf_bias"],
        sts_temperature=weights["sts_temperature"], gate_weight=weights["gate_weight"],
        gate_bias=weights["gate_bias"], return_draft_probs=True, return_draft_logits=True, backend=backend,
    )
    assert all(t is not None for t in out)
    return tuple(out)


def _check_markov_structure(out, vocab, what):
    tokens, token_probs, confidence, survival = (t.cpu() for t in out[:4])
    assert tokens.dtype == torch.int32 and int(tokens.min()) >= 0 and int(tokens.max()) < vocab, what
    assert bool(((token_probs > 0) & (token_probs <= 1)).all()), what
    assert bool(((confidence > 0) & (confidence < 1)).all()), what
    assert bool((survival[:, 1:] <= survival[:, :-1]).all()), what


def _run_twice(run, offset, bump):
    """Run at OFFSET0, advance the offset the engine's way (`bump`), run again; (first, second)."""
    offset.fill_(OFFSET0)
    a = run()
    if bump == "outside":
        offset.add_(1)
    b = run()
    assert int(offset) == OFFSET0 + (2 if bump == "inside" else 1), f"offset is {int(offset) - OFFSET0} past OFFSET0"
    return a, b


def _check_markov_draft(device, backend, capture: bool, bump: str = "outside",
                        num_req=NUM_REQ, gamma=GAMMA, vocab=VOCAB):
    gen = torch.Generator().manual_seed(1234)
    weights = _to(_markov_weights(gen, vocab, gamma), device)
    static = _to(_markov_inputs(gen, num_req, gamma, vocab), device)
    offset = _offset(OFFSET0, device)

    def step():
        out = _markov_call(static, weights, offset, backend)
        if bump == "inside":
            offset.add_(1)
        return out

    run = _Step(step, capture)
    eager = lambda off: _markov_call(static, weights, _offset(off, device), backend)  # noqa: E731
    live = torch.ones(num_req, dtype=torch.bool)

    # 1. Bump the offset between two replays: new draws.
    a, b = _run_twice(run, offset, bump)
    _check_markov_structure(a, vocab, "replay at OFFSET0")
    _check_markov_structure(b, vocab, "replay at OFFSET0 + 1")
    _assert_offset_sensitive(a[0], b[0], static["temperature"], live, "markov_draft")
    # 2. Same offset: same draws, and equal to eager calls at those offsets.
    offset.fill_(OFFSET0)
    _assert_same(run(), a, MD_FIELDS, "markov_draft replayed at the same offset")
    _assert_same(a, eager(OFFSET0), MD_FIELDS, "markov_draft replay vs eager at OFFSET0")
    _assert_same(b, eager(OFFSET0 + 1), MD_FIELDS, "markov_draft replay vs eager at OFFSET0 + 1")
    # 3. Fresh inputs copied into the static tensors.
    for trial in range(2):
        fresh = _markov_inputs(gen, num_req, gamma, vocab)
        _load(static, fresh)
        offset.fill_(OFFSET0 + 11 * trial)
        got = run()
        want = _markov_call(_to(fresh, device), weights, _offset(OFFSET0 + 11 * trial, device), backend)
        _assert_same(got, want, MD_FIELDS, f"markov_draft on fresh inputs (trial {trial})")
        assert not torch.equal(got[0], a[0]), "the step did not read its new inputs"


# ---------------------------------------------------------------------------
# rejection_sample
# ---------------------------------------------------------------------------

RS_FIELDS = ("tokens", "num_accepted")


def _cu_verify(lengths, active):
    rows = torch.where(active, lengths.long() + 1, torch.zeros_like(lengths.long()))
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(rows, 0).to(torch.int32)
    return cu


def _sampling_params(gen, num_req, vocab):
    return dict(
        temperature=_temperatures(gen, num_req),
        seed=_seeds(gen, num_req),
        top_k=torch.tensor([0, 50, vocab + 3], dtype=torch.int32)[torch.randint(0, 3, (num_req,), generator=gen)],
        top_p=torch.tensor([1.0, 0.9])[torch.randint(0, 2, (num_req,), generator=gen)],
    )


def _drafts(gen, num_req, gamma, vocab):
    """Drafts sampled from their own distributions q: (q_logits, q, draft_tokens)."""
    q_logits = 1.5 * torch.randn(num_req, gamma, vocab, generator=gen)
    q = torch.softmax(q_logits, dim=-1)
    tokens = torch.multinomial(q.reshape(-1, vocab), 1, generator=gen).reshape(num_req, gamma).to(torch.int32)
    return q_logits, q, tokens


def _rs_inputs(gen, num_req, gamma, vocab, mode):
    """A static padded batch: target_logits always has R·(γ+1) rows (rows past
    cu_verify[R] are ignored), mixed lengths, a few inactive requests."""
    lengths = torch.randint(0, gamma + 1, (num_req,), generator=gen, dtype=torch.int32)
    active = torch.arange(num_req) % 16 != 5
    q_logits, q, tokens = _drafts(gen, num_req, gamma, vocab)
    d = dict(
        target_logits=1.5 * torch.randn(num_req * (gamma + 1), vocab, generator=gen),
        draft_tokens=tokens,
        lengths=lengths,
        cu_verify=_cu_verify(lengths, active),
        **_sampling_params(gen, num_req, vocab),
    )
    if mode == "probs":
        d["draft_probs"] = q
    else:
        d["draft_logits"] = q_logits
        d["draft_token_probs"] = q.gather(-1, tokens.long()[..., None]).squeeze(-1)
        d["draft_temperature"] = torch.ones(num_req)
    return d


def _rs_call(inp, offset, backend):
    return tuple(dk.rejection_sample(
        inp["target_logits"], inp["draft_tokens"], inp.get("draft_probs"), inp["lengths"], inp["cu_verify"],
        inp["temperature"], inp["seed"], offset, top_k=inp["top_k"], top_p=inp["top_p"],
        draft_token_probs=inp.get("draft_token_probs"), draft_logits=inp.get("draft_logits"),
        draft_temperature=inp.get("draft_temperature"), backend=backend,
    ))


def _live(cu_verify):
    cu = cu_verify.cpu().long()
    return (cu[1:] - cu[:-1]) > 0


def _check_rs_structure(tokens, n_acc, draft_tokens, lengths, live, vocab, what):
    """Accepted drafts, then one emitted token in [0, V), then -1; inactive requests emit nothing."""
    tokens, n = tokens.cpu().long(), n_acc.cpu().long()
    drafts, lengths, live = draft_tokens.cpu().long(), lengths.cpu().long(), live.cpu()
    gamma = drafts.shape[1]
    pos = torch.arange(gamma + 1)
    assert bool(((n >= 0) & (n <= lengths)).all()), f"{what}: num_accepted outside [0, lengths]"
    accepted = pos[None, :gamma] < n[:, None]
    assert torch.equal(tokens[:, :gamma][accepted], drafts[accepted]), f"{what}: accepted tokens are not the drafts"
    last = tokens.gather(1, n[:, None]).squeeze(1)
    assert bool(((last[live] >= 0) & (last[live] < vocab)).all()), f"{what}: emitted token outside [0, V)"
    assert bool((tokens[pos[None, :] > n[:, None]] == -1).all()), f"{what}: no -1 past the emitted token"
    assert bool((tokens[~live] == -1).all()) and bool((n[~live] == 0).all()), f"{what}: inactive request emitted"


def _check_rejection_sample(device, backend, capture: bool, bump: str = "outside", mode: str = "probs",
                            num_req=NUM_REQ, gamma=GAMMA, vocab=VOCAB):
    gen = torch.Generator().manual_seed(4321 + len(mode))
    static = _to(_rs_inputs(gen, num_req, gamma, vocab, mode), device)
    offset = _offset(OFFSET0, device)

    def step():
        out = _rs_call(static, offset, backend)
        if bump == "inside":
            offset.add_(1)
        return out

    run = _Step(step, capture)
    eager = lambda off: _rs_call(static, _offset(off, device), backend)  # noqa: E731

    def structure(out, what):
        _check_rs_structure(*out, static["draft_tokens"], static["lengths"], _live(static["cu_verify"]), vocab, what)

    a, b = _run_twice(run, offset, bump)
    structure(a, "replay at OFFSET0")
    structure(b, "replay at OFFSET0 + 1")
    _assert_offset_sensitive(a[0], b[0], static["temperature"], _live(static["cu_verify"]), "rejection_sample")
    offset.fill_(OFFSET0)
    _assert_same(run(), a, RS_FIELDS, "rejection_sample replayed at the same offset")
    _assert_same(a, eager(OFFSET0), RS_FIELDS, "rejection_sample replay vs eager at OFFSET0")
    _assert_same(b, eager(OFFSET0 + 1), RS_FIELDS, "rejection_sample replay vs eager at OFFSET0 + 1")
    for trial in range(2):
        fresh = _rs_inputs(gen, num_req, gamma, vocab, mode)
        _load(static, fresh)
        offset.fill_(OFFSET0 + 11 * trial)
        got = run()
        want = _rs_call(_to(fresh, device), _offset(OFFSET0 + 11 * trial, device), backend)
        _assert_same(got, want, RS_FIELDS, f"rejection_sample on fresh inputs (trial {trial})")
        structure(got, f"fresh inputs (trial {trial})")
        assert not torch.equal(got[0], a[0]), "the step did not read its new inputs"


# ---------------------------------------------------------------------------
# A verify round: schedule_verify -> pack_verify -> toy target -> rejection_sample
# ---------------------------------------------------------------------------

ROUND_FIELDS = ("lengths", "cu_verify", "total", "expected_tokens", "token_ids", "positions", "row_request",
                "tokens", "num_accepted")


def _round_inputs(gen, num_req, gamma, vocab, mode):
    """What the drafter hands the verifier each step (survival, drafts and their q),
    plus the per-request scheduling and sampling state."""
    _, q, tokens = _drafts(gen, num_req, gamma, vocab)
    d = dict(
        survival=torch.cumprod(0.3 + 0.7 * torch.rand(num_req, gamma, generator=gen), dim=1),
        max_len=torch.randint(0, gamma + 1, (num_req,), generator=gen, dtype=torch.int32),
        active=torch.rand(num_req, generator=gen) < 0.9,
        anchor=torch.randint(0, vocab, (num_req,), generator=gen, dtype=torch.int32),
        start_pos=torch.randint(0, 5000, (num_req,), generator=gen, dtype=torch.int32),
        draft_tokens=tokens,
        draft_probs=q,
        **_sampling_params(gen, num_req, vocab),
    )
    if mode == "async":
        d["history"] = torch.cumprod(0.3 + 0.7 * torch.rand(num_req, gamma, generator=gen), dim=1)
    return d


def _round_constants(gen, num_req, gamma, vocab):
    """sps[B] falls slowly with the batch size B (so schedules mix lengths); the toy
    target's logits for the token after id x are row x of a fixed table."""
    batch = torch.arange(num_req * (gamma + 1) + 1, dtype=torch.float32)
    return dict(sps=1.0 / (1.0 + 0.02 * batch), target_table=1.5 * torch.randn(vocab, vocab, generator=gen))


def _round_call(inp, const, offset, backend, mode):
    s = dk.schedule_verify(inp["survival"], const["sps"], mode=mode, history=inp.get("history"),
                           max_len=inp["max_len"], active=inp["active"], backend=backend)
    vb = dk.pack_verify(inp["anchor"], inp["draft_tokens"], s.lengths, s.cu_verify, inp["start_pos"],
                        backend="reference")  # pure torch, capturable (backend="triton" is tested beside it)
    # Static [R·(γ+1), V] target logits; padding rows (pad_token 0) read row 0 and are ignored.
    target_logits = const["target_table"][vb.token_ids.clamp(min=0).long()]
    tokens, n_acc = dk.rejection_sample(
        target_logits, inp["draft_tokens"], inp["draft_probs"], s.lengths, s.cu_verify, inp["temperature"],
        inp["seed"], offset, top_k=inp["top_k"], top_p=inp["top_p"], backend=backend,
    )
    return (*s, *vb[:3], tokens, n_acc)  # no page table: slot_mapping is empty


def _check_verify_round(device, backend, capture: bool, mode: str = "causal", bump: str = "inside",
                        num_req=NUM_REQ, gamma=GAMMA, vocab=VOCAB):
    gen = torch.Generator().manual_seed(777 + len(mode))
    const = _to(_round_constants(gen, num_req, gamma, vocab), device)
    static = _to(_round_inputs(gen, num_req, gamma, vocab, mode), device)
    offset = _offset(OFFSET0, device)

    def step():
        out = _round_call(static, const, offset, backend, mode)
        if bump == "inside":
            offset.add_(1)  # the engine advances the RNG as the last op of its captured step
        return out

    run = _Step(step, capture)
    eager = lambda inp, off: _round_call(inp, const, _offset(off, device), backend, mode)  # noqa: E731
    n_sched = 7  # schedule_verify + pack_verify outputs; rejection_sample's follow

    def structure(out, inp, what):
        lengths, cu_verify = out[0].cpu(), out[1].cpu()
        live = _live(cu_verify)
        assert torch.equal(live, inp["active"].cpu()), f"{what}: schedule gave rows to exactly the active requests"
        assert int(lengths.max()) > 0 and int(lengths.min()) < gamma, f"{what}: schedule lengths are not mixed"
        _check_rs_structure(out[7], out[8], inp["draft_tokens"], lengths, live, vocab, what)

    a, b = _run_twice(run, offset, bump)
    structure(a, static, "round at OFFSET0")
    _assert_same(b[:n_sched], a[:n_sched], ROUND_FIELDS[:n_sched], "schedule and packing do not depend on the offset")
    _assert_offset_sensitive(a[7], b[7], static["temperature"], _live(a[1]), "verify round")
    offset.fill_(OFFSET0)
    _assert_same(run(), a, ROUND_FIELDS, "verify round replayed at the same offset")
    _assert_same(a, eager(static, OFFSET0), ROUND_FIELDS, "verify round replay vs eager at OFFSET0")
    _assert_same(b, eager(static, OFFSET0 + 1), ROUND_FIELDS, "verify round replay vs eager at OFFSET0 + 1")
    for trial in range(3):
        fresh = _round_inputs(gen, num_req, gamma, vocab, mode)
        _load(static, fresh)
        offset.fill_(OFFSET0 + 11 * trial)
        got = run()
        want = eager(_to(fresh, device), OFFSET0 + 11 * trial)
        _assert_same(got, want, ROUND_FIELDS, f"verify round on fresh inputs (trial {trial})")
        structure(got, fresh, f"fresh inputs (trial {trial})")
        assert not torch.equal(got[0], a[0]) or not torch.equal(got[7], a[7]), "the step did not read its new inputs"


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_checks_pass_eagerly_on_cpu():
    """The same sequences as the GPU tests, run eagerly with the reference on CPU:
    checks the test logic (inputs, thresholds, expectations) on any machine."""
    for bump in BUMPS:
        _check_markov_draft("cpu", "reference", capture=False, bump=bump)
        for mode in RS_MODES:
            _check_rejection_sample("cpu", "reference", capture=False, bump=bump, mode=mode)
    for mode in SCHEDULE_MODES:
        for bump in BUMPS:
            _check_verify_round("cpu", "reference", capture=False, mode=mode, bump=bump)


@pytest.mark.gpu
@pytest.mark.parametrize("bump", BUMPS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_markov_draft_cuda_graph(backend, bump):
    _require(backend, md_op)
    with debug_mode(False):
        _check_markov_draft("cuda", backend, capture=True, bump=bump)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", RS_MODES)
@pytest.mark.parametrize("bump", BUMPS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_rejection_sample_cuda_graph(backend, bump, mode):
    _require(backend, rs_op)
    with debug_mode(False):
        _check_rejection_sample("cuda", backend, capture=True, bump=bump, mode=mode)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", SCHEDULE_MODES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_verify_round_cuda_graph(backend, mode):
    """schedule_verify -> pack_verify -> target -> rejection_sample in one graph, offset bumped inside it."""
    _require(backend, sv_op, rs_op)
    with debug_mode(False):
        _check_verify_round("cuda", backend, capture=True, mode=mode)
