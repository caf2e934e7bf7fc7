"""Triton schedule_verify: implements dspark_kernels.schedule_verify in ONE program (grid (1,)).

The reference sorts candidates by (survival descending, flat index r·γ + j
ascending, invalid candidates as -inf). Here every candidate gets one int64
key whose plain ascending order is exactly that order:

    key = (~m(v)) << 32 | (r·γ + j)

where v is the fp32 survival (-inf for an invalid candidate, -0 folded into
+0, every NaN folded into one value above +inf, as torch.sort puts NaN first
when descending) and m(v) is the monotone int32 image of fp32 (bit pattern,
magnitude bits flipped for negative floats). ``~m`` turns "value descending"
into "key ascending"; the low 32 bits break ties by flat index, so keys are
unique and one ``tl.sort`` gives the reference's stable order. Lanes past
R·γ (power-of-two padding) are invalid with flat index >= R·γ: they sort
after every real candidate.

After the sort, lane i holds the i-th candidate; its value comes back from
the key. Prefix sums of the gains are taken in fp64 and rounded to fp32, as
torch's CPU cumsum of fp32 does (it accumulates in double): tau_k =
fp32(A) + fp32(Σ_{i<k} a_i), theta_k = tau_k · sps[A + k] in fp32, the same
operations as the reference, so comparisons between thetas agree bit for bit
whenever the fp64 prefix sums are exact (always for values >= 2**-15 or 0,
and otherwise off by at most one fp64 ulp before the rounding to fp32).

- causal: K = first lane i < num_valid whose theta_{i+1} does not exceed
  theta_i (num_valid when every one rises), i.e. the reference's cumprod.
- async: K = first argmax of theta over k = 0..num_valid on the history
  order, with torch.argmax's NaN rule (the first NaN wins).

The K admitted candidates are the K smallest keys of the current survival:
with T the K-th smallest key (lane K after the sort; INT64_MAX when K covers
every lane), candidate (r, j) is admitted iff key(r, j) < T. lengths[r] is
then a row sum over an [R, γ] tile of keys: no scatter, no atomics.
cu_verify is a cumsum over requests. No host sync anywhere; static grid.
"""

import os

import torch
import triton
import triton.language as tl

from .. import constants as C
from .sampling import key_to_float, ordered_key

# Triton reads this variable when @triton.jit runs, so it is fixed at import, as here.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Largest R·γ one program handles (the CUDA kernel shares the bound).
MAX_CANDIDATES = C.SCHEDULE_MAX_CANDIDATES

INT64_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)

# tl.sum's own combine function (tl.reduce with it is tl.sum without the nested
# jit call): the interpreter reduces with it in numpy, with any other in Python.
_add_combine = getattr(tl.standard, "_sum_combine", None)
if _add_combine is None:  # pragma: no cover - a Triton without the private name

    @triton.jit
    def _add_combine(a, b):
        return a + b


@triton.jit
def _order_key(v, valid, flat):
    """int64 key: ascending key order == (v descending, flat ascending); invalid as -inf."""
    v = tl.where(valid, v, float("-inf"))
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 ties with +0.0, as in torch.sort
    mono = tl.where(v != v, 0x7FFFFFFF, ordered_key(v))  # every NaN above +inf (torch: NaN largest)
    return ((~mono).to(tl.int64) << 32) | flat.to(tl.int64)


