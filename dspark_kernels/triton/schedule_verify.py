"""Triton schedule_verify: implements dspark_kernels.schedule_verify in ONE program (grid (1,)).

The reference sorts candidates by (value descending, flat index r·γ + j
ascending) and puts non-candidates last. A candidate is an active request's
draft j < clamp(max_len, 0, γ) whose fp32 value v is > 0 (NaN, zeros and
negatives are not). For v > 0 the fp32 bit pattern read as an int32 grows
with v, so with hi / lo the largest / smallest pattern among candidates

    d = hi - bits(v)        candidates: 0 .. span - 1, ascending = value descending
    d = span = hi - lo + 1  everything else (padding lanes included): after them

and the reference's order is (d, flat index) ascending.

Layout. The BLOCK lanes (R·γ rounded up to a power of two) are an
[ITEMS, THREADS] tile with lane t·ITEMS + e at (e, t): each thread holds
ITEMS consecutive lanes, so a scan in lane order is ITEMS serial adds in
registers plus one scan of the threads' totals (Triton's scan of a plain
[BLOCK] vector runs one shuffle scan per element a thread holds: 5-8x the
instructions). Scratch slot e·THREADS + t keeps the reads coalesced.

Sort. Only the d values are sorted (int32; the flat index is not carried):
an LSD radix sort of 2 bits per pass, 16 passes, in a loop the compiler does
not unroll. One pass: each lane's digit, its stable destination (lanes with
a smaller digit, plus lanes with the same digit before it: one lane-order
cumsum of four one-hot counters packed in an int64, 16 bits each, which
cannot carry since R·γ <= 16384 < 2**16), a scatter to a global scratch
buffer, a barrier, and a read back. Two buffers alternate, so one barrier
per pass suffices (a buffer is written again two passes later, after every
thread has passed the barrier between).

This replaces tl.sort, a bitonic network unrolled over all R·γ int64 keys,
whose sm_90 compile took 6.4 / 16.7 s (causal / async) at 4096 candidates
and 30 / 136 s at 16384; this kernel compiles in 0.35-1.2 s per bucket
(bench/NOTES.md has the table and the command).

After the sort, lane i holds the i-th candidate's d, and its value comes back
as bits = hi - d. Prefix sums of the gains are taken in fp64 and rounded to
fp32, as torch's CPU cumsum of fp32 does (it accumulates in double): tau_k =
fp32(A) + fp32(Σ_{i<k} a_i), theta_k = tau_k · sps[A + k] in fp32, the same
operations as the reference, so comparisons between thetas agree bit for bit
whenever the fp64 prefix sums are exact (always for values >= 2**-15, and
otherwise off by at most one fp64 ulp before the rounding to fp32). This part
is the previous kernel's, on the same sorted values: outputs are unchanged.

- causal: K = first lane i < num_valid whose theta_{i+1} does not exceed
  theta_i (num_valid when every one rises), i.e. the reference's cumprod.
- async with history: K = first argmax of theta over k = 0..num_valid_h on
  the history's order (torch.argmax's NaN rule: the first NaN wins), the
  code verify_capacity runs (triton/verify_capacity.py); then min(K, num_valid).
- async with capacity: K = clamp(capacity, 0, num_valid).

Admission. The first K in (d, flat) order are the lanes with d < d_K (d_K =
the sorted d at position K; "above everything" when K covers every lane)
plus, among the lanes with d == d_K, the first c = K - #{d < d_K} in flat
order (the sort is by d alone and stable). Each lane recomputes its own d,
its rank among the ties and the admitted count up to it (lane-order
cumsums); lengths[r] = that count at the request's last lane minus the one
before its first, read back from scratch: no atomics. cu_verify is a cumsum
over requests. No host sync anywhere; static grid; the scratch buffer
(3 x BLOCK int32: two sort buffers, the counts) is allocated per call like
the outputs.
"""

import torch
import triton
import triton.language as tl

