"""Compile every Triton kernel of dspark_kernels for an sm_90 target, no GPU needed.

Run as a script (TRITON_INTERPRET must be unset, or @triton.jit would build
interpreted functions). Each module of dspark_kernels.triton that defines
_compile_specs() lists (kernel, signature, constexprs[, options]) tuples; this compiles
each to a cubin with the ptxas that ships with triton. Prints one line per
kernel and exits non-zero on the first failure.
"""

import importlib
import os
import pkgutil
import sys

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "unset TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import dspark_kernels.triton as pkg  # noqa: E402


def main() -> int:
    target = GPUTarget("cuda", 90, 32)
    count = 0
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"dspark_kernels.triton.{info.name}")
        specs = getattr(module, "_compile_specs", None)
        if specs is None:
            continue
        for kernel, signature, constexprs, *options in specs():
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                                      options=options[0] if options else None)
            size = len(compiled.asm["cubin"])
            print(f"{info.name}.{kernel.fn.__name__} {constexprs}: cubin {size} bytes")
            count += 1
    print(f"compiled {count} kernels for sm_90")
    return 0 if count else 1


if __name__ == "__main__":
    sys.exit(main())
