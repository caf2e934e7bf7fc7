"""Smoke tests of the benchmark scripts in bench/: they run end to end and report what they must.

Each script runs in --smoke mode (tiny shapes, two timed calls, Triton through
its interpreter on CPU, torch.compile with aot_eager on CPU) in this process,
writing its JSON under tmp_path; the test checks the report's fields and that
its numbers are positive and finite, and that the table was printed. Speed is
never asserted here: the benchmarks measure it, on a GPU.
"""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from support import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TABLE_HEADER = ("case", "provider", "median_us", "floor_us", "%floor", "x_fastest")
TIMES = ("median_us", "p10_us", "p90_us", "mean_us", "min_us")

def _scripts() -> dict:
    """Every bench/bench_<op>.py that declares SMOKE_TEST: name -> (extra smoke arguments, shape keys)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "bench_*.py"))):
        name = os.path.basename(path)[:-3]
        module = importlib.import_module(f"bench.{name}")
        if hasattr(module, "SMOKE_TEST"):
            found[name] = module.SMOKE_TEST
    return found


SCRIPTS = _scripts()
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _load(name: str):
    return importlib.import_module(f"bench.{name}")


def check_report(report: dict, name: str, shape_keys) -> None:
    """The fields every benchmark report must carry, with sane values."""
    meta = report["meta"]
    assert isinstance(meta["device"], str) and meta["device"]
    assert meta["device_type"] == torch.device(DEVICE).type
    assert meta["torch_version"] == torch.__version__
    try:
        import triton
    except ImportError:
        assert meta["triton_version"] is None
    else:
        assert meta["triton_version"] == triton.__version__
    commit = meta["git_commit"]
    assert commit == "unknown" or (len(commit) == 40 and all(c in "0123456789abcdef" for c in commit)), commit
    assert meta["peaks"]["bandwidth_bytes_per_s"] > 0 and meta["peaks"]["flop_rate_per_s"] > 0
    assert meta["smoke"] is True

    assert report["errors"] == [], report["errors"]
    names = list(report["providers"])
    assert "reference-eager" in names
    assert report["cases"], "no case ran"
    for case in report["cases"]:
        for key in shape_keys:
            assert key in case["params"], (case["name"], key)
        floor = case["floor"]
        assert _positive_finite(floor["floor_us"]) and _positive_finite(floor["bytes"]), floor
        assert floor["flops"] >= 0 and floor["bound"] in ("memory", "compute")
        assert case["floor_us"] == floor["floor_us"]
        assert set(case["providers"]) == set(names)
        ok = {n: r for n, r in case["providers"].items() if r["status"] == "ok"}
        for n, r in case["providers"].items():
            assert r["status"] in ("ok", "skipped", "unavailable"), (case["name"], n, r)
            if r["status"] != "ok":
                assert r["reason"], (case["name"], n, r)
        must = getattr(_load(name), "SMOKE_MUST_RUN", ("reference-eager", "reference-compiled"))
        if INTERPRETED and name != "bench_verify_attention":
            must = must + ("triton",)
        for n in must:
            assert n in ok, (case["name"], n, case["providers"][n])
        for n, r in ok.items():
            for key in TIMES:
                assert _positive_finite(r[key]), (case["name"], n, key, r[key])
            assert r["p10_us"] <= r["median_us"] <= r["p90_us"]
            assert r["n_timed"] >= 1
            assert _positive_finite(r["percent_of_floor"])
            assert math.isclose(r["percent_of_floor"], case["floor_us"] / r["median_us"] * 100, rel_tol=1e-9)
            assert _positive_finite(r["time_ratio_to_fastest"]) and r["time_ratio_to_fastest"] >= 1.0
            assert _positive_finite(r["speedup_over_reference_eager"])
            match = r["tokens_match_reference"]
            assert match is None or 0.0 <= match <= 1.0
        assert case["fastest"] in ok
        ratios = case["time_ratios"]
        assert set(ratios) == set(ok)
        for a in ok:
            assert set(ratios[a]) == set(ok) - {a}
            for b, value in ratios[a].items():
                assert _positive_finite(value)
                assert math.isclose(value, ok[a]["median_us"] / ok[b]["median_us"], rel_tol=1e-9)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_smoke_report(name, tmp_path, capsys):
    extra, shape_keys = SCRIPTS[name]
    path = tmp_path / f"{name}.json"
    report = _load(name).main(["--smoke", "--device", DEVICE, "--out", str(path), "--quiet", *extra])
    printed = capsys.readouterr().out

    data = json.loads(path.read_text())
    assert data == json.loads(json.dumps(report)), "the JSON file differs from the returned report"
    assert data["op"] == name.removeprefix("bench_")
    check_report(data, name, shape_keys)

    assert all(word in printed for word in TABLE_HEADER), printed[-2000:]
    assert f"{data['op']} on {data['meta']['device']}" in printed
    for case in data["cases"]:
        for provider in case["providers"]:
            assert any(case["name"] in line and provider in line for line in printed.splitlines()), \
                (case["name"], provider)
    assert f"wrote {path}" in printed


def test_schedule_verify_goal(tmp_path):
    """The absolute goal is reported; without CUDA (or without the goal case) it is 'not measured'."""
    bench = _load("bench_schedule_verify")
    report = bench.main(["--smoke", "--device", DEVICE, "--quiet", "--providers", "reference-eager"])
    goal = report["goal"]
    assert goal["target_us"] == bench.GOAL_US and goal["R"] == 1024 and goal["gamma"] == 16
    assert goal["met"] is None and goal["status"].startswith("not measured")

    # A synthetic report at the goal shape: the verdict follows the best graph replay of each mode.
    def fake(mode, medians):
        providers = {name: {"status": "ok", "median_us": us} for name, us in medians.items()}
        return {"params": {"R": 1024, "gamma": 16, "mode": mode}, "providers": providers}

    report = {"meta": {"device_type": "cuda"},
              "cases": [fake("causal", {"triton+graph": 12.0, "cuda+graph": 7.5, "triton": 3.0}),
                        fake("async", {"triton+graph": 9.0})]}
    goal = bench.evaluate_goal(report)
    assert goal["met"] is True and goal["status"] == "met"
    assert goal["per_mode"]["causal"]["best_provider"] == "cuda+graph"
    assert report["cases"][0]["providers"]["triton+graph"]["goal_met"] is False
    report["cases"][1]["providers"]["triton+graph"]["median_us"] = 10.5
    goal = bench.evaluate_goal(report)
    assert goal["met"] is False and goal["status"] == "missed"


def test_verify_capacity_goal_follows_the_best_graph_replay():
    """The same goal logic (harness.goal_cases / best_graph_replay) for verify_capacity's single case."""
    bench = _load("bench_verify_capacity")
    case = {"params": {"R": bench.GOAL_R, "gamma": bench.GOAL_GAMMA},
            "providers": {"triton+graph": {"status": "ok", "median_us": bench.GOAL_US + 1.0},
                          "reference-eager+graph": {"status": "ok", "median_us": bench.GOAL_US - 1.0},
                          "triton": {"status": "ok", "median_us": 0.5}}}
    goal = bench.evaluate_goal({"meta": {"device_type": "cuda"}, "cases": [case]})
    assert goal["status"] == "met" and goal["best_provider"] == "reference-eager+graph"
    assert goal["all"] == {"triton+graph": bench.GOAL_US + 1.0, "reference-eager+graph": bench.GOAL_US - 1.0}
    case["providers"]["reference-eager+graph"]["status"] = "error"
    assert bench.evaluate_goal({"meta": {"device_type": "cuda"}, "cases": [case]})["status"] == "missed"
    assert bench.evaluate_goal({"meta": {"device_type": "cpu"}, "cases": [case]})["status"].startswith("not measured")
    assert "no case" in bench.evaluate_goal({"meta": {"device_type": "cuda"}, "cases": []})["status"]


