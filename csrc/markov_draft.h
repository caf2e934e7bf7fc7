// Torch-free launchers of csrc/markov_draft.cu (one Markov-head draft step).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.h"

namespace dspark {


// Tile of the z = U_k + e_k·W2ᵀ product: kMarkovTileR requests x kMarkovTileV
// vocab ids per block; the partials are per (request, vocab tile).
constexpr int kMarkovTileR = 16;
constexpr int kMarkovTileV = 128;

inline int64_t markov_num_tiles(int64_t vocab) {
  return (vocab + kMarkovTileV - 1) / kMarkovTileV;
}

// Step k of the block draft. Device pointers; strides in elements.
struct MarkovStepArgs {
  // U[:, k] as an [R, V] view of base_logits (any strides), dtype u_dtype
  // (fp32 / fp16 / bf16, as w2_dtype: dispatch_float in sampling.cuh).
  const void* u = nullptr;
  FloatType u_dtype = FloatType::kFloat32;
  int64_t stride_ur = 0, stride_uv = 0;
  // Head input e_k [R, rank] fp32, row stride stride_er, unit column stride.
  const float* e = nullptr;
  int64_t stride_er = 0;
  // W2 [V, rank] (nn.Linear(r, V).weight), dtype w2_dtype.
  const void* w2 = nullptr;
  FloatType w2_dtype = FloatType::kFloat32;
  int64_t stride_w2v = 0, stride_w2k = 0;
  // Per request: temperature [R] fp32, seed [R] int64 (contiguous); offset: one int64.
  const float* temperature = nullptr;
  const int64_t* seed = nullptr;
  const int64_t* offset = nullptr;
  // Partials, each [R, num_tiles] contiguous: Gumbel race winner score and
  // vocab id, z at the winner, softmax max and sum of z · (1 / T), greedy max
  // and argmax of z.
  float* part_score = nullptr;
  int32_t* part_arg = nullptr;
  float* part_zbest = nullptr;
  float* part_max = nullptr;
  float* part_sum = nullptr;
  float* part_gmax = nullptr;
  int32_t* part_garg = nullptr;
  // Optional z store: draft_logits[:, k] as an [R, V] fp32 view, or nullptr.
  float* logits_out = nullptr;
  int64_t stride_lr = 0, stride_lv = 0;
  // Outputs of the step: tokens[r * stride_tr + step] int32, token_probs[r * stride_pr + step] fp32.
  int32_t* tokens = nullptr;
  int64_t stride_tr = 0;
  float* token_probs = nullptr;
  int64_t stride_pr = 0;
  int64_t num_req = 0;
  int64_t vocab = 0;
  int64_t rank = 0;
  int32_t step = 0;  // draft position k (Philox position on stream DRAFT)
};

// Tile kernel (grid: vocab tiles x request tiles) then reduce kernel (one
// block per request) on `stream`. Requires vocab in [1, 2^31), step in
// [0, 65536), at most 65535 request tiles (grid.y); returns
// cudaErrorInvalidValue otherwise.
cudaError_t markov_step_launch(const MarkovStepArgs& args, cudaStream_t stream);

// draft_probs[r, k] = softmax(z[r, k] · (1 / T_r)) (one-hot at tokens[r, k] for
// greedy rows) from the stored z; logits and probs are contiguous [R, γ, V]
// fp32, tokens contiguous [R, γ] int32, temperature [R] fp32. Requires
// R·γ < 2^31 (one block per row); returns cudaErrorInvalidValue otherwise.
cudaError_t markov_probs_launch(const float* logits, float* probs, const float* temperature,
                                const int32_t* tokens, int64_t num_req, int64_t gamma,
                                int64_t vocab, cudaStream_t stream);

}  // namespace dspark
