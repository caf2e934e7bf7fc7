// Torch-free launcher of csrc/philox_uniform.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dspark {

// seed[rows], offset[1] (device, int64); out[rows, n] fp32 row-major.
// rows < 65536 (grid.y); n < 2^34 (32-bit Philox block counter); returns
// cudaErrorInvalidValue otherwise.
cudaError_t philox_uniform_launch(const int64_t* seed, const int64_t* offset, uint32_t stream,
                                  uint32_t position, int64_t rows, int64_t n, float* out,
                                  cudaStream_t cuda_stream);

}  // namespace dspark
