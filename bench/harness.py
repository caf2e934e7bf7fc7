"""Shared benchmark harness: timing, floor model, providers, JSON and table output.

A benchmark script describes *cases* (one op at one shape, with a function
that builds its inputs and the op's byte/FLOP floor) and *providers* (named
implementations: our backends, the reference eager and compiled, external
peers). ``run_benchmark`` times every provider on every case and returns a
JSON-ready report; ``format_table`` renders it as text.

Timing. Each provider is called once on input set 0 (untimed except as
``first_call_ms``: it includes torch.compile / Triton JIT), then ``warmup``
more times, then ``iters`` timed calls. On CUDA every timed call sits between
two CUDA events on the current stream and the report gives the median (and
p10/p90) of those per-call times; the events measure device time, plus any
idle gap while the host is still launching, which is real cost for
launch-bound ops. Calls rotate over several copies of the inputs whose total
size exceeds ~2.4x the L2 cache (50 MB on H100 -> >= 120 MB), so an input
cannot stay L2-resident from the previous call and flatter the result; the
count of copies is capped (``--max-copies``). On CPU time.perf_counter
replaces the events; CPU numbers are a smoke test only.

Floor. floor_us = max(bytes / bandwidth, flops / flop_rate), with the peaks
taken from the device name (H100: 3.0e12 B/s, 800e12 FLOP/s bf16; H200:
4.3e12 B/s measured device-to-device copy, 790e12 FLOP/s). ``flops`` counts
tensor-core matmul work only; elementwise exp/compare work is far below the
bandwidth term for these ops. On any other device the floor is still computed,
with deliberately high default peaks so that it stays a lower bound, and is
marked "n/a (unknown device)".

Providers. ``external=True`` marks a peer library (FlashInfer): any exception
it raises, at import, in prepare or in a call (an API that changed between
versions, a JIT build failure), makes it "unavailable" with the reason and a
traceback tail in the JSON instead of an error of the run. A provider's
callable may carry ``extra_timing(sets, cfg) -> dict``, run after the timed
calls, whose numbers are added to its record (``GraphReplay`` uses it for
back-to-back replay time).

Report. Per case: params (the shapes), floor {bytes, flops, floor_us, bound},
and per provider median / p10 / p90 / mean / min in us, percent_of_floor
(floor / median x 100), time_ratio_to_fastest, speedup_over_reference_eager,
tokens_match_reference; time_ratios[a][b] = median_a / median_b for every
pair of providers that ran. meta holds the device, torch / triton / CUDA
versions, git commit (and whether the tree was dirty), date, argv, peaks.

Smoke mode (``--smoke``): the smallest shapes, few calls, Triton through its
interpreter on CPU (TRITON_INTERPRET=1 is set when triton is not yet
imported) and torch.compile with the "aot_eager" backend on CPU (Dynamo
tracing without Inductor's C++ build, which takes ~25 s per case on 2 cores).
It checks that a script runs end to end; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

REFERENCE_EAGER = "reference-eager"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Peak numbers per device family, matched against torch.cuda.get_device_name.
# H200 is checked first only for clarity; neither name contains the other.
KNOWN_PEAKS = (
    ("H200", 4.3e12, 790e12, "H200: 4.3e12 B/s measured device-to-device copy, 790e12 FLOP/s dense bf16"),
    ("H100", 3.0e12, 800e12, "H100: ~3.0e12 B/s achievable HBM3, 800e12 FLOP/s dense bf16"),
)
# Unknown GPU or CPU: about B200 datasheet peaks (8 TB/s HBM3e, 2.25 PFLOP/s
# dense bf16), above every current device, so the floor never overstates.
DEFAULT_BANDWIDTH = 8.0e12
DEFAULT_FLOP_RATE = 2.25e15
FLOOR_UNKNOWN = "n/a (unknown device)"

# H100 L2 is 50 MB; used when the device does not report its L2 size.
DEFAULT_L2_BYTES = 50 * 1024 * 1024
# Rotated input copies must total > 2x L2; 2.4x gives 120 MB on a 50 MB L2.
ROTATE_L2_FACTOR = 2.4
DEFAULT_MAX_COPIES = 64


class ProviderUnavailable(RuntimeError):
    """Raised by a provider factory when it cannot run here (reported as skipped)."""


@dataclass
class Peaks:
    """Bandwidth and FLOP rate used for the floor, and where they come from."""

    bandwidth: float  # bytes / s
    flop_rate: float  # FLOP / s
    known: bool
    source: str

    def as_json(self) -> dict:
        return {
            "bandwidth_bytes_per_s": self.bandwidth,
            "flop_rate_per_s": self.flop_rate,
            "known_device": self.known,
            "floor_status": "ok" if self.known else FLOOR_UNKNOWN,
            "source": self.source,
        }


@dataclass
class Case:
    """One op at one shape.

    make_inputs() builds input set 0 (a dict of tensors and plain values) on
    the benchmark device; the harness clones it for the rotation copies.
    floor_bytes / floor_flops are the fewest bytes moved and matmul FLOPs any
    implementation needs. resident_bytes is what one call really touches (for
    sizing the rotation); None means the sum of the input tensors' sizes.
    extract(out) returns the tokens compared across providers; summarize(out)
    returns a dict of output statistics recorded once per case.
    """

    op: str
    name: str
    params: dict
    make_inputs: Callable[[], dict]
    floor_bytes: int
    floor_flops: int
    resident_bytes: int | None = None
    extract: Callable[[Any], torch.Tensor] | None = None
    summarize: Callable[[Any], dict] | None = None
    floor_note: str = ""


@dataclass
class Provider:
    """A named implementation of an op.

    factory(case) returns a callable taking one (prepared) input set, or
    raises ProviderUnavailable / ImportError to be reported as skipped.
    prepare(inputs) runs once per input set outside the timed region (for
    layout a peer needs that an engine would already hold). comparable says
    whether its tokens should equal the reference's (same seeds, same RNG).
    external: a peer library whose failures (ImportError, an API mismatch, a
    JIT build error) are recorded as status "unavailable" with the reason.
    """

    name: str
    factory: Callable[[Case], Callable[[dict], Any]]
    note: str = ""
    comparable: bool = True
    prepare: Callable[[dict], dict] | None = None
    external: bool = False  # peer library: any failure means "unavailable", not an error of the run


@dataclass
class RunConfig:
    device: torch.device
    warmup: int
    iters: int
    max_copies: int = DEFAULT_MAX_COPIES
    rotate_bytes: int | None = None  # None: ROTATE_L2_FACTOR x L2 on CUDA, 0 on CPU
    verbose: bool = True
    extra_meta: dict = field(default_factory=dict)
    smoke: bool = False
    compile_backend: str = "inductor"
    peaks: "Peaks | None" = None  # given on the command line (--bandwidth, --flop-rate): used for the floor
    out: str | None = None  # JSON report path, rewritten after every case so a killed run keeps what ran


# --------------------------------------------------------------------------- environment


def device_peaks(device: torch.device) -> Peaks:
    """Peaks for the floor, from the device name; high defaults when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, bandwidth, flop_rate, source in KNOWN_PEAKS:
            if key in name:
                return Peaks(bandwidth, flop_rate, True, source)
        label = f"unknown GPU {name!r}"
    else:
        label = f"device type {device.type!r}"
    return Peaks(
        DEFAULT_BANDWIDTH,
        DEFAULT_FLOP_RATE,
        False,
        f"{label}: floor computed with conservative defaults ({DEFAULT_BANDWIDTH:.2e} B/s, "
        f"{DEFAULT_FLOP_RATE:.2e} FLOP/s, about B200 peaks) so it stays a lower bound; not meaningful here",
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} logical cores)"


