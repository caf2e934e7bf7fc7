"""Capacity planning: a closed-loop serving simulator that drives the package's real scheduler.

``python -m dspark_kernels simulate --out DIR`` or, from Python::

    from dspark_kernels.engine.simulator import simulate
    sim = simulate("out/", profiles=["deepseek-v3@h200"], workloads=["code"], slas=[35, 80])
    print(sim.table)

C concurrent requests run draft-and-verify rounds; every round the policy picks verify lengths
(MTP-1, fixed γ, or ``dspark_kernels.schedule_verify`` in "causal" / "async" mode, called once on
the [C, γ] survival), the round costs a step-time model's time, acceptance is drawn from a
workload model, finished requests are replaced. Throughput (tok/s/GPU) against per-user speed
(tok/s) traces each policy's frontier; the SLA table reads it at chosen per-user speeds.

Modules (each docstring states its math, units and the source of every constant):

- ``steptime``: the roofline model of a named target on a named GPU (``llama3-8b``,
  ``deepseek-v3`` on ``h100``, ``h200``) and measured SPS tables (``save_sps_json`` /
  ``load_sps_json``: engine.sps_table has no file format of its own).
- ``acceptance``: per-position acceptance per workload (math, code, chat: the DSpark paper's Table 1
  and Fig. 2 numbers), a binormal confidence head of stated AUROC and ECE (Fig. 6), and
  ``fit_acceptance`` from a log of rounds.
- ``core``: policies and the simulation loop; ``report``: frontiers, SLA table, figures;
  ``run``: :func:`simulate`; ``cli``: the command.
"""

from .acceptance import WORKLOADS, AcceptanceLog, AcceptanceModel, fit_acceptance, load_acceptance_log
from .core import DEFAULT_POLICIES, Policy, parse_policies, simulate_point, sweep
from .report import format_sla_table, per_user_at, sla_table, throughput_at
from .run import DEFAULT_PROFILES, DEFAULT_SLAS, Simulation, matched_throughput_gains, simulate
from .steptime import (GPUS, TARGETS, RooflineStepModel, TableStepModel, load_sps_json, named_profile,
                       profile_names, save_sps_json)

__all__ = [
    "AcceptanceLog", "AcceptanceModel", "DEFAULT_POLICIES", "DEFAULT_PROFILES", "DEFAULT_SLAS", "GPUS", "Policy",
    "RooflineStepModel", "Simulation", "TARGETS", "TableStepModel", "WORKLOADS", "fit_acceptance",
    "format_sla_table", "load_acceptance_log", "load_sps_json", "matched_throughput_gains", "named_profile",
    "parse_policies", "per_user_at", "profile_names", "save_sps_json", "simulate", "simulate_point",
    "sla_table", "sweep", "throughput_at",
]