@triton.jit
def _sort(x, LOG: tl.constexpr):
    """Ascending bitonic sort of a [2**LOG] int64 tensor.

    The network of tl.sort: x is viewed as a [2] * LOG hypercube (axis a is
    bit LOG-1-a of the index); merge stage s sorts blocks of 2**s, ascending
    where bit s of the index is 0 and descending where it is 1 (the last stage
    all ascending), by compare-and-swap along bits s-1, ..., 0. A step reads
    each key's partner across the pair axis as (pair sum) - key, exact in
    wrapping int64 arithmetic (tl.sort uses an xor-sum the same way), keeps
    the min in the lower slot and the max in the upper one, or the reverse
    where the block descends.

    Used under the Triton interpreter only (TRITON_INTERPRET=1, the CPU test
    path), which runs tl.sort's xor-sum, a custom-combine reduction, element
    by element in Python: minutes for 16384 keys, against numpy-speed tl.sum.
    Compiled kernels call tl.sort instead: for the sm_90 compiler this
    hand-written network is slower to build (15 s at 4096 keys against 2.6 s,
    and over 10 minutes at 16384 keys against 18 s). Both give the same
    order because keys are unique. Everything is inlined in this one function
    because each nested jit call costs the interpreter milliseconds.
    """
    h = tl.reshape(x, [2] * LOG)
    for stage in tl.static_range(1, LOG + 1):
        for i in tl.static_range(stage):
            # Compare along axis LOG - stage + i (index bit stage-1-i). The axis is
            # spelled out at each use: a name bound to it inside the loop becomes a
            # tensor in the compiler (constexprs cannot be re-bound per iteration).
            partner = tl.reduce(h, LOG - stage + i, _add_combine, keep_dims=True) - h
            upper = tl.reshape(tl.arange(0, 2), [1] * (LOG - stage + i) + [2] + [1] * (stage - 1 - i))
            if stage < LOG:
                desc = tl.reshape(tl.arange(0, 2), [1] * (LOG - 1 - stage) + [2] + [1] * stage)
                take_max = (upper ^ desc) != 0
            else:
                take_max = upper != 0
            h = tl.where(take_max, tl.maximum(h, partner), tl.minimum(h, partner))
    return tl.reshape(h, x.shape)


@triton.jit
def _key_value(key):
    """fp32 value a key was built from (inverse of _order_key's high half)."""
    return key_to_float(~((key >> 32).to(tl.int32)))


@triton.jit
def _path(keys, lane, num_active, num_valid, sps_ptr, sps_last):
    """For sorted keys: tau_cur = tau_{i+1}, theta_prev = theta_i, theta_cur = theta_{i+1} per lane i."""
    vals = _key_value(keys)
    gains = tl.where(lane < num_valid, vals, 0.0).to(tl.float64)
    incl = tl.cumsum(gains, 0)
    excl = incl - gains  # exact whenever the fp64 prefix sums are
    a_f = num_active.to(tl.float32)
    tau_prev = a_f + excl.to(tl.float32)
    tau_cur = a_f + incl.to(tl.float32)
    b_prev = tl.minimum(num_active + lane, sps_last)
    b_cur = tl.minimum(num_active + lane + 1, sps_last)
    theta_prev = tau_prev * tl.load(sps_ptr + b_prev)
    theta_cur = tau_cur * tl.load(sps_ptr + b_cur)
    return tau_cur, theta_prev, theta_cur


@triton.jit
def _request_flags(active_ptr, max_len_ptr, req, mask, gamma, HAS_ACTIVE: tl.constexpr, HAS_MAX_LEN: tl.constexpr):
    """(active, cap = clamp(max_len, 0, γ)) of requests ``req`` where ``mask``; inactive elsewhere."""
    if HAS_ACTIVE:
        act = (tl.load(active_ptr + req, mask=mask, other=0) != 0) & mask
    else:
        act = mask
    if HAS_MAX_LEN:
        ml = tl.load(max_len_ptr + req, mask=mask, other=0).to(tl.int64)
        cap = tl.minimum(tl.maximum(ml, 0), gamma).to(tl.int32)
    else:
        cap = tl.zeros(req.shape, dtype=tl.int32) + gamma
    return act, cap


