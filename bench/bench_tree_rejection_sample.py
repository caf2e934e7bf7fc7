"""Benchmark dspark_kernels.tree_rejection_sample against its floor.

Cases: R in {1, 8, 64} requests, each verifying a tree of b independent chains
of γ drafts glued at the anchor (the multi-chain shape of
dspark_kernels.engine.tree: b i.i.d. root children, one child per deeper node),
b in {2, 4}, γ in {4, 7}, V in {151936}; target logits bf16 [T, V] on CUDA
(fp32 on CPU), T = R·(b·γ + 1), temperature 1. Draft modes:
  onehot   draft_probs None: deterministic candidates
  full     draft_probs [R, b·γ, V] fp32 (sibling rows equal)

Acceptance is realistic: every target row puts ~--accept (0.8) of its mass on
the token of one of its children (chain 0's at the root, so the first chain is
usually taken and the others are tried after its rejection), so walks go deep
and some reach the second sibling.

Floor: target logits read once (R = 64, b = 4, γ = 7, V = 151936: 564 MB ->
188 us on an H100), which is what this design reads (one statistics pass per
row, in parallel); full mode adds one fp32 q row per request (the final
residual). A walk-first design would read only the rows on the walk (about
depth + 1 per request, not b·γ + 1): bench/NOTES.md discusses that headroom.

Providers:
  reference-eager     dspark_kernels.tree_rejection_sample(..., backend="reference")
  reference-compiled  torch.compile of the reference implementation function
  triton              backend="triton" (4 launches)

Usage (from the repository root):
  python -m bench.bench_tree_rejection_sample --out bench/out/tree_rejection_sample.json
  python -m bench.bench_tree_rejection_sample --R 64 --chains 4 --gamma 7 --modes full
  python -m bench.bench_tree_rejection_sample --smoke --device cpu --out /tmp/tree.json
"""

from __future__ import annotations

import sys

import torch

if __package__ in (None, ""):  # run as a file: make `bench` importable from the repo root
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import harness  # noqa: E402
from bench.bench_rejection_sample import DTYPES, bump_for, checked_modes, logit_dtype  # noqa: E402

OP = "tree_rejection_sample"
SMOKE_TEST = (["--modes", "onehot,full"], ("R", "chains", "gamma", "V", "T", "mode", "dtype"))
FULL_R = [1, 8, 64]
FULL_CHAINS = [2, 4]
FULL_GAMMA = [4, 7]
FULL_V = [151936]
QUICK_R, QUICK_CHAINS, QUICK_GAMMA, QUICK_V = [1, 3], [2], [2], [257]
SMOKE_R, SMOKE_CHAINS, SMOKE_GAMMA, SMOKE_V = [2], [2], [2], [257]
MODES = ("onehot", "full")
DEFAULT_ACCEPT = 0.8


