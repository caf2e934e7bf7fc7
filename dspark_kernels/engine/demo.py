"""End-to-end DSpark round on a synthetic target, through the package ops.

The target is a first-order Markov chain over V tokens, p(· | prev) =
softmax(L[prev] / T), plus one small transformer layer: an attention layer
(GQA, RoPE, sliding window) over the token history whose output, read out
through the layer's own value vectors, adds a context-dependent correction to
the chain's logits. So the target's next-token logits are L[x_t] + attn(x_<=t),
and the true conditional depends on the recent context (the 32-token window),
not only on the previous token.

The draft imitates DSpark and knows only the chain: a parallel "backbone" that
sees only the anchor gives base logits U_k = log of the chain's k-step
marginal (so each position is plausible on its own but blind to the tokens
drafted before it), and the Markov head adds a rank-r factorisation of L
(W1 = A·S^½, W2 = B·S^½ from the SVD L = A·S·Bᵀ), restoring the dependence
on the previous draft. A confidence head c_k = σ(v·W1[x_{k-1}] + b), fitted
to the chain's acceptance rates, gives each draft's survival.

Each round is one DSparkRound step (dspark_kernels.engine.round): markov_draft
-> verify_capacity / schedule_verify (how many drafts each request verifies,
for a synthetic step-time curve) -> pack_verify at the round's bucket size ->
the target's verification pass -> rejection_sample -> advance. The
verification pass is what an engine does: q, k, v for every packed verify row
(pack_verify's token ids and positions), k and v appended to a paged KV cache
(append_verify_kv at pack_verify's slot mapping; page size 4, pages handed out
in a random order, padding rows to a scratch slot), one verify_attention call
over all requests' ragged blocks, target logits for every verify row. The
target's step time is charged for the rows it processes: the bucket, padding
included, which only the "async" policy shrinks (its batch size is known on
the host two rounds ahead, as a graph-replaying engine needs). A sequential reference recomputes
the same rows one token at a time with plain dense attention over the token
history, and the demo checks that the two agree. With the head on, more
drafts are accepted; the scheduler trades verify tokens for throughput when
the target's step time grows with the batch; either way the generated text
must follow the target exactly, which the demo checks with a chi-square test
of the observed transitions against the target's exact conditionals.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import NamedTuple

import torch

# The ops through the package's public API, as an engine would call them.
from dspark_kernels import append_verify_kv, verify_attention

from .round import DSparkRound
from .simulator.acceptance import AcceptanceLog

# Batched (paged, verify_attention) and sequential (dense) target logits are
# both fp32 and differ only in summation order: logits are O(10), attention
# outputs convex combinations of O(1) values, so the expected disagreement is
# a few fp32 ulps of 10 (~1e-6). 1e-4 is far above that and far below any
# masking, paging or position bug (those move logits by O(0.1) or more).
LOGIT_TOL = 1e-4
PAGE_SIZE = 4


def _chi2_sf(stat: float, dof: int) -> float:
    """Upper tail of the chi-square distribution, via the regularised gamma."""
    if dof <= 0:
        return 1.0
    a = torch.tensor(dof / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(stat / 2, dtype=torch.float64)))


def transition_test(counts: torch.Tensor, probs: torch.Tensor | None = None, *,
                    expected: torch.Tensor | None = None, outer: torch.Tensor | None = None,
                    min_expected: float = 5.0):
    """Chi-square of observed transition counts [V, V] against the target.

    counts[a, b]: how often b was emitted right after a. The target is given
    either as a first-order chain, probs [V, V] (every token after a is drawn
    from probs[a]), or, for a target whose conditional depends on more context,
    as the exact conditionals p_i of the emitted tokens summed per previous
    token: expected[a] = Σ_i p_i [V, V] and outer[a] = Σ_i p_i p_iᵀ [V, V, V],
    over the emitted tokens i whose previous token is a.

    Why this stays exact for a context-dependent target: if generation is
    lossless, each emitted token i is drawn from p_i = p(· | its context) given
    everything before it (earlier tokens, and where rounds started and ended:
    whether token i is emitted in this round is decided before it is drawn).
    So d_a = counts[a] - expected[a] is a sum of martingale differences with
    predictable covariance C_a = Σ_i (diag p_i - p_i p_iᵀ) = diag(expected[a])
    - outer[a], and d_aᵀ C_a⁺ d_a is asymptotically χ² with (bins - 1) dof
    (martingale CLT), summed over a. Pearson's Σ d²/e alone would use
    diag(E) - EEᵀ/n, which overstates C_a when the p_i differ (conservative,
    less power); for a chain (all p_i equal) the two coincide, so the probs
    form is exactly Pearson's test. C_a⁺ is applied by dropping one bin: C_a
    and d_a both have the all-ones vector as null direction / orthogonal
    complement, so the rest of C_a is invertible.

    Per previous token, cells whose expected count is below min_expected are
    merged into one bin, so the chi-square approximation holds.
    Returns (statistic, degrees of freedom, p-value).
    """
    if (probs is None) == (expected is None) or (expected is None) != (outer is None):
        raise ValueError("give either probs, or expected and outer")
    stat, dof = 0.0, 0
    for prev in range(counts.shape[0]):
        n = float(counts[prev].sum())
        if n == 0:
            continue
        observed = counts[prev].double()
        if probs is not None:
            p = probs[prev].double()
            e, second = p * n, torch.outer(p, p) * n
        else:
            e, second = expected[prev].double(), outer[prev].double()
        cov = torch.diag(e) - second
        big = e >= min_expected
        # Merge matrix: one row per big cell, one row for all small cells together.
        merge = torch.cat([torch.eye(e.numel(), dtype=torch.float64)[big],
                           (~big).double().reshape(1, -1)])
        e_b, o_b, cov_b = merge @ e, merge @ observed, merge @ cov @ merge.T
        keep = e_b > 0
        e_b, o_b, cov_b = e_b[keep], o_b[keep], cov_b[keep][:, keep]
        if e_b.numel() < 2:
            continue
        d = (o_b - e_b)[:-1]
        stat += float(d @ torch.linalg.solve(cov_b[:-1, :-1], d))
        dof += e_b.numel() - 1
    return stat, dof, _chi2_sf(stat, dof)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [..., H, D], given cos/sin [..., 1, D/2] of its positions."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class AttentionLayer:
    """One attention layer over the token history: q/k/v from a token embedding
    (RoPE on q and k), GQA (`heads` query heads over `kv_heads` key/value
    heads), a sliding window, and a read-out through the value vectors of the
    vocabulary: the correction to token u's logit is strength · Σ_h out_h ·
    v(u), a context-dependent shift with a mild bias towards tokens whose
    values the layer attended to (a weak copy effect). strength 0.06 keeps the
    correction at a total-variation distance of ~0.05 from the chain, enough to
    make every conditional context dependent without starving the chain-only
    draft (stronger copy biases drift the text into repetitive loops)."""

    def __init__(self, vocab: int, generator: torch.Generator, *, d_model: int = 16, heads: int = 4,
                 kv_heads: int = 2, head_dim: int = 8, window: int = 32, strength: float = 0.06):
        g = generator
        self.heads, self.kv_heads, self.head_dim, self.window = heads, kv_heads, head_dim, window
        self.embed = torch.randn(vocab, d_model, generator=g)
        self.wq = torch.randn(d_model, heads * head_dim, generator=g) * d_model ** -0.5
        self.wk = torch.randn(d_model, kv_heads * head_dim, generator=g) * d_model ** -0.5
        self.wv = torch.randn(d_model, kv_heads * head_dim, generator=g) * d_model ** -0.5
        self.strength = strength
        self.scale = head_dim ** -0.5
        # RoPE cos/sin tables by position, grown on demand.
        self._cos = self._sin = torch.empty(0, head_dim // 2)

    def _rotation(self, positions: torch.Tensor):
        """cos, sin [..., 1, D/2] of the RoPE angles pos · 10000^(-2i/D)."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self._cos.shape[0]:
            half = self.head_dim // 2
            freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)
            angles = torch.arange(max(need, 2 * self._cos.shape[0]), dtype=torch.float32)[:, None] * freq
            self._cos, self._sin = angles.cos(), angles.sin()
        return self._cos[positions][..., None, :], self._sin[positions][..., None, :]

    def project(self, tokens: torch.Tensor, positions: torch.Tensor):
        """tokens, positions [...] -> q [..., Hq, D], k [..., Hkv, D], v [..., Hkv, D]."""
        x = self.embed[tokens]
        q = (x @ self.wq).unflatten(-1, (self.heads, self.head_dim))
        k = (x @ self.wk).unflatten(-1, (self.kv_heads, self.head_dim))
        v = (x @ self.wv).unflatten(-1, (self.kv_heads, self.head_dim))
        cos, sin = self._rotation(positions)
        return _rope(q, cos, sin), _rope(k, cos, sin), v

    def readout(self, out: torch.Tensor) -> torch.Tensor:
        """Attention output [N, Hq, D] -> logit correction [N, V]."""
        vocab_v = (self.embed @ self.wv).unflatten(-1, (self.kv_heads, self.head_dim))  # [V, Hkv, D]
        grouped = out.unflatten(1, (self.kv_heads, self.heads // self.kv_heads))  # [N, Hkv, G, D]
        return self.strength * torch.einsum("nhgd,uhd->nu", grouped, vocab_v)


class PagedKVCache:
    """K/V of every request in pages of page_size slots; each request owns
    ceil(max_len / page_size) pages, handed out in a random order so that a
    paging bug shows, and a scratch slot on a page nobody owns takes the
    padding rows' keys. Unused slots hold finite garbage, as in an engine."""

    def __init__(self, requests: int, max_len: int, kv_heads: int, head_dim: int, generator: torch.Generator,
                 page_size: int = PAGE_SIZE):
        per_request = math.ceil(max_len / page_size)
        num_pages = requests * per_request + 3  # a few pages nobody owns
        self.page_size = page_size
        order = torch.randperm(num_pages, generator=generator)
        self.page_table = order[: requests * per_request].reshape(requests, per_request).to(torch.int32)
        # Padding rows of a verify batch write here: slot 0 of a page no request owns.
        self.scratch_slot = int(order[-1]) * page_size
        self.k = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=generator)
        self.v = torch.randn(num_pages, page_size, kv_heads, head_dim, generator=generator)

    def write(self, request: torch.Tensor, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        page = self.page_table[request, position // self.page_size].long()
        slot = position % self.page_size
        self.k[page, slot] = k
        self.v[page, slot] = v


class SyntheticTarget:
    """First-order chain with peaked rows plus one attention layer, and a
    DSpark-style draft of the chain part."""

    def __init__(self, vocab: int, rank: int, temperature: float, seed: int, *, attention: bool = True):
        g = torch.Generator().manual_seed(seed)
        # Each token strongly prefers a few successors: a text-like chain
        # whose next token is predictable from the previous one.
        logits = torch.randn(vocab, vocab, generator=g) * 1.5
        favourite = torch.randint(0, vocab, (vocab, 3), generator=g)
        logits.scatter_add_(1, favourite, torch.full((vocab, 3), 4.0))
        self.logits = logits
        self.temperature = temperature
        self.probs = torch.softmax(logits / temperature, dim=-1)  # the chain part alone
        a, s, bt = torch.linalg.svd(logits)
        root = s[:rank].sqrt()
        self.w1 = a[:, :rank] * root  # embedding [V, r]
        self.w2 = bt[:rank].T * root  # nn.Linear(r, V).weight [V, r]
        # Confidence head: the chance that the draft after token x is accepted
        # is alpha(x) = sum_v min(p_t(v|x), q(v|x)) with q the head's own
        # conditional (chain part of the target); fit logit(alpha) ~ W1[x]·v + b.
        q = torch.softmax((self.w1 @ self.w2.T) / temperature, dim=-1)
        alpha = torch.minimum(self.probs, q).sum(-1).clamp(1e-4, 1 - 1e-4)
        design = torch.cat([self.w1, torch.ones(vocab, 1)], dim=1)
        sol = torch.linalg.lstsq(design, torch.logit(alpha)[:, None]).solution[:, 0]
        self.conf_weight = torch.cat([torch.zeros(1), sol[:rank]])  # [d + r], d = 1 unused hidden
        self.conf_bias = sol[rank].reshape(())
        self.layer = AttentionLayer(vocab, g)
        if not attention:  # the pure chain: same ops, zero correction
            self.layer.strength = 0.0

    def marginal_logits(self, anchor: torch.Tensor, gamma: int) -> torch.Tensor:
        """U [R, γ, V]: log of the chain's k-step marginal from the anchor (k = 1..γ)."""
        dist = torch.nn.functional.one_hot(anchor, self.probs.shape[0]).float()
        out = []
        for _ in range(gamma):
            dist = dist @ self.probs
            out.append(torch.log(dist.clamp_min(1e-12)) * self.temperature)
        return torch.stack(out, dim=1)

    def new_cache(self, requests: int, max_len: int, seed: int) -> PagedKVCache:
        g = torch.Generator().manual_seed(seed + 7)
        return PagedKVCache(requests, max_len, self.layer.kv_heads, self.layer.head_dim, g)

    def verify_logits(self, batch, cu_verify: torch.Tensor, kv_lens: torch.Tensor, cache: PagedKVCache,
                      backend: str | None = None) -> torch.Tensor:
        """The verification pass, as an engine's target forward: logits [rows, V] for the packed rows.

        Row t is the prediction after token_ids[t] at positions[t]. The rows'
        keys and values go into the paged cache with append_verify_kv at
        pack_verify's slot_mapping (padding rows: the scratch slot), then one
        verify_attention call over kv_lens[r] = committed keys + the block
        covers every request's chain block. Padding rows (token 0, position 0)
        come out finite and are never read.
        """
        q, k, v = self.layer.project(batch.token_ids.long(), batch.positions.long())
        append_verify_kv(k, v, cache.k, cache.v, batch.slot_mapping, backend=backend)
        out = verify_attention(q, cache.k, cache.v, cache.page_table, kv_lens, cu_verify,
                               window=self.layer.window, backend=backend)
        return self.logits[batch.token_ids.long()] + self.layer.readout(out)

    def sequential_logits(self, history: torch.Tensor, anchor: torch.Tensor, drafts: torch.Tensor,
                          lengths: torch.Tensor, start_pos: torch.Tensor) -> torch.Tensor:
        """Reference for verify_logits, one token at a time: [R, γ+1, V].

        history [R, max_len] holds each request's text as token ids by
        position; the round's anchor and drafts are written at start_pos + j.
        The layer is then evaluated on that text from scratch: k and v of the
        tokens around the block, and for each j = 0..γ on its own, a plain
        dense softmax from token j to every token of the text within the
        window up to and including it. No KV cache, no pages, no packing, no
        verify_attention. Entries j > lengths[r] are not meaningful.
        """
        layer = self.layer
        requests, gamma = drafts.shape
        max_len = history.shape[1]
        local = torch.arange(gamma + 1)
        block = torch.cat([anchor[:, None], drafts], dim=1).long()  # [R, γ+1]
        pos = start_pos.long()[:, None] + local  # [R, γ+1]
        live = local[None, :] <= lengths.long()[:, None]
        req = torch.arange(requests)[:, None].expand_as(pos)
        history[req[live], pos[live]] = block[live]
        # Key positions any query of the block may see: the window before the
        # anchor up to the last draft (the whole text when there is no window).
        span = min(layer.window + gamma, max_len) if layer.window > 0 else max_len
        key_pos = start_pos.long()[:, None] + gamma - torch.arange(span - 1, -1, -1)  # [R, span]
        in_text = (key_pos >= 0) & (key_pos < max_len)
        key_pos = key_pos.clamp(0, max_len - 1)
        q, _, _ = layer.project(block, pos)  # [R, γ+1, Hq, D]
        _, k, v = layer.project(history.gather(1, key_pos).clamp_min(0), key_pos)  # [R, span, Hkv, D]
        group = layer.heads // layer.kv_heads
        att = []
        for j in range(gamma + 1):
            p = pos[:, j:j + 1]
            seen = in_text & (key_pos <= p)  # causal: the text up to and including token j
            if layer.window > 0:
                seen &= key_pos > p - layer.window
            s = torch.einsum("rhgd,rkhd->rhgk", q[:, j].unflatten(1, (layer.kv_heads, group)), k) * layer.scale
            s = s.masked_fill(~seen[:, None, None, :], float("-inf"))
            att.append(torch.einsum("rhgk,rkhd->rhgd", torch.softmax(s, dim=-1), v).flatten(1, 2))
        att = torch.stack(att, dim=1)  # [R, γ+1, Hq, D]
        return self.logits[block] + layer.readout(att.flatten(0, 1)).unflatten(0, (requests, gamma + 1))


def step_time(batch: torch.Tensor, load: str) -> torch.Tensor:
    """Synthetic target step time in ms for a verify batch of B tokens.

    light: weight reads dominate, so B barely matters (1 ms + B/2048 ms);
    heavy: compute-bound, every verify token costs (1 ms + B/48 ms).
    """
    per_token = {"light": 1 / 2048, "heavy": 1 / 48}[load]
    return 1.0 + batch.double() * per_token


class RunResult(NamedTuple):
    accepted: list  # mean accepted drafts per request, per round
    counts: torch.Tensor  # [V, V] int64 observed transitions (prev, next)
    verified: list  # verify tokens per request, per round (rows used / R)
    times: list  # synthetic step time per round, ms, of the rows the target processed (the bucket)
    expected: torch.Tensor  # [V, V] fp64, Σ p_i of the emitted tokens per previous token
    outer: torch.Tensor  # [V, V, V] fp64, Σ p_i p_iᵀ likewise (see transition_test)
    max_logit_diff: float  # max |verify pass - sequential reference| over all verify rows
    rows_checked: int  # verify rows compared
    rows: list  # verify batch the target processed per round: DSparkRound's bucket (padding included)

    def lossless_test(self):
        return transition_test(self.counts, expected=self.expected, outer=self.outer)


def run(rounds: int, requests: int, gamma: int, vocab: int, rank: int, temperature: float,
        seed: int, markov_head: bool, backend: str | None, target: SyntheticTarget,
        policy: str = "fixed", load: str = "light", log=None) -> RunResult:
    """Run DSpark rounds with DSparkRound (draft -> schedule -> pack -> verify -> sample -> advance).

    policy: "fixed" verifies every draft; "causal" / "async" let
    schedule_verify pick per-request lengths for the `load` step-time curve;
    "async" also shrinks the verify batch the target processes (the bucket,
    known on the host two rounds ahead). After each round the demo checks
    the target's logits for every verify row against a sequential recompute
    and records the emitted transitions with their exact conditionals.
    log: an engine.simulator.AcceptanceLog that records every round (accepted, verified, survival).
    """
    # The demo's tensors are tiny: one intra-op thread avoids OpenMP spin-waits that cost 10x the work
    # on a loaded 2-core machine (0.66 s vs 7.7 s for 60 rounds at R = 12, measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(rounds, requests, gamma, vocab, rank, temperature, seed, markov_head, backend, target, policy,
                    load, log)
    finally:
        torch.set_num_threads(threads)


def _run(rounds, requests, gamma, vocab, rank, temperature, seed, markov_head, backend, target, policy, load, log):
    g = torch.Generator().manual_seed(seed + 1)
    anchor0 = torch.randint(0, vocab, (requests,), generator=g)
    sps = 1.0 / step_time(torch.arange(requests * (gamma + 1) + 1), load).float()
    w2 = target.w2 if markov_head else torch.zeros_like(target.w2)
    # A round advances a request by at most γ + 1 positions; one spare round keeps advance's
    # max_positions rule (the next block must fit) from finishing a request inside the run.
    max_len = (rounds + 1) * (gamma + 1)
    cache = target.new_cache(requests, max_len, seed)
    hidden = torch.zeros(requests, gamma, 1)

    def drafter(state):
        base = target.marginal_logits(state.anchor.long(), gamma)
        # The head carries the previous-token signal; keep only a weak position
        # prior from the backbone so the two are not double-counted.
        return (0.25 * base if markov_head else base), hidden

    def verify(batch, cu_verify, kv_lens, state):
        return target.verify_logits(batch, cu_verify, kv_lens, cache, backend=backend)

    head = dict(w1=target.w1, w2=w2, conf_weight=target.conf_weight, conf_bias=target.conf_bias)
    engine = DSparkRound(num_requests=requests, gamma=gamma, vocab_size=vocab, head=head, drafter=drafter,
                         target=verify, sps=sps, page_table=cache.page_table, page_size=cache.page_size,
                         scratch_slot=cache.scratch_slot, policy=policy, draft_mode="probs", backend=backend)
    for r in range(requests):
        engine.set_request(r, anchor=int(anchor0[r]), start_pos=0, temperature=temperature, seed=1000 * seed + r)
    history = torch.full((requests, max_len), -1, dtype=torch.int64)
    counts = torch.zeros(vocab, vocab, dtype=torch.int64)
    expected = torch.zeros(vocab, vocab, dtype=torch.float64)
    outer = torch.zeros(vocab, vocab, vocab, dtype=torch.float64)
    local = torch.arange(gamma + 1)
    accepted, verified, times, rows = [], [], [], []
    max_diff, rows_checked = 0.0, 0
    for _ in range(rounds):
        anchor, start_pos = engine.state.anchor.clone(), engine.state.start_pos.clone()
        out = engine.step()
        if log is not None:
            log.record(out)
        reference = target.sequential_logits(history, anchor, out.draft_tokens, out.lengths, start_pos)
        cu = out.cu_verify
        total = int(out.total)
        row_req = torch.repeat_interleave(torch.arange(requests), (cu[1:] - cu[:-1]).long())
        row_j = torch.arange(total) - cu[:-1].long()[row_req]
        diff = (out.target_logits[:total] - reference[row_req, row_j]).abs()
        worst = float(diff.max()) if total else 0.0
        max_diff = max(max_diff, worst if math.isfinite(worst) else math.inf)  # NaN must not pass
        rows_checked += total
        # Emitted tokens: j = 0..n_acc of each request, token j predicted after
        # prev_j (the anchor, then the accepted drafts) by row j of the target,
        # whose exact conditional we take from the sequential reference (so the
        # chi-square judges the verify pass too, not only the sampler).
        emit = local[None, :] < out.num_emitted.long()[:, None]  # [R, γ+1]
        prev = torch.cat([anchor[:, None].long(), out.tokens[:, :gamma].long()], dim=1)[emit]
        nxt = out.tokens.long()[emit]
        counts.index_put_((prev, nxt), torch.ones_like(nxt), accumulate=True)
        p = torch.softmax(reference[emit].double() / temperature, dim=-1)  # [emitted, V]
        expected.index_add_(0, prev, p)
        outer.index_add_(0, prev, p[:, :, None] * p[:, None, :])
        accepted.append(float(out.num_accepted.float().mean()))
        verified.append(total / requests)
        rows.append(out.rows)
        times.append(float(step_time(torch.tensor(out.rows), load)))
    return RunResult(accepted, counts, verified, times, expected, outer, max_diff, rows_checked, rows)


DESCRIPTION = (
    "Runs DSpark rounds with DSparkRound (markov_draft -> verify_capacity/schedule_verify -> pack_verify at a "
    "bucket size -> append_verify_kv + verify_attention over a paged KV cache -> rejection_sample -> advance) "
    "on a synthetic target, with the Markov head on and off and under three "
    "scheduling policies; checks that the output follows the target exactly (chi-square) and that the "
    "batched verify pass matches a sequential recompute. Exits 1 if a check fails. One to two minutes on "
    "a CPU with the defaults."
)


def add_target_arguments(p: argparse.ArgumentParser, *, rounds: int, rounds_help: str, requests: int,
                         gamma: int, gamma_help: str) -> argparse.ArgumentParser:
    """The options every demo on the synthetic target shares (this one and engine.tree_demo)."""
    p.add_argument("--rounds", type=int, default=rounds, help=f"{rounds_help} (default {rounds})")
    p.add_argument("--requests", type=int, default=requests, help=f"requests per batch (default {requests})")
    p.add_argument("--gamma", type=int, default=gamma, help=f"{gamma_help} (default {gamma})")
    p.add_argument("--vocab", type=int, default=48, help="vocabulary size (default 48)")
    p.add_argument("--rank", type=int, default=16, help="rank of the Markov head (default 16)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the target and the sampling (default 0)")
    p.add_argument("--backend", default=None, help="auto | reference | triton | cuda (default: DSPARK_BACKEND or auto)")
    return p


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options, on ``p`` (its own parser, or the CLI's ``demo`` subcommand)."""
    add_target_arguments(p, rounds=200, rounds_help="rounds per Markov-head run", requests=64, gamma=5,
                         gamma_help="drafts per request per round")
    p.add_argument("--sched-rounds", type=int, default=100, help="rounds per scheduling policy (default 100)")
    p.add_argument("--acceptance-log", default=None, metavar="FILE",
                   help="write the Markov-head run's rounds (every draft verified) as an acceptance log for "
                        "python -m dspark_kernels simulate --acceptance-log FILE")
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_kernels demo", description=DESCRIPTION)
    return run_demo(add_arguments(p).parse_args(argv))


def run_demo(args: argparse.Namespace) -> int:
    """The demo on parsed options (see add_arguments); 0 if every check passes, else 1."""
    # The demo's tensors are tiny (64 x 48): one intra-op thread avoids OpenMP
    # spin-waits that cost more than the work, worst on a loaded 2-core machine.
    torch.set_num_threads(1)
    target = SyntheticTarget(args.vocab, args.rank, args.temperature, args.seed)
    layer = target.layer
    print(f"DSpark demo: V={args.vocab}, γ={args.gamma}, {args.requests} requests x {args.rounds} rounds, "
          f"T={args.temperature}, Markov rank {args.rank}, backend={args.backend or 'auto'}")
    print(f"Target: Markov chain + 1 attention layer ({layer.heads} query / {layer.kv_heads} kv heads x "
          f"{layer.head_dim}, RoPE, window {layer.window})\n"
          f"  verify pass: pack_verify -> paged KV cache (page {PAGE_SIZE}, shuffled pages) -> verify_attention, "
          f"checked against a sequential recompute")
    ok = True
    worst_diff, all_rows = 0.0, 0
    log = AcceptanceLog() if getattr(args, "acceptance_log", None) else None
    for head in (True, False):
        t0 = time.perf_counter()
        res = run(args.rounds, args.requests, args.gamma, args.vocab, args.rank,
                  args.temperature, args.seed, head, args.backend, target, log=log if head else None)
        if head and log is not None:
            path = log.save(args.acceptance_log, name="demo")
            print(f"wrote {path}: {len(log)} request-rounds (Markov head on, every draft verified)")
        secs = time.perf_counter() - t0
        stat, dof, pval = res.lossless_test()
        accepted = res.accepted
        mean_acc = sum(accepted) / len(accepted)
        print(f"\nMarkov head {'on ' if head else 'off'}: mean accepted drafts per round {mean_acc:.3f} "
              f"(+1 emitted token = {mean_acc + 1:.3f} tokens/round), {secs:.1f} s")
        tenth = max(1, len(accepted) // 10)
        trace = ", ".join(f"{sum(accepted[i:i + tenth]) / len(accepted[i:i + tenth]):.2f}"
                          for i in range(0, len(accepted), tenth))
        print(f"  accepted per round, in tenths of the run: {trace}")
        verdict = "PASS" if pval > 1e-3 else "FAIL"
        ok &= pval > 1e-3
        print(f"  generated {int(res.counts.sum())} tokens; transitions vs target conditionals: "
              f"chi2 = {stat:.1f} on {dof} dof, p = {pval:.3f} -> {verdict} (lossless if p is not tiny)")
        good = res.max_logit_diff <= LOGIT_TOL
        ok &= good
        worst_diff, all_rows = max(worst_diff, res.max_logit_diff), all_rows + res.rows_checked
        print(f"  verify_attention pass vs sequential dense recompute: max |Δ logit| = {res.max_logit_diff:.2e} "
              f"over {res.rows_checked} verify rows -> {'PASS' if good else 'FAIL'}")

    top = args.requests * (args.gamma + 1)
    print("\nConfidence-scheduled verification (Markov head on): verify tokens, accepted and emitted per round")
    print(f"  and request; target rows = the verify batch the target processed per round (the bucket, of at "
          f"most R·(γ+1) = {top}), which sets the step time")
    print(f"  {'load':6s} {'policy':7s} {'verify tokens':>13s} {'target rows':>11s} {'accepted':>9s} "
          f"{'emitted':>8s} {'step ms':>8s} {'tokens/ms':>10s}  lossless")
    fixed = None
    for load in ("light", "heavy"):
        for policy in ("fixed", "causal", "async"):
            if policy == "fixed" and fixed is not None:
                # "fixed" ignores the load: same rounds and tokens, only the step-time curve differs.
                res = fixed._replace(times=[float(step_time(torch.tensor(b), load)) for b in fixed.rows])
            else:
                res = run(args.sched_rounds, args.requests, args.gamma, args.vocab, args.rank, args.temperature,
                          args.seed, True, args.backend, target, policy=policy, load=load)
                fixed = res if policy == "fixed" else fixed
            accepted, times = res.accepted, res.times
            emitted = sum(accepted) / len(accepted) + 1
            step_ms = sum(times) / len(times)
            # Throughput of the whole batch: emitted tokens of all requests per ms of target time.
            rate = sum((a + 1) * args.requests / t for a, t in zip(accepted, times)) / len(times)
            pval = res.lossless_test()[2]
            ok &= pval > 1e-3 and res.max_logit_diff <= LOGIT_TOL
            worst_diff, all_rows = max(worst_diff, res.max_logit_diff), all_rows + res.rows_checked
            print(f"  {load:6s} {policy:7s} {sum(res.verified) / len(res.verified):13.2f} "
                  f"{sum(res.rows) / len(res.rows):11.1f} "
                  f"{sum(accepted) / len(accepted):9.3f} {emitted:8.3f} {step_ms:8.2f} {rate:10.2f}  "
                  f"p = {pval:.3f} {'PASS' if pval > 1e-3 else 'FAIL'}")
    good = worst_diff <= LOGIT_TOL
    print(f"\nverify_attention over the paged cache vs sequential recompute, all runs: max |Δ logit| = "
          f"{worst_diff:.2e} over {all_rows} verify rows (tolerance {LOGIT_TOL:g}) -> {'PASS' if good else 'FAIL'}")
    return 0 if ok else 1
