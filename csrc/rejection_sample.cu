// rejection_sample: chain verification (Leviathan et al. 2023; Chen et al.
// 2023), the CUDA twin of dspark_kernels/triton/rejection_sample.py: same
// formulas, same tie-breaks (first index), same Philox streams, positions and
// indices, so the same seed gives the same tokens as the reference up to fp32
// rounding of the normalisers (which can only flip a near-tie).
//
// STATUS: compile-checked in CI (DSPARK_COMPILE_ONLY, sm_90a) and its per-
// element math is run on the host by tests/test_cuda_host_math.py; the kernels
// themselves run only on a GPU machine and have NOT been run yet.
//
// Two kernels, no host sync, grids from static shapes only:
//
// 1. rs_row_stats_kernel, one block per target row: z = logit · (1 / T) (the
//    reciprocal IEEE-rounded once per row, one multiply per element), its max
//    m and first argmax, the exact top-k boundary (kth_key, kth_id): the k-th
//    token in the order (z descending, id ascending), by a bisection over the
//    ordered int image of fp32 (int64 arithmetic) for kth_key and, when the
//    k-th value is tied, a bisection over the ids of the tied tokens for
//    kth_id; the normaliser s over the top-k survivors, the exact top-p
//    threshold pthr (smallest p with strictly-greater mass < top_p, bisection
//    over the bits [0, bits(1.0)]) and the top-p renormaliser z2 (rows with
//    top_p >= 1 keep z2 = 1: not renormalised). Then
//    p_t(i) = [i among the top k and p_i >= pthr] * exp(z_i - m) / s / z2.
// 2. rs_chain_kernel, one block per request: every thread walks the drafts
//    with the same scalar (broadcast) loads, stopping at the first rejection
//    (a draft id outside [0, V) is rejected; the draft-logits mode without
//    draft_token_probs needs the whole block for the softmax of each draft
//    row, hence a block-wide walk), then the block makes one pass over the
//    final row for the residual (stream RESIDUAL) or bonus (stream BONUS)
//    Gumbel race at position n_acc. The residual's q: draft_probs; in the
//    byte-minimal mode q_i = p_d(x)·exp(u_i - u_x), u = draft_logits · (1/T_d)
//    (no normaliser pass); softmax(u) without draft_token_probs; one-hot at x
//    for one-hot drafts; 0 when the rejected draft id is invalid.
#include <cuda_runtime.h>

#include <cstdint>

#include "philox.cuh"
#include "rejection_sample.h"
#include "sampling.cuh"

