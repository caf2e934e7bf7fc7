// Torch-free launcher of csrc/schedule_verify.cu (DSpark hardware-aware
// prefix scheduler, paper Alg. 1 and §5.2), plus the kernel's per-thread math
// as __host__ __device__ functions.
//
// The first part (ScheduleVerifyArgs, schedule_verify_launch) is plain C++ and
// is what csrc/torch_bindings.cpp includes. The second part is compiled only
// by nvcc (__CUDACC__): the kernel calls exactly these functions, and
// tests/test_cuda_host_math.py runs them in a host program that emulates the
// block (threads, warps, the radix sort passes and the scans, in the same
// association order as the device) against the reference op.
//
// Semantics: dspark_kernels/reference/schedule_verify.py is the definition.
// Summary, per position (r, j), flat index r·γ + j:
//   candidate = active request, j < clamp(max_len[r], 0, γ) and fp32 value
//            > 0 (Alg. 1 line 4: zeros, negatives and NaN are not); the
//            others count as -inf and sort last. num_valid = candidates of
//            the pass (history and survival each have their own).
//   order  = value descending, then flat index ascending.
//   tau_k  = fp32(A) + fp32(Σ_{i<k} gain_i), the sum in fp64 (torch's CPU
//            cumsum of fp32 accumulates in double); gain_i = value of the i-th
//            candidate for i < num_valid, else 0.
//   theta_k = tau_k · sps[min(A + k, len(sps) - 1)] in fp32.
//   causal: K = first lane i whose theta_{i+1} does not rise above theta_i
//           (lanes >= num_valid never rise); async: K = min(C, num_valid)
//           with C = clamp(*capacity, 0, ...) or, from history, the first
//           argmax of theta_k, k = 0..num_valid_h, over the history's order
//           (NaN wins, the first NaN first, as torch.argmax).
//   admitted iff key < key of the K-th candidate; lengths[r] counts them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.h"

namespace dspark {

// One thread block sorts every candidate: R·γ is bounded by what one block
// holds (1024 threads x 16 keys; 16384 x 8 B = 128 KB of shared memory for
// the sort exchange). The Triton kernel shares the bound (MAX_CANDIDATES).
constexpr int64_t kScheduleMaxCandidates = 16384;

// All pointers are device pointers; strides are in elements (any strides).
// Optional inputs are nullptr when absent.
struct ScheduleVerifyArgs {
  // survival [R, γ]; history [R, γ] (read only when async_mode). Every
  // FloatType is read (load_f32), for these and for sps.
  const void* survival = nullptr;
  FloatType survival_dtype = FloatType::kFloat32;
  int64_t stride_sr = 0, stride_sj = 0;
  const void* history = nullptr;
  FloatType history_dtype = FloatType::kFloat32;
  int64_t stride_hr = 0, stride_hj = 0;
  // sps [sps_len] steps per second for a verify batch of B tokens (the op passes fp32 or fp64).
  const void* sps = nullptr;
  FloatType sps_dtype = FloatType::kFloat32;
  int64_t sps_len = 0, stride_sps = 0;
  // max_len [R] int32 or int64 | nullptr; active [R] bool (one byte) | nullptr.
  const void* max_len = nullptr;
  bool max_len_int64 = false;
  int64_t stride_ml = 0;
  const uint8_t* active = nullptr;
  int64_t stride_act = 0;

  // capacity [] int32 or int64 | nullptr: async mode's K given (then history is not read).
  const void* capacity = nullptr;
  bool capacity_int64 = false;

  int64_t num_req = 0;
  int64_t gamma = 0;
  bool async_mode = false;

  // Outputs: lengths [R] int32, cu_verify [R + 1] int32, total [] int32,
  // expected [] fp32 (contiguous).
  int32_t* lengths = nullptr;
  int32_t* cu_verify = nullptr;
  int32_t* total = nullptr;
  float* expected = nullptr;
};

// One block on `stream`, no host synchronisation, no workspace: capturable in
// a CUDA graph. Requires num_req·γ <= kScheduleMaxCandidates, sps_len >= 1,
// num_req·(γ + 1) < 2^31; returns cudaErrorInvalidValue otherwise.
cudaError_t schedule_verify_launch(const ScheduleVerifyArgs& args, cudaStream_t stream);

}  // namespace dspark

