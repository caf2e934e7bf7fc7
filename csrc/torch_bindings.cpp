// Thin torch launchers: check tensors, pick the current stream, call the
// torch-free launchers in csrc/*.cu. Schemas are defined in Python
// (dspark_kernels/ops/*.py); this file only adds CUDA implementations.
//
// These ops are internal: the Python layer validates and names every
// argument before it calls them. The checks here (csrc/torch_checks.h) are
// only those that keep the kernels inside their buffers; each says what it
// protects. Inputs are adapted rather than rejected where that is cheap and
// safe (small per-request vectors converted to the dtype the kernel reads,
// a copy where the kernel needs a unit stride); outputs the caller passes in
// are checked, since a copy would lose the kernel's writes.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "float_type.h"
#include "markov_draft.h"
#include "philox_uniform.h"
#include "rejection_sample.h"
#include "schedule_verify.h"
#include "torch_checks.h"

namespace {

using dspark::FloatType;
using namespace dspark::checks;  // the launchers' checks (torch_checks.h)

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// A [.., V] tensor whose last dimension has unit stride (copied only if not).
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// ---------------------------------------------------------------------------
// philox_uniform (csrc/philox_uniform.cu). stream and position only select
// Philox counters (no memory): their ranges are Python's to check.
// ---------------------------------------------------------------------------
at::Tensor philox_uniform_cuda(const at::Tensor& seed, const at::Tensor& offset, int64_t stream,
                               int64_t position, int64_t n) {
  check_cuda(seed, "seed");  // the kernel runs on seed's device
  check_philox_state(seed, offset, seed);
  const c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor seed_c = seed.contiguous();
  at::Tensor out = at::empty({seed.size(0), n}, seed.options().dtype(at::kFloat));
  check_launch(dspark::philox_uniform_launch(seed_c.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
                                             static_cast<uint32_t>(stream),
                                             static_cast<uint32_t>(position), seed.size(0), n,
                                             out.data_ptr<float>(), current_stream()),
               "philox_uniform");
  return out;
}

// ---------------------------------------------------------------------------
// rejection_sample (csrc/rejection_sample.cu). The kernels reject draft ids
// outside [0, V) (never read at them) and clamp lengths / cu_verify rows into
// the target rows, so values need no check; the draft mode follows from which optional tensors are given
// (draft_probs first, then draft_logits), so no combination reads a
// missing tensor.
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& lengths,
    const at::Tensor& cu_verify, const at::Tensor& temperature, const at::Tensor& seed,
    const at::Tensor& offset, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& draft_token_probs,
    const std::optional<at::Tensor>& draft_logits,
    const std::optional<at::Tensor>& draft_temperature) {
  // target_logits [T, V] (any row stride): bounds every row and vocab index.
  const FloatType target_dtype = check_reference(target_logits, 2, "target_logits", kSamplingFloats);
  const at::Tensor& ref = target_logits;
  const int64_t num_rows = target_logits.size(0);
  const int64_t vocab = target_logits.size(1);
  // draft_tokens [R, γ] gives R and γ, the sizes of every per-request read below.
  check_device(draft_tokens, ref, "draft_tokens");
  check_dim(draft_tokens, 2, "draft_tokens");
  const int64_t num_req = draft_tokens.size(0);
  const int64_t gamma = draft_tokens.size(1);
  // Read at r < R (lengths, temperature, seed) and r <= R (cu_verify).
  check_device(lengths, ref, "lengths");
  check_shape(lengths, {num_req}, "lengths");
  check_device(cu_verify, ref, "cu_verify");
  check_shape(cu_verify, {num_req + 1}, "cu_verify");
  check_sampling_state(temperature, seed, offset, ref, num_req);

  const c10::cuda::CUDAGuard guard(target_logits.device());
  const auto i32 = target_logits.options().dtype(at::kInt);
  const auto f32 = target_logits.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({num_req, gamma + 1}, i32);
  at::Tensor num_accepted = at::empty({num_req}, i32);
  if (num_req == 0) return {tokens, num_accepted};

  dspark::RejectionSampleArgs a;
  const at::Tensor logits = unit_last_stride(target_logits);
  a.target_logits = logits.data_ptr();
  a.target_dtype = target_dtype;
  a.stride_logits = logits.stride(0);
  a.num_rows = num_rows;
  a.vocab = vocab;
  a.num_req = num_req;
  a.gamma = gamma;

  const at::Tensor drafts = draft_tokens.to(at::kLong);
  a.draft_tokens = drafts.data_ptr<int64_t>();
  a.stride_dr = drafts.stride(0);
  a.stride_dj = drafts.stride(1);

  // Draft tensors are read at [r, j, v] / [r, j] for r < R, j < γ, v < V,
  // with the given row strides and a unit vocab stride.
  const auto draft_rows = [&](const at::Tensor& t, const char* name) {
    check_device(t, ref, name);
    check_shape(t, {num_req, gamma, vocab}, name);
    a.draft_dtype = float_type_of(t, name, kSamplingFloats);
    return unit_last_stride(t);
  };
  at::Tensor dprobs, dlogits, dtp, dtemp;
  if (draft_probs.has_value()) {
    dprobs = draft_rows(*draft_probs, "draft_probs");
    a.draft_probs = dprobs.data_ptr();
    a.stride_pr = dprobs.stride(0);
    a.stride_pj = dprobs.stride(1);
  } else if (draft_logits.has_value()) {
    dlogits = draft_rows(*draft_logits, "draft_logits");
    a.draft_logits = dlogits.data_ptr();
    a.stride_gr = dlogits.stride(0);
    a.stride_gj = dlogits.stride(1);
    if (draft_token_probs.has_value()) {
      check_device(*draft_token_probs, ref, "draft_token_probs");
      check_shape(*draft_token_probs, {num_req, gamma}, "draft_token_probs");
      dtp = draft_token_probs->to(at::kFloat);
      a.draft_token_probs = dtp.data_ptr<float>();
      a.stride_tr = dtp.stride(0);
      a.stride_tj = dtp.stride(1);
    }
    const at::Tensor& td = draft_temperature.has_value() ? *draft_temperature : temperature;
    check_device(td, ref, "draft_temperature");
    check_shape(td, {num_req}, "draft_temperature");
    dtemp = td.to(at::kFloat).contiguous();
    a.draft_temperature = dtemp.data_ptr<float>();
  }

  const at::Tensor lengths64 = lengths.to(at::kLong).contiguous();
  const at::Tensor cu64 = cu_verify.to(at::kLong).contiguous();
  const at::Tensor temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor seed_c = seed.contiguous();
  a.lengths = lengths64.data_ptr<int64_t>();
  a.cu_verify = cu64.data_ptr<int64_t>();
  a.temperature = temp.data_ptr<float>();
  a.seed = seed_c.data_ptr<int64_t>();
  a.offset = offset.data_ptr<int64_t>();
  // Read at r < R.
  at::Tensor topk64, topp32;
  if (top_k.has_value()) {
    check_device(*top_k, ref, "top_k");
    check_shape(*top_k, {num_req}, "top_k");
    topk64 = top_k->to(at::kLong).contiguous();
    a.top_k = topk64.data_ptr<int64_t>();
  }
  if (top_p.has_value()) {
    check_device(*top_p, ref, "top_p");
    check_shape(*top_p, {num_req}, "top_p");
    topp32 = top_p->to(at::kFloat).contiguous();
    a.top_p = topp32.data_ptr<float>();
  }

  const at::Tensor row_stats = at::empty({num_rows, 4}, f32);
  const at::Tensor row_index_stats = at::empty({num_rows, 3}, i32);
  a.row_stats = row_stats.data_ptr<float>();
  a.row_index_stats = row_index_stats.data_ptr<int32_t>();
  a.tokens = tokens.data_ptr<int32_t>();
  a.stride_out = tokens.stride(0);
  a.num_accepted = num_accepted.data_ptr<int32_t>();
  check_launch(dspark::rejection_sample_launch(a, current_stream()), "rejection_sample");
  return {tokens, num_accepted};
}

