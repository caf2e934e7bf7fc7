// markov_draft: one step of Markov-head block drafting (DSpark eq. 4-7), the
// CUDA twin of dspark_kernels/triton/markov_draft.py. The loop over the γ
// steps, the head input e_k (vanilla / gated / RNN) and the confidence are
// torch ops in Python, shared by every backend; the torch launchers in
// csrc/torch_bindings.cpp run one step (dspark::markov_step_cuda) or the
// final normalisation (dspark::markov_probs_cuda) per call.
//
// STATUS: compile-checked in CI (DSPARK_COMPILE_ONLY, sm_90a) and its per-
// element math is run on the host by tests/test_cuda_host_math.py; the kernels
// themselves run only on a GPU machine and have NOT been run yet.
//
// Per step k:
// 1. markov_tile_kernel, grid (vocab tiles, request tiles): z = U_k + e_k·W2ᵀ
//    for a [16 requests, 128 vocab ids] tile with plain fp32 FMA loops over
//    the rank (no tensor cores, no TF32: z matches the fp32 reference up to
//    summation order), W2 and e staged in shared memory, so W2 is read once
//    per step for up to 16 requests. Per (request, tile) it writes the Gumbel
//    race winner (z·(1/T) + G, stream DRAFT, position k, index = vocab id), z
//    at the winner, the softmax partials (max and sum of exp(z·(1/T) - max))
//    and the greedy argmax of z; optionally stores z (draft_logits). 1/T is
//    IEEE-rounded once per request (inverse_temperature in sampling.cuh) and
//    applied with one rounded multiply per element, like the reference.
// 2. markov_reduce_kernel, one block per request: merges the partials (first
//    index wins ties, like torch.argmax) into x_k and p_d(x_k).
// markov_probs_kernel normalises the stored z into draft_probs after the loop.
#include <cuda_runtime.h>

#include <cstdint>

#include "markov_draft.h"
#include "philox.cuh"
#include "sampling.cuh"