#if defined(__CUDACC__)
// ---------------------------------------------------------------------------
// Kernel math, identical on host and device (nvcc only).
// ---------------------------------------------------------------------------
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstring>

#include "sampling.cuh"

namespace dspark {
namespace sv {

// Block shapes. CAP = threads x items candidates; lanes are in blocked
// arrangement (thread t owns lanes t·items .. t·items + items - 1), which is
// also cub::BlockRadixSort's rank order, so the sort's stability keeps lanes
// of equal value in flat-index order. Chosen so that the sort's 64-bit keys
// stay in registers (items x 2 registers; 1024 threads leave 64 registers a
// thread, 512 leave 128). ptxas -v, sm_90a: 71 / 94 / 127 registers and no
// spill for configs 0-2; config 3 needs 1024 x 16 at 64 registers and spills
// ~230 B a thread to L1-cached local memory (512 x 32 spilled more).
//   config 0: 256 x 4   = 1024 candidates  (8 warps: cheap barriers for small batches)
//   config 1: 512 x 8   = 4096             (R = 512, γ = 8, the design's example)
//   config 2: 512 x 16  = 8192             (1024 x 8 would spill 72 B)
//   config 3: 1024 x 16 = 16384            (kScheduleMaxCandidates)
// Radix digits of 5 bits: survival in [0, 1] spans 30 rank bits (KeyMap
// below), 6 passes; the digit counters (16 lanes x threads x 4 B = 64 KB at
// 1024 threads) fit under the 132 KB key exchange they share memory with.
// memoize: cub keeps the digit scan in registers; off where that spills
// (512 x 16 spills 28 B with it, none without).
template <int kThreads_, int kItems_, bool kMemoize_>
struct Config {
  static constexpr int kThreads = kThreads_;
  static constexpr int kItems = kItems_;
  static constexpr int kCap = kThreads_ * kItems_;
  static constexpr int kWarps = kThreads_ / 32;
  static constexpr int kRadixBits = 5;
  static constexpr bool kMemoize = kMemoize_;
  static constexpr int kIdxBits = kCap == 1024 ? 10 : kCap == 4096 ? 12 : kCap == 8192 ? 13 : 14;
  static_assert((1 << kIdxBits) == kCap, "kCap must be a power of two");
  static_assert(kThreads_ % 32 == 0 && kThreads_ <= 1024, "whole warps, one block");
};
using Config0 = Config<256, 4, true>;
using Config1 = Config<512, 8, true>;
using Config2 = Config<512, 16, false>;
using Config3 = Config<1024, 16, false>;
static_assert(Config3::kCap == kScheduleMaxCandidates, "largest shape holds every allowed batch");

// Which shape runs n = R·γ candidates (n <= kScheduleMaxCandidates).
__host__ __device__ __forceinline__ int config_index(int64_t n) {
  return n <= Config0::kCap ? 0 : n <= Config1::kCap ? 1 : n <= Config2::kCap ? 2 : 3;
}

// Bit casts shared with the sampling kernels (sampling.cuh).
using ::dspark::bits_as_float;
using ::dspark::float_as_bits;

// fp32 round-to-nearest arithmetic, written out so nvcc cannot contract or
// reassociate it (the reference does these operations one at a time).
__host__ __device__ __forceinline__ float add_rn(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(x, y);
#else
  return x + y;  // x86-64 SSE: IEEE single precision
#endif
}

__host__ __device__ __forceinline__ float mul_rn(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(x, y);
#else
  return x * y;
#endif
}

__host__ __device__ __forceinline__ float f64_to_f32(double x) {
#ifdef __CUDA_ARCH__
  return __double2float_rn(x);
#else
  return static_cast<float>(x);
#endif
}

// Element i of a float tensor as fp32, rounded as torch's .float() does
// (fp16 / bf16 widen exactly, fp64 rounds to nearest).
__host__ __device__ __forceinline__ float load_f32(const void* p, FloatType t, int64_t i) {
  switch (t) {
    case FloatType::kFloat16:
      return __half2float(static_cast<const __half*>(p)[i]);
    case FloatType::kBFloat16: {
      const uint16_t b = static_cast<const uint16_t*>(p)[i];
      return bits_as_float(static_cast<int32_t>(static_cast<uint32_t>(b) << 16));
    }
    case FloatType::kFloat64:
      return f64_to_f32(static_cast<const double*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

// ---- Requests -------------------------------------------------------------

__host__ __device__ __forceinline__ bool is_active(const ScheduleVerifyArgs& a, int64_t r) {
  return a.active == nullptr || a.active[r * a.stride_act] != 0;
}

// clamp(max_len[r], 0, γ) in int64, as the reference's .to(int64).clamp(0, γ).
__host__ __device__ __forceinline__ int64_t cap_of(const ScheduleVerifyArgs& a, int64_t r) {
  if (a.max_len == nullptr) return a.gamma;
  const int64_t m = a.max_len_int64 ? static_cast<const int64_t*>(a.max_len)[r * a.stride_ml]
                                    : static_cast<const int32_t*>(a.max_len)[r * a.stride_ml];
  return m < 0 ? 0 : (m > a.gamma ? a.gamma : m);
}

// ---- Order keys -------------------------------------------------------------
// Full key of a candidate: (hi << idx_bits) | flat, hi the 32-bit image below.
// Plain unsigned order of full keys == (value descending, flat ascending), the
// Triton kernel's int64 key (~mono << 32 | flat) with the sign bit of the high
// half flipped (signed -> unsigned order) and the index in idx_bits bits.

// Unsigned image of v, ascending == v descending: -0 -> +0, NaN above +inf,
// invalid -> -inf (the reference's torch.where(valid, v, -inf)).
__host__ __device__ __forceinline__ uint32_t order_hi(float v, bool valid) {
  if (!valid) v = -INFINITY;
  if (v == 0.0f) v = 0.0f;
  const int32_t bits = float_as_bits(v);
  int32_t mono = bits ^ ((bits >> 31) & 0x7FFFFFFF);  // int32 ascending == float ascending
  if (v != v) mono = 0x7FFFFFFF;
  return static_cast<uint32_t>(~mono) ^ 0x80000000u;
}

// The fp32 value a key's high half was built from (NaN comes back as a NaN).
__host__ __device__ __forceinline__ float hi_value(uint32_t hi) {
  const int32_t mono = ~static_cast<int32_t>(hi ^ 0x80000000u);
  return bits_as_float(mono ^ ((mono >> 31) & 0x7FFFFFFF));
}

// Image of position (r, j) of `values` (survival or history): a candidate's
// own, -inf (kNegInfHi) for a non-candidate (its fp32 value not > 0 included).
__host__ __device__ __forceinline__ uint32_t candidate_hi(const ScheduleVerifyArgs& a, const void* values,
                                                          FloatType dtype, int64_t stride_r,
                                                          int64_t stride_j, int64_t r, int64_t j) {
  const float v = load_f32(values, dtype, r * stride_r + j * stride_j);
  return order_hi(v, is_active(a, r) && j < cap_of(a, r) && v > 0.0f);
}

// The given capacity clamped to [0, cap] (an unchecked one may be any integer).
__host__ __device__ __forceinline__ uint32_t given_capacity(const ScheduleVerifyArgs& a, uint32_t cap) {
  const int64_t k = a.capacity_int64 ? *static_cast<const int64_t*>(a.capacity)
                                     : *static_cast<const int32_t*>(a.capacity);
  return k < 0 ? 0u : (k > static_cast<int64_t>(cap) ? cap : static_cast<uint32_t>(k));
}

// Image of lane `lane` of the blocked arrangement: lanes >= n are padding,
// invalid (-inf) with flat index >= n, so they sort after every real candidate.
__host__ __device__ __forceinline__ uint32_t lane_hi(const ScheduleVerifyArgs& a, const void* values,
                                                     FloatType dtype, int64_t stride_r,
                                                     int64_t stride_j, int64_t lane) {
  if (lane >= a.num_req * a.gamma) return order_hi(0.0f, false);
  const int64_t r = lane / a.gamma;
  return candidate_hi(a, values, dtype, stride_r, stride_j, r, lane - r * a.gamma);
}

// Image of -inf (invalid candidates, padding lanes): the largest image.
constexpr uint32_t kNegInfHi = 0xFF800000u;

// Block-wide map from images to sort ranks: finite-or-NaN images relative to
// their minimum lo, every -inf image to span = (their max - lo) + 1, one rank
// above them. Order-preserving, and padding/masked lanes (always present
// unless R·γ fills the block) then do not stretch the range to 32 bits:
// survival in [0, 1] needs 30 bits (6 radix passes of 5 bits, not 7).
struct KeyMap {
  uint32_t lo;    // smallest image other than -inf
  uint32_t span;  // rank of -inf; 0 when every image is -inf
};

// lo / hi: min and max over the images other than kNegInfHi (lo > hi: none).
__host__ __device__ __forceinline__ KeyMap key_map(uint32_t lo, uint32_t hi) {
  KeyMap m;
  m.lo = lo;
  m.span = lo > hi ? 0u : hi - lo + 1u;  // hi <= kNegInfHi - 1: no wrap
  return m;
}

// Sort key: (rank << idx_bits) | lane. Only bits [idx_bits, idx_bits +
// sort_bits) differ between ranks and need radix passes; the index bits below
// are already in order (lane order) and the sort is stable.
__host__ __device__ __forceinline__ uint64_t sort_key(uint32_t hi, KeyMap m, uint32_t lane, int idx_bits) {
  const uint32_t rank = hi == kNegInfHi ? m.span : hi - m.lo;
  return (static_cast<uint64_t>(rank) << idx_bits) | lane;
}

// Number of rank bits the radix sort must look at (0: one rank, no sort).
__host__ __device__ __forceinline__ int sort_bits(KeyMap m) {
  uint32_t range = m.span;
  int bits = 0;
  while (range != 0) {
    ++bits;
    range >>= 1;
  }
  return bits;
}

// Sorted key back to the full key (image << idx_bits) | flat.
__host__ __device__ __forceinline__ uint64_t full_key(uint64_t sorted_key, KeyMap m, int idx_bits) {
  const uint32_t rank = static_cast<uint32_t>(sorted_key >> idx_bits);
  const uint32_t hi = rank >= m.span ? kNegInfHi : rank + m.lo;
  return (static_cast<uint64_t>(hi) << idx_bits) | (sorted_key & ((uint64_t{1} << idx_bits) - 1));
}

__host__ __device__ __forceinline__ float key_value(uint64_t key, int idx_bits) {
  return hi_value(static_cast<uint32_t>(key >> idx_bits));
}

// Threshold when every lane is admitted: above any full key (< 2^46).
constexpr uint64_t kAdmitAll = ~uint64_t{0};
// k_sel of a walk that selects no lane.
constexpr uint32_t kNoLane = 0xFFFFFFFFu;

// ---- Admission path -------------------------------------------------------------

// What one thread needs to walk its lanes of the sorted path.
struct PathCtx {
  const ScheduleVerifyArgs* a;
  int64_t num_active;  // A
  uint32_t num_valid;  // candidates that may be admitted
  float a_f;           // fp32(A)
  int idx_bits;
  uint32_t cap;        // lanes in the block (K = cap: every lane rises)
  KeyMap map;          // rank <-> image of the sorted keys' pass
};

__host__ __device__ __forceinline__ float sps_at(const ScheduleVerifyArgs& a, int64_t b) {
  const int64_t last = a.sps_len - 1;
  return load_f32(a.sps, a.sps_dtype, (b < last ? b : last) * a.stride_sps);
}

// theta_0 = fp32(A) · sps[min(A, last)].
__host__ __device__ __forceinline__ float theta_zero(const PathCtx& c) {
  return mul_rn(c.a_f, sps_at(*c.a, c.num_active));
}

// Gain of sorted lane `lane` (its value on the admission path, 0 past it);
// `key` is a sort key (rank form).
__host__ __device__ __forceinline__ double gain(const PathCtx& c, uint64_t key, uint32_t lane) {
  if (lane >= c.num_valid) return 0.0;
  return static_cast<double>(key_value(full_key(key, c.map, c.idx_bits), c.idx_bits));
}

// Argmax key of theta_k: plain unsigned max == torch.argmax's choice (any NaN
// beats every number, the first NaN first; else the largest value, the
// smallest k on ties; -0 ties +0).
__host__ __device__ __forceinline__ uint64_t argmax_key(float theta, uint32_t k) {
  uint32_t u;
  if (theta != theta) {
    u = 0xFFFFFFFFu;
  } else {
    const int32_t bits = float_as_bits(theta == 0.0f ? 0.0f : theta);
    u = static_cast<uint32_t>(bits ^ ((bits >> 31) & 0x7FFFFFFF)) ^ 0x80000000u;
  }
  return (static_cast<uint64_t>(u) << 32) | static_cast<uint32_t>(~k);
}

__host__ __device__ __forceinline__ uint32_t argmax_k(uint64_t key) {
  return ~static_cast<uint32_t>(key);
}

// Thread-local sum of the gains of its sorted lanes, left to right.
template <int kItems>
__host__ __device__ __forceinline__ double thread_gain_sum(const PathCtx& c, const uint64_t (&keys)[kItems],
                                                           uint32_t lane0) {
  double s = 0.0;
#pragma unroll
  for (int i = 0; i < kItems; ++i) s = s + gain(c, keys[i], lane0 + i);
  return s;
}

struct Walk {
  float last_theta;     // theta_{lane0 + items} (this thread's last lane)
  uint32_t first_stop;  // first lane whose theta does not rise (lanes >= num_valid never rise); cap if none
  uint64_t best;        // argmax_key over theta_{lane+1}, lane < num_valid (0 if none)
  bool has_tau;         // lane k_sel - 1 is this thread's: tau_{k_sel} below
  float tau;
  bool has_key;         // lane k_sel is this thread's: its full key (image << idx_bits | flat) below
  uint64_t key;
};

// Walks this thread's sorted lanes (keys in rank form): lane i owns tau_{i+1} = fp32(A) +
// fp32(prefix + gains up to i) and theta_{i+1}; theta_before is theta_{lane0}
// (owned by the previous thread, theta_0 for thread 0). Each theta_k is
// computed by exactly one lane, so a rise test and the argmax see the same bits.
template <int kItems>
__host__ __device__ __forceinline__ Walk walk(const PathCtx& c, const uint64_t (&keys)[kItems],
                                              uint32_t lane0, double prefix, float theta_before,
                                              uint32_t k_sel) {
  Walk w;
  w.first_stop = c.cap;
  w.best = 0;
  w.has_tau = false;
  w.tau = 0.0f;
  w.has_key = false;
  w.key = 0;
  double run = prefix;
  float prev = theta_before;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const uint32_t lane = lane0 + i;
    run = run + gain(c, keys[i], lane);
    const float tau = add_rn(c.a_f, f64_to_f32(run));
    const float theta = mul_rn(tau, sps_at(*c.a, c.num_active + lane + 1));
    const bool on_path = lane < c.num_valid;
    if (!(on_path && theta > prev) && w.first_stop == c.cap) w.first_stop = lane;
    if (on_path) {
      const uint64_t k = argmax_key(theta, lane + 1);
      w.best = k > w.best ? k : w.best;
    }
    if (lane + 1 == k_sel) {
      w.has_tau = true;
      w.tau = tau;
    }
    if (lane == k_sel) {
      w.has_key = true;
      w.key = full_key(keys[i], c.map, c.idx_bits);
    }
    prev = theta;
  }
  w.last_theta = prev;
  return w;
}

// Drafts of request r admitted under threshold `thresh` (a full key): every
// j < γ whose key, built as for the sort (invalid -> -inf), is below it.
__host__ __device__ __forceinline__ int32_t request_length(const ScheduleVerifyArgs& a, int64_t r,
                                                           uint64_t thresh, int idx_bits) {
  int32_t len = 0;
  for (int64_t j = 0; j < a.gamma; ++j) {
    const uint32_t hi = candidate_hi(a, a.survival, a.survival_dtype, a.stride_sr, a.stride_sj, r, j);
    const uint64_t key = (static_cast<uint64_t>(hi) << idx_bits) | static_cast<uint64_t>(r * a.gamma + j);
    len += key < thresh ? 1 : 0;
  }
  return len;
}

// Verify rows of request r: its anchor plus its drafts, 0 when inactive.
__host__ __device__ __forceinline__ int32_t request_rows(const ScheduleVerifyArgs& a, int64_t r,
                                                         int32_t length) {
  return is_active(a, r) ? length + 1 : 0;
}

}  // namespace sv
}  // namespace dspark
#endif  // __CUDACC__