def make_case(R: int, chains: int, gamma: int, V: int, mode: str, dtype: torch.dtype, accept: float,
              device: torch.device) -> harness.Case:
    N = chains * gamma
    T = R * (N + 1)
    elt = torch.empty((), dtype=dtype).element_size()
    small_in = 3 * R * N * 4 + R * 4 + (R + 1) * 4 + R * 4 + R * 8 + 8
    outputs = R * (N + 1) * 4 + R * 4 + R * N * 4
    floor_bytes = T * V * elt + small_in + outputs + (R * V * 4 if mode == "full" else 0)
    bump = bump_for(accept, V)

    def make_inputs() -> dict:
        from dspark_kernels.engine.tree import chains_to_tree

        g = torch.Generator(device=device).manual_seed(1000 * R + 100 * chains + gamma + MODES.index(mode))
        drafts = torch.randint(0, V, (R, chains, gamma), generator=g, device=device, dtype=torch.int32)
        probs = None
        if mode == "full":
            # One distribution per position of the first chain, shared by the chains (root siblings i.i.d.).
            logits = torch.randn((R, 1, gamma, V), generator=g, device=device)
            logits.scatter_add_(-1, drafts[:, :1, :, None].long(), torch.full((R, 1, gamma, 1), bump, device=device))
            probs = torch.softmax(logits, -1).expand(R, chains, gamma, V)
        tree = chains_to_tree(drafts, probs)
        # Target rows: the anchor row bumped at chain 0's first token, node rows at their child's token.
        nxt = torch.cat([drafts[:, :, 1:], torch.randint(0, V, (R, chains, 1), generator=g, device=device,
                                                          dtype=torch.int32)], 2).reshape(R, N)
        rows_tokens = torch.cat([drafts[:, 0, :1], nxt], 1).reshape(T)
        target = torch.randn((T, V), generator=g, device=device)
        target.scatter_add_(-1, rows_tokens[:, None].long(), torch.full((T, 1), bump, device=device))
        cu = torch.arange(R + 1, dtype=torch.int32, device=device) * (N + 1)
        return {"target_logits": target.to(dtype), "tree_tokens": tree.tree_tokens, "tree_parents": tree.tree_parents,
                "num_nodes": tree.num_nodes, "cu_verify": cu, "temperature": torch.ones(R, device=device),
                "seed": torch.arange(R, dtype=torch.int64, device=device) + 9,
                "offset": torch.zeros((), dtype=torch.int64, device=device),
                "draft_probs": None if probs is None else tree.draft_probs.contiguous()}

    return harness.Case(
        op=OP,
        name=f"{mode} R={R} b={chains} g={gamma} V={V}",
        params={"mode": mode, "R": R, "chains": chains, "gamma": gamma, "V": V, "T": T,
                "dtype": str(dtype).replace("torch.", ""), "target_accept": accept, "device": device.type},
        make_inputs=make_inputs,
        floor_bytes=floor_bytes,
        floor_flops=0,
        resident_bytes=floor_bytes,
        extract=lambda out: out[0],
        summarize=lambda out: {"mean_accepted": float(out[1].float().mean()),
                               "second_sibling": float((out[2][:, 0] > 0).float().mean())},
        floor_note={"onehot": "target logits once + tree + outputs",
                    "full": "target logits once + one fp32 q row per request + tree + outputs"}[mode],
    )


def _public_call(backend: str):
    def call(x: dict, backend: str, case: harness.Case):
        import dspark_kernels as dk

        return dk.tree_rejection_sample(**x, backend=backend)

    return harness.public_op_provider(OP, backend, call)


def providers() -> list[harness.Provider]:
    return [
        harness.Provider(harness.REFERENCE_EAGER, _public_call("reference"),
                         note='dspark_kernels.tree_rejection_sample(backend="reference")'),
        harness.Provider("reference-compiled", harness.compiled_reference(OP),
                         note="torch.compile(dspark_kernels.reference.tree_rejection_sample.tree_rejection_sample)"),
        harness.Provider("triton", _public_call("triton"), note='backend="triton"'),
    ]


def parser():
    p = harness.common_parser(__doc__)
    p.add_argument("--R", type=harness.int_list, help=f"comma list of request counts (default {FULL_R})")
    p.add_argument("--chains", type=harness.int_list, help=f"comma list of chains per tree (default {FULL_CHAINS})")
    p.add_argument("--gamma", type=harness.int_list, help=f"comma list of chain lengths (default {FULL_GAMMA})")
    p.add_argument("--V", type=harness.int_list, help=f"comma list of vocab sizes (default {FULL_V})")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of draft modes from {MODES}")
    p.add_argument("--accept", type=float, default=DEFAULT_ACCEPT, help="target mass on the next draft (default 0.8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="target logit dtype (default bf16 on CUDA, fp32 on CPU)")
    return p


def build_cases(args, device: torch.device) -> list[harness.Case]:
    modes = checked_modes(args, MODES)
    Rs = harness.shape_grid(args, "R", FULL_R, QUICK_R, SMOKE_R)
    chains = harness.shape_grid(args, "chains", FULL_CHAINS, QUICK_CHAINS, SMOKE_CHAINS)
    gammas = harness.shape_grid(args, "gamma", FULL_GAMMA, QUICK_GAMMA, SMOKE_GAMMA)
    Vs = harness.shape_grid(args, "V", FULL_V, QUICK_V, SMOKE_V)
    dtype = logit_dtype(args, device)
    return [make_case(R, b, gamma, V, mode, dtype, args.accept, device)
            for mode in modes for V in Vs for gamma in gammas for b in chains for R in Rs]


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns the report (also printed, and written with --out)."""
    return harness.bench_main(OP, argv, parser(), build_cases, providers)


if __name__ == "__main__":
    sys.exit(harness.exit_code(main()))