@triton.jit
def _schedule_verify_kernel(
    surv_ptr, hist_ptr, sps_ptr, max_len_ptr, active_ptr,
    lengths_ptr, cu_ptr, total_ptr, expected_ptr,
    num_req, gamma, gamma_div, sps_len,
    ASYNC: tl.constexpr, HAS_MAX_LEN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
    NETWORK: tl.constexpr,
):
    n = num_req * gamma
    sps_last = sps_len - 1

    # Per request: active flag and cap = clamp(max_len, 0, γ).
    req = tl.arange(0, BLOCK_R)
    req_in = req < num_req
    act_r, cap_r = _request_flags(active_ptr, max_len_ptr, req, req_in, gamma, HAS_ACTIVE, HAS_MAX_LEN)
    num_active = tl.sum(act_r.to(tl.int32), 0)
    num_valid = tl.sum(tl.where(act_r, cap_r, 0), 0)

    # Flat candidate lanes (gathers of the per-request flags).
    lane = tl.arange(0, BLOCK)
    in_n = lane < n
    lane_req = lane // gamma_div
    lane_pos = lane - lane_req * gamma
    lane_act, lane_cap = _request_flags(active_ptr, max_len_ptr, lane_req, in_n, gamma, HAS_ACTIVE, HAS_MAX_LEN)
    lane_valid = lane_act & (lane_pos < lane_cap)

    a0_f = num_active.to(tl.float32)
    if ASYNC:
        # K = first argmax of theta_k, k = 0..num_valid, over the history order.
        hv = tl.load(hist_ptr + lane, mask=in_n, other=0.0)
        if NETWORK:
            hkeys = _sort(_order_key(hv, lane_valid, lane), LOG_BLOCK)
        else:
            hkeys = tl.sort(_order_key(hv, lane_valid, lane), 0)
        _, _, theta_h = _path(hkeys, lane, num_active, num_valid, sps_ptr, sps_last)
        on_path = lane < num_valid
        theta0 = a0_f * tl.load(sps_ptr + tl.minimum(num_active, sps_last))
        is_nan = on_path & (theta_h != theta_h)
        first_nan = tl.min(tl.where(is_nan, lane, BLOCK), 0)
        best = tl.max(tl.where(on_path & ~is_nan, theta_h, float("-inf")), 0)
        first_best = tl.min(tl.where(on_path & (theta_h == best), lane, BLOCK), 0)
        k_adm = tl.where(first_nan < BLOCK, first_nan + 1, tl.where(theta0 >= best, 0, first_best + 1))
        k_adm = tl.where(theta0 != theta0, 0, k_adm)

    sv = tl.load(surv_ptr + lane, mask=in_n, other=0.0)
    if NETWORK:
        keys = _sort(_order_key(sv, lane_valid, lane), LOG_BLOCK)
    else:
        keys = tl.sort(_order_key(sv, lane_valid, lane), 0)
    tau_cur, theta_prev, theta_cur = _path(keys, lane, num_active, num_valid, sps_ptr, sps_last)
    if not ASYNC:
        # K = length of the leading run of rises (the reference's cumprod).
        rises = (theta_cur > theta_prev) & (lane < num_valid)
        k_adm = tl.min(tl.where(rises, BLOCK, lane), 0)

    expected = tl.where(k_adm == 0, a0_f, tl.sum(tl.where(lane == k_adm - 1, tau_cur, 0.0), 0))
    thresh = tl.min(tl.where(lane >= k_adm, keys, INT64_MAX), 0)

    # lengths[r] = #{j : key(r, j) < thresh}: a row sum over an [R, γ] tile.
    r2 = req[:, None]
    j2 = tl.arange(0, BLOCK_G)[None, :]
    in2 = (r2 < num_req) & (j2 < gamma)
    flat2 = r2 * gamma + j2
    sv2 = tl.load(surv_ptr + flat2, mask=in2, other=0.0)
    valid2 = in2 & act_r[:, None] & (j2 < cap_r[:, None])
    adm2 = in2 & (_order_key(sv2, valid2, flat2) < thresh)
    lengths = tl.sum(adm2.to(tl.int32), 1)
    rows = tl.where(act_r, lengths + 1, 0)
    cu = tl.cumsum(rows, 0)

    tl.store(lengths_ptr + req, lengths, mask=req_in)
    tl.store(cu_ptr + 1 + req, cu, mask=req_in)
    tl.store(cu_ptr, 0)
    tl.store(total_ptr, tl.sum(rows, 0))
    tl.store(expected_ptr, expected)


