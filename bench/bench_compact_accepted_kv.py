"""Benchmark dspark_kernels.compact_accepted_kv: eager latency, CUDA-graph replay, floor.

Cases: R in {8, 64, 256} requests, 8 kv heads x 128 dims, bf16 caches on CUDA
(fp32 on CPU) with pages of 16 scattered by a permutation, trees of 3 chains
x 7 drafts (depth-major: node k·3 + c), accepted paths along chain 1 of
length n (the path through a later root child: every node moves), n in {1, 4, 7}.

Floor: every moved row read and written once, K and V: 4·n·Hkv·D·elt bytes
per request (R = 64, n = 4, bf16: 2 MB -> 0.7 us) plus the metadata: a
launch (a few us eager, ~2 us in a graph) is the practical bound.

Providers: reference-eager (host loop), triton, and triton's CUDA-graph replay
on CUDA. The op writes the caches in place; every call moves the same rows
again (an idempotent copy), so repeated timing is fair. The caches are
compared with reference-eager's.

Usage (from the repository root):
  python -m bench.bench_compact_accepted_kv --out bench/out/compact_accepted_kv.json
  python -m bench.bench_compact_accepted_kv --smoke --device cpu --out /tmp/compact.json
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402

OP = "compact_accepted_kv"
SMOKE_TEST = ([], ("R", "n"))
SMOKE_MUST_RUN = ("reference-eager",)
FULL_R, FULL_N = [8, 64, 256], [1, 4, 7]
QUICK_R, QUICK_N = [3, 8], [4]
SMOKE_R, SMOKE_N = [3], [2]
HEADS, DIM, PAGE, CHAINS, GAMMA = 8, 128, 16, 3, 7
GRAPH_SUFFIX = harness.GRAPH_SUFFIX


def make_case(R: int, n: int, device: torch.device) -> harness.Case:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elt = torch.empty((), dtype=dtype).element_size()
    N = CHAINS * GAMMA
    per = (4000 + N + 1 + PAGE - 1) // PAGE
    floor_bytes = 4 * R * n * HEADS * DIM * elt + R * (N + 3) * 4

    def make_inputs() -> dict:
        g = torch.Generator(device=device).manual_seed(11 * R + n)
        pages = R * per + 1
        table = torch.randperm(pages, generator=g, device=device)[: R * per].reshape(R, per).to(torch.int32)
        path = torch.full((R, N), -1, dtype=torch.int32, device=device)
        path[:, :n] = torch.arange(n, device=device, dtype=torch.int32) * CHAINS + 1  # chain 1: nodes 1, 4, 7, ...
        return dict(k_cache=torch.randn(pages, PAGE, HEADS, DIM, generator=g, device=device).to(dtype),
                    v_cache=torch.randn(pages, PAGE, HEADS, DIM, generator=g, device=device).to(dtype),
                    page_table=table,
                    start_pos=torch.randint(0, 3900, (R,), generator=g, device=device, dtype=torch.int32),
                    accepted_nodes=path, num_accepted=torch.full((R,), n, dtype=torch.int32, device=device))

    return harness.Case(
        op=OP, name=f"R={R} n={n}", params={"R": R, "n": n, "device": device.type, "dtype": str(dtype)},
        make_inputs=make_inputs, floor_bytes=floor_bytes, floor_flops=0, resident_bytes=floor_bytes,
        extract=lambda out: out, summarize=lambda out: {"moved_rows": R * n},
        floor_note="moved K/V rows read and written once; a launch is the practical bound",
    )


def _public_call(backend: str):
    def call(x: dict, backend: str, case: harness.Case):
        import dspark_kernels as dk

        dk.compact_accepted_kv(**x, backend=backend)
        return x["k_cache"][:1, :1].float().sum().reshape(1)  # a small deterministic output to compare

    return harness.public_op_provider(OP, backend, call)


def providers() -> list[harness.Provider]:
    return [
        harness.Provider(harness.REFERENCE_EAGER, _public_call("reference"), note='backend="reference" (host loop)'),
        harness.Provider("triton", _public_call("triton"), note='backend="triton"'),
        harness.Provider("triton" + GRAPH_SUFFIX, harness.graph_provider(_public_call("triton")),
                         note='backend="triton"; public op captured once in a CUDA graph, then replayed'),
    ]


def parser():
    p = harness.common_parser(__doc__)
    p.add_argument("--R", type=harness.int_list, help=f"comma list of request counts (default {FULL_R})")
    p.add_argument("--n", type=harness.int_list, help=f"comma list of accepted path lengths (default {FULL_N})")
    return p


def build_cases(args, device: torch.device) -> list[harness.Case]:
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    ns = harness.shape_grid(args, "n", FULL_N, QUICK_N, SMOKE_N)
    return [make_case(R, n, device) for n in ns for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    return harness.bench_main(OP, argv, parser(), build_cases, providers)


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
