#include "offload/attention_cache.h"

#include "absl/strings/str_cat.h"

namespace ferry::offload {

TensorView KvView(void* data, const KvType& type, std::initializer_list<int64_t> shape, Device device) {
  TensorView v = TensorView::Contiguous(data, type.dtype, shape, device);
  v.quant = type.quant;
  return v;
}

absl::Status CheckDenseCacheBounds(const std::vector<int32_t>& seq_ids, const std::vector<int32_t>& positions, int rows,
                                   int max_len, const char* cache_name) {
  for (size_t i = 0; i < seq_ids.size(); ++i) {
    if (seq_ids[i] < 0 || seq_ids[i] >= rows || positions[i] >= max_len) {
      return absl::InvalidArgumentError(absl::StrCat("token ", i, " (sequence ", seq_ids[i], ", position ", positions[i],
                                                     ") is outside the ", cache_name, " of ", rows, " x ", max_len));
    }
  }
  return absl::OkStatus();
}

}  // namespace ferry::offload
