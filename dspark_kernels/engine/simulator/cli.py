"""``python -m dspark_kernels simulate --out DIR [options]``: the serving simulator's command line."""

from __future__ import annotations

import argparse
import sys
import time

from .acceptance import WORKLOADS
from .core import DEFAULT_POLICIES
from .run import DEFAULT_GAMMA, DEFAULT_PROFILES, DEFAULT_SLAS, simulate
from .steptime import profile_names

PROG = "python -m dspark_kernels simulate"

DESCRIPTION = (
    "Closed-loop serving simulation of DSpark speculative decoding: C concurrent requests (swept), each "
    "round the drafter proposes γ drafts with confidences, the policy picks verify lengths (mtp1: one "
    "draft; fixed<γ>: all γ; causal / async: the package's schedule_verify, reference backend), the "
    "round takes the step-time model's time for the B verify tokens plus the draft, acceptance is drawn "
    "from the workload's model, finished requests are replaced. Step-time models: a roofline of a named "
    f"target on a named GPU ({', '.join(profile_names())}) or a measured SPS table (--sps-json, the "
    "format of dspark_kernels.engine.simulator.save_sps_json). Writes points.json, run.json, sla.txt, "
    "frontier.png (throughput vs per-user speed) and concurrency.png (throughput and verify budget vs "
    "concurrency) to --out and prints the throughput at each per-user SLA with the gain over MTP-1. "
    "The default sweep takes well under a minute on a CPU."
)


def _csv(kind):
    def parse(text: str):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") \
                from exc
    return parse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--profiles", type=_csv(str), default=list(DEFAULT_PROFILES),
                   help=f"roofline profiles, comma-separated, or 'all' (default {','.join(DEFAULT_PROFILES)}; "
                        f"choices {', '.join(profile_names())}); '' for none (then give --sps-json)")
    p.add_argument("--sps-json", action="append", default=[], metavar="FILE",
                   help="a measured SPS table (JSON written by save_sps_json); repeatable")
    p.add_argument("--workloads", type=_csv(str), default=list(WORKLOADS),
                   help=f"acceptance models, comma-separated (default {','.join(WORKLOADS)})")
    p.add_argument("--acceptance-log", action="append", default=[], metavar="FILE",
                   help="fit a workload from a JSON log {accepted_len, confidence[, observed_len, name]} (written by "
                        "engine.simulator.AcceptanceLog or python -m dspark_kernels demo --acceptance-log); "
                        "repeatable")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"default {DEFAULT_POLICIES}")
    p.add_argument("--gamma", type=int, default=DEFAULT_GAMMA,
                   help=f"drafts per round of the DSpark drafter (default {DEFAULT_GAMMA})")
    p.add_argument("--concurrency", type=_csv(int), default=None,
                   help="concurrencies to simulate (default: powers of two up to each profile's KV capacity)")
    p.add_argument("--sla", type=_csv(float), default=list(DEFAULT_SLAS),
                   help="per-user speed SLAs in tok/s for the table (default 35,80)")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0); same seed, same JSON")
    p.add_argument("--request-rounds", type=int, default=4096,
                   help="request-rounds per point: rounds = this / C, clamped to [--min-rounds, --max-rounds]")
    p.add_argument("--min-rounds", type=int, default=48, help="default 48")
    p.add_argument("--max-rounds", type=int, default=512, help="default 512")
    p.add_argument("--auroc", type=float, default=None, help="override every workload's confidence AUROC (one value for every position; default: the paper's Fig. 6 per-position values)")
    p.add_argument("--ece", type=float, default=None, help="override every workload's confidence ECE")
    p.add_argument("--context", type=float, default=None, help="override every workload's mean context (tokens)")
    p.add_argument("--dspark-layers", type=int, default=None,
                   help="target layers the DSpark backbone costs (default: 5 on llama3-8b, the paper's Table 1 "
                        "drafters; 3 on deepseek-v3, its production drafter)")
    p.add_argument("--dspark-draft-cost", choices=("modelled", "mtp"), default="modelled",
                   help="'mtp': the DSpark drafter costs what MTP-1's does (isolates the scheduler)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run_simulate(args: argparse.Namespace) -> int:
    """The command on parsed options: 0 on success, 2 on a bad option value (message on stderr)."""
    t0 = time.perf_counter()
    profiles = [] if args.profiles == [] else args.profiles
    try:
        sim = simulate(args.out, profiles=profiles, sps_json=args.sps_json, workloads=args.workloads,
                       acceptance_logs=args.acceptance_log, policies=args.policies, gamma=args.gamma,
                       concurrency=args.concurrency, slas=args.sla, seed=args.seed,
                       request_rounds=args.request_rounds, min_rounds=args.min_rounds, max_rounds=args.max_rounds,
                       auroc=args.auroc, ece=args.ece, context=args.context, dspark_layers=args.dspark_layers,
                       dspark_draft_cost=args.dspark_draft_cost, plots=not args.no_plots, progress=not args.quiet)
    except (ValueError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    print(f"DSpark serving simulation: {len(sim.points)} points "
          f"({', '.join(m.name for m in sim.models)} x {', '.join(w.name for w in sim.workloads)} x "
          f"{', '.join(p.name for p in sim.policies)}), seed {args.seed}")
    for name, wl, c, why in sim.skipped:
        print(f"  skipped {name} {wl} C={c}: {why}")
    print()
    print(sim.table)
    if sim.gains:
        print()
        print(f"Per-user speed at matched throughput, gain over {sim.gains[0]['baseline']} (min .. max over the "
              f"throughputs both reach):")
        for g in sim.gains:
            print(f"  {g['profile']:<18} {g['workload']:<6} {g['policy']:<7} {g['gain_min']:+.0f}% .. "
                  f"{g['gain_max']:+.0f}%")
    print()
    for kind, path in sim.files.items():
        print(f"wrote {path}")
    print(f"simulation {sim.wall_seconds:.1f} s, total {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    return run_simulate(add_arguments(p).parse_args(argv))
