"""The GPU proof run: build, test, benchmark and sanitize the package in one command.

    python -m bench.gpu_proof --out DIR [--commit HASH] [--wheels DIR]
    python -m bench.gpu_proof --dry-run --out DIR        # CPU, tiny shapes (CI runs this)

Made for a lent H100/H200 that is bare (torch 2.11+cu130, triton 3.6, nvcc
13, cmake, Python 3.12), has no internet and is held for minutes: the whole
run fits in --budget seconds (default 480) and the stages run in order of
value, each writing DIR as soon as it ends, so a run cut short still returns
what it did.

Stages (name: default budget in seconds; what it does):
  1 env        30  device (name, SMs, L2, memory, driver), versions (python,
                   torch, CUDA, triton, numpy, nvcc, cmake, compute-sanitizer,
                   flashinfer), commit; and the two ceilings measured on the
                   spot: a device-to-device copy of 2 x 2 GiB (bytes read plus
                   written over the median event time) and an 8192^3 bf16
                   matmul on random data (median of 10 after 3 warm-ups).
  2 build      150 DSPARK_BUILD_CUDA=1 python setup.py build_ext --inplace
                   (CMake, -j cores, sm_90a); if that fails, the same csrc/
                   sources through torch.utils.cpp_extension (ninja) as a
                   fallback; then loads _C.so and records each kernel's
                   registers / stack / shared / local bytes (cuobjdump).
                   Meanwhile one Triton call per headline op fills Triton's
                   cache, so stage 4 times kernels, not their compilation.
  3 tests      150 pytest -m gpu first (graph capture and replay, eager vs
                   replay, CUDA events, 128k contexts, no host sync), then the
                   rest of the suite on CUDA tensors (every Triton and CUDA
                   backend against the reference, bf16/fp16 bounds), with
                   pytest-xdist when present; one JSON line per test as it ends.
                   CI-only files (CPU compile checks, host emulation, this
                   script's dry run) are left out: CI runs them.
  4 headline   90  one benchmark per op at its headline shape, our
                   backends and the eager reference (FlashInfer, FlexAttention
                   and torch.compile JIT-compile for minutes: stage 6), floor
                   from the ceilings of stage 1.
  5 sanitizer  60  compute-sanitizer memcheck, then racecheck while time is
                   left, over bench/proof_kernels.py: every Triton and CUDA
                   kernel once on small odd shapes, each checked against the
                   reference.
  6 sps        90  the serving simulator's SPS table measured here (bench/sps_profile.py:
                   4 Llama-3.1-8B-shaped layers + LM head for every verify
                   batch B <= 64, then every 8th and both sides of each
                   multiple of 128 to 1024, one CUDA graph per B; the
                   attention's cost per cached token; the MTP-1 and DSpark
                   drafters per concurrency), then the simulator on that
                   table; the table goes into proof.json.
  7 grid       rest  the peers at the headline shapes (FlashInfer when
                   importable, FlexAttention, torch.compile of the reference),
                   rejection_sample with top-k/top-p, then each op's full grid,
                   one request count per command, as far as time allows.
A stage gets min(its budget, time left). ``--stages 1,3`` or names pick
stages; ``--stage-budget tests=200`` changes one budget.

Outputs in DIR (four files at most: the device tool returns at most eight):
  proof.json   meta (device, versions, commit, ceilings, budgets), every
               stage's status (pass, fail, timeout, skipped, not run), seconds,
               commands with exit codes and log tails, test outcomes, kernel
               resources, and the merged benchmark reports per op
  summary.md   the same as tables; printed last on stdout
  plots.png    median time vs batch size per provider beside the floor, one
               panel per op (benchmark stages that ran)
  logs.tar.gz  every command's full log, the per-test JSON lines and the raw
               benchmark JSON of every run
Exit status: 1 if a stage failed, else 0 (a timeout is reported, not failed).

No network: nothing here downloads. The only install is ``--wheels DIR``:
``pip install --no-index --no-deps --target`` from that local folder (e.g.
flashinfer-python and apache-tvm-ffi carried with the working tree); every
other step runs the working tree's own code with the machine's python.

--dry-run runs the same stages on CPU with tiny shapes: the ceilings on CPU
tensors, the build skipped with its reason, only ``pytest -m gpu`` (every
such test skips without a GPU; the rest of the suite is CI's own command),
``--smoke`` benchmarks with Triton interpreted, proof_kernels without the
sanitizer, a --smoke SPS table, and one grid command. tests/test_gpu_proof.py runs it.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("pass", "fail", "timeout", "skipped", "not run")
RESERVE_S = 5.0  # kept back from the last stage for writing the outputs


# --------------------------------------------------------------------------- running commands


@dataclass
class Ctx:
    """Everything a stage needs: paths, the clock, the child environment, results so far."""

    out: str
    work: str
    dry: bool
    deadline: float  # time.monotonic() by which everything must have ended
    env: dict
    jobs: int
    cuda: bool = False  # a GPU run (torch sees a GPU and this is not a dry run)
    stage_budget: float = 0.0  # seconds the running stage may take
    ceilings: dict = field(default_factory=dict)
    benchmarks: dict = field(default_factory=dict)  # op -> merged report
    commands: list = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_cmd(ctx: Ctx, name: str, cmd: list[str], limit: float, env: dict | None = None) -> dict:
    """Run cmd from the repository root for at most ``limit`` seconds (and the time left).

    Output goes to logs/<name>.log under the work folder. On timeout the whole
    process group is killed (SIGTERM, then SIGKILL after 5 s), so no child
    outlives its stage. Returns {name, cmd, rc (None if killed), seconds,
    timed_out, limit_s, log, tail}.
    """
    limit = max(0.0, min(limit, ctx.left() - RESERVE_S))
    if limit < 1.0:
        rec = {"name": name, "cmd": shlex.join(cmd), "limit_s": 0.0, "log": f"logs/{name}.log", "rc": None,
               "seconds": 0.0, "timed_out": False, "not_run": "no time left", "tail": ""}
        ctx.commands.append(rec)
        return rec
    return reap(ctx, spawn(ctx, name, cmd, env), limit)


def spawn(ctx: Ctx, name: str, cmd: list[str], env: dict | None = None) -> dict:
    """Start cmd in its own process group, output to logs/<name>.log; reap() waits for it."""
    rec = {"name": name, "cmd": shlex.join(cmd), "log": f"logs/{name}.log"}
    log_path = os.path.join(ctx.work, rec["log"])
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        log.write(f"$ {rec['cmd']}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**ctx.env, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    rec["_proc"], rec["_t0"] = proc, time.monotonic()
    return rec


def reap(ctx: Ctx, rec: dict, limit: float) -> dict:
    """Wait up to ``limit`` more seconds for a spawned command, then kill its group."""
    proc = rec.pop("_proc")
    limit = max(0.0, min(limit, ctx.left() - RESERVE_S))
    try:
        rc, timed_out = proc.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        rc, timed_out = None, True
    rec.update(rc=rc, seconds=round(time.monotonic() - rec.pop("_t0"), 2), timed_out=timed_out,
               limit_s=round(limit, 1), tail=_tail(os.path.join(ctx.work, rec["log"]), 1500))
    ctx.commands.append(rec)
    return rec


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: str, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _version_line(cmd: list[str], pick: int = -1) -> str | None:
    if shutil.which(cmd[0]) is None and not os.path.exists(cmd[0]):
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"error: {exc}"
    lines = [ln.strip() for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    return lines[pick] if lines else None


def _status_of(*recs: dict) -> str:
    if any(r.get("timed_out") for r in recs):
        return "timeout"
    if any(r.get("not_run") for r in recs):
        return "not run"
    return "pass" if all(r.get("rc") == 0 for r in recs) else "fail"


# --------------------------------------------------------------------------- stage 1: environment


def _time_ms(fn: Callable[[], object], warmup: int, iters: int, cuda: bool) -> float:
    """Median milliseconds of fn(): CUDA events on a GPU, perf_counter on CPU."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(cuda: bool) -> dict:
    """Copy bandwidth and matmul rate measured here (tiny CPU sizes in a dry run)."""
    import torch

    dev = "cuda" if cuda else "cpu"
    copy_bytes = (2 << 30) if cuda else (16 << 20)
    x = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=dev).normal_()  # random data, never zeros
    y = torch.empty_like(x)
    copy_ms = _time_ms(lambda: y.copy_(x), 3, 20 if cuda else 5, cuda)
    del x, y
    n, dtype = (8192, torch.bfloat16) if cuda else (256, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    mm_ms = _time_ms(lambda: a @ b, 3, 10, cuda)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    return {
        "copy_bytes_per_s": 2 * copy_bytes / (copy_ms * 1e-3),
        "copy_note": f"y.copy_(x) of {copy_bytes / 2**30:g} GiB: bytes read + written / median time ({copy_ms:.3f} ms)",
        "matmul_flop_per_s": 2 * n**3 / (mm_ms * 1e-3),
        "matmul_note": f"{n}^3 {str(dtype)[6:]} a @ b on random data: 2 n^3 / median time ({mm_ms:.3f} ms)",
    }


def _install_wheels(ctx: Ctx, folder: str) -> dict:
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        return {"wheels": [], "note": f"no *.whl in {folder}"}
    site = os.path.join(ctx.work, "site")
    rec = run_cmd(ctx, "wheels", [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--no-compile", "--no-cache-dir", "--upgrade", "--target", site, *wheels], 120)
    if rec.get("rc") == 0:
        ctx.env["PYTHONPATH"] = site + os.pathsep + ctx.env["PYTHONPATH"]
        sys.path.insert(0, site)
    return {"wheels": [os.path.basename(w) for w in wheels], "install_rc": rec.get("rc")}


def stage_env(ctx: Ctx, args) -> dict:
    import numpy
    import torch

    info: dict = {
        "python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "numpy": numpy.__version__, "cuda_available": torch.cuda.is_available(),
    }
    if args.wheels:
        info["carried"] = _install_wheels(ctx, args.wheels)
    for mod in ("triton", "flashinfer", "xdist", "pytest_timeout", "matplotlib"):
        info[f"{mod}_importable"] = _importable(ctx, mod)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["nvcc"] = _version_line(["nvcc", "--version"])
    info["cmake"] = _version_line(["cmake", "--version"], 0)
    info["compute_sanitizer"] = _version_line([_sanitizer() or "compute-sanitizer", "--version"])
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = {
            "name": props.name, "sms": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_bytes": int(getattr(props, "L2_cache_size", 0) or 0),
        }
        info["nvidia_smi"] = _version_line(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                                            "temperature.gpu,power.draw", "--format=csv,noheader"])
    else:
        info["device"] = {"name": f"cpu ({platform.machine()})"}
    info["commit"] = args.commit or _git_commit()
    ceilings = measure_ceilings(ctx.cuda)
    ctx.ceilings = ceilings
    return {"status": "pass", "environment": info, "ceilings": ceilings}


def _importable(ctx: Ctx, module: str) -> bool:
    """find_spec on the child environment's path (carried wheels included), without importing."""
    code = f"import importlib.util,sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], env=ctx.env, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _git_commit() -> str:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if res.returncode == 0 and res.stdout.strip():
            return res.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("DSPARK_GIT_COMMIT", "") or "unknown (no .git; pass --commit)"


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for guess in ("/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"):
        if os.path.exists(guess):
            return guess
    return None


# --------------------------------------------------------------------------- stage 2: build


def _extension_files() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "dspark_kernels", "_C*.so")))


