// Host emulation of the schedule_verify kernel, built with nvcc and driven
// by tests/test_cuda_host_math.py (which compares its output with the
// reference op).
//
// It runs the CUDA kernel's data flow for one thread block sequentially,
// with the kernel's own __host__ __device__ functions from
// csrc/schedule_verify.h for every formula: the block shape picked for R·γ,
// lanes in blocked arrangement, order keys and their block min/max, an LSD
// radix sort over exactly the key bits the kernel hands cub::BlockRadixSort
// (digits of the kernel's width, stable, so the index bits need no pass), the
// Kogge-Stone warp/block scans in the device's association order (fp64 gains,
// int32 rows), each thread's walk (tau/theta, first non-rise, argmax key),
// the theta hand-over between threads, the threshold and expected owners, and
// the per-request length count, async mode's K from history or a given
// capacity (clamped, then at most the candidates). What it cannot check: cub's sort itself,
// shuffles and barriers, shared-memory layout and the launch (GPU only).
//
// stdin: cases "SV" followed by the fields main() reads (element values as
// raw bits); stdout: one line per case: lengths, cu_verify, total, the bits
// of expected, the block shape index.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "schedule_verify.h"

using namespace dspark;
using namespace dspark::sv;

static unsigned long long ru() { unsigned long long x = 0; if (std::scanf("%llu", &x) != 1) std::abort(); return x; }
static long long ri() { long long x = 0; if (std::scanf("%lld", &x) != 1) std::abort(); return x; }

static size_t width(FloatType t) {
  return t == FloatType::kFloat64 ? 8 : t == FloatType::kFloat32 ? 4 : 2;
}

// R·G raw element bits of dtype t, in memory order (the caller sends a
// transposed survival as its [G, R] memory).
static std::vector<unsigned char> read_floats(FloatType t, int64_t R, int64_t G) {
  const size_t w = width(t);
  std::vector<unsigned char> buf(std::max<int64_t>(R * G, 1) * w);
  for (int64_t i = 0; i < R * G; ++i) {
    const unsigned long long bits = ru();
    std::memcpy(&buf[i * w], &bits, w);  // little endian: the low w bytes
  }
  return buf;
}

// warp_inclusive_scan + block_exclusive_scan of schedule_verify.cu, in the same order.
template <typename T>
static std::vector<T> block_exclusive_scan(const std::vector<T>& x, int warps, T* total) {
  const int n = (int)x.size();
  std::vector<T> incl(x), lane_excl(n), out(n);
  auto warp_scan = [](T* v) {
    for (int off = 1; off < 32; off <<= 1) {
      T old[32];
      for (int l = 0; l < 32; ++l) old[l] = v[l];
      for (int l = off; l < 32; ++l) v[l] = old[l - off] + old[l];
    }
  };
  for (int w = 0; w < warps; ++w) warp_scan(&incl[w * 32]);
  for (int t = 0; t < n; ++t) lane_excl[t] = (t % 32 == 0) ? T(0) : incl[t - 1];
  T wincl[32];
  for (int l = 0; l < 32; ++l) wincl[l] = l < warps ? incl[l * 32 + 31] : T(0);
  warp_scan(wincl);
  for (int t = 0; t < n; ++t) {
    const int w = t / 32;
    const T wexcl = w == 0 ? T(0) : wincl[w - 1];
    out[t] = wexcl + lane_excl[t];
  }
  *total = wincl[warps - 1];
  return out;
}

// cub::BlockRadixSort::Sort(keys, begin_bit, end_bit): stable LSD passes of radix_bits.
static void radix_sort(std::vector<uint64_t>& keys, int begin_bit, int end_bit, int radix_bits) {
  std::vector<uint64_t> tmp(keys.size());
  while (true) {
    const int pass_bits = std::min(radix_bits, end_bit - begin_bit);
    const uint64_t mask = (uint64_t{1} << pass_bits) - 1;
    std::vector<size_t> count((size_t{1} << pass_bits) + 1, 0);
    for (uint64_t k : keys) ++count[((k >> begin_bit) & mask) + 1];
    for (size_t d = 1; d < count.size(); ++d) count[d] += count[d - 1];
    for (uint64_t k : keys) tmp[count[(k >> begin_bit) & mask]++] = k;
    keys.swap(tmp);
    begin_bit += radix_bits;
    if (begin_bit >= end_bit) break;
  }
}