namespace dspark {
namespace {

// 512 threads: ~300 elements per thread per pass at V = 151936.
constexpr int kRowThreads = 512;
constexpr int kChainThreads = 512;

template <typename TL>
__device__ __forceinline__ float scaled(const TL* row, int64_t i, float inv_t) {
  return scaled_logit(load_float(row + i), inv_t);
}

// ---------------------------------------------------------------------------
// Kernel 1: per-row statistics of the target distribution.
// ---------------------------------------------------------------------------
template <typename TL>
__global__ void __launch_bounds__(kRowThreads) rs_row_stats_kernel(const RejectionSampleArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t vocab = a.vocab;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;

  auto store = [&](const RowStats& st) {
    if (tid == 0) store_row_stats(a.row_stats, a.row_index_stats, row, st);
  };

  // Rows past cu_verify[R] are padding of a static batch: never sampled from.
  if (row >= a.cu_verify[a.num_req]) {
    store(padding_row_stats());
    return;
  }
  const int64_t req = request_of_row(a.cu_verify, a.num_req, row);
  const float temp = a.temperature[req];
  const bool greedy = is_greedy(temp);
  const float inv_t = inverse_temperature(temp);
  const TL* x = static_cast<const TL*>(a.target_logits) + row * a.stride_logits;

  // Pass 1: max and first argmax of z (of the raw logits too, since T > 0).
  ArgMax best = argmax_init();
  for (int64_t i = tid; i < vocab; i += nthreads) {
    best = argmax_combine(best, ArgMax{scaled(x, i, inv_t), static_cast<int32_t>(i)});
  }
  RowStats st = row_stats_from_max(block_argmax(best));

  // Greedy rows only need the argmax (the chain kernel reads nothing else),
  // so they skip the bisections; the values stored for them are unused.
  // Top-k: the k-th token in the order (z descending, id ascending).
  if (!greedy && a.top_k != nullptr) {
    const int64_t k = a.top_k[req];
    if (topk_active(k, vocab)) {
      TopKSearch search = topk_search_init(st.m);
      for (int it = 0; it < kTopKIters && topk_search_active(search); ++it) {
        const int64_t mid = topk_search_mid(search);
        long long cnt = 0;
        for (int64_t i = tid; i < vocab; i += nthreads) cnt += topk_key(scaled(x, i, inv_t)) >= mid;
        cnt = block_sum(cnt);
        topk_search_update(search, mid, cnt, k);
      }
      st.kth_key = topk_search_result(search);
      // The tokens above the k-th value, and the ids of those tied with it.
      TopKTies ties = topk_ties_init();
      for (int64_t i = tid; i < vocab; i += nthreads) {
        topk_ties_add(ties, topk_key(scaled(x, i, inv_t)), i, st.kth_key);
      }
      ties.count_gt = block_sum(static_cast<long long>(ties.count_gt));
      ties.count_eq = block_sum(static_cast<long long>(ties.count_eq));
      ties.neg_min_id = block_max(ties.neg_min_id);
      ties.max_id = block_max(ties.max_id);
      const int64_t need = topk_need(k, ties.count_gt);
      TopKIdSearch ids = topk_id_search_init(ties, k);
      for (int it = 0; it < kTopKIdIters && topk_id_search_active(ids); ++it) {
        const int64_t mid = topk_id_search_mid(ids);
        long long cnt = 0;
        for (int64_t i = tid; i <= mid; i += nthreads) cnt += topk_key(scaled(x, i, inv_t)) == st.kth_key;
        cnt = block_sum(cnt);
        topk_id_search_update(ids, mid, cnt, need);
      }
      st.kth_id = topk_id_search_result(ids);
    }
  }

  // Normaliser over the top-k survivors.
  float s = 0.f;
  for (int64_t i = tid; i < vocab; i += nthreads) {
    s += topk_weight(scaled(x, i, inv_t), i, st.m, st.kth_key, st.kth_id);
  }
  st.s = block_sum(s);

  // Top-p: smallest threshold v with mass(p > v) < top_p; keep p >= v, then
  // renormalise. Rows at top_p >= 1 are left alone (pthr = 0, z2 = 1).
  if (!greedy && a.top_p != nullptr) {
    const float top_p = a.top_p[req];
    if (topp_active(top_p)) {
      TopPSearch search = topp_search_init();
      for (int it = 0; it < kTopPIters && topp_search_active(search); ++it) {
        const int32_t mid = topp_search_mid(search);
        const float thr = bits_as_float(mid);
        float mass = 0.f;
        for (int64_t i = tid; i < vocab; i += nthreads) {
          const float p = topk_prob(scaled(x, i, inv_t), i, st.m, st.s, st.kth_key, st.kth_id);
          mass += p > thr ? p : 0.f;
        }
        mass = block_sum(mass);
        topp_search_update(search, mid, mass, top_p);
      }
      st.pthr = topp_search_result(search);
      float z2 = 0.f;
      for (int64_t i = tid; i < vocab; i += nthreads) {
        const float p = topk_prob(scaled(x, i, inv_t), i, st.m, st.s, st.kth_key, st.kth_id);
        z2 += p >= st.pthr ? p : 0.f;
      }
      st.z2 = block_sum(z2);
    }
  }
  store(st);
}

// ---------------------------------------------------------------------------
// Kernel 2: the chain, one block per request.
// ---------------------------------------------------------------------------

// (max, normaliser, first argmax) of u = row · (1 / T_d) over one draft row (block-wide).
template <typename TD>
__device__ SoftmaxStats draft_softmax_stats(const TD* row, int64_t vocab, float inv_t) {
  ArgMax best = argmax_init();
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    best = argmax_combine(best, ArgMax{scaled(row, i, inv_t), static_cast<int32_t>(i)});
  }
  best = block_argmax(best);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) s += exp_f(scaled(row, i, inv_t) - best.v);
  s = block_sum(s);
  return SoftmaxStats{best.v, s, argmax_index(best.i, 0)};
}

