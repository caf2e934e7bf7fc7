"""DSparkRound: the whole round on the device with the host knowing each batch size in advance.

A toy engine (a logits table looked up by the packed token ids, a KV cache the
target appends to) drives the round, so the tests can check every piece:
the round equals the ops composed by hand; the async bucket is the smallest
one >= R + K with K the capacity of two rounds earlier, known through the
CapacityPipe without a device read, and every verify row fits in it; the
target processes fewer rows than R·(γ+1) under load; the round's device work
reads no device value on the host (HostSyncSpy); request slots finish and
stop; on CUDA one graph per bucket is captured and replays equal the eager
rounds (skipped without a GPU, run by bench.gpu_proof).
"""

from __future__ import annotations

import pytest
import torch

import dspark_kernels as dk
from dspark_kernels.engine import demo
from dspark_kernels.engine.round import DSparkRound, RoundState, default_buckets

from host_sync import HostSyncSpy
from support import DEVICE

R, GAMMA, V, RANK, PAGE = 6, 4, 29, 5, 4


class ToyEngine:
    """Target logits = table[token] (a first-order chain); a paged KV cache of one 2-dim head per token."""

    def __init__(self, seed=0, device="cpu", load="heavy", pages_per_request=40):
        g = torch.Generator().manual_seed(seed)
        self.table = (torch.randn(V, V, generator=g) * 2).to(device)
        self.w1 = torch.randn(V, RANK, generator=g).to(device)
        self.w2 = torch.randn(V, RANK, generator=g).to(device)
        self.conf_weight = torch.randn(1 + RANK, generator=g).to(device)
        self.conf_bias = torch.tensor(1.5).to(device)
        num_pages = R * pages_per_request + 1
        self.page_table = torch.arange(R * pages_per_request, dtype=torch.int32).reshape(R, -1).to(device)
        self.scratch_slot = (num_pages - 1) * PAGE
        self.k = torch.zeros(num_pages, PAGE, 1, 2, device=device)
        self.v = torch.zeros(num_pages, PAGE, 1, 2, device=device)
        self.hidden = torch.zeros(R, GAMMA, 1, device=device)
        # Step time 1 + B/4 ms (heavy: a draft pays only if its survival is above ~0.6) or 1 + B/2048 (light).
        per_row = {"heavy": 1 / 4, "light": 1 / 2048}[load]
        self.sps = (1.0 / (1.0 + torch.arange(R * (GAMMA + 1) + 1) * per_row)).float().to(device)
        self.calls = []

    def head(self):
        return dict(w1=self.w1, w2=self.w2, conf_weight=self.conf_weight, conf_bias=self.conf_bias)

    def drafter(self, state):
        return self.table[state.anchor.long()][:, None, :].expand(R, GAMMA, V) * 0.5, self.hidden

    def target(self, batch, cu_verify, kv_lens, state):
        # keys = (token id, position): what append_verify_kv wrote can be checked afterwards.
        kv = torch.stack([batch.token_ids.float(), batch.positions.float()], -1)[:, None, :]
        dk.append_verify_kv(kv, kv, self.k, self.v, batch.slot_mapping)
        self.calls.append(batch.token_ids.shape[0])
        return self.table[batch.token_ids.long()]


def make_round(engine, policy="async", **kw):
    rnd = DSparkRound(num_requests=R, gamma=GAMMA, vocab_size=V, head=engine.head(), drafter=engine.drafter,
                      target=engine.target, sps=engine.sps, page_table=engine.page_table, page_size=PAGE,
                      scratch_slot=engine.scratch_slot, policy=policy, **kw)
    for r in range(R):
        rnd.set_request(r, anchor=(3 * r) % V, start_pos=r, temperature=(0.0 if r == 0 else 1.0), seed=100 + r)
    return rnd


