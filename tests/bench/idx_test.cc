#include "bench/idx.h"

#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// Idx builds an unsigned-byte IDX file of `dims` filled with 0, 1, 2, ...
std::string Idx(const std::vector<uint32_t>& dims, int64_t data_delta = 0) {
  std::string out = {0, 0, 0x08, static_cast<char>(dims.size())};
  uint64_t count = 1;
  for (uint32_t d : dims) {
    for (int shift : {24, 16, 8, 0})
      out.push_back(static_cast<char>(d >> shift));
    count *= d;
  }
  for (uint64_t i = 0; i < count + data_delta; ++i) {
    out.push_back(static_cast<char>(i % 251));
  }
  return out;
}

std::string Gzip(const std::string& data) {
  z_stream stream{};
  deflateInit2(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 16 + MAX_WBITS, 8,
               Z_DEFAULT_STRATEGY);
  std::string out(deflateBound(&stream, data.size()) + 64, '\0');
  stream.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
  stream.avail_in = data.size();
  stream.next_out = reinterpret_cast<Bytef*>(out.data());
  stream.avail_out = out.size();
  deflate(&stream, Z_FINISH);
  out.resize(stream.total_out);
  deflateEnd(&stream);
  return out;
}

std::string TempFile(const std::string& name, const std::string& contents) {
  std::random_device random;
  fs::path path = fs::temp_directory_path() /
                  absl::StrCat("idx_test_", random(), "_", name);
  std::ofstream(path, std::ios::binary) << contents;
  return path.string();
}

TEST(IdxTest, ParsesDimsAndData) {
  auto array = ParseIdx(Idx({3, 2, 2}), "t");
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->dims, (std::vector<int64_t>{3, 2, 2}));
  ASSERT_EQ(array->data.size(), 12u);
  EXPECT_EQ(array->data[11], 11);
}

TEST(IdxTest, RejectsBadMagicAndType) {
  std::string bad = Idx({2});
  bad[0] = 1;
  EXPECT_THAT(ParseIdx(bad, "t").status().message(), HasSubstr("magic"));
  std::string floats = Idx({2});
  floats[2] = 0x0d;
  EXPECT_THAT(ParseIdx(floats, "t").status().message(),
              HasSubstr("not unsigned byte"));
  std::string no_dims = {0, 0, 0x08, 0};
  EXPECT_EQ(ParseIdx(no_dims, "t").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(IdxTest, RejectsTruncatedAndTrailingData) {
  auto truncated = ParseIdx(Idx({4, 3}, -1), "t");
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(truncated.status().message(), HasSubstr("truncated"));
  EXPECT_THAT(ParseIdx(Idx({4, 3}, 2), "t").status().message(),
              HasSubstr("trailing"));
  EXPECT_EQ(ParseIdx(Idx({4, 3}).substr(0, 6), "t").status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(ParseIdx("", "t").status().code(), absl::StatusCode::kDataLoss);
}

TEST(IdxTest, ReadsGzipAndChecksExpectedDims) {
  const std::string path = TempFile("a.gz", Gzip(Idx({5, 28, 28})));
  auto array = ReadIdxFile(path, {-1, 28, 28});
  ASSERT_TRUE(array.ok()) << array.status();
  EXPECT_EQ(array->dims[0], 5);
  EXPECT_EQ(array->data.size(), 5u * 28 * 28);
  EXPECT_THAT(ReadIdxFile(path, {-1, 27, 28}).status().message(),
              HasSubstr("expected"));
  fs::remove(path);
}

TEST(IdxTest, RejectsTruncatedGzip) {
  const std::string compressed = Gzip(Idx({50, 28, 28}));
  const std::string path =
      TempFile("cut.gz", compressed.substr(0, compressed.size() / 2));
  absl::Status status = ReadIdxFile(path).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(), HasSubstr("truncated"));
  fs::remove(path);
  EXPECT_EQ(ReadIdxFile("/nonexistent/idx").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mergeguard::bench
