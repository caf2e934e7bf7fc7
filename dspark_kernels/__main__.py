"""Command line: ``python -m dspark_kernels <command>``.

    demo   the end-to-end DSpark demo on a synthetic target (dspark_kernels.engine.demo)
    info   torch / CUDA status and which backends of each op can run here

``python -m dspark_kernels`` with no command prints the help and exits 0;
``python -m dspark_kernels <command> --help`` describes one command. A new
command is one more ``_add_<command>`` function registered in ``_COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

PROG = "python -m dspark_kernels"


def _triton_interpret_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def info() -> int:
    import torch

    from . import _extension
    from .ops import OPS

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device: {torch.cuda.is_available()}")
    print(f"CUDA extension: {_extension.why_missing()}")
    for op in OPS:
        mod = importlib.import_module(f"{__package__}.ops.{op}")
        impls = getattr(mod, "IMPLS", None) or getattr(mod, "BACKENDS")
        auto = "  (auto skips: " + ", ".join(impls.not_auto) + ")" if impls.not_auto else ""
        print(f"{impls.name:18s} cpu: {', '.join(impls.available('cpu')):28s} "
              f"cuda: {', '.join(impls.available('cuda'))}{auto}")
    value = os.environ.get("TRITON_INTERPRET")
    print("Triton: kernels run on CPU tensors only through the Triton interpreter, "
          "with TRITON_INTERPRET=1 set before triton is imported.")
    if _triton_interpret_on():
        print(f"  In this process TRITON_INTERPRET={value} is set: the triton backend runs on CPU tensors.")
    else:
        state = "not set" if value is None else f"{value!r}"
        print(f"  In this process TRITON_INTERPRET is {state}: the triton backend runs on CUDA tensors only "
              f"(try: TRITON_INTERPRET=1 {PROG} info).")
    return 0


def _add_demo(sub) -> None:
    from .engine import demo

    p = sub.add_parser("demo", help="run the end-to-end DSpark demo on a synthetic target (1-2 min on a CPU)",
                       description=demo.DESCRIPTION)
    demo.add_arguments(p)
    p.set_defaults(func=demo.run_demo)


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info", help="print torch/CUDA status and the backends each op can use here",
        description="Prints the torch version and CUDA status, whether the CUDA extension dspark_kernels._C "
                    "loaded, and per op the backends available on cpu and cuda tensors and those backend "
                    "'auto' skips; and whether Triton runs on CPU tensors in this process (it does only "
                    "with TRITON_INTERPRET=1 set before triton is imported).")
    p.set_defaults(func=lambda args: info())


_COMMANDS = (_add_demo, _add_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="GPU kernels for DSpark speculative decoding, as torch ops.",
        epilog=f"'{PROG} <command> --help' describes a command.")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