// ---------------------------------------------------------------------------
// markov_draft (csrc/markov_draft.cu): one draft step per call, and the final
// draft_probs normalisation. The step loop, head input e_k and confidence are
// Python's (shared by every backend).
// ---------------------------------------------------------------------------

// Step k: tokens[:, step] = x_k, token_probs[:, step] = p_d(x_k), and z_k
// into logits unless logits is empty.
void markov_step_cuda(const at::Tensor& u, const at::Tensor& e, const at::Tensor& w2,
                      const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
                      const at::Tensor& tokens, const at::Tensor& token_probs, const at::Tensor& logits,
                      int64_t step) {
  // u = base_logits[:, k], [R, V] with any strides: bounds every request and vocab index.
  const FloatType u_dtype = check_reference(u, 2, "u", kSamplingFloats);
  const int64_t num_req = u.size(0);
  const int64_t vocab = u.size(1);
  // e [R, r] gives the rank the tile kernel reads of e and w2.
  check_device(e, u, "e");
  check_dim(e, 2, "e");
  const int64_t rank = e.size(1);
  check_shape(e, {num_req, rank}, "e");
  // w2 [V, r], any strides, cast like u.
  check_device(w2, u, "w2");
  check_shape(w2, {vocab, rank}, "w2");
  const FloatType w2_dtype = float_type_of(w2, "w2", kSamplingFloats);
  check_sampling_state(temperature, seed, offset, u, num_req);
  // Outputs, written at [r, step] for r < R with unit column stride (the
  // kernel's index is r * stride + step).
  check_device(tokens, u, "tokens");
  check_dtype(tokens, at::kInt, "tokens");
  check_dim(tokens, 2, "tokens");
  const int64_t gamma = tokens.size(1);
  check_shape(tokens, {num_req, gamma}, "tokens");
  check_unit_stride(tokens, 1, "tokens");
  check_device(token_probs, u, "token_probs");
  check_dtype(token_probs, at::kFloat, "token_probs");
  check_shape(token_probs, {num_req, gamma}, "token_probs");
  check_unit_stride(token_probs, 1, "token_probs");
  TORCH_CHECK(0 <= step && step < gamma, "step must index a column of tokens: in [0, ", gamma,
              "), got ", step);
  // z store: written at [r, v] for r < R, v < V, any strides.
  const bool store_z = logits.numel() != 0;
  if (store_z) {
    check_device(logits, u, "logits");
    check_dtype(logits, at::kFloat, "logits");
    check_shape(logits, {num_req, vocab}, "logits");
  }

  const c10::cuda::CUDAGuard guard(u.device());
  const at::Tensor e32 = unit_last_stride(e.to(at::kFloat));
  const at::Tensor temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor seed_c = seed.contiguous();
  const int64_t part = num_req * dspark::markov_num_tiles(vocab);
  const at::Tensor fparts = at::empty({5 * part}, u.options().dtype(at::kFloat));
  const at::Tensor iparts = at::empty({2 * part}, u.options().dtype(at::kInt));

  dspark::MarkovStepArgs a;
  a.u = u.data_ptr();
  a.u_dtype = u_dtype;
  a.stride_ur = u.stride(0);
  a.stride_uv = u.stride(1);
  a.e = e32.data_ptr<float>();
  a.stride_er = e32.stride(0);
  a.w2 = w2.data_ptr();
  a.w2_dtype = w2_dtype;
  a.stride_w2v = w2.stride(0);
  a.stride_w2k = w2.stride(1);
  a.temperature = temp.data_ptr<float>();
  a.seed = seed_c.data_ptr<int64_t>();
  a.offset = offset.data_ptr<int64_t>();
  float* fp = fparts.data_ptr<float>();
  int32_t* ip = iparts.data_ptr<int32_t>();
  a.part_score = fp;
  a.part_zbest = fp + part;
  a.part_max = fp + 2 * part;
  a.part_sum = fp + 3 * part;
  a.part_gmax = fp + 4 * part;
  a.part_arg = ip;
  a.part_garg = ip + part;
  if (store_z) {
    a.logits_out = logits.data_ptr<float>();
    a.stride_lr = logits.stride(0);
    a.stride_lv = logits.stride(1);
  }
  a.tokens = tokens.data_ptr<int32_t>();
  a.stride_tr = tokens.stride(0);
  a.token_probs = token_probs.data_ptr<float>();
  a.stride_pr = token_probs.stride(0);
  a.num_req = num_req;
  a.vocab = vocab;
  a.rank = rank;
  a.step = static_cast<int32_t>(step);
  check_launch(dspark::markov_step_launch(a, current_stream()), "markov_draft step");
}

