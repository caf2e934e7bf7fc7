"""DSparkRound: one DSpark decoding round on the device, with the host knowing each batch size in advance.

A round is

    drafter(state) -> U [R, γ, V], hidden           the engine's parallel backbone
    markov_draft                                     γ drafts, their probabilities, survival
    verify_capacity / schedule_verify                how many drafts each request verifies
    pack_verify(num_rows=B)                          the ragged verify batch at the static size B
    target(batch, cu_verify, kv_lens, state)         the engine's target forward (append_verify_kv +
                                                     verify_attention inside): logits [B, V]
    rejection_sample                                 lossless chain verification
    advance                                          next anchors, positions, finished flags, offset

with every intermediate on the device and no host read of a device value.
The batch size B is what makes the target cheaper under load, and the host
must know it before launching the round (to replay the CUDA graph captured
for B). With policy "async" (paper §5.2) the capacity K of round t, the
number of drafts admitted in total, is verify_capacity of round t-2's
survival: it was computed on the device two rounds earlier and copied to
pinned host memory by a CapacityPipe, so at the start of round t the host
reads it without waiting, picks the smallest bucket B >= R + K, and the
device admits exactly K' = min(K, candidates) drafts, so the verify rows
(active + K' <= R + K) always fit. "causal" (Algorithm 1) decides K inside
the round, so its host bucket is the largest, R·(γ+1); "fixed" verifies every
draft (the largest bucket too).

On CUDA each bucket's round is captured once in a CUDA graph (after a warm-up
on a side stream) and replayed; the drafter and target callables must then be
capturable (static shapes, no host sync, no allocation that depends on
values). Everything the caller reads (the state and the round's outputs)
lives in buffers allocated once outside the graphs and written in place, so
the graphs may share one memory pool. On CPU the round runs eagerly.

Randomness: markov_draft and rejection_sample draw from distinct Philox
streams, so they share the round's offset, and advance bumps it by one per
round on the device.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from .. import advance, markov_draft, pack_verify, rejection_sample, schedule_verify, verify_capacity
from .capacity import CapacityPipe

ENGINE_EXPORTS = ("DSparkRound", "RoundState", "RoundOutput")

POLICIES = ("async", "causal", "fixed")
# markov_draft keyword arguments a head may carry (DraftHead.tensors() or a dict of them).
_HEAD_KEYS = ("w1", "w2", "conf_weight", "conf_bias", "sts_temperature", "gate_weight", "gate_bias", "rnn_weight",
              "rnn_bias")


class RoundState(NamedTuple):
    """Per-request state the round reads and advance rewrites, in place, on the device.

    anchor [R] int32 (the token each request's block starts with), start_pos
    [R] int32 (its position; keys at positions < start_pos are committed in
    the cache), num_generated [R] int32, active [R] bool, offset [] int64
    (Philox offset of the round), temperature [R] fp32, seed [R] int64,
    max_new_tokens [R] int32, max_positions [R] int32.
    """

    anchor: torch.Tensor
    start_pos: torch.Tensor
    num_generated: torch.Tensor
    active: torch.Tensor
    offset: torch.Tensor
    temperature: torch.Tensor
    seed: torch.Tensor
    max_new_tokens: torch.Tensor
    max_positions: torch.Tensor


class RoundOutput(NamedTuple):
    """What one round produced (device tensors in static buffers, overwritten by the next round).

    tokens [R, γ+1] int32: request r emitted tokens[r, :num_emitted[r]];
    num_emitted [R] int32; num_accepted [R] int32 (accepted drafts); finished
    [R] bool (finished this round); draft_tokens [R, γ] int32; lengths [R]
    int32 (drafts verified); cu_verify [R+1] int32; total [] int32 verify
    rows used (<= rows); capacity [] int32 the K the round admitted against
    (async; -1 otherwise); target_logits [rows, V] the target's logits; on
    the host: rows (the bucket B the target processed), round index; and
    survival [R, γ] fp32, the confidence head's a_k for this round's drafts
    (None without a confidence head; engine.simulator.AcceptanceLog records
    it with num_accepted and lengths for the serving simulator).
    """

    tokens: torch.Tensor
    num_emitted: torch.Tensor
    num_accepted: torch.Tensor
    finished: torch.Tensor
    draft_tokens: torch.Tensor
    lengths: torch.Tensor
    cu_verify: torch.Tensor
    total: torch.Tensor
    capacity: torch.Tensor
    target_logits: torch.Tensor
    rows: int
    round: int
    survival: torch.Tensor | None = None


def default_buckets(num_requests: int, gamma: int, multiple: int = 8, max_graphs: int = 64) -> list[int]:
    """Verify-batch sizes from R to R·(γ+1) every `multiple` rows (vLLM captures its decode graphs every
    8 tokens too), the spacing doubled until at most max_graphs sizes remain; R and R·(γ+1) included.

    A round pads its verify rows (R + K at most) up to the next size, so the
    target processes fewer than `spacing` padding rows: at R = 64, γ = 7 that
    is 57 graphs 8 rows apart (64, 72, ..., 512).
    """
    lo, top = num_requests, num_requests * (gamma + 1)
    spacing = multiple
    while (top - lo) // spacing + 2 > max_graphs:
        spacing *= 2
    first = -(-lo // spacing) * spacing
    return sorted({lo, top, *range(first, top, spacing)})


class DSparkRound:
    """Runs DSpark rounds for a static batch of R request slots (see the module docstring).

    Args:
        num_requests: R, request slots. gamma: γ drafts per round. vocab_size: V.
        head: a DraftHead (dspark_kernels.load_deepspec) or a mapping with
            markov_draft's head tensors (w1, w2 and optionally conf_weight,
            conf_bias, sts_temperature, gate_*/rnn_*). Its softcap, if any, is
            applied to U.
        drafter: drafter(state) -> (base_logits [R, γ, V], hidden [R, γ, d] or None),
            the engine's parallel backbone on the state's anchors.
        target: target(batch, cu_verify, kv_lens, state) -> logits [rows, V]:
            batch is pack_verify's VerifyBatch (token_ids, positions,
            row_request, slot_mapping, each [rows]); the engine appends the
            rows' keys/values (append_verify_kv with batch.slot_mapping), runs
            verify_attention with kv_lens [R] (committed keys + the block) and
            cu_verify, and returns the target logits of every row (padding
            rows: anything finite).
        sps: [Bmax+1] steps/second by verify batch size (engine.sps_table),
            Bmax >= R·(γ+1); sps[0] is unused (a round verifies >= 1 row).
        page_table: [R, max_pages] int32, page_size: int, scratch_slot: int:
            the KV layout pack_verify maps rows to (padding rows write the
            scratch slot, which no request may own).
        policy: "async" (default), "causal" or "fixed".
        buckets: verify-batch sizes to capture (default default_buckets(): every 8 rows);
            the largest must be R·(γ+1).
        eos_token_ids: [E] int or None. draft_mode: "logits" (byte-minimal:
            markov_draft's draft_logits and token probabilities) or "probs"
            (full draft_probs). initial_capacity: K of the first two async
            rounds (default R·γ, every draft). use_graphs: capture CUDA graphs
            (default: on CUDA). backend: the ops' backend (None: auto).
    """

    def __init__(self, *, num_requests: int, gamma: int, vocab_size: int, head, drafter: Callable,
                 target: Callable, sps: torch.Tensor, page_table: torch.Tensor, page_size: int,
                 scratch_slot: int, policy: str = "async", buckets: Sequence[int] | None = None,
                 eos_token_ids: torch.Tensor | None = None, draft_mode: str = "logits",
                 initial_capacity: int | None = None, use_graphs: bool | None = None, backend: str | None = None,
                 device=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if draft_mode not in ("logits", "probs"):
            raise ValueError(f"draft_mode must be 'logits' or 'probs', got {draft_mode!r}")
        R, G = int(num_requests), int(gamma)
        if R < 1 or G < 1:
            raise ValueError(f"num_requests and gamma must be >= 1, got {R}, {G}")
        self.device = torch.device(device) if device is not None else page_table.device
        self.num_requests, self.gamma, self.vocab_size = R, G, int(vocab_size)
        self.policy, self.draft_mode, self.backend = policy, draft_mode, backend
        self.drafter, self.target = drafter, target
        self._head, self.softcap = _head_tensors(head, self.device)
        top = R * (G + 1)
        self.sps = sps.to(self.device)
        if self.sps.dim() != 1 or self.sps.shape[0] < top + 1:
            raise ValueError(f"sps must be 1-D and cover R·(γ+1) = {top} rows (length >= {top + 1}), "
                             f"got shape {tuple(self.sps.shape)}")
        self.buckets = sorted(set(int(b) for b in (buckets or default_buckets(R, G))))
        if self.buckets[-1] != top or self.buckets[0] < R:
            raise ValueError(f"buckets must lie in [R, R·(γ+1)] = [{R}, {top}] and end at {top}, got {self.buckets}")
        self.page_table = page_table.to(self.device)
        self.page_size, self.scratch_slot = int(page_size), int(scratch_slot)
        self.eos_token_ids = None if eos_token_ids is None else torch.as_tensor(eos_token_ids).to(self.device)
        i32 = dict(dtype=torch.int32, device=self.device)
        capacity = self.page_table.shape[1] * self.page_size
        self.state = RoundState(
            anchor=torch.zeros(R, **i32), start_pos=torch.zeros(R, **i32), num_generated=torch.zeros(R, **i32),
            active=torch.zeros(R, dtype=torch.bool, device=self.device),
            offset=torch.zeros((), dtype=torch.int64, device=self.device),
            temperature=torch.ones(R, dtype=torch.float32, device=self.device),
            seed=torch.zeros(R, dtype=torch.int64, device=self.device),
            max_new_tokens=torch.full((R,), 2**31 - 1, **i32), max_positions=torch.full((R,), capacity, **i32))
        k0 = R * G if initial_capacity is None else int(initial_capacity)
        # K of rounds t-2 and t-1 on the device (shifted inside the round), mirrored on the host by the pipe.
        self._k_hist = torch.full((2,), k0, **i32)
        self._k_new = torch.full((), k0, **i32)
        self.pipe = CapacityPipe(lag=2, initial=k0, device=self.device)
        self._out: dict[int, RoundOutput] = {}  # persistent output buffers per bucket
        self._graphs: dict[int, object] = {}
        self._pool = None
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else bool(use_graphs)
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("use_graphs needs a CUDA device")
        self.rounds = 0

    # ------------------------------------------------------------------ requests

    def set_request(self, slot: int, *, anchor: int, start_pos: int, temperature: float = 1.0, seed: int = 0,
                    max_new_tokens: int | None = None, num_generated: int = 0) -> None:
        """Admit a request into a slot: its first anchor (the last prompt token, whose key is not in the
        cache yet) at position start_pos (keys of positions < start_pos are in the cache, from prefill).
        Host writes only (host-to-device copies, no read back)."""
        if not 0 <= slot < self.num_requests:
            raise ValueError(f"slot must be in [0, {self.num_requests}), got {slot}")
        if not 0 <= anchor < self.vocab_size:
            raise ValueError(f"anchor must be a token id in [0, {self.vocab_size}), got {anchor}")
        s = self.state
        s.anchor[slot] = anchor
        s.start_pos[slot] = start_pos
        s.num_generated[slot] = num_generated
        s.temperature[slot] = temperature
        s.seed[slot] = seed
        s.max_new_tokens[slot] = 2**31 - 1 if max_new_tokens is None else max_new_tokens
        s.active[slot] = True

    def release(self, slot: int) -> None:
        """Mark a slot inactive (its request was aborted or retired)."""
        self.state.active[slot] = False

    # ------------------------------------------------------------------ the round

    def next_rows(self) -> int:
        """The bucket B the next round will use, known on the host without a device read."""
        top = self.buckets[-1]
        if self.policy != "async":
            return top
        need = self.num_requests + self.pipe.peek()
        return next((b for b in self.buckets if b >= need), top)

    def step(self) -> RoundOutput:
        """Run one round; returns its outputs (device tensors valid until the next step)."""
        rows = self.next_rows()
        if not self.use_graphs:
            out = self._round(rows)
        else:
            if rows not in self._graphs:
                self._capture(rows)
            self._graphs[rows].replay()
            out = self._out[rows]
        if self.policy == "async":
            self.pipe.push(self._k_new)
        self.rounds += 1
        return out._replace(round=self.rounds - 1)

    def _capture(self, rows: int) -> None:
        """Warm up on a side stream (compiles Triton kernels, allocates), then capture the round for `rows`."""
        saved = [t.clone() for t in (*self.state, self._k_hist, self._k_new)]
        stream = torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._round(rows)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        for t, s in zip((*self.state, self._k_hist, self._k_new), saved):  # the warm-up round never happened
            t.copy_(s)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self._round(rows)
        for t, s in zip((*self.state, self._k_hist, self._k_new), saved):  # nor did the capture
            t.copy_(s)
        self._graphs[rows] = graph

    def _round(self, rows: int) -> RoundOutput:
        s = self.state
        R, G = self.num_requests, self.gamma
        kw = dict(backend=self.backend)
        base, hidden = self.drafter(s)
        if self.softcap is not None:
            base = torch.tanh(base.float() / self.softcap) * self.softcap
        logits_mode = self.draft_mode == "logits"
        draft = markov_draft(base, s.anchor, self._head["w1"], self._head["w2"], s.temperature, s.seed, s.offset,
                             hidden=hidden, return_draft_probs=not logits_mode, return_draft_logits=logits_mode,
                             **{k: v for k, v in self._head.items() if k not in ("w1", "w2")}, **kw)
        capacity = torch.full((), -1, dtype=torch.int32, device=self.device)
        if self.policy == "async":
            if draft.survival is None:
                raise ValueError("policy 'async' needs survival: give the head a confidence head (conf_weight), "
                                 "or use policy='fixed'")
            k_now = self._k_hist[0].clone()
            self._k_hist[0].copy_(self._k_hist[1])
            self._k_new.copy_(verify_capacity(draft.survival, self.sps, active=s.active, **kw))
            self._k_hist[1].copy_(self._k_new)
            plan = schedule_verify(draft.survival, self.sps, mode="async", capacity=k_now, active=s.active, **kw)
            lengths, cu, total = plan.lengths, plan.cu_verify, plan.total
            capacity = k_now
        elif self.policy == "causal":
            if draft.survival is None:
                raise ValueError("policy 'causal' needs survival (a confidence head); use policy='fixed'")
            plan = schedule_verify(draft.survival, self.sps, mode="causal", active=s.active, **kw)
            lengths, cu, total = plan.lengths, plan.cu_verify, plan.total
        else:
            lengths = torch.where(s.active, G, 0).to(torch.int32)
            cu = torch.zeros(R + 1, dtype=torch.int32, device=self.device)
            cu[1:] = torch.cumsum(torch.where(s.active, G + 1, 0), 0)
            total = cu[-1].clone()
        batch = pack_verify(s.anchor, draft.tokens, lengths, cu, s.start_pos, num_rows=rows,
                            page_table=self.page_table, page_size=self.page_size, scratch_slot=self.scratch_slot,
                            **kw)
        kv_lens = (s.start_pos + (cu[1:] - cu[:-1])).to(torch.int32)
        target_logits = self.target(batch, cu, kv_lens, s)
        if logits_mode:
            tokens, n_acc = rejection_sample(target_logits, draft.tokens, None, lengths, cu, s.temperature, s.seed,
                                             s.offset, draft_token_probs=draft.token_probs,
                                             draft_logits=draft.draft_logits, **kw)
        else:
            tokens, n_acc = rejection_sample(target_logits, draft.tokens, draft.draft_probs, lengths, cu,
                                             s.temperature, s.seed, s.offset, **kw)
        nxt = advance(tokens, n_acc, s.anchor, s.start_pos, s.num_generated, s.active, s.offset,
                      eos_token_ids=self.eos_token_ids, max_new_tokens=s.max_new_tokens,
                      max_positions=s.max_positions, **kw)
        for name in ("anchor", "start_pos", "num_generated", "active", "offset"):
            getattr(s, name).copy_(getattr(nxt, name))
        produced = RoundOutput(tokens, nxt.num_emitted, n_acc, nxt.finished, draft.tokens, lengths, cu, total,
                               capacity, target_logits, rows, self.rounds, draft.survival)
        if not self.use_graphs:
            return produced
        out = self._out.get(rows)
        if out is None:  # persistent buffers outside the graph pool, written in place by every replay
            out = RoundOutput(*(torch.empty_like(t) if isinstance(t, torch.Tensor) else t for t in produced))
            self._out[rows] = out
        for dst, src in zip(out, produced):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        return out


def _head_tensors(head, device) -> tuple[dict, float | None]:
    tensors = head.tensors() if hasattr(head, "tensors") else dict(head)
    softcap = getattr(head, "softcap", None)
    unknown = sorted(set(tensors) - set(_HEAD_KEYS))
    if unknown:
        raise ValueError(f"head has tensors markov_draft does not take: {unknown}")
    if "w1" not in tensors or "w2" not in tensors:
        raise ValueError("head needs w1 and w2 (markov_draft's Markov head)")
    return {k: v.to(device) for k, v in tensors.items() if isinstance(v, torch.Tensor)}, softcap
