// schedule_verify: per-request verify lengths maximising τ·sps[B] (DSpark
// Alg. 1 "causal", §5.2 "async"), the CUDA twin of
// dspark_kernels/triton/schedule_verify.py, with the same order keys, fp64
// prefix sums and K selection, so every backend returns identical schedules.
//
// STATUS: compile-checked in CI (DSPARK_COMPILE_ONLY, sm_90a); its per-thread
// math and the block's data flow (blocked lanes, stable radix passes over the
// key bits, Kogge-Stone scans in the device's association order) are emulated
// on the host by tests/test_cuda_host_math.py against the reference. The
// kernel itself runs only on a GPU machine and has NOT been run yet.
//
// One thread block does everything: the floor of this op is launch latency
// (R = 512, γ = 8 is 4096 values, 16 KB), so the whole batch lives in one SM
// and no global workspace or second launch is needed.
//  1. A (active requests): a block sum over requests.
//  2. Per lane (blocked arrangement) the 32-bit order image of its value
//     (-inf unless a candidate: value > 0, Alg. 1 line 4); block sums of the
//     candidates (num_valid of the pass) and a block min/max of the images
//     other than -inf; sort keys =
//     rank << idx_bits | lane, rank = image - min (-inf: one rank above the
//     max). cub::BlockRadixSort sorts only the rank bits (bits [idx_bits,
//     idx_bits + sort_bits)): it is stable and the lanes are already in
//     flat-index order, so the index bits need no pass. Survival in [0, 1]
//     spans 30 rank bits: 6 passes of 5 bits, against 10 for 46-bit keys.
//  3. Block exclusive scan (fp64) of each thread's gain sum; each thread walks
//     its lanes for tau/theta, the first non-rise (causal) or the first
//     argmax (async, on the history keys, pass 0); one block min / max gives K.
//  4. The owner of lane K publishes its key as the threshold, the owner of
//     lane K - 1 writes expected τ_K; every request counts its keys below the
//     threshold (lengths), and a block scan of its rows gives cu_verify.
// Async mode with history runs step 2-3 twice (history, then survival)
// through one sort call site; with a capacity tensor it reads K instead of
// the history pass. Either way K = min(K, num_valid of the survival).
#include <cub/block/block_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstdint>

#include "schedule_verify.h"

namespace dspark {
namespace {

using sv::Config0;
using sv::Config1;
using sv::Config2;
using sv::Config3;

constexpr unsigned kFullMask = 0xFFFFFFFFu;

template <class C>
using BlockSort =
    cub::BlockRadixSort<uint64_t, C::kThreads, C::kItems, cub::NullType, C::kRadixBits, C::kMemoize>;

// Kogge-Stone inclusive scan over a warp: x_l += x_{l - off}, off = 1, 2, .., 16.
// tests/test_cuda_host_math.py repeats this association order on the host.
template <typename T>
__device__ __forceinline__ T warp_inclusive_scan(T x, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T y = __shfl_up_sync(kFullMask, x, off);
    if (lane >= off) x = y + x;
  }
  return x;
}

// Exclusive scan over the block's threads in thread order; *total = block sum.
// warp_tot: 32 elements of shared memory.
template <int kWarps, typename T>
__device__ __forceinline__ T block_exclusive_scan(T x, T* warp_tot, T* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const T incl = warp_inclusive_scan(x, lane);
  T lane_excl = __shfl_up_sync(kFullMask, incl, 1);
  if (lane == 0) lane_excl = T(0);
  __syncthreads();  // an earlier scan may still read warp_tot
  if (lane == 31) warp_tot[warp] = incl;
  __syncthreads();
  // Every warp scans the (at most 32) warp totals itself: no third barrier.
  const T wincl = warp_inclusive_scan(lane < kWarps ? warp_tot[lane] : T(0), lane);
  T wexcl = __shfl_sync(kFullMask, wincl, (warp + 31) & 31);
  if (warp == 0) wexcl = T(0);
  *total = __shfl_sync(kFullMask, wincl, kWarps - 1);
  return wexcl + lane_excl;
}

// Reduction of v over the block, result in every thread. scratch: 32 elements.
template <int kWarps, typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, T identity, Op op, T* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, off));
  __syncthreads();  // an earlier reduction may still read scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : identity;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

struct SumOp {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long x, unsigned long long y) const {
    return x + y;
  }
};
struct MaxOp {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long x, unsigned long long y) const {
    return x > y ? x : y;
  }
};
struct MinOp {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long x, unsigned long long y) const {
    return x < y ? x : y;
  }
};
// Independent max of both 32-bit halves: (max image) << 32 | (max ~image) = min image.
struct HalvesMaxOp {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long x, unsigned long long y) const {
    const unsigned long long hx = x >> 32, hy = y >> 32;
    const unsigned long long lx = x & 0xFFFFFFFFull, ly = y & 0xFFFFFFFFull;
    return ((hx > hy ? hx : hy) << 32) | (lx > ly ? lx : ly);
  }
};