// probs[r, k] = softmax(logits[r, k] · (1 / T_r)) (one-hot at tokens[r, k] for greedy rows).
void markov_probs_cuda(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& tokens,
                       const at::Tensor& probs) {
  // logits [R, γ, V]: its device runs the kernel, its sizes bound every
  // index; read as contiguous fp32.
  check_cuda(logits, "logits");
  check_dim(logits, 3, "logits");
  const int64_t num_req = logits.size(0);
  const int64_t gamma = logits.size(1);
  const int64_t vocab = logits.size(2);
  // Read at r < R and at [r, k] (contiguous after conversion).
  check_device(temperature, logits, "temperature");
  check_shape(temperature, {num_req}, "temperature");
  check_device(tokens, logits, "tokens");
  check_shape(tokens, {num_req, gamma}, "tokens");
  // Output, written as contiguous fp32 [R, γ, V].
  check_device(probs, logits, "probs");
  check_dtype(probs, at::kFloat, "probs");
  check_shape(probs, {num_req, gamma, vocab}, "probs");
  TORCH_CHECK(probs.is_contiguous(), "probs must be contiguous, got strides ", probs.strides());

  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.to(at::kFloat).contiguous();
  const at::Tensor temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor tok = tokens.to(at::kInt).contiguous();
  check_launch(dspark::markov_probs_launch(z.data_ptr<float>(), probs.data_ptr<float>(),
                                           temp.data_ptr<float>(), tok.data_ptr<int32_t>(), num_req,
                                           gamma, vocab, current_stream()),
               "markov_draft probs");
}

