"""One call from options to outputs: models, sweep, SLA table, files (the CLI and the Python API)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from dataclasses import dataclass, field

from .acceptance import WORKLOADS, AcceptanceModel, load_acceptance_log
from .core import DEFAULT_POLICIES, parse_policies, sweep
from .report import curves, format_sla_table, per_user_at, plot_concurrency, plot_frontier, sla_table, write_points
from .steptime import StepModel, load_sps_json, named_profile, profile_names

__all__ = ["DEFAULT_PROFILES", "DEFAULT_SLAS", "Simulation", "simulate", "matched_throughput_gains"]

# One dense and one MoE target, each on the GPU the paper's class of deployment uses.
DEFAULT_PROFILES = ("llama3-8b@h100", "deepseek-v3@h200")
# The paper's two headline SLAs: 80 tok/s/user (V4-Flash, +51 %) and 35 tok/s/user (V4-Pro, +52 %).
DEFAULT_SLAS = (35.0, 80.0)
# Drafts per round: the paper's production configuration (§5.1, "maximum block size to γ=5", the
# "DSpark-5" of its serving results). Table 1's drafters (and the acceptance defaults) are block-7; γ = 5
# uses their first five positions. --gamma 7 runs the offline block size.
DEFAULT_GAMMA = 5


@dataclass
class Simulation:
    """What :func:`simulate` produced (files are empty when no out_dir was given)."""

    points: list
    skipped: list
    sla_rows: list
    table: str
    gains: list  # matched_throughput_gains rows
    models: list
    workloads: list
    policies: list
    wall_seconds: float
    files: dict = field(default_factory=dict)


def matched_throughput_gains(points: list, policy: str, baseline: str = "mtp1", samples: int = 40) -> list:
    """Per (profile, workload): min and max of u_policy(T) / u_baseline(T) − 1 over throughputs T both
    reach (log grid of ``samples`` levels), the paper's "faster per-user generation at matched throughput"."""
    rows = []
    for (profile, workload), by_policy in curves(points).items():
        a, b = by_policy.get(policy), by_policy.get(baseline)
        if not a or not b:
            continue
        lo = max(min(p["throughput_tok_s_gpu"] for p in a), min(p["throughput_tok_s_gpu"] for p in b))
        hi = min(max(p["throughput_tok_s_gpu"] for p in a), max(p["throughput_tok_s_gpu"] for p in b))
        if not hi > lo > 0:
            continue
        ratios = []
        for k in range(samples):
            t = lo * (hi / lo) ** (k / (samples - 1))
            ua, ub = per_user_at(a, t), per_user_at(b, t)
            if ua is not None and ub:
                ratios.append(100.0 * (ua / ub - 1.0))
        if ratios:
            rows.append({"profile": profile, "workload": workload, "policy": policy, "baseline": baseline,
                         "throughput_range": [lo, hi], "gain_min": min(ratios), "gain_max": max(ratios)})
    return rows


def _models(profiles, sps_json, dspark_layers, dspark_draft_cost, gamma) -> list[StepModel]:
    names = list(profiles)
    if names == ["all"]:
        names = profile_names()
    models: list[StepModel] = [named_profile(n, dspark_layers=dspark_layers, dspark_draft_cost=dspark_draft_cost)
                               for n in names]
    for path in sps_json:
        table = load_sps_json(path)
        measured = table.meta.get("gamma")
        if measured is not None and measured != gamma and "dspark" in table.draft_seconds:
            raise ValueError(f"{path}: its DSpark draft times were measured at γ = {measured}, but gamma = {gamma}: "
                             f"simulate at --gamma {measured} or re-measure")
        if dspark_draft_cost == "mtp":
            draft = dict(table.draft_seconds)
            draft["dspark"] = draft.get("mtp", 0.0)
            table = dataclasses.replace(table, draft_seconds=draft)
        models.append(table)
    if not models:
        raise ValueError("no step-time profile: give profiles or an SPS table (sps_json)")
    if len({m.name for m in models}) != len(models):
        raise ValueError(f"profile names must be distinct, got {[m.name for m in models]}")
    return models


def _workloads(names, logs, auroc, ece, context) -> list[AcceptanceModel]:
    out = []
    for name in names:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}: choose from {', '.join(WORKLOADS)} "
                             f"or fit one from a log (acceptance_logs)")
        out.append(WORKLOADS[name])
    out += [load_acceptance_log(path) for path in logs]
    if not out:
        raise ValueError("no workload given")
    out = [w.with_overrides(auroc=auroc, ece=ece, context_tokens=context) for w in out]
    if len({w.name for w in out}) != len(out):
        raise ValueError(f"workload names must be distinct, got {[w.name for w in out]}")
    return out