from .. import constants as C

# Largest R·γ one program handles (the CUDA kernel shares the bound).
MAX_CANDIDATES = C.SCHEDULE_MAX_CANDIDATES

INT32_MAX = tl.constexpr(0x7FFFFFFF)
# Radix sort: 2-bit digits, their four counters packed in one int64 (16 bits
# each). 4-bit digits would halve the passes (each a global round trip and a
# barrier) but need four such scans per pass: measured on a first version of
# this kernel, 2.5x the sm_90 compile time and register spills at 4096 lanes.
RADIX = tl.constexpr(2)
DIGIT_MASK = tl.constexpr(3)
# Passes: 16 x 2 bits cover every d (< 2**31). A fixed count, not the bits d spans
# (27 for survival in [1e-4, 1]): with a trip count ptxas cannot prove uniform it
# wraps the loop's shuffles in WARPSYNC.COLLECTIVE sequences (40 of them at 4096
# candidates), and the compile takes 0.65 s against 0.55 s.
PASSES = tl.constexpr(16)

# Kernel modes (MODE constexpr).
CAUSAL, HISTORY, CAPACITY = 0, 1, 2


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
def _lanes(active_ptr, max_len_ptr, num_req, gamma, gamma_div, BLOCK: tl.constexpr, ITEMS: tl.constexpr,
           BLOCK_R: tl.constexpr, HAS_ACTIVE: tl.constexpr, HAS_MAX_LEN: tl.constexpr):
    """Lanes as an [ITEMS, THREADS] tile: lane t·ITEMS + e at (e, t), so each thread holds ITEMS
    consecutive lanes (scans along them are serial, in registers) and the scratch slot e·THREADS + t
    of a lane is read coalesced. Returns lane, its scratch slot, whether it may hold a candidate
    (active request, j < cap), in_n (lane < R·γ) and A."""
    THREADS: tl.constexpr = BLOCK // ITEMS
    t = tl.arange(0, THREADS)[None, :]
    e = tl.arange(0, ITEMS)[:, None]
    req = tl.arange(0, BLOCK_R)
    act_r, _ = _request_flags(active_ptr, max_len_ptr, req, req < num_req, gamma, HAS_ACTIVE, HAS_MAX_LEN)
    num_active = tl.sum(act_r.to(tl.int32), 0)
    lane = t * ITEMS + e
    in_n = lane < num_req * gamma
    lane_req = lane // gamma_div
    lane_act, lane_cap = _request_flags(active_ptr, max_len_ptr, lane_req, in_n, gamma, HAS_ACTIVE, HAS_MAX_LEN)
    return lane, e * THREADS + t, in_n, lane_act & (lane - lane_req * gamma < lane_cap), num_active


@triton.jit
def _lane_cumsum(x):
    """Inclusive cumsum in lane order of an [ITEMS, THREADS] tile: the threads' totals scanned
    across threads (one value each), then each thread's own lanes in registers."""
    col = tl.sum(x, 0)
    return tl.cumsum(x, 0) + (tl.cumsum(col, 0) - col)[None, :]


@triton.jit
def _digit_destinations(digit):
    """Stable counting-sort destination of each lane by its digit in [0, 4): the lanes with a smaller
    digit, plus the lanes with the same digit before it (one scan of four packed 16-bit counters)."""
    field = digit.to(tl.int64) * 16
    one = tl.full(digit.shape, 1, tl.int64) << field
    incl = _lane_cumsum(one)  # field f: lanes <= this one with digit f
    tot = tl.sum(one)
    below = (tot << 16) + (tot << 32) + (tot << 48)  # field f: lanes with a digit < f
    return (((incl + below) >> field) & 0xFFFF).to(tl.int32) - 1


