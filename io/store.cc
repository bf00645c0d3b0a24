#include "io/store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <memory>

#include "absl/strings/str_cat.h"
#include "base/status.h"
#include "base/json.h"
#include "io/safetensors.h"
#include "nlohmann/json.hpp"

namespace ferry::io {
namespace {

using nlohmann::json;

constexpr const char* kSideFiles[] = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                                      "special_tokens_map.json", "vocab.json", "merges.txt"};

uint64_t AlignUp(uint64_t x) { return (x + kStoreAlignment - 1) / kStoreAlignment * kStoreAlignment; }

absl::Status Corrupt(const std::string& dir, const std::string& what) {
  return absl::DataLossError(absl::StrCat(dir, ": corrupt store: ", what));
}

std::string Hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(v));
  return buf;
}


// dtype size x shape == bytes, without overflowing on a lying shape.
bool BytesOfShapeAre(const std::vector<int64_t>& shape, uint64_t element, uint64_t bytes) {
  if (shape.size() > 8) return false;
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (d == 0) return bytes == 0;
  }
  uint64_t n = element;
  for (int64_t d : shape) {
    if (n > bytes / static_cast<uint64_t>(d)) return false;  // the product would exceed bytes
    n *= static_cast<uint64_t>(d);
  }
  return n == bytes;
}

uint64_t TablesHash(const json& m) {
  const std::string tables = m["tensors"].dump() + m["layers"].dump();
  return XXH3_64bits(tables.data(), tables.size());
}

}  // namespace

uint64_t StoreHash(const void* data, size_t n) { return XXH3_64bits(data, n); }

int LayerOfTensor(const std::string& name) {
  const std::string key = "layers.";
  const size_t at = name.find(key);
  if (at == std::string::npos || (at > 0 && name[at - 1] != '.')) return -1;
  size_t i = at + key.size();
  if (i >= name.size() || !std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  int layer = 0;
  while (i < name.size() && std::isdigit(static_cast<unsigned char>(name[i]))) layer = layer * 10 + (name[i++] - '0');
  return (i < name.size() && name[i] == '.') ? layer : -1;
}

struct StoreWriter::State {
  ScopedFd fd;
  std::string tmp_path;
  std::vector<XXH3_state_t*> hashes;
  std::vector<uint64_t> digests;
  bool finished = false;
  std::vector<std::string> written;  // files Finish put in place (removed if it fails later)
  ~State() {
    for (auto* h : hashes) XXH3_freeState(h);
  }
};

StoreWriter::StoreWriter() = default;
StoreWriter::StoreWriter(StoreWriter&&) noexcept = default;
StoreWriter& StoreWriter::operator=(StoreWriter&&) noexcept = default;
StoreWriter::~StoreWriter() {
  // A writer that did not finish leaves nothing behind that a retry would need room for.
  if (state_ != nullptr && !state_->finished) {
    ::unlink(state_->tmp_path.c_str());
    for (const std::string& f : state_->written) ::unlink(f.c_str());
  }
}

absl::StatusOr<StoreLayout> LayoutStore(std::vector<PlannedTensor> tensors) {
  StoreLayout l;
  std::stable_sort(tensors.begin(), tensors.end(), [](const PlannedTensor& a, const PlannedTensor& b) {
    return LayerOfTensor(a.name) < LayerOfTensor(b.name);
  });
  l.order = std::move(tensors);
  uint64_t offset = 0;
  for (const PlannedTensor& t : l.order) {
    uint64_t bytes = DTypeSize(t.dtype);
    for (int64_t d : t.shape) {
      if (d < 0 || (d > 0 && bytes > UINT64_MAX / static_cast<uint64_t>(d))) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", t.name, "\": its shape is negative or too large"));
      }
      bytes *= static_cast<uint64_t>(d);
    }
    if (t.quant) {
      if (t.shape.size() != 2 || t.dtype != DType::kU8) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", t.name, "\": a quantized tensor is a 2-D U8 region"));
      }
      auto layout = LayoutQuantized(*t.quant, t.shape[0], t.shape[1]);
      if (!layout.ok()) return absl::InvalidArgumentError(absl::StrCat("tensor \"", t.name, "\": ", layout.status().message()));
      bytes = layout->bytes;
    }
    offset = AlignUp(offset);
    l.offsets.push_back(offset);
    l.bytes.push_back(bytes);
    const int layer = LayerOfTensor(t.name);
    if (layer >= 0) {
      if (l.layers.empty() || l.layers.back().index != layer) l.layers.push_back({layer, offset, 0});
      l.layers.back().bytes = AlignUp(offset + bytes) - l.layers.back().offset;
    }
    offset += bytes;
    l.total_bytes += bytes;
  }
  l.data_bytes = AlignUp(offset);
  return l;
}

