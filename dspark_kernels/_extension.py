"""Loads the optional ahead-of-time CUDA extension dspark_kernels/_C*.so.

The extension holds only CUDA kernels registered (TORCH_LIBRARY_IMPL) for
internal ops whose schemas are defined in Python, so the package imports,
installs and tests on machines where it was never built.
"""

from __future__ import annotations

import glob
import os

_state: dict = {}


def _find() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    hits = sorted(glob.glob(os.path.join(here, "_C*.so")))
    return hits[0] if hits else None


def load():
    """Load once; returns the library path, or None when absent or unusable."""
    if "path" in _state:
        return _state["path"]
    _state["path"] = None
    path = _find()
    if path is None:
        _state["why"] = "no _C*.so next to the package (built without CUDA)"
        return None
    import torch

    if not torch.cuda.is_available():
        _state["why"] = "torch sees no CUDA device"
        return None
    try:
        torch.ops.load_library(path)
    except OSError as err:  # e.g. built against another torch or CUDA
        _state["why"] = f"{path} failed to load: {err}"
        return None
    _state["path"] = path
    return path


def why_missing() -> str:
    load()
    return _state.get("why", "loaded")
