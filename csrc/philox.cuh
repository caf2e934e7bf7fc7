// Philox-4x32-10, bit-identical to dspark_kernels/rng.py (key/counter layout
// documented there). Header-only and free of torch so that the ahead-of-time
// extension and a plain nvcc compile share it. The constants below are those
// of dspark_kernels/constants.py (tests/test_constants.py checks that they agree).
#pragma once

#include <cstdint>

namespace dspark {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr uint32_t kUniformShift = 9;
constexpr float kUniformScale = 5.9604644775390625e-08f;  // 2^-24

// Stream ids (STREAM_* of dspark_kernels/constants.py).
enum Stream : uint32_t {
  kStreamDraft = 1,
  kStreamAccept = 2,
  kStreamResidual = 3,
  kStreamBonus = 4,
  kStreamTreeAccept = 5,
  kStreamTreeResidual = 6,
};

struct Philox4 {
  uint32_t x, y, z, w;
};

__host__ __device__ __forceinline__ Philox4 philox4x32_10(uint32_t c0, uint32_t c1,
                                                          uint32_t c2, uint32_t c3,
                                                          uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{c0, c1, c2, c3};
}

// (2 * (bits >> 9) + 1) * 2^-24: exact in fp32, strictly inside (0, 1).
__host__ __device__ __forceinline__ float bits_to_uniform(uint32_t bits) {
  return static_cast<float>(((bits >> kUniformShift) << 1) | 1u) * kUniformScale;
}

// Four consecutive uniforms index4*4 .. index4*4+3 of one (seed, offset, stream, position).
__host__ __device__ __forceinline__ Philox4 philox_block(uint64_t seed, uint64_t offset,
                                                         uint32_t stream, uint32_t position,
                                                         uint32_t index4) {
  return philox4x32_10(index4, (position & 0xFFFFu) | (stream << 16),
                       static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32),
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

__host__ __device__ __forceinline__ float uniform(uint64_t seed, uint64_t offset, uint32_t stream,
                                                  uint32_t position, uint64_t index) {
  const Philox4 r = philox_block(seed, offset, stream, position, static_cast<uint32_t>(index >> 2));
  const uint32_t lane = static_cast<uint32_t>(index & 3);
  const uint32_t bits = lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
  return bits_to_uniform(bits);
}

}  // namespace dspark