def _next_pow2(x: int, floor: int = 2) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


def _num_warps(block: int) -> int:
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    return 16


def schedule_verify(a):
    survival, sps, mode, history, max_len, active = a.survival, a.sps, a.mode, a.history, a.max_len, a.active
    num_req, gamma = survival.shape
    n = num_req * gamma
    if n > MAX_CANDIDATES:
        raise ValueError(
            f"the Triton schedule_verify handles at most R*γ = {MAX_CANDIDATES} candidates in one program, "
            f"got R*γ = {num_req}*{gamma} = {n}"
        )
    device = survival.device
    surv = survival.to(torch.float32).contiguous()
    is_async = mode == "async"
    hist = history.to(torch.float32).contiguous() if is_async else surv
    sps32 = sps.to(torch.float32).contiguous()
    lengths = torch.empty((num_req,), dtype=torch.int32, device=device)
    cu_verify = torch.empty((num_req + 1,), dtype=torch.int32, device=device)
    total = torch.empty((), dtype=torch.int32, device=device)
    expected = torch.empty((), dtype=torch.float32, device=device)
    ml = max_len.contiguous() if max_len is not None else lengths
    act = active.contiguous().view(torch.uint8) if active is not None else lengths
    block = _next_pow2(n, 16)
    _schedule_verify_kernel[(1,)](
        surv, hist, sps32, ml, act,
        lengths, cu_verify, total, expected,
        num_req, gamma, max(gamma, 1), sps32.shape[0],
        ASYNC=is_async, HAS_MAX_LEN=max_len is not None, HAS_ACTIVE=active is not None,
        BLOCK=block, LOG_BLOCK=block.bit_length() - 1, BLOCK_R=_next_pow2(num_req), BLOCK_G=_next_pow2(gamma),
        NETWORK=_INTERPRETED,
        num_warps=_num_warps(block),
    )
    return lengths, cu_verify, total, expected


def _compile_specs():
    """(kernel, signature, constexprs, options) tuples that tests compile for sm_90 ahead of time.

    CI compiles the R=512, γ=8 (4096-candidate) programs with the launcher's
    num_warps. The 16384-candidate ones compile too but take 88 s (causal) and
    169 s (async) on a 2-core CI machine, so CI leaves them out; on a GPU they
    are built once on first use and then served from Triton's cache.
    """
    sig = {"surv_ptr": "*fp32", "hist_ptr": "*fp32", "sps_ptr": "*fp32", "max_len_ptr": "*i32",
           "active_ptr": "*u8", "lengths_ptr": "*i32", "cu_ptr": "*i32", "total_ptr": "*i32",
           "expected_ptr": "*fp32", "num_req": "i32", "gamma": "i32", "gamma_div": "i32", "sps_len": "i32",
           "ASYNC": "constexpr", "HAS_MAX_LEN": "constexpr", "HAS_ACTIVE": "constexpr",
           "BLOCK": "constexpr", "LOG_BLOCK": "constexpr", "BLOCK_R": "constexpr", "BLOCK_G": "constexpr",
           "NETWORK": "constexpr"}
    block, num_req, gamma = 4096, 512, 8
    return [
        (_schedule_verify_kernel, sig,
         {"ASYNC": a, "HAS_MAX_LEN": True, "HAS_ACTIVE": True, "BLOCK": block, "LOG_BLOCK": block.bit_length() - 1,
          "BLOCK_R": num_req, "BLOCK_G": gamma, "NETWORK": False},
         {"num_warps": _num_warps(block)})
        for a in (False, True)
    ]
