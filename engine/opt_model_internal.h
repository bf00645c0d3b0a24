// Helpers shared by the parts of OptModel (opt_model.cc: loading and the forward pass;
// opt_model_offload.cc: offloaded loading, the plan and the sparse FFN's bundles).
#pragma once

#include <string>
#include <vector>

#include "base/tensor.h"
#include "engine/opt_config.h"
#include "io/tensor_source.h"

namespace ferry::engine {

// The six layer matrices, in the order of OptModel's views.
inline constexpr const char* kMatrixNames[6] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.out_proj", "fc1", "fc2"};
// "model.decoder." or "decoder.", as the checkpoint names its tensors.
std::string DecoderPrefix(const io::TensorSource& src);
// Shape of matrix i (kMatrixNames' order).
std::vector<int64_t> MatrixShape(const OptConfig& c, int i);
// A contiguous view of `shape` at data.
TensorView MakeView(void* data, DType dtype, const std::vector<int64_t>& shape, Device device);

}  // namespace ferry::engine
