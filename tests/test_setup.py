"""setup.py's CUDA build switch: skip with one line on a CPU torch, fail loudly when forced."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

pytestmark = pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only install path")


def _build_ext(tmp_path, mode):
    env = {**os.environ, "DSPARK_BUILD_CUDA": mode}
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )


def test_auto_skips_cuda_extension_with_one_line(tmp_path):
    res = _build_ext(tmp_path, "auto")
    assert res.returncode == 0, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("dspark_kernels: skipping the CUDA extension")]
    assert len(lines) == 1 and "CPU-only" in lines[0]


def test_forced_cuda_build_fails_loudly(tmp_path):
    res = _build_ext(tmp_path, "1")
    assert res.returncode != 0
    assert "DSPARK_BUILD_CUDA=1 but the CUDA extension cannot be built" in res.stdout + res.stderr


def test_bad_switch_value_rejected(tmp_path):
    res = _build_ext(tmp_path, "maybe")
    assert res.returncode != 0 and "DSPARK_BUILD_CUDA must be auto, 0 or 1" in res.stdout + res.stderr
