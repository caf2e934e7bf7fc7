"""Memory traffic and launches of the Triton sampling kernels, counted on CPU (issue 12's tables).

Runs the Triton backend of rejection_sample and markov_draft under the Triton
interpreter with ../shared/tools/traffic.py (or DSPARK_TRAFFIC_TOOL), which
counts every byte each tl.load / tl.store moves (requested, re-reads
included), the distinct 32-byte sectors touched (unique) and the launches.
Ratios to each op's floor:

  rejection_sample  floor = the target logits once (T·V·2 bytes, bf16) + the
                    draft bytes the algorithm must read: the draft probability
                    of each draft (full probs mode: q_j(x_j), 4 B), and one
                    draft row per rejected request (probs / logits modes)
  markov_draft      floor = U once (R·γ·V·2) + W2 once per step (γ·V·r·2)

Requested/floor is the design's pass count; unique/floor its compulsory
traffic. Caches are ignored: a re-read a GPU serves from L2 counts in full.
Torch ops in a launcher are not counted (they are listed separately where a
launcher has them). Inputs are bf16 where the op reads them in bf16 on a GPU
(the interpreter loads bf16 and converts; the kernels do no bf16 math).

Usage: python -m bench.traffic_sampling [--V 151936] [--R 2] [--gamma 7] [--ops rejection_sample,markov_draft]
       [--out PATH.json]. Expect minutes: the interpreter moves ~150k lanes per second.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _traffic():
    path = os.environ.get("DSPARK_TRAFFIC_TOOL") or os.path.join(ROOT, "..", "shared", "tools")
    sys.path.insert(0, os.path.abspath(path))
    try:
        import traffic
    except ImportError as exc:
        raise SystemExit(f"traffic.py not found in {path} (set DSPARK_TRAFFIC_TOOL to its folder): {exc}") from exc
    return traffic


def rejection_cases(R: int, gamma: int, V: int, accept: float = 0.8) -> list[dict]:
    """(mode, filters) cases at one shape; inputs as bench_rejection_sample builds them, bf16 target."""
    import torch

    from bench import bench_rejection_sample as brs

    out = []
    for mode in ("onehot", "full", "minimal"):
        for top_k, top_p in ((None, None), (50, None), (None, 0.9), (50, 0.9)):
            if mode != "minimal" and (top_k, top_p) != (None, None):
                continue  # the filters act on the target rows, whatever the draft mode
            case = brs.make_case(R, gamma, V, mode, torch.bfloat16, accept, torch.device("cpu"), top_k, top_p)
            out.append(dict(mode=mode, top_k=top_k, top_p=top_p, case=case))
    return out


def rejection_floor(x: dict, out, mode: str) -> int:
    T, V = x["target_logits"].shape
    floor = T * V * x["target_logits"].element_size()
    tokens, n_acc = out
    rejected = int((n_acc < x["lengths"]).sum())
    if mode == "full":
        floor += x["draft_tokens"].numel() * 4 + rejected * V * 4
    elif mode == "minimal":
        floor += x["draft_tokens"].numel() * 4 + rejected * V * 4
    return floor


def measure_rejection(traffic, R, gamma, V) -> list[dict]:
    import dspark_kernels as dk

    rows = []
    for c in rejection_cases(R, gamma, V):
        x = c["case"].make_inputs()
        kw = {k: v for k, v in x.items() if k not in ("draft_probs",)}
        with traffic.Counter() as cnt:
            out = dk.rejection_sample(kw.pop("target_logits"), kw.pop("draft_tokens"), x["draft_probs"],
                                      kw.pop("lengths"), kw.pop("cu_verify"), kw.pop("temperature"), kw.pop("seed"),
                                      kw.pop("offset"), **kw, backend="triton")
        floor = rejection_floor(x, out, c["mode"])
        rows.append(dict(op="rejection_sample", mode=c["mode"], top_k=c["top_k"], top_p=c["top_p"], R=R, gamma=gamma,
                         V=V, floor_bytes=floor, requested=cnt.requested, unique=cnt.unique, launches=cnt.launches,
                         requested_over_floor=cnt.requested / floor, unique_over_floor=cnt.unique / floor,
                         rejected=int((out[1] < x["lengths"]).sum()), seconds=cnt.seconds))
        print(_line(rows[-1]), flush=True)
    return rows


def measure_markov(traffic, R, gamma, V, rank=256) -> list[dict]:
    import torch

    import dspark_kernels as dk

    g = torch.Generator().manual_seed(0)
    x = dict(base_logits=torch.randn(R, gamma, V, generator=g).to(torch.bfloat16),
             anchor=torch.randint(0, V, (R,), generator=g),
             w1=(torch.randn(V, rank, generator=g) * 0.05).to(torch.bfloat16),
             w2=(torch.randn(V, rank, generator=g) * 0.05).to(torch.bfloat16),
             temperature=torch.ones(R), seed=torch.arange(R), offset=torch.tensor(0))
    with traffic.Counter() as cnt:
        dk.markov_draft(**x, backend="triton")
    floor = R * gamma * V * 2 + gamma * V * rank * 2
    row = dict(op="markov_draft", R=R, gamma=gamma, V=V, rank=rank, floor_bytes=floor, requested=cnt.requested,
               unique=cnt.unique, launches=cnt.launches, requested_over_floor=cnt.requested / floor,
               unique_over_floor=cnt.unique / floor, seconds=cnt.seconds)
    print(_line(row), flush=True)
    return [row]


def _line(r: dict) -> str:
    what = r["op"] + (f" {r['mode']} top_k={r['top_k']} top_p={r['top_p']}" if r["op"] == "rejection_sample" else
                      f" r={r['rank']}")
    return (f"{what:45s} R={r['R']} g={r['gamma']} V={r['V']}: requested/floor {r['requested_over_floor']:.2f}, "
            f"unique/floor {r['unique_over_floor']:.2f}, launches {r['launches']} [{r['seconds']:.0f} s]")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--V", type=int, default=151936)
    p.add_argument("--R", type=int, default=2, help="requests for rejection_sample (default 2)")
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--markov-R", type=int, default=64, help="requests for markov_draft (W2 reuse needs a real batch)")
    p.add_argument("--markov-V", type=int, default=16384, help="vocab for markov_draft (ratios do not depend on V)")
    p.add_argument("--markov-gamma", type=int, default=2)
    p.add_argument("--ops", default="rejection_sample,markov_draft")
    p.add_argument("--out")
    args = p.parse_args(argv)
    traffic = _traffic()
    rows = []
    ops = args.ops.split(",")
    if "rejection_sample" in ops:
        rows += measure_rejection(traffic, args.R, args.gamma, args.V)
    if "markov_draft" in ops:
        rows += measure_markov(traffic, args.markov_R, args.markov_gamma, args.markov_V)
    report = {"schema": "dspark-traffic/1", "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
