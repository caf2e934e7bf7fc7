"""Install dspark_kernels; build the CUDA extension through CMakeLists.txt.

DSPARK_BUILD_CUDA=auto (default): build dspark_kernels._C when torch has CUDA
and nvcc is found, otherwise skip it with one log line. =1: the build must
succeed (fails loudly). =0: never build. DSPARK_CUDA_ARCHS overrides the
architecture list (default 90a, the H100/H200).

torch is deliberately not in install_requires: on a CPU machine an
unpinned torch requirement makes pip fetch the newest CUDA wheels. Install
the torch you want first (see README), then `pip install -e . --no-build-isolation`.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg: str) -> None:
    print(f"dspark_kernels: {msg}", file=sys.stderr, flush=True)


def cuda_build_plan():
    """(build?, reason) from DSPARK_BUILD_CUDA, torch and nvcc."""
    mode = os.environ.get("DSPARK_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"DSPARK_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False, "DSPARK_BUILD_CUDA=0"
    try:
        import torch
    except ImportError:
        why = "torch is not importable in the build environment (use --no-build-isolation)"
    else:
        nvcc = shutil.which("nvcc") or (
            os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None
        )
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is a CPU-only build"
        elif not nvcc or not os.path.exists(nvcc):
            why = "nvcc not found (set CUDA_HOME or PATH)"
        else:
            return True, f"torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc at {nvcc}"
    if mode == "1":
        raise SystemExit(f"dspark_kernels: DSPARK_BUILD_CUDA=1 but the CUDA extension cannot be built: {why}")
    return False, why


class CMakeBuild(build_ext):
    def run(self):
        build, why = cuda_build_plan()
        if not build:
            log(f"skipping the CUDA extension: {why}; the reference and Triton backends still work")
            return
        log(f"building the CUDA extension with CMake: {why}")
        super().run()

    def build_extension(self, ext):
        import torch

        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.abspath(self.build_temp)
        archs = os.environ.get("DSPARK_CUDA_ARCHS", "90a")
        env = dict(os.environ)
        # torch's CMake config turns TORCH_CUDA_ARCH_LIST into -gencode flags;
        # keep it consistent with our own architecture list.
        env.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(f"{a[0]}.{a[1:]}" for a in archs.split(";")))
        cmake = shutil.which("cmake") or "cmake"
        subprocess.check_call(
            [
                cmake, "-S", HERE, "-B", build_dir,
                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                f"-DDSPARK_CUDA_ARCHS={archs}",
                f"-DDSPARK_OUTPUT_DIR={out_dir}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DPython_EXECUTABLE={sys.executable}",
            ],
            env=env,
        )
        subprocess.check_call([cmake, "--build", build_dir, "-j", str(os.cpu_count() or 2)], env=env)
        # Editable installs import from the source tree: put a copy there too.
        built = [f for f in os.listdir(out_dir) if f.startswith("_C") and f.endswith(".so")]
        if not built:
            raise RuntimeError(f"CMake finished but no _C*.so appeared in {out_dir}")
        src_pkg = os.path.join(HERE, "dspark_kernels")
        if os.path.abspath(out_dir) != src_pkg:
            for f in built:
                shutil.copy2(os.path.join(out_dir, f), os.path.join(src_pkg, f))

    def get_ext_filename(self, ext_name):
        # A plain shared library loaded by torch.ops.load_library, not a
        # CPython module: no ABI tag in its name.
        return os.path.join(*ext_name.split(".")) + ".so"


setup(
    name="dspark_kernels",
    version="0.1.0",
    description="Kernels for DSpark-style speculative decoding: Markov drafting, scheduling, verification",
    packages=find_packages(include=["dspark_kernels", "dspark_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["numpy", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist"], "triton": ["triton"]},
    ext_modules=[Extension("dspark_kernels._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["dspark-demo=dspark_kernels.engine.demo:main"]},
    zip_safe=False,
)