absl::StatusOr<StoreWriter> StoreWriter::Create(const std::string& out_dir, std::vector<PlannedTensor> tensors) {
  FERRY_ASSIGN_OR_RETURN(StoreLayout layout, LayoutStore(std::move(tensors)));
  FERRY_RETURN_IF_ERROR(MakeDirs(out_dir));
  StoreWriter w;
  w.out_dir_ = out_dir;
  w.order_ = std::move(layout.order);
  w.offsets_ = std::move(layout.offsets);
  w.bytes_ = std::move(layout.bytes);
  w.layers_ = std::move(layout.layers);
  w.total_ = layout.total_bytes;
  w.data_bytes_ = layout.data_bytes;
  w.written_.assign(w.order_.size(), 0);
  w.state_ = std::make_unique<State>();
  w.state_->tmp_path = out_dir + "/weights.bin.tmp";
  int fd = ::open(w.state_->tmp_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat("create ", w.state_->tmp_path));
  w.state_->fd = ScopedFd(fd);
  if (::ftruncate(fd, static_cast<off_t>(w.data_bytes_)) != 0) {
    return absl::ErrnoToStatus(errno, absl::StrCat("resize ", w.state_->tmp_path));
  }
  for (size_t i = 0; i < w.order_.size(); ++i) {
    w.state_->hashes.push_back(XXH3_createState());
    XXH3_64bits_reset(w.state_->hashes.back());
  }
  return w;
}

absl::Status StoreWriter::Write(size_t index, const void* data, size_t n) {
  if (index >= order_.size() || written_[index] + n > bytes_[index]) {
    return absl::InvalidArgumentError("StoreWriter::Write past the tensor's end");
  }
  FERRY_RETURN_IF_ERROR(PwriteFull(state_->fd.get(), data, n, offsets_[index] + written_[index], state_->tmp_path));
  XXH3_64bits_update(state_->hashes[index], data, n);
  written_[index] += n;
  return absl::OkStatus();
}

