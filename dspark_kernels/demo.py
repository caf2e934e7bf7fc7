"""End-to-end DSpark round on a synthetic target, through the package ops.

The target is a first-order Markov chain over V tokens: p_t(· | prev) =
softmax(L[prev] / T). The draft imitates DSpark: a parallel "backbone" that
sees only the anchor gives base logits U_k = log of the chain's k-step
marginal (so each position is plausible on its own but blind to the tokens
drafted before it), and the Markov head adds a rank-r factorisation of L
(W1 = A·S^½, W2 = B·S^½ from the SVD L = A·S·Bᵀ), restoring the dependence
on the previous draft. A confidence head c_k = σ(v·W1[x_{k-1}] + b), fitted
to the chain's true acceptance rates, gives each draft's survival.

Each round: markov_draft -> schedule_verify (how many drafts each request
verifies, for a synthetic step-time curve) -> pack_verify -> target rows for
the ragged verify batch -> rejection_sample. With the head on, more drafts are
accepted; the scheduler trades verify tokens for throughput when the target's
step time grows with the batch; either way the generated text must follow the
target chain exactly, which the demo checks with a chi-square test on the
observed transitions.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import markov_draft, pack_verify, rejection_sample, schedule_verify


def _chi2_sf(stat: float, dof: int) -> float:
    """Upper tail of the chi-square distribution, via the regularised gamma."""
    if dof <= 0:
        return 1.0
    a = torch.tensor(dof / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(stat / 2, dtype=torch.float64)))


def transition_test(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0):
    """Pooled chi-square of observed transition counts [V, V] against probs [V, V].

    Per previous token, next tokens whose expected count is below min_expected
    are merged into one bin, so the chi-square approximation holds.
    Returns (statistic, degrees of freedom, p-value).
    """
    stat, dof = 0.0, 0
    for prev in range(counts.shape[0]):
        n = float(counts[prev].sum())
        if n == 0:
            continue
        expected = probs[prev].double() * n
        observed = counts[prev].double()
        big = expected >= min_expected
        e = torch.cat([expected[big], expected[~big].sum().reshape(1)])
        o = torch.cat([observed[big], observed[~big].sum().reshape(1)])
        keep = e > 0
        e, o = e[keep], o[keep]
        if e.numel() < 2:
            continue
        stat += float(((o - e) ** 2 / e).sum())
        dof += e.numel() - 1
    return stat, dof, _chi2_sf(stat, dof)


class SyntheticTarget:
    """First-order chain with peaked rows, plus a DSpark-style draft of it."""

    def __init__(self, vocab: int, rank: int, temperature: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        # Each token strongly prefers a few successors: a text-like chain
        # whose next token is predictable from the previous one.
        logits = torch.randn(vocab, vocab, generator=g) * 1.5
        favourite = torch.randint(0, vocab, (vocab, 3), generator=g)
        logits.scatter_add_(1, favourite, torch.full((vocab, 3), 4.0))
        self.logits = logits
        self.temperature = temperature
        self.probs = torch.softmax(logits / temperature, dim=-1)
        a, s, bt = torch.linalg.svd(logits)
        root = s[:rank].sqrt()
        self.w1 = a[:, :rank] * root  # embedding [V, r]
        self.w2 = bt[:rank].T * root  # nn.Linear(r, V).weight [V, r]
        # Confidence head: the chance that the draft after token x is accepted
        # is alpha(x) = sum_v min(p_t(v|x), q(v|x)) with q the head's own
        # conditional; fit logit(alpha) ~ W1[x]·v + b by least squares.
        q = torch.softmax((self.w1 @ self.w2.T) / temperature, dim=-1)
        alpha = torch.minimum(self.probs, q).sum(-1).clamp(1e-4, 1 - 1e-4)
        design = torch.cat([self.w1, torch.ones(vocab, 1)], dim=1)
        sol = torch.linalg.lstsq(design, torch.logit(alpha)[:, None]).solution[:, 0]
        self.conf_weight = torch.cat([torch.zeros(1), sol[:rank]])  # [d + r], d = 1 unused hidden
        self.conf_bias = sol[rank].reshape(())

    def marginal_logits(self, anchor: torch.Tensor, gamma: int) -> torch.Tensor:
        """U [R, γ, V]: log of the k-step marginal from the anchor (k = 1..γ)."""
        dist = torch.nn.functional.one_hot(anchor, self.probs.shape[0]).float()
        out = []
        for _ in range(gamma):
            dist = dist @ self.probs
            out.append(torch.log(dist.clamp_min(1e-12)) * self.temperature)
        return torch.stack(out, dim=1)


def step_time(batch: torch.Tensor, load: str) -> torch.Tensor:
    """Synthetic target step time in ms for a verify batch of B tokens.

    light: weight reads dominate, so B barely matters (1 ms + B/2048 ms);
    heavy: compute-bound, every verify token costs (1 ms + B/48 ms).
    """
    per_token = {"light": 1 / 2048, "heavy": 1 / 48}[load]
    return 1.0 + batch.double() * per_token


def run(rounds: int, requests: int, gamma: int, vocab: int, rank: int, temperature: float,
        seed: int, markov_head: bool, backend: str | None, target: SyntheticTarget,
        policy: str = "fixed", load: str = "light"):
    """Run the draft -> schedule -> verify loop.

    policy: "fixed" verifies every draft; "causal" / "async" let
    schedule_verify pick per-request lengths for the `load` step-time curve.
    Returns (accepted per round, transition counts, verify tokens per round,
    step time per round in ms).
    """
    g = torch.Generator().manual_seed(seed + 1)
    anchor = torch.randint(0, vocab, (requests,), generator=g)
    seeds = torch.arange(requests, dtype=torch.int64) + 1000 * seed
    temp = torch.full((requests,), temperature)
    hidden = torch.zeros(requests, gamma, 1)
    start_pos = torch.zeros(requests, dtype=torch.int32)
    sps = 1.0 / step_time(torch.arange(requests * (gamma + 1) + 1), load).float()
    w2 = target.w2 if markov_head else torch.zeros_like(target.w2)
    counts = torch.zeros(vocab, vocab, dtype=torch.int64)
    accepted, verified, times = [], [], []
    history = []
    for step in range(rounds):
        offset = torch.tensor(step, dtype=torch.int64)
        base = target.marginal_logits(anchor, gamma)
        if markov_head:
            # The head carries the previous-token signal; keep only a weak
            # position prior from the backbone so the two are not double-counted.
            base = 0.25 * base
        draft = markov_draft(base, anchor, target.w1, w2, temp, seeds, offset, hidden=hidden,
                             conf_weight=target.conf_weight, conf_bias=target.conf_bias,
                             return_draft_probs=True, backend=backend)
        if policy == "fixed":
            lengths = torch.full((requests,), gamma, dtype=torch.int32)
            cu = torch.arange(requests + 1, dtype=torch.int32) * (gamma + 1)
        else:
            # async plans with the survival of two rounds earlier (paper §5.2).
            past = history[-2] if len(history) >= 2 else draft.survival
            plan = schedule_verify(draft.survival, sps, mode=policy, history=past, backend=backend)
            lengths, cu = plan.lengths, plan.cu_verify
        history.append(draft.survival)
        batch = pack_verify(anchor, draft.tokens, lengths, cu, start_pos, backend=backend)
        # Row t holds the target's prediction after token_ids[t] (first-order chain);
        # padding rows (-1) are never read by rejection_sample.
        target_logits = target.logits[batch.token_ids.long().clamp_min(0)]
        tokens, n_acc = rejection_sample(target_logits, draft.tokens, draft.draft_probs, lengths, cu,
                                         temp, seeds, offset, backend=backend)
        start_pos = start_pos + n_acc + 1
        accepted.append(float(n_acc.float().mean()))
        verified.append(float(cu[-1]) / requests)
        times.append(float(step_time(cu[-1], load)))
        emitted = n_acc.long() + 1
        prev = anchor
        for j in range(gamma + 1):
            live = j < emitted
            nxt = tokens[:, j].long()
            counts.index_put_((prev[live], nxt[live]), torch.ones(int(live.sum()), dtype=torch.int64), accumulate=True)
            prev = torch.where(live, nxt, prev)
        anchor = prev
    return accepted, counts, verified, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_kernels demo", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--sched-rounds", type=int, default=150, help="rounds per scheduling policy")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--vocab", type=int, default=48)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="auto | reference | triton | cuda")
    args = p.parse_args(argv)

    # The demo's tensors are tiny (64 x 48): one intra-op thread avoids OpenMP
    # spin-waits that cost more than the work, worst on a loaded 2-core machine.
    torch.set_num_threads(1)
    target = SyntheticTarget(args.vocab, args.rank, args.temperature, args.seed)
    print(f"DSpark demo: V={args.vocab}, γ={args.gamma}, {args.requests} requests x {args.rounds} rounds, "
          f"T={args.temperature}, Markov rank {args.rank}, backend={args.backend or 'auto'}")
    ok = True
    for head in (True, False):
        t0 = time.perf_counter()
        accepted, counts, _, _ = run(args.rounds, args.requests, args.gamma, args.vocab, args.rank,
                                     args.temperature, args.seed, head, args.backend, target)
        secs = time.perf_counter() - t0
        stat, dof, pval = transition_test(counts, target.probs)
        mean_acc = sum(accepted) / len(accepted)
        print(f"\nMarkov head {'on ' if head else 'off'}: mean accepted drafts per round {mean_acc:.3f} "
              f"(+1 emitted token = {mean_acc + 1:.3f} tokens/round), {secs:.1f} s")
        tenth = max(1, len(accepted) // 10)
        trace = ", ".join(f"{sum(accepted[i:i + tenth]) / len(accepted[i:i + tenth]):.2f}"
                          for i in range(0, len(accepted), tenth))
        print(f"  accepted per round, in tenths of the run: {trace}")
        verdict = "PASS" if pval > 1e-3 else "FAIL"
        ok &= pval > 1e-3
        print(f"  generated {int(counts.sum())} tokens; transitions vs target chain: "
              f"chi2 = {stat:.1f} on {dof} dof, p = {pval:.3f} -> {verdict} (lossless if p is not tiny)")

    print("\nConfidence-scheduled verification (Markov head on): per round and request")
    print(f"  {'load':6s} {'policy':7s} {'verify tokens':>13s} {'accepted':>9s} {'emitted':>8s} "
          f"{'step ms':>8s} {'tokens/ms':>10s}  lossless")
    for load in ("light", "heavy"):
        for policy in ("fixed", "causal", "async"):
            accepted, counts, verified, times = run(args.sched_rounds, args.requests, args.gamma, args.vocab,
                                                    args.rank, args.temperature, args.seed, True, args.backend,
                                                    target, policy=policy, load=load)
            emitted = sum(accepted) / len(accepted) + 1
            step_ms = sum(times) / len(times)
            # Throughput of the whole batch: emitted tokens of all requests per ms of target time.
            rate = sum((a + 1) * args.requests / t for a, t in zip(accepted, times)) / len(times)
            pval = transition_test(counts, target.probs)[2]
            ok &= pval > 1e-3
            print(f"  {load:6s} {policy:7s} {sum(verified) / len(verified):13.2f} {sum(accepted) / len(accepted):9.3f} "
                  f"{emitted:8.3f} {step_ms:8.2f} {rate:10.2f}  p = {pval:.3f} {'PASS' if pval > 1e-3 else 'FAIL'}")
    return 0 if ok else 1