def stage_build(ctx: Ctx, args) -> dict:
    import torch

    if ctx.dry or not torch.cuda.is_available() or torch.version.cuda is None:
        why = ("--dry-run" if ctx.dry else
               f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None else "torch sees no GPU")
        return {"status": "skipped", "reason": f"no CUDA build here: {why}"}
    budget = ctx.stage_budget
    t0 = time.monotonic()
    for stale in _extension_files():  # never test a library left from another commit
        os.remove(stale)
    # While nvcc builds (CPU only), compile the headline benchmarks' Triton
    # kernels into Triton's cache: the R=512 gamma=8 scheduler alone takes
    # ~17 s to compile (5 s causal + 12 s async on a 2-core CI machine).
    warmers = [spawn(ctx, f"warm_{label}", cmd) for label, cmd in warm_commands(ctx)]
    env = {"DSPARK_BUILD_CUDA": "1", "DSPARK_CUDA_ARCHS": "90a", "MAX_JOBS": str(ctx.jobs)}
    build = run_cmd(ctx, "build_setup", [sys.executable, "setup.py", "build_ext", "--inplace"], budget, env)
    result: dict = {"commands": [build["name"]], "how": "setup.py build_ext --inplace (CMake)"}
    try:
        return _finish_build(ctx, result, build, budget, t0, env)
    finally:
        left = budget - (time.monotonic() - t0)
        result["triton_warm"] = {w["name"]: reap(ctx, w, max(left, 1.0))["rc"] for w in warmers}


