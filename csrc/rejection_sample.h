// Torch-free launcher of csrc/rejection_sample.cu (chain rejection sampling).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.h"

namespace dspark {


// All pointers are device pointers; strides are in elements. Vocabulary
// dimensions must have unit stride. Optional inputs are nullptr when absent.
// The draft mode follows from what is given: draft_probs (full q), else
// draft_logits with u = draft_logits · (1 / draft_temperature): without
// draft_token_probs q = softmax(u) and p_d(x) = q(x); with them (byte-minimal)
// p_d(x) = draft_token_probs and the residual's q_i = p_d(x)·exp(u_i - u_x);
// else one-hot drafts. A draft id outside [0, V) is rejected and has q = 0.
// Nothing is trusted beyond what keeps reads in bounds: a request verifies at
// most min(clamp(lengths[r], 0, γ), num_rows - 1 - cu[r], cu[r+1] - cu[r] - 1)
// drafts.
struct RejectionSampleArgs {
  // Target logits [num_rows, vocab], row stride stride_logits.
  const void* target_logits = nullptr;
  FloatType target_dtype = FloatType::kFloat32;
  int64_t stride_logits = 0;
  int64_t num_rows = 0;
  int64_t vocab = 0;
  int64_t num_req = 0;
  int64_t gamma = 0;

  // Drafts [R, γ] int64 (any values: ids outside [0, V) are rejected).
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

  // Workspace (written, then read): row_stats [num_rows, 4] fp32 (m, s, pthr,
  // z2) and row_index_stats [num_rows, 3] int32 (kth_key, kth_id, argmax);
  // see store_row_stats in sampling.cuh.
  float* row_stats = nullptr;
  int32_t* row_index_stats = nullptr;

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