def test_external_peer_failure_is_unavailable(capsys):
    """A peer library whose API does not match is recorded as unavailable, never as an error of the run."""
    from bench import harness

    case = harness.Case(op="toy", name="toy n=3", params={"n": 3}, make_inputs=lambda: {"x": torch.ones(3)},
                        floor_bytes=12, floor_flops=0, extract=lambda out: out)

    def good(case):
        return lambda x: x["x"] * 2

    def mismatched(case):
        def call(x):
            raise TypeError("sample() got an unexpected keyword argument 'top_k'")
        return call

    providers = [harness.Provider(harness.REFERENCE_EAGER, good),
                 harness.Provider("peer", mismatched, external=True),
                 harness.Provider("ours", mismatched)]
    cfg = harness.RunConfig(device=torch.device("cpu"), warmup=0, iters=2, verbose=False)
    report = harness.run_benchmark("toy", [case], providers, cfg)
    records = report["cases"][0]["providers"]
    assert records["peer"]["status"] == "unavailable" and "unexpected keyword" in records["peer"]["reason"]
    assert records["ours"]["status"] == "error"
    assert report["errors"] == ["toy n=3 / ours: TypeError: sample() got an unexpected keyword argument 'top_k'"]
    assert harness.exit_code(report) == 1
    assert records[harness.REFERENCE_EAGER]["status"] == "ok"
    table = harness.format_table(report)
    assert "unavailable: TypeError" in table and "ERRORS:" in table


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_describes_usage(name, capsys):
    with pytest.raises(SystemExit) as exc:
        _load(name).main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--smoke", "--out", "--providers", "--device", "--warmup", "--iters"):
        assert flag in text, flag
    assert "Providers" in text or "Providers:" in text
    assert "JSON" in text


