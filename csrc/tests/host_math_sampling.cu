// Host emulation of the rejection_sample and markov_draft kernels, built
// with nvcc and driven by tests/test_cuda_host_math.py (which compares its
// output with the reference ops).
//
// It runs the kernels' algorithms sequentially with the kernels' own
// __host__ __device__ formulas (csrc/sampling.cuh, csrc/philox.cuh):
// rejection_sample's row statistics of every target row (z = logit · (1/T),
// the two top-k bisections for (kth_key, kth_id) with the tie tally between
// them, the normaliser, the top-p bisection and renormaliser, stored and
// loaded through the kernels' workspace layout), then each request's chain
// walk (invalid draft ids rejected, lengths clamped to the rows that exist)
// and final residual/bonus Gumbel race with the residual's q of every draft
// mode (byte-minimal q = p_d(x)·exp(u - u_x) included); markov_draft's fp32
// FMA product z = U + e·W2ᵀ (vanilla head), per-tile race/softmax partials
// and their merge. Not emulated: block/warp reductions, shared memory tiling,
// thread-to-index mapping and the launch (GPU only).
//
// stdin: a sequence of cases, each a kind ("RS", "FP", "SL" or "MD") and then
// the fields read by rejection_case() / filtered_case() / scaled_case() /
// markov_case() below, in that order; stdout: one line per case (RS: tokens,
// then num_accepted; FP: per row z2 and the target probability of every
// token; SL: the bits of each z = logit · (1/T); MD: tokens, then
// token_probs).
#include <cstdio>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "markov_draft.h"
#include "philox.cuh"
#include "sampling.cuh"

using namespace dspark;

static float rf() { float x = 0.f; if (std::scanf("%f", &x) != 1) std::abort(); return x; }
static long long ri() { long long x = 0; if (std::scanf("%lld", &x) != 1) std::abort(); return x; }
static std::vector<float> rfv(size_t n) { std::vector<float> v(n); for (auto& x : v) x = rf(); return v; }
static std::vector<int64_t> riv(size_t n) { std::vector<int64_t> v(n); for (auto& x : v) x = ri(); return v; }

// rs_row_stats_kernel, sequentially (each block-wide pass is one loop here).
static RowStats row_stats(const float* x, int64_t V, float temp, const int64_t* top_k, const float* top_p) {
  const bool greedy = is_greedy(temp);
  const float inv_t = inverse_temperature(temp);
  ArgMax best = argmax_init();
  for (int64_t i = 0; i < V; ++i) best = argmax_combine(best, ArgMax{scaled_logit(x[i], inv_t), (int32_t)i});
  RowStats st = row_stats_from_max(best);
  if (!greedy && top_k != nullptr && topk_active(*top_k, V)) {
    const int64_t k = *top_k;
    TopKSearch s = topk_search_init(st.m);
    for (int it = 0; it < kTopKIters && topk_search_active(s); ++it) {
      const int64_t mid = topk_search_mid(s);
      int64_t cnt = 0;
      for (int64_t i = 0; i < V; ++i) cnt += topk_key(scaled_logit(x[i], inv_t)) >= mid;
      topk_search_update(s, mid, cnt, k);
    }
    st.kth_key = topk_search_result(s);
    TopKTies ties = topk_ties_init();
    for (int64_t i = 0; i < V; ++i) topk_ties_add(ties, topk_key(scaled_logit(x[i], inv_t)), i, st.kth_key);
    const int64_t need = topk_need(k, ties.count_gt);
    TopKIdSearch ids = topk_id_search_init(ties, k);
    for (int it = 0; it < kTopKIdIters && topk_id_search_active(ids); ++it) {
      const int64_t mid = topk_id_search_mid(ids);
      int64_t cnt = 0;
      for (int64_t i = 0; i <= mid; ++i) cnt += topk_key(scaled_logit(x[i], inv_t)) == st.kth_key;
      topk_id_search_update(ids, mid, cnt, need);
    }
    st.kth_id = topk_id_search_result(ids);
  }
  float sum = 0.f;
  for (int64_t i = 0; i < V; ++i) sum += topk_weight(scaled_logit(x[i], inv_t), i, st.m, st.kth_key, st.kth_id);
  st.s = sum;
  if (!greedy && top_p != nullptr && topp_active(*top_p)) {
    TopPSearch s = topp_search_init();
    for (int it = 0; it < kTopPIters && topp_search_active(s); ++it) {
      const int32_t mid = topp_search_mid(s);
      const float thr = bits_as_float(mid);
      float mass = 0.f;
      for (int64_t i = 0; i < V; ++i) {
        const float p = topk_prob(scaled_logit(x[i], inv_t), i, st.m, st.s, st.kth_key, st.kth_id);
        mass += p > thr ? p : 0.f;
      }
      topp_search_update(s, mid, mass, *top_p);
    }
    st.pthr = topp_search_result(s);
    float z2 = 0.f;
    for (int64_t i = 0; i < V; ++i) {
      const float p = topk_prob(scaled_logit(x[i], inv_t), i, st.m, st.s, st.kth_key, st.kth_id);
      z2 += p >= st.pthr ? p : 0.f;
    }
    st.z2 = z2;
  }
  return st;
}