def _finish_build(ctx: Ctx, result: dict, build: dict, budget: float, t0: float, env: dict) -> dict:
    if build.get("rc") != 0 or not _extension_files():
        left = budget - (time.monotonic() - t0)
        fallback = run_cmd(ctx, "build_fallback", [sys.executable, "-m", "bench.gpu_proof", "--fallback-build",
                                                   "--out", ctx.work], left, env)
        result["commands"].append(fallback["name"])
        result["how"] = "torch.utils.cpp_extension fallback (the CMake build failed: see logs/build_setup.log)"
        if fallback.get("rc") != 0 or not _extension_files():
            result.update(status=_status_of(fallback) if fallback.get("timed_out") else "fail",
                          reason="both builds failed; the cuda backend is absent from every later stage")
            return result
    load = run_cmd(ctx, "build_load", [sys.executable, "-c",
                                       "import dspark_kernels._extension as e; p = e.load(); "
                                       "print(p or e.why_missing()); raise SystemExit(0 if p else 1)"], 60)
    result["commands"].append(load["name"])
    result["library"] = [os.path.relpath(p, ROOT) for p in _extension_files()]
    result["kernel_resources"] = kernel_resources(_extension_files()[0]) if _extension_files() else []
    result["status"] = "pass" if load.get("rc") == 0 else "fail"
    if result["status"] == "fail":
        result["reason"] = "the library was built but does not load: " + load.get("tail", "")[-300:]
    return result


def fallback_build(work: str) -> int:
    """Build csrc/ with torch.utils.cpp_extension (ninja) and copy it to dspark_kernels/_C.so.

    Insurance for the proof run only: the supported build is setup.py/CMake.
    """
    from torch.utils import cpp_extension

    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    build_dir = os.path.join(work, "ext_build")
    os.makedirs(build_dir, exist_ok=True)
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cu"))) + [os.path.join(csrc, "torch_bindings.cpp")]
    path = cpp_extension.load(
        name="dspark_C", sources=sources, extra_include_paths=[csrc], build_directory=build_dir,
        extra_cuda_cflags=["--expt-relaxed-constexpr", "-lineinfo", "-O3"], extra_cflags=["-O3"],
        is_python_module=False, verbose=True,
    )
    built = path if isinstance(path, str) and os.path.exists(path) else os.path.join(build_dir, "dspark_C.so")
    shutil.copy2(built, os.path.join(ROOT, "dspark_kernels", "_C.so"))
    print(f"copied {built} to dspark_kernels/_C.so")
    return 0


_RESOURCE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str | None:
    """The CUDA toolkit's cuobjdump, else the copy Triton's package carries."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    return None


def kernel_resources(library: str) -> list[dict]:
    """Registers, stack, shared and local bytes per kernel, from cuobjdump --dump-resource-usage."""
    tool = _cuobjdump()
    if tool is None:
        return [{"note": "cuobjdump not found"}]
    try:
        text = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True,
                              timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return [{"note": f"cuobjdump failed: {exc}"}]
    names = [m.group(1) for m in _RESOURCE.finditer(text)]
    demangled = _demangle(names)
    return [{"kernel": demangled.get(m.group(1), m.group(1))[:160], "registers": int(m.group(2)),
             "stack": int(m.group(3)), "shared": int(m.group(4)), "local": int(m.group(5))}
            for m in _RESOURCE.finditer(text)]


def _demangle(names: list[str]) -> dict:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return {}
    try:
        res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    out = res.stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {}


# --------------------------------------------------------------------------- stage 3: tests


# Checks that need no GPU and that CI runs on every commit: on the GPU they
# would only spend the stage's minutes (nvcc compile-only builds, host
# emulation, AOT Triton compiles, this script's own dry run).
CI_ONLY_TESTS = ("test_csrc_build.py", "test_cuda_host_math.py", "test_triton_compile.py", "test_gpu_proof.py",
                 "test_setup.py")


def _pytest_cmd(ctx: Ctx, marker: str, parallel: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", marker, "-p", "bench.proof_pytest_plugin", "-q",
           "-rfE", "-p", "no:cacheprovider"]
    if not ctx.dry:
        cmd += [f"--ignore=tests/{name}" for name in CI_ONLY_TESTS]
    if parallel and _importable(ctx, "xdist"):
        cmd += ["-n", str(min(8, ctx.jobs))]
    if _importable(ctx, "pytest_timeout"):
        cmd += ["--timeout", "300"]
    return cmd


def read_outcomes(path: str) -> dict:
    """Counts per outcome and the failed tests, from the plugin's JSON lines."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}
    failed, slowest = [], []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                counts[rec["outcome"]] = counts.get(rec["outcome"], 0) + 1
                if rec["outcome"] in ("failed", "error"):
                    failed.append({"test": rec["nodeid"], "message": rec.get("message", "")[-1200:]})
                slowest.append((rec.get("seconds", 0.0), rec["nodeid"]))
    slowest.sort(reverse=True)
    return {"counts": counts, "failed": failed, "slowest": [{"test": n, "seconds": s} for s, n in slowest[:10]]}


