// philox_uniform: out[r, i] = uniform(seed[r], *offset, stream, position, i).
// The smallest op that runs the shared RNG on the GPU; tests compare its bits
// with the reference and Triton paths. No torch in this file: the launcher in
// torch_bindings.cpp checks tensors and passes the stream.
#include <cuda_runtime.h>

#include <cstdint>

#include "philox.cuh"
#include "philox_uniform.h"

namespace dspark {
namespace {

// One thread makes four uniforms from one Philox call: 256 threads x 4 = 1024
// outputs per block, enough to fill a row of 1e5 with ~100 blocks.
constexpr int kThreads = 256;

__global__ void philox_uniform_kernel(const int64_t* __restrict__ seed,
                                      const int64_t* __restrict__ offset, uint32_t stream,
                                      uint32_t position, int64_t n, float* __restrict__ out) {
  const int64_t row = blockIdx.y;
  const int64_t i4 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t base = i4 * 4;
  if (base >= n) return;
  const Philox4 r = philox_block(static_cast<uint64_t>(seed[row]), static_cast<uint64_t>(*offset),
                                 stream, position, static_cast<uint32_t>(i4));
  const uint32_t lanes[4] = {r.x, r.y, r.z, r.w};
  float* dst = out + row * n;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (base + k < n) dst[base + k] = bits_to_uniform(lanes[k]);
  }
}

}  // namespace

cudaError_t philox_uniform_launch(const int64_t* seed, const int64_t* offset, uint32_t stream,
                                  uint32_t position, int64_t rows, int64_t n, float* out,
                                  cudaStream_t cuda_stream) {
  // rows is grid.y; n / 4 must fit the 32-bit Philox block counter.
  if (rows < 0 || rows >= 65536 || n < 0 || n >= (int64_t{1} << 34)) return cudaErrorInvalidValue;
  if (rows == 0 || n == 0) return cudaSuccess;
  const int64_t groups = (n + 3) / 4;
  const dim3 grid(static_cast<unsigned>((groups + kThreads - 1) / kThreads),
                  static_cast<unsigned>(rows));
  philox_uniform_kernel<<<grid, kThreads, 0, cuda_stream>>>(seed, offset, stream, position, n,
                                                            out);
  return cudaGetLastError();
}

}  // namespace dspark