template <typename TL, typename TD>
__global__ void __launch_bounds__(kChainThreads) rs_chain_kernel(const RejectionSampleArgs a) {
  const int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  const int64_t vocab = a.vocab;
  const int64_t gamma = a.gamma;
  int32_t* out = a.tokens + r * a.stride_out;

  // Inputs are trusted only as far as the value checks went: clamp every
  // index so that inconsistent lengths/cu_verify never read out of bounds.
  const int64_t start = a.cu_verify[r];
  const int64_t end = a.cu_verify[r + 1];
  const bool live = request_live(start, end, a.num_rows);
  if (!live) {  // inactive request: emits nothing
    for (int64_t j = tid; j <= gamma; j += nthreads) out[j] = -1;
    if (tid == 0) a.num_accepted[r] = 0;
    return;
  }
  const int64_t length = verify_length(a.lengths[r], gamma, start, end, a.num_rows, live);
  const float temp = a.temperature[r];
  const bool greedy = is_greedy(temp);
  const float inv_t = inverse_temperature(temp);
  const uint64_t seed = static_cast<uint64_t>(a.seed[r]);
  const uint64_t offset = static_cast<uint64_t>(*a.offset);
  const int mode = a.draft_probs != nullptr ? 1 : (a.draft_logits != nullptr ? 2 : 0);
  const TL* logits = static_cast<const TL*>(a.target_logits);
  const TD* dprobs = static_cast<const TD*>(a.draft_probs);
  const TD* dlogits = static_cast<const TD*>(a.draft_logits);
  bool d_greedy = false;
  float d_inv = 1.f;
  if (mode == 2) {
    const float td = a.draft_temperature[r];
    d_greedy = is_greedy(td);
    d_inv = inverse_temperature(td);
  }
  // Draft j as given (may be invalid: outside [0, V)); j in [0, γ).
  auto draft_raw = [&](int64_t j) { return a.draft_tokens[r * a.stride_dr + j * a.stride_dj]; };

  // Walk the drafts (all threads alike) until the first rejection.
  int64_t n_acc = 0;
  for (int64_t j = 0; j < length; ++j) {
    const int64_t row = start + j;
    const int64_t x = draft_raw(j);
    if (!draft_valid(x, vocab)) break;  // rejected, whatever the row says
    const RowStats st = load_row_stats(a.row_stats, a.row_index_stats, row);
    const float p_t = target_prob(scaled(logits + row * a.stride_logits, x, inv_t), x, st);
    float p_d = 1.f;  // greedy rows compare with the argmax and never read p_d
    if (!greedy && mode == 1) {
      p_d = load_float(dprobs + r * a.stride_pr + j * a.stride_pj + x);
    } else if (!greedy && mode == 2) {
      if (a.draft_token_probs != nullptr) {
        p_d = a.draft_token_probs[r * a.stride_tr + j * a.stride_tj];
      } else {
        const TD* drow = dlogits + r * a.stride_gr + j * a.stride_gj;
        const SoftmaxStats ds = draft_softmax_stats(drow, vocab, d_inv);
        p_d = draft_q(scaled(drow, x, d_inv), x, d_greedy, ds);
      }
    }
    const float coin = uniform(seed, offset, kStreamAccept, static_cast<uint32_t>(j), 0);
    if (!accept_draft(greedy, st.amax, x, coin, p_d, p_t)) break;
    ++n_acc;
  }

  // One more token at local position n_acc of the final row
  // (n_acc <= length <= num_rows - 1 - start, so the row exists).
  const int64_t row = start + n_acc;
  const bool rejected = n_acc < length;
  const RowStats st = load_row_stats(a.row_stats, a.row_index_stats, row);
  int32_t y = st.amax;  // greedy rows emit the argmax
  if (!greedy) {
    const uint32_t stream = rejected ? kStreamResidual : kStreamBonus;
    const uint32_t position = static_cast<uint32_t>(n_acc);
    const int64_t j_rej = rejected ? n_acc : 0;  // n_acc < length <= γ when rejected
    // The rejected draft's distribution; none (q = 0) for an invalid id.
    const int64_t x_raw = rejected ? draft_raw(j_rej) : -1;
    const bool has_q = rejected && draft_valid(x_raw, vocab);
    const int64_t x_rej = has_q ? x_raw : -1;
    const TD* qrow = nullptr;
    SoftmaxStats ds{0.f, 1.f, 0};
    float p_dx = 1.f, u_x = 0.f;
    if (has_q && mode == 1) qrow = dprobs + r * a.stride_pr + j_rej * a.stride_pj;
    if (has_q && mode == 2) {
      qrow = dlogits + r * a.stride_gr + j_rej * a.stride_gj;
      if (a.draft_token_probs != nullptr) {
        p_dx = a.draft_token_probs[r * a.stride_tr + j_rej * a.stride_tj];
        u_x = scaled(qrow, x_rej, d_inv);
      } else {
        ds = draft_softmax_stats(qrow, vocab, d_inv);
      }
    }
    const bool implied = a.draft_token_probs != nullptr;
    const TL* x = logits + row * a.stride_logits;
    ArgMax best_w = argmax_init();
    ArgMax best_p = argmax_init();
    float mass_w = 0.f;
    // One Philox call gives the uniforms of four consecutive vocab ids.
    const int64_t groups = (vocab + 3) / 4;
    for (int64_t g4 = tid; g4 < groups; g4 += nthreads) {
      const Philox4 bits = philox_block(seed, offset, stream, position, static_cast<uint32_t>(g4));
#pragma unroll
      for (int lane = 0; lane < 4; ++lane) {
        const int64_t idx = g4 * 4 + lane;
        if (idx >= vocab) break;
        const float p = target_prob(scaled(x, idx, inv_t), idx, st);
        float q = 0.f;
        if (has_q) {
          if (mode == 0) {
            q = idx == x_rej ? 1.f : 0.f;
          } else if (mode == 1) {
            q = load_float(qrow + idx);
          } else if (implied) {
            q = draft_q_implied(scaled(qrow, idx, d_inv), idx, d_greedy, p_dx, u_x, x_rej);
          } else {
            q = draft_q(scaled(qrow, idx, d_inv), idx, d_greedy, ds);
          }
        }
        const float w = residual_weight(p, q);
        mass_w += w;
        const float g = gumbel(bits_to_uniform(philox_lane(bits, lane)));
        const int32_t id = static_cast<int32_t>(idx);
        best_w = argmax_combine(best_w, ArgMax{race_score(w, g), id});
        best_p = argmax_combine(best_p, ArgMax{race_score(p, g), id});
      }
    }
    mass_w = block_sum(mass_w);
    best_w = block_argmax(best_w);
    best_p = block_argmax(best_p);
    // Without residual mass the reference falls back to p_t (same stream).
    y = mass_w > 0.f ? argmax_index(best_w.i, 0) : argmax_index(best_p.i, 0);
  }
  y = static_cast<int32_t>(clamp_i64(y, 0, vocab - 1));  // every emitted id in [0, V)

  // Accepted drafts are valid ids (an invalid one is never accepted).
  for (int64_t j = tid; j <= gamma; j += nthreads) {
    out[j] = j < n_acc ? static_cast<int32_t>(draft_raw(j)) : (j == n_acc ? y : -1);
  }
  if (tid == 0) a.num_accepted[r] = static_cast<int32_t>(n_acc);
}

}  // namespace

cudaError_t rejection_sample_launch(const RejectionSampleArgs& args, cudaStream_t stream) {
  if (args.num_req <= 0) return cudaSuccess;
  if (args.vocab < 1 || args.vocab >= (int64_t{1} << 31) || args.gamma < 0 ||
      args.gamma >= 65535 || args.num_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.num_req >= (int64_t{1} << 31) || args.num_rows >= (int64_t{1} << 31)) {
    return cudaErrorInvalidValue;
  }
  return dispatch_float(args.target_dtype, [&](auto target_tag) -> cudaError_t {
    using TL = decltype(target_tag);
    if (args.num_rows > 0) {
      rs_row_stats_kernel<TL><<<static_cast<unsigned>(args.num_rows), kRowThreads, 0, stream>>>(args);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return dispatch_float(args.draft_dtype, [&](auto draft_tag) -> cudaError_t {
      using TD = decltype(draft_tag);
      rs_chain_kernel<TL, TD><<<static_cast<unsigned>(args.num_req), kChainThreads, 0, stream>>>(args);
      return cudaGetLastError();
    });
  });
}

}  // namespace dspark