def stage_tests(ctx: Ctx, args) -> dict:
    budget = ctx.stage_budget
    t0 = time.monotonic()
    parts = [("gpu", "gpu", budget if ctx.dry else budget * 0.5)]
    if not ctx.dry:
        parts.append(("rest", "not gpu", None))
    result: dict = {"parts": {}}
    recs = []
    for label, marker, cap in parts:
        left = budget - (time.monotonic() - t0)
        jsonl = os.path.join(ctx.work, f"tests_{label}.jsonl")
        if os.path.exists(jsonl):
            os.remove(jsonl)
        rec = run_cmd(ctx, f"tests_{label}", _pytest_cmd(ctx, marker, parallel=not ctx.dry),
                      left if cap is None else min(cap, left), {"DSPARK_PROOF_RESULTS": jsonl})
        recs.append(rec)
        result["parts"][label] = {"marker": marker, "rc": rec.get("rc"), "seconds": rec.get("seconds"),
                                  "timed_out": rec.get("timed_out"), **read_outcomes(jsonl)}
    if ctx.dry:
        result["parts"]["rest"] = {"marker": "not gpu", "not_run": "--dry-run: the rest of the suite is CI's own "
                                   "test command (python -m pytest -q tests)"}
    failures = sum(p.get("counts", {}).get("failed", 0) + p.get("counts", {}).get("error", 0)
                   for p in result["parts"].values())
    # pytest exits 5 when a marker selects nothing: not a failure of the code.
    bad_rc = any(r.get("rc") not in (0, 5, None) for r in recs)
    if failures or bad_rc:
        result["status"] = "fail"
    elif any(r.get("timed_out") for r in recs):
        result["status"] = "timeout"
    elif any(r.get("not_run") for r in recs):
        result["status"] = "not run"
    else:
        result["status"] = "pass"
    return result


# --------------------------------------------------------------------------- stages 4 and 6: benchmarks

# The headline shapes (the floors' worked examples). Providers that JIT-compile for minutes wait for stage 6.
SLOW_PROVIDERS = "flashinfer*,reference-compiled,flex"
# The scheduler goes last: its Triton program compiles longest (see stage_build).
HEADLINE = [
    ("rejection_sample", ["--R", "64", "--gamma", "7", "--V", "151936", "--modes", "minimal,full"]),
    ("markov_draft", ["--R", "64", "--gamma", "7", "--V", "151936"]),
    ("verify_attention", ["--requests", "64", "--contexts", "4096"]),
    ("schedule_verify", ["--R", "512", "--gamma", "8"]),
]
HEADLINE_DRY = [
    ("rejection_sample", ["--smoke", "--device", "cpu", "--modes", "minimal"]),
    ("markov_draft", ["--smoke", "--device", "cpu"]),
    ("verify_attention", ["--smoke", "--device", "cpu"]),
    ("schedule_verify", ["--smoke", "--device", "cpu"]),
]


def warm_commands(ctx: Ctx) -> list[tuple[str, list[str]]]:
    """One Triton call per headline op at its shapes (fills Triton's on-disk cache); GPU runs only."""
    if not ctx.cuda:
        return []
    return [(op, [sys.executable, "-m", f"bench.bench_{op}", *argv, "--providers", "triton", "--warmup", "0",
                  "--iters", "1", "--rotate-mb", "0", "--quiet"]) for op, argv in HEADLINE]
GRID_R = {"markov_draft": [1, 8, 64, 256], "rejection_sample": [1, 8, 64, 256],
          "schedule_verify": [8, 64, 256, 1024], "verify_attention": [1, 16, 64, 256]}
R_FLAG = {"verify_attention": "--requests"}


def grid_runs(ctx: Ctx) -> list[tuple[str, str, list[str]]]:
    """(label, op, arguments) of stage 6, in order of value."""
    if ctx.dry:
        return [("grid_schedule_verify", "schedule_verify",
                 ["--smoke", "--device", "cpu", "--providers", "reference-eager,triton"])]
    head = dict(HEADLINE)
    runs = []
    if _importable(ctx, "flashinfer"):
        runs += [("peers_flashinfer_rejection_sample", "rejection_sample",
                  head["rejection_sample"] + ["--providers", "flashinfer-chain"]),
                 ("peers_flashinfer_markov_draft", "markov_draft",
                  head["markov_draft"] + ["--providers", "flashinfer-topk-topp,torch+flashinfer"]),
                 ("peers_flashinfer_verify_attention", "verify_attention",
                  head["verify_attention"] + ["--providers", "flashinfer-mask,flashinfer-causal"])]
    runs += [("filters_rejection_sample", "rejection_sample",
              ["--R", "64", "--gamma", "7", "--V", "151936", "--modes", "minimal", "--top-k", "50", "--top-p", "0.9",
               "--exclude-providers", SLOW_PROVIDERS])]
    runs += [("peers_flex_verify_attention", "verify_attention", head["verify_attention"] + ["--providers", "flex"])]
    runs += [(f"peers_compiled_{op}", op, head[op] + ["--providers", "reference-compiled"]) for op, _ in HEADLINE]
    # The round's small ops (one launch each, seconds in all): before the long grids.
    runs += [("round_append_verify_kv", "append_verify_kv", ["--R", "64", "--exclude-providers", SLOW_PROVIDERS]),
             ("round_advance", "advance", ["--R", "64", "--gamma", "7", "--exclude-providers", SLOW_PROVIDERS]),
             ("tree_rejection_sample", "tree_rejection_sample", ["--R", "64", "--exclude-providers", SLOW_PROVIDERS]),
             ("tree_verify_layout", "tree_verify_layout", ["--R", "64", "--exclude-providers", SLOW_PROVIDERS]),
             ("compact_accepted_kv", "compact_accepted_kv", ["--R", "64", "--exclude-providers", SLOW_PROVIDERS])]
    for i in range(4):  # full grids, one request count per command, every op before the next count
        for op, rs in GRID_R.items():
            runs.append((f"grid_{op}_R{rs[i]}", op, [R_FLAG.get(op, "--R"), str(rs[i]),
                                                     "--exclude-providers", SLOW_PROVIDERS]))
    return runs


