"""Command line: ``python -m dspark_kernels <command>``.

    demo              the end-to-end DSpark demo on a synthetic target (dspark_kernels.engine.demo)
    info              torch / CUDA status and which backends of each op can run here
    check-checkpoint  load a DeepSpec DSpark checkpoint (dspark_kernels.engine.deepspec) and draft once
    simulate          closed-loop serving simulation of the scheduler (dspark_kernels.engine.simulator)
    tree-demo         tree verification end to end, b chains per request (dspark_kernels.engine.tree_demo)

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


def check_checkpoint(args) -> int:
    """Load args.path with load_deepspec, print what it holds, run one draft step; 2 on a bad checkpoint."""
    import torch

    from .engine.deepspec import load_deepspec

    try:
        head = load_deepspec(args.path, config=args.config)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError; so is a bad STS file
        print(f"{PROG} check-checkpoint: {args.path}: {exc}", file=sys.stderr)
        return 2
    print(f"checkpoint: {head.source}")
    for line in head.describe():
        print(line)
    num_req = args.requests
    g = torch.Generator().manual_seed(args.seed)
    base = torch.randn(num_req, head.gamma, head.vocab_size, generator=g) * 2
    anchor = torch.randint(0, head.vocab_size, (num_req,), generator=g)
    hidden = torch.randn(num_req, head.gamma, head.hidden_size, generator=g) if head.needs_hidden else None
    temperature = torch.tensor([0.0] + [args.temperature] * (num_req - 1))
    out = head.draft(base.to(head.w1.device), anchor.to(head.w1.device), temperature.to(head.w1.device),
                     torch.arange(num_req, dtype=torch.int64, device=head.w1.device) + args.seed,
                     torch.tensor(0, dtype=torch.int64, device=head.w1.device),
                     hidden=None if hidden is None else hidden.to(head.w1.device), backend="reference")
    print(f"one draft step on random base logits (reference backend, seed {args.seed}):")
    for row in range(num_req):
        kind = "greedy" if float(temperature[row]) == 0.0 else f"T={float(temperature[row]):g}"
        line = f"  request {row} ({kind}, anchor {int(anchor[row])}): tokens {out.tokens[row].tolist()}"
        if out.survival is not None:
            line += "  survival [" + ", ".join(f"{float(a):.3f}" for a in out.survival[row]) + "]"
        print(line)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_check_checkpoint(sub) -> None:
    p = sub.add_parser(
        "check-checkpoint", help="load a DeepSpec DSpark checkpoint and run one draft step on random logits",
        description="Loads a DeepSpec DSpark draft checkpoint with dspark_kernels.engine.deepspec.load_deepspec "
                    "(a directory with config.json and *.safetensors, or one .safetensors file with --config), "
                    "prints the head type, each head tensor's shape and dtype, gamma (block_size) and r "
                    "(markov_rank), whether STS temperatures (sts_temperature.json) were found, and runs one "
                    "draft step on random base logits with the reference backend, printing the tokens. "
                    "Exits 2 with a message naming the problem when the checkpoint is bad.")
    p.add_argument("path", help="checkpoint directory or .safetensors file")
    p.add_argument("--config", default=None, help="config.json to use (default: the one in / beside PATH)")
    p.add_argument("--requests", type=_positive_int, default=2,
                   help="requests drafted (row 0 greedy, the rest sampled)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of the sampled rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and of the draws")
    p.set_defaults(func=check_checkpoint)


def _add_simulate(sub) -> None:
    from .engine.simulator import cli as simulator_cli

    p = sub.add_parser("simulate", help="serving simulator: throughput vs per-user speed of MTP-1, fixed γ and "
                                        "DSpark scheduling (under a minute on a CPU)",
                       description=simulator_cli.DESCRIPTION)
    simulator_cli.add_arguments(p)
    p.set_defaults(func=simulator_cli.run_simulate)


def _add_tree_demo(sub) -> None:
    from .engine import tree_demo

    p = sub.add_parser("tree-demo", help="tree verification end to end: b Markov-head chains per request as one "
                                         "token tree, beside the chain (seconds on a CPU)",
                       description=tree_demo.DESCRIPTION)
    tree_demo.add_arguments(p)
    p.set_defaults(func=tree_demo.run_tree_demo)


_COMMANDS = (_add_demo, _add_info, _add_check_checkpoint, _add_simulate, _add_tree_demo)


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
