"""Benchmark dspark_kernels.verify_capacity: eager latency, CUDA-graph replay, floor, goal.

Cases: R in {8, 64, 256, 1024} requests x γ in {5, 7, 16} drafts. history[R, γ]
fp32 is a cumulative product of confidences drawn from U(0.6, 1), all
requests active, no per-request cap; the steps-per-second table is
bench_schedule_verify's (a target step takes 25 ms up to 512 verify tokens
and grows linearly beyond), so K cuts through the candidate list.

Floor: bytes in and out at the HBM bandwidth (history, the sps entries up to
R·(γ+1), K): under 0.1 us for every case. One kernel launch (~2-4 us eager,
less inside a graph) bounds it in practice; the goal below is absolute.

Goal (recorded in the JSON under "goal" as met / missed / not measured):
  replay of a captured CUDA graph of the op at R=1024, γ=16 takes <= 8 us
  (median per-replay CUDA-event time, best of our backends): with
  schedule_verify(capacity=K) the pair stays within the 10 us + 8 us a
  history-mode schedule_verify (two sorts in one launch) would take.

Providers:
  reference-eager      dspark_kernels.verify_capacity(..., backend="reference")
  reference-compiled   torch.compile of the reference implementation function
  triton               backend="triton"; skipped with the reason where
                       dspark_kernels.ops.verify_capacity.IMPLS.available(device)
                       does not list it
  reference-eager+graph, triton+graph
                       CUDA only: the public op captured once in a
                       torch.cuda.CUDAGraph and replayed (one replay between two
                       CUDA events per timed call; graph_back_to_back_us in the
                       JSON is N queued replays / N).
  K is deterministic: every provider's K is compared with reference-eager's.

Usage (from the repository root):
  python -m bench.bench_verify_capacity --out bench/out/verify_capacity.json
  python -m bench.bench_verify_capacity --R 1024 --gamma 16 --providers triton+graph
  python -m bench.bench_verify_capacity --smoke --device cpu --out /tmp/capacity.json
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402
from bench.bench_schedule_verify import (CONFIDENCE_LOW, FULL_GAMMA, FULL_R, KNEE_TOKENS,  # noqa: E402
                                         QUICK_GAMMA, QUICK_R, SMOKE_GAMMA, SMOKE_R, STEP_SECONDS, sps_table)

OP = "verify_capacity"
# tests/test_bench.py: extra --smoke arguments, and the shape keys every case's params must hold.
SMOKE_TEST = ([], ("R", "gamma", "sps_len"))
GOAL_US = 8.0
GOAL_R = 1024
GOAL_GAMMA = 16


def make_case(R: int, gamma: int, device: torch.device) -> harness.Case:
    bmax = R * (gamma + 1)
    floor_bytes = R * gamma * 4 + (bmax + 1) * 4 + 4  # history, sps, K

    def make_inputs() -> dict:
        g = torch.Generator().manual_seed(300 * R + gamma)
        conf = CONFIDENCE_LOW + (1 - CONFIDENCE_LOW) * torch.rand(R, gamma, generator=g)
        return {"history": torch.cumprod(conf, dim=1).to(device), "sps": sps_table(bmax, device)}

    return harness.Case(
        op=OP,
        name=f"R={R} g={gamma}",
        params={"R": R, "gamma": gamma, "sps_len": bmax + 1, "device": device.type,
                "history": f"cumprod of U({CONFIDENCE_LOW}, 1) confidences",
                "sps": f"1 / ({STEP_SECONDS} * max(1, B / {KNEE_TOKENS}))"},
        make_inputs=make_inputs,
        floor_bytes=floor_bytes,
        floor_flops=0,
        resident_bytes=floor_bytes,
        extract=lambda out: out.reshape(1),
        summarize=lambda out: {"capacity": int(out), "candidates": R * gamma},
        floor_note="history + sps up to R*(gamma+1) + K at HBM bandwidth; launch latency (a few us) "
                   "is the practical bound",
    )


def providers() -> list[harness.Provider]:
    return harness.keyword_providers(OP)


def evaluate_goal(report: dict) -> dict:
    """The goal "<= GOAL_US us graph replay at R=GOAL_R, γ=GOAL_GAMMA" as met / missed / not measured."""
    goal = {"description": f"CUDA-graph replay of verify_capacity at R={GOAL_R}, gamma={GOAL_GAMMA} takes "
                           f"<= {GOAL_US:g} us (median per-replay CUDA-event time, best of our backends)",
            "target_us": GOAL_US, "R": GOAL_R, "gamma": GOAL_GAMMA, "met": None}
    cases, why = harness.goal_cases(report, GOAL_R, GOAL_GAMMA)
    best = harness.best_graph_replay(cases[0]) if cases else None
    if best is None:
        goal["status"] = why or "not measured: no graph provider ran"
        return goal
    goal.update(best)
    goal["met"] = best["replay_median_us"] <= GOAL_US
    goal["status"] = "met" if goal["met"] else "missed"
    return goal


def goal_line(goal: dict) -> str:
    line = f"goal: {goal['description']}\n  -> {goal['status']}"
    if goal.get("best_provider"):
        line += f" (best {goal['best_provider']} {goal['replay_median_us']:.2f} us per replay)"
    return line


def parser():
    p = harness.r_gamma_parser(__doc__, FULL_R, FULL_GAMMA)
    return p


def build_cases(args, device: torch.device) -> list[harness.Case]:
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    gammas = harness.shape_grid(args, "gamma", FULL_GAMMA, QUICK_GAMMA, SMOKE_GAMMA)
    return [make_case(R, gamma, device) for gamma in gammas for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    return harness.bench_main(OP, argv, parser(), build_cases, providers, goal=(evaluate_goal, goal_line))


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