absl::Status StoreWriter::Finish(const std::map<std::string, std::string>& side_files) {
  json manifest = {{"format", "ferry-store"}, {"version", 1}, {"alignment", kStoreAlignment},
                   {"data_file", "weights.bin"}, {"data_bytes", data_bytes_}, {"tensors", json::array()},
                   {"layers", json::array()}};
  for (size_t i = 0; i < order_.size(); ++i) {
    const PlannedTensor& t = order_[i];
    if (written_[i] != bytes_[i]) {
      return absl::FailedPreconditionError(absl::StrCat("tensor \"", t.name, "\" got ", written_[i], " of ", bytes_[i], " bytes"));
    }
    const int layer = LayerOfTensor(t.name);
    json shape = t.shape;
    json entry = {{"name", t.name}, {"dtype", DTypeName(t.dtype)}, {"shape", shape},
                  {"offset", offsets_[i]}, {"bytes", bytes_[i]}, {"layout", "row-major"},
                  {"layer", layer}, {"xxh3", Hex(XXH3_64bits_digest(state_->hashes[i]))}};
    if (!t.role.empty()) entry["role"] = t.role;
    if (t.quant) entry["quant"] = QuantFormatName(*t.quant);
    manifest["tensors"].push_back(entry);
  }
  for (const StoreLayer& l : layers_) manifest["layers"].push_back({{"index", l.index}, {"offset", l.offset}, {"bytes", l.bytes}});
  // The tables themselves are checksummed too: a dtype, shape or offset edited afterwards would
  // change what the bytes mean without changing the bytes.
  manifest["manifest_xxh3"] = Hex(TablesHash(manifest));
  if (::fsync(state_->fd.get()) != 0) return absl::ErrnoToStatus(errno, absl::StrCat("fsync ", state_->tmp_path));
  const std::string data_path = out_dir_ + "/weights.bin";
  if (::rename(state_->tmp_path.c_str(), data_path.c_str()) != 0) return absl::ErrnoToStatus(errno, "rename weights.bin");
  state_->written.push_back(data_path);
  for (const auto& [name, text] : side_files) {
    FERRY_RETURN_IF_ERROR(WriteFileAtomically(out_dir_ + "/" + name, text));
    state_->written.push_back(out_dir_ + "/" + name);
  }
  FERRY_RETURN_IF_ERROR(WriteFileAtomically(out_dir_ + "/manifest.json", manifest.dump(1)));
  state_->finished = true;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PlannedTensor>> PlanConversion(const TensorSource& ckpt, const ConvertOptions& options) {
  std::vector<PlannedTensor> planned;
  for (const std::string& name : ckpt.Names()) {
    const TensorInfo* t = ckpt.Find(name);
    PlannedTensor p{name, t->dtype, t->shape, options.role_of ? options.role_of(name) : std::string(), t->quant};
    if (options.quantize && options.quantize_tensor && options.quantize_tensor(name) && !t->quant) {
      if (t->shape.size() != 2 || !(t->dtype == DType::kF32 || t->dtype == DType::kF16 || t->dtype == DType::kBF16)) {
        return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" is not a float matrix; it cannot be quantized"));
      }
      p.dtype = DType::kU8;
      p.quant = options.quantize;
    } else if (t->quant && options.quantize && !(*t->quant == *options.quantize)) {
      return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" is already quantized as ", QuantFormatName(*t->quant),
                                                     "; convert from the float checkpoint to quantize it as ",
                                                     QuantFormatName(*options.quantize)));
    }
    planned.push_back(std::move(p));
  }
  return planned;
}

absl::Status ConvertToStore(const TensorSource& ckpt, const std::map<std::string, std::string>& side_files, const std::string& out_dir,
                            const ConvertOptions& options) {
  FERRY_ASSIGN_OR_RETURN(std::vector<PlannedTensor> planned, PlanConversion(ckpt, options));
  FERRY_ASSIGN_OR_RETURN(StoreWriter writer, StoreWriter::Create(out_dir, std::move(planned)));
  std::vector<char> chunk(std::max<size_t>(options.chunk_bytes, kStoreAlignment));
  uint64_t done = 0;
  for (size_t i = 0; i < writer.order().size(); ++i) {
    const TensorInfo* t = ckpt.Find(writer.order()[i].name);
    const PlannedTensor& p = writer.order()[i];
    if (p.quant && !t->quant) {
      // A matrix quantized now: from the file's own blocks when they are this format, else from
      // its values (whole, in fp32).
      FERRY_ASSIGN_OR_RETURN(const QuantLayout layout, LayoutQuantized(*p.quant, p.shape[0], p.shape[1]));
      std::vector<uint8_t> q(layout.bytes);
      FERRY_ASSIGN_OR_RETURN(const bool exact, ckpt.ReadExactQuantized(t->name, *p.quant, layout, q.data()));
      if (!exact) {
        std::vector<char> raw(t->bytes);
        FERRY_RETURN_IF_ERROR(ckpt.Read(t->name, raw.data(), raw.size()));
        std::vector<float> w(static_cast<size_t>(t->numel()));
        ConvertToF32(t->dtype, raw.data(), w.data(), w.size());
        raw = {};
        QuantizeRows(*p.quant, layout, w.data(), p.shape[0], p.shape[1], q.data());
      }
      std::map<std::string, int>* count = exact ? options.mapped : options.requantized;
      if (count != nullptr) ++(*count)[ckpt.StorageType(t->name)];
      FERRY_RETURN_IF_ERROR(writer.Write(i, q.data(), q.size()));
      done += q.size();
      if (options.progress) options.progress(done, writer.total_bytes());
      continue;
    }
    for (uint64_t begin = 0; begin < t->bytes; begin += chunk.size()) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), t->bytes - begin));
      FERRY_RETURN_IF_ERROR(ckpt.ReadRange(t->name, begin, chunk.data(), n));
      FERRY_RETURN_IF_ERROR(writer.Write(i, chunk.data(), n));
      done += n;
      if (options.progress) options.progress(done, writer.total_bytes());
    }
  }
  return writer.Finish(side_files);
}