@triton.jit
def _order(values_ptr, lane, slot, in_n, lane_ok, scratch_ptr, BLOCK: tl.constexpr, ITEMS: tl.constexpr):
    """The order of `values`' candidates: d per lane sorted ascending, hi, span, num_valid."""
    THREADS: tl.constexpr = BLOCK // ITEMS
    v = tl.load(values_ptr + lane, mask=in_n, other=0.0)
    valid = lane_ok & (v > 0.0)
    bits = v.to(tl.int32, bitcast=True)
    num_valid = tl.sum(valid.to(tl.int32))
    hi = tl.max(tl.where(valid, bits, 0))
    lo = tl.min(tl.where(valid, bits, INT32_MAX))
    span = tl.where(num_valid > 0, hi - lo + 1, 0)
    d = tl.where(valid, hi - bits, span)
    # A previous sort's last reads of the scratch buffer are done before this one writes it.
    tl.debug_barrier()
    for p in range(PASSES):
        buf = scratch_ptr + (p % 2) * BLOCK
        dest = _digit_destinations((d >> (p * RADIX)) & DIGIT_MASK)
        tl.store(buf + (dest % ITEMS) * THREADS + dest // ITEMS, d)  # lane dest's slot
        tl.debug_barrier()
        d = tl.load(buf + slot, cache_modifier=".cg")  # from L2: other threads of this program wrote it
    return d, hi, span, num_valid


@triton.jit
def _path(d, hi, lane, num_active, num_valid, sps_ptr, sps_last):
    """For sorted d: tau_cur = tau_{i+1}, theta_prev = theta_i, theta_cur = theta_{i+1} per lane i."""
    vals = (hi - d).to(tl.float32, bitcast=True)
    gains = tl.where(lane < num_valid, vals, 0.0).to(tl.float64)
    # Prefix sums in lane order, exact whenever the fp64 sums are. +inf gains (unchecked input)
    # sort first: a lane or a thread's total holding one has only +inf before it (and inf - inf
    # would be NaN), lane 0 / thread 0 nothing.
    col = tl.sum(gains, 0)
    first = lane == 0
    col_first = tl.sum(first.to(tl.int32), 0) > 0
    before = tl.where(col == float("inf"), tl.where(col_first, 0.0, float("inf")), tl.cumsum(col, 0) - col)
    incl = tl.cumsum(gains, 0) + before[None, :]
    excl = tl.where(gains == float("inf"), tl.where(first, 0.0, float("inf")), incl - gains)
    a_f = num_active.to(tl.float32)
    tau_prev = a_f + excl.to(tl.float32)
    tau_cur = a_f + incl.to(tl.float32)
    b_prev = tl.minimum(num_active + lane, sps_last)
    b_cur = tl.minimum(num_active + lane + 1, sps_last)
    theta_prev = tau_prev * tl.load(sps_ptr + b_prev)
    theta_cur = tau_cur * tl.load(sps_ptr + b_cur)
    return tau_cur, theta_prev, theta_cur


@triton.jit
def _first_argmax(theta, lane, num_valid, num_active, sps_ptr, sps_last, BLOCK: tl.constexpr):
    """verify_capacity's K: the first argmax of theta_k, k = 0..num_valid (theta_{i+1} at lane i,
    theta_0 = A·sps[A]), with torch.argmax's NaN rule (the first NaN wins)."""
    theta0 = num_active.to(tl.float32) * tl.load(sps_ptr + tl.minimum(num_active, sps_last))
    on_path = lane < num_valid
    is_nan = on_path & (theta != theta)
    first_nan = tl.min(tl.where(is_nan, lane, BLOCK))
    best = tl.max(tl.where(on_path & ~is_nan, theta, float("-inf")))
    first_best = tl.min(tl.where(on_path & (theta == best), lane, BLOCK))
    k = tl.where(first_nan < BLOCK, first_nan + 1, tl.where(theta0 >= best, 0, first_best + 1))
    return tl.where(theta0 != theta0, 0, k)


@triton.jit
def _capacity(values_ptr, lane, slot, in_n, lane_ok, num_active, scratch_ptr, sps_ptr, sps_last,
              BLOCK: tl.constexpr, ITEMS: tl.constexpr):
    """verify_capacity of `values` (the history): K over its own candidates."""
    d, hi, _, num_valid = _order(values_ptr, lane, slot, in_n, lane_ok, scratch_ptr, BLOCK, ITEMS)
    _, _, theta = _path(d, hi, lane, num_active, num_valid, sps_ptr, sps_last)
    return _first_argmax(theta, lane, num_valid, num_active, sps_ptr, sps_last, BLOCK)


@triton.jit
def _schedule_verify_kernel(
    surv_ptr, hist_ptr, cap_ptr, sps_ptr, max_len_ptr, active_ptr, scratch_ptr,
    lengths_ptr, cu_ptr, total_ptr, expected_ptr,
    num_req, gamma, gamma_div, sps_len,
    MODE: tl.constexpr, HAS_MAX_LEN: tl.constexpr, HAS_ACTIVE: tl.constexpr,
    BLOCK: tl.constexpr, ITEMS: tl.constexpr, BLOCK_R: tl.constexpr, FIRST_PASS: tl.constexpr,
):
    sps_last = sps_len - 1
    lane, slot, in_n, lane_ok, num_active = _lanes(active_ptr, max_len_ptr, num_req, gamma, gamma_div,
                                                   BLOCK, ITEMS, BLOCK_R, HAS_ACTIVE, HAS_MAX_LEN)
    a0_f = num_active.to(tl.float32)
    zero = num_active * 0
    if MODE == 2:
        # clamp in int64 first: an unchecked capacity may be any integer
        k_cap = tl.minimum(tl.maximum(tl.load(cap_ptr).to(tl.int64), 0), BLOCK).to(tl.int32)
    else:
        k_cap = zero
    # Pass 0 (async with history only): K from the history's order. Pass 1: the survival's order.
    # A loop, not two inlined copies, so the sort and the path are compiled once; only
    # scalars cross passes.
    hi, span, d_k, ties, expected = zero, zero, zero, zero, a0_f
    for p in range(FIRST_PASS, 2):
        d, hi, span, num_valid = _order(tl.where(p == 0, hist_ptr, surv_ptr), lane, slot, in_n, lane_ok,
                                        scratch_ptr, BLOCK, ITEMS)
        tau_cur, theta_prev, theta_cur = _path(d, hi, lane, num_active, num_valid, sps_ptr, sps_last)
        if MODE == 0:
            # K = length of the leading run of rises (the reference's cumprod).
            rises = (theta_cur > theta_prev) & (lane < num_valid)
            k_adm = tl.min(tl.where(rises, BLOCK, lane))
        else:
            if MODE == 1:
                k_cap = tl.where(p == 0, _first_argmax(theta_cur, lane, num_valid, num_active, sps_ptr, sps_last,
                                                       BLOCK), k_cap)
            k_adm = tl.minimum(k_cap, num_valid)
        expected = tl.where(k_adm == 0, a0_f, tl.sum(tl.where(lane == k_adm - 1, tau_cur, 0.0)))
        # Admitted: d < d_k, or d == d_k and among the first `ties` such lanes in flat order.
        d_k = tl.min(tl.where(lane >= k_adm, d, INT32_MAX))
        ties = k_adm - tl.sum((d < d_k).to(tl.int32))

    # Each lane's own d again (survival order), its rank among the lanes with d == d_k, and
    # the admitted count up to each lane (cumsums in lane order); lengths[r] is the difference of
    # that count at the request's last lane and at the one before it, read back from scratch.
    sv = tl.load(surv_ptr + lane, mask=in_n, other=0.0)
    d0 = tl.where(lane_ok & (sv > 0.0), hi - sv.to(tl.int32, bitcast=True), span)
    tie = ((d0 == d_k) & in_n).to(tl.int32)
    admitted = in_n & ((d0 < d_k) | ((tie != 0) & (_lane_cumsum(tie) - tie < ties)))
    count_buf = scratch_ptr + 2 * BLOCK
    tl.store(count_buf + slot, _lane_cumsum(admitted.to(tl.int32)))
    tl.debug_barrier()
    req = tl.arange(0, BLOCK_R)
    req_in = req < num_req
    act_r, _ = _request_flags(active_ptr, max_len_ptr, req, req_in, gamma, HAS_ACTIVE, HAS_MAX_LEN)
    end = req * gamma + gamma - 1  # the request's last lane (-1 when γ = 0)
    start = req * gamma - 1  # the lane before its first
    THREADS: tl.constexpr = BLOCK // ITEMS
    at_end = tl.load(count_buf + (end % ITEMS) * THREADS + end // ITEMS, mask=req_in & (end >= 0), other=0,
                     cache_modifier=".cg")
    at_start = tl.load(count_buf + (start % ITEMS) * THREADS + start // ITEMS, mask=req_in & (start >= 0),
                       other=0, cache_modifier=".cg")
    lengths = at_end - at_start
    rows = tl.where(act_r, lengths + 1, 0)
    cu = tl.cumsum(rows, 0)

    tl.store(lengths_ptr + req, lengths, mask=req_in)
    tl.store(cu_ptr + 1 + req, cu, mask=req_in)
    tl.store(cu_ptr, 0)
    tl.store(total_ptr, tl.sum(rows, 0))
    tl.store(expected_ptr, expected)


def next_pow2(x: int, floor: int = 2) -> int:
    return max(floor, triton.next_power_of_2(max(int(x), 1)))


# Lanes a thread holds (the serial part of every scan); fewer when the block is small.
ITEMS_PER_THREAD = 8
MAX_WARPS = 32


def launch_config(n: int) -> tuple[int, int, dict]:
    """(BLOCK, ITEMS, launch options) for n = R·γ candidates.

    BLOCK = the power of two >= n, at least 32 (one lane per thread of a
    warp); 8 lanes a thread from 1 warp (256 lanes) to 32 warps (8192), 16
    at 16384. A scan then costs ITEMS serial adds plus one value a thread
    across threads. sm_90 SASS at 4096 lanes, per radix pass: 372
    instructions a thread at 16 warps (8 lanes each; 6.0k warp-instructions),
    520 at 8 warps (16 lanes; 4.2k): 16 lanes a thread would issue less but
    hide the pass's L2 round trip behind fewer warps, compile 40% slower
    (0.90 against 0.64 s) and use 232 registers; 8 keeps every bucket up to
    4096 lanes without spills (bench/NOTES.md)."""
    block = max(triton.next_power_of_2(max(int(n), 1)), 32)
    warps = min(max(block // (32 * ITEMS_PER_THREAD), 1), MAX_WARPS)
    # maxnreg = the register file / threads: a grid of one block never shares its SM, but ptxas
    # otherwise leaves room for a second block (capping 512 threads at 64 registers: spills).
    return block, block // (32 * warps), {"num_warps": warps, "maxnreg": min(255, 65536 // (32 * warps))}


def check_size(num_req: int, gamma: int, op: str = "schedule_verify") -> None:
    n = num_req * gamma
    if n > MAX_CANDIDATES:
        raise ValueError(
            f"the Triton {op} handles at most R*γ = {MAX_CANDIDATES} candidates in one program, "
            f"got R*γ = {num_req}*{gamma} = {n}"
        )


def request_args(max_len, active, dummy):
    """max_len and active as the kernels read them (a dummy pointer when absent)."""
    ml = max_len.contiguous() if max_len is not None else dummy
    act = active.contiguous().view(torch.uint8) if active is not None else dummy
    return ml, act


def schedule_verify(a):
    survival, sps, mode, history, max_len, active, capacity = (
        a.survival, a.sps, a.mode, a.history, a.max_len, a.active, a.capacity)
    num_req, gamma = survival.shape
    check_size(num_req, gamma)
    device = survival.device
    surv = survival.to(torch.float32).contiguous()
    kernel_mode = CAUSAL if mode != "async" else (CAPACITY if capacity is not None else HISTORY)
    hist = history.to(torch.float32).contiguous() if kernel_mode == HISTORY else surv
    sps32 = sps.to(torch.float32).contiguous()
    lengths = torch.empty((num_req,), dtype=torch.int32, device=device)
    cu_verify = torch.empty((num_req + 1,), dtype=torch.int32, device=device)
    total = torch.empty((), dtype=torch.int32, device=device)
    expected = torch.empty((), dtype=torch.float32, device=device)
    ml, act = request_args(max_len, active, lengths)
    block, items, options = launch_config(num_req * gamma)
    scratch = torch.empty((3 * block,), dtype=torch.int32, device=device)  # 2 sort buffers, the admitted counts
    _schedule_verify_kernel[(1,)](
        surv, hist, capacity if kernel_mode == CAPACITY else lengths, sps32, ml, act, scratch,
        lengths, cu_verify, total, expected,
        num_req, gamma, max(gamma, 1), sps32.shape[0],
        MODE=kernel_mode, HAS_MAX_LEN=max_len is not None, HAS_ACTIVE=active is not None,
        BLOCK=block, ITEMS=items, BLOCK_R=next_pow2(num_req), FIRST_PASS=0 if kernel_mode == HISTORY else 1, **options,
    )
    return lengths, cu_verify, total, expected


_SIGNATURE = {"surv_ptr": "*fp32", "hist_ptr": "*fp32", "cap_ptr": "*i32", "sps_ptr": "*fp32", "max_len_ptr": "*i32",
              "active_ptr": "*u8", "scratch_ptr": "*i32", "lengths_ptr": "*i32", "cu_ptr": "*i32",
              "total_ptr": "*i32", "expected_ptr": "*fp32", "num_req": "i32", "gamma": "i32", "gamma_div": "i32",
              "sps_len": "i32", "MODE": "constexpr", "HAS_MAX_LEN": "constexpr", "HAS_ACTIVE": "constexpr",
              "BLOCK": "constexpr", "ITEMS": "constexpr", "BLOCK_R": "constexpr", "FIRST_PASS": "constexpr"}
_MODES = {"causal": CAUSAL, "async": HISTORY, "capacity": CAPACITY}


def _bucket_spec(mode: str, n: int):
    """The launcher's compile for a bucket of n = R·γ candidates (γ = 8, max_len and active given):
    (kernel, signature, constexprs, options) for tests/aot_compile_triton.py and bench/triton_compile_time.py.
    mode: "causal", "async" (with history) or "capacity" (async with a capacity tensor)."""
    block, items, options = launch_config(n)
    gamma = min(8, n)
    num_req = max(n // gamma, 1)
    constexprs = {"MODE": _MODES[mode], "HAS_MAX_LEN": True, "HAS_ACTIVE": True, "BLOCK": block, "ITEMS": items,
                  "BLOCK_R": next_pow2(num_req), "FIRST_PASS": 0 if _MODES[mode] == HISTORY else 1}
    return _schedule_verify_kernel, _SIGNATURE, constexprs, options


def _compile_specs():
    """(kernel, signature, constexprs, options) tuples that tests compile for sm_90 ahead of time.

    CI compiles the R=512, γ=8 (4096-candidate) programs of every mode and the
    largest (16384-candidate) causal one: 0.6-1.2 s each (the bitonic tl.sort
    this kernel had took 6-17 s at 4096 and 30-136 s at 16384, so CI left 16384
    out; bench/NOTES.md)."""
    return [_bucket_spec(m, 4096) for m in _MODES] + [_bucket_spec("causal", MAX_CANDIDATES)]
