#include "io/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <limits>

#include "absl/strings/str_cat.h"
#include "base/status.h"
#include "nlohmann/json.hpp"

namespace ferry::io {
namespace {

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the safetensors spec's limit

absl::Status Corrupt(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": corrupt safetensors: ", what));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  FERRY_ASSIGN_OR_RETURN(file->fd_, ScopedFd::OpenForRead(path));
  FERRY_ASSIGN_OR_RETURN(const uint64_t size, FileSize(file->fd_.get(), path));
  if (size < 8) return Corrupt(path, absl::StrCat("file is ", size, " bytes, shorter than the 8-byte header length"));
  uint8_t len_bytes[8];
  FERRY_RETURN_IF_ERROR(PreadFull(file->fd_.get(), len_bytes, 8, 0, path));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];
  if (header_len > kMaxHeaderBytes) return Corrupt(path, absl::StrCat("header length ", header_len, " exceeds 100 MiB"));
  if (header_len > size - 8) {
    return Corrupt(path, absl::StrCat("header length ", header_len, " runs past the end of the ", size, "-byte file"));
  }
  std::string header(header_len, '\0');
  FERRY_RETURN_IF_ERROR(PreadFull(file->fd_.get(), header.data(), header_len, 8, path));
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;

  nlohmann::json j = nlohmann::json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Corrupt(path, "header is not a JSON object");

  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const std::string& name = it.key();
    const nlohmann::json& e = it.value();
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets") ||
        !e["dtype"].is_string() || !e["shape"].is_array() || !e["data_offsets"].is_array() ||
        e["data_offsets"].size() != 2) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\" needs dtype, shape and two data_offsets"));
    }
    TensorInfo info;
    info.name = name;
    auto dtype = ParseSafetensorsDType(e["dtype"].get<std::string>());
    if (!dtype.ok()) return Corrupt(path, absl::StrCat("tensor \"", name, "\": ", dtype.status().message()));
    info.dtype = *dtype;
    uint64_t numel = 1;
    for (const auto& d : e["shape"]) {
      if (!d.is_number_unsigned()) return Corrupt(path, absl::StrCat("tensor \"", name, "\" has a bad shape"));
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > (std::numeric_limits<uint64_t>::max() / 16) / dim) {
        return Corrupt(path, absl::StrCat("tensor \"", name, "\" shape overflows"));
      }
      numel *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    const auto& off = e["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\" has non-integer data_offsets"));
    }
    const uint64_t begin = off[0].get<uint64_t>(), end = off[1].get<uint64_t>();
    if (begin > end || end > data_size) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\" data_offsets [", begin, ", ", end,
                                        ") out of range of the ", data_size, "-byte data section"));
    }
    if (end - begin != numel * DTypeSize(info.dtype)) {
      return Corrupt(path, absl::StrCat("tensor \"", name, "\" has ", end - begin, " bytes but ",
                                        DTypeName(info.dtype), " x ", numel, " elements needs ",
                                        numel * DTypeSize(info.dtype)));
    }
    info.offset = data_start + begin;
    info.bytes = end - begin;
    ranges.emplace_back(begin, end);
    file->tensors_.emplace(name, std::move(info));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) {
      return Corrupt(path, absl::StrCat("tensor byte ranges overlap at offset ", ranges[i].first));
    }
  }
  return file;
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::Status SafetensorsFile::Read(const TensorInfo& info, void* dst, size_t dst_bytes) const {
  if (dst_bytes != info.bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("tensor \"", info.name, "\" is ", info.bytes, " bytes, buffer is ", dst_bytes));
  }
  return PreadFull(fd_.get(), dst, dst_bytes, info.offset, path_);
}

absl::Status SafetensorsFile::ReadRange(const TensorInfo& info, uint64_t begin, void* dst, size_t n) const {
  if (begin > info.bytes || n > info.bytes - begin) {
    return absl::OutOfRangeError(absl::StrCat("tensor \"", info.name, "\": bytes [", begin, ", ", begin + n,
                                              ") outside its ", info.bytes));
  }
  return PreadFull(fd_.get(), dst, n, info.offset + begin, path_);
}

absl::StatusOr<Checkpoint> Checkpoint::Open(const std::string& dir) {
  Checkpoint ckpt;
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single_path = dir + "/model.safetensors";
  if (PathExists(index_path)) {
    FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
      return absl::DataLossError(absl::StrCat(index_path, ": not JSON with a \"weight_map\" object"));
    }
    std::map<std::string, const SafetensorsFile*> shard_by_name;
    for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
      if (!it.value().is_string()) return absl::DataLossError(absl::StrCat(index_path, ": weight_map values must be file names"));
      const std::string shard = it.value().get<std::string>();
      if (shard.find('/') != std::string::npos) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": shard name \"", shard, "\" must be a plain file name"));
      }
      auto found = shard_by_name.find(shard);
      if (found == shard_by_name.end()) {
        const std::string shard_path = dir + "/" + shard;
        auto file = SafetensorsFile::Open(shard_path);
        if (absl::IsNotFound(file.status())) {
          return absl::NotFoundError(absl::StrCat("missing shard ", shard_path, " (named by ", index_path, ")"));
        }
        if (!file.ok()) return file.status();
        found = shard_by_name.emplace(shard, file->get()).first;
        ckpt.files_.push_back(std::move(*file));
      }
      if (found->second->Find(it.key()) == nullptr) {
        return absl::DataLossError(absl::StrCat(index_path, " places \"", it.key(), "\" in ", shard, " but it is not there"));
      }
      ckpt.where_[it.key()] = found->second;
    }
  } else if (PathExists(single_path)) {
    FERRY_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path));
    for (const auto& [name, info] : file->tensors()) ckpt.where_[name] = file.get();
    ckpt.files_.push_back(std::move(file));
  } else {
    return absl::NotFoundError(absl::StrCat("no model.safetensors or model.safetensors.index.json in ", dir));
  }
  return ckpt;
}

const TensorInfo* Checkpoint::Find(const std::string& name) const {
  auto it = where_.find(name);
  return it == where_.end() ? nullptr : it->second->Find(name);
}

absl::Status Checkpoint::Read(const std::string& name, void* dst, size_t dst_bytes) const {
  auto it = where_.find(name);
  if (it == where_.end()) return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" is not in the checkpoint"));
  return it->second->Read(*it->second->Find(name), dst, dst_bytes);
}

absl::Status Checkpoint::ReadRange(const std::string& name, uint64_t begin, void* dst, size_t n) const {
  auto it = where_.find(name);
  if (it == where_.end()) return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" is not in the checkpoint"));
  return it->second->ReadRange(*it->second->Find(name), begin, dst, n);
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t bytes = DTypeSize(t.dtype);
    for (int64_t d : t.shape) bytes *= static_cast<uint64_t>(d);
    header[t.name] = {{"dtype", DTypeName(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h += ' ';
  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) return absl::PermissionDeniedError(absl::StrCat("cannot write ", tmp));
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>((static_cast<uint64_t>(h.size()) >> (8 * i)) & 0xff);
  bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
  for (const auto& t : tensors) {
    uint64_t bytes = DTypeSize(t.dtype);
    for (int64_t d : t.shape) bytes *= static_cast<uint64_t>(d);
    ok = ok && std::fwrite(t.data, 1, bytes, f) == bytes;
  }
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) return absl::DataLossError(absl::StrCat("error writing ", tmp));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("rename ", tmp));
  return absl::OkStatus();
}

std::vector<std::string> Checkpoint::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, file] : where_) names.push_back(name);
  return names;
}

}  // namespace ferry::io
