"""The command line, ``python -m dspark_kernels``: help, commands, exit codes, info.

Every test runs the CLI as a subprocess of this interpreter (the venv's
python), from the repository root, so it sees what a user sees."""

import os
import subprocess
import sys
import time
import types

import pytest

import dspark_kernels.ops
from dspark_kernels import __main__ as cli
from dspark_kernels.ops import OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env_update=None, drop=(), timeout=120):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(env_update or {})
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "dspark_kernels", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return res, time.perf_counter() - t0


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands(flag):
    res, _ = _cli(flag)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m dspark_kernels")
    for command in ("demo", "info", "check-checkpoint", "simulate", "tree-demo"):
        assert command in res.stdout
    assert "<command> --help" in res.stdout


def test_no_command_prints_help_fast_and_exits_0():
    res, secs = _cli()
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m dspark_kernels")
    assert "DSpark demo:" not in res.stdout  # did not start the demo
    assert secs < 60


def test_demo_help_describes_the_demo_and_its_options():
    res, secs = _cli("demo", "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m dspark_kernels demo")
    assert "synthetic target" in " ".join(res.stdout.split())
    for option in ("--rounds", "--sched-rounds", "--requests", "--gamma", "--vocab", "--rank",
                   "--temperature", "--seed", "--backend"):
        assert option in res.stdout
    assert "DSpark demo:" not in res.stdout
    assert secs < 60


def test_info_help_describes_info():
    res, _ = _cli("info", "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m dspark_kernels info")
    assert "backends" in res.stdout and "TRITON_INTERPRET" in res.stdout


def test_unknown_command_exits_2_with_a_message():
    res, _ = _cli("simulte")
    assert res.returncode == 2
    assert "invalid choice: 'simulte'" in res.stderr
    assert "demo" in res.stderr and "info" in res.stderr


def test_demo_rejects_an_unknown_option_with_exit_2():
    res, _ = _cli("demo", "--no-such-option", "3")
    assert res.returncode == 2
    assert "--no-such-option" in res.stderr
    assert "DSpark demo:" not in res.stdout


def _op_lines(stdout):
    return {line.split()[0]: line for line in stdout.splitlines() if " cpu: " in line and " cuda: " in line}


def test_info_lists_every_op_and_says_triton_is_not_on_cpu_without_the_interpreter():
    res, _ = _cli("info", drop=("TRITON_INTERPRET",))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("torch ")
    assert "CUDA extension:" in res.stdout
    lines = _op_lines(res.stdout)
    assert sorted(lines) == sorted(OPS)
    for op, line in lines.items():
        cpu = line.split(" cpu: ")[1].split(" cuda: ")[0]
        assert "reference" in cpu and "triton" not in cpu, line
    assert "TRITON_INTERPRET=1" in res.stdout
    assert "In this process TRITON_INTERPRET is not set" in res.stdout


def test_info_with_the_interpreter_says_so():
    res, _ = _cli("info", env_update={"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert sorted(_op_lines(res.stdout)) == sorted(OPS)
    assert "In this process TRITON_INTERPRET=1 is set" in res.stdout


class _FakeImpls:
    name = "fake_op"
    not_auto = ("cuda",)

    def available(self, device_type):
        return ["reference"] if device_type == "cpu" else ["reference", "cuda"]


def test_info_reads_the_registry_and_either_attribute_name(monkeypatch, capsys):
    # An op module may name its implementations IMPLS (new) or BACKENDS (old).
    new, old = types.ModuleType("dspark_kernels.ops._fake_new"), types.ModuleType("dspark_kernels.ops._fake_old")
    new.IMPLS, old.BACKENDS = _FakeImpls(), _FakeImpls()
    monkeypatch.setitem(sys.modules, new.__name__, new)
    monkeypatch.setitem(sys.modules, old.__name__, old)
    monkeypatch.setattr(dspark_kernels.ops, "OPS", ("_fake_new", "_fake_old"))
    assert cli.main(["info"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fake_op")]
    assert len(lines) == 2
    assert all("auto skips: cuda" in line for line in lines)
