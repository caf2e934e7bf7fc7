// Element type of a floating-point kernel input, shared by the torch-free
// launcher headers (markov_draft.h, rejection_sample.h, schedule_verify.h)
// and set by torch_bindings.cpp from the tensor dtype. Each launcher reads
// only some of these types (its header says which); the torch launcher
// rejects the others before a pointer is reinterpreted.
#pragma once

namespace dspark {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace dspark
