"""Sequential Temperature Scaling (STS) of the confidence head (DSpark §3.2.1).

The confidence head gives a logit l_k per draft position k (0-based); with
per-position temperatures τ the scheduler sees

    c_k = σ(l_k / τ_k),    a_k = Π_{i<=k} c_i    (survival)

and a_k should be the probability that drafts 1..k+1 are all accepted. On a
validation set with accepted lengths L[n] ∈ {0..γ}, position k is "alive" in
sample n iff L[n] > k. STS fits τ_0, τ_1, ... left to right: a_k depends on
τ_0..τ_k, so once τ_0..τ_{k-1} are fixed, τ_k is a 1-D search that minimises
the expected calibration error of a_k against the alive outcome. The fitted
temperatures are markov_draft's ``sts_temperature`` argument.

Observed positions: a round whose scheduler verified only m < γ drafts, or
whose accepted drafts include an EOS at position j (so nothing after it
means anything), says nothing about positions k >= m (resp. k > j). Such a
round's ``observed_len`` O[n] (m, or j + 1; :func:`observed_lengths` builds
it) makes every fit and metric use position k of sample n only when k < O[n],
as DeepSpec's evaluator truncates each round to its effective proposal
length. Counting the unobserved positions as "not alive" (what a full-γ
assumption does) biases the survival, hence the temperatures, downwards.
Without ``observed_len`` every round is taken as a full γ-draft round.

ECE bins: :data:`DEFAULT_N_BINS` = 20 equal-width bins by default everywhere
here, as in DeepSpec's confidence-head metrics (it was 15 before).

Stored calibration: :func:`save_sts` writes the temperatures and the fit's
metadata as a small JSON (``sts_temperature.json`` next to a checkpoint),
:func:`load_sts` reads it back bit-exactly; ``dspark_kernels.load_deepspec``
loads it when it sits in the checkpoint's directory.

Metrics (per position, before = all τ 1, after = fitted):

    ECE   = Σ_b (n_b / N) |mean_b(p) - mean_b(y)|, equal-width bins on [0, 1]
    AUROC = P(score of a positive > score of a negative), ties count 1/2
    Brier = mean((p - y)²)

Everything here is host-side Python: inputs may live on any device, the fit
runs in fp64 on the CPU. Plotting needs matplotlib, imported only when a
diagram is drawn.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from dataclasses import dataclass

import torch

__all__ = [
    "CalibrationMetrics",
    "ReliabilityBins",
    "STSResult",
    "DEFAULT_N_BINS",
    "STS_FILENAME",
    "alive_outcomes",
    "auroc",
    "brier",
    "calibration_metrics",
    "default_temperature_grid",
    "ece",
    "fit_sts",
    "load_sts",
    "observed_lengths",
    "observed_mask",
    "reliability_bins",
    "reliability_diagram",
    "save_sts",
    "survival_from_logits",
]

# Equal-width ECE bins unless told otherwise: DeepSpec's confidence-head metrics use 20.
DEFAULT_N_BINS = 20
# The stored calibration's file name in a checkpoint directory, and its format tag.
STS_FILENAME = "sts_temperature.json"
STS_FORMAT = "dspark_kernels.sts_temperature"
STS_VERSION = 1

# Upper bound on elements of one [grid chunk, N] candidate block during the
# fit, so that a large validation set times a fine grid stays a few tens of MB.
_FIT_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class CalibrationMetrics:
    """Per-position calibration of survival against the alive outcomes.

    ece, auroc, brier, base_rate are [γ] fp64 CPU tensors over the samples
    observed at each position. ``auroc`` is nan at a position where every
    sample has the same outcome; ``base_rate`` is the observed fraction of
    samples alive at the position; all four are nan at a position with no
    observed sample. count: [γ] int64 observed samples per position (None
    only if constructed by hand).
    """

    ece: torch.Tensor
    auroc: torch.Tensor
    brier: torch.Tensor
    base_rate: torch.Tensor
    count: torch.Tensor | None = None


@dataclass(frozen=True)
class ReliabilityBins:
    """Reliability-diagram data: equal-width bins of predicted survival.

    count [γ, n_bins] int64 (observed) samples per bin; mean_prob and observed
    [γ, n_bins] fp64 mean predicted survival and observed alive frequency
    (nan in empty bins).
    """

    count: torch.Tensor
    mean_prob: torch.Tensor
    observed: torch.Tensor


@dataclass(frozen=True)
class STSResult:
    """Output of :func:`fit_sts`.

    temperatures [γ] fp32 (all > 0), ready for markov_draft(sts_temperature=);
    before / after: metrics at τ = 1 and at the fitted τ; reliability_before /
    reliability_after: binned data for :func:`reliability_diagram`; grid [G]
    fp64 the searched temperatures; n_bins the ECE bin count; num_samples
    the number of validation rounds N.
    """

    temperatures: torch.Tensor
    before: CalibrationMetrics
    after: CalibrationMetrics
    reliability_before: ReliabilityBins
    reliability_after: ReliabilityBins
    grid: torch.Tensor
    n_bins: int
    num_samples: int = 0


def default_temperature_grid(num: int = 241, max_temperature: float = 20.0) -> torch.Tensor:
    """Log-uniform grid τ_s = exp(s·ln(max)/S), s = -S..S, S = (num-1)/2.

    Symmetric in log τ around 1 so that τ = 1 (no rescaling) is on the grid;
    the default spans [1/20, 20] with a ratio of about 2.5 % between
    neighbours. Returns [num] fp64; num must be odd and >= 3.
    """
    if num < 3 or num % 2 == 0:
        raise ValueError(f"num must be an odd integer >= 3 so that τ = 1 is on the grid, got {num}")
    if not max_temperature > 1.0:
        raise ValueError(f"max_temperature must be > 1, got {max_temperature}")
    half = (num - 1) // 2
    steps = torch.arange(-half, half + 1, dtype=torch.float64)
    return torch.exp(steps * (math.log(max_temperature) / half))


def survival_from_logits(conf_logits: torch.Tensor, temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """a_k = Π_{i<=k} σ(l_i / τ_i), the survival markov_draft computes.

    conf_logits [..., γ] floating; temperatures [γ] (> 0) or None for τ = 1.
    Returns [..., γ] fp32 on conf_logits' device. The math is fp32 in the
    same order as markov_draft (divide, sigmoid, cumulative product), so the
    two agree to rounding.
    """
    if not torch.is_floating_point(conf_logits) or conf_logits.dim() < 1:
        raise ValueError("conf_logits must be a floating tensor [..., γ]")
    logits = conf_logits.float()
    if temperatures is not None:
        temps = _check_temperatures(temperatures, conf_logits.shape[-1])
        logits = logits / temps.to(device=logits.device, dtype=torch.float32)
    return torch.cumprod(torch.sigmoid(logits), dim=-1)


def alive_outcomes(accepted_len: torch.Tensor, gamma: int) -> torch.Tensor:
    """y[n, k] = (L[n] > k): drafts 1..k+1 of sample n were all accepted.

    accepted_len [N] integer in 0..γ. Returns [N, γ] bool on its device.
    """
    lengths = _check_lengths(accepted_len, gamma)
    return lengths[:, None] > torch.arange(gamma, device=lengths.device)[None, :]


def observed_mask(observed_len: torch.Tensor | None, num: int, gamma: int) -> torch.Tensor:
    """m[n, k] = (k < O[n]): position k of sample n was observed. [N, γ] bool on the CPU.

    observed_len [N] integer in 0..γ, or None: every position observed (full
    γ-draft rounds).
    """
    if observed_len is None:
        return torch.ones(num, gamma, dtype=torch.bool)
    lengths = _check_lengths(observed_len, gamma, "observed_len").cpu()
    if lengths.shape[0] != num:
        raise ValueError(f"observed_len has {lengths.shape[0]} entries but there are {num} samples")
    return lengths[:, None] > torch.arange(gamma)[None, :]


def observed_lengths(
    proposal_len: torch.Tensor,
    *,
    accepted_len: torch.Tensor | None = None,
    draft_tokens: torch.Tensor | None = None,
    eos_token_id=None,
) -> torch.Tensor:
    """O[n] = min(m[n], j[n] + 1): the positions of round n whose outcome was observed.

    m = proposal_len [N] integer >= 0, the number of drafts verified in each
    round (the scheduler's length; γ for full rounds). j[n] is the first
    position (0-based) of an accepted EOS draft, draft_tokens[n, j] ∈
    eos_token_id and j < accepted_len[n]; positions after it are unobserved
    (the sequence ended there), as in DeepSpec's evaluator. A rejected EOS
    draft cuts nothing: its rejection is observed. draft_tokens [N, γ] integer,
    accepted_len [N] integer and eos_token_id (an int or a collection of ints)
    come together or not at all. Returns [N] int64 on the CPU, for
    :func:`fit_sts` (observed_len=).
    """
    if not isinstance(proposal_len, torch.Tensor) or proposal_len.dim() != 1 or proposal_len.is_floating_point() \
            or proposal_len.is_complex() or proposal_len.dtype == torch.bool:
        raise ValueError("proposal_len must be a 1-D integer tensor [N]")
    lengths = proposal_len.detach().cpu().to(torch.int64)
    if bool((lengths < 0).any()):
        raise ValueError("proposal_len values must be >= 0")
    given = [x is not None for x in (accepted_len, draft_tokens, eos_token_id)]
    if not any(given):
        return lengths
    if not all(given):
        raise ValueError("draft_tokens, accepted_len and eos_token_id come together (to find accepted EOS drafts)")
    if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.dim() != 2 or draft_tokens.is_floating_point() \
            or draft_tokens.shape[0] != lengths.shape[0]:
        raise ValueError(f"draft_tokens must be an integer tensor [N={lengths.shape[0]}, γ], "
                         f"got {tuple(getattr(draft_tokens, 'shape', ()))}")
    tokens = draft_tokens.detach().cpu().to(torch.int64)
    gamma = tokens.shape[1]
    accepted = _check_lengths(accepted_len, gamma).cpu()
    if accepted.shape[0] != lengths.shape[0]:
        raise ValueError(f"accepted_len has {accepted.shape[0]} entries but proposal_len has {lengths.shape[0]}")
    eos_ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, dtype=torch.int64))
    accepted_eos = is_eos & (torch.arange(gamma)[None, :] < accepted[:, None])
    first = torch.where(accepted_eos, torch.arange(gamma)[None, :], gamma).min(dim=1).values
    return torch.minimum(lengths, torch.where(first < gamma, first + 1, lengths))


def ece(prob: torch.Tensor, outcome: torch.Tensor, n_bins: int = DEFAULT_N_BINS) -> float:
    """ECE = Σ_b (n_b / N) |mean_b(p) - mean_b(y)| = Σ_b |Σ_{i∈b} (p_i - y_i)| / N.

    Bin b holds p ∈ [b/n_bins, (b+1)/n_bins), the last bin also p = 1;
    n_bins defaults to 20 (DeepSpec's).
    prob [N] floating in [0, 1]; outcome [N] bool or 0/1. Returns a float.
    """
    p, y = _check_pair(prob, outcome, "prob")
    _check_probabilities(p)
    _check_bins(n_bins)
    return float(_ece_rows(p[None, :], y, n_bins)[0])


def brier(prob: torch.Tensor, outcome: torch.Tensor) -> float:
    """Brier = mean_i (p_i - y_i)².

    prob [N] floating in [0, 1]; outcome [N] bool or 0/1. Returns a float.
    """
    p, y = _check_pair(prob, outcome, "prob")
    _check_probabilities(p)
    return float(((p - y) ** 2).mean())


def auroc(score: torch.Tensor, outcome: torch.Tensor) -> float:
    """AUROC = (R_+ - n_+(n_+ + 1)/2) / (n_+ n_-)  (Mann-Whitney U).

    R_+ is the sum of the ranks (1-based, ascending score) of the positives,
    tied scores sharing their average rank, which equals counting each
    positive-negative tie as 1/2. score [N] floating (finite); outcome [N]
    bool or 0/1. Returns a float, nan when all outcomes are of one class.
    """
    s, y = _check_pair(score, outcome, "score")
    return _auroc(s, y)


def calibration_metrics(
    survival: torch.Tensor, alive: torch.Tensor, n_bins: int = DEFAULT_N_BINS, *, observed: torch.Tensor | None = None
) -> CalibrationMetrics:
    """ECE, AUROC, Brier and base rate of every column of survival [N, γ] against alive [N, γ].

    survival floating in [0, 1]; alive bool or 0/1, same shape; n_bins ECE
    bins (default 20). observed: [N, γ] bool (e.g. :func:`observed_mask`),
    position k of sample n counts only where it is True; None: all count.
    Returns :class:`CalibrationMetrics` of [γ] fp64 tensors (and count).
    """
    p, y = _check_matrix_pair(survival, alive)
    _check_probabilities(p)
    _check_bins(n_bins)
    mask = _check_observed(observed, p.shape)
    gamma = p.shape[1]
    nan = float("nan")
    eces, aurocs, briers, rates = [], [], [], []
    for k in range(gamma):
        rows = mask[:, k]
        pk, yk = (p[:, k], y[:, k]) if bool(rows.all()) else (p[rows, k], y[rows, k])
        if pk.numel() == 0:
            eces.append(nan), aurocs.append(nan), briers.append(nan), rates.append(nan)
            continue
        eces.append(float(_ece_rows(pk[None, :], yk, n_bins)[0]))
        aurocs.append(_auroc(pk, yk))
        briers.append(float(((pk - yk) ** 2).mean()))
        rates.append(float(yk.mean()))
    f64 = dict(dtype=torch.float64)
    return CalibrationMetrics(ece=torch.tensor(eces, **f64), auroc=torch.tensor(aurocs, **f64),
                              brier=torch.tensor(briers, **f64), base_rate=torch.tensor(rates, **f64),
                              count=mask.sum(dim=0).to(torch.int64))


def reliability_bins(
    survival: torch.Tensor, alive: torch.Tensor, n_bins: int = DEFAULT_N_BINS, *, observed: torch.Tensor | None = None
) -> ReliabilityBins:
    """Per-position bin counts, mean predicted survival and observed frequency.

    survival [N, γ] floating in [0, 1]; alive [N, γ] bool or 0/1. Bins as in
    :func:`ece` (default 20); observed [N, γ] bool as in
    :func:`calibration_metrics`. Returns :class:`ReliabilityBins` ([γ, n_bins] tensors).
    """
    p, y = _check_matrix_pair(survival, alive)
    _check_probabilities(p)
    _check_bins(n_bins)
    mask = _check_observed(observed, p.shape).reshape(-1)
    gamma = p.shape[1]
    flat = (torch.arange(gamma)[None, :] * n_bins + _bin_index(p, n_bins)).reshape(-1)[mask]
    size = gamma * n_bins
    count = torch.bincount(flat, minlength=size).reshape(gamma, n_bins)
    sum_p = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, p.reshape(-1)[mask]).reshape(gamma, n_bins)
    sum_y = torch.zeros(size, dtype=torch.float64).index_add_(0, flat, y.reshape(-1)[mask]).reshape(gamma, n_bins)
    denom = count.to(torch.float64)
    nan = torch.full_like(denom, float("nan"))
    mean_prob = torch.where(count > 0, sum_p / denom.clamp(min=1), nan)
    observed = torch.where(count > 0, sum_y / denom.clamp(min=1), nan)
    return ReliabilityBins(count=count, mean_prob=mean_prob, observed=observed)


def fit_sts(
    conf_logits: torch.Tensor,
    accepted_len: torch.Tensor,
    *,
    observed_len: torch.Tensor | None = None,
    grid: torch.Tensor | None = None,
    n_bins: int = DEFAULT_N_BINS,
) -> STSResult:
    """Fit τ_k = argmin_{τ ∈ grid} ECE(a_{k-1} · σ(l_k / τ), L > k), k = 0..γ-1 in order.

    a_{-1} = 1 and a_{k-1} uses the already fitted τ_0..τ_{k-1}. The ECE of
    position k runs over the samples that observed it (k < observed_len[n]);
    a position no sample observed keeps τ = 1. Grid values whose ECE equals
    the minimum (within 1e-12) are broken towards the one closest to τ = 1 in
    log scale, so a position whose logits carry no information keeps τ = 1.

    conf_logits [N, γ] floating (finite), the confidence-head logits before
    any temperature; accepted_len [N] integer in 0..γ, the number of drafts
    accepted in each validation round. observed_len: [N] integer in 0..γ,
    the positions of each round whose outcome was observed (the round's
    proposal length, cut after an accepted EOS: :func:`observed_lengths`);
    default None = γ for every round (full-γ rounds, the old behaviour).
    grid: [G] positive temperatures (default :func:`default_temperature_grid`).
    n_bins: ECE bins, default 20 (:data:`DEFAULT_N_BINS`, DeepSpec's).
    Returns :class:`STSResult` with temperatures [γ] fp32; its metrics use
    the same observed positions.
    """
    logits = _check_logits(conf_logits)
    num, gamma = logits.shape
    alive = alive_outcomes(accepted_len, gamma).cpu().to(torch.float64)
    if alive.shape[0] != num:
        raise ValueError(f"accepted_len has {alive.shape[0]} entries but conf_logits has {num} rows")
    mask = observed_mask(observed_len, num, gamma)
    _check_bins(n_bins)
    grid = default_temperature_grid() if grid is None else _check_grid(grid)

    # The tie-break prefers small |log τ|: order candidates by it once, and
    # take the first minimiser in that order.
    preference = torch.argsort(grid.log().abs(), stable=True)
    ordered_grid = grid[preference]
    temperatures = torch.ones(gamma, dtype=torch.float64)
    prev = torch.ones(num, dtype=torch.float64)
    for k in range(gamma):
        rows = mask[:, k]
        if bool(rows.all()):
            prev_k, logit_k, alive_k = prev, logits[:, k], alive[:, k]
        else:
            prev_k, logit_k, alive_k = prev[rows], logits[rows, k], alive[rows, k]
        count = prev_k.shape[0]
        if count > 0:
            chunk = max(1, _FIT_BLOCK_ELEMENTS // count)
            errors = torch.empty(ordered_grid.shape[0], dtype=torch.float64)
            for start in range(0, ordered_grid.shape[0], chunk):
                taus = ordered_grid[start:start + chunk]
                cand = prev_k[None, :] * torch.sigmoid(logit_k[None, :] / taus[:, None])
                errors[start:start + chunk] = _ece_rows(cand, alive_k, n_bins)
            best = int(torch.nonzero(errors <= errors.min() + 1e-12)[0, 0])
            temperatures[k] = ordered_grid[best]
        prev = prev * torch.sigmoid(logits[:, k] / temperatures[k])

    temps32 = temperatures.to(torch.float32)
    before = torch.cumprod(torch.sigmoid(logits), dim=1)
    after = torch.cumprod(torch.sigmoid(logits / temps32.double()[None, :]), dim=1)
    return STSResult(
        temperatures=temps32,
        before=calibration_metrics(before, alive, n_bins, observed=mask),
        after=calibration_metrics(after, alive, n_bins, observed=mask),
        reliability_before=reliability_bins(before, alive, n_bins, observed=mask),
        reliability_after=reliability_bins(after, alive, n_bins, observed=mask),
        grid=grid,
        n_bins=n_bins,
        num_samples=num,
    )


def save_sts(result_or_temperatures, path, *, metadata: dict | None = None) -> pathlib.Path:
    """Write STS temperatures as a small JSON next to a checkpoint; returns the file written.

    result_or_temperatures: an :class:`STSResult` (its temperatures, and the
    fit's metadata: n_bins, the grid's size and range, the number of rounds,
    per-position observed counts, ECE / AUROC / Brier before and after) or a
    [γ] tensor of temperatures > 0. path: a directory (the checkpoint's:
    writes ``<path>/sts_temperature.json``) or a file name. metadata: more
    JSON-serialisable entries (e.g. the validation set), merged over the
    fit's. The temperatures are stored as the exact decimal of each fp32
    value, so :func:`load_sts` gives them back bit for bit. Format::

        {"format": "dspark_kernels.sts_temperature", "version": 1, "gamma": γ,
         "temperatures": [τ_0, ..., τ_{γ-1}], "metadata": {...}}
    """
    if isinstance(result_or_temperatures, STSResult):
        res = result_or_temperatures
        temps = res.temperatures
        info = {
            "n_bins": res.n_bins,
            "num_samples": res.num_samples,
            "grid": {"size": int(res.grid.numel()), "min": float(res.grid.min()), "max": float(res.grid.max())},
            "observed_count": None if res.after.count is None else [int(c) for c in res.after.count],
        }
        for name, metrics in (("before", res.before), ("after", res.after)):
            for field in ("ece", "auroc", "brier", "base_rate"):
                info[f"{field}_{name}"] = [_json_float(v) for v in getattr(metrics, field).tolist()]
    else:
        temps = torch.as_tensor(result_or_temperatures)
        if temps.dim() != 1:
            raise ValueError(f"temperatures must be [γ], got shape {tuple(temps.shape)}")
        info = {}
    temps = _check_temperatures(temps, temps.shape[0]).detach().cpu().to(torch.float32)
    info.update(metadata or {})
    target = pathlib.Path(os.fspath(path))
    if target.is_dir():
        target = target / STS_FILENAME
    doc = {"format": STS_FORMAT, "version": STS_VERSION, "gamma": int(temps.shape[0]),
           "temperatures": [float(t) for t in temps.tolist()], "metadata": info}
    target.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return target


def load_sts(path) -> tuple[torch.Tensor, dict]:
    """Read a file written by :func:`save_sts`: (temperatures [γ] fp32, metadata dict).

    path: the JSON file or a directory holding ``sts_temperature.json``.
    Raises ValueError naming the file when it is not such a file, its γ does
    not match its temperatures, or a temperature is not finite and > 0.
    """
    source = pathlib.Path(os.fspath(path))
    if source.is_dir():
        source = source / STS_FILENAME
    try:
        doc = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{source}: cannot read STS temperatures: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != STS_FORMAT:
        raise ValueError(f"{source}: not an STS temperature file (expected \"format\": \"{STS_FORMAT}\")")
    if doc.get("version") != STS_VERSION:
        raise ValueError(f"{source}: unsupported STS temperature file version {doc.get('version')!r}")
    values = doc.get("temperatures")
    gamma = doc.get("gamma")
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values) \
            or not isinstance(gamma, int) or len(values) != gamma:
        raise ValueError(f"{source}: \"temperatures\" must be a list of gamma={gamma!r} numbers")
    temps = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if not bool(torch.isfinite(temps).all()) or not bool((temps > 0).all()):
        raise ValueError(f"{source}: temperatures must be finite and > 0, got {values}")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{source}: \"metadata\" must be an object")
    return temps, metadata


def _json_float(value: float):
    return None if math.isnan(value) or math.isinf(value) else value


def reliability_diagram(
    result_or_data,
    path,
    *,
    temperatures: torch.Tensor | None = None,
    observed_len: torch.Tensor | None = None,
    n_bins: int = DEFAULT_N_BINS,
    title: str | None = None,
):
    """Write a PNG reliability diagram: observed alive frequency vs predicted survival per position.

    result_or_data: an :class:`STSResult` (before and after its fit), or a
    pair (conf_logits [N, γ], accepted_len [N]) drawn at τ = 1 and, when
    ``temperatures`` [γ] is given, also at those temperatures, over the
    positions ``observed_len`` [N] marks observed (as in :func:`fit_sts`;
    None: all). n_bins: bins of the pair form (default 20). One panel per
    position on a grid of at most 4 columns, the diagonal is perfect
    calibration, each panel's title carries ECE before → after. Returns the
    path written. Needs matplotlib.
    """
    if isinstance(result_or_data, STSResult):
        res = result_or_data
        before_bins, after_bins = res.reliability_before, res.reliability_after
        before_ece, after_ece = res.before.ece, res.after.ece
        temps = res.temperatures
    else:
        try:
            conf_logits, accepted_len = result_or_data
        except (TypeError, ValueError):
            raise TypeError("result_or_data must be an STSResult or a (conf_logits, accepted_len) pair") from None
        logits = _check_logits(conf_logits)
        alive = alive_outcomes(accepted_len, logits.shape[1]).cpu()
        if alive.shape[0] != logits.shape[0]:
            raise ValueError(f"accepted_len has {alive.shape[0]} entries but conf_logits has {logits.shape[0]} rows")
        mask = observed_mask(observed_len, logits.shape[0], logits.shape[1])
        _check_bins(n_bins)
        before = torch.cumprod(torch.sigmoid(logits), dim=1)
        before_bins = reliability_bins(before, alive, n_bins, observed=mask)
        before_ece = calibration_metrics(before, alive, n_bins, observed=mask).ece
        after_bins = after_ece = temps = None
        if temperatures is not None:
            temps = _check_temperatures(temperatures, logits.shape[1]).cpu()
            after = torch.cumprod(torch.sigmoid(logits / temps.double()[None, :]), dim=1)
            after_bins = reliability_bins(after, alive, n_bins, observed=mask)
            after_ece = calibration_metrics(after, alive, n_bins, observed=mask).ece

    figure_cls, canvas_cls = _matplotlib()
    gamma = before_bins.count.shape[0]
    cols = min(gamma, 4)
    rows = (gamma + cols - 1) // cols
    fig = figure_cls(figsize=(3.2 * cols, 3.2 * rows), dpi=100)
    canvas_cls(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for k in range(rows * cols):
        ax = axes[k // cols][k % cols]
        if k >= gamma:
            ax.set_visible(False)
            continue
        ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
        _draw_bins(ax, before_bins, k, "before (τ=1)", "tab:red", "o")
        heading = f"pos {k}: ECE {float(before_ece[k]):.3f}"
        if after_bins is not None:
            _draw_bins(ax, after_bins, k, f"after (τ={float(temps[k]):.2f})", "tab:blue", "s")
            heading += f" → {float(after_ece[k]):.3f}"
        ax.set_title(heading, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        if k % cols == 0:
            ax.set_ylabel("observed alive frequency")
        if k // cols == rows - 1:
            ax.set_xlabel("predicted survival a_k")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "STS reliability (survival vs all-accepted)", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return path


def _draw_bins(ax, bins: ReliabilityBins, k: int, label: str, color: str, marker: str) -> None:
    """One curve of non-empty bins, marker area growing with the bin's sample share."""
    keep = bins.count[k] > 0
    if not bool(keep.any()):
        return
    x = bins.mean_prob[k][keep].tolist()
    y = bins.observed[k][keep].tolist()
    share = (bins.count[k][keep].double() / bins.count[k].sum()).tolist()
    ax.plot(x, y, color=color, linewidth=1.2, label=label)
    ax.scatter(x, y, s=[8 + 120 * s for s in share], color=color, marker=marker, zorder=3)


def _matplotlib():
    """Figure and Agg canvas classes, without pyplot so no global backend state is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg


def _bin_index(p: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each probability; p = 1 falls in the last bin."""
    # Truncation is floor here because p >= 0.
    return (p * n_bins).to(torch.int64).clamp_(max=n_bins - 1)


def _ece_rows(p: torch.Tensor, y: torch.Tensor, n_bins: int) -> torch.Tensor:
    """ECE of every row of p [G, N] against one outcome vector y [N]; returns [G] fp64.

    Uses Σ_b |Σ_{i∈b}(p_i - y_i)| / N, so one weighted bincount covers all
    rows; the per-bin sums accumulate in fp64 whatever p's dtype.
    """
    rows, num = p.shape
    flat = _bin_index(p, n_bins).add_(torch.arange(rows)[:, None] * n_bins).reshape(-1)
    gap = torch.bincount(flat, weights=(p - y.to(p.dtype)[None, :]).reshape(-1).double(), minlength=rows * n_bins)
    return gap.reshape(rows, n_bins).abs().sum(dim=1) / num


def _auroc(score: torch.Tensor, y: torch.Tensor) -> float:
    positives = float(y.sum())
    negatives = float(y.numel()) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = torch.argsort(score, stable=True)
    sorted_score = score[order]
    _, inverse, counts = torch.unique_consecutive(sorted_score, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average_rank = ends - (counts.to(torch.float64) - 1) / 2
    rank_sum = float((average_rank[inverse] * y[order]).sum())
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def _as_outcome(outcome: torch.Tensor, name: str = "outcome") -> torch.Tensor:
    if not isinstance(outcome, torch.Tensor):
        outcome = torch.as_tensor(outcome)
    y = outcome.detach().cpu().to(torch.float64)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 (or bool) values")
    return y


def _as_float(values: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(values, dtype=torch.float64)
    if values.is_complex():
        raise ValueError(f"{name} must be a real tensor")
    x = values.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite")
    return x


def _check_pair(values: torch.Tensor, outcome: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_float(values, name)
    y = _as_outcome(outcome)
    if x.dim() != 1 or y.shape != x.shape:
        raise ValueError(
            f"{name} and outcome must be 1-D of the same length, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} and outcome must not be empty")
    return x, y


def _check_matrix_pair(survival: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = _as_float(survival, "survival")
    y = _as_outcome(alive, "alive")
    if p.dim() != 2 or y.shape != p.shape or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(
            f"survival and alive must be non-empty [N, γ] of one shape, got {tuple(p.shape)} and {tuple(y.shape)}"
        )
    return p, y


def _check_probabilities(p: torch.Tensor) -> None:
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("probabilities must lie in [0, 1]")


def _check_bins(n_bins: int) -> None:
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")


def _check_logits(conf_logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(conf_logits, torch.Tensor) or not torch.is_floating_point(conf_logits) or conf_logits.dim() != 2:
        raise ValueError("conf_logits must be a floating tensor [N, γ]")
    if conf_logits.shape[0] == 0 or conf_logits.shape[1] == 0:
        raise ValueError(f"conf_logits must be non-empty, got shape {tuple(conf_logits.shape)}")
    logits = conf_logits.detach().cpu().to(torch.float64)
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("conf_logits must be finite")
    return logits


def _check_lengths(accepted_len: torch.Tensor, gamma: int, name: str = "accepted_len") -> torch.Tensor:
    if not isinstance(accepted_len, torch.Tensor) or accepted_len.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor [N]")
    if accepted_len.is_floating_point() or accepted_len.is_complex() or accepted_len.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {accepted_len.dtype}")
    lengths = accepted_len.to(torch.int64)
    if lengths.numel() and bool(((lengths < 0) | (lengths > gamma)).any()):
        raise ValueError(f"{name} values must lie in 0..{gamma}")
    return lengths


def _check_observed(observed: torch.Tensor | None, shape) -> torch.Tensor:
    """observed [N, γ] bool / 0-1 as a CPU bool mask; None: all True."""
    if observed is None:
        return torch.ones(tuple(shape), dtype=torch.bool)
    mask = _as_outcome(observed, "observed").to(torch.bool)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"observed must have the shape of survival {tuple(shape)}, got {tuple(mask.shape)}")
    return mask


def _check_temperatures(temperatures: torch.Tensor, gamma: int) -> torch.Tensor:
    temps = torch.as_tensor(temperatures)
    if temps.shape != (gamma,) or not torch.is_floating_point(temps):
        raise ValueError(f"temperatures must be a floating tensor of shape ({gamma},), got {tuple(temps.shape)}")
    if not bool(torch.isfinite(temps).all()) or not bool((temps > 0).all()):
        raise ValueError("temperatures must be finite and > 0")
    return temps


def _check_grid(grid: torch.Tensor) -> torch.Tensor:
    g = torch.as_tensor(grid, dtype=torch.float64).detach().cpu().reshape(-1)
    if g.numel() == 0:
        raise ValueError("grid must hold at least one temperature")
    if not bool(torch.isfinite(g).all()) or not bool((g > 0).all()):
        raise ValueError("grid temperatures must be finite and > 0")
    return g