namespace dspark {
namespace {

constexpr int kTileR = kMarkovTileR;  // requests per tile
constexpr int kTileV = kMarkovTileV;  // vocab ids per tile
constexpr int kTileK = 32;            // rank chunk staged in shared memory
constexpr int kTileThreads = 256;
// Thread (tv, tr) accumulates requests tr*4..tr*4+3 at vocab ids tv and tv+64.
constexpr int kThreadR = 4;
constexpr int kThreadV = 2;
static_assert(kTileThreads == (kTileV / kThreadV) * (kTileR / kThreadR), "thread layout");
static_assert(kTileR == 2 * (kTileThreads / 32), "each warp finishes two requests of the tile");
static_assert(kTileV == 4 * 32, "each lane of a warp owns four consecutive vocab ids");

constexpr int kReduceThreads = 256;
constexpr int kProbsThreads = 512;

template <typename TU, typename TW>
__global__ void __launch_bounds__(kTileThreads) markov_tile_kernel(const MarkovStepArgs a) {
  __shared__ float w_s[kTileK][kTileV + 1];  // W2 tile, transposed: [k][v] (+1: no bank conflicts)
  __shared__ float e_s[kTileR][kTileK];      // e tile: [request][k]
  __shared__ float z_s[kTileR][kTileV + 1];  // finished z tile

  const int tid = threadIdx.x;
  const int64_t tile_v = blockIdx.x;
  const int64_t v0 = tile_v * kTileV;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTileR;
  const int64_t vocab = a.vocab;
  const int64_t num_req = a.num_req;
  const int64_t rank = a.rank;
  const TW* w2 = static_cast<const TW*>(a.w2);
  const TU* u = static_cast<const TU*>(a.u);

  const int tv = tid % (kTileV / kThreadV);  // 0..63
  const int tr = tid / (kTileV / kThreadV);  // 0..3
  float acc[kThreadR][kThreadV];
#pragma unroll
  for (int i = 0; i < kThreadR; ++i) {
#pragma unroll
    for (int c = 0; c < kThreadV; ++c) acc[i][c] = 0.f;
  }

  for (int64_t k0 = 0; k0 < rank; k0 += kTileK) {
    // W2[v0 .. v0+127, k0 .. k0+31]: consecutive threads read consecutive k.
#pragma unroll 4
    for (int f = tid; f < kTileV * kTileK; f += kTileThreads) {
      const int vv = f / kTileK;
      const int kk = f % kTileK;
      const int64_t col = v0 + vv;
      const int64_t kidx = k0 + kk;
      w_s[kk][vv] = (col < vocab && kidx < rank)
                        ? load_float(w2 + col * a.stride_w2v + kidx * a.stride_w2k)
                        : 0.f;
    }
    for (int f = tid; f < kTileR * kTileK; f += kTileThreads) {
      const int rr = f / kTileK;
      const int kk = f % kTileK;
      const int64_t row = r0 + rr;
      const int64_t kidx = k0 + kk;
      e_s[rr][kk] = (row < num_req && kidx < rank) ? a.e[row * a.stride_er + kidx] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      float w[kThreadV];
#pragma unroll
      for (int c = 0; c < kThreadV; ++c) w[c] = w_s[kk][tv + c * (kTileV / kThreadV)];
#pragma unroll
      for (int i = 0; i < kThreadR; ++i) {
        const float ev = e_s[tr * kThreadR + i][kk];  // one address per warp: broadcast
#pragma unroll
        for (int c = 0; c < kThreadV; ++c) acc[i][c] = fmaf(ev, w[c], acc[i][c]);
      }
    }
    __syncthreads();
  }

  // z = U + e·W2ᵀ (-inf outside the matrix), optionally stored.
#pragma unroll
  for (int i = 0; i < kThreadR; ++i) {
    const int rr = tr * kThreadR + i;
    const int64_t row = r0 + rr;
#pragma unroll
    for (int c = 0; c < kThreadV; ++c) {
      const int vv = tv + c * (kTileV / kThreadV);
      const int64_t col = v0 + vv;
      float z = neg_inf();
      if (row < num_req && col < vocab) {
        z = load_float(u + row * a.stride_ur + col * a.stride_uv) + acc[i][c];
        if (a.logits_out != nullptr) a.logits_out[row * a.stride_lr + col * a.stride_lv] = z;
      }
      z_s[rr][vv] = z;
    }
  }
  __syncthreads();

  // Partials: warp w finishes requests 2w and 2w+1; lane l owns vocab ids
  // v0 + 4l .. v0 + 4l + 3, whose uniforms come from one Philox call.
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t num_tiles = gridDim.x;
  const uint64_t offset = static_cast<uint64_t>(*a.offset);
  for (int h = 0; h < 2; ++h) {
    const int rr = warp * 2 + h;
    const int64_t row = r0 + rr;
    if (row >= num_req) continue;  // warp-uniform
    const float inv_t = inverse_temperature(a.temperature[row]);
    const uint64_t seed = static_cast<uint64_t>(a.seed[row]);
    const uint32_t group = static_cast<uint32_t>(v0 / 4 + lane);
    const Philox4 bits = philox_block(seed, offset, kStreamDraft, static_cast<uint32_t>(a.step), group);
    ArgMaxZ race = argmaxz_init();
    ArgMax greedy_best = argmax_init();
    float m = neg_inf();
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int vv = lane * 4 + q;
      const int64_t col = v0 + vv;
      if (col < vocab) {
        const float z = z_s[rr][vv];
        const float zt = scaled_logit(z, inv_t);
        const float g = gumbel(bits_to_uniform(philox_lane(bits, q)));
        const int32_t id = static_cast<int32_t>(col);
        race = argmax_combine(race, ArgMaxZ{zt + g, id, z});
        greedy_best = argmax_combine(greedy_best, ArgMax{z, id});
        m = fmaxf(m, zt);
      }
    }
    race = warp_argmax(race);
    greedy_best = warp_argmax(greedy_best);
    m = warp_max(m);
    const float m_safe = safe_max(m);
    float ssum = 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int vv = lane * 4 + q;
      if (v0 + vv < vocab) ssum += exp_f(scaled_logit(z_s[rr][vv], inv_t) - m_safe);
    }
    ssum = warp_sum(ssum);
    if (lane == 0) {
      const int64_t out = row * num_tiles + tile_v;
      // kNoIndex only if every score was NaN: fall back to the tile's first id.
      a.part_score[out] = race.v;
      a.part_arg[out] = argmax_index(race.i, static_cast<int32_t>(v0));
      a.part_zbest[out] = race.z;
      a.part_max[out] = m;
      a.part_sum[out] = ssum;
      a.part_gmax[out] = greedy_best.v;
      a.part_garg[out] = argmax_index(greedy_best.i, static_cast<int32_t>(v0));
    }
  }
}