def run_bench(ctx: Ctx, label: str, op: str, argv: list[str], limit: float, exclude: str | None = None) -> dict:
    path = os.path.join(ctx.work, "bench", f"{label}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cmd = [sys.executable, "-m", f"bench.bench_{op}", *argv, "--out", path, "--quiet"]
    if exclude and "--providers" not in argv and "--exclude-providers" not in argv:
        cmd += ["--exclude-providers", exclude]
    if ctx.ceilings and not ctx.dry:
        cmd += ["--bandwidth", f"{ctx.ceilings['copy_bytes_per_s']:.6g}",
                "--flop-rate", f"{ctx.ceilings['matmul_flop_per_s']:.6g}"]
    rec = run_cmd(ctx, label, cmd, limit)
    report = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                report = json.load(f)
        except json.JSONDecodeError:
            report = None  # killed while writing: the log still has the table
    if report is not None:
        merge_report(ctx.benchmarks, label, report)
    cases = len(report["cases"]) if report else 0
    # exit 1 = a provider of ours had status "error" (harness.exit_code)
    return {"label": label, "op": op, "rc": rec.get("rc"), "seconds": rec.get("seconds"),
            "timed_out": rec.get("timed_out"), "not_run": rec.get("not_run"), "cases": cases,
            "errors": report.get("errors", []) if report else []}


def merge_report(store: dict, label: str, report: dict) -> None:
    """Fold one benchmark report into store[op]: cases by name, providers by name (later runs add to earlier)."""
    op = report["op"]
    merged = store.setdefault(op, {"meta": report["meta"], "runs": [], "cases": {}})
    merged["runs"].append({"label": label, "argv": report["meta"].get("argv"), "date": report["meta"].get("date"),
                           "errors": report.get("errors", []), "unavailable": report.get("unavailable", [])})
    for case in report["cases"]:
        slot = merged["cases"].setdefault(case["name"], {"params": case["params"], "floor": case["floor"],
                                                          "providers": {}, "headline": False})
        slot["headline"] = slot["headline"] or label.startswith("headline")
        for name, rec in case["providers"].items():
            if rec.get("status") == "ok" or name not in slot["providers"]:
                slot["providers"][name] = rec
        if case.get("output_stats"):
            slot["output_stats"] = case["output_stats"]


def _bench_stage(ctx: Ctx, runs: list[tuple[str, str, list[str]]], exclude: str | None, fair: bool) -> dict:
    budget = ctx.stage_budget
    t0 = time.monotonic()
    done = []
    for i, (label, op, argv) in enumerate(runs):
        left = budget - (time.monotonic() - t0)
        # fair: each remaining run gets an equal share of what is left (unused time rolls over).
        limit = left / (len(runs) - i) if fair else left
        done.append(run_bench(ctx, label, op, argv, limit, exclude))
    failed = [r for r in done if r["rc"] not in (0, None) or r["errors"]]
    if failed:
        status = "fail"
    elif any(r["timed_out"] for r in done):
        status = "timeout"
    elif any(r["not_run"] for r in done):
        status = "not run" if all(r["not_run"] for r in done) else "timeout"
    else:
        status = "pass"
    return {"status": status, "runs": done}


def stage_headline(ctx: Ctx, args) -> dict:
    runs = [(f"headline_{op}", op, argv) for op, argv in (HEADLINE_DRY if ctx.dry else HEADLINE)]
    return _bench_stage(ctx, runs, SLOW_PROVIDERS, fair=True)


def stage_grid(ctx: Ctx, args) -> dict:
    result = _bench_stage(ctx, grid_runs(ctx), None, fair=False)
    # Running out of time is this stage's normal end: what ran is reported.
    if result["status"] == "timeout":
        result["note"] = "stopped at the time limit; the runs listed ran"
    result["flashinfer"] = "importable" if _importable(ctx, "flashinfer") else \
        "not importable (carry flashinfer-python and apache-tvm-ffi wheels with --wheels)"
    return result


# --------------------------------------------------------------------------- stage 5: sanitizer


_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error")
_RACE = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazard")


def stage_sanitizer(ctx: Ctx, args) -> dict:
    budget = ctx.stage_budget
    t0 = time.monotonic()
    kernels = [sys.executable, "-m", "bench.proof_kernels"]
    tool = _sanitizer()
    if not ctx.cuda or tool is None:
        rec = run_cmd(ctx, "kernels_plain", kernels, budget)
        why = "--dry-run" if ctx.dry else ("no GPU" if not ctx.cuda else "compute-sanitizer not found")
        return {"status": _status_of(rec), "sanitizer": f"skipped: {why}",
                "note": "bench/proof_kernels.py ran without the sanitizer", "calls": _calls(rec)}
    # Without the caching allocator every tensor is its own cudaMalloc, so an
    # access past a tensor's end is past an allocation's end, which memcheck sees.
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    result: dict = {"tools": {}}
    recs = []
    for tool_name, share in (("memcheck", 0.6), ("racecheck", 1.0)):
        left = budget - (time.monotonic() - t0)
        limit = left * share if tool_name == "memcheck" else left
        if limit < 15:
            result["tools"][tool_name] = {"not_run": "no time left in the stage"}
            continue
        cmd = [tool, "--tool", tool_name, "--error-exitcode", "86", "--print-limit", "30", *kernels]
        rec = run_cmd(ctx, f"sanitizer_{tool_name}", cmd, limit, env)
        recs.append(rec)
        text = _tail(os.path.join(ctx.work, rec["log"]), 200000)
        errors = _SUMMARY.findall(text)
        hazards = _RACE.findall(text)
        result["tools"][tool_name] = {"rc": rec.get("rc"), "seconds": rec.get("seconds"),
                                      "timed_out": rec.get("timed_out"),
                                      "errors": int(errors[-1]) if errors else None,
                                      "hazards": int(hazards[-1]) if hazards else None, "calls": _calls(rec)}
    result["status"] = _status_of(*recs) if recs else "not run"
    return result


def stage_sps(ctx: Ctx, args) -> dict:
    """Measure an SPS table (bench/sps_profile.py), then run the simulator on it (CPU work, seconds)."""
    budget = ctx.stage_budget
    t0 = time.monotonic()
    path = os.path.join(ctx.work, "sps_table.json")
    cmd = [sys.executable, "-m", "bench.sps_profile", "--out", path] + ([] if ctx.cuda else ["--smoke"])
    rec = run_cmd(ctx, "sps_profile", cmd, budget * 0.85)
    result: dict = {"status": _status_of(rec), "command": rec["cmd"]}
    if rec.get("rc") != 0 or not os.path.exists(path):
        result["note"] = "no table: " + ("timed out" if rec.get("timed_out") else f"rc {rec.get('rc')}")
        return result
    with open(path) as f:
        table = json.load(f)
    sps = table["sps"]
    result["table"] = table
    result["note"] = (f"{table['meta']['name']}: t(1) = {1e3 / sps[1]:.3f} ms, t({len(sps) - 1}) = "
                      f"{1e3 / sps[-1]:.3f} ms (scaled to the whole model), {table['meta'].get('wall_seconds')} s")
    sim_out = os.path.join(ctx.work, "simulate_sps")
    sim = run_cmd(ctx, "simulate_sps", [sys.executable, "-m", "dspark_kernels", "simulate", "--profiles", "",
                                        "--sps-json", path, "--out", sim_out, "--no-plots", "--quiet"],
                  budget - (time.monotonic() - t0))
    result["simulate"] = {"rc": sim.get("rc"), "seconds": sim.get("seconds")}
    sla = os.path.join(sim_out, "sla.txt")
    if sim.get("rc") == 0 and os.path.exists(sla):
        with open(sla) as f:
            result["simulate"]["sla_table"] = f.read()
    result["status"] = _status_of(rec, sim)
    return result


def _calls(rec: dict) -> str | None:
    found = re.findall(r"(\d+) kernel calls, (\d+) failures", rec.get("tail", ""))
    return f"{found[-1][0]} kernel calls, {found[-1][1]} failures" if found else None


# --------------------------------------------------------------------------- outputs


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.0f}"