def test_script_entry_point_exit_code(tmp_path):
    """`python -m bench.<script>` works from the repository root and exits 0 (cheapest script, one provider)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    path = tmp_path / "sv.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench.bench_schedule_verify", "--smoke", "--device", DEVICE,
         "--providers", "reference-eager", "--out", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "median_us" in res.stdout and "goal:" in res.stdout
    data = json.loads(path.read_text())
    assert data["cases"] and data["cases"][0]["providers"]["reference-eager"]["status"] == "ok"


def _stub_flashinfer(monkeypatch, calls: list):
    """A torch stand-in for flashinfer.sampling with flashinfer-python 0.6.0's signatures.

    It checks the shapes and dtypes the bench scripts hand it, so a wrong
    binding fails here (as "unavailable") rather than on the first GPU run.
    """
    import types

    def softmax(logits, temperature=None, enable_pdl=None):
        calls.append("softmax")
        assert logits.dim() == 2
        if isinstance(temperature, torch.Tensor):
            assert temperature.shape == (logits.shape[0],)
            temperature = temperature[:, None]
        return torch.softmax(logits.float() / (1.0 if temperature is None else temperature), dim=-1)

    def top_k_top_p_sampling_from_logits(logits, top_k, top_p, indices=None, filter_apply_order="top_k_first",
                                         deterministic=True, generator=None, check_nan=False, seed=None,
                                         offset=None):
        calls.append("top_k_top_p_sampling_from_logits")
        assert logits.dim() == 2 and logits.is_contiguous()
        assert top_k.shape == top_p.shape == (logits.shape[0],)
        assert top_k.dtype == torch.int32 and top_p.dtype == torch.float32
        return torch.argmax(logits, dim=-1).to(torch.int32)

    def chain_speculative_sampling(draft_probs, draft_token_ids, target_probs,
                                   maybe_output_accepted_token_num=None, maybe_output_emitted_draft_token_num=None,
                                   deterministic=True, generator=None, seed=None, offset=None):
        calls.append("chain_speculative_sampling")
        b, n = draft_token_ids.shape
        vocab = target_probs.shape[-1]
        assert draft_probs.shape == (b, n, vocab) and target_probs.shape == (b, n + 1, vocab)
        assert draft_probs.dtype == target_probs.dtype == torch.float32
        assert torch.allclose(draft_probs.sum(-1), torch.ones(b, n), atol=1e-4)
        assert torch.allclose(target_probs.sum(-1), torch.ones(b, n + 1), atol=1e-4)
        tokens = torch.cat([draft_token_ids.int(), torch.full((b, 1), -1, dtype=torch.int32)], dim=1)
        zeros = torch.zeros(b, dtype=torch.int32)
        return tokens, zeros, zeros

    package = types.ModuleType("flashinfer")
    sampling = types.ModuleType("flashinfer.sampling")
    for fn in (softmax, top_k_top_p_sampling_from_logits, chain_speculative_sampling):
        setattr(sampling, fn.__name__, fn)
    package.sampling = sampling
    monkeypatch.setitem(sys.modules, "flashinfer", package)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", sampling)


def test_flashinfer_bindings_against_a_stub(monkeypatch):
    """The FlashInfer peers call the 0.6.0 API with the right arguments (a CPU stub stands in for CUDA)."""
    from bench import harness

    calls: list = []
    _stub_flashinfer(monkeypatch, calls)
    cfg = harness.RunConfig(device=torch.device("cpu"), warmup=0, iters=1, verbose=False)
    peaks = harness.device_peaks(cfg.device)

    markov = _load("bench_markov_draft")
    case = markov.make_case(2, 3, 257, 8, torch.float32, torch.device("cpu"))
    case.params["device"] = "cuda"  # the peers refuse CPU tensors; the stub does not care
    chosen = harness.select_providers(markov.providers(), "flashinfer-topk-topp,torch+flashinfer")
    result = harness.run_case(case, chosen, cfg, peaks)
    for name, rec in result["providers"].items():
        assert rec["status"] == "ok", (name, rec)
    assert "top_k_top_p_sampling_from_logits" in calls and "softmax" in calls

    rejection = _load("bench_rejection_sample")
    for mode in rejection.MODES:
        calls.clear()
        case = rejection.make_case(2, 3, 257, mode, torch.float32, 0.8, torch.device("cpu"))
        case.params["device"] = "cuda"
        chosen = harness.select_providers(rejection.providers(), "flashinfer-chain")
        rec = harness.run_case(case, chosen, cfg, peaks)["providers"]["flashinfer-chain"]
        assert rec["status"] == "ok", (mode, rec)
        assert calls.count("chain_speculative_sampling") == 2  # first call + one timed
        assert calls.count("softmax") == 2 * (2 if mode == "minimal" else 1)

    # Without flashinfer (or on CPU tensors) the peers are skipped with the reason, not failed.
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", None)
    case = rejection.make_case(2, 3, 257, "onehot", torch.float32, 0.8, torch.device("cpu"))
    case.params["device"] = "cuda"
    rec = harness.run_case(case, harness.select_providers(rejection.providers(), "flashinfer-chain"),
                           cfg, peaks)["providers"]["flashinfer-chain"]
    assert rec["status"] == "skipped" and "flashinfer not importable" in rec["reason"]


def test_measured_peaks_exclusions_and_incremental_report(tmp_path):
    """--bandwidth / --flop-rate set the floor (bench.gpu_proof passes what it measured), --exclude-providers
    takes fnmatch patterns, and --out holds every finished case even if the run dies before finish()."""
    bench = _load("bench_rejection_sample")
    path = tmp_path / "r.json"
    report = bench.main(["--smoke", "--device", DEVICE, "--quiet", "--out", str(path), "--bandwidth", "1e9",
                         "--flop-rate", "2e12", "--exclude-providers", "flashinfer*,reference-c*,cuda",
                         "--modes", "onehot,minimal"])
    assert list(report["providers"]) == ["reference-eager", "triton"]
    peaks = report["meta"]["peaks"]
    assert peaks["bandwidth_bytes_per_s"] == 1e9 and peaks["flop_rate_per_s"] == 2e12 and peaks["known_device"]
    for case in report["cases"]:
        assert case["floor_us"] == pytest.approx(case["floor_bytes"] / 1e9 * 1e6)
    on_disk = json.loads(path.read_text())
    assert [c["name"] for c in on_disk["cases"]] == [c["name"] for c in report["cases"]]
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--device", DEVICE, "--bandwidth", "-1"])


def test_report_is_on_disk_after_each_case(tmp_path):
    """A run killed in its second case (here: an interrupt while building inputs) leaves the first case on disk."""
    from bench import harness

    def boom():
        raise KeyboardInterrupt

    def case(name, make):
        return harness.Case(op="toy", name=name, params={"device": "cpu"}, make_inputs=make, floor_bytes=8,
                            floor_flops=0)

    path = tmp_path / "toy.json"
    cfg = harness.RunConfig(device=torch.device("cpu"), warmup=0, iters=1, verbose=False, out=str(path))
    providers = [harness.Provider(harness.REFERENCE_EAGER, lambda c: (lambda x: x["a"] + 1))]
    with pytest.raises(KeyboardInterrupt):
        harness.run_benchmark("toy", [case("first", lambda: {"a": torch.ones(2)}), case("second", boom)],
                              providers, cfg)
    on_disk = json.loads(path.read_text())
    assert [c["name"] for c in on_disk["cases"]] == ["first"]
    assert on_disk["cases"][0]["providers"][harness.REFERENCE_EAGER]["status"] == "ok"


def test_overhead_bench_covers_every_registered_op(tmp_path, capsys):
    from dspark_kernels.ops import OPS

    path = tmp_path / "overhead.json"
    report = _load("bench_overhead").main(["--number", "3", "--repeat", "1", "--out", str(path)])
    assert [r["op"] for r in report["rows"]] == list(OPS)
    for r in report["rows"]:
        for key in ("public_us", "reference_us", "host_path_us", "checks_us"):
            assert _positive_finite(r[key]), (r["op"], key, r[key])
        assert isinstance(r["goal_met"], bool)
    assert json.loads(path.read_text())["rows"] == json.loads(json.dumps(report["rows"]))
    assert "host path us" in capsys.readouterr().out
