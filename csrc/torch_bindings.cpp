// Thin torch launchers: check tensors, pick the current stream, call the
// torch-free launchers in csrc/*.cu. Schemas are defined in Python
// (dspark_kernels/ops/*.py); this file only adds CUDA implementations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "philox_uniform.h"

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