def by_hand(engine, state, rows, capacity, policy, draft_mode="logits"):
    """One round from the public ops, composed by hand (the contract DSparkRound implements)."""
    base, hidden = engine.drafter(state)
    draft = dk.markov_draft(base, state.anchor, engine.w1, engine.w2, state.temperature, state.seed, state.offset,
                            hidden=hidden, conf_weight=engine.conf_weight, conf_bias=engine.conf_bias,
                            return_draft_logits=True)
    if policy == "async":
        plan = dk.schedule_verify(draft.survival, engine.sps, mode="async", capacity=capacity, active=state.active)
    else:
        plan = dk.schedule_verify(draft.survival, engine.sps, mode="causal", active=state.active)
    batch = dk.pack_verify(state.anchor, draft.tokens, plan.lengths, plan.cu_verify, state.start_pos, num_rows=rows,
                           page_table=engine.page_table, page_size=PAGE, scratch_slot=engine.scratch_slot)
    logits = engine.table[batch.token_ids.long()]
    tokens, n_acc = dk.rejection_sample(logits, draft.tokens, None, plan.lengths, plan.cu_verify, state.temperature,
                                        state.seed, state.offset, draft_token_probs=draft.token_probs,
                                        draft_logits=draft.draft_logits)
    nxt = dk.advance(tokens, n_acc, state.anchor, state.start_pos, state.num_generated, state.active, state.offset,
                     max_new_tokens=state.max_new_tokens, max_positions=state.max_positions)
    return draft, plan, tokens, n_acc, nxt


@pytest.mark.parametrize("policy", ["async", "causal"])
def test_round_is_the_ops_composed_by_hand(policy):
    engine = ToyEngine()
    rnd = make_round(engine, policy)
    survivals = []
    for t in range(12):
        state = RoundState(*(x.clone() for x in rnd.state))
        rows = rnd.next_rows()
        k_expected = None
        if policy == "async":
            # K of round t: verify_capacity of round t-2's survival (the initial R·γ before that).
            k_expected = (torch.tensor(R * GAMMA, dtype=torch.int32) if t < 2 else
                          dk.verify_capacity(survivals[t - 2][0], engine.sps, active=survivals[t - 2][1]))
        out = rnd.step()
        draft, plan, tokens, n_acc, nxt = by_hand(engine, state, rows, k_expected, policy)
        survivals.append((draft.survival, state.active))
        assert out.rows == rows and out.round == t
        assert torch.equal(out.draft_tokens, draft.tokens) and torch.equal(out.lengths, plan.lengths)
        assert torch.equal(out.tokens, tokens) and torch.equal(out.num_accepted, n_acc)
        assert torch.equal(out.num_emitted, nxt.num_emitted)
        for name in ("anchor", "start_pos", "num_generated", "active", "offset"):
            assert torch.equal(getattr(rnd.state, name), getattr(nxt, name)), name
        if policy == "async":
            assert int(out.capacity) == int(k_expected)
            assert rows == next(b for b in rnd.buckets if b >= R + int(k_expected))
        else:
            assert rows == R * (GAMMA + 1)
        assert int(out.total) <= rows  # every verify row fits in the bucket