def summary_markdown(doc: dict) -> str:
    meta = doc["meta"]
    env = next((s.get("environment", {}) for s in doc["stages"] if s["name"] == "env"), {})
    ceil = next((s.get("ceilings") for s in doc["stages"] if s["name"] == "env"), None)
    lines = [f"# GPU proof run{' (DRY RUN: CPU, tiny shapes; no number here is a GPU number)' if meta['dry_run'] else ''}",
             "", f"- device: {env.get('device', {}).get('name', '?')}; driver: {env.get('nvidia_smi', '-')}",
             f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
             f"python {env.get('python')}; nvcc: {env.get('nvcc')}",
             f"- commit {env.get('commit', meta.get('commit'))}; started {meta['started']}; "
             f"{meta['seconds']:.0f} s of a {meta['budget_s']:.0f} s budget"]
    if ceil:
        lines.append(f"- ceilings measured here: copy {ceil['copy_bytes_per_s'] / 1e12:.3g} TB/s "
                     f"({ceil['copy_note']}); matmul {ceil['matmul_flop_per_s'] / 1e12:.3g} TFLOP/s "
                     f"({ceil['matmul_note']})")
    lines += ["", "| stage | status | seconds / budget | note |", "|---|---|---|---|"]
    for s in doc["stages"]:
        note = s.get("reason") or s.get("note") or s.get("sanitizer") or ""
        lines.append(f"| {s['number']} {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} / "
                     f"{s.get('budget_s', 0):.0f} | {note[:160]} |")
    for s in doc["stages"]:
        if s["name"] == "tests" and "parts" in s:
            lines += ["", "## Tests"]
            for label, part in s["parts"].items():
                if "counts" in part:
                    c = part["counts"]
                    lines.append(f"- `-m \"{part['marker']}\"`: {c['passed']} passed, {c['failed']} failed, "
                                 f"{c['error']} errors, {c['skipped']} skipped in {part.get('seconds')} s"
                                 + (" (cut at the time limit)" if part.get("timed_out") else ""))
                    lines += [f"  - FAILED {f['test']}" for f in part["failed"][:40]]
                else:
                    lines.append(f"- `-m \"{part['marker']}\"`: not run ({part.get('not_run')})")
        if s["name"] == "build" and s.get("kernel_resources"):
            lines += ["", "## Kernels (cuobjdump)", "| kernel | regs | stack | shared | local |", "|---|---|---|---|---|"]
            lines += [f"| `{k.get('kernel', k.get('note'))[:90]}` | {k.get('registers', '-')} | {k.get('stack', '-')} | "
                      f"{k.get('shared', '-')} | {k.get('local', '-')} |" for k in s["kernel_resources"]]
        if s["name"] == "sps" and s.get("simulate", {}).get("sla_table"):
            lines += ["", "## Simulator on the SPS table measured here", "```", s["simulate"]["sla_table"].rstrip(),
                      "```"]
        if s["name"] == "sanitizer" and s.get("tools"):
            lines += ["", "## compute-sanitizer"]
            for tool, t in s["tools"].items():
                lines.append(f"- {tool}: " + (t["not_run"] if "not_run" in t else
                             f"rc {t['rc']}, errors {t['errors']}, hazards {t['hazards']}, {t['calls']}, {t['seconds']} s"))
    lines += ["", "## Benchmarks (median us; x floor = median / floor; vs best = median / fastest in the case)"]
    for op, merged in doc["benchmarks"].items():
        lines += ["", f"### {op}"] + benchmark_rows(merged, headline_only=False)
    return "\n".join(lines) + "\n"


