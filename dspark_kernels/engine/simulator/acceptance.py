"""Acceptance models for the serving simulator: which drafts the target accepts, and what the
confidence head says about them.

Acceptance. Draft k (1-based) of a round is accepted, given drafts 1..k-1 were, with the
per-position conditional rate p_k; a round that verifies ℓ drafts accepts the leading run

    L = max{j ≤ ℓ : y_1 = ... = y_j = 1},   y_k ~ Bernoulli(p_k) independent,

and emits L + 1 tokens (the accepted drafts and the residual/bonus token). With
A_k = Π_{i≤k} p_i = P(L ≥ k) (the true survival):

    E[L + 1] = 1 + Σ_{k≤ℓ} A_k,        Var[L + 1] = Σ_{k≤ℓ} (2k − 1)·A_k − (Σ_{k≤ℓ} A_k)².

Confidence head (binormal latent). Per position, a score s_k = μ·y_k + ε_k, ε_k ~ N(0, 1),
separates accepted from rejected drafts with AUROC = P(s | y=1 > s | y=0) = Φ(μ/√2), so
μ = √2·Φ⁻¹(AUROC). The calibrated confidence is the posterior

    c_k = P(y_k = 1 | s_k) = σ(logit p_k + μ·s_k − μ²/2),

and the head the scheduler sees is over-confident by a temperature T ≤ 1,
c'_k = σ(logit(c_k) / T), with T chosen so that the ECE (20 equal-width bins,
engine.calibration.ece) of c'_k against y_k, pooled over positions, is the stated ECE
(T = 1, a calibrated head, when the stated ECE is at the sampling floor). The survival handed
to schedule_verify is a_k = Π_{i≤k} c'_i. A per-position monotone map leaves the AUROC at
every position unchanged, so "AUROC" here is the per-position AUROC of c'_k for y_k.

Defaults (:data:`WORKLOADS`) are ASSUMPTIONS, not paper numbers: the DSpark paper's Fig. 2 /
Table 1 per-position rates were not available to this work. What is cited: the paper's Fig. 6
range of confidence-head AUROC, 0.81–0.91 (as quoted in issue 16), whose middle 0.86 is the
default; and a third-party measurement of DeepSeek's released dspark_qwen3_8b_block7 draft, an
acceptance length of 3.41 on SPEED-Bench coding (vLLM, T = 1; huggingface.co/Dogacel/
Qwen3-8B-DSpark), which the "code" default is chosen to match at γ = 7 (1 + Σ A_k = 3.44).

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
    "AcceptanceModel",
    "DEFAULT_AUROC",
    "DEFAULT_ECE",
    "Draws",
    "WORKLOADS",
    "fit_acceptance",
    "load_acceptance_log",
]

# Middle of the paper's Fig. 6 AUROC range 0.81–0.91 (issue 16's quote of the paper).
DEFAULT_AUROC = 0.86
# Assumption: a head after Sequential Temperature Scaling; the paper's ECE values were not available.
DEFAULT_ECE = 0.02
# Output lengths are lognormal with this σ of log-length around the workload's mean. Assumption.
OUTPUT_LOG_SIGMA = 0.6
# Shortest request the simulator generates (tokens). Assumption; keeps rounds per request > 1.
MIN_OUTPUT_TOKENS = 16
# Samples per position when solving the calibration temperature: with 20 000 per position (140 000
# pooled at γ = 7) a calibrated head (T = 1) measures ECE 0.0026 on the "code" defaults: the
# sampling floor, well under the default 0.02.
_CALIBRATION_SAMPLES = 20_000
_CALIBRATION_SEED = 12345


@dataclass(frozen=True)
class AcceptanceModel:
    """A workload: per-position acceptance p_k, the confidence head's AUROC/ECE, request shape.

    accept: p_1..p_γmax, each in (0, 1). auroc in (0.5, 1); ece in [0, 0.5).
    mtp_accept: the MTP-1 drafter's acceptance of its one draft (default p_1: the same drafter
    truncated to one token). context_tokens: mean KV length a decoding request attends over
    (the step-time model's L̄). output_tokens: mean generated length (lognormal, σ_log 0.6).
    """

    name: str
    accept: tuple
    auroc: float = DEFAULT_AUROC
    ece: float = DEFAULT_ECE
    mtp_accept: float | None = None
    context_tokens: float = 2048.0
    output_tokens: float = 1024.0
    source: str = "assumption"

    def __post_init__(self):
        if not self.accept or not all(0.0 < float(p) < 1.0 for p in self.accept):
            raise ValueError(f"accept must be a non-empty list of rates in (0, 1), got {self.accept!r}")
        object.__setattr__(self, "accept", tuple(float(p) for p in self.accept))
        if not 0.5 < self.auroc < 1.0:
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

    @property
    def mu(self) -> float:
        """Binormal separation μ = √2·Φ⁻¹(AUROC)."""
        return math.sqrt(2.0) * statistics.NormalDist().inv_cdf(self.auroc)

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
        return _confidences(y, noise, self._rates(y.shape[-1]), self.mu, self.calibration_temperature())

    def metrics(self, samples: int = _CALIBRATION_SAMPLES, seed: int = _CALIBRATION_SEED + 1) -> dict:
        """Measured per-position AUROC (mean over positions) and pooled ECE of the head on a fresh sample
        (another seed than the one the temperature was solved on)."""
        g = torch.Generator().manual_seed(seed)
        gamma = self.gamma_max
        p = torch.tensor(self.accept, dtype=torch.float64)
        y = torch.rand(samples, gamma, generator=g, dtype=torch.float64) < p
        c = self.confidences(y, torch.randn(samples, gamma, generator=g, dtype=torch.float64))
        aurocs = [_auroc(c[:, k], y[:, k]) for k in range(gamma)]
        return {"auroc_per_position_mean": sum(aurocs) / gamma, "ece_pooled": _ece(c.reshape(-1), y.reshape(-1)),
                "calibration_temperature": self.calibration_temperature(), "mu": self.mu}

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
def _solve_temperature(accept: tuple, mu: float, target_ece: float) -> float:
    """Bisection on T ∈ [0.02, 1] for the pooled ECE of σ(logit c / T) (ECE grows as T falls below 1)."""
    g = torch.Generator().manual_seed(_CALIBRATION_SEED)
    gamma = len(accept)
    p = torch.tensor(accept, dtype=torch.float64)
    y = torch.rand(_CALIBRATION_SAMPLES, gamma, generator=g, dtype=torch.float64) < p
    noise = torch.randn(_CALIBRATION_SAMPLES, gamma, generator=g, dtype=torch.float64)
    logit_c = torch.logit(_confidences(y, noise, p, mu, 1.0)).reshape(-1)
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


# Assumed defaults (see the module docstring): per-position conditional acceptance at γ = 7
# (the block size of DeepSeek's released dspark_qwen3_8b_block7 draft). Context and output lengths
# are assumptions too. Expected accepted length at γ = 7: math 5.17, code 3.44, chat 2.66.
WORKLOADS: dict[str, AcceptanceModel] = {
    "math": AcceptanceModel("math", (0.90, 0.88, 0.86, 0.85, 0.84, 0.83, 0.82), context_tokens=2048,
                            output_tokens=1536, source="assumption (not a paper number)"),
    "code": AcceptanceModel("code", (0.78, 0.74, 0.71, 0.69, 0.67, 0.65, 0.64), context_tokens=2048,
                            output_tokens=1024,
                            source="assumption, chosen so τ(γ=7) = 3.44 ≈ 3.41 measured by a third party for "
                                   "dspark_qwen3_8b_block7 on SPEED-Bench coding (huggingface.co/Dogacel/"
                                   "Qwen3-8B-DSpark); not a paper number"),
    "chat": AcceptanceModel("chat", (0.70, 0.62, 0.58, 0.56, 0.54, 0.52, 0.50), context_tokens=1024,
                            output_tokens=512, source="assumption (not a paper number)"),
}


def fit_acceptance(accepted_len, confidence, *, observed_len=None, name: str = "fitted",
                   context_tokens: float = 2048.0, output_tokens: float = 1024.0) -> AcceptanceModel:
    """Estimate an :class:`AcceptanceModel` from a log of N rounds.

    accepted_len [N] int: drafts accepted per round (0..γ). confidence [N, γ]: the head's
    per-position conditional confidence c_k of each round's drafts (not the survival).
    observed_len [N] int (optional): positions the round verified (engine.calibration.
    observed_lengths); position k of a round counts only if k < observed_len.
    Position k (0-based) of a round is informative iff the round reached it (L ≥ k) and observed
    it; its outcome is L > k. Then p_k = mean outcome, AUROC = count-weighted mean of the
    per-position AUROCs (positions with both outcomes), ECE = pooled 20-bin ECE of c_k.
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
    rates, weights, aurocs, probs, outcomes = [], [], [], [], []
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
    if not rates:
        raise ValueError("no round observed position 0: nothing to fit")
    if not aurocs:
        raise ValueError("every informative position has one outcome only: the AUROC is undefined")
    auroc = sum(a * w for a, w in zip(aurocs, weights)) / sum(weights)
    auroc = min(max(auroc, 0.5 + 1e-6), 1 - 1e-6)
    ece = _ece(torch.cat(probs), torch.cat(outcomes))
    return AcceptanceModel(name, tuple(rates), auroc=auroc, ece=min(ece, 0.499), context_tokens=context_tokens,
                           output_tokens=output_tokens, source=f"fitted from a log of {num} rounds")


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