// draft_softmax_stats of rejection_sample.cu, sequentially.
static SoftmaxStats softmax_stats(const float* row, int64_t V, float inv_t) {
  ArgMax best = argmax_init();
  for (int64_t i = 0; i < V; ++i) best = argmax_combine(best, ArgMax{scaled_logit(row[i], inv_t), (int32_t)i});
  float s = 0.f;
  for (int64_t i = 0; i < V; ++i) s += exp_f(scaled_logit(row[i], inv_t) - best.v);
  return SoftmaxStats{best.v, s, argmax_index(best.i, 0)};
}

// Kernel 1 over every target row, into the kernels' workspace layout
// (padding rows past cu[R] get defaults).
static void all_row_stats(const std::vector<int64_t>& cu, int64_t R, int64_t N, int64_t V,
                          const std::vector<float>& logits, const std::vector<float>& temp,
                          const std::vector<int64_t>& top_k, const std::vector<float>& top_p, bool has_k,
                          bool has_p, std::vector<float>& stats_f, std::vector<int32_t>& stats_i) {
  stats_f.assign(std::max<int64_t>(N, 1) * 4, 0.f);
  stats_i.assign(std::max<int64_t>(N, 1) * 3, 0);
  for (int64_t row = 0; row < N; ++row) {
    RowStats st;
    if (row >= cu[R]) {
      st = padding_row_stats();
    } else {
      const int64_t req = request_of_row(cu.data(), R, row);
      st = row_stats(&logits[row * V], V, temp[req], has_k ? &top_k[req] : nullptr,
                     has_p ? &top_p[req] : nullptr);
    }
    store_row_stats(stats_f.data(), stats_i.data(), row, st);
  }
}

