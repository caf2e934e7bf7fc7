// Torch-free launcher of csrc/rejection_sample.cu (chain rejection sampling).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.h"

namespace dspark {


// All pointers are device pointers; strides are in elements. Vocabulary
// dimensions must have unit stride. Optional inputs are nullptr when absent.
// The draft mode follows from what is given: draft_probs (full q), else
// draft_logits (q = softmax(draft_logits / draft_temperature), with p_d of
// each draft from draft_token_probs when given), else one-hot drafts.
struct RejectionSampleArgs {
  // Target logits [num_rows, vocab], row stride stride_logits.
  const void* target_logits = nullptr;
  FloatType target_dtype = FloatType::kFloat32;
  int64_t stride_logits = 0;
  int64_t num_rows = 0;
  int64_t vocab = 0;
  int64_t num_req = 0;
  int64_t gamma = 0;

  // Drafts [R, γ] int64.
  const int64_t* draft_tokens = nullptr;
  int64_t stride_dr = 0, stride_dj = 0;
  // Full draft distributions [R, γ, V] (dtype draft_dtype), or nullptr.
  const void* draft_probs = nullptr;
  int64_t stride_pr = 0, stride_pj = 0;
  // Pre-temperature draft logits [R, γ, V] (dtype draft_dtype), or nullptr.
  const void* draft_logits = nullptr;
  int64_t stride_gr = 0, stride_gj = 0;
  FloatType draft_dtype = FloatType::kFloat32;
  // p_d of each draft [R, γ] fp32, or nullptr (only with draft_logits).
  const float* draft_token_probs = nullptr;
  int64_t stride_tr = 0, stride_tj = 0;
  // Draft temperature [R] fp32 (only read with draft_logits).
  const float* draft_temperature = nullptr;

  // Per request, contiguous: lengths [R], cu_verify [R + 1] (int64),
  // temperature [R] fp32, top_k [R] int64 | nullptr, top_p [R] fp32 | nullptr,
  // seed [R] int64; offset: one int64.
  const int64_t* lengths = nullptr;
  const int64_t* cu_verify = nullptr;
  const float* temperature = nullptr;
  const int64_t* top_k = nullptr;
  const float* top_p = nullptr;
  const int64_t* seed = nullptr;
  const int64_t* offset = nullptr;

  // Workspace: 5 * num_rows fp32 and num_rows int32 (written, then read).
  float* row_stats = nullptr;
  int32_t* row_argmax = nullptr;

  // Outputs: tokens [R, γ + 1] int32 (row stride stride_out), num_accepted [R] int32.
  int32_t* tokens = nullptr;
  int64_t stride_out = 0;
  int32_t* num_accepted = nullptr;
};

// Launches the row-statistics kernel (one block per target row) and the chain
// kernel (one block per request) on `stream`. No host synchronisation.
// Requires vocab in [1, 2^31), gamma < 65535.
cudaError_t rejection_sample_launch(const RejectionSampleArgs& args, cudaStream_t stream);

}  // namespace dspark
