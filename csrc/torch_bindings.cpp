// Thin torch launchers: check tensors, pick the current stream, call the
// torch-free launchers in csrc/*.cu. Schemas are defined in Python
// (dspark_kernels/ops/*.py); this file only adds CUDA implementations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "philox_uniform.h"
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>

#include <optional>
#include <tuple>

#include "markov_draft.h"
#include "rejection_sample.h"

namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

at::Tensor philox_uniform_cuda(const at::Tensor& seed, const at::Tensor& offset, int64_t stream,
                               int64_t position, int64_t n) {
  TORCH_CHECK(seed.is_cuda() && seed.dim() == 1 && seed.scalar_type() == at::kLong,
              "seed must be a 1-d int64 CUDA tensor");
  TORCH_CHECK(offset.is_cuda() && offset.numel() == 1 && offset.scalar_type() == at::kLong,
              "offset must be a one-element int64 CUDA tensor");
  TORCH_CHECK(seed.size(0) < 65536, "seed may hold at most 65535 rows");
  TORCH_CHECK(0 <= stream && stream < 65536 && 0 <= position && position < 65536,
              "stream and position must be in [0, 65536)");
  TORCH_CHECK(0 <= n && n < (int64_t{1} << 34), "n must be in [0, 2^34)");
  const c10::cuda::CUDAGuard guard(seed.device());
  const at::Tensor seed_c = seed.contiguous();
  at::Tensor out = at::empty({seed.size(0), n}, seed.options().dtype(at::kFloat));
  check_cuda(dspark::philox_uniform_launch(seed_c.data_ptr<int64_t>(), offset.data_ptr<int64_t>(),
                                           static_cast<uint32_t>(stream),
                                           static_cast<uint32_t>(position), seed.size(0), n,
                                           out.data_ptr<float>(),
                                           c10::cuda::getCurrentCUDAStream().stream()),
             "philox_uniform kernel launch");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("philox_uniform_cuda", &philox_uniform_cuda); }

// ---------------------------------------------------------------------------
// rejection_sample and markov_draft (csrc/rejection_sample.cu, csrc/markov_draft.cu).
// Schemas: dspark::rejection_sample_cuda / dspark::markov_draft_cuda, defined
// in dspark_kernels/ops/rejection_sample.py and ops/markov_draft.py.
// ---------------------------------------------------------------------------
namespace {

dspark::FloatType float_type_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return dspark::FloatType::kFloat32;
    case at::kHalf:
      return dspark::FloatType::kFloat16;
    case at::kBFloat16:
      return dspark::FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be a CUDA tensor on ",
              ref.device(), ", got ", t.device());
}

void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_int(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
              " must be int32 or int64, got ", t.scalar_type());
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

// Per-request temperature [R] float and seed [R] int64, and the one-element
// int64 offset, on ref's device: the RNG state every sampling op takes.
void check_sampling_state(const at::Tensor& temperature, const at::Tensor& seed, const at::Tensor& offset,
                          const at::Tensor& ref, int64_t num_req) {
  check_device(temperature, ref, "temperature");
  check_float(temperature, "temperature");
  check_shape(temperature, {num_req}, "temperature");
  check_device(seed, ref, "seed");
  TORCH_CHECK(seed.scalar_type() == at::kLong, "seed must be int64");
  check_shape(seed, {num_req}, "seed");
  check_device(offset, ref, "offset");
  TORCH_CHECK(offset.scalar_type() == at::kLong && offset.numel() == 1,
              "offset must be a one-element int64 tensor");
}