absl::Status ConvertToStore(const std::string& model_dir, const std::string& out_dir, const ConvertOptions& options) {
  struct stat a, b;
  if (::stat(model_dir.c_str(), &a) == 0 && ::stat(out_dir.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
    return absl::InvalidArgumentError(absl::StrCat(out_dir, " is the model directory itself; convert into a new directory"));
  }
  FERRY_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open(model_dir));
  if (!PathExists(model_dir + "/config.json")) return absl::NotFoundError(absl::StrCat("no config.json in ", model_dir));
  std::map<std::string, std::string> side;
  for (const char* name : kSideFiles) {
    const std::string src = model_dir + "/" + name;
    if (!PathExists(src)) continue;
    FERRY_ASSIGN_OR_RETURN(side[name], ReadFileToString(src));
  }
  return ConvertToStore(ckpt, side, out_dir, options);
}

absl::StatusOr<Store> Store::Open(const std::string& dir) {
  Store s;
  s.dir_ = dir;
  const std::string manifest_path = dir + "/manifest.json";
  FERRY_ASSIGN_OR_RETURN(std::string text, ReadFileToString(manifest_path));
  if (JsonDepth(text) > 16) return Corrupt(dir, "manifest.json is nested too deeply");
  json m = json::parse(text, nullptr, false);
  if (m.is_discarded() || !m.is_object()) return Corrupt(dir, "manifest.json is not JSON");
  if (!m.contains("format") || m["format"] != "ferry-store") return Corrupt(dir, "manifest.json is not a ferry store manifest");
  if (!m.contains("version") || !m["version"].is_number_integer() || m["version"] != 1) {
    return absl::InvalidArgumentError(absl::StrCat(dir, ": store version ", m.contains("version") ? m["version"].dump() : "(none)",
                                                   " is not supported"));
  }
  if (!m.contains("tensors") || !m["tensors"].is_array() || !m.contains("data_bytes") || !m["data_bytes"].is_number_unsigned()) {
    return Corrupt(dir, "manifest.json lacks tensors or data_bytes");
  }
  if (m.contains("manifest_xxh3")) {  // stores written before it have none
    if (!m["manifest_xxh3"].is_string() || !m.contains("layers") ||
        m["manifest_xxh3"].get<std::string>() != Hex(TablesHash(m))) {
      return Corrupt(dir, "manifest.json's tables were changed after the store was written (manifest checksum mismatch)");
    }
  }
  // A store is untrusted input: its data file is a plain name inside the store's directory.
  std::string data_file = "weights.bin";
  if (m.contains("data_file")) {
    if (!m["data_file"].is_string()) return Corrupt(dir, "data_file must be a string");
    data_file = m["data_file"].get<std::string>();
    if (data_file.empty() || data_file.find('/') != std::string::npos || data_file == "." || data_file == "..") {
      return Corrupt(dir, absl::StrCat("data_file \"", data_file, "\" is not a file name inside the store"));
    }
  }
  s.data_path_ = dir + "/" + data_file;
  s.data_bytes_ = m["data_bytes"].get<uint64_t>();
  FERRY_ASSIGN_OR_RETURN(s.fd_, ScopedFd::OpenForRead(s.data_path_));
  FERRY_ASSIGN_OR_RETURN(const uint64_t size, FileSize(s.fd_.get(), s.data_path_));
  if (size < s.data_bytes_) {
    return Corrupt(dir, absl::StrCat("weights.bin is truncated: ", size, " bytes of ", s.data_bytes_));
  }
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& t : m["tensors"]) {
    StoreTensor st;
    try {
      st.info.name = t.at("name").get<std::string>();
      auto dtype = ParseSafetensorsDType(t.at("dtype").get<std::string>());
      if (!dtype.ok()) return Corrupt(dir, std::string(dtype.status().message()));
      st.info.dtype = *dtype;
      st.info.shape = t.at("shape").get<std::vector<int64_t>>();
      st.info.offset = t.at("offset").get<uint64_t>();
      st.info.bytes = t.at("bytes").get<uint64_t>();
      st.layer = t.at("layer").get<int>();
      if (st.layer < -1) return Corrupt(dir, "a tensor's layer must be >= -1");
      st.layout = t.at("layout").get<std::string>();
      st.xxh3 = std::stoull(t.at("xxh3").get<std::string>(), nullptr, 16);
      if (t.contains("role")) st.role = t.at("role").get<std::string>();
      if (t.contains("quant")) {
        auto q = ParseQuantFormatName(t.at("quant").get<std::string>());
        if (!q.ok()) return Corrupt(dir, absl::StrCat("tensor \"", st.info.name, "\": ", q.status().message()));
        st.info.quant = *q;
      }
    } catch (const std::exception& e) {
      return Corrupt(dir, absl::StrCat("bad tensor entry in manifest.json: ", e.what()));
    }
    const auto& i = st.info;
    for (int64_t d : i.shape) {
      if (d < 0) return Corrupt(dir, absl::StrCat("tensor \"", i.name, "\" has a negative dimension"));
    }
    if (i.quant) {
      if (i.shape.size() != 2 || i.dtype != DType::kU8) {
        return Corrupt(dir, absl::StrCat("quantized tensor \"", i.name, "\" must be a 2-D U8 region"));
      }
      auto layout = LayoutQuantized(*i.quant, i.shape[0], i.shape[1]);
      if (!layout.ok() || layout->bytes != i.bytes) {
        return Corrupt(dir, absl::StrCat("quantized tensor \"", i.name, "\" bytes do not match its format and shape"));
      }
    } else if (!BytesOfShapeAre(i.shape, DTypeSize(i.dtype), i.bytes)) {
      return Corrupt(dir, absl::StrCat("tensor \"", i.name, "\" bytes do not match dtype x shape"));
    }
    if (i.offset % kStoreAlignment != 0) return Corrupt(dir, absl::StrCat("tensor \"", i.name, "\" is not 4 KiB-aligned"));
    if (i.offset > s.data_bytes_ || i.bytes > s.data_bytes_ - i.offset) {
      return Corrupt(dir, absl::StrCat("tensor \"", i.name, "\" lies outside weights.bin"));
    }
    ranges.emplace_back(i.offset, i.offset + i.bytes);
    s.tensors_.emplace(i.name, std::move(st));
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return Corrupt(dir, "tensors overlap in weights.bin");
  }
  if (m.contains("layers")) {
    if (!m["layers"].is_array()) return Corrupt(dir, "layers must be a list");
    for (const auto& l : m["layers"]) {
      if (!l.is_object() || !l.contains("index") || !l["index"].is_number_unsigned() || !l.contains("offset") ||
          !l["offset"].is_number_unsigned() || !l.contains("bytes") || !l["bytes"].is_number_unsigned()) {
        return Corrupt(dir, "each layer needs unsigned index, offset and bytes");
      }
      StoreLayer layer{static_cast<int>(std::min<uint64_t>(l["index"].get<uint64_t>(), 1 << 20)), l["offset"].get<uint64_t>(),
                       l["bytes"].get<uint64_t>()};
      if (layer.index != static_cast<int>(s.layers_.size())) return Corrupt(dir, "the layers table is not 0, 1, 2, ... in order");
      if (layer.offset % kStoreAlignment != 0 || layer.bytes % kStoreAlignment != 0 || layer.offset > s.data_bytes_ ||
          layer.bytes > s.data_bytes_ - layer.offset) {
        return Corrupt(dir, absl::StrCat("layer ", layer.index, " region is misaligned or out of bounds"));
      }
      if (!s.layers_.empty() && layer.offset < s.layers_.back().offset + s.layers_.back().bytes) {
        return Corrupt(dir, absl::StrCat("layer ", layer.index, " region overlaps the one before"));
      }
      s.layers_.push_back(layer);
    }
  }
  // Every tensor of a layer lies inside its region.
  for (const auto& [name, t] : s.tensors_) {
    if (t.layer < 0) continue;
    if (t.layer >= static_cast<int>(s.layers_.size())) return Corrupt(dir, absl::StrCat("tensor \"", name, "\" names layer ", t.layer, " of none"));
    const StoreLayer& r = s.layers_[t.layer];
    if (t.info.offset < r.offset || t.info.offset + t.info.bytes > r.offset + r.bytes) {
      return Corrupt(dir, absl::StrCat("tensor \"", name, "\" lies outside layer ", t.layer, "'s region"));
    }
  }
  return s;
}