def test_async_shrinks_the_targets_batch_under_load_and_writes_the_cache():
    engine = ToyEngine(load="heavy")
    rnd = make_round(engine)
    top = R * (GAMMA + 1)
    rows = []
    for _ in range(30):
        start = rnd.state.start_pos.clone()
        anchor = rnd.state.anchor.clone()
        out = rnd.step()
        rows.append(out.rows)
        assert out.target_logits.shape == (out.rows, V)
        # The verify block's keys sit at its slots: (token, position) of the anchor at start_pos.
        for r in range(R):
            if int(out.cu_verify[r + 1]) > int(out.cu_verify[r]):  # active this round
                p = int(start[r])
                page = int(engine.page_table[r, p // PAGE])
                assert engine.k[page, p % PAGE, 0].tolist() == [float(anchor[r]), float(p)]
    assert rows[:2] == [top, top]  # the initial capacity admits every draft
    assert max(rows[2:]) < top and engine.calls == rows  # the target saw exactly the buckets
    assert all(b in rnd.buckets for b in rows)


def test_next_rows_reads_the_host_copy_only():
    engine = ToyEngine()
    rnd = make_round(engine)
    for _ in range(3):
        rnd.step()
    with HostSyncSpy() as spy:
        rnd.next_rows()
    # On CPU the pipe's buffer is a host tensor (reading it is not a device sync); the spy must see no
    # device op at all, only the host copy's read.
    assert all("local_scalar_dense" in op for op in spy.ops), spy.ops
    assert rnd.pipe.stalls == 0


def test_the_round_itself_reads_no_device_value():
    engine = ToyEngine()
    rnd = make_round(engine)
    rnd.step()
    rows = rnd.next_rows()
    with HostSyncSpy() as spy:
        dk.set_value_checks(False)  # the engine's fast path (value checks are off on CUDA by default)
        try:
            rnd._round(rows)
        finally:
            dk.set_value_checks(None)
    assert spy.syncs == [], spy.syncs


def test_requests_finish_and_stop():
    engine = ToyEngine()
    rnd = make_round(engine, policy="causal", eos_token_ids=torch.tensor([7]))
    rnd.set_request(1, anchor=2, start_pos=0, seed=5, max_new_tokens=6)
    emitted = torch.zeros(R, dtype=torch.int64)
    seen_finish = torch.zeros(R, dtype=torch.bool)
    for _ in range(40):
        was_active = rnd.state.active.clone()
        out = rnd.step()
        assert bool((out.num_emitted[~was_active] == 0).all())  # inactive slots emit nothing
        emitted += out.num_emitted
        seen_finish |= out.finished
        for r in torch.nonzero(out.finished).flatten().tolist():
            row = out.tokens[r, :int(out.num_emitted[r])].tolist()
            assert row[-1] == 7 or int(rnd.state.num_generated[r]) >= int(rnd.state.max_new_tokens[r]) or \
                int(rnd.state.start_pos[r]) + GAMMA + 1 > int(rnd.state.max_positions[r])
    assert int(emitted[1]) == 6 and bool(seen_finish[1])
    assert not bool(rnd.state.active[1])


def test_bad_configuration_errors():
    engine = ToyEngine()
    with pytest.raises(ValueError, match="policy"):
        make_round(engine, policy="greedy")
    with pytest.raises(ValueError, match="buckets"):
        make_round(engine, buckets=[R, 2 * R])
    with pytest.raises(ValueError, match="sps"):
        DSparkRound(num_requests=R, gamma=GAMMA, vocab_size=V, head=engine.head(), drafter=engine.drafter,
                    target=engine.target, sps=engine.sps[:5], page_table=engine.page_table, page_size=PAGE,
                    scratch_slot=engine.scratch_slot)
    no_conf = dict(w1=engine.w1, w2=engine.w2)
    rnd = DSparkRound(num_requests=R, gamma=GAMMA, vocab_size=V, head=no_conf, drafter=engine.drafter,
                      target=engine.target, sps=engine.sps, page_table=engine.page_table, page_size=PAGE,
                      scratch_slot=engine.scratch_slot)
    rnd.set_request(0, anchor=1, start_pos=0)
    with pytest.raises(ValueError, match="confidence head"):
        rnd.step()


def test_default_buckets():
    b = default_buckets(64, 7)
    assert b == list(range(64, 513, 8))
    assert default_buckets(3, 2) == [3, 8, 9]
    wide = default_buckets(512, 15)  # 7680 rows between R and R·(γ+1): spacing doubles to stay <= 64 graphs
    assert len(wide) <= 64 and wide[0] == 512 and wide[-1] == 8192 and all(x % 8 == 0 for x in wide)


def test_demo_async_is_lossless_over_hundreds_of_rounds():
    target = demo.SyntheticTarget(vocab=24, rank=8, temperature=1.0, seed=4)
    res = demo.run(rounds=300, requests=12, gamma=4, vocab=24, rank=8, temperature=1.0, seed=4, markov_head=True,
                   backend=None, target=target, policy="async", load="heavy")
    assert res.lossless_test()[2] > 1e-3
    assert res.max_logit_diff <= demo.LOGIT_TOL
    assert sum(res.rows) / len(res.rows) < 12 * 5  # fewer rows than R·(γ+1) under load


# ---------------------------------------------------------------------------
# CUDA graphs: one per bucket, replays equal eager rounds.
# ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cuda_graph_buckets_replay_the_eager_rounds(backend):
    engines = [ToyEngine(device="cuda") for _ in range(2)]
    eager = make_round(engines[0], backend=backend, use_graphs=False)
    graphed = make_round(engines[1], backend=backend, use_graphs=True)
    buckets = set()
    for _ in range(16):
        a, b = eager.step(), graphed.step()
        assert a.rows == b.rows
        buckets.add(b.rows)
        for name in ("tokens", "num_emitted", "num_accepted", "finished", "draft_tokens", "lengths", "cu_verify"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for x, y in zip(eager.state, graphed.state):
            assert torch.equal(x, y)
    assert len(graphed._graphs) == len(buckets) >= 2  # more than one bucket was captured and replayed
    assert graphed.pipe.stalls <= 2  # the pipe never waited in steady state