// A [.., V] tensor whose last dimension has unit stride (copied only if not).
at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> rejection_sample_cuda(
    const at::Tensor& target_logits, const at::Tensor& draft_tokens,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& lengths,
    const at::Tensor& cu_verify, const at::Tensor& temperature, const at::Tensor& seed,
    const at::Tensor& offset, const std::optional<at::Tensor>& top_k,
    const std::optional<at::Tensor>& top_p, const std::optional<at::Tensor>& draft_token_probs,
    const std::optional<at::Tensor>& draft_logits,
    const std::optional<at::Tensor>& draft_temperature) {
  TORCH_CHECK(target_logits.is_cuda() && target_logits.dim() == 2,
              "target_logits must be a 2-d CUDA tensor");
  const at::Tensor& ref = target_logits;
  const dspark::FloatType target_dtype = float_type_of(target_logits, "target_logits");
  const int64_t num_rows = target_logits.size(0);
  const int64_t vocab = target_logits.size(1);
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t{1} << 31), "vocab size must be in [1, 2^31)");
  TORCH_CHECK(num_rows < (int64_t{1} << 31), "target_logits may have at most 2^31 - 1 rows");
  check_device(draft_tokens, ref, "draft_tokens");
  TORCH_CHECK(draft_tokens.dim() == 2, "draft_tokens must be 2-d [R, gamma]");
  check_int(draft_tokens, "draft_tokens");
  const int64_t num_req = draft_tokens.size(0);
  const int64_t gamma = draft_tokens.size(1);
  TORCH_CHECK(gamma < 65535, "at most 65534 drafts per request");
  TORCH_CHECK(num_req < (int64_t{1} << 31), "too many requests");
  check_device(lengths, ref, "lengths");
  check_int(lengths, "lengths");
  check_shape(lengths, {num_req}, "lengths");
  check_device(cu_verify, ref, "cu_verify");
  check_int(cu_verify, "cu_verify");
  check_shape(cu_verify, {num_req + 1}, "cu_verify");
  check_sampling_state(temperature, seed, offset, ref, num_req);
  TORCH_CHECK(!(draft_probs.has_value() && (draft_logits.has_value() || draft_token_probs.has_value())),
              "give either draft_probs or the draft_token_probs/draft_logits pair, not both");
  TORCH_CHECK(!draft_token_probs.has_value() || draft_logits.has_value(),
              "draft_token_probs needs draft_logits");

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

  at::Tensor dprobs, dlogits, dtp, dtemp;
  if (draft_probs.has_value()) {
    check_device(*draft_probs, ref, "draft_probs");
    check_shape(*draft_probs, {num_req, gamma, vocab}, "draft_probs");
    a.draft_dtype = float_type_of(*draft_probs, "draft_probs");
    dprobs = unit_last_stride(*draft_probs);
    a.draft_probs = dprobs.data_ptr();
    a.stride_pr = dprobs.stride(0);
    a.stride_pj = dprobs.stride(1);
  } else if (draft_logits.has_value()) {
    check_device(*draft_logits, ref, "draft_logits");
    check_shape(*draft_logits, {num_req, gamma, vocab}, "draft_logits");
    a.draft_dtype = float_type_of(*draft_logits, "draft_logits");
    dlogits = unit_last_stride(*draft_logits);
    a.draft_logits = dlogits.data_ptr();
    a.stride_gr = dlogits.stride(0);
    a.stride_gj = dlogits.stride(1);
    if (draft_token_probs.has_value()) {
      check_device(*draft_token_probs, ref, "draft_token_probs");
      check_float(*draft_token_probs, "draft_token_probs");
      check_shape(*draft_token_probs, {num_req, gamma}, "draft_token_probs");
      dtp = draft_token_probs->to(at::kFloat);
      a.draft_token_probs = dtp.data_ptr<float>();
      a.stride_tr = dtp.stride(0);
      a.stride_tj = dtp.stride(1);
    }
    const at::Tensor& td = draft_temperature.has_value() ? *draft_temperature : temperature;
    check_device(td, ref, "draft_temperature");
    check_float(td, "draft_temperature");
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
  at::Tensor topk64, topp32;
  if (top_k.has_value()) {
    check_device(*top_k, ref, "top_k");
    check_int(*top_k, "top_k");
    check_shape(*top_k, {num_req}, "top_k");
    topk64 = top_k->to(at::kLong).contiguous();
    a.top_k = topk64.data_ptr<int64_t>();
  }
  if (top_p.has_value()) {
    check_device(*top_p, ref, "top_p");
    check_float(*top_p, "top_p");
    check_shape(*top_p, {num_req}, "top_p");
    topp32 = top_p->to(at::kFloat).contiguous();
    a.top_p = topp32.data_ptr<float>();
  }

  const at::Tensor row_stats = at::empty({5 * num_rows}, f32);
  const at::Tensor row_argmax = at::empty({num_rows}, i32);
  a.row_stats = row_stats.data_ptr<float>();
  a.row_argmax = row_argmax.data_ptr<int32_t>();
  a.tokens = tokens.data_ptr<int32_t>();
  a.stride_out = tokens.stride(0);
  a.num_accepted = num_accepted.data_ptr<int32_t>();
  check_cuda(dspark::rejection_sample_launch(a, c10::cuda::getCurrentCUDAStream().stream()),
             "rejection_sample kernel launch");
  return {tokens, num_accepted};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
markov_draft_cuda(const at::Tensor& base_logits, const at::Tensor& anchor, const at::Tensor& w1,
                  const at::Tensor& w2, const at::Tensor& temperature, const at::Tensor& seed,
                  const at::Tensor& offset, const std::optional<at::Tensor>& hidden,
                  const std::optional<at::Tensor>& conf_weight,
                  const std::optional<at::Tensor>& conf_bias,
                  const std::optional<at::Tensor>& sts_temperature,
                  const std::optional<at::Tensor>& gate_weight,
                  const std::optional<at::Tensor>& gate_bias,
                  const std::optional<at::Tensor>& rnn_weight,
                  const std::optional<at::Tensor>& rnn_bias, bool return_draft_probs,
                  bool return_draft_logits) {
  TORCH_CHECK(base_logits.is_cuda() && base_logits.dim() == 3,
              "base_logits must be a 3-d CUDA tensor [R, gamma, V]");
  const at::Tensor& ref = base_logits;
  const dspark::FloatType u_dtype = float_type_of(base_logits, "base_logits");
  const int64_t num_req = base_logits.size(0);
  const int64_t gamma = base_logits.size(1);
  const int64_t vocab = base_logits.size(2);
  TORCH_CHECK(vocab >= 1 && vocab < (int64_t{1} << 31), "vocab size must be in [1, 2^31)");
  TORCH_CHECK(gamma < 65536, "at most 65535 draft positions");
  check_device(anchor, ref, "anchor");
  check_int(anchor, "anchor");
  check_shape(anchor, {num_req}, "anchor");
  check_device(w1, ref, "w1");
  check_device(w2, ref, "w2");
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == vocab, "w1 must be [V, r]");
  const int64_t rank = w1.size(1);
  check_shape(w2, {vocab, rank}, "w2");
  const dspark::FloatType w2_dtype = float_type_of(w2, "w2");
  float_type_of(w1, "w1");
  check_sampling_state(temperature, seed, offset, ref, num_req);
  const std::optional<at::Tensor>* optionals[] = {&hidden,     &conf_weight, &conf_bias,
                                                  &sts_temperature, &gate_weight, &gate_bias,
                                                  &rnn_weight, &rnn_bias};
  for (const auto* opt : optionals) {
    if (opt->has_value()) check_device(**opt, ref, "markov_draft weights and hidden");
  }
  TORCH_CHECK(!(gate_weight.has_value() && rnn_weight.has_value()),
              "give gate_weight (gated head) or rnn_weight (RNN head), not both");
  TORCH_CHECK(hidden.has_value() || !(gate_weight.has_value() || conf_weight.has_value()),
              "the gated and confidence heads need hidden");
  if (hidden.has_value()) {
    TORCH_CHECK(hidden->dim() == 3 && hidden->size(0) == num_req && hidden->size(1) == gamma,
                "hidden must be [R, gamma, d]");
  }

  const c10::cuda::CUDAGuard guard(base_logits.device());
  const auto f32 = base_logits.options().dtype(at::kFloat);
  const auto i32 = base_logits.options().dtype(at::kInt);
  at::Tensor tokens = at::empty({num_req, gamma}, i32);
  at::Tensor token_probs = at::empty({num_req, gamma}, f32);
  const bool with_conf = conf_weight.has_value();
  at::Tensor confidence = with_conf ? at::empty({num_req, gamma}, f32) : at::empty({0}, f32);
  // z is needed after the loop for draft_probs even when draft_logits was not asked for.
  const bool keep_z = return_draft_logits || return_draft_probs;
  at::Tensor draft_logits = keep_z ? at::empty({num_req, gamma, vocab}, f32) : at::empty({0}, f32);
  at::Tensor draft_probs =
      return_draft_probs ? at::empty({num_req, gamma, vocab}, f32) : at::empty({0}, f32);
  auto finish = [&]() {
    at::Tensor survival = with_conf ? confidence.cumprod(1) : at::empty({0}, f32);
    return std::make_tuple(tokens, token_probs, confidence, survival, draft_probs,
                           return_draft_logits ? draft_logits : at::empty({0}, f32));
  };
  if (num_req == 0 || gamma == 0) return finish();

  const at::Tensor temp = temperature.to(at::kFloat).contiguous();
  const at::Tensor seed_c = seed.contiguous();
  const int64_t num_tiles = dspark::markov_num_tiles(vocab);
  const int64_t part = num_req * num_tiles;
  const at::Tensor fparts = at::empty({5 * part}, f32);
  const at::Tensor iparts = at::empty({2 * part}, i32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  dspark::MarkovStepArgs a;
  a.u_dtype = u_dtype;
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
  a.tokens = tokens.data_ptr<int32_t>();
  a.stride_tr = tokens.stride(0);
  a.token_probs = token_probs.data_ptr<float>();
  a.stride_pr = token_probs.stride(0);
  a.num_req = num_req;
  a.vocab = vocab;
  a.rank = rank;

  // Head input e_k and confidence c_k: the reference's torch ops (O(R·r·d) per step).
  at::Tensor prev = anchor.to(at::kLong);
  at::Tensor state = rnn_weight.has_value() ? at::zeros({num_req, rank}, f32) : at::Tensor();
  for (int64_t k = 0; k < gamma; ++k) {
    const at::Tensor emb = w1.index_select(0, prev).to(at::kFloat);
    at::Tensor e;
    if (gate_weight.has_value()) {
      at::Tensor x = at::cat({hidden->select(1, k).to(at::kFloat), emb}, -1)
                         .matmul(gate_weight->to(at::kFloat).t());
      if (gate_bias.has_value()) x = x.add(gate_bias->to(at::kFloat));
      e = x.sigmoid().mul(emb);
    } else if (rnn_weight.has_value()) {
      at::Tensor x = at::cat({emb, state}, -1).matmul(rnn_weight->to(at::kFloat).t());
      if (rnn_bias.has_value()) x = x.add(rnn_bias->to(at::kFloat));
      state = x.tanh();
      e = state;
    } else {
      e = emb;
    }
    e = e.contiguous();
    if (with_conf) {
      at::Tensor logit_c = at::cat({hidden->select(1, k).to(at::kFloat), emb}, -1)
                               .matmul(conf_weight->to(at::kFloat));
      if (conf_bias.has_value()) logit_c = logit_c.add(conf_bias->to(at::kFloat).reshape({}));
      if (sts_temperature.has_value()) {
        logit_c = logit_c.div(sts_temperature->select(0, k).to(at::kFloat));
      }
      confidence.select(1, k).copy_(logit_c.sigmoid());
    }
    const at::Tensor u = base_logits.select(1, k);
    a.u = u.data_ptr();
    a.stride_ur = u.stride(0);
    a.stride_uv = u.stride(1);
    a.e = e.data_ptr<float>();
    a.stride_er = e.stride(0);
    if (keep_z) {
      const at::Tensor zk = draft_logits.select(1, k);
      a.logits_out = zk.data_ptr<float>();
      a.stride_lr = zk.stride(0);
      a.stride_lv = zk.stride(1);
    }
    a.step = static_cast<int32_t>(k);
    check_cuda(dspark::markov_step_launch(a, stream), "markov_draft step kernel launch");
    prev = tokens.select(1, k).to(at::kLong);
  }
  if (return_draft_probs) {
    check_cuda(dspark::markov_probs_launch(draft_logits.data_ptr<float>(),
                                           draft_probs.data_ptr<float>(), temp.data_ptr<float>(),
                                           tokens.data_ptr<int32_t>(), num_req, gamma, vocab,
                                           stream),
               "markov_draft probs kernel launch");
  }
  return finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("rejection_sample_cuda", &rejection_sample_cuda);
  m.impl("markov_draft_cuda", &markov_draft_cuda);
}

// ---------------------------------------------------------------------------
// schedule_verify (csrc/schedule_verify.cu). Schema dspark::schedule_verify_cuda,
// defined in dspark_kernels/ops/schedule_verify.py. Inputs are read in place
// (any strides, fp16/bf16/fp32/fp64 survival): the only allocations are the
// four outputs, so the op is capturable in a CUDA graph.
// ---------------------------------------------------------------------------
#include "schedule_verify.h"

namespace {

dspark::ScheduleFloat schedule_float_of(const at::Tensor& t, const char* name, bool allow_half) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return dspark::ScheduleFloat::kFloat32;
    case at::kDouble:
      return dspark::ScheduleFloat::kFloat64;
    case at::kHalf:
      if (allow_half) return dspark::ScheduleFloat::kFloat16;
      break;
    case at::kBFloat16:
      if (allow_half) return dspark::ScheduleFloat::kBFloat16;
      break;
    default:
      break;
  }
  TORCH_CHECK(false, name, allow_half ? " must be float32, float16, bfloat16 or float64, got "
                                      : " must be float32 or float64, got ",
              t.scalar_type());
}

