"""The GPU proof script (bench/gpu_proof.py) works end to end before a GPU exists.

The dry run is the same seven stages on CPU with tiny shapes: it proves the
script's plumbing (stage order, budgets, subprocesses, per-test JSON lines,
benchmark merging, outputs the device tool can return) so that the few GPU
minutes a session is lent are not spent debugging the script itself.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import gpu_proof, proof_kernels  # noqa: E402

STAGE_NAMES = ["env", "build", "tests", "headline", "sanitizer", "sps", "grid"]
OUT_FILES = {"proof.json", "summary.md", "plots.png", "logs.tar.gz"}


def _run(tmp_path, *args, env=None, timeout=600):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.gpu_proof", "--out", str(out), "--work", str(tmp_path / "work"), *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    doc = json.loads((out / "proof.json").read_text()) if (out / "proof.json").exists() else None
    return res, out, doc


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry")
    res, out, doc = _run(tmp, "--dry-run", "--commit", "0123abcd")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-6000:]
    return res, out, doc


def test_dry_run_writes_only_what_the_device_tool_returns(dry):
    _, out, _ = dry
    # The device tool brings back at most 8 plain files, no deeper than 2 folders.
    assert set(os.listdir(out)) == OUT_FILES
    assert all((out / f).is_file() for f in OUT_FILES)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    for want in ("logs/tests_gpu.log", "tests_gpu.jsonl", "logs/kernels_plain.log",
                 *(f"bench/headline_{op}.json" for op in ("markov_draft", "rejection_sample", "schedule_verify",
                                                         "verify_attention"))):
        assert want in names, (want, names)


def test_dry_run_stages_in_order_with_their_outcomes(dry):
    res, out, doc = dry
    stages = doc["stages"]
    assert [s["name"] for s in stages] == STAGE_NAMES
    assert [s["number"] for s in stages] == list(range(1, 8))
    status = {s["name"]: s for s in stages}
    assert status["build"]["status"] == "skipped" and "--dry-run" in status["build"]["reason"]
    for name in ("env", "tests", "headline", "sanitizer", "sps", "grid"):
        assert status[name]["status"] == "pass", status[name]
        assert 0 <= status[name]["seconds"] <= status[name]["budget_s"] + 5
    assert doc["meta"]["dry_run"] is True and doc["meta"]["commit"] == "0123abcd"
    # The recap comes last on stdout: it is what a cut-off output tail still shows.
    tail = res.stdout[-3000:]
    assert "## Recap" in tail and "headline verify_attention" in tail


def test_dry_run_measures_ceilings_and_the_environment(dry):
    _, _, doc = dry
    env = doc["stages"][0]
    for key in ("copy_bytes_per_s", "matmul_flop_per_s"):
        value = env["ceilings"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0
    info = env["environment"]
    assert info["torch"] == torch.__version__ and info["commit"] == "0123abcd"
    assert info["cuda_available"] is False  # the dry run hides any GPU


def test_dry_run_runs_the_gpu_tests_which_all_skip_on_cpu(dry, tmp_path):
    _, out, doc = dry
    part = doc["stages"][2]["parts"]["gpu"]
    counts = part["counts"]
    assert counts["passed"] == counts["failed"] == counts["error"] == 0
    assert counts["skipped"] > 0
    with tarfile.open(out / "logs.tar.gz") as tar:
        tar.extract("tests_gpu.jsonl", tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "tests_gpu.jsonl").read_text().splitlines()]
    assert len(lines) == counts["skipped"]
    assert all(x["outcome"] == "skipped" and "GPU" in x["message"] for x in lines)
    # Exactly the tests marked gpu: collect them independently.
    co = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "tests"], cwd=ROOT,
                        capture_output=True, text=True)
    collected = [ln for ln in co.stdout.splitlines() if "::" in ln]
    assert sorted(collected) == sorted(x["nodeid"] for x in lines)
    assert doc["stages"][2]["parts"]["rest"]["not_run"].startswith("--dry-run")


def test_dry_run_benchmarks_every_op_and_merges_reports(dry):
    _, out, doc = dry
    bench = doc["benchmarks"]
    assert set(bench) == {"markov_draft", "rejection_sample", "schedule_verify", "verify_attention"}
    for op, merged in bench.items():
        headline = [c for c in merged["cases"].values() if c["headline"]]
        assert headline, op
        for case in headline:
            for name in ("reference-eager", "triton"):
                assert case["providers"][name]["status"] == "ok", (op, name, case["providers"][name])
            assert case["floor"]["floor_us"] > 0
    # Stage 7's run was merged into the same op's cases.
    labels = [r["label"] for r in bench["schedule_verify"]["runs"]]
    assert labels == ["headline_schedule_verify", "grid_schedule_verify"]
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for name in STAGE_NAMES:
        assert f"| {name} |" in summary or f" {name} |" in summary


def test_dry_run_measures_a_smoke_sps_table_and_simulates_on_it(dry):
    _, out, doc = dry
    sps = doc["stages"][5]
    assert sps["name"] == "sps" and "--smoke" in sps["command"]
    table = sps["table"]
    assert table["format"] == "dspark_kernels.sps_table" and table["meta"]["target_shape"] == "smoke"
    assert len(table["sps"]) == 25 and table["sps"][0] == 0
    assert {c for c, _ in table["meta"]["draft_seconds"]["dspark"]} == {1, 2, 4}
    assert sps["simulate"]["rc"] == 0 and "SLA tok/s/user" in sps["simulate"]["sla_table"]
    assert "## Simulator on the SPS table measured here" in (out / "summary.md").read_text()


def test_dry_run_calls_every_kernel_without_the_sanitizer(dry):
    _, _, doc = dry
    san = doc["stages"][4]
    assert san["sanitizer"] == "skipped: --dry-run"
    calls, failures = map(int, re.fullmatch(r"(\d+) kernel calls, (\d+) failures", san["calls"]).groups())
    assert failures == 0 and calls >= len([v for v in proof_kernels.VARIANTS if v[0] != "pack_verify"])


def test_stage_selection_budget_and_timeout(tmp_path):
    # proof_kernels takes ~8 s interpreted: a 2 s budget cuts it, and the run says so without failing.
    t0 = time.monotonic()
    res, _, doc = _run(tmp_path, "--dry-run", "--stages", "1,sanitizer", "--stage-budget", "sanitizer=2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert time.monotonic() - t0 < 60
    status = {s["name"]: s for s in doc["stages"]}
    assert status["env"]["status"] == "pass"
    assert status["sanitizer"]["status"] == "timeout"
    for name in ("build", "tests", "headline", "grid"):
        assert status[name]["status"] == "not run" and "not selected" in status[name]["reason"]


def test_a_failing_stage_fails_the_run(tmp_path):
    # A pytest usage error (exit 4) is a failure of the tests stage, not a skip.
    res, _, doc = _run(tmp_path, "--dry-run", "--stages", "tests", env={"PYTEST_ADDOPTS": "--no-such-flag"})
    assert res.returncode == 1
    assert {s["name"]: s["status"] for s in doc["stages"]}["tests"] == "fail"


def test_no_time_left_means_not_run(tmp_path):
    res, _, doc = _run(tmp_path, "--dry-run", "--budget", "3")
    assert res.returncode == 0
    assert all(s["status"] == "not run" for s in doc["stages"][1:]), doc["stages"]


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan killed here may wait for a reaper that never comes)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_run_cmd_kills_the_whole_process_group(tmp_path):
    ctx = gpu_proof.Ctx(out=str(tmp_path), work=str(tmp_path), dry=True, deadline=time.monotonic() + 60,
                        env=dict(os.environ), jobs=1)
    pid_file = tmp_path / "child.pid"
    t0 = time.monotonic()
    rec = gpu_proof.run_cmd(ctx, "sleeper", ["bash", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], limit=1.5)
    assert rec["timed_out"] is True and rec["rc"] is None
    assert time.monotonic() - t0 < 15
    child = int(pid_file.read_text())
    time.sleep(0.2)
    assert not _running(child)  # the background child died with its group
    ok = gpu_proof.run_cmd(ctx, "quick", ["bash", "-c", "echo hello; exit 3"], limit=10)
    assert ok["rc"] == 3 and not ok["timed_out"] and "hello" in ok["tail"]


def test_merge_summary_and_plot_on_a_synthetic_grid(tmp_path):
    def report(label_rs, status="ok"):
        cases = []
        for R in label_rs:
            cases.append({"name": f"R={R}", "params": {"R": R, "gamma": 7}, "floor": {"floor_us": 10.0 * R},
                          "providers": {"triton": {"status": status, "median_us": 20.0 * R, "reason": "boom"},
                                        "cuda": {"status": "skipped", "reason": "not built"}}})
        return {"op": "toy", "meta": {"argv": [], "date": "d"}, "cases": cases, "errors": []}

    store: dict = {}
    gpu_proof.merge_report(store, "headline_toy", report([64]))
    gpu_proof.merge_report(store, "grid_toy", report([1, 8, 64], status="error"))
    cases = store["toy"]["cases"]
    assert set(cases) == {"R=1", "R=8", "R=64"}
    assert cases["R=64"]["headline"] and not cases["R=1"]["headline"]
    assert cases["R=64"]["providers"]["triton"]["status"] == "ok"  # a later error never hides an earlier result
    rows = "\n".join(gpu_proof.benchmark_rows(store["toy"], headline_only=False))
    assert "| R=64 | 640 | triton | 1280 | 2 | 1 |" in rows
    assert "ERROR: boom" in rows and "cuda skipped in 3 case(s): not built" in rows
    assert gpu_proof.make_plot(store, str(tmp_path / "p.png")) is None
    assert (tmp_path / "p.png").stat().st_size > 1000


@pytest.mark.skipif(shutil.which("nvcc") is None or gpu_proof._cuobjdump() is None,
                    reason="needs nvcc and a cuobjdump")
def test_kernel_resources_reads_cuobjdump(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("template <int N> __global__ void tile(float* x) { __shared__ float s[N];"
                   " s[threadIdx.x] = x[threadIdx.x]; __syncthreads(); x[threadIdx.x] = s[N - 1 - threadIdx.x]; }\n"
                   "template __global__ void tile<512>(float*);\n")
    lib = tmp_path / "k.so"
    subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a", str(src),
                    "-o", str(lib)], check=True, capture_output=True)
    found = gpu_proof.kernel_resources(str(lib))
    assert len(found) == 1, found
    assert "tile" in found[0]["kernel"] and found[0]["registers"] > 0
    assert found[0]["shared"] >= 512 * 4 and found[0]["local"] == 0


def test_compare_catches_differences():
    a = torch.tensor([1, 2, 3], dtype=torch.int32)
    assert proof_kernels.compare((a, torch.ones(3)), (a.clone(), torch.ones(3)), low=False) is None
    assert "integers differ" in proof_kernels.compare((a + 1,), (a,), low=False)
    assert "max error" in proof_kernels.compare((torch.tensor([1.0, 1.001]),), (torch.tensor([1.0, 1.0]),), low=False)
    assert proof_kernels.compare((torch.tensor([1.0, 1.001]),), (torch.tensor([1.0, 1.0]),), low=True) is None
    assert "non-finite" in proof_kernels.compare((torch.tensor([float("nan")]),), (torch.tensor([1.0]),), low=True)
    assert "shape" in proof_kernels.compare((torch.ones(2),), (torch.ones(3),), low=False)


def test_no_stage_reaches_the_network():
    """The only install is from a local wheel folder, with --no-index."""
    text = open(os.path.join(ROOT, "bench", "gpu_proof.py")).read()
    pip_calls = [ln for ln in text.splitlines() if '"pip"' in ln]
    assert pip_calls and all("--no-index" in ln for ln in pip_calls), pip_calls
    for word in ("urllib", "import requests", "http://", "https://", "git clone", "curl ", "wget"):
        assert word not in text, word
