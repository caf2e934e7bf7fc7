"""The closed-loop serving simulation: C request slots, one draft-and-verify round at a time.

Every round, for all C slots at once (tensors of C rows, one scheduler call per round):

1. the drafter proposes γ drafts per slot with survivals a[C, γ] (acceptance.Draws);
2. the policy picks verify lengths ℓ[C] (a request never verifies past its last token:
   ℓ ≤ remaining − 1, passed to schedule_verify as ``max_len``):
   - ``mtp1``: ℓ = 1, the MTP-1 drafter (its own first-draft acceptance);
   - ``fixed<γ>``: ℓ = γ, the DSpark drafter truncated to γ drafts, no scheduler;
   - ``causal``: ``dspark_kernels.schedule_verify(a, sps, mode="causal")`` (paper Alg. 1);
   - ``async``: ``schedule_verify(a, sps, mode="async", history=a from two rounds earlier)``
     (paper §5.2; a slot whose request changed keeps the slot's history, the population
     statistic the capacity is computed from);
3. the round takes t_round(B), B = C + Σ ℓ (steptime), and sps = 1 / t_round is the
   scheduler's table;
4. request r accepts L_r = min(lead_r, ℓ_r) drafts and emits min(L_r + 1, remaining_r) tokens;
   finished requests are replaced by the slot's next request (lognormal output length).

Measured per point: throughput = tokens / time / G (tok/s/GPU), per-user speed = tokens /
time / C (every slot is always busy, so this is the mean speed a running request sees),
verify budget = mean ℓ (drafts verified per request per round), accepted length = mean
L + 1 (tokens a verify yields, before the end-of-request cut), and the standard error of the
throughput by batch means (8 contiguous batches of rounds). Every policy of a (workload, C)
cell uses the same draws (common random numbers), so policy differences are not sampling
noise of different draws.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from dataclasses import dataclass

import torch

from dspark_kernels import schedule_verify

from .acceptance import AcceptanceModel, Draws
from .steptime import StepModel

__all__ = ["Policy", "DEFAULT_POLICIES", "parse_policies", "simulate_point", "sweep", "SweepResult",
           "default_concurrency", "rounds_for"]

DEFAULT_POLICIES = "mtp1,fixed3,fixed5,causal,async"
# Concurrency grid (powers of two); each profile keeps the values whose KV cache fits, plus
# its KV-capacity limit itself when that falls between two grid values.
CONCURRENCY_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Batch means: 8 contiguous batches of rounds give a standard error with 7 degrees of freedom.
BATCHES = 8


@dataclass(frozen=True)
class Policy:
    """How a round picks verify lengths. kind: fixed | causal | async; drafter: mtp | dspark."""

    name: str
    kind: str
    gamma: int
    drafter: str


def parse_policies(text: str, gamma: int) -> list[Policy]:
    """'mtp1,fixed5,causal,async' -> policies; fixed<g> needs 1 <= g <= gamma."""
    out = []
    for raw in (p.strip() for p in text.split(",")):
        if not raw:
            continue
        if raw == "mtp1":
            out.append(Policy("mtp1", "fixed", 1, "mtp"))
        elif raw in ("causal", "async"):
            out.append(Policy(raw, raw, gamma, "dspark"))
        elif raw.startswith("fixed") and raw[5:].isdigit():
            g = int(raw[5:])
            if not 1 <= g <= gamma:
                raise ValueError(f"policy {raw!r}: fixed γ must be in 1..{gamma} (the drafter's γ)")
            out.append(Policy(raw, "fixed", g, "dspark"))
        else:
            raise ValueError(f"unknown policy {raw!r}: use mtp1, fixed<γ> (e.g. fixed5), causal, async")
    if not out:
        raise ValueError("no policy given")
    if len({p.name for p in out}) != len(out):
        raise ValueError(f"a policy is listed twice in {text!r}")
    return out


def rounds_for(concurrency: int, request_rounds: int, min_rounds: int, max_rounds: int) -> int:
    """Rounds simulated at C: request_rounds / C request-rounds, clamped to [min_rounds, max_rounds]."""
    return int(min(max_rounds, max(min_rounds, math.ceil(request_rounds / concurrency))))


def default_concurrency(model: StepModel, workload: AcceptanceModel, gamma: int) -> list[int]:
    """The grid values whose KV fits the model (and the capacity limit itself as the last point)."""
    cap = model.max_concurrency(workload.context_tokens, gamma)
    if cap is None:
        return list(CONCURRENCY_GRID)
    out = [c for c in CONCURRENCY_GRID if c <= cap]
    if cap >= 1 and cap not in out and cap < CONCURRENCY_GRID[-1]:
        out.append(cap)
    return out


def _cell_seed(seed: int, workload: str, concurrency: int) -> int:
    """A stable seed per (seed, workload, C): crc32 of its text (Python's hash() is salted per process)."""
    return zlib.crc32(f"{seed}:{workload}:{concurrency}".encode())


def simulate_point(model: StepModel, workload: AcceptanceModel, policy: Policy, concurrency: int,
                   draws: Draws, *, backend: str = "reference") -> dict:
    """Run the rounds in ``draws`` (2 warm-up rows for the async history, then one per round)."""
    num = concurrency
    g = policy.gamma
    rounds = draws.survival.shape[0] - 2
    seconds = model.round_seconds(policy.drafter, g, num, workload.context_tokens)
    if not bool(torch.isfinite(seconds[1:]).all()) or not bool((seconds[1:] > 0).all()):
        raise ValueError(f"profile {model.name!r}: round times must be finite and > 0")
    sps = torch.zeros_like(seconds, dtype=torch.float32)
    sps[1:] = (1.0 / seconds[1:]).to(torch.float32)
    seconds_of = seconds.tolist()
    lead = draws.lead_mtp if policy.drafter == "mtp" else draws.lead
    survival = draws.survival[:, :, :g]
    remaining = draws.start.clone()
    next_request = torch.ones(num, dtype=torch.int64)
    per_slot = draws.lengths.shape[1]
    tokens_by_round, time_by_round = [], []
    verified = accepted = batch = finished = 0
    for t in range(rounds):
        i = t + 2
        cap = (remaining - 1).clamp(0, g)
        if policy.kind == "fixed":
            ell = cap
        else:
            history = survival[i - 2] if policy.kind == "async" else None
            sched = schedule_verify(survival[i], sps, mode=policy.kind, history=history,
                                    max_len=cap.to(torch.int32), backend=backend)
            ell = sched.lengths.to(torch.int64)
        acc = torch.minimum(lead[i], ell)
        emit = torch.minimum(acc + 1, remaining)
        remaining = remaining - emit
        ell_sum = int(ell.sum())
        b = num + ell_sum
        tokens_by_round.append(int(emit.sum()))
        time_by_round.append(seconds_of[b])
        verified += ell_sum
        accepted += int(acc.sum()) + num
        batch += b
        done = remaining <= 0
        if bool(done.any()):
            slots = done.nonzero().reshape(-1)
            finished += int(slots.numel())
            idx = next_request[slots] % per_slot
            remaining[slots] = draws.lengths[slots, idx]
            next_request[slots] += 1
    tokens, secs = sum(tokens_by_round), sum(time_by_round)
    gpus = model.gpus
    thr = tokens / secs / gpus
    batch_thr = []
    size = rounds // BATCHES
    if size >= 1:
        for k in range(BATCHES):
            lo, hi = k * size, (k + 1) * size if k < BATCHES - 1 else rounds
            batch_thr.append(sum(tokens_by_round[lo:hi]) / sum(time_by_round[lo:hi]) / gpus)
    se = _std(batch_thr) / math.sqrt(len(batch_thr)) if len(batch_thr) > 1 else float("nan")
    request_rounds = rounds * num
    return {
        "policy": policy.name,
        "profile": model.name,
        "workload": workload.name,
        "concurrency": num,
        "gamma": g,
        "rounds": rounds,
        "throughput_tok_s_gpu": _sig(thr),
        "throughput_se": _sig(se),
        "per_user_tok_s": _sig(tokens / secs / num),
        "per_user_se": _sig(se * gpus / num),
        "verify_budget": _sig(verified / request_rounds),
        "verify_tokens_per_request": _sig(1.0 + verified / request_rounds),
        "mean_accepted_length": _sig(accepted / request_rounds),
        "tokens_per_request_round": _sig(tokens / request_rounds),
        "step_ms": _sig(1e3 * secs / rounds),
        "mean_batch_tokens": _sig(batch / rounds),
        "requests_finished": finished,
    }


@dataclass
class SweepResult:
    points: list
    skipped: list  # (profile, workload, concurrency, reason)
    wall_seconds: float


def sweep(models: list[StepModel], workloads: list[AcceptanceModel], policies: list[Policy], *, gamma: int,
          seed: int = 0, concurrency: list[int] | None = None, request_rounds: int = 4096, min_rounds: int = 48,
          max_rounds: int = 512, progress: bool = True, backend: str = "reference") -> SweepResult:
    """Every (profile, workload, concurrency, policy) point; draws are shared across profiles and policies."""
    start = time.perf_counter()
    cells: dict = {}  # (workload index, C) -> models that run it
    skipped = []
    for m_idx, model in enumerate(models):
        for w_idx, wl in enumerate(workloads):
            cap = model.max_concurrency(wl.context_tokens, gamma)
            for c in concurrency or default_concurrency(model, wl, gamma):
                if cap is not None and c > cap:
                    skipped.append((model.name, wl.name, c, f"over the {model.limit_kind} limit C <= {cap}"))
                else:
                    cells.setdefault((w_idx, c), []).append(m_idx)
    bar = _Progress(sum(len(v) for v in cells.values()) * len(policies), enabled=progress)
    points = []
    threads = torch.get_num_threads()
    # Tensors here are [C, γ]: one thread avoids OpenMP spin-waits that cost more than the work (the
    # demo does the same). On this 2-core CPU shared with other jobs a calibration solve took 5.4 s with
    # torch's 2 threads and 0.1 s with one; when the machine was idle both took under 0.1 s.
    torch.set_num_threads(1)
    try:
        for (w_idx, c), model_ids in sorted(cells.items()):
            wl = workloads[w_idx]
            rounds = rounds_for(c, request_rounds, min_rounds, max_rounds)
            draws = wl.draw(c, rounds + 2, gamma, _cell_seed(seed, wl.name, c))  # shared by profiles, policies
            for m_idx in model_ids:
                for policy in policies:
                    bar.step(f"{models[m_idx].name} {wl.name} {policy.name} C={c}")
                    points.append(simulate_point(models[m_idx], wl, policy, c, draws, backend=backend))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    order = {p.name: i for i, p in enumerate(policies)}
    m_order = {m.name: i for i, m in enumerate(models)}
    w_order = {w.name: i for i, w in enumerate(workloads)}
    points.sort(key=lambda p: (m_order[p["profile"]], w_order[p["workload"]], order[p["policy"]], p["concurrency"]))
    return SweepResult(points, skipped, time.perf_counter() - start)


class _Progress:
    """A one-line progress bar on stderr: [#####-----] done/total label."""

    WIDTH = 30
    # Redraw at most 5 times a second: a log file gets a few lines, not one per point.
    INTERVAL = 0.2

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self.last = -math.inf

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last >= self.INTERVAL:
            self.last = now
            filled = self.WIDTH * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'-' * (self.WIDTH - filled)}] {self.done}/{self.total} "
                             f"{label:<48.48}")
            sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write(f"\r[{'#' * self.WIDTH}] {self.total}/{self.total} done{' ' * 50}\n")
            sys.stderr.flush()


def _std(values: list) -> float:
    if len(values) < 2:
        return float("nan")
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _sig(x: float) -> float | None:
    """Six significant digits (JSON stays readable; the same seed still gives the same digits)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.6g}")