void schedule_check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be a CUDA tensor on ",
              ref.device(), ", got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> schedule_verify_cuda(
    const at::Tensor& survival, const at::Tensor& sps, c10::string_view mode,
    const std::optional<at::Tensor>& history, const std::optional<at::Tensor>& max_len,
    const std::optional<at::Tensor>& active) {
  TORCH_CHECK(survival.is_cuda() && survival.dim() == 2, "survival must be a 2-d CUDA tensor [R, gamma]");
  const bool is_async = mode == "async";
  TORCH_CHECK(is_async || mode == "causal", "mode must be 'causal' or 'async', got '", mode, "'");
  const int64_t num_req = survival.size(0);
  const int64_t gamma = survival.size(1);
  TORCH_CHECK(num_req * gamma <= dspark::kScheduleMaxCandidates,
              "the CUDA schedule_verify sorts every candidate in one thread block: at most R*gamma = ",
              dspark::kScheduleMaxCandidates, " candidates, got R*gamma = ", num_req, "*", gamma, " = ",
              num_req * gamma, " (use backend='reference' for larger batches)");
  TORCH_CHECK(num_req * (gamma + 1) < (int64_t{1} << 31), "R*(gamma+1) must be below 2^31 (int32 cu_verify)");
  schedule_check_same_device(sps, survival, "sps");
  TORCH_CHECK(sps.dim() == 1 && sps.size(0) >= 1, "sps must be a non-empty 1-d tensor");

  dspark::ScheduleVerifyArgs a;
  a.survival = survival.data_ptr();
  a.survival_dtype = schedule_float_of(survival, "survival", true);
  a.stride_sr = survival.stride(0);
  a.stride_sj = survival.stride(1);
  a.sps = sps.data_ptr();
  a.sps_dtype = schedule_float_of(sps, "sps", false);
  a.sps_len = sps.size(0);
  a.stride_sps = sps.stride(0);
  a.num_req = num_req;
  a.gamma = gamma;
  a.async_mode = is_async;
  if (is_async) {
    TORCH_CHECK(history.has_value(), "mode='async' needs history (the survival of two steps earlier)");
    schedule_check_same_device(*history, survival, "history");
    TORCH_CHECK(history->sizes() == survival.sizes(), "history must have shape ", survival.sizes(), ", got ",
                history->sizes());
    a.history = history->data_ptr();
    a.history_dtype = schedule_float_of(*history, "history", true);
    a.stride_hr = history->stride(0);
    a.stride_hj = history->stride(1);
  }
  if (max_len.has_value()) {
    schedule_check_same_device(*max_len, survival, "max_len");
    TORCH_CHECK(max_len->dim() == 1 && max_len->size(0) == num_req, "max_len must have shape [", num_req, "]");
    TORCH_CHECK(max_len->scalar_type() == at::kInt || max_len->scalar_type() == at::kLong,
                "max_len must be int32 or int64, got ", max_len->scalar_type());
    a.max_len = max_len->data_ptr();
    a.max_len_int64 = max_len->scalar_type() == at::kLong;
    a.stride_ml = max_len->stride(0);
  }
  if (active.has_value()) {
    schedule_check_same_device(*active, survival, "active");
    TORCH_CHECK(active->dim() == 1 && active->size(0) == num_req, "active must have shape [", num_req, "]");
    TORCH_CHECK(active->scalar_type() == at::kBool, "active must be bool, got ", active->scalar_type());
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
  const cudaError_t err = dspark::schedule_verify_launch(a, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "schedule_verify kernel launch failed: ", cudaGetErrorString(err));
  return {lengths, cu_verify, total, expected};
}

}  // namespace

TORCH_LIBRARY_IMPL(dspark, CUDA, m) { m.impl("schedule_verify_cuda", &schedule_verify_cuda); }
