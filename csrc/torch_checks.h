// Tensor checks of the torch launchers (csrc/torch_bindings.cpp, the only
// file that includes this header; it needs torch).
//
// The launchers back internal ops (dspark::*_cuda) that only the Python layer
// (dspark_kernels/ops/*.py) calls, after it has validated and named every
// argument. What is checked here is only what keeps the kernels inside their
// buffers when an internal op is called with other tensors: the device of
// every pointer the kernels dereference, the dtype a pointer is reinterpreted
// as, and the rank / shape / stride the kernels index with. Size limits of
// the kernels' index arithmetic and grids are checked once, by the torch-free
// launchers (csrc/*.h say which), and come back as a failed launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "float_type.h"

namespace dspark {
namespace checks {

// Result of a torch-free launcher; sizes outside the limits its header
// states come back as cudaErrorInvalidValue.
inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " kernel launch failed: ", cudaGetErrorString(err),
              err == cudaErrorInvalidValue ? " (sizes outside the launcher's limits, see its csrc/*.h)"
                                           : "");
}

// The reference tensor of a launcher: the kernels run on its device.
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
}

// Every other tensor the kernels read or write: on ref's device.
inline void check_device(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), name, " must be a CUDA tensor on ",
              ref.device(), ", got ", t.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-d, got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

// An output the kernels write with unit stride along dimension dim.
inline void check_unit_stride(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.size(dim) <= 1 || t.stride(dim) == 1, name, " must have unit stride in dimension ",
              dim, ", got strides ", t.strides());
}

// Set of FloatTypes a kernel reads, one bit per enumerator.
using FloatTypes = uint32_t;

constexpr FloatTypes float_bit(FloatType t) { return FloatTypes{1} << static_cast<int>(t); }

// What dispatch_float (sampling.cuh) instantiates: rejection_sample, markov_draft.
constexpr FloatTypes kSamplingFloats =
    float_bit(FloatType::kFloat32) | float_bit(FloatType::kFloat16) | float_bit(FloatType::kBFloat16);
// What load_f32 (schedule_verify.h) reads.
constexpr FloatTypes kAnyFloat = kSamplingFloats | float_bit(FloatType::kFloat64);

// The FloatType of t, which must be one of `allowed` (the kernel casts the
// data pointer to that type).
inline FloatType float_type_of(const at::Tensor& t, const char* name, FloatTypes allowed) {
  FloatType type = FloatType::kFloat32;
  bool known = true;
  switch (t.scalar_type()) {
    case at::kFloat:
      type = FloatType::kFloat32;
      break;
    case at::kHalf:
      type = FloatType::kFloat16;
      break;
    case at::kBFloat16:
      type = FloatType::kBFloat16;
      break;
    case at::kDouble:
      type = FloatType::kFloat64;
      break;
    default:
      known = false;
  }
  if (!known || (allowed & float_bit(type)) == 0) {
    std::string names;
    const char* all[] = {"float32", "float16", "bfloat16", "float64"};
    for (int i = 0; i < 4; ++i) {
      if ((allowed & (FloatTypes{1} << i)) == 0) continue;
      if (!names.empty()) names += ", ";
      names += all[i];
    }
    TORCH_CHECK(false, name, " must be one of ", names, "; got ", t.scalar_type());
  }
  return type;
}

// The Philox key and counter base: seed[r] for r < seed.size(0) and *offset,
// both read as int64.
inline void check_philox_state(const at::Tensor& seed, const at::Tensor& offset, const at::Tensor& ref) {
  check_device(seed, ref, "seed");
  check_dtype(seed, at::kLong, "seed");
  check_dim(seed, 1, "seed");
  check_device(offset, ref, "offset");
  check_dtype(offset, at::kLong, "offset");
  TORCH_CHECK(offset.numel() == 1, "offset must have one element, got shape ", offset.sizes());
}

// The reference tensor of a launcher: the kernels run on its device, its
// sizes bound their indices and its data pointer is cast to the returned type.
inline FloatType check_reference(const at::Tensor& t, int64_t dim, const char* name, FloatTypes allowed) {
  check_cuda(t, name);
  check_dim(t, dim, name);
  return float_type_of(t, name, allowed);
}

// The per-request state every sampling kernel reads: temperature[r] and
// seed[r] for r < num_req (the caller converts temperature to contiguous
// fp32), and *offset.
inline void check_sampling_state(const at::Tensor& temperature, const at::Tensor& seed,
                                 const at::Tensor& offset, const at::Tensor& ref, int64_t num_req) {
  check_philox_state(seed, offset, ref);
  check_shape(seed, {num_req}, "seed");
  check_device(temperature, ref, "temperature");
  check_shape(temperature, {num_req}, "temperature");
}

}  // namespace checks
}  // namespace dspark