static void rejection_case() {
  const int64_t R = ri(), G = ri(), V = ri(), N = ri(), mode = ri(), has_k = ri(), has_p = ri(), has_dtp = ri();
  const uint64_t offset = (uint64_t)ri();
  const auto cu = riv(R + 1);
  const auto lengths = riv(R);
  const auto temp = rfv(R);
  const auto seed = riv(R);
  const auto top_k = has_k ? riv(R) : std::vector<int64_t>();
  const auto top_p = has_p ? rfv(R) : std::vector<float>();
  const auto dtemp = mode == 2 ? rfv(R) : std::vector<float>();
  const auto drafts = riv(R * G);
  const auto logits = rfv(N * V);
  const auto dprobs = mode == 1 ? rfv(R * G * V) : std::vector<float>();
  const auto dlogits = mode == 2 ? rfv(R * G * V) : std::vector<float>();
  const auto dtp = (mode == 2 && has_dtp) ? rfv(R * G) : std::vector<float>();

  // Kernel 1: statistics of every row.
  std::vector<float> stats_f;
  std::vector<int32_t> stats_i;
  all_row_stats(cu, R, N, V, logits, temp, top_k, top_p, has_k, has_p, stats_f, stats_i);
  // Kernel 2: one request at a time.
  std::vector<int32_t> tokens(R * (G + 1));
  std::vector<int32_t> n_out(R);
  for (int64_t r = 0; r < R; ++r) {
    int32_t* out = &tokens[r * (G + 1)];
    const int64_t start = cu[r], end = cu[r + 1];
    const bool live = request_live(start, end, N);
    if (!live) { for (int64_t j = 0; j <= G; ++j) out[j] = -1; n_out[r] = 0; continue; }
    const int64_t length = verify_length(lengths[r], G, start, end, N, live);
    const bool greedy = is_greedy(temp[r]);
    const float inv_t = inverse_temperature(temp[r]);
    bool d_greedy = false; float d_inv = 1.f;
    if (mode == 2) { d_greedy = is_greedy(dtemp[r]); d_inv = inverse_temperature(dtemp[r]); }
    auto draft_raw = [&](int64_t j) { return drafts[r * G + j]; };
    int64_t n_acc = 0;
    for (int64_t j = 0; j < length; ++j) {
      const int64_t row = start + j;
      const int64_t x = draft_raw(j);
      if (!draft_valid(x, V)) break;
      const RowStats st = load_row_stats(stats_f.data(), stats_i.data(), row);
      const float p_t = target_prob(scaled_logit(logits[row * V + x], inv_t), x, st);
      float p_d = 1.f;
      if (!greedy && mode == 1) {
        p_d = dprobs[(r * G + j) * V + x];
      } else if (!greedy && mode == 2) {
        if (has_dtp) {
          p_d = dtp[r * G + j];
        } else {
          const float* drow = &dlogits[(r * G + j) * V];
          const SoftmaxStats ds = softmax_stats(drow, V, d_inv);
          p_d = draft_q(scaled_logit(drow[x], d_inv), x, d_greedy, ds);
        }
      }
      const float coin = uniform((uint64_t)seed[r], offset, kStreamAccept, (uint32_t)j, 0);
      if (!accept_draft(greedy, st.amax, x, coin, p_d, p_t)) break;
      ++n_acc;
    }
    const int64_t row = start + n_acc;
    const bool rejected = n_acc < length;
    const RowStats st = load_row_stats(stats_f.data(), stats_i.data(), row);
    int32_t y = st.amax;
    if (!greedy) {
      const uint32_t stream = rejected ? kStreamResidual : kStreamBonus;
      const int64_t j_rej = rejected ? n_acc : 0;
      const int64_t x_raw = rejected ? draft_raw(j_rej) : -1;
      const bool has_q = rejected && draft_valid(x_raw, V);
      const int64_t x_rej = has_q ? x_raw : -1;
      const float* qrow = nullptr;
      SoftmaxStats ds{0.f, 1.f, 0};
      float p_dx = 1.f, u_x = 0.f;
      if (has_q && mode == 1) qrow = &dprobs[(r * G + j_rej) * V];
      if (has_q && mode == 2) {
        qrow = &dlogits[(r * G + j_rej) * V];
        if (has_dtp) { p_dx = dtp[r * G + j_rej]; u_x = scaled_logit(qrow[x_rej], d_inv); }
        else ds = softmax_stats(qrow, V, d_inv);
      }
      ArgMax best_w = argmax_init(), best_p = argmax_init();
      float mass_w = 0.f;
      for (int64_t idx = 0; idx < V; ++idx) {
        const float p = target_prob(scaled_logit(logits[row * V + idx], inv_t), idx, st);
        float q = 0.f;
        if (has_q) {
          if (mode == 0) q = idx == x_rej ? 1.f : 0.f;
          else if (mode == 1) q = qrow[idx];
          else if (has_dtp) q = draft_q_implied(scaled_logit(qrow[idx], d_inv), idx, d_greedy, p_dx, u_x, x_rej);
          else q = draft_q(scaled_logit(qrow[idx], d_inv), idx, d_greedy, ds);
        }
        const float w = residual_weight(p, q);
        mass_w += w;
        const Philox4 bits = philox_block((uint64_t)seed[r], offset, stream, (uint32_t)n_acc, (uint32_t)(idx / 4));
        const float g = gumbel(bits_to_uniform(philox_lane(bits, (int)(idx % 4))));
        best_w = argmax_combine(best_w, ArgMax{race_score(w, g), (int32_t)idx});
        best_p = argmax_combine(best_p, ArgMax{race_score(p, g), (int32_t)idx});
      }
      y = mass_w > 0.f ? argmax_index(best_w.i, 0) : argmax_index(best_p.i, 0);
    }
    y = (int32_t)clamp_i64(y, 0, V - 1);
    for (int64_t j = 0; j <= G; ++j) out[j] = j < n_acc ? (int32_t)draft_raw(j) : (j == n_acc ? y : -1);
    n_out[r] = (int32_t)n_acc;
  }
  for (auto v : tokens) std::printf("%d ", v);
  for (auto v : n_out) std::printf("%d ", v);
  std::printf("\n");
}

// Kernel 1 alone, then per row z2 and target_prob of every token (what the
// chain reads): the filtered target distribution of each row, one request per
// row.
static void filtered_case() {
  const int64_t N = ri(), V = ri(), has_k = ri(), has_p = ri();
  const auto temp = rfv(N);
  const auto top_k = has_k ? riv(N) : std::vector<int64_t>();
  const auto top_p = has_p ? rfv(N) : std::vector<float>();
  const auto logits = rfv(N * V);
  std::vector<int64_t> cu(N + 1);
  for (int64_t i = 0; i <= N; ++i) cu[i] = i;
  std::vector<float> stats_f;
  std::vector<int32_t> stats_i;
  all_row_stats(cu, N, N, V, logits, temp, top_k, top_p, has_k, has_p, stats_f, stats_i);
  for (int64_t row = 0; row < N; ++row) {
    const RowStats st = load_row_stats(stats_f.data(), stats_i.data(), row);
    const float inv_t = inverse_temperature(temp[row]);
    std::printf("%.9e ", st.z2);  // the top-p renormaliser: exactly 1 unless top_p < 1
    for (int64_t i = 0; i < V; ++i) {
      // Greedy rows: the chain uses only the argmax (a one-hot).
      const float p = is_greedy(temp[row]) ? (i == st.amax ? 1.f : 0.f)
                                           : target_prob(scaled_logit(logits[row * V + i], inv_t), i, st);
      std::printf("%.9e ", p);
    }
  }
  std::printf("\n");
}

