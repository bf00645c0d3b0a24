// The fixture of the CUDA twin tests: a CUDA backend and a CPU backend, uploads, NaN-poisoned
// outputs and the relative error against the CPU twin. Skips (GTEST_SKIP) where no GPU is visible.
#pragma once

#include <cmath>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/cuda/cuda_backend.h"
#include "test_util.h"

namespace ferry::kernels::cuda {

class CudaTwinTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (VisibleDeviceCount() == 0) GTEST_SKIP() << "no CUDA device visible";
    auto b = CudaBackend::Create();
    ASSERT_TRUE(b.ok()) << b.status();
    gpu_ = std::move(*b);
  }

  // Uploads host bytes; returns a device view of the given shape and dtype.
  TensorView Up(const void* host, DType dtype, std::initializer_list<int64_t> shape) {
    TensorView v = TensorView::Contiguous(nullptr, dtype, shape, Device::kCuda);
    auto buf = gpu_->Allocate(v.bytes());
    EXPECT_TRUE(buf.ok());
    EXPECT_TRUE(gpu_->CopyToDevice(buf->data(), host, v.bytes()).ok());
    v.data = buf->data();
    buffers_.push_back(std::move(*buf));
    return v;
  }
  template <typename T>
  TensorView Up(const std::vector<T>& host, DType dtype, std::initializer_list<int64_t> shape) {
    return Up(static_cast<const void*>(host.data()), dtype, shape);
  }
  // A device output poisoned with NaN.
  TensorView Poisoned(std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    std::vector<float> nan(n, NAN);
    return Up(nan, DType::kF32, shape);
  }
  std::vector<float> Down(const TensorView& v) {
    std::vector<float> host(v.numel());
    EXPECT_TRUE(gpu_->CopyToHost(host.data(), v.data, v.bytes()).ok());
    return host;
  }
  static double RelErr(const std::vector<float>& got, const std::vector<float>& ref) {
    double diff = 0, mag = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      if (std::isnan(got[i])) return INFINITY;
      diff = std::max(diff, static_cast<double>(std::abs(got[i] - ref[i])));
      mag = std::max(mag, static_cast<double>(std::abs(ref[i])));
    }
    return diff / std::max(mag, 1e-30);
  }

  std::unique_ptr<CudaBackend> gpu_;
  CpuBackend cpu_;
  std::vector<DeviceBuffer> buffers_;
};

}  // namespace ferry::kernels::cuda
