"""Acceptance models for the serving simulator: which drafts the target accepts, and what the
confidence head says about them.

Acceptance. Draft k (1-based) of a round is accepted, given drafts 1..k-1 were, with the
per-position conditional rate p_k; a round that verifies ℓ drafts accepts the leading run

    L = max{j ≤ ℓ : y_1 = ... = y_j = 1},   y_k ~ Bernoulli(p_k) independent,

and emits L + 1 tokens (the accepted drafts and the residual/bonus token). With
A_k = Π_{i≤k} p_i = P(L ≥ k) (the true survival):

    E[L + 1] = 1 + Σ_{k≤ℓ} A_k,        Var[L + 1] = Σ_{k≤ℓ} (2k − 1)·A_k − (Σ_{k≤ℓ} A_k)².

Confidence head (binormal latent). Per position, a score s_k = μ_k·y_k + ε_k, ε_k ~ N(0, 1),
separates accepted from rejected drafts with AUROC_k = P(s | y=1 > s | y=0) = Φ(μ_k/√2), so
μ_k = √2·Φ⁻¹(AUROC_k). The calibrated confidence is the posterior

    c_k = P(y_k = 1 | s_k) = σ(logit p_k + μ_k·s_k − μ_k²/2),

and the head the scheduler sees is over-confident by a temperature T ≤ 1,
c'_k = σ(logit(c_k) / T), with T chosen so that the ECE (20 equal-width bins,
engine.calibration.ece) of c'_k against y_k, pooled over positions, is the stated ECE
(T = 1, a calibrated head, when the stated ECE is at the sampling floor). The survival handed
to schedule_verify is a_k = Π_{i≤k} c'_i. A per-position monotone map leaves the AUROC at
every position unchanged, so "AUROC" here is the per-position AUROC of c'_k for y_k.

Acceptance across rounds and requests is independent and identically distributed: the paper
reports acceptance per domain only (no spread between requests or over a request's life), so
the model has none.

Defaults (:data:`WORKLOADS`) come from the DSpark paper (Cheng et al. 2026; DeepSpec's
DSpark_paper.pdf), Qwen3-8B target, γ = 7, temperature 1, DSpark drafter:

- τ = E[L + 1] at γ = 7 per domain: the mean of Table 1's benchmarks, math (GSM8K 6.17,
  MATH 5.78, AIME25 5.01) 5.653, code (MBPP 5.16, HumanEval 5.52, LiveCodeBench 5.17) 5.283,
  chat (MT-Bench 3.72, Alpaca 3.58, Arena-Hard 3.21) 3.503.
- The per-position shape: Fig. 2 (Qwen3-4B) is quoted in the text only at a few points. Math:
  DSpark "starting at 0.93", then a linear decay whose end (0.824) is solved to give τ = 5.653.
  Code and chat: the text gives only DFlash's decay, "from 0.87 to 0.78 on Code and 0.72 to 0.63
  on Chat"; DSpark's rates are that linear shape shifted by one constant in logit space, solved
  to give Table 1's τ (+0.282 code, +0.212 chat). The shift is an assumption (DSpark's own
  code/chat curves are in the figure, not the text).
- Confidence head: Fig. 6 (Alpaca, after Sequential Temperature Scaling) gives the AUROC at
  positions 1, 3, 5, 7 as 0.818, 0.812, 0.864, 0.907 (positions 2, 4, 6 interpolated
  linearly) and the calibrated ECE as 2.0 %, 1.7 %, 0.8 %, 0.4 % ("∼1 %"): the default pooled
  ECE is 0.01.
- MTP-1's acceptance of its one draft defaults to the workload's p_1 (no MTP τ is in the paper).

:func:`fit_acceptance` estimates a model from a log of real rounds (accepted lengths and
per-position confidences, e.g. from an engine): p_k is the fraction accepted among rounds
that reached position k, AUROC and ECE are measured with engine.calibration.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
import statistics
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from ..calibration import auroc as _auroc
from ..calibration import ece as _ece

__all__ = [
    "AcceptanceLog",
    "AcceptanceModel",
    "DEFAULT_AUROC",
    "DEFAULT_ECE",
    "Draws",
    "WORKLOADS",
    "fit_acceptance",
    "load_acceptance_log",
]

# Per-position AUROC of the calibrated confidence head, paper Fig. 6 (Alpaca): positions 1, 3, 5, 7 are
# 0.818, 0.812, 0.864, 0.907; positions 2, 4, 6 are the linear interpolation of their neighbours.
DEFAULT_AUROC = (0.818, 0.815, 0.812, 0.838, 0.864, 0.8855, 0.907)
# Pooled ECE after Sequential Temperature Scaling: Fig. 6 gives 2.0 %, 1.7 %, 0.8 %, 0.4 % at positions
# 1, 3, 5, 7 and the text "∼1 %".
DEFAULT_ECE = 0.01
# Output lengths are lognormal with this σ of log-length around the workload's mean. Assumption.
OUTPUT_LOG_SIGMA = 0.6
# Shortest request the simulator generates (tokens). Assumption; keeps rounds per request > 1.
MIN_OUTPUT_TOKENS = 16
# Samples per position when solving the calibration temperature: with 20 000 per position (140 000
# pooled at γ = 7) a calibrated head (T = 1) measures ECE 0.0023 / 0.0019 / 0.0039 on the math / code /
# chat defaults: the sampling floor, well under the default 0.01.
_CALIBRATION_SAMPLES = 20_000
_CALIBRATION_SEED = 12345


@dataclass(frozen=True)
class AcceptanceModel:
    """A workload: per-position acceptance p_k, the confidence head's AUROC/ECE, request shape.

    accept: p_1..p_γmax, each in (0, 1). auroc: one value in (0.5, 1) for every position, or one
    per position (a list shorter than γ repeats its last value); ece in [0, 0.5).
    mtp_accept: the MTP-1 drafter's acceptance of its one draft (default p_1: the same drafter
    truncated to one token). context_tokens: mean KV length a decoding request attends over
    (the step-time model's L̄). output_tokens: mean generated length (lognormal, σ_log 0.6).
    """

    name: str
    accept: tuple
    auroc: float | tuple = DEFAULT_AUROC
    ece: float = DEFAULT_ECE
    mtp_accept: float | None = None
    context_tokens: float = 2048.0
    output_tokens: float = 1024.0
    source: str = "assumption"

    def __post_init__(self):
        if not self.accept or not all(0.0 < float(p) < 1.0 for p in self.accept):
            raise ValueError(f"accept must be a non-empty list of rates in (0, 1), got {self.accept!r}")
        object.__setattr__(self, "accept", tuple(float(p) for p in self.accept))
        if isinstance(self.auroc, (tuple, list)):
            values = tuple(float(a) for a in self.auroc)
            if not values:
                raise ValueError("auroc must be a value or a non-empty list of values")
            object.__setattr__(self, "auroc", values)
        else:
            values = (float(self.auroc),)
            object.__setattr__(self, "auroc", values[0])
        if not all(0.5 < a < 1.0 for a in values):
            raise ValueError(f"auroc must lie in (0.5, 1), got {self.auroc}")
        if not 0.0 <= self.ece < 0.5:
            raise ValueError(f"ece must lie in [0, 0.5), got {self.ece}")
        if self.mtp_accept is not None and not 0.0 < self.mtp_accept < 1.0:
            raise ValueError(f"mtp_accept must lie in (0, 1), got {self.mtp_accept}")
        if not self.context_tokens >= 0 or not self.output_tokens >= MIN_OUTPUT_TOKENS:
            raise ValueError(f"context_tokens must be >= 0 and output_tokens >= {MIN_OUTPUT_TOKENS}")

    @property
    def gamma_max(self) -> int:
        return len(self.accept)

    @property
    def first_accept(self) -> float:
        return self.accept[0] if self.mtp_accept is None else self.mtp_accept

    def aurocs(self, gamma: int) -> tuple:
        """AUROC_k for k = 1..γ (a single value repeats; a list's last value repeats past its end)."""
        a = self.auroc if isinstance(self.auroc, tuple) else (self.auroc,)
        return tuple(a[min(k, len(a) - 1)] for k in range(gamma))

    def mus(self, gamma: int) -> tuple:
        """Binormal separations μ_k = √2·Φ⁻¹(AUROC_k), k = 1..γ."""
        inv = statistics.NormalDist().inv_cdf
        return tuple(math.sqrt(2.0) * inv(a) for a in self.aurocs(gamma))

    @property
    def mu(self) -> tuple:
        """μ_k for every position of the model (γmax values)."""
        return self.mus(self.gamma_max)

    def survival(self, gamma: int, *, drafter: str = "dspark") -> list[float]:
        """A_k = Π_{i≤k} p_i for k = 1..γ (the MTP drafter: [mtp_accept])."""
        rates = [self.first_accept] if drafter == "mtp" else list(self.accept[:gamma])
        out, a = [], 1.0
        for p in rates:
            a *= p
            out.append(a)
        return out

    def expected_accepted_length(self, gamma: int, *, drafter: str = "dspark") -> float:
        """E[L + 1] = 1 + Σ_{k≤γ} A_k when every one of γ drafts is verified."""
        return 1.0 + sum(self.survival(gamma, drafter=drafter))

    def accepted_length_std(self, gamma: int, *, drafter: str = "dspark") -> float:
        """√Var[L + 1], Var = Σ_k (2k − 1)·A_k − (Σ_k A_k)² (E[L²] = Σ_k (2k − 1)·P(L ≥ k))."""
        a = self.survival(gamma, drafter=drafter)
        second = sum((2 * k - 1) * ak for k, ak in enumerate(a, start=1))
        return math.sqrt(max(0.0, second - sum(a) ** 2))

    def calibration_temperature(self) -> float:
        """T ≤ 1 with ECE(σ(logit c / T)) = ece on a fixed sample (1.0 if ece is at the floor)."""
        return _solve_temperature(self.accept, self.mu, self.ece)

    def confidences(self, y: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """c'_k from outcomes y [..., γ] (bool) and standard normal noise of the same shape (fp64)."""
        gamma = y.shape[-1]
        return _confidences(y, noise, self._rates(gamma), self._mu_tensor(gamma), self.calibration_temperature())

    def metrics(self, samples: int = _CALIBRATION_SAMPLES, seed: int = _CALIBRATION_SEED + 1) -> dict:
        """Measured per-position AUROC (mean over positions) and pooled ECE of the head on a fresh sample
        (another seed than the one the temperature was solved on)."""
        g = torch.Generator().manual_seed(seed)
        gamma = self.gamma_max
        p = torch.tensor(self.accept, dtype=torch.float64)
        y = torch.rand(samples, gamma, generator=g, dtype=torch.float64) < p
        c = self.confidences(y, torch.randn(samples, gamma, generator=g, dtype=torch.float64))
        aurocs = [_auroc(c[:, k], y[:, k]) for k in range(gamma)]
        return {"auroc_per_position": aurocs, "auroc_per_position_mean": sum(aurocs) / gamma,
                "ece_pooled": _ece(c.reshape(-1), y.reshape(-1)),
                "calibration_temperature": self.calibration_temperature(), "mu": list(self.mu)}

    def draw(self, concurrency: int, rounds: int, gamma: int, seed: int) -> "Draws":
        """Every random quantity of ``rounds`` rounds of ``concurrency`` slots (see :class:`Draws`)."""
        if gamma > self.gamma_max:
            raise ValueError(f"workload {self.name!r} defines acceptance for {self.gamma_max} positions, "
                             f"but γ = {gamma} was asked for")
        g = torch.Generator().manual_seed(seed)
        shape = (rounds, concurrency, gamma)
        p = torch.tensor(self.accept[:gamma], dtype=torch.float64)
        u = torch.rand(shape, generator=g, dtype=torch.float64)
        y = u < p
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        conf = self.confidences(y, noise)
        survival = torch.cumprod(conf, dim=-1).to(torch.float32)
        lead = torch.cumprod(y.to(torch.int64), dim=-1).sum(dim=-1)
        lead_mtp = (u[..., 0] < self.first_accept).to(torch.int64)
        # Request lengths: enough per slot for the most a slot can emit, (γ+1) per round.
        per_slot = rounds * (gamma + 1) // MIN_OUTPUT_TOKENS + 2
        log_mean = math.log(self.output_tokens) - OUTPUT_LOG_SIGMA ** 2 / 2  # E[lognormal] = output_tokens
        lengths = torch.exp(log_mean + OUTPUT_LOG_SIGMA * torch.randn(concurrency, per_slot, generator=g,
                                                                     dtype=torch.float64))
        lengths = lengths.round().clamp_min(MIN_OUTPUT_TOKENS).to(torch.int64)
        # Slots start part-way through their first request (uniform progress), not all at token 0.
        start = torch.ceil(torch.rand(concurrency, generator=g, dtype=torch.float64) * lengths[:, 0]).to(torch.int64)
        return Draws(survival, lead, lead_mtp, lengths, start.clamp_min(1))

    def with_overrides(self, **changes) -> "AcceptanceModel":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def describe(self) -> dict:
        return {"name": self.name, "accept": list(self.accept), "auroc": self.auroc, "ece": self.ece,
                "mtp_accept": self.first_accept, "context_tokens": self.context_tokens,
                "output_tokens": self.output_tokens, "source": self.source,
                "expected_accepted_length_all_gamma": self.expected_accepted_length(self.gamma_max),
                **self.metrics()}

    def _rates(self, gamma: int) -> torch.Tensor:
        return torch.tensor(self.accept[:gamma], dtype=torch.float64)

    def _mu_tensor(self, gamma: int) -> torch.Tensor:
        return torch.tensor(self.mus(gamma), dtype=torch.float64)


class Draws(NamedTuple):
    """Random inputs of one (workload, concurrency) cell, shared by every policy (common random numbers).

    survival [rounds, C, γ] fp32: the drafter's survival a_k per round and slot.
    lead [rounds, C] int64: accepted run length if all γ drafts were verified (min with ℓ gives L).
    lead_mtp [rounds, C] int64: the MTP-1 drafter's accept (0/1) of its one draft, same uniforms.
    lengths [C, J] int64: output lengths of the successive requests of each slot.
    start [C] int64: tokens the first request of each slot still has to generate.
    """

    survival: torch.Tensor
    lead: torch.Tensor
    lead_mtp: torch.Tensor
    lengths: torch.Tensor
    start: torch.Tensor


def _confidences(y, noise, p, mu, temperature):
    logit_p = torch.log(p) - torch.log1p(-p)
    score = mu * y.to(torch.float64) + noise
    logit_c = logit_p + mu * score - mu * mu / 2.0
    return torch.sigmoid(logit_c / temperature)


@functools.lru_cache(maxsize=64)
def _solve_temperature(accept: tuple, mu: tuple, target_ece: float) -> float:
    """Bisection on T ∈ [0.02, 1] for the pooled ECE of σ(logit c / T) (ECE grows as T falls below 1)."""
    g = torch.Generator().manual_seed(_CALIBRATION_SEED)
    gamma = len(accept)
    p = torch.tensor(accept, dtype=torch.float64)
    y = torch.rand(_CALIBRATION_SAMPLES, gamma, generator=g, dtype=torch.float64) < p
    noise = torch.randn(_CALIBRATION_SAMPLES, gamma, generator=g, dtype=torch.float64)
    logit_c = torch.logit(_confidences(y, noise, p, torch.tensor(mu, dtype=torch.float64), 1.0)).reshape(-1)
    flat_y = y.reshape(-1)

    def ece_at(t: float) -> float:
        return _ece(torch.sigmoid(logit_c / t), flat_y)

    if ece_at(1.0) >= target_ece:
        return 1.0
    lo, hi = 0.02, 1.0  # ece_at(lo) > target > ece_at(hi)
    if ece_at(lo) <= target_ece:
        return lo
    for _ in range(20):  # interval 1/2^20 ≈ 1e-6 of T: no visible effect on the ECE
        mid = 0.5 * (lo + hi)
        if ece_at(mid) > target_ece:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# Defaults from the DSpark paper (module docstring: Table 1's τ per domain at γ = 7 for Qwen3-8B, Fig. 2's
# per-position shapes). Rates rounded to 4 decimals: τ(γ = 7) = 5.6531 / 5.2828 / 3.5033 against Table 1's
# 5.6533 / 5.2833 / 3.5033. Context and output lengths are assumptions (the paper does not give them).
PAPER_TAU = {"math": (6.17 + 5.78 + 5.01) / 3, "code": (5.16 + 5.52 + 5.17) / 3, "chat": (3.72 + 3.58 + 3.21) / 3}
WORKLOADS: dict[str, AcceptanceModel] = {
    "math": AcceptanceModel("math", (0.93, 0.9123, 0.8946, 0.877, 0.8593, 0.8416, 0.8239), context_tokens=2048,
                            output_tokens=1536,
                            source="DSpark paper: Table 1 τ (GSM8K, MATH, AIME25; Qwen3-8B, γ = 7) with Fig. 2's "
                                   "position-1 rate 0.93 and a linear decay; lengths assumed"),
    "code": AcceptanceModel("code", (0.8987, 0.8866, 0.8744, 0.8621, 0.8497, 0.8372, 0.8246), context_tokens=2048,
                            output_tokens=1024,
                            source="DSpark paper: Table 1 τ (MBPP, HumanEval, LiveCodeBench; Qwen3-8B, γ = 7) on "
                                   "Fig. 2's DFlash code shape 0.87 -> 0.78 shifted by +0.2824 in logit "
                                   "(assumption); lengths assumed"),
    "chat": AcceptanceModel("chat", (0.7607, 0.7471, 0.7334, 0.7197, 0.7058, 0.6919, 0.6779), context_tokens=1024,
                            output_tokens=512,
                            source="DSpark paper: Table 1 τ (MT-Bench, Alpaca, Arena-Hard; Qwen3-8B, γ = 7) on "
                                   "Fig. 2's DFlash chat shape 0.72 -> 0.63 shifted by +0.2120 in logit "
                                   "(assumption); lengths assumed"),
}


def fit_acceptance(accepted_len, confidence, *, observed_len=None, name: str = "fitted",
                   context_tokens: float = 2048.0, output_tokens: float = 1024.0) -> AcceptanceModel:
    """Estimate an :class:`AcceptanceModel` from a log of N rounds.

    accepted_len [N] int: drafts accepted per round (0..γ). confidence [N, γ]: the head's
    per-position conditional confidence c_k of each round's drafts (not the survival).
    observed_len [N] int (optional): positions the round verified (engine.calibration.
    observed_lengths); position k of a round counts only if k < observed_len.
    Position k (0-based) of a round is informative iff the round reached it (L ≥ k) and observed
    it; its outcome is L > k. Then p_k = mean outcome, AUROC_k = the AUROC of c_k at position k
    (positions with one outcome only take the count-weighted mean of the others), ECE = pooled
    20-bin ECE of c_k.
    Positions no round reached end the model (γ_max = the last informative position).
    """
    lengths = torch.as_tensor(accepted_len).reshape(-1).to(torch.int64)
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    if conf.dim() != 2 or conf.shape[0] != lengths.shape[0]:
        raise ValueError(f"confidence must be [N, γ] with N = len(accepted_len) = {lengths.shape[0]}, "
                         f"got {tuple(conf.shape)}")
    num, gamma = conf.shape
    if num == 0:
        raise ValueError("the log holds no rounds")
    if bool((lengths < 0).any()) or bool((lengths > gamma).any()):
        raise ValueError(f"accepted_len must lie in [0, γ = {gamma}]")
    if not bool(torch.isfinite(conf).all()) or bool(((conf < 0) | (conf > 1)).any()):
        raise ValueError("confidence must be finite and in [0, 1]")
    observed = torch.full_like(lengths, gamma) if observed_len is None else \
        torch.as_tensor(observed_len).reshape(-1).to(torch.int64)
    if observed.shape != lengths.shape:
        raise ValueError("observed_len must have one entry per round")
    rates, weights, aurocs, probs, outcomes, per_position = [], [], [], [], [], []
    for k in range(gamma):
        rows = (lengths >= k) & (observed > k)
        count = int(rows.sum())
        if count == 0:
            break
        y = lengths[rows] > k
        rate = float(y.double().mean())
        rates.append(min(max(rate, 1e-6), 1 - 1e-6))
        c = conf[rows, k]
        probs.append(c)
        outcomes.append(y)
        if 0 < int(y.sum()) < count:
            aurocs.append(_auroc(c, y))
            weights.append(count)
            per_position.append(aurocs[-1])
        else:
            per_position.append(None)
    if not rates:
        raise ValueError("no round observed position 0: nothing to fit")
    if not aurocs:
        raise ValueError("every informative position has one outcome only: the AUROC is undefined")
    pooled = sum(a * w for a, w in zip(aurocs, weights)) / sum(weights)
    auroc = tuple(min(max(pooled if a is None else a, 0.5 + 1e-6), 1 - 1e-6) for a in per_position)
    ece = _ece(torch.cat(probs), torch.cat(outcomes))
    return AcceptanceModel(name, tuple(rates), auroc=auroc, ece=min(ece, 0.499), context_tokens=context_tokens,
                           output_tokens=output_tokens, source=f"fitted from a log of {num} rounds")


class AcceptanceLog:
    """Rounds of an engine, recorded for :func:`fit_acceptance` and written in the file format
    :func:`load_acceptance_log` reads (``simulate --acceptance-log FILE``).

    ``record(out)`` takes a ``DSparkRound.step()`` output (or the same fields by keyword): per request
    the drafts it accepted (num_accepted), the drafts it verified (lengths: the observed positions)
    and the confidence head's survival a_k, stored as the per-position conditional confidence
    c_k = a_k / a_{k-1} (a_0 = 1; c_k = 0 after a zero survival). Requests that verified nothing
    (inactive, or lengths 0) are skipped. Each call copies to the host: a logging tool, not for a
    hot loop.

    Bias: a scheduled engine verifies the positions its scheduler trusts, so rates fitted from a
    causal/async log are conditional on that choice (higher than the drafter's). Record a run
    that verifies every draft (policy "fixed") for the drafter's own rates and head quality;
    ``python -m dspark_kernels demo --acceptance-log FILE`` does that.

    Example::

        log = AcceptanceLog()
        for _ in range(rounds):
            log.record(engine.step())
        log.save("log.json", name="my-workload", context_tokens=2048)
    """

    def __init__(self):
        self.accepted: list[torch.Tensor] = []
        self.confidence: list[torch.Tensor] = []
        self.observed: list[torch.Tensor] = []

    def __len__(self) -> int:
        return sum(int(a.shape[0]) for a in self.accepted)

    def record(self, out=None, *, num_accepted=None, lengths=None, survival=None) -> None:
        if out is not None:
            num_accepted, lengths, survival = out.num_accepted, out.lengths, out.survival
        if num_accepted is None or lengths is None or survival is None:
            raise ValueError("record needs num_accepted, lengths and survival (the round's drafter needs a "
                             "confidence head: RoundOutput.survival is None without one)")
        acc = torch.as_tensor(num_accepted).detach().to("cpu", torch.int64).reshape(-1)
        ell = torch.as_tensor(lengths).detach().to("cpu", torch.int64).reshape(-1)
        a = torch.as_tensor(survival).detach().to("cpu", torch.float64)
        if a.dim() != 2 or a.shape[0] != acc.shape[0] or ell.shape != acc.shape:
            raise ValueError(f"survival must be [R, γ] with R = len(num_accepted) = {acc.shape[0]} and lengths [R], "
                             f"got survival {tuple(a.shape)}, lengths {tuple(ell.shape)}")
        if self.confidence and a.shape[1] != self.confidence[0].shape[1]:
            raise ValueError(f"γ changed between rounds: {self.confidence[0].shape[1]} then {a.shape[1]}")
        if bool((acc > ell).any()) or bool((acc < 0).any()):
            raise ValueError("num_accepted must lie in [0, lengths]")
        prev = torch.cat([torch.ones(a.shape[0], 1, dtype=torch.float64), a[:, :-1]], dim=1)
        conf = torch.where(prev > 0, a / prev.clamp_min(1e-300), torch.zeros_like(a)).clamp(0.0, 1.0)
        keep = ell > 0
        self.accepted.append(acc[keep])
        self.confidence.append(conf[keep])
        self.observed.append(ell[keep])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(accepted_len [N], confidence [N, γ], observed_len [N]) over every recorded request-round."""
        if not self.accepted:
            raise ValueError("the log holds no rounds")
        return torch.cat(self.accepted), torch.cat(self.confidence), torch.cat(self.observed)

    def fit(self, **kwargs) -> AcceptanceModel:
        """:func:`fit_acceptance` on the recorded rounds (keywords: name, context_tokens, output_tokens)."""
        accepted, conf, observed = self.tensors()
        return fit_acceptance(accepted, conf, observed_len=observed, **kwargs)

    def save(self, path, *, name: str = "logged", context_tokens: float | None = None,
             output_tokens: float | None = None) -> pathlib.Path:
        """Write the JSON :func:`load_acceptance_log` reads; returns the path."""
        accepted, conf, observed = self.tensors()
        doc = {"name": name, "accepted_len": accepted.tolist(), "confidence": conf.tolist(),
               "observed_len": observed.tolist()}
        if context_tokens is not None:
            doc["context_tokens"] = float(context_tokens)
        if output_tokens is not None:
            doc["output_tokens"] = float(output_tokens)
        target = pathlib.Path(os.fspath(path))
        target.write_text(json.dumps(doc, allow_nan=False) + "\n")
        return target


def load_acceptance_log(path, **kwargs) -> AcceptanceModel:
    """Fit a model from a JSON log {"accepted_len": [N], "confidence": [[γ]...], "observed_len": [N]?,
    "name": str?, "context_tokens": x?, "output_tokens": x?} (see :func:`fit_acceptance`)."""
    source = pathlib.Path(os.fspath(path))
    try:
        doc = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source}: cannot read the acceptance log: {exc}") from exc
    if not isinstance(doc, dict) or "accepted_len" not in doc or "confidence" not in doc:
        raise ValueError(f"{source}: an acceptance log needs \"accepted_len\" and \"confidence\"")
    options = {k: doc[k] for k in ("name", "context_tokens", "output_tokens") if k in doc}
    options.update(kwargs)
    try:
        return fit_acceptance(doc["accepted_len"], doc["confidence"], observed_len=doc.get("observed_len"),
                              **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc
