"""The CUDA kernels' per-element math, run on the host against the reference ops.

csrc/sampling.cuh holds every formula the CUDA kernels of rejection_sample
and markov_draft use (ordered float keys, the top-k / top-p bisection steps,
the target probability, the acceptance test, Gumbel noise and race scores,
the softmax partial merge, the row -> request lookup) as __host__ __device__
functions, and csrc/philox.cuh the counter-based RNG. This test compiles a
host program with nvcc that includes both headers and runs a *sequential*
emulation of the kernels' algorithms with those same functions (row
statistics of every target row, then each request's chain walk and final
residual/bonus Gumbel race over the vocabulary; for markov_draft the fp32 FMA
product z = U + e·W2ᵀ, the per-tile race/softmax partials and their merge),
then compares the emitted tokens with the reference ops on a few hundred
random small cases (the reference functions are called directly, without
the op's input validation, to keep the test fast; every case is valid input).

What this checks: the math, stream ids, positions and indices, tie-breaks and
clamping the kernels use. What it does NOT check: the kernels' parallel
parts (block/warp reductions, shared-memory tiling, thread-to-index mapping,
launch configuration); those run only on a GPU (tests comparing the cuda
backend with the reference do that where a GPU exists).
"""

import os
import shutil
import subprocess

import pytest
import torch

from dspark_kernels.reference.markov_draft import markov_draft as reference_markov_draft
from dspark_kernels.reference.rejection_sample import rejection_sample as reference_rejection_sample
from dspark_kernels.reference.sampling import filtered_probs

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "csrc")

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")

_HOST_PROGRAM = r"""
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
  RowStats st;
  st.m = best.v;
  st.amax = argmax_index(best.i, 0);
  st.kth = neg_inf();
  st.pthr = 0.f;
  st.z2 = 1.f;
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
"""