const TensorInfo* Store::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second.info;
}

const StoreTensor* Store::FindTensor(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

std::vector<const StoreTensor*> Store::LayerTensors(int layer) const {
  std::vector<const StoreTensor*> out;
  for (const auto& [name, t] : tensors_) {
    if (t.layer == layer) out.push_back(&t);
  }
  std::sort(out.begin(), out.end(), [](const StoreTensor* a, const StoreTensor* b) { return a->info.offset < b->info.offset; });
  return out;
}

absl::Status Store::Read(const std::string& name, void* dst, size_t dst_bytes) const {
  const StoreTensor* t = FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" is not in the store ", dir_));
  if (dst_bytes != t->info.bytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor \"", name, "\" is ", t->info.bytes, " bytes, buffer is ", dst_bytes));
  }
  FERRY_RETURN_IF_ERROR(PreadFull(fd_.get(), dst, dst_bytes, t->info.offset, data_path_));
  if (XXH3_64bits(dst, dst_bytes) != t->xxh3) return Corrupt(dir_, absl::StrCat("checksum mismatch in tensor \"", name, "\""));
  return absl::OkStatus();
}

absl::Status Store::ReadRange(const std::string& name, uint64_t begin, void* dst, size_t n) const {
  const StoreTensor* t = FindTensor(name);
  if (t == nullptr) return absl::NotFoundError(absl::StrCat("tensor \"", name, "\" is not in the store ", dir_));
  if (begin > t->info.bytes || n > t->info.bytes - begin) return absl::OutOfRangeError("ReadRange outside the tensor");
  return PreadFull(fd_.get(), dst, n, t->info.offset + begin, data_path_);
}