def benchmark_rows(merged: dict, headline_only: bool) -> list[str]:
    """A Markdown table of one op's cases (headline cases first), then what did not run, once per reason."""
    rows = ["| case | floor us | provider | median us | x floor | vs best | tokens = ref |",
            "|---|---|---|---|---|---|---|"]
    missing: dict = {}
    order = sorted(merged["cases"].items(), key=lambda kv: (not kv[1]["headline"], kv[0]))
    for name, case in order:
        if headline_only and not case["headline"]:
            continue
        ok = {p: r for p, r in case["providers"].items() if r.get("status") == "ok"}
        best = min((r["median_us"] for r in ok.values()), default=None)
        floor = case["floor"]["floor_us"]
        for p, r in case["providers"].items():
            if r.get("status") == "error":
                rows.append(f"| {name} | {_fmt(floor)} | {p} | ERROR: {str(r.get('reason', ''))[:100]} | | | |")
            elif r.get("status") != "ok":
                missing.setdefault((p, r.get("status"), str(r.get("reason", ""))[:140]), []).append(name)
            else:
                match = r.get("tokens_match_reference")
                rows.append(f"| {name} | {_fmt(floor)} | {p} | {_fmt(r['median_us'], 4)} | "
                            f"{_fmt(r['median_us'] / floor if floor else None)} | {_fmt(r['median_us'] / best)} | "
                            f"{'-' if match is None else f'{match:.3f}'} |")
    rows += [f"- {p} {status} in {len(cases)} case(s): {reason}" for (p, status, reason), cases in missing.items()]
    return rows


def recap_markdown(doc: dict) -> str:
    """The few lines that must survive a cut-off output: stages, test counts, headline cases."""
    lines = ["", "## Recap", "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['number']} {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} |" for s in doc["stages"]]
    for s in doc["stages"]:
        for label, part in s.get("parts", {}).items() if s["name"] == "tests" else ():
            if "counts" in part:
                c = part["counts"]
                lines.append(f"- tests -m \"{part['marker']}\": {c['passed']} passed, {c['failed'] + c['error']} failed")
    for op, merged in doc["benchmarks"].items():
        if any(c["headline"] for c in merged["cases"].values()):
            lines += ["", f"headline {op}:"] + benchmark_rows(merged, headline_only=True)
    return "\n".join(lines) + "\n"


def make_plot(benchmarks: dict, path: str) -> str | None:
    """One panel per op: median time vs R per provider, and the floor; None if nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not importable"
    panels = []
    for op, merged in benchmarks.items():
        groups: dict = {}
        for case in merged["cases"].values():
            params = case["params"]
            if "R" not in params:
                continue
            key = tuple(sorted((k, str(v)) for k, v in params.items() if k not in ("R", "T", "n", "total_kv", "sps_len")))
            groups.setdefault(key, []).append(case)
        if groups:
            key, cases = max(groups.items(), key=lambda kv: len({c["params"]["R"] for c in kv[1]}))
            panels.append((op, dict(key), sorted(cases, key=lambda c: c["params"]["R"])))
    if not panels:
        return None
    ncols = min(2, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.4 * ncols, 4.8 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (op, fixed, cases) in zip(axes.flat, panels):
        rs = [c["params"]["R"] for c in cases]
        ax.plot(rs, [c["floor"]["floor_us"] for c in cases], "kx--", label="floor", linewidth=2)
        names = sorted({p for c in cases for p, r in c["providers"].items() if r.get("status") == "ok"})
        for name in names:
            pts = [(c["params"]["R"], c["providers"][name]["median_us"]) for c in cases
                   if c["providers"].get(name, {}).get("status") == "ok"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name, markersize=4)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("R (requests)")
        ax.set_ylabel("median time per call (us)")
        shown = {k: v for k, v in fixed.items() if k in ("gamma", "V", "mode", "context", "dtype", "top_k", "top_p")}
        ax.set_title(f"{op}\n{', '.join(f'{k}={v}' for k, v in shown.items())}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(ctx: Ctx, doc: dict) -> None:
    """proof.json, summary.md, plots.png and logs.tar.gz in the out folder (rewritten after every stage)."""
    doc["meta"]["seconds"] = time.monotonic() - doc["meta"]["_t0"]
    doc["benchmarks"] = ctx.benchmarks
    doc["commands"] = ctx.commands
    clean = {**doc, "meta": {k: v for k, v in doc["meta"].items() if not k.startswith("_")}}
    os.makedirs(ctx.out, exist_ok=True)
    tmp = os.path.join(ctx.out, "proof.json.tmp")
    with open(tmp, "w") as f:
        json.dump(clean, f, indent=1, default=str)
    os.replace(tmp, os.path.join(ctx.out, "proof.json"))
    with open(os.path.join(ctx.out, "summary.md"), "w") as f:
        f.write(summary_markdown(clean))
    if ctx.benchmarks:
        try:
            why = make_plot(ctx.benchmarks, os.path.join(ctx.out, "plots.png"))
        except Exception as exc:  # a plot must never cost the results
            why = f"plot failed: {type(exc).__name__}: {exc}"
        doc["meta"]["plot"] = why or "plots.png"
    with tarfile.open(os.path.join(ctx.out, "logs.tar.gz.tmp"), "w:gz") as tar:
        for sub in sorted(os.listdir(ctx.work)):
            if sub not in ("site", "ext_build"):
                tar.add(os.path.join(ctx.work, sub), arcname=sub)
    os.replace(os.path.join(ctx.out, "logs.tar.gz.tmp"), os.path.join(ctx.out, "logs.tar.gz"))


# --------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    budget_s: float | None  # None: whatever time is left
    run: Callable


STAGES = (
    Stage(1, "env", 30, stage_env),
    Stage(2, "build", 150, stage_build),
    Stage(3, "tests", 150, stage_tests),
    Stage(4, "headline", 90, stage_headline),
    Stage(5, "sanitizer", 60, stage_sanitizer),
    Stage(6, "sps", 90, stage_sps),
    Stage(7, "grid", None, stage_grid),
)


class _Stop(Exception):
    """SIGTERM from the caller's time limit: write what there is and leave."""


