// base/file.h: whole-file reads and atomic writes, full preads/pwrites, directory creation.
#include "base/file.h"

#include <fcntl.h>
#include <unistd.h>

#include "gtest/gtest.h"
#include "test_util.h"

namespace ferry {
namespace {

TEST(FileTest, MakeDirsCreatesParentsAndAcceptsExisting) {
  ferry::testing::TempDir dir;
  const std::string deep = dir.File("a/b/c");
  EXPECT_FALSE(PathExists(dir.File("a")));
  ASSERT_TRUE(MakeDirs(deep).ok());
  EXPECT_TRUE(PathExists(deep));
  EXPECT_TRUE(MakeDirs(deep).ok());        // already there
  EXPECT_TRUE(MakeDirs(deep + "/").ok());  // trailing slash
  ASSERT_TRUE(WriteFileAtomically(dir.File("a/file"), "x").ok());
  EXPECT_EQ(ReadFileToString(dir.File("a/file")).value(), "x");
  EXPECT_FALSE(MakeDirs(dir.File("a/file")).ok());        // a file in the way
  EXPECT_FALSE(MakeDirs(dir.File("a/file/under")).ok());  // under a file
  EXPECT_EQ(MakeDirs("").code(), absl::StatusCode::kInvalidArgument);
}

TEST(FileTest, FullReadsAndWritesAtOffsets) {
  ferry::testing::TempDir dir;
  const std::string path = dir.File("f");
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  ASSERT_GE(fd, 0);
  const std::string data(10000, 'q');
  ASSERT_TRUE(PwriteFull(fd, data.data(), data.size(), 4096, path).ok());
  EXPECT_EQ(FileSize(fd, path).value(), 14096u);
  std::string back(data.size(), '\0');
  ASSERT_TRUE(PreadFull(fd, back.data(), back.size(), 4096, path).ok());
  EXPECT_EQ(back, data);
  // Past the end: a short read is an error, not a silent partial buffer.
  EXPECT_FALSE(PreadFull(fd, back.data(), back.size(), 8192, path).ok());
  ::close(fd);
}

}  // namespace
}  // namespace ferry
