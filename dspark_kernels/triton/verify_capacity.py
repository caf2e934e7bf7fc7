"""Triton verify_capacity: implements dspark_kernels.verify_capacity in ONE program (grid (1,)).

The history pass of the Triton schedule_verify, on its own: the same jit
functions (triton/schedule_verify.py: _lanes, then _capacity = the radix
sort of the candidates' order (_order), the fp64 prefix sums of the gains
and theta_k = tau_k · sps[A + k] (_path), the first argmax with torch's NaN
rule (_first_argmax)), so schedule_verify(mode="async", history=h) and
schedule_verify(mode="async", capacity=verify_capacity(h)) admit the same
drafts bit for bit. Writes K as a [] int32; no host sync; static grid; the
sort's scratch buffer (2 x BLOCK int32) is allocated per call.
"""

import torch
import triton
import triton.language as tl

from .schedule_verify import _capacity, _lanes, check_size, launch_config, next_pow2, request_args


@triton.jit
def _verify_capacity_kernel(
    hist_ptr, sps_ptr, max_len_ptr, active_ptr, scratch_ptr, out_ptr,
    num_req, gamma, gamma_div, sps_len,
    HAS_MAX_LEN: tl.constexpr, HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr, ITEMS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    lane, slot, in_n, lane_ok, num_active = _lanes(active_ptr, max_len_ptr, num_req, gamma, gamma_div,
                                                   BLOCK, ITEMS, BLOCK_R, HAS_ACTIVE, HAS_MAX_LEN)
    k = _capacity(hist_ptr, lane, slot, in_n, lane_ok, num_active, scratch_ptr, sps_ptr, sps_len - 1,
                  BLOCK, ITEMS)
    tl.store(out_ptr, k)


def verify_capacity(a):
    history, sps, max_len, active = a.history, a.sps, a.max_len, a.active
    num_req, gamma = history.shape
    check_size(num_req, gamma, "verify_capacity")
    device = history.device
    hist = history.to(torch.float32).contiguous()
    sps32 = sps.to(torch.float32).contiguous()
    out = torch.empty((), dtype=torch.int32, device=device)
    ml, act = request_args(max_len, active, out)
    block, items, options = launch_config(num_req * gamma)
    scratch = torch.empty((2 * block,), dtype=torch.int32, device=device)
    _verify_capacity_kernel[(1,)](
        hist, sps32, ml, act, scratch, out,
        num_req, gamma, max(gamma, 1), sps32.shape[0],
        HAS_MAX_LEN=max_len is not None, HAS_ACTIVE=active is not None, BLOCK=block, ITEMS=items,
        BLOCK_R=next_pow2(num_req), **options,
    )
    return out


_SIGNATURE = {"hist_ptr": "*fp32", "sps_ptr": "*fp32", "max_len_ptr": "*i32", "active_ptr": "*u8",
              "scratch_ptr": "*i32", "out_ptr": "*i32", "num_req": "i32", "gamma": "i32", "gamma_div": "i32",
              "sps_len": "i32", "HAS_MAX_LEN": "constexpr", "HAS_ACTIVE": "constexpr", "BLOCK": "constexpr",
              "ITEMS": "constexpr", "BLOCK_R": "constexpr"}


def _bucket_spec(mode: str, n: int):
    """The launcher's compile for n = R·γ candidates (γ = 8, max_len and active given); mode is ignored
    (bench/triton_compile_time.py passes one)."""
    block, items, options = launch_config(n)
    num_req = max(n // min(8, n), 1)
    constexprs = {"HAS_MAX_LEN": True, "HAS_ACTIVE": True, "BLOCK": block, "ITEMS": items,
                  "BLOCK_R": next_pow2(num_req)}
    return _verify_capacity_kernel, _SIGNATURE, constexprs, options


def _compile_specs():
    """(kernel, signature, constexprs, options) that tests compile for sm_90 ahead of time: the
    4096-candidate program (R = 512, γ = 8) and the largest one."""
    return [_bucket_spec("", 4096), _bucket_spec("", 16384)]