template <class C>
__global__ void __launch_bounds__(C::kThreads, 1)
    schedule_verify_kernel(const __grid_constant__ ScheduleVerifyArgs a) {
  // __grid_constant__: the helpers take `a` by reference without a local copy.
  // Dynamic: the sort's storage (key exchange C::kCap x 8 B plus cub's bank
  // padding, in a union with the digit counters): 17 / 34 / 66 / 132 KB for
  // configs 0-3 (sizeof TempStorage = 17472 / 34912 / 67584 / 135168 B).
  // Static: 784 B for the reductions and scans.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sort_storage = *reinterpret_cast<typename BlockSort<C>::TempStorage*>(smem_raw);
  __shared__ unsigned long long red_u64[32];
  __shared__ double scan_f64[32];
  __shared__ int32_t scan_i32[32];
  __shared__ float warp_last_theta[32];
  __shared__ unsigned long long thresh_s;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const uint32_t lane0 = static_cast<uint32_t>(tid) * C::kItems;
  const int64_t num_req = a.num_req;

  // 1. A: a block sum over requests.
  unsigned long long active_sum = 0;
  for (int64_t r = tid; r < num_req; r += C::kThreads) active_sum += sv::is_active(a, r) ? 1ull : 0ull;
  active_sum = block_allreduce<C::kWarps>(active_sum, 0ull, SumOp(), red_u64);
  sv::PathCtx ctx;
  ctx.a = &a;
  ctx.num_active = static_cast<int64_t>(active_sum);
  ctx.num_valid = 0;
  ctx.a_f = static_cast<float>(ctx.num_active);
  ctx.idx_bits = C::kIdxBits;
  ctx.cap = C::kCap;
  ctx.map = sv::key_map(1u, 0u);
  const float theta0 = sv::theta_zero(ctx);

  uint64_t keys[C::kItems];
  double prefix = 0.0;
  float theta_before = theta0;
  const bool given = a.async_mode && a.capacity != nullptr;
  uint32_t k_adm = given ? sv::given_capacity(a, static_cast<uint32_t>(C::kCap)) : 0u;
  // Pass 0 (async with history only): history order -> K. Pass 1: survival order.
  for (int pass = a.async_mode && !given ? 0 : 1; pass < 2; ++pass) {
    const bool hist = pass == 0;
    const void* values = hist ? a.history : a.survival;
    const FloatType dtype = hist ? a.history_dtype : a.survival_dtype;
    const int64_t sr = hist ? a.stride_hr : a.stride_sr;
    const int64_t sj = hist ? a.stride_hj : a.stride_sj;

    // 2. Keys, the candidates, and the bits keys differ in (-inf images left out of min/max).
    unsigned long long mm = 0;  // (max image) << 32 | ~(min image)
    unsigned long long valid = 0;
#pragma unroll
    for (int i = 0; i < C::kItems; ++i) {
      const uint32_t h = sv::lane_hi(a, values, dtype, sr, sj, lane0 + i);
      keys[i] = h;
      if (h != sv::kNegInfHi) {
        mm = HalvesMaxOp()(mm, (static_cast<unsigned long long>(h) << 32) | static_cast<uint32_t>(~h));
        ++valid;
      }
    }
    mm = block_allreduce<C::kWarps>(mm, 0ull, HalvesMaxOp(), red_u64);
    ctx.num_valid = static_cast<uint32_t>(block_allreduce<C::kWarps>(valid, 0ull, SumOp(), red_u64));
    const sv::KeyMap map = sv::key_map(~static_cast<uint32_t>(mm), static_cast<uint32_t>(mm >> 32));
#pragma unroll
    for (int i = 0; i < C::kItems; ++i) {
      keys[i] = sv::sort_key(static_cast<uint32_t>(keys[i]), map, lane0 + i, C::kIdxBits);
    }
    const int nbits = sv::sort_bits(map);  // block-uniform: the barriers inside the sort are safe
    if (nbits > 0) {
      __syncthreads();  // the previous pass's sort storage reads are done
      BlockSort<C>(sort_storage).Sort(keys, C::kIdxBits, C::kIdxBits + nbits);
    }
    ctx.map = map;  // keys stay in rank form; the walk maps them back to values

    // 3. fp64 prefix of the gains before this thread's lanes.
    double total;
    prefix = block_exclusive_scan<C::kWarps>(sv::thread_gain_sum(ctx, keys, lane0), scan_f64, &total);
    if (hist) {
      // First argmax of theta_k, k = 0..num_valid (theta_0 from thread 0).
      const sv::Walk w = sv::walk(ctx, keys, lane0, prefix, theta0, sv::kNoLane);
      unsigned long long best = w.best;
      if (tid == 0) {
        const unsigned long long k0 = sv::argmax_key(theta0, 0);
        best = k0 > best ? k0 : best;
      }
      best = block_allreduce<C::kWarps>(best, 0ull, MaxOp(), red_u64);
      k_adm = sv::argmax_k(best);
      continue;
    }
    if (a.async_mode) {
      k_adm = k_adm < ctx.num_valid ? k_adm : ctx.num_valid;  // K from history or given, at most the candidates
      continue;
    }
    // theta of lane0 = the previous thread's last theta (theta_0 for thread 0):
    // each theta_k is computed once, by the lane that owns it.
    const float last = sv::walk(ctx, keys, lane0, prefix, theta0, sv::kNoLane).last_theta;
    float before = __shfl_up_sync(kFullMask, last, 1);
    if (lane == 31) warp_last_theta[warp] = last;  // written once per launch
    __syncthreads();
    if (lane == 0) before = warp == 0 ? theta0 : warp_last_theta[warp - 1];
    theta_before = before;
    // Leading run of rises: K = first lane that does not rise.
    const sv::Walk w = sv::walk(ctx, keys, lane0, prefix, theta_before, sv::kNoLane);
    k_adm = static_cast<uint32_t>(
        block_allreduce<C::kWarps>(static_cast<unsigned long long>(w.first_stop), ~0ull, MinOp(), red_u64));
  }

  // 4. Threshold key (lane K) and expected τ_K (lane K - 1) from their owners.
  const sv::Walk w = sv::walk(ctx, keys, lane0, prefix, theta_before, k_adm);
  if (w.has_tau) *a.expected = w.tau;
  if (k_adm == 0 && tid == 0) *a.expected = ctx.a_f;
  if (w.has_key) thresh_s = w.key;
  if (k_adm >= static_cast<uint32_t>(C::kCap) && tid == 0) thresh_s = sv::kAdmitAll;
  __syncthreads();
  const uint64_t thresh = thresh_s;

  // Requests in contiguous ranges per thread, then one block scan of the rows.
  const int64_t per = (num_req + C::kThreads - 1) / C::kThreads;
  const int64_t r_begin = tid * per < num_req ? tid * per : num_req;
  const int64_t r_end = r_begin + per < num_req ? r_begin + per : num_req;
  int32_t rows = 0;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const int32_t len = sv::request_length(a, r, thresh, C::kIdxBits);
    a.lengths[r] = len;
    rows += sv::request_rows(a, r, len);
  }
  int32_t total_rows;
  int32_t run = block_exclusive_scan<C::kWarps>(rows, scan_i32, &total_rows);
  for (int64_t r = r_begin; r < r_end; ++r) {
    run += sv::request_rows(a, r, a.lengths[r]);  // this thread's own write above
    a.cu_verify[r + 1] = run;
  }
  if (tid == 0) {
    a.cu_verify[0] = 0;
    *a.total = total_rows;
  }
}

