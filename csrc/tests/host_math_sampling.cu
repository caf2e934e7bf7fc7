// Host emulation of the rejection_sample and markov_draft kernels, built
// with nvcc and driven by tests/test_cuda_host_math.py (which compares its
// output with the reference ops).
//
// It runs the kernels' algorithms sequentially with the kernels' own
// __host__ __device__ formulas (csrc/sampling.cuh, csrc/philox.cuh):
// rejection_sample's row statistics of every target row, then each
// request's chain walk and final residual/bonus Gumbel race; markov_draft's
// fp32 FMA product z = U + e·W2ᵀ (vanilla head), per-tile race/softmax
// partials and their merge. Not emulated: block/warp reductions, shared
// memory tiling, thread-to-index mapping and the launch (GPU only).
//
// stdin: a sequence of cases, each a kind ("RS" or "MD") and then the fields
// read by rejection_case() / markov_case() below, in that order; stdout: one
// line per case (tokens, then num_accepted or token_probs).
#include <cstdio>
#include <cstdint>
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

// rs_row_stats_kernel, sequentially.
static RowStats row_stats(const float* x, int64_t V, float temp, const int64_t* top_k, const float* top_p) {
  const bool greedy = is_greedy(temp);
  const float t = safe_temperature(temp);
  ArgMax best = argmax_init();
  for (int64_t i = 0; i < V; ++i) best = argmax_combine(best, ArgMax{scaled_logit(x[i], t), (int32_t)i});
  RowStats st = row_stats_from_max(best);
  if (!greedy && top_k != nullptr && topk_active(*top_k, V)) {
    TopKSearch s = topk_search_init(st.m);
    for (int it = 0; it < kTopKIters && topk_search_active(s); ++it) {
      const int64_t mid = topk_search_mid(s);
      const float thr = key_to_float(mid);
      int64_t cnt = 0;
      for (int64_t i = 0; i < V; ++i) cnt += scaled_logit(x[i], t) >= thr ? 1 : 0;
      topk_search_update(s, mid, cnt, *top_k);
    }
    st.kth = topk_search_result(s);
  }
  float sum = 0.f;
  for (int64_t i = 0; i < V; ++i) sum += topk_weight(scaled_logit(x[i], t), st.m, st.kth);
  st.s = sum;
  if (!greedy && top_p != nullptr) {
    if (topp_active(*top_p)) {
      TopPSearch s = topp_search_init();
      for (int it = 0; it < kTopPIters && topp_search_active(s); ++it) {
        const int32_t mid = topp_search_mid(s);
        const float thr = bits_as_float(mid);
        float mass = 0.f;
        for (int64_t i = 0; i < V; ++i) {
          const float p = topk_prob(scaled_logit(x[i], t), st.m, st.s, st.kth);
          mass += p > thr ? p : 0.f;
        }
        topp_search_update(s, mid, mass, *top_p);
      }
      st.pthr = topp_search_result(s);
    }
    float z2 = 0.f;
    for (int64_t i = 0; i < V; ++i) {
      const float p = topk_prob(scaled_logit(x[i], t), st.m, st.s, st.kth);
      z2 += p >= st.pthr ? p : 0.f;
    }
    st.z2 = z2;
  }
  return st;
}