def l2_bytes(device: torch.device) -> int | None:
    """L2 size of a CUDA device, DEFAULT_L2_BYTES if unreported, None on CPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    size = getattr(props, "L2_cache_size", 0) or 0
    return int(size) if size > 0 else DEFAULT_L2_BYTES


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """HEAD's hash; else DSPARK_GIT_COMMIT (a copied tree without .git, as on the GPU machine); else "unknown"."""
    out = _git("rev-parse", "HEAD")
    commit = out.stdout.strip() if out is not None else ""
    if out is not None and out.returncode == 0 and commit:
        return commit
    return os.environ.get("DSPARK_GIT_COMMIT", "").strip() or "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (None when git cannot tell)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    if out is None or out.returncode != 0:
        return None
    return bool(out.stdout.strip())


def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return getattr(triton, "__version__", "unknown")


def environment(cfg: RunConfig, peaks: Peaks) -> dict:
    return {
        "device": device_name(cfg.device),
        "device_type": cfg.device.type,
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton_version": triton_version(),
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "peaks": peaks.as_json(),
        "l2_bytes": l2_bytes(cfg.device),
        "warmup": cfg.warmup,
        "iters": cfg.iters,
        "max_copies": cfg.max_copies,
        "smoke": cfg.smoke,
        "compile_backend": cfg.compile_backend,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "timing": (
            "median of per-call CUDA event times" if cfg.device.type == "cuda"
            else "median of per-call time.perf_counter times (CPU smoke test, not a performance number)"
        ),
        **cfg.extra_meta,
    }


