"""Benchmark dspark_kernels.advance: eager latency, CUDA-graph replay, floor.

Cases: R in {8, 64, 256, 1024} requests x γ in {5, 7, 16} drafts. tokens[R, γ+1]
int32 over a 151936 vocabulary, num_accepted uniform in [0, γ], one EOS id,
max_new_tokens and max_positions given (the full op), 90% of requests active.

Floor: bytes in (tokens, num_accepted, anchor, start_pos, num_generated,
max_new_tokens, max_positions: R·(γ+1)·4 + 6·R·4, active R, offset 8, EOS 4)
and out (five int32 and two bool vectors, the offset) at the HBM bandwidth:
under 0.1 us at every case, so one launch (a few us eager, ~1-2 us in a graph)
is the practical bound, and the op is designed as exactly one launch.

Providers:
  reference-eager   dspark_kernels.advance(..., backend="reference")  (~20 torch ops)
  reference-compiled torch.compile of the reference implementation function
  triton            backend="triton" (one program per 128 requests, one launch)
  reference-eager+graph, triton+graph
                    CUDA only: captured once in a CUDA graph, then replayed.
  The op is deterministic: every provider's num_emitted is compared with
  reference-eager's (tok_match).

Usage (from the repository root):
  python -m bench.bench_advance --out bench/out/advance.json
  python -m bench.bench_advance --smoke --device cpu --out /tmp/advance.json
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402

OP = "advance"
SMOKE_TEST = ([], ("R", "gamma"))
FULL_R = [8, 64, 256, 1024]
FULL_GAMMA = [5, 7, 16]
QUICK_R = [3, 8]
QUICK_GAMMA = [5]
SMOKE_R = [3]
SMOKE_GAMMA = [4]
VOCAB = 151936


def make_case(R: int, gamma: int, device: torch.device) -> harness.Case:
    in_bytes = R * (gamma + 1) * 4 + 6 * R * 4 + R + 8 + 4
    out_bytes = 5 * R * 4 + 2 * R + 8
    floor_bytes = in_bytes + out_bytes

    def make_inputs() -> dict:
        g = torch.Generator().manual_seed(31 * R + gamma)
        i32 = dict(dtype=torch.int32)
        gen = torch.randint(0, 100, (R,), generator=g, **i32)
        start = torch.randint(0, 4000, (R,), generator=g, **i32)
        x = dict(tokens=torch.randint(0, VOCAB, (R, gamma + 1), generator=g, **i32),
                 num_accepted=torch.randint(0, gamma + 1, (R,), generator=g, **i32),
                 anchor=torch.randint(0, VOCAB, (R,), generator=g, **i32), start_pos=start, num_generated=gen,
                 active=torch.rand(R, generator=g) < 0.9, offset=torch.tensor(12, dtype=torch.int64),
                 eos_token_ids=torch.tensor([2], **i32), max_new_tokens=gen + 64, max_positions=start + 512)
        return {k: v.to(device) for k, v in x.items()}

    return harness.Case(
        op=OP,
        name=f"R={R} g={gamma}",
        params={"R": R, "gamma": gamma, "device": device.type},
        make_inputs=make_inputs,
        floor_bytes=floor_bytes,
        floor_flops=0,
        resident_bytes=floor_bytes,
        extract=lambda out: out[1],  # num_emitted (the compiled reference returns a tuple)
        summarize=lambda out: {"emitted": int(out[1].sum()), "finished": int(out[6].sum())},
        floor_note="inputs + outputs at HBM bandwidth; one launch is the practical bound",
    )


def providers() -> list[harness.Provider]:
    return harness.keyword_providers(OP)


def parser():
    p = harness.r_gamma_parser(__doc__, FULL_R, FULL_GAMMA)
    return p


def build_cases(args, device: torch.device) -> list[harness.Case]:
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    gammas = harness.shape_grid(args, "gamma", FULL_GAMMA, QUICK_GAMMA, SMOKE_GAMMA)
    return [make_case(R, gamma, device) for gamma in gammas for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    return harness.bench_main(OP, argv, parser(), build_cases, providers)


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
