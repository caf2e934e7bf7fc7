"""End-to-end DSpark round on a synthetic target, through the package ops.

The target is a first-order Markov chain over V tokens: p_t(· | prev) =
softmax(L[prev] / T). The draft imitates DSpark: a parallel "backbone" that
sees only the anchor gives base logits U_k = log of the chain's k-step
marginal (so each position is plausible on its own but blind to the tokens
drafted before it), and the Markov head adds a rank-r factorisation of L
(W1 = A·S^½, W2 = B·S^½ from the SVD L = A·S·Bᵀ), restoring the dependence
on the previous draft. Each round: markov_draft -> target rows for the ragged
verify batch -> rejection_sample. With the head on, more drafts are accepted;
either way the generated text must follow the target chain exactly, which the
demo checks with a chi-square test on the observed transitions.
"""

from __future__ import annotations

import argparse
import time

import torch

from . import markov_draft, rejection_sample


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

    def marginal_logits(self, anchor: torch.Tensor, gamma: int) -> torch.Tensor:
        """U [R, γ, V]: log of the k-step marginal from the anchor (k = 1..γ)."""
        dist = torch.nn.functional.one_hot(anchor, self.probs.shape[0]).float()
        out = []
        for _ in range(gamma):
            dist = dist @ self.probs
            out.append(torch.log(dist.clamp_min(1e-12)) * self.temperature)
        return torch.stack(out, dim=1)


def run(rounds: int, requests: int, gamma: int, vocab: int, rank: int, temperature: float,
        seed: int, markov_head: bool, backend: str | None, target: SyntheticTarget):
    """Run the draft -> verify loop; returns (accepted per round, transition counts)."""
    g = torch.Generator().manual_seed(seed + 1)
    anchor = torch.randint(0, vocab, (requests,), generator=g)
    seeds = torch.arange(requests, dtype=torch.int64) + 1000 * seed
    temp = torch.full((requests,), temperature)
    lengths = torch.full((requests,), gamma, dtype=torch.int32)
    cu = torch.arange(requests + 1, dtype=torch.int32) * (gamma + 1)
    w2 = target.w2 if markov_head else torch.zeros_like(target.w2)
    counts = torch.zeros(vocab, vocab, dtype=torch.int64)
    accepted = []
    for step in range(rounds):
        offset = torch.tensor(step, dtype=torch.int64)
        base = target.marginal_logits(anchor, gamma)
        if markov_head:
            # The head carries the previous-token signal; keep only a weak
            # position prior from the backbone so the two are not double-counted.
            base = 0.25 * base
        draft = markov_draft(base, anchor, target.w1, w2, temp, seeds, offset,
                             return_draft_probs=True, backend=backend)
        context = torch.cat([anchor[:, None], draft.tokens.long()], dim=1)  # [R, γ+1]
        target_logits = target.logits[context.reshape(-1)]
        tokens, n_acc = rejection_sample(target_logits, draft.tokens, draft.draft_probs, lengths, cu,
                                         temp, seeds, offset, backend=backend)
        accepted.append(float(n_acc.float().mean()))
        emitted = n_acc.long() + 1
        prev = anchor
        for j in range(gamma + 1):
            live = j < emitted
            nxt = tokens[:, j].long()
            counts.index_put_((prev[live], nxt[live]), torch.ones(int(live.sum()), dtype=torch.int64), accumulate=True)
            prev = torch.where(live, nxt, prev)
        anchor = prev
    return accepted, counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dspark_kernels demo", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--vocab", type=int, default=48)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, help="auto | reference | triton | cuda")
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    target = SyntheticTarget(args.vocab, args.rank, args.temperature, args.seed)
    print(f"DSpark demo: V={args.vocab}, γ={args.gamma}, {args.requests} requests x {args.rounds} rounds, "
          f"T={args.temperature}, Markov rank {args.rank}, backend={args.backend or 'auto'}")
    ok = True
    for head in (True, False):
        t0 = time.perf_counter()
        accepted, counts = run(args.rounds, args.requests, args.gamma, args.vocab, args.rank,
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
    return 0 if ok else 1