# --------------------------------------------------------------------------- inputs


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors in a (nested) dict / list / tuple."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def clone_inputs(obj: Any) -> Any:
    """Deep copy of the tensors in a nested structure; other values are shared."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clone_inputs(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clone_inputs(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_inputs(v) for v in obj)
    return obj


def rotation_copies(resident: int, cfg: RunConfig) -> int:
    """How many input copies make the rotation exceed the L2-busting target."""
    target = cfg.rotate_bytes
    if target is None:
        l2 = l2_bytes(cfg.device)
        target = int(ROTATE_L2_FACTOR * l2) if l2 else 0
    if target <= 0 or resident <= 0:
        return 1
    return max(1, min(cfg.max_copies, math.ceil(target / resident)))


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[dict], Any], sets: Sequence[dict], warmup: int, iters: int,
               device: torch.device, start: int = 0) -> list[float]:
    """Per-call times in microseconds of fn over the rotating input sets.

    The rotation continues from index ``start`` so that warm-up and timed
    calls keep cycling through all copies.
    """
    n = len(sets)
    for i in range(warmup):
        fn(sets[(start + i) % n])
    _sync(device)
    first = start + warmup
    if device.type == "cuda":
        begin = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        end = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            inputs = sets[(first + i) % n]
            begin[i].record()
            fn(inputs)
            end[i].record()
        torch.cuda.synchronize(device)
        return [b.elapsed_time(e) * 1e3 for b, e in zip(begin, end)]
    times = []
    for i in range(iters):
        inputs = sets[(first + i) % n]
        t0 = time.perf_counter()
        fn(inputs)
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def _skip_types() -> tuple[type, ...]:
    """Exceptions meaning "cannot run here" rather than "broken"."""
    types: list[type] = [ProviderUnavailable, ImportError]
    try:
        from dspark_kernels import BackendUnavailableError
    except ImportError:
        pass
    else:
        types.append(BackendUnavailableError)
    return tuple(types)


def _error_record(exc: BaseException) -> dict:
    frames = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {
        "status": "error",
        "reason": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
        "traceback": "".join(frames[-6:]),
    }


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------- running


def run_provider(provider: Provider, case: Case, sets: list[dict], cfg: RunConfig,
                 reference_tokens: torch.Tensor | None) -> tuple[dict, Any]:
    """Time one provider on one case; never raises (errors become records)."""
    record: dict[str, Any] = {"note": provider.note} if provider.note else {}
    skip = _skip_types()
    out0 = None
    extra: dict = {}
    try:
        fn = provider.factory(case)
        prepared = [provider.prepare(s) for s in sets] if provider.prepare else sets
        _sync(cfg.device)
        t0 = time.perf_counter()
        out0 = fn(prepared[0])
        _sync(cfg.device)
        first_ms = (time.perf_counter() - t0) * 1e3
        times = time_calls(fn, prepared, cfg.warmup, cfg.iters, cfg.device, start=1)
        hook = getattr(fn, "extra_timing", None)
        if hook is not None:
            extra = dict(hook(prepared, cfg))
    except skip as exc:
        record.update(status="skipped", reason=_first_line(exc))
        return record, None
    except Exception as exc:  # a broken provider must not stop the other providers
        if provider.external:
            # A peer library that fails here (API changed between versions, JIT build
            # failure, unsupported shape) is unavailable, not a failure of our code.
            record.update(_error_record(exc))
            record["status"] = "unavailable"
        else:
            record.update(_error_record(exc))
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        return record, None
    arr = np.asarray(times, dtype=np.float64)
    record.update(
        status="ok",
        median_us=float(np.median(arr)),
        p10_us=float(np.percentile(arr, 10)),
        p90_us=float(np.percentile(arr, 90)),
        mean_us=float(arr.mean()),
        min_us=float(arr.min()),
        n_timed=int(arr.size),
        first_call_ms=first_ms,
        **extra,
    )
    if case.extract is not None and provider.comparable:
        tokens = case.extract(out0).detach().to("cpu")
        if provider.name == REFERENCE_EAGER:
            record["tokens_match_reference"] = 1.0
        elif reference_tokens is not None and reference_tokens.shape == tokens.shape:
            record["tokens_match_reference"] = float((tokens == reference_tokens).float().mean()) if tokens.numel() else 1.0
        else:
            record["tokens_match_reference"] = None
    else:
        record["tokens_match_reference"] = None
    return record, out0


class GraphReplay:
    """Callable that captures ``fn(inputs)`` into a CUDA graph once and then replays it.

    The first call warms ``fn`` up on a side stream (Triton JIT, cuBLAS
    handles, allocator), captures one call on the inputs it was given, replays
    the graph once and returns the graph's static outputs. Every later call
    replays the same graph, whatever inputs it is handed: the graph reads the
    buffers it was captured on, as an engine's graph reads its static buffers.
    Timed per call between CUDA events, that is replay latency;
    ``extra_timing`` adds the back-to-back time (N replays between two events,
    divided by N), the cost when the host queues replays ahead of the GPU.
    """

    def __init__(self, fn: Callable[[dict], Any], warmup: int = 3):
        self.fn = fn
        self.warmup = warmup
        self.graph = None
        self.out = None

    def __call__(self, inputs: dict) -> Any:
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(inputs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.fn(inputs)
            self.graph = graph
        self.graph.replay()
        return self.out

    def extra_timing(self, sets: Sequence[dict], cfg: RunConfig) -> dict:
        n = max(1, cfg.iters)
        begin = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(cfg.device)
        begin.record()
        for _ in range(n):
            self.graph.replay()
        end.record()
        torch.cuda.synchronize(cfg.device)
        return {"graph_back_to_back_us": begin.elapsed_time(end) * 1e3 / n, "graph_back_to_back_n": n}


def _floor(case: Case, peaks: Peaks) -> dict:
    t_bytes = case.floor_bytes / peaks.bandwidth
    t_flops = case.floor_flops / peaks.flop_rate
    floor = {
        "bytes": int(case.floor_bytes),
        "flops": int(case.floor_flops),
        "bandwidth_bytes_per_s": peaks.bandwidth,
        "flop_rate_per_s": peaks.flop_rate,
        "floor_us": max(t_bytes, t_flops) * 1e6,
        "bound": "memory" if t_bytes >= t_flops else "compute",
        "status": "ok" if peaks.known else FLOOR_UNKNOWN,
    }
    if case.floor_note:
        floor["note"] = case.floor_note
    return floor


def _compare(records: dict[str, dict], floor_us: float) -> dict:
    """Adds percent_of_floor and ratios to each ok record; returns the time-ratio matrix.

    time_ratios[a][b] = median_a / median_b (below 1: a is faster than b).
    """
    ok = {name: r["median_us"] for name, r in records.items() if r.get("status") == "ok"}
    fastest = min(ok, key=ok.get) if ok else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    ref = ok.get(REFERENCE_EAGER)
    for name, median in ok.items():
        r = records[name]
        r["percent_of_floor"] = None if (p := ratio(floor_us, median)) is None else p * 100.0
        r["time_ratio_to_fastest"] = ratio(median, ok[fastest])
        r["speedup_over_reference_eager"] = ratio(ref, median)
    matrix = {a: {b: ratio(ok[a], ok[b]) for b in ok if b != a} for a in ok}
    return {"fastest": fastest, "time_ratios": matrix}


def run_case(case: Case, providers: Sequence[Provider], cfg: RunConfig, peaks: Peaks) -> dict:
    if cfg.verbose:
        print(f"[{case.op}] {case.name}", flush=True)
    base = case.make_inputs()
    resident = case.resident_bytes if case.resident_bytes is not None else tensor_bytes(base)
    copies = rotation_copies(resident, cfg)
    sets = [base] + [clone_inputs(base) for _ in range(copies - 1)]
    floor = _floor(case, peaks)
    records: dict[str, dict] = {}
    reference_tokens = None
    output_stats = None
    for provider in providers:
        record, out0 = run_provider(provider, case, sets, cfg, reference_tokens)
        records[provider.name] = record
        if out0 is not None and provider.comparable:
            if provider.name == REFERENCE_EAGER and case.extract is not None:
                reference_tokens = case.extract(out0).detach().to("cpu")
            if output_stats is None and case.summarize is not None:
                output_stats = {"from": provider.name, **case.summarize(out0)}
        del out0
        if cfg.verbose:
            print("   " + _one_line(provider.name, record, floor["floor_us"]), flush=True)
    comparison = _compare(records, floor["floor_us"])
    del sets, base
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "op": case.op,
        "name": case.name,
        "params": case.params,
        "floor": floor,
        "floor_us": floor["floor_us"],
        "floor_bytes": floor["bytes"],
        "floor_flops": floor["flops"],
        "input_copies": copies,
        "resident_bytes_per_copy": int(resident),
        "providers": records,
        "fastest": comparison["fastest"],
        "time_ratios": comparison["time_ratios"],
        "output_stats": output_stats,
    }


def run_benchmark(op: str, cases: Sequence[Case], providers: Sequence[Provider], cfg: RunConfig) -> dict:
    """Run every provider on every case; returns the JSON-ready report.

    With cfg.out the report is rewritten there after every case (complete
    cases only), so a run killed at a time limit keeps the cases it finished.
    """
    peaks = cfg.peaks or device_peaks(cfg.device)
    report = {
        "schema": "dspark-bench/1",
        "op": op,
        "meta": environment(cfg, peaks),
        "providers": {p.name: {"note": p.note, "comparable": p.comparable} for p in providers},
        "cases": [],
    }
    for case in cases:
        report["cases"].append(run_case(case, providers, cfg, peaks))
        _tally(report)
        if cfg.out:
            write_json(report, cfg.out)
    _tally(report)
    return report


def _tally(report: dict) -> None:
    """report["errors"] / ["unavailable"]: one line per provider record with that status."""
    report["errors"] = [
        f"{c['name']} / {name}: {r['reason']}"
        for c in report["cases"] for name, r in c["providers"].items() if r.get("status") == "error"
    ]
    report["unavailable"] = [
        f"{c['name']} / {name}: {r['reason']}"
        for c in report["cases"] for name, r in c["providers"].items() if r.get("status") == "unavailable"
    ]


# --------------------------------------------------------------------------- output


def _fmt_us(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 10:
        return f"{x:.3g}"  # keeps sub-microsecond floors readable
    return f"{x:.1f}" if x < 1e4 else f"{x:.3g}"


def _one_line(name: str, r: dict, floor_us: float) -> str:
    if r.get("status") != "ok":
        return f"{name:<22} {r.get('status')}: {r.get('reason', '')}"
    return (f"{name:<22} median {_fmt_us(r['median_us'])} us  (p10 {_fmt_us(r['p10_us'])}, "
            f"p90 {_fmt_us(r['p90_us'])})  floor {_fmt_us(floor_us)} us")


def format_table(report: dict) -> str:
    """Plain-text table: one row per case and provider (skips and errors give their reason)."""
    meta = report["meta"]
    lines = [
        f"{report['op']} on {meta['device']} | torch {meta['torch_version']} | triton "
        f"{meta['triton_version']} | commit {meta['git_commit'][:12]} | {meta['date']}",
        f"floor: {meta['peaks']['floor_status']}; {meta['peaks']['source']}",
        f"timing: {meta['timing']}",
        "x_fastest = median / fastest median; ref_speedup = reference-eager median / median; "
        "tok_match = fraction of tokens equal to reference-eager's",
    ]
    header = ("case", "provider", "median_us", "p10_us", "p90_us", "floor_us", "%floor", "x_fastest",
              "ref_speedup", "tok_match")
    table: list[tuple] = []
    for case in report["cases"]:
        for name, r in case["providers"].items():
            if r.get("status") != "ok":
                table.append((case["name"], name, f"{r.get('status')}: {r.get('reason', '')[:100]}"))
                continue
            match = r.get("tokens_match_reference")
            speed = r.get("speedup_over_reference_eager")
            pct = r.get("percent_of_floor")
            fast = r.get("time_ratio_to_fastest")
            table.append((
                case["name"], name, _fmt_us(r["median_us"]), _fmt_us(r["p10_us"]), _fmt_us(r["p90_us"]),
                _fmt_us(case["floor_us"]), "-" if pct is None else f"{pct:.3g}", "-" if fast is None else f"{fast:.2f}",
                "-" if speed is None else f"{speed:.2f}", "-" if match is None else f"{match:.3f}",
            ))
    full = [header] + [row for row in table if len(row) == len(header)]
    widths = [max(len(row[i]) for row in full) for i in range(len(header))]
    widths[0] = max([widths[0]] + [len(row[0]) for row in table])
    widths[1] = max([widths[1]] + [len(row[1]) for row in table])
    for row in [header] + table:
        lines.append("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)).rstrip())
    if report.get("errors"):
        lines.append("ERRORS:")
        lines.extend(f"  {e}" for e in report["errors"])
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")


# --------------------------------------------------------------------------- CLI


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


REPORT_EPILOG = """\
Output: a table on stdout (one row per case and provider: median, p10, p90,
floor, %floor, ratio to the fastest, speedup over reference-eager, fraction of
tokens equal to reference-eager's; skipped / unavailable providers with the
reason) and, with --out, a JSON report: meta (device, torch / triton / CUDA
versions, git commit and dirty flag, date, argv, peaks used for the floor),
providers, and per case its params (shapes), floor {bytes, flops, floor_us,
bound}, per-provider records (status, median_us, p10_us, p90_us, mean_us,
percent_of_floor, time_ratio_to_fastest, speedup_over_reference_eager, ...)
and time_ratios[a][b] = median_a / median_b for every pair. The exit status
is 1 when a provider of ours failed (status "error"), else 0.
"""


def common_parser(description: str) -> argparse.ArgumentParser:
    """Flags shared by every benchmark script; description is printed verbatim by --help."""
    p = argparse.ArgumentParser(description=description, epilog=REPORT_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="PATH.json", help="write the JSON report here")
    p.add_argument("--smoke", action="store_true",
                   help="smoke test: one or two tiny cases, few calls, Triton interpreted and torch.compile "
                        "with backend aot_eager on CPU; checks the script end to end, numbers mean nothing")
    p.add_argument("--quick", action="store_true", help="tiny shapes, all of the quick grid (CPU-friendly)")
    p.add_argument("--providers", help="comma list of provider names to run (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    p.add_argument("--warmup", type=int,
                   help="warm-up calls after the first (default 10 on CUDA, 1 on CPU; --smoke: 2 / 0)")
    p.add_argument("--iters", type=int, help="timed calls (default 50 on CUDA, 3 on CPU; --smoke: 5 / 2)")
    p.add_argument("--max-copies", type=int, default=DEFAULT_MAX_COPIES,
                   help=f"cap on rotated input copies (default {DEFAULT_MAX_COPIES})")
    p.add_argument("--rotate-mb", type=float,
                   help="total size the rotated input copies must exceed, in MB "
                        f"(default {ROTATE_L2_FACTOR}x L2 on CUDA, 0 on CPU)")
    p.add_argument("--compile-backend",
                   help='torch.compile backend of the reference-compiled provider (default "inductor"; '
                        '"aot_eager" with --smoke on CPU)')
    p.add_argument("--exclude-providers",
                   help="comma list of provider names or fnmatch patterns to leave out (e.g. 'flashinfer*')")
    p.add_argument("--bandwidth", type=float, metavar="BYTES_PER_S",
                   help="memory bandwidth for the floor (default: from the device name); bench.gpu_proof passes "
                        "the device-to-device copy rate it measured")
    p.add_argument("--flop-rate", type=float, metavar="FLOP_PER_S",
                   help="matmul rate for the floor (default: from the device name); bench.gpu_proof passes the "
                        "bf16 matmul rate it measured")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    return p


# torch.compile backend used by compiled(); run_config sets it from the flags.
_COMPILE = {"backend": "inductor"}


def _enable_triton_interpreter() -> None:
    """TRITON_INTERPRET=1 for a CPU run, if triton has not been imported yet (it reads it at import)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    if "triton" in sys.modules:
        return
    os.environ["TRITON_INTERPRET"] = "1"


