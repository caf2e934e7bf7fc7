"""Benchmark dspark_kernels.tree_verify_layout: eager latency, CUDA-graph replay, floor.

Cases: R in {8, 64, 256} requests x N in {12, 28, 63} nodes (random trees,
every request live, one or two mask words). Floor: bytes in (parents R·N·4,
num_nodes, start_pos, cu_verify) and out (tree mask B·W·4, positions B·4) at
the HBM bandwidth: well under a microsecond at every case, so one launch (a
few us eager, ~1-2 us in a graph) is the practical bound; the op is one
launch when cu_verify is given (plus a cumsum when it is not).

Providers: reference-eager, reference-compiled, triton, and their CUDA-graph
replays on CUDA. The op is deterministic: every provider's mask is compared
with reference-eager's.

Usage (from the repository root):
  python -m bench.bench_tree_verify_layout --out bench/out/tree_verify_layout.json
  python -m bench.bench_tree_verify_layout --smoke --device cpu --out /tmp/layout.json
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402

OP = "tree_verify_layout"
SMOKE_TEST = ([], ("R", "N"))
FULL_R, FULL_N = [8, 64, 256], [12, 28, 63]
QUICK_R, QUICK_N = [3, 8], [12]
SMOKE_R, SMOKE_N = [3], [6]


def random_parents_tensor(R: int, N: int, g: torch.Generator) -> torch.Tensor:
    """[R, N] int32 random trees: the parent of node i uniform in -1 .. i - 1 (on g's device)."""
    i = torch.arange(N, device=g.device)
    u = torch.rand((R, N), generator=g, device=g.device)
    return ((u * (i + 1)).long() - 1).to(torch.int32)


def make_case(R: int, N: int, device: torch.device) -> harness.Case:
    words = (N + 1 + 31) // 32
    rows = R * (N + 1)
    floor_bytes = R * N * 4 + 2 * R * 4 + (R + 1) * 4 + rows * words * 4 + rows * 4 + (R + 1) * 4

    def make_inputs() -> dict:
        g = torch.Generator(device=device).manual_seed(7 * R + N)
        num_nodes = torch.full((R,), N, dtype=torch.int32, device=device)
        cu = torch.arange(R + 1, dtype=torch.int32, device=device) * (N + 1)
        return dict(tree_parents=random_parents_tensor(R, N, g), num_nodes=num_nodes,
                    start_pos=torch.randint(0, 4000, (R,), generator=g, device=device, dtype=torch.int32),
                    cu_verify=cu, num_rows=rows)

    return harness.Case(
        op=OP, name=f"R={R} N={N}", params={"R": R, "N": N, "device": device.type}, make_inputs=make_inputs,
        floor_bytes=floor_bytes, floor_flops=0, resident_bytes=floor_bytes, extract=lambda out: out[0],
        summarize=lambda out: {"max_position": int(out[1].max())},
        floor_note="inputs + outputs at HBM bandwidth; one launch is the practical bound",
    )


def providers() -> list[harness.Provider]:
    return harness.keyword_providers(OP)


def parser():
    p = harness.common_parser(__doc__)
    p.add_argument("--R", type=harness.int_list, help=f"comma list of request counts (default {FULL_R})")
    p.add_argument("--N", type=harness.int_list, help=f"comma list of node counts (default {FULL_N})")
    return p


def build_cases(args, device: torch.device) -> list[harness.Case]:
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    Ns = harness.shape_grid(args, "N", FULL_N, QUICK_N, SMOKE_N)
    return [make_case(R, N, device) for N in Ns for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    return harness.bench_main(OP, argv, parser(), build_cases, providers)


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