template <class C>
static void emulate(const ScheduleVerifyArgs& a) {
  constexpr int T = C::kThreads, I = C::kItems, CAP = C::kCap, IDX = C::kIdxBits;
  const int64_t R = a.num_req;
  auto items = [](std::vector<uint64_t>& k, int t) -> const uint64_t (&)[I] {
    return *reinterpret_cast<const uint64_t (*)[I]>(&k[(size_t)t * I]);
  };
  // 1. A.
  int64_t A = 0;
  for (int64_t r = 0; r < R; ++r)
    if (is_active(a, r)) ++A;
  PathCtx ctx;
  ctx.a = &a; ctx.num_active = A; ctx.num_valid = 0; ctx.a_f = (float)A; ctx.idx_bits = IDX; ctx.cap = CAP;
  ctx.map = key_map(1u, 0u);
  const float theta0 = theta_zero(ctx);

  std::vector<uint64_t> keys(CAP);
  std::vector<double> prefix(T, 0.0);
  std::vector<float> before(T, theta0);
  const bool given = a.async_mode && a.capacity != nullptr;
  uint32_t k_adm = given ? given_capacity(a, (uint32_t)CAP) : 0u;
  for (int pass = a.async_mode && !given ? 0 : 1; pass < 2; ++pass) {
    const bool hist = pass == 0;
    const void* values = hist ? a.history : a.survival;
    const FloatType dtype = hist ? a.history_dtype : a.survival_dtype;
    const int64_t sr = hist ? a.stride_hr : a.stride_sr, sj = hist ? a.stride_hj : a.stride_sj;
    uint32_t lo = 0xFFFFFFFFu, hi = 0, nv = 0;
    for (int l = 0; l < CAP; ++l) {
      const uint32_t h = lane_hi(a, values, dtype, sr, sj, l);
      keys[l] = h;
      if (h != kNegInfHi) { lo = std::min(lo, h); hi = std::max(hi, h); ++nv; }
    }
    ctx.num_valid = nv;
    const KeyMap map = key_map(lo, hi);
    for (int l = 0; l < CAP; ++l) keys[l] = sort_key((uint32_t)keys[l], map, (uint32_t)l, IDX);
    const int nbits = sort_bits(map);
    if (nbits > 0) radix_sort(keys, IDX, IDX + nbits, C::kRadixBits);
    ctx.map = map;
    std::vector<double> gsum(T);
    for (int t = 0; t < T; ++t) gsum[t] = thread_gain_sum(ctx, items(keys, t), (uint32_t)(t * I));
    double total;
    prefix = block_exclusive_scan(gsum, C::kWarps, &total);
    if (hist) {
      uint64_t best = argmax_key(theta0, 0);
      for (int t = 0; t < T; ++t)
        best = std::max(best, walk(ctx, items(keys, t), (uint32_t)(t * I), prefix[t], theta0, kNoLane).best);
      k_adm = argmax_k(best);
      continue;
    }
    if (a.async_mode) { k_adm = std::min(k_adm, ctx.num_valid); continue; }
    for (int t = 0; t < T; ++t) {
      const float last = walk(ctx, items(keys, t), (uint32_t)(t * I), prefix[t], theta0, kNoLane).last_theta;
      if (t + 1 < T) before[t + 1] = last;
    }
    uint32_t stop = 0xFFFFFFFFu;
    for (int t = 0; t < T; ++t)
      stop = std::min(stop, walk(ctx, items(keys, t), (uint32_t)(t * I), prefix[t], before[t], kNoLane).first_stop);
    k_adm = stop;
  }
  float expected = 0.f;
  uint64_t thresh = 0;
  int owners_tau = 0, owners_key = 0;
  for (int t = 0; t < T; ++t) {
    const Walk w = walk(ctx, items(keys, t), (uint32_t)(t * I), prefix[t], before[t], k_adm);
    if (w.has_tau) { expected = w.tau; ++owners_tau; }
    if (w.has_key) { thresh = w.key; ++owners_key; }
  }
  if (k_adm == 0) { expected = ctx.a_f; ++owners_tau; }
  if (k_adm >= (uint32_t)CAP) { thresh = kAdmitAll; ++owners_key; }
  if (owners_tau != 1 || owners_key != 1) {  // exactly one writer of each, as in the kernel
    std::fprintf(stderr, "owners %d %d\n", owners_tau, owners_key);
    std::exit(3);
  }

  std::vector<int32_t> lengths(R), cu(R + 1);
  const int64_t per = (R + T - 1) / T;
  std::vector<int32_t> rows(T, 0);
  for (int t = 0; t < T; ++t) {
    const int64_t b = std::min<int64_t>(R, t * per), e = std::min<int64_t>(R, b + per);
    for (int64_t r = b; r < e; ++r) {
      lengths[r] = request_length(a, r, thresh, IDX);
      rows[t] += request_rows(a, r, lengths[r]);
    }
  }
  int32_t total_rows;
  std::vector<int32_t> run = block_exclusive_scan(rows, C::kWarps, &total_rows);
  for (int t = 0; t < T; ++t) {
    const int64_t b = std::min<int64_t>(R, t * per), e = std::min<int64_t>(R, b + per);
    for (int64_t r = b; r < e; ++r) { run[t] += request_rows(a, r, lengths[r]); cu[r + 1] = run[t]; }
  }
  cu[0] = 0;
  for (auto v : lengths) std::printf("%d ", v);
  for (auto v : cu) std::printf("%d ", v);
  std::printf("%d %u %d\n", total_rows, (unsigned)float_as_bits(expected), config_index(R * a.gamma));
}