__global__ void __launch_bounds__(kReduceThreads) markov_reduce_kernel(const MarkovStepArgs a,
                                                                        int64_t num_tiles) {
  const int64_t r = blockIdx.x;
  const int64_t base = r * num_tiles;
  ArgMaxZ race = argmaxz_init();
  ArgMax greedy_best = argmax_init();
  float m = neg_inf();
  for (int64_t i = threadIdx.x; i < num_tiles; i += blockDim.x) {
    race = argmax_combine(race, ArgMaxZ{a.part_score[base + i], a.part_arg[base + i],
                                        a.part_zbest[base + i]});
    greedy_best = argmax_combine(greedy_best, ArgMax{a.part_gmax[base + i], a.part_garg[base + i]});
    m = fmaxf(m, a.part_max[base + i]);
  }
  race = block_argmax(race);
  greedy_best = block_argmax(greedy_best);
  m = block_max(m);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < num_tiles; i += blockDim.x) {
    s += softmax_merge_term(a.part_max[base + i], a.part_sum[base + i], m);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) {
    const float temp = a.temperature[r];
    const bool greedy = is_greedy(temp);
    const float inv_t = inverse_temperature(temp);
    const int32_t token = greedy ? argmax_index(greedy_best.i, 0) : argmax_index(race.i, 0);
    a.tokens[r * a.stride_tr + a.step] = static_cast<int32_t>(clamp_i64(token, 0, a.vocab - 1));
    a.token_probs[r * a.stride_pr + a.step] = greedy ? 1.f : softmax_prob(race.z, inv_t, m, s);
  }
}

__global__ void __launch_bounds__(kProbsThreads) markov_probs_kernel(const float* logits,
                                                                      float* probs,
                                                                      const float* temperature,
                                                                      const int32_t* tokens,
                                                                      int64_t gamma,
                                                                      int64_t vocab) {
  const int64_t row = blockIdx.x;  // r * gamma + k
  const int64_t r = row / gamma;
  const float temp = temperature[r];
  const bool greedy = is_greedy(temp);
  const float inv_t = inverse_temperature(temp);
  const int64_t x = tokens[row];
  const float* z = logits + row * vocab;
  float* p = probs + row * vocab;
  if (greedy) {
    for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) p[i] = i == x ? 1.f : 0.f;
    return;
  }
  float m = neg_inf();
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, scaled_logit(z[i], inv_t));
  m = block_max(m);
  float s = 0.f;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) s += exp_f(scaled_logit(z[i], inv_t) - m);
  s = block_sum(s);
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    p[i] = div_rn(exp_f(scaled_logit(z[i], inv_t) - m), s);
  }
}

}  // namespace

cudaError_t markov_step_launch(const MarkovStepArgs& args, cudaStream_t stream) {
  if (args.num_req <= 0) return cudaSuccess;
  if (args.vocab < 1 || args.vocab >= (int64_t{1} << 31) || args.rank < 0 || args.step < 0 ||
      args.step >= 65536) {
    return cudaErrorInvalidValue;
  }
  const int64_t num_tiles = markov_num_tiles(args.vocab);
  const int64_t req_tiles = (args.num_req + kTileR - 1) / kTileR;
  if (req_tiles > 65535) return cudaErrorInvalidValue;  // grid.y limit
  const dim3 grid(static_cast<unsigned>(num_tiles), static_cast<unsigned>(req_tiles));
  const cudaError_t err = dispatch_float(args.u_dtype, [&](auto u_tag) -> cudaError_t {
    using TU = decltype(u_tag);
    return dispatch_float(args.w2_dtype, [&](auto w_tag) -> cudaError_t {
      using TW = decltype(w_tag);
      markov_tile_kernel<TU, TW><<<grid, kTileThreads, 0, stream>>>(args);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  markov_reduce_kernel<<<static_cast<unsigned>(args.num_req), kReduceThreads, 0, stream>>>(
      args, num_tiles);
  return cudaGetLastError();
}

cudaError_t markov_probs_launch(const float* logits, float* probs, const float* temperature,
                                const int32_t* tokens, int64_t num_req, int64_t gamma,
                                int64_t vocab, cudaStream_t stream) {
  if (num_req <= 0 || gamma <= 0 || vocab <= 0) return cudaSuccess;
  if (num_req * gamma >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  markov_probs_kernel<<<static_cast<unsigned>(num_req * gamma), kProbsThreads, 0, stream>>>(
      logits, probs, temperature, tokens, gamma, vocab);
  return cudaGetLastError();
}

}  // namespace dspark