def _build_host_program(tmp_path_factory, name: str, source: str) -> str:
    """Compile a host emulation program against csrc/ headers with nvcc; return the executable."""
    tmp = tmp_path_factory.mktemp(name)
    src = tmp / f"{name}.cu"
    src.write_text(source)
    exe = tmp / name
    res = subprocess.run(
        ["nvcc", "-std=c++17", "-O1", "--expt-relaxed-constexpr", "-I", CSRC, str(src), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return str(exe)


@pytest.fixture(scope="module")
def host_exe(tmp_path_factory):
    return _build_host_program(tmp_path_factory, "host_math", _HOST_PROGRAM)


def _fmt(t: torch.Tensor) -> str:
    # repr of an fp32 value as a Python float round-trips exactly through scanf("%f").
    return " ".join(repr(float(v)) if t.is_floating_point() else str(int(v)) for v in t.reshape(-1).tolist())


def _run(exe: str, chunks: list[str]) -> list[str]:
    res = subprocess.run([exe], input="\n".join(chunks) + "\n", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def _rejection_case(g: torch.Generator):
    """Random valid inputs covering all draft modes, greedy rows, top-k/top-p, inactive requests, ties."""
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    R, G, V = ri(1, 5), ri(0, 4), ri(1, 40)
    mode = ri(0, 3)  # 3 = draft_logits + draft_token_probs
    lengths = torch.tensor([ri(0, G) for _ in range(R)], dtype=torch.int32)
    active = torch.rand(R, generator=g) > 0.15
    rows = torch.where(active, lengths + 1, torch.zeros_like(lengths))
    cu = torch.zeros(R + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(rows, 0)
    N = int(cu[-1]) + ri(0, 2)
    logits = torch.randn(N, V, generator=g) * (0.5 + 2.5 * torch.rand(1, generator=g))
    if ri(0, 3) == 0:  # coarse values: exact ties in z, p and the argmax
        logits = (logits * 2).round() / 2
    temperature = torch.where(torch.rand(R, generator=g) < 0.25, torch.zeros(R), 0.3 + 1.4 * torch.rand(R, generator=g))
    seed = torch.randint(-(2**62), 2**62, (R,), generator=g)
    offset = torch.tensor(ri(0, 2**40))
    top_k = torch.randint(-1, V + 2, (R,), generator=g) if ri(0, 1) else None
    top_p = None
    if ri(0, 1):
        top_p = 0.05 + 0.95 * torch.rand(R, generator=g)
        top_p = torch.where(torch.rand(R, generator=g) < 0.2, torch.ones(R), top_p)
    # Drafts: from a perturbed copy of each request's target rows, so chains of acceptances occur.
    d_logits = torch.randn(R, G, V, generator=g)
    for r in range(R):
        for j in range(G):
            if rows[r] > 0 and j < lengths[r]:
                d_logits[r, j] = logits[int(cu[r]) + j] + 0.3 * d_logits[r, j]
    d_temp = torch.where(torch.rand(R, generator=g) < 0.2, torch.zeros(R), 0.5 + torch.rand(R, generator=g))
    q = filtered_probs(d_logits.reshape(R * G, V), d_temp[:, None].expand(R, G).reshape(-1)).reshape(R, G, V)
    if R * G:
        drafts = torch.multinomial(q.reshape(R * G, V) + 1e-9, 1, generator=g).reshape(R, G)
    else:
        drafts = torch.zeros(R, G, dtype=torch.int64)
    kw = dict(top_k=top_k, top_p=top_p)
    draft_probs = None
    if mode == 1:
        draft_probs = q
    elif mode >= 2:
        kw["draft_logits"] = d_logits
        kw["draft_temperature"] = d_temp
        if mode == 3:
            kw["draft_token_probs"] = q.gather(-1, drafts[..., None]).squeeze(-1).clamp(min=1e-6)
    args = (logits, drafts, draft_probs, lengths, cu, temperature, seed, offset)
    # Host program input (see rejection_case() in _HOST_PROGRAM).
    host_mode = min(mode, 2)
    parts = [
        "RS", str(R), str(G), str(V), str(N), str(host_mode), str(int(top_k is not None)),
        str(int(top_p is not None)), str(int(mode == 3)), str(int(offset)),
        _fmt(cu), _fmt(lengths), _fmt(temperature), _fmt(seed),
    ]
    if top_k is not None:
        parts.append(_fmt(top_k))
    if top_p is not None:
        parts.append(_fmt(top_p))
    if host_mode == 2:
        parts.append(_fmt(d_temp))
    parts += [_fmt(drafts), _fmt(logits)]
    if host_mode == 1:
        parts.append(_fmt(q))
    if host_mode == 2:
        parts.append(_fmt(d_logits))
        if mode == 3:
            parts.append(_fmt(kw["draft_token_probs"]))
    return args, kw, " ".join(p for p in parts if p)


def test_rejection_sample_host_emulation_matches_reference(host_exe):
    g = torch.Generator().manual_seed(1234)
    cases = [_rejection_case(g) for _ in range(100)]  # ~300 requests
    lines = _run(host_exe, [c[2] for c in cases])
    assert len(lines) == len(cases)
    mismatches = []
    for i, ((args, kw, _), line) in enumerate(zip(cases, lines)):
        tokens, n_acc = reference_rejection_sample(
            *args, kw["top_k"], kw["top_p"], kw.get("draft_token_probs"), kw.get("draft_logits"),
            kw.get("draft_temperature"),
        )
        R, G = args[1].shape
        host = torch.tensor([int(v) for v in line.split()], dtype=torch.int32)
        host_tokens, host_n = host[: R * (G + 1)].reshape(R, G + 1), host[R * (G + 1):]
        if not (torch.equal(host_tokens, tokens) and torch.equal(host_n, n_acc)):
            mismatches.append((i, tokens.tolist(), host_tokens.tolist(), n_acc.tolist(), host_n.tolist()))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} cases differ, first: {mismatches[0]}"


def _markov_case(g: torch.Generator):
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    R, G, K = ri(1, 3), ri(1, 4), ri(1, 8)
    V = ri(1, 300) if ri(0, 1) else ri(1, 20)  # > 128 spans several vocab tiles, with a ragged tail
    base = torch.randn(R, G, V, generator=g) * 2
    w1 = torch.randn(V, K, generator=g)
    w2 = torch.randn(V, K, generator=g) * 0.5
    anchor = torch.randint(0, V, (R,), generator=g)
    temperature = torch.where(torch.rand(R, generator=g) < 0.25, torch.zeros(R), 0.3 + 1.4 * torch.rand(R, generator=g))
    seed = torch.randint(-(2**62), 2**62, (R,), generator=g)
    offset = torch.tensor(ri(0, 2**40))
    args = (base, anchor, w1, w2, temperature, seed, offset)
    text = " ".join([
        "MD", str(R), str(G), str(V), str(K), str(int(offset)), _fmt(anchor), _fmt(temperature), _fmt(seed),
        _fmt(base), _fmt(w1), _fmt(w2),
    ])
    return args, text


def test_markov_draft_host_emulation_matches_reference(host_exe):
    g = torch.Generator().manual_seed(4321)
    cases = [_markov_case(g) for _ in range(40)]
    lines = _run(host_exe, [c[1] for c in cases])
    assert len(lines) == len(cases)
    for i, ((args, _), line) in enumerate(zip(cases, lines)):
        out = reference_markov_draft(*args, *([None] * 8), False, False)
        R, G, _ = args[0].shape
        vals = line.split()
        host_tokens = torch.tensor([int(v) for v in vals[: R * G]], dtype=torch.int32).reshape(R, G)
        host_probs = torch.tensor([float(v) for v in vals[R * G:]], dtype=torch.float32).reshape(R, G)
        tokens, token_probs = out[0], out[1]
        assert torch.equal(host_tokens, tokens), f"case {i}: {host_tokens.tolist()} != {tokens.tolist()}"
        torch.testing.assert_close(host_probs, token_probs, rtol=2e-5, atol=1e-7)


# ---------------------------------------------------------------------------
# schedule_verify (csrc/schedule_verify.{cu,h}).
#
# The host program below runs the CUDA kernel's data flow for one thread block
# sequentially, with the kernel's own __host__ __device__ functions from
# csrc/schedule_verify.h for every formula: the block shape picked for R·γ,
# lanes in blocked arrangement, order keys and their block min/max, an LSD
# radix sort over exactly the key bits the kernel hands cub::BlockRadixSort
# (digits of the kernel's width, stable, so the index bits need no pass), the
# Kogge-Stone warp/block scans in the device's association order (fp64 gains,
# int32 rows), each thread's walk (tau/theta, first non-rise, argmax key),
# the theta hand-over between threads, the threshold and expected owners, and
# the per-request length count. What it cannot check: cub's sort itself,
# shuffles and barriers, shared-memory layout and the launch (GPU only).
# ---------------------------------------------------------------------------

import math
import struct

from dspark_kernels.reference.schedule_verify import schedule_verify as reference_schedule_verify

_SV_HOST_PROGRAM = r"""
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

static size_t width(ScheduleFloat t) {
  return t == ScheduleFloat::kFloat64 ? 8 : t == ScheduleFloat::kFloat32 ? 4 : 2;
}

// R·G raw element bits of dtype t, in memory order (the caller sends a
// transposed survival as its [G, R] memory).
static std::vector<unsigned char> read_floats(ScheduleFloat t, int64_t R, int64_t G) {
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
  // 1. A and num_valid.
  int64_t A = 0, NV = 0;
  for (int64_t r = 0; r < R; ++r)
    if (is_active(a, r)) { ++A; NV += cap_of(a, r); }
  PathCtx ctx;
  ctx.a = &a; ctx.num_active = A; ctx.num_valid = (uint32_t)NV; ctx.a_f = (float)A; ctx.idx_bits = IDX; ctx.cap = CAP;
  ctx.map = key_map(1u, 0u);
  const float theta0 = theta_zero(ctx);

  std::vector<uint64_t> keys(CAP);
  std::vector<double> prefix(T, 0.0);
  std::vector<float> before(T, theta0);
  uint32_t k_adm = 0;
  for (int pass = a.async_mode ? 0 : 1; pass < 2; ++pass) {
    const bool hist = pass == 0;
    const void* values = hist ? a.history : a.survival;
    const ScheduleFloat dtype = hist ? a.history_dtype : a.survival_dtype;
    const int64_t sr = hist ? a.stride_hr : a.stride_sr, sj = hist ? a.stride_hj : a.stride_sj;
    uint32_t lo = 0xFFFFFFFFu, hi = 0;
    for (int l = 0; l < CAP; ++l) {
      const uint32_t h = lane_hi(a, values, dtype, sr, sj, l);
      keys[l] = h;
      if (h != kNegInfHi) { lo = std::min(lo, h); hi = std::max(hi, h); }
    }
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
    if (a.async_mode) continue;
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
    a.survival_dtype = (ScheduleFloat)ri();
    a.history_dtype = (ScheduleFloat)ri();
    a.sps_dtype = (ScheduleFloat)ri();
    a.sps_len = ri();
    const bool has_ml = ri() != 0;
    a.max_len_int64 = ri() != 0;
    const bool has_act = ri() != 0;
    const int64_t R = a.num_req, G = a.gamma;
    const auto surv = read_floats(a.survival_dtype, R, G);
    a.survival = surv.data();
    a.stride_sr = transposed ? 1 : G;
    a.stride_sj = transposed ? R : 1;
    std::vector<unsigned char> hist;
    if (a.async_mode) {
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
"""

_SV_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def sv_host_exe(tmp_path_factory):
    return _build_host_program(tmp_path_factory, "sv_host_math", _SV_HOST_PROGRAM)


def _sv_bits(t: torch.Tensor) -> str:
    """Raw element bits as unsigned integers (exact for every float dtype)."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    mask = (1 << (8 * t.element_size())) - 1
    return " ".join(str(v & mask) for v in t.contiguous().view(int_dtype).reshape(-1).tolist())


def _sv_values(g: torch.Generator, R: int, G: int) -> torch.Tensor:
    """[R, G] survival-like values: cumulative products, coarse ties and zeros, unsorted rows, constants."""
    kind = int(torch.randint(0, 6, (1,), generator=g))
    if kind == 0:  # cumulative product of confidences (the real input)
        return torch.cumprod(0.3 + 0.7 * torch.rand(R, G, generator=g), 1)
    if kind == 1:  # multiples of 1/8, many exact ties across requests, zeros (some -0.0: ties +0.0)
        v = torch.cumprod(torch.randint(0, 9, (R, G), generator=g).float() / 8, 1)
        return torch.where((v == 0) & (torch.rand(R, G, generator=g) < 0.5), -v, v)
    if kind == 2:  # not monotone, a few values outside [0, 1] (the op rejects both on CPU; keys must still order them)
        return torch.rand(R, G, generator=g) * 1.25 - 0.125
    if kind == 3:  # every request identical: ties broken by flat index only
        return torch.cumprod(0.5 + 0.5 * torch.rand(1, G, generator=g), 1).expand(R, G).clone()
    if kind == 4:
        return torch.full((R, G), float(torch.randint(0, 3, (1,), generator=g)) / 2)
    return torch.cumprod(torch.rand(R, G, generator=g) ** 0.25, 1)  # long tails of tiny values


def _sv_sps(g: torch.Generator, length: int) -> torch.Tensor:
    kind = int(torch.randint(0, 6, (1,), generator=g))
    b = torch.arange(length, dtype=torch.float32)
    if kind == 0:  # flat: theta rises iff the gain is positive
        sps = torch.ones(length)
    elif kind == 1:  # jagged
        sps = 0.2 + torch.rand(length, generator=g)
    elif kind == 2:  # the paper's shape: falling with the batch
        sps = 1.0 / (1.0 + 0.05 * b * float(torch.rand(1, generator=g)))
    elif kind == 3:  # staircase with exact ties and zeros
        sps = torch.randint(0, 4, (length,), generator=g).float() / 4
    elif kind == 4:  # falling fast: short schedules
        sps = 1.0 / (1.0 + b) ** 2
    else:  # NaN somewhere: torch.argmax's NaN rule, comparisons with NaN never rise
        sps = 0.5 + torch.rand(length, generator=g)
        sps[torch.randint(0, length, (max(1, length // 50),), generator=g)] = float("nan")
    sps[0] = 0.0
    return sps


def _sv_case(g: torch.Generator, R: int, G: int):
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    mode = "async" if ri(0, 1) else "causal"
    dtypes = [torch.float32] * 5 + [torch.float16, torch.bfloat16, torch.float64]
    sdt = dtypes[ri(0, len(dtypes) - 1)]
    hdt = dtypes[ri(0, len(dtypes) - 1)]
    surv = _sv_values(g, R, G).to(sdt)
    hist = None
    if mode == "async":
        which = ri(0, 2)
        hist = surv.to(hdt) if which == 0 else _sv_values(g, R, G).to(hdt)
        if which == 2:  # the current survival, a little perturbed
            hist = (surv.float() * (0.9 + 0.2 * torch.rand(R, G, generator=g))).clamp(0, 1).to(hdt)
    need = R * (G + 1) + 1
    sps_len = need if ri(0, 3) else (ri(1, need) if ri(0, 1) else need + ri(1, 40))  # short tables clamp
    sps = _sv_sps(g, sps_len).to(torch.float64 if ri(0, 4) == 0 else torch.float32)
    max_len = None
    if ri(0, 1):
        max_len = torch.randint(-2, G + 3, (R,), generator=g).to(torch.int64 if ri(0, 1) else torch.int32)
    active = None
    if ri(0, 1):
        active = torch.rand(R, generator=g) < (0.0 if ri(0, 9) == 0 else 0.8)
    return _sv_encode((surv, sps, mode, hist, max_len, active), transposed=ri(0, 1) == 1)


def _sv_encode(args, transposed=False):
    """Host program input for reference arguments (survival, sps, mode, history, max_len, active)."""
    surv, sps, mode, hist, max_len, active = args
    R, G = surv.shape
    head = ["SV", str(int(mode == "async")), str(R), str(G), str(int(transposed)), str(_SV_DTYPES[surv.dtype]),
            str(_SV_DTYPES[hist.dtype if hist is not None else surv.dtype]), str(_SV_DTYPES[sps.dtype]),
            str(sps.shape[0]), str(int(max_len is not None)),
            str(int(max_len is not None and max_len.dtype == torch.int64)), str(int(active is not None))]
    parts = head + [_sv_bits(surv.t() if transposed else surv)]
    if mode == "async":
        parts.append(_sv_bits(hist))
    parts.append(_sv_bits(sps))
    if max_len is not None:
        parts.append(" ".join(str(int(v)) for v in max_len.tolist()))
    if active is not None:
        parts.append(" ".join(str(int(v)) for v in active.tolist()))
    return args, " ".join(p for p in parts if p)


def test_schedule_verify_host_emulation_matches_reference(sv_host_exe):
    g = torch.Generator().manual_seed(2026)
    shapes = []
    for i in range(2500):
        R = 1 if i % 5 == 0 else int(torch.randint(1, 10 if i % 3 else 80, (1,), generator=g))
        shapes.append((R, int(torch.randint(1, 17, (1,), generator=g))))
    # Every block shape, its boundaries, R = 1 and R = 1024, the largest batch, and empty ones.
    shapes += [(1, 1), (1, 16), (64, 16), (65, 16), (256, 16), (257, 16), (512, 8), (512, 16), (513, 16),
               (1024, 8), (1024, 16), (1024, 16), (1024, 16), (16384, 1), (8192, 2), (700, 11), (3, 0),
               (2000, 0), (0, 5)]
    cases = [_sv_case(g, R, G) for R, G in shapes]
    # The paper's appendix A: causal verifies the anchor only, async both drafts.
    paper = (torch.tensor([[0.8, 0.72]]), torch.tensor([0.0, 1.0, 0.5, 0.45]))
    cases += [_sv_encode((*paper, "causal", None, None, None)), _sv_encode((*paper, "async", paper[0], None, None))]
    lines = _run(sv_host_exe, [c[1] for c in cases])
    assert len(lines) == len(cases)
    mismatches = []
    configs = set()
    for i, ((args, _), line) in enumerate(zip(cases, lines)):
        lengths, cu, total, expected = reference_schedule_verify(*args)
        R = args[0].shape[0]
        vals = [int(v) for v in line.split()]
        configs.add(vals[-1])
        host_len, host_cu = vals[:R], vals[R: 2 * R + 1]
        host_total, host_exp_bits = vals[2 * R + 1], vals[2 * R + 2]
        want_bits = struct.unpack("<I", struct.pack("<f", float(expected)))[0]
        got = (host_len, host_cu, host_total)
        want = (lengths.tolist(), cu.tolist(), int(total))
        host_exp = struct.unpack("<f", struct.pack("<I", host_exp_bits))[0]
        same_exp = host_exp_bits == want_bits or (math.isnan(host_exp) and math.isnan(float(expected)))
        if got != want or not same_exp:
            mismatches.append((i, args[0].shape, args[2], want, got, want_bits, host_exp_bits))
    assert not mismatches, f"{len(mismatches)} of {len(cases)} cases differ, first: {mismatches[0]}"
    assert configs == {0, 1, 2, 3}, f"not every block shape ran: {sorted(configs)}"
