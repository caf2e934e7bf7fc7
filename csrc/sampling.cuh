// Shared sampling math of the CUDA kernels (rejection_sample.cu, markov_draft.cu).
//
// Two layers:
//  1. __host__ __device__ per-element formulas (ordered float keys, the
//     top-k / top-p bisection steps, the target probability, the acceptance
//     test, Gumbel noise and race scores, softmax partial merges). The kernels
//     call exactly these functions, and tests/test_cuda_host_math.py runs them
//     on the host (nvcc) in a sequential emulation against the reference op.
//  2. Device-only block/warp reductions (max, sum, first-index argmax) built
//     on warp shuffles plus 32 floats of shared memory.
//
// The formulas mirror dspark_kernels/reference/sampling.py and the Triton
// kernels: z = logit / T with IEEE round-to-nearest division (__fdiv_rn, as
// torch computes it), accurate expf/logf. Never build these files with
// --use_fast_math: it would turn the divisions and logs into approximations
// and move sampled tokens away from the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_type.h"
#include "philox.cuh"

namespace dspark {

// Index that loses every first-index argmax comparison (no element seen yet).
constexpr int32_t kNoIndex = 0x7FFFFFFF;

// ---------------------------------------------------------------------------
// Scalar primitives, identical on host and device.
// ---------------------------------------------------------------------------

__host__ __device__ __forceinline__ float neg_inf() { return -INFINITY; }

__host__ __device__ __forceinline__ int32_t float_as_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_int(x);
#else
  int32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

__host__ __device__ __forceinline__ float bits_as_float(int32_t b) {
#ifdef __CUDA_ARCH__
  return __int_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

// IEEE round-to-nearest x / y (torch's division; Triton's tl.math.div_rn).
__host__ __device__ __forceinline__ float div_rn(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(x, y);
#else
  return x / y;  // x86-64 SSE: IEEE single precision
#endif
}

__host__ __device__ __forceinline__ float exp_f(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return std::exp(x);
#endif
}

__host__ __device__ __forceinline__ float log_f(float x) {
#ifdef __CUDA_ARCH__
  return logf(x);
#else
  return std::log(x);
#endif
}

// Monotone int32 image of fp32: a < b (as floats, no NaN) iff key(a) < key(b).
__host__ __device__ __forceinline__ int32_t ordered_key(float x) {
  const int32_t b = float_as_bits(x);
  return b >= 0 ? b : (b ^ 0x7FFFFFFF);
}

// Inverse of ordered_key; takes int64 because bisection midpoints are computed
// in 64 bits (the key range of [-inf, m] spans up to 2^32 values).
__host__ __device__ __forceinline__ float key_to_float(int64_t key) {
  const int32_t k = static_cast<int32_t>(key);
  return bits_as_float(k >= 0 ? k : (k ^ 0x7FFFFFFF));
}

// z = logit / T, with T already replaced by 1 for greedy rows.
__host__ __device__ __forceinline__ float scaled_logit(float logit, float t) {
  return div_rn(logit, t);
}

// Greedy rows (T < 1e-5, GREEDY_TEMPERATURE of reference/sampling.py; below
// ~1e-30 z / T overflows fp32) compute their statistics at T = 1.
constexpr float kGreedyTemperature = 1e-5f;
__host__ __device__ __forceinline__ bool is_greedy(float temperature) {
  return temperature < kGreedyTemperature;
}
__host__ __device__ __forceinline__ float safe_temperature(float temperature) {
  return is_greedy(temperature) ? 1.f : temperature;
}

// ---------------------------------------------------------------------------
// First-index argmax (torch.argmax semantics: the earliest index wins ties).
// ---------------------------------------------------------------------------

struct ArgMax {
  float v;
  int32_t i;
};

// Argmax that carries one payload value (the race winner's z in markov_draft).
struct ArgMaxZ {
  float v;
  int32_t i;
  float z;
};

__host__ __device__ __forceinline__ bool argmax_better(float v, int32_t i, float best_v,
                                                       int32_t best_i) {
  return v > best_v || (v == best_v && i < best_i);
}

__host__ __device__ __forceinline__ ArgMax argmax_init() { return ArgMax{neg_inf(), kNoIndex}; }
__host__ __device__ __forceinline__ ArgMaxZ argmaxz_init() {
  return ArgMaxZ{neg_inf(), kNoIndex, 0.f};
}

// Commutative and associative (for non-NaN values), so any reduction order
// gives the same winner: the largest value, and among equals the first index.
__host__ __device__ __forceinline__ ArgMax argmax_combine(ArgMax a, ArgMax b) {
  return argmax_better(b.v, b.i, a.v, a.i) ? b : a;
}
__host__ __device__ __forceinline__ ArgMaxZ argmax_combine(ArgMaxZ a, ArgMaxZ b) {
  return argmax_better(b.v, b.i, a.v, a.i) ? b : a;
}

// An index that never left kNoIndex (empty or all-NaN input) becomes `fallback`.
__host__ __device__ __forceinline__ int32_t argmax_index(int32_t i, int32_t fallback) {
  return i == kNoIndex ? fallback : i;
}

// ---------------------------------------------------------------------------
// Target distribution of one row (reference/sampling.py: filtered_probs).
// Row statistics: m = max z, s = sum over the top-k survivors of exp(z - m),
// kth = k-th largest z (-inf: top-k off), pthr = top-p threshold (0: off),
// z2 = top-p renormaliser (1 when top_p is not given).
// ---------------------------------------------------------------------------

struct RowStats {
  float m, s, kth, pthr, z2;
  int32_t amax;
};

// Top-k bisection: the k-th largest z is the largest key t with count(z >= t) >= k.
struct TopKSearch {
  int64_t lo, hi;
};

__host__ __device__ __forceinline__ TopKSearch topk_search_init(float row_max) {
  return TopKSearch{ordered_key(neg_inf()), ordered_key(row_max)};
}
__host__ __device__ __forceinline__ bool topk_search_active(const TopKSearch& s) {
  return s.lo < s.hi;
}
__host__ __device__ __forceinline__ int64_t topk_search_mid(const TopKSearch& s) {
  return s.lo + (s.hi - s.lo + 1) / 2;
}
// count_ge = number of z >= key_to_float(mid).
__host__ __device__ __forceinline__ void topk_search_update(TopKSearch& s, int64_t mid,
                                                            int64_t count_ge, int64_t k) {
  if (count_ge >= k) {
    s.lo = mid;
  } else {
    s.hi = mid - 1;
  }
}
__host__ __device__ __forceinline__ float topk_search_result(const TopKSearch& s) {
  return key_to_float(s.lo);
}
// Top-k is active for 0 < k < V.
__host__ __device__ __forceinline__ bool topk_active(int64_t k, int64_t vocab) {
  return k > 0 && k < vocab;
}
// 32 halvings cover the 2^32 keys; the loops also stop when lo == hi.
constexpr int kTopKIters = 32;

// Top-p bisection over the bit patterns [0, bits(1.0)] of non-negative floats:
// the threshold is the smallest v with mass(p > v) < top_p; p >= v is kept.
struct TopPSearch {
  int32_t lo, hi;
};

__host__ __device__ __forceinline__ TopPSearch topp_search_init() {
  return TopPSearch{0, 0x3F800000};  // bits of 1.0f: mass(p > 1) = 0 < top_p
}
__host__ __device__ __forceinline__ bool topp_search_active(const TopPSearch& s) {
  return s.lo < s.hi;
}
__host__ __device__ __forceinline__ int32_t topp_search_mid(const TopPSearch& s) {
  return (s.lo + s.hi) / 2;
}
// mass_gt = sum of the (top-k filtered) probabilities p > bits_as_float(mid).
__host__ __device__ __forceinline__ void topp_search_update(TopPSearch& s, int32_t mid,
                                                            float mass_gt, float top_p) {
  if (mass_gt < top_p) {
    s.hi = mid;
  } else {
    s.lo = mid + 1;
  }
}
__host__ __device__ __forceinline__ float topp_search_result(const TopPSearch& s) {
  return bits_as_float(s.lo);
}
__host__ __device__ __forceinline__ bool topp_active(float top_p) { return top_p < 1.f; }
constexpr int kTopPIters = 32;

// exp(z - m) if z survives top-k, else 0 (the summand of s).
__host__ __device__ __forceinline__ float topk_weight(float z, float m, float kth) {
  return z >= kth ? exp_f(z - m) : 0.f;
}

// Top-k filtered probability (before top-p): p = exp(z - m) / s, or 0.
__host__ __device__ __forceinline__ float topk_prob(float z, float m, float s, float kth) {
  return z >= kth ? div_rn(exp_f(z - m), s) : 0.f;
}

// Final target probability p_t(i) of z_i = logit_i / T.
__host__ __device__ __forceinline__ float target_prob(float z, float m, float s, float kth,
                                                      float pthr, float z2) {
  const float p = div_rn(exp_f(z - m), s);
  const bool keep = (z >= kth) && (p >= pthr);
  return keep ? div_rn(p, z2) : 0.f;
}

__host__ __device__ __forceinline__ float target_prob(float z, const RowStats& st) {
  return target_prob(z, st.m, st.s, st.kth, st.pthr, st.z2);
}

// Statistics after the max pass (best = first argmax of z over the row),
// before any filter: kth = -inf, pthr = 0 and z2 = 1 keep every token; the
// top-k / top-p passes then set kth, s, pthr and z2.
__host__ __device__ __forceinline__ RowStats row_stats_from_max(ArgMax best) {
  return RowStats{best.v, 0.f, neg_inf(), 0.f, 1.f, argmax_index(best.i, 0)};
}

// Statistics a row gets when it is never sampled from (padding rows past
// cu_verify[R]); harmless values, so inconsistent inputs read defined data.
__host__ __device__ __forceinline__ RowStats padding_row_stats() {
  return RowStats{0.f, 1.f, neg_inf(), 0.f, 1.f, 0};
}

// ---------------------------------------------------------------------------
// Draft distribution q from pre-temperature draft logits (MODE 2).
// ---------------------------------------------------------------------------

struct SoftmaxStats {
  float m, s;
  int32_t amax;
};

// q(i) = softmax(dlogit / T_d)[i], one-hot at the first argmax for greedy T_d.
__host__ __device__ __forceinline__ float draft_q(float dz, int64_t idx, bool d_greedy,
                                                  const SoftmaxStats& st) {
  if (d_greedy) return idx == st.amax ? 1.f : 0.f;
  return div_rn(exp_f(dz - st.m), st.s);
}

// ---------------------------------------------------------------------------
// Chain verification.
// ---------------------------------------------------------------------------

// Accept draft x: greedy rows iff x is the row argmax, else iff u * q(x) < p(x).
__host__ __device__ __forceinline__ bool accept_draft(bool greedy, int64_t row_argmax, int64_t x,
                                                      float coin, float p_draft, float p_target) {
  return greedy ? (row_argmax == x) : (coin * p_draft < p_target);
}

// Residual weight max(0, p - q).
__host__ __device__ __forceinline__ float residual_weight(float p, float q) {
  return fmaxf(p - q, 0.f);
}

// Lane `lane` (0..3) of a Philox block.
__host__ __device__ __forceinline__ uint32_t philox_lane(const Philox4& r, int lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// Standard Gumbel noise -log(-log(u)), u in (0, 1).
__host__ __device__ __forceinline__ float gumbel(float u) { return -log_f(-log_f(u)); }

// Race score of weight w >= 0 (w == 0 gives -inf and never wins).
__host__ __device__ __forceinline__ float race_score(float w, float g) { return log_f(w) + g; }

// Inactive-or-inconsistent request guards (the kernels trust no index).
__host__ __device__ __forceinline__ int64_t clamp_i64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// A request is live iff it has verify rows that start inside target_logits.
__host__ __device__ __forceinline__ bool request_live(int64_t start, int64_t end, int64_t num_rows) {
  return end - start > 0 && start >= 0 && start < num_rows;
}

// Drafts to verify: lengths[r] clamped to [0, γ] and to the rows that exist.
__host__ __device__ __forceinline__ int64_t verify_length(int64_t length, int64_t gamma,
                                                          int64_t start, int64_t num_rows,
                                                          bool live) {
  if (!live) return 0;
  const int64_t l = clamp_i64(length, 0, gamma);
  return l < num_rows - 1 - start ? l : num_rows - 1 - start;
}

// The request owning target row `row`: the first r with cu[r + 1] > row
// (torch.searchsorted(cu[1:], row, right=True)), clamped to [0, R - 1].
__host__ __device__ __forceinline__ int64_t request_of_row(const int64_t* cu, int64_t num_req,
                                                           int64_t row) {
  int64_t lo = 0, hi = num_req;  // answer in [lo, hi]
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cu[mid + 1] > row) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo < num_req ? lo : num_req - 1;
}

// ---------------------------------------------------------------------------
// Markov head: merging the per-tile softmax partials.
// ---------------------------------------------------------------------------

// Contribution of a tile with max pm and sum ps to the row sum at global max m.
__host__ __device__ __forceinline__ float softmax_merge_term(float pm, float ps, float m) {
  return pm > neg_inf() ? ps * exp_f(pm - m) : 0.f;
}

// Tile max used inside exp(zt - m_safe) (an all -inf tile sums zeros).
__host__ __device__ __forceinline__ float safe_max(float m) { return m == neg_inf() ? 0.f : m; }

// p_d(x) = softmax(z / T)[x] from the race winner's z and the merged (m, s).
__host__ __device__ __forceinline__ float softmax_prob(float z, float t, float m, float s) {
  return div_rn(exp_f(div_rn(z, t) - m), s);
}

// ---------------------------------------------------------------------------
// Device-only: element loads and block reductions.
// ---------------------------------------------------------------------------
#ifdef __CUDACC__

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return to_float(*p);
}

__device__ __forceinline__ float shfl_xor(float v, int m) {
  return __shfl_xor_sync(0xFFFFFFFFu, v, m);
}
__device__ __forceinline__ int32_t shfl_xor(int32_t v, int m) {
  return __shfl_xor_sync(0xFFFFFFFFu, v, m);
}
__device__ __forceinline__ long long shfl_xor(long long v, int m) {
  return __shfl_xor_sync(0xFFFFFFFFu, v, m);
}
__device__ __forceinline__ ArgMax shfl_xor(ArgMax a, int m) {
  return ArgMax{shfl_xor(a.v, m), shfl_xor(a.i, m)};
}
__device__ __forceinline__ ArgMaxZ shfl_xor(ArgMaxZ a, int m) {
  return ArgMaxZ{shfl_xor(a.v, m), shfl_xor(a.i, m), shfl_xor(a.z, m)};
}

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(ArgMax a, ArgMax b) const {
    return argmax_combine(a, b);
  }
  __device__ __forceinline__ ArgMaxZ operator()(ArgMaxZ a, ArgMaxZ b) const {
    return argmax_combine(a, b);
  }
};