def simulate(out_dir=None, *, profiles=DEFAULT_PROFILES, sps_json=(), workloads=tuple(WORKLOADS),
             acceptance_logs=(), policies: str = DEFAULT_POLICIES, gamma: int = DEFAULT_GAMMA, concurrency=None,
             slas=DEFAULT_SLAS, seed: int = 0, request_rounds: int = 4096, min_rounds: int = 48,
             max_rounds: int = 512, auroc: float | None = None, ece: float | None = None,
             context: float | None = None, dspark_layers: int | None = None, dspark_draft_cost: str = "modelled",
             plots: bool = True, progress: bool = False) -> Simulation:
    """Run the sweep and, with ``out_dir``, write points.json, run.json, sla.txt, frontier.png and
    concurrency.png there. See ``python -m dspark_kernels simulate --help`` for every option."""
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be a positive int, got {gamma!r}")
    for name, value in (("request_rounds", request_rounds), ("min_rounds", min_rounds), ("max_rounds", max_rounds)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if min_rounds > max_rounds:
        raise ValueError(f"min_rounds ({min_rounds}) must not exceed max_rounds ({max_rounds})")
    if concurrency is not None:
        concurrency = sorted({int(c) for c in concurrency})
        if not concurrency or concurrency[0] < 1:
            raise ValueError("concurrency values must be positive integers")
    slas = [float(s) for s in slas]
    if any(not (s > 0 and math.isfinite(s)) for s in slas):
        raise ValueError(f"SLAs must be positive per-user speeds (tok/s), got {slas}")
    models = _models(profiles, sps_json, dspark_layers, dspark_draft_cost, gamma)
    wls = _workloads(workloads, acceptance_logs, auroc, ece, context)
    short = [w.name for w in wls if w.gamma_max < gamma]
    if short:
        raise ValueError(f"gamma = {gamma} but workload(s) {', '.join(short)} define acceptance for fewer "
                         f"positions (min {min(w.gamma_max for w in wls)})")
    pols = parse_policies(policies, gamma)
    result = sweep(models, wls, pols, gamma=gamma, seed=seed, concurrency=concurrency,
                   request_rounds=request_rounds, min_rounds=min_rounds, max_rounds=max_rounds, progress=progress)
    if not result.points:
        raise ValueError("no point was simulated: every concurrency is over the profiles' capacity limits")
    rows = sla_table(result.points, slas) if any(p.name == "mtp1" for p in pols) else \
        sla_table(result.points, slas, baseline=pols[0].name)
    table = format_sla_table(rows, [p.name for p in pols])
    baseline = rows[0]["baseline"] if rows else "mtp1"
    gains = [g for p in pols if p.kind in ("causal", "async")
             for g in matched_throughput_gains(result.points, p.name, baseline)]
    sim = Simulation(result.points, result.skipped, rows, table, gains, models, wls, pols, result.wall_seconds)
    if out_dir is not None:
        sim.files = _write(sim, pathlib.Path(os.fspath(out_dir)), slas, plots, seed=seed, gamma=gamma,
                           rounds=(request_rounds, min_rounds, max_rounds))
    return sim


def _write(sim: Simulation, out: pathlib.Path, slas, plots: bool, **settings) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {"points": write_points(sim.points, out / "points.json")}
    run = {
        "settings": {**settings, "slas": list(slas), "policies": [p.__dict__ for p in sim.policies]},
        "profiles": [m.describe() for m in sim.models],
        "workloads": [w.describe() for w in sim.workloads],
        "skipped": [list(s) for s in sim.skipped],
        "sla_table": [{**{k: v for k, v in r.items() if k != "values"},
                       "values": {n: {"throughput": t, "gain_percent": g, "saturated": s}
                                  for n, (t, g, s) in r["values"].items()}} for r in sim.sla_rows],
        "matched_throughput_gains": sim.gains,
    }
    files["run"] = out / "run.json"
    files["run"].write_text(json.dumps(run, indent=1, sort_keys=True, allow_nan=False, default=_json_default) + "\n")
    files["sla"] = out / "sla.txt"
    files["sla"].write_text(sim.table + "\n")
    if plots:
        files["frontier"] = plot_frontier(sim.points, out / "frontier.png", slas=slas)
        files["concurrency"] = plot_concurrency(sim.points, out / "concurrency.png")
    return files


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")