int main() {
  char kind[8];
  while (std::scanf("%7s", kind) == 1) {
    if (std::strcmp(kind, "SV") != 0) return 2;
    ScheduleVerifyArgs a;
    a.async_mode = ri() != 0;
    a.num_req = ri();
    a.gamma = ri();
    const bool transposed = ri() != 0;
    a.survival_dtype = (FloatType)ri();
    a.history_dtype = (FloatType)ri();
    a.sps_dtype = (FloatType)ri();
    a.sps_len = ri();
    const bool has_ml = ri() != 0;
    a.max_len_int64 = ri() != 0;
    const bool has_act = ri() != 0;
    const int has_cap = (int)ri();  // 0: none, 1: int32, 2: int64
    const int64_t R = a.num_req, G = a.gamma;
    const auto surv = read_floats(a.survival_dtype, R, G);
    a.survival = surv.data();
    a.stride_sr = transposed ? 1 : G;
    a.stride_sj = transposed ? R : 1;
    std::vector<unsigned char> hist;
    int32_t cap32 = 0;
    int64_t cap64 = 0;
    if (has_cap) {
      cap64 = ri();
      cap32 = (int32_t)cap64;
      a.capacity = has_cap == 2 ? (const void*)&cap64 : (const void*)&cap32;
      a.capacity_int64 = has_cap == 2;
    }
    if (a.async_mode && !has_cap) {
      hist = read_floats(a.history_dtype, R, G);
      a.history = hist.data();
      a.stride_hr = G;
      a.stride_hj = 1;
    }
    const auto sps = read_floats(a.sps_dtype, 1, a.sps_len);
    a.sps = sps.data();
    a.stride_sps = 1;
    std::vector<int32_t> ml32(R);
    std::vector<int64_t> ml64(R);
    std::vector<uint8_t> act(R);
    if (has_ml) {
      for (int64_t r = 0; r < R; ++r) { ml64[r] = ri(); ml32[r] = (int32_t)ml64[r]; }
      a.max_len = a.max_len_int64 ? (const void*)ml64.data() : (const void*)ml32.data();
      a.stride_ml = 1;
    }
    if (has_act) {
      for (int64_t r = 0; r < R; ++r) act[r] = (uint8_t)ri();
      a.active = act.data();
      a.stride_act = 1;
    }
    switch (config_index(R * G)) {
      case 0: emulate<Config0>(a); break;
      case 1: emulate<Config1>(a); break;
      case 2: emulate<Config2>(a); break;
      default: emulate<Config3>(a); break;
    }
  }
  return 0;
}