// Butterfly all-reduce over a full warp: every lane ends with the same value
// (each step combines a pair symmetrically, so float sums agree bitwise).
template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// All-reduce over the block; every thread gets the result. blockDim.x must be
// a multiple of 32 and every thread must call it (uniform control flow). The
// leading barrier keeps a previous call's readers off the scratch array.
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op, T identity) {
  __shared__ T scratch[32];
  v = warp_allreduce(v, op);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < num_warps ? scratch[lane] : identity;
  return warp_allreduce(r, op);
}

__device__ __forceinline__ float block_sum(float v) { return block_allreduce(v, SumOp{}, 0.f); }
__device__ __forceinline__ long long block_sum(long long v) {
  return block_allreduce(v, SumOp{}, 0LL);
}
__device__ __forceinline__ float block_max(float v) {
  return block_allreduce(v, MaxOp{}, neg_inf());
}
__device__ __forceinline__ ArgMax block_argmax(ArgMax v) {
  return block_allreduce(v, ArgMaxOp{}, argmax_init());
}
__device__ __forceinline__ ArgMaxZ block_argmax(ArgMaxZ v) {
  return block_allreduce(v, ArgMaxOp{}, argmaxz_init());
}

__device__ __forceinline__ float warp_sum(float v) { return warp_allreduce(v, SumOp{}); }
__device__ __forceinline__ float warp_max(float v) { return warp_allreduce(v, MaxOp{}); }
__device__ __forceinline__ ArgMax warp_argmax(ArgMax v) { return warp_allreduce(v, ArgMaxOp{}); }
__device__ __forceinline__ ArgMaxZ warp_argmax(ArgMaxZ v) { return warp_allreduce(v, ArgMaxOp{}); }

#endif  // __CUDACC__

// Calls f with a value of the C++ type that t names (templated kernels pick
// their load type from it). The sampling kernels are instantiated for fp32,
// fp16 and bf16 only: kFloat64 gives cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_float(FloatType t, F&& f) {
  switch (t) {
    case FloatType::kFloat32:
      return f(float{});
    case FloatType::kFloat16:
      return f(__half{});
    case FloatType::kBFloat16:
      return f(__nv_bfloat16{});
    case FloatType::kFloat64:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace dspark
