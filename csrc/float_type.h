// Element type of a floating-point kernel input, shared by the torch-free
// launcher headers (markov_draft.h, rejection_sample.h) and set by
// torch_bindings.cpp from the tensor dtype.
#pragma once

namespace dspark {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace dspark