// markov_tile_kernel + markov_reduce_kernel (vanilla head), sequentially.
static void markov_case() {
  const int64_t R = ri(), G = ri(), V = ri(), K = ri();
  const uint64_t offset = (uint64_t)ri();
  const auto anchor = riv(R);
  const auto temp = rfv(R);
  const auto seed = riv(R);
  const auto U = rfv(R * G * V);
  const auto W1 = rfv(V * K);
  const auto W2 = rfv(V * K);
  const int64_t tiles = markov_num_tiles(V);
  std::vector<int32_t> tokens(R * G);
  std::vector<float> probs(R * G);
  std::vector<int64_t> prev(anchor);  // draft_block clamps the anchor into [0, V)
  for (auto& v : prev) v = clamp_i64(v, 0, V - 1);
  for (int64_t k = 0; k < G; ++k) {
    for (int64_t r = 0; r < R; ++r) {
      const float* e = &W1[prev[r] * K];
      const float inv_t = inverse_temperature(temp[r]);
      std::vector<ArgMaxZ> p_race(tiles);
      std::vector<ArgMax> p_greedy(tiles);
      std::vector<float> p_max(tiles), p_sum(tiles);
      for (int64_t tile = 0; tile < tiles; ++tile) {
        ArgMaxZ race = argmaxz_init();
        ArgMax gbest = argmax_init();
        float m = neg_inf();
        std::vector<float> zs;
        for (int64_t col = tile * kMarkovTileV; col < V && col < (tile + 1) * kMarkovTileV; ++col) {
          float acc = 0.f;
          for (int64_t kk = 0; kk < K; ++kk) acc = fmaf(e[kk], W2[col * K + kk], acc);
          const float z = U[(r * G + k) * V + col] + acc;
          const float zt = scaled_logit(z, inv_t);
          const float g = gumbel(uniform((uint64_t)seed[r], offset, kStreamDraft, (uint32_t)k, (uint64_t)col));
          race = argmax_combine(race, ArgMaxZ{zt + g, (int32_t)col, z});
          gbest = argmax_combine(gbest, ArgMax{z, (int32_t)col});
          m = fmaxf(m, zt);
          zs.push_back(zt);
        }
        float ssum = 0.f;
        for (float zt : zs) ssum += exp_f(zt - safe_max(m));
        p_race[tile] = race; p_greedy[tile] = gbest; p_max[tile] = m; p_sum[tile] = ssum;
      }
      ArgMaxZ race = argmaxz_init();
      ArgMax gbest = argmax_init();
      float m = neg_inf();
      for (int64_t tile = 0; tile < tiles; ++tile) {
        race = argmax_combine(race, p_race[tile]);
        gbest = argmax_combine(gbest, p_greedy[tile]);
        m = fmaxf(m, p_max[tile]);
      }
      float s = 0.f;
      for (int64_t tile = 0; tile < tiles; ++tile) s += softmax_merge_term(p_max[tile], p_sum[tile], m);
      const bool greedy = is_greedy(temp[r]);
      const int32_t token = greedy ? argmax_index(gbest.i, 0) : argmax_index(race.i, 0);
      tokens[r * G + k] = (int32_t)clamp_i64(token, 0, V - 1);
      probs[r * G + k] = greedy ? 1.f : softmax_prob(race.z, inv_t, m, s);
    }
    for (int64_t r = 0; r < R; ++r) prev[r] = tokens[r * G + k];
  }
  for (auto v : tokens) std::printf("%d ", v);
  for (auto v : probs) std::printf("%.9e ", v);
  std::printf("\n");
}

// The scaled logit of every (temperature, logit) pair, as raw fp32 bits.
static void scaled_case() {
  const int64_t n = ri();
  const auto temp = rfv(n);
  const auto x = rfv(n);
  for (int64_t i = 0; i < n; ++i) {
    std::printf("%d ", float_as_bits(scaled_logit(x[i], inverse_temperature(temp[i]))));
  }
  std::printf("\n");
}

int main() {
  char kind[8];
  while (std::scanf("%7s", kind) == 1) {
    if (std::strcmp(kind, "RS") == 0) rejection_case();
    else if (std::strcmp(kind, "FP") == 0) filtered_case();
    else if (std::strcmp(kind, "SL") == 0) scaled_case();
    else if (std::strcmp(kind, "MD") == 0) markov_case();
    else return 2;
  }
  return 0;
}
