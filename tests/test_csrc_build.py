"""CUDA sources compile for sm_90a on machines without a GPU (compile only).

CMakeLists.txt's DSPARK_COMPILE_ONLY mode builds every csrc/*.cu with nvcc and
syntax-checks the torch launchers against the installed torch headers, so
CUDA code cannot rot between GPU runs.
"""

import glob
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

needs_nvcc = pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which("cmake") is None,
    reason="nvcc and cmake are needed to compile csrc/",
)


@needs_nvcc
def test_every_cuda_source_compiles_for_sm90a(tmp_path):
    build = tmp_path / "build"
    cfg = subprocess.run(
        [
            "cmake", "-S", ROOT, "-B", str(build), "-DDSPARK_COMPILE_ONLY=ON",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        capture_output=True, text=True,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    res = subprocess.run(
        ["cmake", "--build", str(build), "-j", "2", "--", "VERBOSE=1"], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout[-20000:] + res.stderr[-20000:]
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    assert sources, "csrc/ holds no .cu file"
    for src in sources:
        name = os.path.basename(src)
        objs = glob.glob(str(build / "**" / f"{name}.o"), recursive=True)
        assert objs, f"{name} was not compiled"
    assert "sm_90a" in res.stdout, "nvcc was not asked for sm_90a"
    assert glob.glob(str(build / "**" / "torch_bindings.cpp.o"), recursive=True), "launchers not compiled"


def test_only_the_launchers_include_torch():
    """Kernels and host programs are torch-free; torch_checks.h serves torch_bindings.cpp alone."""
    torch_files = {"torch_bindings.cpp", "torch_checks.h"}
    csrc = os.path.join(ROOT, "csrc")
    for path in sorted(glob.glob(os.path.join(csrc, "**", "*"), recursive=True)):
        if not os.path.isfile(path) or os.path.basename(path) in torch_files:
            continue
        text = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, ROOT)
        for include in ("#include <ATen/", "#include <c10/", "#include <torch/", '#include "torch_checks.h"'):
            assert include not in text, f"{rel} has {include}"