std::vector<std::string> Store::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, t] : tensors_) names.push_back(name);
  return names;
}

absl::Status Store::Verify(const std::function<void(uint64_t, uint64_t)>& progress) const {
  uint64_t total = 0, done = 0;
  for (const auto& [name, t] : tensors_) total += t.info.bytes;
  std::vector<char> chunk(64 << 20);
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> state(XXH3_createState(), &XXH3_freeState);
  for (const auto& [name, t] : tensors_) {
    XXH3_64bits_reset(state.get());
    for (uint64_t begin = 0; begin < t.info.bytes; begin += chunk.size()) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(chunk.size(), t.info.bytes - begin));
      FERRY_RETURN_IF_ERROR(PreadFull(fd_.get(), chunk.data(), n, t.info.offset + begin, data_path_));
      XXH3_64bits_update(state.get(), chunk.data(), n);
      done += n;
      if (progress) progress(done, total);
    }
    if (XXH3_64bits_digest(state.get()) != t.xxh3) return Corrupt(dir_, absl::StrCat("checksum mismatch in tensor \"", name, "\""));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<TensorSource>> OpenTensorSource(const std::string& dir) {
  if (PathExists(dir + "/manifest.json")) {
    FERRY_ASSIGN_OR_RETURN(Store store, Store::Open(dir));
    return std::unique_ptr<TensorSource>(new Store(std::move(store)));
  }
  FERRY_ASSIGN_OR_RETURN(Checkpoint ckpt, Checkpoint::Open(dir));
  return std::unique_ptr<TensorSource>(new Checkpoint(std::move(ckpt)));
}

}  // namespace ferry::io
