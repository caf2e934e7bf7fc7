"""Builds the scheduler's SPS table: steps-per-second profiling of a verify
forward into schedule_verify's ``sps`` argument.

For a verify batch of B tokens the scheduler needs SPS(B) = 1 / t(B), t(B)
the wall time of one target step. This module times a caller-supplied
``step(batch_tokens)`` for B in 1..Bmax and returns

    sps[0] = 0,    sps[B] = 1 / t̂(B),    B = 1..Bmax    ([Bmax+1] fp32)

where t̂ is the median over repeats, cleaned so that it is non-decreasing in
B: a bigger batch never runs faster in the model, so a dip in the measured
curve is noise, and an SPS that rises with B would make the scheduler admit
tokens for free. The cleaning is isotonic regression (pool adjacent
violators) of the measured step times; batch sizes that were not measured
are filled by linear interpolation of the step time.

Timing: CUDA events on a CUDA device (after warm-up; the events bracket the
step on the current stream), time.perf_counter on the host otherwise, or a
caller-supplied ``timer`` (a clock in seconds; tests inject a fake one).
Plotting needs matplotlib, imported only when a plot is drawn.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["SPSProfile", "isotonic_increasing", "plot_sps", "profile_sps", "sps_from_seconds"]


@dataclass(frozen=True)
class SPSProfile:
    """Result of :func:`profile_sps`.

    sps [Bmax+1] fp32: the scheduler table from the cleaned step times
    (sps[0] = 0, non-increasing for B >= 1).
    raw_sps [Bmax+1] fp32: the same from the uncleaned medians, for plots.
    batch_sizes [M] int64: the measured B, ascending (1 and Bmax included).
    samples [M, repeats] fp64: every timed repeat, seconds.
    raw_seconds [M] fp64: median step time at each measured B.
    cleaned_seconds [M] fp64: isotonic fit of raw_seconds (non-decreasing).
    seconds [Bmax+1] fp64: cleaned step time for every B, interpolated
    between measured B; seconds[0] is nan (no batch of 0 tokens is run).
    """

    sps: torch.Tensor
    raw_sps: torch.Tensor
    batch_sizes: torch.Tensor
    samples: torch.Tensor
    raw_seconds: torch.Tensor
    cleaned_seconds: torch.Tensor
    seconds: torch.Tensor

    @property
    def max_batch(self) -> int:
        return self.sps.shape[0] - 1


def isotonic_increasing(values, weights=None) -> torch.Tensor:
    """ŷ = argmin_{ŷ_1 <= ... <= ŷ_n} Σ_i w_i (y_i - ŷ_i)², by pool adjacent violators.

    Scanning left to right, each new value starts a block; while the last
    block's weighted mean is below the one before it the two are pooled (the
    pooled mean is their weighted mean). Every block ends up at its mean.
    O(n) amortised. values [n] real; weights [n] positive or None (all 1).
    Returns [n] fp64 on the CPU.
    """
    y = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1)
    if weights is None:
        w = torch.ones_like(y)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
        if w.shape != y.shape:
            raise ValueError(f"weights must have the shape of values {tuple(y.shape)}, got {tuple(w.shape)}")
        if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
            raise ValueError("weights must be finite and > 0")
    if not bool(torch.isfinite(y).all()):
        raise ValueError("values must be finite")
    means: list[float] = []
    masses: list[float] = []
    sizes: list[int] = []
    for value, weight in zip(y.tolist(), w.tolist()):
        means.append(value)
        masses.append(weight)
        sizes.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            mass = masses[-2] + masses[-1]
            mean = (means[-2] * masses[-2] + means[-1] * masses[-1]) / mass
            size = sizes[-2] + sizes[-1]
            del means[-1], masses[-1], sizes[-1]
            means[-1], masses[-1], sizes[-1] = mean, mass, size
    out = [mean for mean, size in zip(means, sizes) for _ in range(size)]
    return torch.tensor(out, dtype=torch.float64)


def sps_from_seconds(seconds: torch.Tensor) -> torch.Tensor:
    """sps[0] = 0, sps[B] = 1 / seconds[B]: the scheduler table from per-B step times.

    seconds [Bmax+1] (entry 0 ignored; entries 1.. finite and > 0).
    Returns [Bmax+1] fp32.
    """
    t = torch.as_tensor(seconds, dtype=torch.float64).detach().cpu().reshape(-1)
    if t.numel() < 2:
        raise ValueError("seconds must cover at least B = 0 and B = 1")
    body = t[1:]
    if not bool(torch.isfinite(body).all()) or not bool((body > 0).all()):
        raise ValueError("step times for B >= 1 must be finite and > 0")
    return torch.cat([torch.zeros(1, dtype=torch.float64), 1.0 / body]).to(torch.float32)


def profile_sps(
    step: Callable[[int], object],
    max_batch: int,
    *,
    device=None,
    warmup: int = 2,
    repeats: int = 5,
    batch_sizes: Sequence[int] | None = None,
    timer: Callable[[], float] | None = None,
) -> SPSProfile:
    """Measure t(B) = median step time for each B, clean it, and return sps[B] = 1 / t̂(B).

    step(B) runs one target forward over a verify batch of B tokens (its
    return value is ignored). For each measured B, in ascending order, step
    is called ``warmup`` times untimed (kernels and allocations for that
    shape settle), then ``repeats`` times timed.

    device: where step runs; None means CUDA when available, else CPU. On a
    CUDA device without ``timer`` each repeat is bracketed by CUDA events on
    the current stream and read after one synchronize; otherwise the host
    clock (``timer``, default time.perf_counter, in seconds) is read around
    each call, with a device synchronize on both sides when on CUDA.
    batch_sizes: the B to measure (default all of 1..Bmax); 1 and Bmax are
    always added, so every B in between can be interpolated.

    Cleaning: isotonic (non-decreasing) regression of the medians over the
    measured B, then linear interpolation of step time onto every B.
    Returns :class:`SPSProfile`; its ``sps`` is schedule_verify's table.
    """
    if not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    sizes = _measured_sizes(batch_sizes, max_batch)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is CUDA but torch.cuda is not available")

    samples = []
    for b in sizes:
        for _ in range(warmup):
            step(b)
        if dev.type == "cuda" and timer is None:
            samples.append(_time_cuda_events(step, b, repeats, dev))
        else:
            samples.append(_time_host(step, b, repeats, dev, timer or time.perf_counter))
    samples_t = torch.tensor(samples, dtype=torch.float64)
    raw = torch.tensor([statistics.median(row) for row in samples], dtype=torch.float64)
    if not bool(torch.isfinite(raw).all()) or not bool((raw > 0).all()):
        bad = [b for b, t in zip(sizes, raw.tolist()) if not (t > 0 and t < float("inf"))]
        raise ValueError(f"median step time must be finite and > 0; got non-positive or non-finite times at B = {bad}")
    cleaned = isotonic_increasing(raw)
    sizes_t = torch.tensor(sizes, dtype=torch.int64)
    seconds = _interpolate(sizes_t, cleaned, max_batch)
    raw_seconds_all = _interpolate(sizes_t, raw, max_batch)
    return SPSProfile(
        sps=sps_from_seconds(seconds),
        raw_sps=sps_from_seconds(raw_seconds_all),
        batch_sizes=sizes_t,
        samples=samples_t,
        raw_seconds=raw,
        cleaned_seconds=cleaned,
        seconds=seconds,
    )


def plot_sps(profile: SPSProfile, path, *, title: str | None = None):
    """Write a PNG of SPS(B) and step time t(B), raw and cleaned, against B.

    Two panels: steps per second (the scheduler table) and step time in ms;
    measured B are marked, interpolated B drawn as lines. Returns the path
    written. Needs matplotlib.
    """
    if not isinstance(profile, SPSProfile):
        raise TypeError("profile must be an SPSProfile")
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=(10, 4), dpi=100)
    canvas_cls(fig)
    ax_sps, ax_time = fig.subplots(1, 2)
    every_b = list(range(1, profile.max_batch + 1))
    measured = profile.batch_sizes.tolist()

    ax_sps.plot(every_b, profile.raw_sps[1:].tolist(), color="tab:red", linewidth=1, alpha=0.7, label="raw")
    ax_sps.plot(every_b, profile.sps[1:].tolist(), color="tab:blue", linewidth=1.6, label="cleaned (isotonic)")
    ax_sps.scatter(measured, (1.0 / profile.raw_seconds).tolist(), color="tab:red", s=12, zorder=3, label="measured")
    ax_sps.set_xlabel("verify batch B (tokens)")
    ax_sps.set_ylabel("steps per second")
    ax_sps.set_title("SPS(B)")
    ax_sps.legend(fontsize=8)

    ax_time.plot(measured, (profile.raw_seconds * 1e3).tolist(), color="tab:red", marker="o", markersize=3,
                 linewidth=1, alpha=0.7, label="raw median")
    ax_time.plot(every_b, (profile.seconds[1:] * 1e3).tolist(), color="tab:blue", linewidth=1.6,
                 label="cleaned (isotonic)")
    ax_time.set_xlabel("verify batch B (tokens)")
    ax_time.set_ylabel("step time (ms)")
    ax_time.set_title("t(B)")
    ax_time.legend(fontsize=8)

    fig.suptitle(title or f"SPS profile, Bmax = {profile.max_batch}", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png")
    return path


def _measured_sizes(batch_sizes, max_batch: int) -> list[int]:
    """Sorted unique B to measure, with 1 and Bmax added so interpolation covers 1..Bmax."""
    if batch_sizes is None:
        return list(range(1, max_batch + 1))
    sizes = set()
    for b in batch_sizes:
        b_int = int(b)
        if b_int != b or not 1 <= b_int <= max_batch:
            raise ValueError(f"batch_sizes must be integers in 1..{max_batch}, got {b!r}")
        sizes.add(b_int)
    sizes.update((1, max_batch))
    return sorted(sizes)


def _time_cuda_events(step, b: int, repeats: int, dev: torch.device) -> list[float]:
    """Seconds per repeat from CUDA event pairs; one synchronize at the end so the queue stays full."""
    with torch.cuda.device(dev):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize(dev)
        for start, end in events:
            start.record()
            step(b)
            end.record()
        torch.cuda.synchronize(dev)
        return [start.elapsed_time(end) / 1e3 for start, end in events]


def _time_host(step, b: int, repeats: int, dev: torch.device, clock) -> list[float]:
    """Seconds per repeat from a host clock; on CUDA the device is drained on both sides of each call."""
    sync = dev.type == "cuda"
    out = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize(dev)
        start = clock()
        step(b)
        if sync:
            torch.cuda.synchronize(dev)
        out.append(float(clock() - start))
    return out


def _interpolate(sizes: torch.Tensor, seconds: torch.Tensor, max_batch: int) -> torch.Tensor:
    """Piecewise-linear step time at every B = 1..Bmax through the measured points; [Bmax+1], index 0 nan."""
    out = torch.full((max_batch + 1,), float("nan"), dtype=torch.float64)
    xs = sizes.tolist()
    ys = seconds.tolist()
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        for b in range(x0, x1):
            out[b] = y0 + (y1 - y0) * (b - x0) / (x1 - x0)
    out[xs[-1]] = ys[-1]
    return out


def _matplotlib():
    """Figure and Agg canvas classes, without pyplot so no global backend state is touched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg
