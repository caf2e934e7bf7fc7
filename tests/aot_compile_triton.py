"""Compile every Triton kernel of dspark_kernels for an sm_90 target, no GPU needed, and report its resources.

Run as a script (TRITON_INTERPRET must be unset, or @triton.jit would build
interpreted functions). Each module of dspark_kernels.triton that defines
_compile_specs() lists (kernel, signature, constexprs[, options]) tuples; this
compiles each to a cubin with the ptxas that ships with triton, then runs that
ptxas with -v on the kernel's PTX for its registers, spill stores / loads and
static shared memory, and reads the dynamic shared memory Triton allocates
from the compiled metadata. Prints one line per kernel (and, with --out, a
JSON list) and exits non-zero on the first failure; --no-spills also fails
when a kernel spills.
"""

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import dspark_kernels.triton as pkg  # noqa: E402


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def resources(ptx: str, arch: str = "sm_90a") -> dict:
    """Registers, spills and static shared memory from ptxas -v on one kernel's PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    grab = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None  # noqa: E731
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "static_smem": grab(r"(\d+) bytes smem"),
            "stack": grab(r"(\d+) bytes stack frame")}


def mma_counts(cubin: bytes) -> dict:
    """Hopper warpgroup MMAs (HGMMA), older MMAs (HMMA) in the SASS (cuobjdump that ships with triton)."""
    tool = os.path.join(os.path.dirname(_ptxas()), "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([tool, "--dump-sass", path], capture_output=True, text=True).stdout
    return {"hgmma": sass.count("HGMMA"), "hmma": sass.count("HMMA")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="write the per-kernel resources as JSON here")
    p.add_argument("--no-spills", action="store_true", help="fail when a kernel spills registers")
    p.add_argument("--only", help="comma list of module names (default: all)")
    args = p.parse_args(argv)
    target = GPUTarget("cuda", 90, 32)
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if only and info.name not in only:
            continue
        module = importlib.import_module(f"dspark_kernels.triton.{info.name}")
        specs = getattr(module, "_compile_specs", None)
        if specs is None:
            continue
        for kernel, signature, constexprs, *options in specs():
            # options may name the arguments that Triton's launcher would specialise as divisible by 16
            # ("divisible_by_16": aligned pointers, strides / sizes that are multiples of 16), so the
            # compile sees the same alignment (vector loads) as a launch on such tensors.
            opts = dict(options[0]) if options else {}
            aligned = opts.pop("divisible_by_16", ())
            attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=target, options=opts or None)
            row = {"kernel": f"{info.name}.{kernel.fn.__name__}", "constexprs": constexprs,
                   "num_warps": compiled.metadata.num_warps, "cubin_bytes": len(compiled.asm["cubin"]),
                   "dynamic_smem": compiled.metadata.shared, **resources(compiled.asm["ptx"]),
                   **mma_counts(compiled.asm["cubin"])}
            rows.append(row)
            print(f"{row['kernel']} {constexprs} warps={row['num_warps']}: registers {row['registers']}, spills "
                  f"{row['spill_stores']}/{row['spill_loads']} B, smem {row['dynamic_smem']} B dynamic + "
                  f"{row['static_smem'] or 0} B static, stack {row['stack']} B, HGMMA {row['hgmma']} / HMMA "
                  f"{row['hmma']}, cubin {row['cubin_bytes']} B", flush=True)
    print(f"compiled {len(rows)} kernels for sm_90")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if args.no_spills and any(r["spill_stores"] for r in rows):
        print("spills:", [r["kernel"] for r in rows if r["spill_stores"]])
        return 1
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