template <class C>
cudaError_t launch(const ScheduleVerifyArgs& a, cudaStream_t stream) {
  const size_t smem = sizeof(typename BlockSort<C>::TempStorage);
  // Above the 48 KB default a kernel must opt in (H100: up to 227 KB per
  // block; configs 2 and 3 need 66 and 132 KB). Not a stream operation, so
  // legal while a CUDA graph is captured; repeated per call because it is
  // per device and costs about a microsecond of host time.
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(schedule_verify_kernel<C>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  schedule_verify_kernel<C><<<1, C::kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t schedule_verify_launch(const ScheduleVerifyArgs& a, cudaStream_t stream) {
  if (a.num_req < 0 || a.gamma < 0 || a.sps_len < 1 || a.sps == nullptr) return cudaErrorInvalidValue;
  if (a.num_req > kScheduleMaxCandidates && a.gamma > 0) return cudaErrorInvalidValue;
  const int64_t n = a.num_req * a.gamma;
  if (n > kScheduleMaxCandidates || a.num_req * (a.gamma + 1) >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  if (n > 0 && (a.survival == nullptr || (a.async_mode && a.history == nullptr && a.capacity == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (a.lengths == nullptr && a.num_req > 0) return cudaErrorInvalidValue;
  if (a.cu_verify == nullptr || a.total == nullptr || a.expected == nullptr) return cudaErrorInvalidValue;
  switch (sv::config_index(n)) {
    case 0:
      return launch<Config0>(a, stream);
    case 1:
      return launch<Config1>(a, stream);
    case 2:
      return launch<Config2>(a, stream);
    default:
      return launch<Config3>(a, stream);
  }
}

}  // namespace dspark
