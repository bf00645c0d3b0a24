// A non-owning view of a tensor: data pointer, dtype, device, shape and strides (in elements).
// Views are cheap to copy; whoever made the memory owns it and must outlive the view.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "base/dtype.h"
#include "base/quant.h"
#include "base/status.h"

namespace ferry {

enum class Device : uint8_t { kCpu, kCuda };

inline constexpr int kMaxDims = 4;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kCpu;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};
  std::array<int64_t, kMaxDims> strides{};  // in elements
  // A group-wise quantized matrix (base/quant.h): data is its region (dtype kU8, shape the
  // matrix's [rows, cols]); nullopt for plain tensors.
  std::optional<QuantFormat> quant;

  // A contiguous (row-major) view.
  static TensorView Contiguous(void* data, DType dtype, std::initializer_list<int64_t> shape,
                               Device device = Device::kCpu) {
    TensorView v;
    v.data = data;
    v.dtype = dtype;
    v.device = device;
    v.ndim = static_cast<int>(shape.size());
    FERRY_CHECK(v.ndim <= kMaxDims);
    int i = 0;
    for (int64_t d : shape) v.shape[i++] = d;
    int64_t stride = 1;
    for (int d = v.ndim - 1; d >= 0; --d) {
      v.strides[d] = stride;
      stride *= v.shape[d];
    }
    return v;
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= shape[d];
    return n;
  }
  size_t bytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype); }
  int64_t dim(int d) const { return shape[d < 0 ? d + ndim : d]; }
  bool is_contiguous() const {
    int64_t stride = 1;
    for (int d = ndim - 1; d >= 0; --d) {
      if (shape[d] != 1 && strides[d] != stride) return false;
      stride *= shape[d];
    }
    return true;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data);
  }
  // Rows [begin, end) of the first dimension (keeps the other dims).
  TensorView Rows(int64_t begin, int64_t end) const {
    TensorView v = *this;
    v.data = static_cast<char*>(data) + begin * strides[0] * static_cast<int64_t>(DTypeSize(dtype));
    v.shape[0] = end - begin;
    return v;
  }
  std::string ShapeString() const {
    std::string s = "[";
    for (int d = 0; d < ndim; ++d) s += (d ? ", " : "") + std::to_string(shape[d]);
    return s + "]";
  }
};

}  // namespace ferry
