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
// kernels: z = logit · (1 / T), the reciprocal IEEE-rounded once per row
// (__fdiv_rn, as torch computes 1.0 / t) and one round-to-nearest multiply
// per element (__fmul_rn: never contracted into an FMA with what follows, so
// z - m, z + G, ... round exactly like the reference's separate ops),
// accurate expf/logf. Never build these files with --use_fast_math: it would
// turn the divisions and logs into approximations and move sampled tokens
// away from the reference.
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

// IEEE round-to-nearest x * y, never fused with a following add (an FMA would
// skip the rounding of the product that the reference does).
__host__ __device__ __forceinline__ float mul_rn(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(x, y);
#else
  return x * y;  // x86-64 SSE (no FMA in the baseline ISA the host program targets)
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

// Greedy rows (T < 1e-5, GREEDY_TEMPERATURE of reference/sampling.py; below
// ~1e-30 1 / T overflows fp32) compute their statistics at T = 1.
constexpr float kGreedyTemperature = 1e-5f;
__host__ __device__ __forceinline__ bool is_greedy(float temperature) {
  return temperature < kGreedyTemperature;
}
__host__ __device__ __forceinline__ float safe_temperature(float temperature) {
  return is_greedy(temperature) ? 1.f : temperature;
}

// 1 / T, IEEE-rounded once per row (reference/sampling.py: inverse_temperature);
// 1 on greedy rows.
__host__ __device__ __forceinline__ float inverse_temperature(float temperature) {
  return div_rn(1.f, safe_temperature(temperature));
}

// z = logit · (1 / T): one rounded multiply per element, no division.
__host__ __device__ __forceinline__ float scaled_logit(float logit, float inv_t) {
  return mul_rn(logit, inv_t);
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
// (kth_key, kth_id) = the k-th token in the order (z descending, id
// ascending) (top-k off: kNoKthKey / kNoKthId, everything kept), pthr = top-p
// threshold (0: off), z2 = top-p renormaliser (exactly 1 when top-p is off
// for the row, top_p >= 1 included), amax = first argmax of z.
// ---------------------------------------------------------------------------

constexpr int32_t kNoKthKey = -0x7FFFFFFF - 1;  // INT32_MIN: every key is >= it
constexpr int32_t kNoKthId = 0x7FFFFFFF;        // every id is <= it

struct RowStats {
  float m, s, pthr, z2;
  int32_t kth_key, kth_id, amax;
};

// The key top-k orders z by: ordered_key with -0.0 taken as +0.0, so that
// signed zeros tie (and are split by id) as they do in the reference's sort.
__host__ __device__ __forceinline__ int32_t topk_key(float z) {
  return ordered_key(z == 0.f ? 0.f : z);
}

// Token i (key = topk_key(z_i)) is among the first k in the order
// (z descending, id ascending).
__host__ __device__ __forceinline__ bool topk_keep(int32_t key, int64_t i, int32_t kth_key,
                                                   int32_t kth_id) {
  return key > kth_key || (key == kth_key && i <= kth_id);
}

// Top-k is active for 0 < k < V.
__host__ __device__ __forceinline__ bool topk_active(int64_t k, int64_t vocab) {
  return k > 0 && k < vocab;
}

// Top-k, step 1: kth_key = the k-th largest key = the largest key t with
// count(key >= t) >= k, by bisection over [key(-inf), key(m)] in int64.
struct TopKSearch {
  int64_t lo, hi;
};

__host__ __device__ __forceinline__ TopKSearch topk_search_init(float row_max) {
  return TopKSearch{topk_key(neg_inf()), topk_key(row_max)};
}
__host__ __device__ __forceinline__ bool topk_search_active(const TopKSearch& s) {
  return s.lo < s.hi;
}
__host__ __device__ __forceinline__ int64_t topk_search_mid(const TopKSearch& s) {
  return s.lo + (s.hi - s.lo + 1) / 2;
}
// count_ge = number of tokens with topk_key(z) >= mid.
__host__ __device__ __forceinline__ void topk_search_update(TopKSearch& s, int64_t mid,
                                                            int64_t count_ge, int64_t k) {
  if (count_ge >= k) {
    s.lo = mid;
  } else {
    s.hi = mid - 1;
  }
}
__host__ __device__ __forceinline__ int32_t topk_search_result(const TopKSearch& s) {
  return static_cast<int32_t>(s.lo);
}
// 32 halvings cover the 2^32 keys; the loops also stop when lo == hi.
constexpr int kTopKIters = 32;

// Top-k, step 2: of the tokens tied at kth_key, the first `need` ids are kept,
// need = k - count(key > kth_key) (1 <= need <= count(key == kth_key)).
__host__ __device__ __forceinline__ int64_t topk_need(int64_t k, int64_t count_gt) {
  return k - count_gt;
}
// kth_id = the need-th smallest id among the tied tokens: the smallest id t
// with count(key == kth_key and i <= t) >= need, by bisection over the tied
// ids [min_id, max_id]. When every tied token is needed (no tie split, the
// usual case) the answer is max_id and the search is empty.
struct TopKIdSearch {
  int64_t lo, hi;
};

__host__ __device__ __forceinline__ TopKIdSearch topk_id_search_init(int64_t min_id, int64_t max_id,
                                                                     int64_t count_eq,
                                                                     int64_t need) {
  return need >= count_eq ? TopKIdSearch{max_id, max_id} : TopKIdSearch{min_id, max_id};
}
__host__ __device__ __forceinline__ bool topk_id_search_active(const TopKIdSearch& s) {
  return s.lo < s.hi;
}
__host__ __device__ __forceinline__ int64_t topk_id_search_mid(const TopKIdSearch& s) {
  return s.lo + (s.hi - s.lo) / 2;
}
// count_le = number of tokens with key == kth_key and id <= mid.
__host__ __device__ __forceinline__ void topk_id_search_update(TopKIdSearch& s, int64_t mid,
                                                               int64_t count_le, int64_t need) {
  if (count_le >= need) {
    s.hi = mid;
  } else {
    s.lo = mid + 1;
  }
}
__host__ __device__ __forceinline__ int32_t topk_id_search_result(const TopKIdSearch& s) {
  return static_cast<int32_t>(s.lo);
}
// 31 halvings cover ids below 2^31; the loops also stop when lo == hi.
constexpr int kTopKIdIters = 32;

// One pass after step 1 gathers what step 2 needs: the tokens above kth_key
// and, of those tied with it, their number and smallest / largest id (as the
// maxima of -id and id, so that the block reduces them with one max).
struct TopKTies {
  int64_t count_gt, count_eq;
  int32_t neg_min_id, max_id;
};

__host__ __device__ __forceinline__ TopKTies topk_ties_init() {
  return TopKTies{0, 0, -0x7FFFFFFF, -0x7FFFFFFF};  // -(2^31 - 1): negating it stays in int32
}
__host__ __device__ __forceinline__ void topk_ties_add(TopKTies& t, int32_t key, int64_t i,
                                                       int32_t kth_key) {
  if (key > kth_key) ++t.count_gt;
  if (key == kth_key) {
    ++t.count_eq;
    const int32_t id = static_cast<int32_t>(i);
    t.neg_min_id = -id > t.neg_min_id ? -id : t.neg_min_id;
    t.max_id = id > t.max_id ? id : t.max_id;
  }
}
// The step-2 search of the reduced tally (ties.count_gt etc. summed / maxed
// over the whole row).
__host__ __device__ __forceinline__ TopKIdSearch topk_id_search_init(const TopKTies& t, int64_t k) {
  return topk_id_search_init(-static_cast<int64_t>(t.neg_min_id), t.max_id, t.count_eq,
                             topk_need(k, t.count_gt));
}

// Row statistics in the workspace: stats_f [num_rows, 4] = (m, s, pthr, z2),
// stats_i [num_rows, 3] = (kth_key, kth_id, amax), row-major.
__host__ __device__ __forceinline__ void store_row_stats(float* stats_f, int32_t* stats_i,
                                                         int64_t row, const RowStats& st) {
  float* f = stats_f + row * 4;
  int32_t* i = stats_i + row * 3;
  f[0] = st.m;
  f[1] = st.s;
  f[2] = st.pthr;
  f[3] = st.z2;
  i[0] = st.kth_key;
  i[1] = st.kth_id;
  i[2] = st.amax;
}
__host__ __device__ __forceinline__ RowStats load_row_stats(const float* stats_f,
                                                            const int32_t* stats_i, int64_t row) {
  const float* f = stats_f + row * 4;
  const int32_t* i = stats_i + row * 3;
  return RowStats{f[0], f[1], f[2], f[3], i[0], i[1], i[2]};
}

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
// Top-p is active (and the row renormalised) only for top_p < 1.
__host__ __device__ __forceinline__ bool topp_active(float top_p) { return top_p < 1.f; }
constexpr int kTopPIters = 32;

// exp(z - m) if token i survives top-k, else 0 (the summand of s).
__host__ __device__ __forceinline__ float topk_weight(float z, int64_t i, float m, int32_t kth_key,
                                                      int32_t kth_id) {
  return topk_keep(topk_key(z), i, kth_key, kth_id) ? exp_f(z - m) : 0.f;
}

// Top-k filtered probability (before top-p): p = exp(z - m) / s, or 0.
__host__ __device__ __forceinline__ float topk_prob(float z, int64_t i, float m, float s,
                                                    int32_t kth_key, int32_t kth_id) {
  return topk_keep(topk_key(z), i, kth_key, kth_id) ? div_rn(exp_f(z - m), s) : 0.f;
}

// Final target probability p_t(i) of token i with z_i = logit_i · (1 / T).
__host__ __device__ __forceinline__ float target_prob(float z, int64_t i, const RowStats& st) {
  const float p = div_rn(exp_f(z - st.m), st.s);
  const bool keep = topk_keep(topk_key(z), i, st.kth_key, st.kth_id) && (p >= st.pthr);
  return keep ? div_rn(p, st.z2) : 0.f;
}

// Statistics after the max pass (best = first argmax of z over the row),
// before any filter: top-k off, pthr = 0 and z2 = 1 keep every token; the
// top-k / top-p passes then set (kth_key, kth_id), s, pthr and z2.
__host__ __device__ __forceinline__ RowStats row_stats_from_max(ArgMax best) {
  return RowStats{best.v, 0.f, 0.f, 1.f, kNoKthKey, kNoKthId, argmax_index(best.i, 0)};
}

// Statistics a row gets when it is never sampled from (padding rows past
// cu_verify[R]); harmless values, so inconsistent inputs read defined data.
__host__ __device__ __forceinline__ RowStats padding_row_stats() {
  return RowStats{0.f, 1.f, 0.f, 1.f, kNoKthKey, kNoKthId, 0};
}

// ---------------------------------------------------------------------------
// Draft distribution q from pre-temperature draft logits (MODE 2),
// u = draft_logit · (1 / T_d).
// ---------------------------------------------------------------------------

struct SoftmaxStats {
  float m, s;
  int32_t amax;
};

// Logits-only mode: q(i) = softmax(u)[i], one-hot at the row's first argmax
// for greedy T_d.
__host__ __device__ __forceinline__ float draft_q(float u, int64_t idx, bool d_greedy,
                                                  const SoftmaxStats& st) {
  if (d_greedy) return idx == st.amax ? 1.f : 0.f;
  return div_rn(exp_f(u - st.m), st.s);
}

// Byte-minimal mode (draft_token_probs + draft_logits): the draft distribution
// whose value at the draft x is the given p_d(x), q(i) = p_d(x) · exp(u_i - u_x)
// (no normaliser pass over the row); one-hot at x for greedy T_d.
__host__ __device__ __forceinline__ float draft_q_implied(float u, int64_t idx, bool d_greedy,
                                                          float p_dx, float u_x, int64_t x) {
  if (d_greedy) return idx == x ? 1.f : 0.f;
  return p_dx * exp_f(u - u_x);
}

// ---------------------------------------------------------------------------
// Chain verification.
// ---------------------------------------------------------------------------

// A draft id outside [0, V) (e.g. -1) is never accepted and has no draft
// distribution (q = 0 in the residual).
__host__ __device__ __forceinline__ bool draft_valid(int64_t x, int64_t vocab) {
  return x >= 0 && x < vocab;
}

// Accept a valid draft x: greedy rows iff x is the row argmax, else iff u * q(x) < p(x).
__host__ __device__ __forceinline__ bool accept_draft(bool greedy, int64_t row_argmax, int64_t x,
                                                      float coin, float p_draft, float p_target) {
  return greedy ? (row_argmax == x) : (coin * p_draft < p_target);
}

// Residual weight (p > q) ? p - q : 0 (a NaN in p or q gives 0).
__host__ __device__ __forceinline__ float residual_weight(float p, float q) {
  return p > q ? p - q : 0.f;
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

// Drafts to verify: lengths[r] clamped to [0, γ], to the target rows that
// exist (num_rows - 1 - start) and to the request's own rows (end - start - 1).
__host__ __device__ __forceinline__ int64_t verify_length(int64_t length, int64_t gamma,
                                                          int64_t start, int64_t end,
                                                          int64_t num_rows, bool live) {
  if (!live) return 0;
  int64_t l = clamp_i64(length, 0, gamma);
  l = l < num_rows - 1 - start ? l : num_rows - 1 - start;
  return l < end - start - 1 ? l : end - start - 1;
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

// p_d(x) = softmax(z · (1 / T))[x] from the race winner's z and the merged (m, s).
__host__ __device__ __forceinline__ float softmax_prob(float z, float inv_t, float m, float s) {
  return div_rn(exp_f(scaled_logit(z, inv_t) - m), s);
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
  __device__ __forceinline__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
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
__device__ __forceinline__ int32_t block_max(int32_t v) {
  return block_allreduce(v, MaxOp{}, kNoKthKey);
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
