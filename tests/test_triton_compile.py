"""Every Triton kernel compiles for sm_90 (H100) ahead of time, on a machine with no GPU, within its resources.

The interpreter runs kernels on CPU but does not compile them; this catches
what only the real compiler rejects (loop-carried type changes, unsupported
ops), and reads each kernel's registers, spills and shared memory (ptxas -v)
and its tensor-core instructions (SASS): the fast paths must not spill, and
markov_draft's fast tile kernel must use Hopper's warpgroup MMA.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# Known to spill, listed so that any other kernel that starts to spill fails here:
# - markov_draft's exact mode (fp32 FFMA dots, bitwise the reference), the token-for-token mode, not the
#   fast default;
# - verify_attention's fp32-input configurations (tf32 / ieee dots: up to 19 KB of spills at D = 256);
#   its bf16 / fp16 configurations do not spill. Tuning them is verify_attention's work, not the samplers'.
# - the scheduler's one-program kernels at 16384 candidates (16 lanes a thread at the 64 registers of
#   1024 threads: ~600 B, bench/NOTES.md); up to 4096 candidates they must not spill.
def may_spill(row) -> bool:
    if row["kernel"] in ("markov_draft._step_tile_kernel", "markov_draft._step_reduce_kernel"):
        return True
    if row["kernel"] in ("schedule_verify._schedule_verify_kernel", "verify_capacity._verify_capacity_kernel"):
        return row["constexprs"]["BLOCK"] >= 16384 and row["spill_stores"] <= 1024
    return row["kernel"] == "verify_attention._verify_attn_kernel" and \
        row["constexprs"].get("DOT_PRECISION") in ("tf32", "ieee")


def test_all_triton_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "kernels.json"
    res = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile_triton.py"), "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    rows = json.loads(out.read_text())
    names = {r["kernel"] for r in rows}
    for must in ("rejection_sample._row_kernel", "rejection_sample._race_kernel", "rejection_sample._merge_kernel",
                 "markov_draft._head_kernel", "markov_draft._fast_tile_kernel"):
        assert must in names, must
    for r in rows:
        assert r["registers"] is not None, r
        if not may_spill(r):
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["dynamic_smem"] <= 227 * 1024, r  # an H100 SM's shared memory per block
    hold = [r for r in rows if r["kernel"] == "markov_draft._fast_tile_kernel" and r["constexprs"]["HOLD_E"]]
    assert hold and all(r["hgmma"] > 0 for r in hold), hold
