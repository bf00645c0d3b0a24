// io_uring reads against pread on a real file: every queue depth and block size, registered and
// plain buffers, and injected short reads, EAGAIN/EINTR and I/O errors on real completions.
#include "io/uring_reader.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "gtest/gtest.h"
#include "test_util.h"

namespace ferry::io {
namespace {

struct AlignedBuffer {
  explicit AlignedBuffer(size_t n) : bytes(n), data(static_cast<char*>(std::aligned_alloc(kDirectAlignment, n))) {}
  ~AlignedBuffer() { std::free(data); }
  size_t bytes;
  char* data;
};

class UringReaderTest : public ::testing::Test {
 protected:
  void SetUp() override {
    content_.resize(3 * (1 << 20) + 5 * kDirectAlignment);
    std::mt19937 rng(11);
    for (auto& c : content_) c = static_cast<char>(rng());
    ferry::testing::WriteFile(dir_.File("data.bin"), content_);
    auto f = ReadFile::Open(dir_.File("data.bin"), true);
    ASSERT_TRUE(f.ok()) << f.status();
    file_ = std::move(*f);
  }
  ferry::testing::TempDir dir_;
  std::string content_;
  ReadFile file_;
};

TEST_F(UringReaderTest, MatchesTheFileForEveryDepthAndBlockSize) {
  AlignedBuffer buf(content_.size());
  for (unsigned qd : {1u, 4u, 32u}) {
    for (size_t block : {size_t{4096}, size_t{65536}, size_t{1} << 20}) {
      for (bool registered : {false, true}) {
        UringOptions o;
        o.queue_depth = qd;
        o.block_bytes = block;
        if (registered) o.registered.push_back({buf.data, buf.bytes});
        auto reader = UringReader::Create(o);
        ASSERT_TRUE(reader.ok()) << reader.status();
        std::memset(buf.data, 0, buf.bytes);
        ASSERT_TRUE((*reader)->Read(file_, 0, buf.data, content_.size()).ok());
        ASSERT_EQ(std::memcmp(buf.data, content_.data(), content_.size()), 0) << qd << " " << block << " " << registered;
        // A range in the middle.
        const uint64_t off = 3 * kDirectAlignment;
        ASSERT_TRUE((*reader)->Read(file_, off, buf.data, 17 * kDirectAlignment).ok());
        ASSERT_EQ(std::memcmp(buf.data, content_.data() + off, 17 * kDirectAlignment), 0);
      }
    }
  }
}

TEST_F(UringReaderTest, ShortReadsAndRetriesStillDeliverEveryByte) {
  AlignedBuffer buf(content_.size());
  int calls = 0;
  UringOptions o;
  o.queue_depth = 8;
  o.block_bytes = 256 << 10;
  o.fault_hook = [&](int res, size_t requested) {
    ++calls;
    if (calls % 5 == 1) return -EAGAIN;
    if (calls % 5 == 2) return -EINTR;
    if (calls % 5 == 3 && res > 8192) return res / 3;  // short, and not block-aligned
    return res;
  };
  auto reader = UringReader::Create(o);
  ASSERT_TRUE(reader.ok());
  ASSERT_TRUE((*reader)->Read(file_, 0, buf.data, content_.size()).ok());
  EXPECT_EQ(std::memcmp(buf.data, content_.data(), content_.size()), 0);
  EXPECT_GT((*reader)->resubmits(), 5u);
}

// Scattered extents (a sparse fetch's pages) in one pipeline, into a registered buffer at their
// natural offsets, with short reads injected: every page arrives, the rest stays untouched.
TEST_F(UringReaderTest, ReadManyDeliversScatteredExtents) {
  AlignedBuffer buf(content_.size());
  std::memset(buf.data, 0x5a, buf.bytes);
  UringOptions o;
  o.queue_depth = 8;
  o.block_bytes = 8 * kDirectAlignment;
  o.registered.push_back({buf.data, buf.bytes});
  int calls = 0;
  o.fault_hook = [&](int res, size_t) { return (++calls % 5 == 0 && res > static_cast<int>(kDirectAlignment)) ? static_cast<int>(kDirectAlignment) : res; };
  auto reader = UringReader::Create(o);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const std::vector<std::pair<size_t, size_t>> pages = {{0, 1}, {3, 40}, {100, 1}, {300, 65}, {700, 5}};  // first page, count
  std::vector<UringReader::ReadExtent> extents;
  for (auto [first, count] : pages) {
    extents.push_back({first * kDirectAlignment, buf.data + first * kDirectAlignment, count * kDirectAlignment});
  }
  ASSERT_TRUE((*reader)->ReadMany(file_, extents).ok());
  std::vector<bool> read(content_.size() / kDirectAlignment + 1, false);
  for (auto [first, count] : pages) {
    for (size_t p = first; p < first + count; ++p) read[p] = true;
  }
  for (size_t i = 0; i < content_.size(); ++i) {
    const char want = read[i / kDirectAlignment] ? content_[i] : static_cast<char>(0x5a);
    ASSERT_EQ(buf.data[i], want) << "byte " << i;
  }
  EXPECT_GT((*reader)->resubmits(), 0u);
  // A bad extent anywhere refuses the whole call before any read.
  extents.push_back({content_.size() + kDirectAlignment, buf.data, kDirectAlignment});
  EXPECT_EQ((*reader)->ReadMany(file_, extents).code(), absl::StatusCode::kDataLoss);
}

TEST_F(UringReaderTest, IoErrorIsReportedAndTheReaderStaysUsable) {
  AlignedBuffer buf(content_.size());
  bool fail = true;
  UringOptions o;
  o.queue_depth = 4;
  o.block_bytes = 64 << 10;
  int calls = 0;
  o.fault_hook = [&](int res, size_t) { return (fail && ++calls == 7) ? -EIO : res; };
  auto reader = UringReader::Create(o);
  const absl::Status s = (*reader)->Read(file_, 0, buf.data, content_.size());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("data.bin"), std::string::npos) << s;
  fail = false;  // the failed read drained its requests: the ring works afterwards
  ASSERT_TRUE((*reader)->Read(file_, 0, buf.data, content_.size()).ok());
  EXPECT_EQ(std::memcmp(buf.data, content_.data(), content_.size()), 0);
}

TEST_F(UringReaderTest, EndOfFileAndMisalignment) {
  AlignedBuffer buf(1 << 20);
  auto reader = UringReader::Create({});
  ASSERT_TRUE(reader.ok());
  const uint64_t end = content_.size();
  EXPECT_EQ((*reader)->Read(file_, end - kDirectAlignment, buf.data, 2 * kDirectAlignment).code(), absl::StatusCode::kDataLoss);
  // A file that shrinks under the reader: completions return 0 -> kDataLoss.
  UringOptions o;
  o.fault_hook = [](int res, size_t) { return 0; };
  auto eof = UringReader::Create(o);
  EXPECT_EQ((*eof)->Read(file_, 0, buf.data, kDirectAlignment).code(), absl::StatusCode::kDataLoss);
  if (file_.direct) {
    EXPECT_EQ((*reader)->Read(file_, 100, buf.data, kDirectAlignment).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ((*reader)->Read(file_, 0, buf.data + 8, kDirectAlignment).code(), absl::StatusCode::kInvalidArgument);
  }
  EXPECT_EQ(UringReader::Create({0, 4096, {}, nullptr}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(UringReader::Create({8, 1000, {}, nullptr}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadFile::Open(dir_.File("missing.bin"), true).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ferry::io
