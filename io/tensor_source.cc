#include "io/tensor_source.h"

#include "base/status.h"

namespace ferry::io {

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string TensorSource::StorageType(const std::string& name) const {
  const TensorInfo* t = Find(name);
  if (t == nullptr) return "?";
  return t->quant ? QuantFormatName(*t->quant) : DTypeName(t->dtype);
}

absl::StatusOr<bool> TensorSource::ReadExactQuantized(const std::string& name, const QuantFormat& f, const QuantLayout& layout,
                                                      uint8_t* out) const {
  const TensorInfo* t = Find(name);
  if (t == nullptr || !t->quant || !(*t->quant == f) || t->bytes != layout.bytes) return false;
  FERRY_RETURN_IF_ERROR(Read(name, out, layout.bytes));
  return true;
}

}  // namespace ferry::io