// ---------------------------------------------------------------------------
// schedule_verify (csrc/schedule_verify.cu). Inputs are read in place (any
// strides, every FloatType): the only allocations are the four outputs, so
// the op is capturable in a CUDA graph. A mode other than "async" runs the
// causal schedule (Python checks the name); the launcher rejects async
// without history or capacity and batches over kScheduleMaxCandidates.
// Arguments in the order of the Python op table (ops/schedule_verify.py).
// ---------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> schedule_verify_cuda(
    const at::Tensor& survival, const at::Tensor& sps, c10::string_view mode,
    const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& max_len,
    const std::optional<at::Tensor>& active, const std::optional<at::Tensor>& capacity) {
  // survival [R, γ] with any strides: bounds every candidate index.
  const FloatType survival_dtype = check_reference(survival, 2, "survival", kAnyFloat);
  const bool is_async = mode == "async";
  const int64_t num_req = survival.size(0);
  const int64_t gamma = survival.size(1);
  // sps: read at min(b, len - 1) * stride (the launcher requires len >= 1).
  check_device(sps, survival, "sps");
  check_dim(sps, 1, "sps");

  dspark::ScheduleVerifyArgs a;
  a.survival = survival.data_ptr();
  a.survival_dtype = survival_dtype;
  a.stride_sr = survival.stride(0);
  a.stride_sj = survival.stride(1);
  a.sps = sps.data_ptr();
  a.sps_dtype = float_type_of(sps, "sps", kAnyFloat);
  a.sps_len = sps.size(0);
  a.stride_sps = sps.stride(0);
  a.num_req = num_req;
  a.gamma = gamma;
  a.async_mode = is_async;
  // capacity: one int32 / int64 element, in async mode only (then history is not read).
  if (is_async && capacity.has_value()) {
    check_device(*capacity, survival, "capacity");
    TORCH_CHECK(capacity->numel() == 1, "capacity must hold one element, got ", capacity->numel());
    TORCH_CHECK(capacity->scalar_type() == at::kInt || capacity->scalar_type() == at::kLong,
                "capacity must be int32 or int64, got ", capacity->scalar_type());
    a.capacity = capacity->data_ptr();
    a.capacity_int64 = capacity->scalar_type() == at::kLong;
  }
  // history: read like survival, in async mode without capacity only.
  if (is_async && !capacity.has_value() && history.has_value()) {
    check_device(*history, survival, "history");
    check_shape(*history, survival.sizes(), "history");
    a.history = history->data_ptr();
    a.history_dtype = float_type_of(*history, "history", kAnyFloat);
    a.stride_hr = history->stride(0);
    a.stride_hj = history->stride(1);
  }
  // max_len: read at r < R as 4 or 8 bytes by its dtype.
  if (max_len.has_value()) {
    check_device(*max_len, survival, "max_len");
    check_shape(*max_len, {num_req}, "max_len");
    TORCH_CHECK(max_len->scalar_type() == at::kInt || max_len->scalar_type() == at::kLong,
                "max_len must be int32 or int64, got ", max_len->scalar_type());
    a.max_len = max_len->data_ptr();
    a.max_len_int64 = max_len->scalar_type() == at::kLong;
    a.stride_ml = max_len->stride(0);
  }
  // active: read at r < R as one byte.
  if (active.has_value()) {
    check_device(*active, survival, "active");
    check_shape(*active, {num_req}, "active");
    check_dtype(*active, at::kBool, "active");
    a.active = static_cast<const uint8_t*>(active->data_ptr());
    a.stride_act = active->stride(0);
  }

  const c10::cuda::CUDAGuard guard(survival.device());
  const auto i32 = survival.options().dtype(at::kInt);
  at::Tensor lengths = at::empty({num_req}, i32);
  at::Tensor cu_verify = at::empty({num_req + 1}, i32);
  at::Tensor total = at::empty({}, i32);
  at::Tensor expected = at::empty({}, survival.options().dtype(at::kFloat));
  a.lengths = lengths.data_ptr<int32_t>();
  a.cu_verify = cu_verify.data_ptr<int32_t>();
  a.total = total.data_ptr<int32_t>();
  a.expected = expected.data_ptr<float>();
  check_launch(dspark::schedule_verify_launch(a, current_stream()), "schedule_verify");
  return {lengths, cu_verify, total, expected};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("philox_uniform_cuda", &philox_uniform_cuda);
  m.impl("rejection_sample_cuda", &rejection_sample_cuda);
  m.impl("markov_step_cuda", &markov_step_cuda);
  m.impl("markov_probs_cuda", &markov_probs_cuda);
  m.impl("schedule_verify_cuda", &schedule_verify_cuda);
}