def run_config(args: argparse.Namespace, extra_meta: dict | None = None) -> RunConfig:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    on_cuda = device.type == "cuda"
    smoke = bool(getattr(args, "smoke", False))
    if smoke and not on_cuda:
        _enable_triton_interpreter()
    if smoke:
        warmup, iters = (2, 5) if on_cuda else (0, 2)
    else:
        warmup, iters = (10, 50) if on_cuda else (1, 3)
    backend = getattr(args, "compile_backend", None) or ("aot_eager" if smoke and not on_cuda else "inductor")
    _COMPILE["backend"] = backend
    peaks = None
    bandwidth, flop_rate = getattr(args, "bandwidth", None), getattr(args, "flop_rate", None)
    if bandwidth is not None or flop_rate is not None:
        base = device_peaks(device)
        for flag, value in (("--bandwidth", bandwidth), ("--flop-rate", flop_rate)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise SystemExit(f"{flag} must be a positive number, got {value}")
        peaks = Peaks(
            bandwidth if bandwidth is not None else base.bandwidth,
            flop_rate if flop_rate is not None else base.flop_rate,
            True,
            "given on the command line (measured on this machine by bench.gpu_proof when it runs the benchmark): "
            f"{bandwidth if bandwidth is not None else base.bandwidth:.3e} B/s, "
            f"{flop_rate if flop_rate is not None else base.flop_rate:.3e} FLOP/s",
        )
    return RunConfig(
        device=device,
        warmup=args.warmup if args.warmup is not None else warmup,
        iters=args.iters if args.iters is not None else iters,
        max_copies=args.max_copies,
        rotate_bytes=None if args.rotate_mb is None else int(args.rotate_mb * 1e6),
        verbose=not args.quiet,
        extra_meta=dict(extra_meta or {}),
        smoke=smoke,
        compile_backend=backend,
        peaks=peaks,
        out=getattr(args, "out", None),
    )


def shape_grid(args: argparse.Namespace, flag: str, full: list, quick: list, smoke: list) -> list:
    """The value list of one grid axis: the flag if given, else the smoke / quick / full default."""
    given = getattr(args, flag, None)
    if given:
        return list(given)
    if getattr(args, "smoke", False):
        return list(smoke)
    if getattr(args, "quick", False):
        return list(quick)
    return list(full)


def available_backend(op_backends, backend: str, device_type: str) -> None:
    """Raises ProviderUnavailable (with the reason) unless ``backend`` is in op_backends.available()."""
    if backend in op_backends.available(device_type):
        return
    why = op_backends.missing(backend, device_type) or f"{backend} not available for {op_backends.name}"
    raise ProviderUnavailable(why)


def public_op_provider(op_module: str, backend: str, call):
    """Provider factory for ``dspark_kernels.<op>(..., backend=backend)``.

    ``call(x, backend, case)`` runs the public op on the inputs dict x. The op
    module is imported when a case is built, not at import of the bench script,
    so that --smoke can set TRITON_INTERPRET before triton is imported.
    """

    def factory(case: Case):
        if backend != "reference":
            module = importlib.import_module(f"dspark_kernels.ops.{op_module}")
            available_backend(module.IMPLS, backend, case.params["device"])
        return lambda x: call(x, backend, case)

    return factory


def select_providers(providers: Sequence[Provider], spec: str | None, exclude: str | None = None) -> list[Provider]:
    """The providers named in a comma list, in the list's order (all when spec is empty),
    less those matching a comma list of names / fnmatch patterns in ``exclude``."""
    chosen = list(providers)
    if spec:
        by_name = {p.name: p for p in providers}
        names = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown provider(s) {unknown}; choose from {sorted(by_name)}")
        chosen = [by_name[n] for n in names]
    patterns = [s.strip() for s in (exclude or "").split(",") if s.strip()]
    return [p for p in chosen if not any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]


def finish(report: dict, args: argparse.Namespace, footer: str | None = None) -> dict:
    """Print the table (and footer), write the JSON if asked; returns the report."""
    print(format_table(report), flush=True)
    if footer:
        print(footer, flush=True)
    if args.out:
        write_json(report, args.out)
        print(f"wrote {args.out}", flush=True)
    return report


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn) for one case, after clearing Dynamo's caches.

    Every case compiles the same Python functions at new static shapes;
    without a reset the per-code-object recompile limit (8) would be reached
    after 8 cases and Dynamo would silently fall back to eager. The backend
    is the run's (--compile-backend; "inductor" unless a CPU smoke run).
    """
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=_COMPILE["backend"])


def graph_provider(eager_factory: Callable[[Case], Callable[[dict], Any]]):
    """Provider factory: what ``eager_factory`` calls, captured once in a CUDA graph and replayed (CUDA only)."""

    def factory(case: Case):
        if case.params["device"] != "cuda":
            raise ProviderUnavailable("CUDA graphs need a CUDA device")
        return GraphReplay(eager_factory(case))

    return factory


def compiled_reference(op_module: str, extra: Callable[[Case], dict] | None = None):
    """Provider factory: torch.compile of the op's reference implementation, called on its argument record
    built from the inputs dict (plus ``extra(case)``: keyword arguments that are not inputs, e.g. a mode).
    The public op is opaque to Dynamo (a custom op), so this is the compiled-PyTorch peer."""

    def factory(case: Case):
        spec = importlib.import_module(f"dspark_kernels.ops.{op_module}").OP
        fn = compiled(spec.impls.reference)
        fixed = extra(case) if extra is not None else {}
        return lambda x: fn(spec.record(**x, **fixed))

    return factory


def keyword_providers(op: str, note: str = "") -> list:
    """The usual providers of an op whose inputs dict is exactly its keyword arguments:
    reference-eager, reference-compiled, triton (``dspark_kernels.<op>(**x, backend=...)``) and, on CUDA,
    the two eager ones captured once in a CUDA graph and replayed ("+graph"). note: appended to each."""

    def public(backend: str):
        def call(x: dict, backend: str, case: Case):
            import dspark_kernels as dk

            return getattr(dk, op)(**x, backend=backend)

        return public_op_provider(op, backend, call)

    graph = "public op captured once in a CUDA graph, then replayed; per-call time = one replay between CUDA events"
    tail = f"; {note}" if note else ""
    return [
        Provider(REFERENCE_EAGER, public("reference"), note=f'backend="reference"{tail}'),
        Provider("reference-compiled", compiled_reference(op),
                 note=f"torch.compile(dspark_kernels.reference.{op}.{op}){tail}"),
        Provider("triton", public("triton"), note=f'backend="triton"{tail}'),
        Provider(REFERENCE_EAGER + GRAPH_SUFFIX, graph_provider(public("reference")),
                 note=f'backend="reference"; {graph}{tail}'),
        Provider("triton" + GRAPH_SUFFIX, graph_provider(public("triton")), note=f'backend="triton"; {graph}{tail}'),
    ]


GRAPH_SUFFIX = "+graph"  # providers whose per-call time is one CUDA-graph replay


def goal_cases(report: dict, R: int, gamma: int) -> tuple[list, str | None]:
    """(the report's cases at R, γ, None), or ([], why a graph-replay goal there is not measured)."""
    cases = [c for c in report["cases"] if c["params"]["R"] == R and c["params"]["gamma"] == gamma]
    if not cases:
        return [], f"not measured: no case with R={R}, gamma={gamma} in this run"
    if report["meta"]["device_type"] != "cuda":
        return [], "not measured: CUDA graphs need a CUDA device"
    return cases, None


def best_graph_replay(case: dict) -> dict | None:
    """The fastest graph provider that ran in ``case``: {best_provider, replay_median_us, back_to_back_us,
    all: {provider: median_us}}, or None when no graph provider ran."""
    timed = {name: rec for name, rec in case["providers"].items()
             if name.endswith(GRAPH_SUFFIX) and rec.get("status") == "ok"}
    if not timed:
        return None
    best = min(timed, key=lambda name: timed[name]["median_us"])
    return {"best_provider": best, "replay_median_us": timed[best]["median_us"],
            "back_to_back_us": timed[best].get("graph_back_to_back_us"),
            "all": {name: rec["median_us"] for name, rec in timed.items()}}


def r_gamma_parser(description: str, full_r: list, full_gamma: list) -> argparse.ArgumentParser:
    """common_parser plus --R and --gamma comma lists (the shape grid of most ops)."""
    p = common_parser(description)
    p.add_argument("--R", type=int_list, help=f"comma list of request counts (default {full_r})")
    p.add_argument("--gamma", type=int_list, help=f"comma list of draft lengths (default {full_gamma})")
    return p


def bench_main(op: str, argv, parser: argparse.ArgumentParser, build_cases: Callable, providers: Callable,
               goal: tuple[Callable, Callable] | None = None) -> dict:
    """A benchmark script's main: parse, pick providers, run every case, add the goal (evaluate, describe)
    when given, print and write the report; returns it."""
    args = parser.parse_args(argv)
    cfg = run_config(args)
    chosen = select_providers(providers(), args.providers, args.exclude_providers)
    report = run_benchmark(op, build_cases(args, cfg.device), chosen, cfg)
    if goal is None:
        return finish(report, args)
    evaluate, describe = goal
    report["goal"] = evaluate(report)
    return finish(report, args, footer=describe(report["goal"]))


def exit_code(report: dict) -> int:
    """1 when a provider of ours failed (status "error"), else 0."""
    return 1 if report.get("errors") else 0