def _on_term(signum, frame):
    raise _Stop()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for proof.json, summary.md, plots.png, logs.tar.gz")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, build and sanitizer skipped")
    p.add_argument("--stages", help="comma list of stage numbers or names (default: all, in order)")
    p.add_argument("--budget", type=float, default=480.0, help="total seconds for the run (default 480)")
    p.add_argument("--stage-budget", action="append", default=[], metavar="NAME=SECONDS",
                   help="override one stage's budget (repeatable)")
    p.add_argument("--commit", help="commit of the tree (a copied tree has no .git): recorded in every report")
    p.add_argument("--wheels", help="folder of wheels to install offline first (pip --no-index --target)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel build / test jobs")
    p.add_argument("--work", help="folder for logs and raw reports (default: a new temporary folder)")
    p.add_argument("--fallback-build", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def select_stages(spec: str | None) -> list[Stage]:
    if not spec:
        return list(STAGES)
    wanted = {s.strip() for s in spec.split(",") if s.strip()}
    known = {str(s.number) for s in STAGES} | {s.name for s in STAGES}
    unknown = wanted - known
    if unknown:
        raise SystemExit(f"unknown stage(s) {sorted(unknown)}; choose from {[f'{s.number} {s.name}' for s in STAGES]}")
    return [s for s in STAGES if str(s.number) in wanted or s.name in wanted]


def stage_budgets(overrides: list[str]) -> dict:
    budgets = {s.name: s.budget_s for s in STAGES}
    for item in overrides:
        name, _, value = item.partition("=")
        if name not in budgets or not value:
            raise SystemExit(f"--stage-budget wants NAME=SECONDS with NAME in {list(budgets)}, got {item!r}")
        budgets[name] = float(value)
    return budgets


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fallback_build:
        return fallback_build(args.out)
    t0 = time.monotonic()
    work = args.work or tempfile.mkdtemp(prefix="dspark_proof_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    cuda_bin = "/usr/local/cuda/bin"  # CUDA images keep nvcc and the sanitizer here, not always on PATH
    if shutil.which("nvcc") is None and os.path.isdir(cuda_bin):
        env["PATH"] = cuda_bin + os.pathsep + env.get("PATH", "")
        os.environ["PATH"] = env["PATH"]
    if args.commit:
        env["DSPARK_GIT_COMMIT"] = args.commit
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # a dry run never touches a GPU, even on a GPU machine
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    ctx = Ctx(out=os.path.abspath(args.out), work=work, dry=args.dry_run, deadline=t0 + args.budget, env=env,
              jobs=max(1, args.jobs), cuda=torch.cuda.is_available() and not args.dry_run)
    chosen = select_stages(args.stages)
    budgets = stage_budgets(args.stage_budget)
    doc = {"schema": "dspark-gpu-proof/1",
           "meta": {"dry_run": args.dry_run, "budget_s": args.budget, "argv": sys.argv if argv is None else argv,
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "commit": args.commit, "work": work, "_t0": t0},
           "stages": []}
    signal.signal(signal.SIGTERM, _on_term)
    try:
        for stage in STAGES:
            budget = budgets[stage.name]
            entry = {"number": stage.number, "name": stage.name, "status": "not run",
                     "budget_s": round(budget if budget is not None else max(0.0, ctx.left()), 1)}
            doc["stages"].append(entry)
            if stage not in chosen:
                entry.update(status="not run", reason="not selected (--stages)")
            elif ctx.left() - RESERVE_S < 1.0:
                entry.update(status="not run", reason="no time left in the run's budget")
            else:
                ctx.stage_budget = min(budget if budget is not None else math.inf, ctx.left() - RESERVE_S)
                s0 = time.monotonic()
                print(f"== stage {stage.number} {stage.name} (budget {ctx.stage_budget:.0f} s)", flush=True)
                try:
                    entry.update(stage.run(ctx, args))
                except _Stop:
                    entry.update(status="timeout", reason="SIGTERM: the caller's time limit")
                    raise
                except Exception as exc:  # a broken stage must not cost the later ones
                    entry.update(status="fail", reason=f"{type(exc).__name__}: {exc}",
                                 traceback=traceback.format_exc()[-3000:])
                finally:
                    entry["seconds"] = round(time.monotonic() - s0, 1)
                    print(f"   -> {entry['status']} in {entry['seconds']:.0f} s", flush=True)
            write_outputs(ctx, doc)
    except _Stop:
        doc["meta"]["stopped"] = "SIGTERM"
    write_outputs(ctx, doc)
    with open(os.path.join(ctx.out, "summary.md")) as f:
        print(f.read(), flush=True)
    print(recap_markdown({**doc, "benchmarks": ctx.benchmarks}), flush=True)
    return 1 if any(s["status"] == "fail" for s in doc["stages"]) else 0


if __name__ == "__main__":
    sys.exit(main())
