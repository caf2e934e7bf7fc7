"""First-call compile time of Triton kernels for sm_90, per size bucket, on a machine without a GPU.

A Triton kernel is compiled the first time a launch meets a new set of
constexprs (here: the power-of-two bucket of R·γ), and that compile stalls
the engine. This script compiles a module's kernels ahead of time for a
GPUTarget("cuda", 90, 32) (``triton.compile`` needs no GPU), with Triton's
cache bypassed (TRITON_ALWAYS_COMPILE=1), and prints the wall seconds of
each compile plus the kernel's registers and spills (ptxas -v, as
tests/aot_compile_triton.py reads them).

The module must define ``_bucket_spec(mode, n)`` -> (kernel, signature,
constexprs, options) for a bucket of n candidates; ``--module`` takes a
dotted name or a path to a .py file (to time an older copy of a kernel).

Usage (TRITON_INTERPRET must be unset):
  python -m bench.triton_compile_time --module dspark_kernels.triton.schedule_verify \\
      --modes causal,async,capacity --sizes 64,512,4096,16384 --out /tmp/compile.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import time

os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # read lazily by Triton's knobs: every compile is a cold one
assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def _load(module: str):
    if module.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_timed_kernels", module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return importlib.import_module(module)


def _resources(ptx: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from aot_compile_triton import resources

    return resources(ptx)


@triton.jit
def _warm_up_kernel(x_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1)


def warm_up(target) -> float:
    """Compile a trivial kernel once: Triton's one-time start-up (~0.5 s: imports, the first MLIR context)
    is paid by any first kernel of a process, so it is left out of the per-bucket numbers."""
    t0 = time.perf_counter()
    triton.compile(ASTSource(fn=_warm_up_kernel, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                             constexprs={"BLOCK": 128}), target=target)
    return time.perf_counter() - t0


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--module", default="dspark_kernels.triton.schedule_verify")
    p.add_argument("--modes", default="causal,async")
    p.add_argument("--sizes", default="64,512,4096,16384", help="comma list of R·γ candidate counts")
    p.add_argument("--out", help="append the rows as JSON to this file")
    args = p.parse_args(argv)
    mod = _load(args.module)
    target = GPUTarget("cuda", 90, 32)
    print(f"start-up (a trivial kernel's first compile): {warm_up(target):.2f} s", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for mode in args.modes.split(","):
            kernel, signature, constexprs, options = mod._bucket_spec(mode, n)
            t0 = time.perf_counter()
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                      target=target, options=options)
            seconds = time.perf_counter() - t0
            row = {"module": args.module, "kernel": kernel.fn.__name__, "mode": mode, "n": n,
                   "num_warps": compiled.metadata.num_warps, "compile_s": round(seconds, 2),
                   "dynamic_smem": compiled.metadata.shared, **_resources(compiled.asm["ptx"])}
            rows.append(row)
            print(f"{mode:8s} n={n:6d} warps={row['num_warps']:2d}: {seconds:7.2f} s, registers {row['registers']}, "
                  f"spills {row['spill_stores']}/{row['spill_loads']} B, smem {row['dynamic_smem']} B", flush=True)
    if args.out:
        old = json.load(open(args.out)) if os.path.exists(args.out) else []
        with open(args.out, "w") as f:
            json.dump(old + rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
