"""Command line: `python -m dspark_kernels demo` runs the end-to-end demo;
`python -m dspark_kernels info` prints which backends can run here."""

from __future__ import annotations

import sys


def info() -> int:
    import torch

    from . import _extension
    from .ops import markov_draft, pack_verify, philox_uniform, rejection_sample, schedule_verify, verify_attention

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), CUDA device: {torch.cuda.is_available()}")
    print(f"CUDA extension: {_extension.why_missing()}")
    for mod in (markov_draft, schedule_verify, pack_verify, verify_attention, rejection_sample, philox_uniform):
        b = mod.BACKENDS
        auto = "  (auto skips: " + ", ".join(b.not_auto) + ")" if b.not_auto else ""
        print(f"{b.name:18s} cpu: {', '.join(b.available('cpu')):28s} cuda: {', '.join(b.available('cuda'))}{auto}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else "demo"
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(argv)
    if command == "info":
        return info()
    print(f"unknown command {command!r}; use 'demo' or 'info'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
