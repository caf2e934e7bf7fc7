"""The sampling contract's constants agree between Python (dspark_kernels/constants.py) and the CUDA headers.

Triton and the reference import dspark_kernels.constants; csrc/ cannot, so its
spellings are read from the headers here. A constant changed on one side only
would change the bits one backend draws.
"""

from __future__ import annotations

import os
import re

import pytest

from dspark_kernels import constants as C

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _header(name: str) -> str:
    with open(os.path.join(CSRC, name)) as f:
        return f.read()


def _cpp_constant(text: str, name: str) -> str:
    m = re.search(rf"\b{name}\s*=\s*([^;,\n]+)", text)
    assert m, f"{name} not found"
    return re.sub(r"(?<=[0-9a-fA-F])[uUfL]+\b", "", m.group(1).strip())


def _number(text: str) -> float:
    return float(int(text, 16)) if text.lower().startswith("0x") else float(text)


@pytest.mark.parametrize("cpp,py", [
    ("kPhiloxM0", "PHILOX_M0"), ("kPhiloxM1", "PHILOX_M1"), ("kPhiloxW0", "PHILOX_W0"), ("kPhiloxW1", "PHILOX_W1"),
    ("kPhiloxRounds", "PHILOX_ROUNDS"), ("kUniformShift", "UNIFORM_SHIFT"), ("kUniformScale", "UNIFORM_SCALE"),
    ("kStreamDraft", "STREAM_DRAFT"), ("kStreamAccept", "STREAM_ACCEPT"), ("kStreamResidual", "STREAM_RESIDUAL"),
    ("kStreamBonus", "STREAM_BONUS"), ("kStreamTreeAccept", "STREAM_TREE_ACCEPT"),
    ("kStreamTreeResidual", "STREAM_TREE_RESIDUAL"),
])
def test_philox_header_agrees(cpp, py):
    assert _number(_cpp_constant(_header("philox.cuh"), cpp)) == getattr(C, py)


def test_sampling_headers_agree():
    assert _number(_cpp_constant(_header("sampling.cuh"), "kGreedyTemperature")) == C.GREEDY_TEMPERATURE
    assert _number(_cpp_constant(_header("schedule_verify.h"), "kScheduleMaxCandidates")) == C.SCHEDULE_MAX_CANDIDATES


def test_the_parser_reads_what_it_claims():
    """A header constant that differs from Python is caught (the check cannot pass vacuously)."""
    text = "constexpr uint32_t kPhiloxM0 = 0xD2511F54u;\nconstexpr float kUniformScale = 5.9e-08f;"
    assert _number(_cpp_constant(text, "kPhiloxM0")) == 0xD2511F54 != C.PHILOX_M0
    assert _number(_cpp_constant(text, "kUniformScale")) == 5.9e-08 != C.UNIFORM_SCALE
