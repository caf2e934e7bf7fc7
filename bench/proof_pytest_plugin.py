"""pytest plugin used by bench.gpu_proof: one JSON line per test outcome, written as each test ends.

Enabled with ``-p bench.proof_pytest_plugin`` and the path in the environment
variable DSPARK_PROOF_RESULTS. Lines are appended (and flushed) as tests end,
so a run killed at its time limit still leaves the outcome of every test that
finished. Under pytest-xdist only the controller writes (workers' reports
reach it), so each outcome is written once.

Line: {"nodeid", "outcome": passed | failed | skipped | error, "when":
setup | call | teardown, "seconds", and "message" (a failure's report tail
or a skip's reason)}. A setup or teardown failure is outcome "error".
"""

from __future__ import annotations

import json
import os

_STATE: dict = {}


def pytest_configure(config):
    path = os.environ.get("DSPARK_PROOF_RESULTS")
    is_worker = hasattr(config, "workerinput")  # pytest-xdist worker: the controller writes
    _STATE["path"] = path if path and not is_worker else None


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2])
    return str(report.longrepr)[-4000:] if report.longrepr is not None else ""


def pytest_runtest_logreport(report):
    path = _STATE.get("path")
    if not path:
        return
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"  # setup or teardown failed
    elif report.when == "setup" and report.skipped:
        outcome = "skipped"
    else:
        return
    line = {"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
            "seconds": round(float(report.duration), 4)}
    if outcome != "passed":
        line["message"] = _message(report)
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