static SoftmaxStats softmax_stats(const float* row, int64_t V, float t) {
  ArgMax best = argmax_init();
  for (int64_t i = 0; i < V; ++i) best = argmax_combine(best, ArgMax{scaled_logit(row[i], t), (int32_t)i});
  float s = 0.f;
  for (int64_t i = 0; i < V; ++i) s += exp_f(scaled_logit(row[i], t) - best.v);
  return SoftmaxStats{best.v, s, argmax_index(best.i, 0)};
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

  // Kernel 1: statistics of every row (padding rows past cu[R] get defaults).
  std::vector<RowStats> stats(N);
  for (int64_t row = 0; row < N; ++row) {
    if (row >= cu[R]) { stats[row] = padding_row_stats(); continue; }
    const int64_t req = request_of_row(cu.data(), R, row);
    stats[row] = row_stats(&logits[row * V], V, temp[req], has_k ? &top_k[req] : nullptr,
                           has_p ? &top_p[req] : nullptr);
  }
  // Kernel 2: one request at a time.
  std::vector<int32_t> tokens(R * (G + 1));
  std::vector<int32_t> n_out(R);
  for (int64_t r = 0; r < R; ++r) {
    int32_t* out = &tokens[r * (G + 1)];
    const int64_t start = cu[r];
    const bool live = request_live(start, cu[r + 1], N);
    if (!live) { for (int64_t j = 0; j <= G; ++j) out[j] = -1; n_out[r] = 0; continue; }
    const int64_t length = verify_length(lengths[r], G, start, N, live);
    const bool greedy = is_greedy(temp[r]);
    const float t = safe_temperature(temp[r]);
    bool d_greedy = false; float d_t = 1.f;
    if (mode == 2) { d_greedy = is_greedy(dtemp[r]); d_t = safe_temperature(dtemp[r]); }
    auto draft_at = [&](int64_t j) { return clamp_i64(drafts[r * G + j], 0, V - 1); };
    int64_t n_acc = 0;
    for (int64_t j = 0; j < length; ++j) {
      const int64_t row = start + j;
      const int64_t x = draft_at(j);
      const float p_t = target_prob(scaled_logit(logits[row * V + x], t), stats[row]);
      float p_d = 1.f;
      if (!greedy && mode == 1) {
        p_d = dprobs[(r * G + j) * V + x];
      } else if (!greedy && mode == 2) {
        if (has_dtp) {
          p_d = dtp[r * G + j];
        } else {
          const float* drow = &dlogits[(r * G + j) * V];
          const SoftmaxStats ds = softmax_stats(drow, V, d_t);
          p_d = draft_q(scaled_logit(drow[x], d_t), x, d_greedy, ds);
        }
      }
      const float coin = uniform((uint64_t)seed[r], offset, kStreamAccept, (uint32_t)j, 0);
      if (!accept_draft(greedy, stats[row].amax, x, coin, p_d, p_t)) break;
      ++n_acc;
    }
    const int64_t row = start + n_acc;
    const bool rejected = n_acc < length;
    const RowStats st = stats[row];
    int32_t y = st.amax;
    if (!greedy) {
      const uint32_t stream = rejected ? kStreamResidual : kStreamBonus;
      const int64_t j_rej = rejected ? n_acc : 0;
      const int64_t x_rej = rejected ? draft_at(j_rej) : -1;
      const float* qrow = nullptr;
      SoftmaxStats ds{0.f, 1.f, 0};
      if (rejected && mode == 1) qrow = &dprobs[(r * G + j_rej) * V];
      if (rejected && mode == 2) { qrow = &dlogits[(r * G + j_rej) * V]; ds = softmax_stats(qrow, V, d_t); }
      ArgMax best_w = argmax_init(), best_p = argmax_init();
      float mass_w = 0.f;
      for (int64_t idx = 0; idx < V; ++idx) {
        const float p = target_prob(scaled_logit(logits[row * V + idx], t), st);
        float q = 0.f;
        if (rejected) {
          if (mode == 0) q = idx == x_rej ? 1.f : 0.f;
          else if (mode == 1) q = qrow[idx];
          else q = draft_q(scaled_logit(qrow[idx], d_t), idx, d_greedy, ds);
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
    for (int64_t j = 0; j <= G; ++j) out[j] = j < n_acc ? (int32_t)draft_at(j) : (j == n_acc ? y : -1);
    n_out[r] = (int32_t)n_acc;
  }
  for (auto v : tokens) std::printf("%d ", v);
  for (auto v : n_out) std::printf("%d ", v);
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
  std::vector<int64_t> prev(anchor);
  for (int64_t k = 0; k < G; ++k) {
    for (int64_t r = 0; r < R; ++r) {
      const float* e = &W1[prev[r] * K];
      const float t = safe_temperature(temp[r]);
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
          const float zt = div_rn(z, t);
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
      tokens[r * G + k] = greedy ? argmax_index(gbest.i, 0) : argmax_index(race.i, 0);
      probs[r * G + k] = greedy ? 1.f : softmax_prob(race.z, t, m, s);
    }
    for (int64_t r = 0; r < R; ++r) prev[r] = tokens[r * G + k];
  }
  for (auto v : tokens) std::printf("%d ", v);
  for (auto v : probs) std::printf("%.9e ", v);
  std::printf("\n");
}

int main() {
  char kind[8];
  while (std::scanf("%7s", kind) == 1) {
    if (std::strcmp(kind, "RS") == 0) rejection_case();
    else if (std::strcmp(kind, "MD") == 0) markov_case();
    else return 2;
  }
  return 0;
}
