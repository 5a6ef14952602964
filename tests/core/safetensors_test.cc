#include "core/safetensors.h"

#include <dirent.h>
#include <stdlib.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/thread_pool.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;

// FileBytes assembles a safetensors file by hand: length, header, data.
std::string FileBytes(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

std::string Zeros(size_t n) { return std::string(n, '\0'); }

// ExpectRejected parses `file` and checks the code and that the message names
// `needle` (usually the offending tensor).
void ExpectRejected(const std::string& file, absl::StatusCode code,
                    const std::string& needle) {
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(file);
  ASSERT_FALSE(layout.ok()) << "accepted: " << file.substr(8);
  EXPECT_EQ(layout.status().code(), code) << layout.status();
  EXPECT_THAT(std::string(layout.status().message()), HasSubstr(needle));
}

class TempDir {
 public:
  TempDir() {
    std::string pattern = absl::StrCat(::testing::TempDir(), "/st_XXXXXX");
    path_ = ::mkdtemp(pattern.data()) ? pattern : "";
  }
  ~TempDir() {
    std::string cmd = absl::StrCat("rm -rf '", path_, "'");
    if (!path_.empty()) {
      EXPECT_EQ(std::system(cmd.c_str()), 0);
    }
  }
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const {
    return absl::StrCat(path_, "/", name);
  }
  std::vector<std::string> List() const {
    std::vector<std::string> names;
    DIR* dir = ::opendir(path_.c_str());
    while (dirent* e = ::readdir(dir)) {
      std::string name = e->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    ::closedir(dir);
    return names;
  }

 private:
  std::string path_;
};

bool Exists(const std::string& path) {
  return ::access(path.c_str(), F_OK) == 0;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

absl::Span<const uint8_t> AsBytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()),
                                   s.size());
}

std::string PatternBytes(size_t n, int seed) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i)
    s[i] = static_cast<char>((i * 31 + seed) & 0xff);
  return s;
}

// ---------------------------------------------------------------------------
// Valid files

TEST(ParseSafetensorsTest, AcceptsValidFile) {
  std::string file =
      FileBytes(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("a":{"dtype":"I8","shape":[1,3],"data_offsets":[8,11]},)"
                R"("__metadata__":{"format":"pt"}})",
                Zeros(11));
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(file);
  ASSERT_TRUE(layout.ok()) << layout.status();
  ASSERT_EQ(layout->tensors.size(), 2u);
  EXPECT_EQ(layout->tensors[0].name, "a");  // sorted by name
  EXPECT_EQ(layout->tensors[0].dtype, DType::kI8);
  EXPECT_EQ(layout->tensors[0].shape, (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(layout->tensors[0].data_begin, 8u);
  EXPECT_EQ(layout->tensors[1].name, "b");
  EXPECT_EQ(layout->metadata.at("format"), "pt");
  EXPECT_EQ(layout->data_offset, file.size() - 11);
  EXPECT_NE(layout->Find("b"), nullptr);
  EXPECT_EQ(layout->Find("c"), nullptr);
}

TEST(ParseSafetensorsTest, AcceptsHeaderPaddedWithSpaces) {
  std::string file =
      FileBytes(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})"
                "       ",
                "xy");
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(file);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->data_offset, file.size() - 2);
}

TEST(ParseSafetensorsTest, AcceptsEmptyAndZeroSizeTensors) {
  ASSERT_TRUE(ParseSafetensors(FileBytes("{}")).ok());
  std::string file =
      FileBytes(R"({"e":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},)"
                R"("s":{"dtype":"F64","shape":[],"data_offsets":[0,8]}})",
                Zeros(8));
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(file);
  ASSERT_TRUE(layout.ok()) << layout.status();
  EXPECT_EQ(layout->Find("s")->NumElements(), 1);
  EXPECT_EQ(layout->Find("e")->ByteSize(), 0u);
}

// ---------------------------------------------------------------------------
// One malformed file per rule

TEST(ParseSafetensorsTest, RejectsFileShorterThanLength) {
  ExpectRejected(std::string(5, '\0'), absl::StatusCode::kDataLoss,
                 "truncated");
}

TEST(ParseSafetensorsTest, RejectsHeaderLongerThanLimit) {
  std::string file(8, '\0');
  uint64_t n = kMaxSafetensorsHeaderBytes + 1;
  std::memcpy(file.data(), &n, 8);
  ExpectRejected(file + "{}", absl::StatusCode::kInvalidArgument,
                 "exceeds the limit");
}

TEST(ParseSafetensorsTest, RejectsTruncatedHeader) {
  std::string file = FileBytes(
      R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", "xy");
  ExpectRejected(file.substr(0, 20), absl::StatusCode::kDataLoss, "truncated");
}

TEST(ParseSafetensorsTest, RejectsInvalidJson) {
  ExpectRejected(FileBytes(R"({"a":{"dtype":"U8",})"),
                 absl::StatusCode::kInvalidArgument, "not valid JSON");
}

TEST(ParseSafetensorsTest, RejectsInvalidUtf8Name) {
  ExpectRejected(
      FileBytes("{\"\xff\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":"
                "[0,1]}}",
                "x"),
      absl::StatusCode::kInvalidArgument, "not valid JSON");
}

TEST(ParseSafetensorsTest, RejectsNonObjectHeader) {
  ExpectRejected(FileBytes("[1, 2]"), absl::StatusCode::kInvalidArgument,
                 "JSON object");
}

TEST(ParseSafetensorsTest, RejectsNonSpacePadding) {
  ExpectRejected(FileBytes("{}\n\n"), absl::StatusCode::kInvalidArgument,
                 "padded with trailing spaces");
  ExpectRejected(FileBytes("{}  x"), absl::StatusCode::kInvalidArgument,
                 "padded with trailing spaces");
}

TEST(ParseSafetensorsTest, RejectsEntryThatIsNotAnObject) {
  ExpectRejected(FileBytes(R"({"layer.0.weight": [1]})"),
                 absl::StatusCode::kInvalidArgument,
                 "tensor \"layer.0.weight\": entry must be an object");
}

TEST(ParseSafetensorsTest, RejectsMissingDtype) {
  ExpectRejected(FileBytes(R"({"w":{"shape":[1],"data_offsets":[0,1]}})", "x"),
                 absl::StatusCode::kInvalidArgument, "tensor \"w\": \"dtype\"");
}

TEST(ParseSafetensorsTest, RejectsUnknownDtype) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})",
                "x"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": unsupported dtype");
}

TEST(ParseSafetensorsTest, RejectsUnknownField) {
  ExpectRejected(
      FileBytes(
          R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}})",
          "x"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": unknown field \"x\"");
}

TEST(ParseSafetensorsTest, RejectsShapeThatIsNotAnArray) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"U8","shape":1,"data_offsets":[0,1]}})", "x"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": \"shape\"");
}

TEST(ParseSafetensorsTest, RejectsNegativeDim) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}})",
                "x"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": \"shape\"");
}

TEST(ParseSafetensorsTest, RejectsFractionalDim) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})",
                "x"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": \"shape\"");
}

TEST(ParseSafetensorsTest, RejectsElementCountOverflow) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],)"
                R"("data_offsets":[0,0]}})"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": shape");
  // numel fits, bytes do not.
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"F64","shape":[4611686018427387904],)"
                R"("data_offsets":[0,0]}})"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": shape");
}

TEST(ParseSafetensorsTest, RejectsMissingDataOffsets) {
  ExpectRejected(FileBytes(R"({"w":{"dtype":"U8","shape":[1]}})", "x"),
                 absl::StatusCode::kInvalidArgument,
                 "tensor \"w\": \"data_offsets\"");
}

TEST(ParseSafetensorsTest, RejectsDataOffsetsOfWrongArity) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}})",
                "x"),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": \"data_offsets\"");
}

TEST(ParseSafetensorsTest, RejectsDataOffsetsEndingBeforeBegin) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[1,0]}})",
                "x"),
      absl::StatusCode::kInvalidArgument,
      "tensor \"w\": data_offsets [1, 0] end before they begin");
}

TEST(ParseSafetensorsTest, RejectsDataPastEndOfFile) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})",
                Zeros(12)),
      absl::StatusCode::kDataLoss, "tensor \"w\": data_offsets [0, 16]");
}

TEST(ParseSafetensorsTest, RejectsByteSizeMismatch) {
  ExpectRejected(
      FileBytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})",
                Zeros(4)),
      absl::StatusCode::kInvalidArgument, "tensor \"w\": data_offsets [0, 4]");
}

TEST(ParseSafetensorsTest, RejectsOverlap) {
  ExpectRejected(
      FileBytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("layer.0.weight":{"dtype":"F32","shape":[2],)"
                R"("data_offsets":[4,12]}})",
                Zeros(12)),
      absl::StatusCode::kInvalidArgument,
      "tensor \"layer.0.weight\": data_offsets [4, 12] overlap tensor \"x\"");
}

TEST(ParseSafetensorsTest, RejectsEmptyTensorInsideAnother) {
  ExpectRejected(
      FileBytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("e":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                Zeros(8)),
      absl::StatusCode::kInvalidArgument, "tensor \"e\"");
}

TEST(ParseSafetensorsTest, RejectsHoleBetweenTensors) {
  ExpectRejected(
      FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                Zeros(20)),
      absl::StatusCode::kInvalidArgument,
      "tensor \"b\": data_offsets [12, 20] leave a hole of 4");
}

TEST(ParseSafetensorsTest, RejectsHoleAtStart) {
  ExpectRejected(
      FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                Zeros(12)),
      absl::StatusCode::kInvalidArgument, "tensor \"a\": data_offsets [4, 12]");
}

TEST(ParseSafetensorsTest, RejectsTrailingBytes) {
  ExpectRejected(
      FileBytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                Zeros(9)),
      absl::StatusCode::kInvalidArgument,
      "1 trailing bytes not covered by any tensor (after tensor \"a\")");
}

TEST(ParseSafetensorsTest, RejectsDuplicateTensorName) {
  // nlohmann would keep only the second entry; both tile the data section.
  ExpectRejected(
      FileBytes(R"({"dup":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                R"("dup":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                "xy"),
      absl::StatusCode::kInvalidArgument, "duplicate tensor \"dup\"");
}

TEST(ParseSafetensorsTest, RejectsDuplicateFieldInEntry) {
  ExpectRejected(FileBytes(R"({"w":{"dtype":"F32","dtype":"U8","shape":[1],)"
                           R"("data_offsets":[0,1]}})",
                           "x"),
                 absl::StatusCode::kInvalidArgument,
                 "tensor \"w\": duplicate key \"dtype\"");
}

TEST(ParseSafetensorsTest, RejectsEmptyTensorName) {
  ExpectRejected(
      FileBytes(R"({"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", "x"),
      absl::StatusCode::kInvalidArgument, "must not be empty");
}

TEST(ParseSafetensorsTest, RejectsMetadataThatIsNotAnObject) {
  ExpectRejected(FileBytes(R"({"__metadata__":["a"]})"),
                 absl::StatusCode::kInvalidArgument, "\"__metadata__\"");
}

TEST(ParseSafetensorsTest, RejectsNonStringMetadataValue) {
  ExpectRejected(FileBytes(R"({"__metadata__":{"step":3}})"),
                 absl::StatusCode::kInvalidArgument,
                 "value of \"step\" must be a string");
}

// ---------------------------------------------------------------------------
// Writer and reader

struct WrittenFile {
  std::string path;
  std::vector<TensorSpec> specs;
  std::vector<std::string> data;
};

absl::Status WriteAll(const std::string& path,
                      const std::vector<TensorSpec>& specs,
                      const std::vector<std::string>& data,
                      const std::map<std::string, std::string>& metadata = {}) {
  absl::StatusOr<std::unique_ptr<SafetensorsWriter>> writer =
      SafetensorsWriter::Create(path, specs, metadata);
  if (!writer.ok()) return writer.status();
  for (size_t i = 0; i < specs.size(); ++i) {
    absl::Status s = (*writer)->WriteTensor(specs[i].name, AsBytes(data[i]));
    if (!s.ok()) return s;
  }
  return (*writer)->Commit();
}

TEST(SafetensorsWriterTest, RoundTripsEveryDtype) {
  TempDir dir;
  std::vector<TensorSpec> specs;
  std::vector<std::string> data;
  const DType all[] = {DType::kF64, DType::kF32, DType::kF16, DType::kBF16,
                       DType::kI64, DType::kI32, DType::kI16, DType::kI8,
                       DType::kU8,  DType::kBool};
  int seed = 0;
  for (DType dtype : all) {
    TensorSpec spec{absl::StrCat("t.", DTypeName(dtype)), dtype, {3, 5}};
    std::string bytes = PatternBytes(spec.ByteSize(), ++seed);
    if (dtype == DType::kBool) {
      for (char& c : bytes) c = c & 1;
    }
    specs.push_back(spec);
    data.push_back(bytes);
  }
  const std::string path = dir.File("all.safetensors");
  ASSERT_TRUE(WriteAll(path, specs, data).ok());

  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  ASSERT_EQ((*file)->layout().tensors.size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorEntry* entry = (*file)->layout().Find(specs[i].name);
    ASSERT_NE(entry, nullptr) << specs[i].name;
    EXPECT_EQ(entry->dtype, specs[i].dtype);
    EXPECT_EQ(entry->shape, specs[i].shape);
    auto bytes = (*file)->TensorBytes(specs[i].name);
    ASSERT_TRUE(bytes.ok());
    EXPECT_EQ(std::string(bytes->begin(), bytes->end()), data[i])
        << specs[i].name;
  }
  // Tensors are laid out in the given order.
  EXPECT_EQ((*file)->layout().Find("t.F64")->data_begin, 0u);
  EXPECT_EQ((*file)->layout().Find("t.F32")->data_begin, 15u * 8);
}

TEST(SafetensorsWriterTest, HalfAndBFloat16AreBitExact) {
  // Signed zero, subnormals, infinities and NaN payloads must survive.
  const uint16_t bits[] = {0x0000, 0x8000, 0x0001, 0x8001, 0x03ff, 0x7c00,
                           0xfc00, 0x7e01, 0x7d55, 0xffff, 0x3c00, 0x7f80,
                           0xff81, 0x0080, 0x7bff, 0x1234};
  std::string raw(reinterpret_cast<const char*>(bits), sizeof(bits));
  TempDir dir;
  const std::string path = dir.File("half.safetensors");
  std::vector<TensorSpec> specs = {{"h", DType::kF16, {16}},
                                   {"b", DType::kBF16, {4, 4}}};
  ASSERT_TRUE(WriteAll(path, specs, {raw, raw}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  for (const char* name : {"h", "b"}) {
    auto bytes = (*file)->TensorBytes(name);
    ASSERT_TRUE(bytes.ok());
    ASSERT_EQ(bytes->size(), sizeof(bits));
    EXPECT_EQ(std::memcmp(bytes->data(), bits, sizeof(bits)), 0) << name;
  }
}

TEST(SafetensorsWriterTest, PadsHeaderToEightBytes) {
  TempDir dir;
  for (int len = 1; len <= 17; ++len) {
    const std::string path = dir.File(absl::StrCat(len, ".safetensors"));
    std::vector<TensorSpec> specs = {{std::string(len, 'n'), DType::kU8, {3}}};
    ASSERT_TRUE(WriteAll(path, specs, {"abc"}).ok());
    std::string file = ReadAll(path);
    uint64_t n = 0;
    std::memcpy(&n, file.data(), 8);
    EXPECT_EQ(n % 8, 0u) << len;
    ASSERT_EQ(file.size(), 8 + n + 3);
    std::string header = file.substr(8, n);
    size_t close = header.rfind('}');
    EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos);
    EXPECT_EQ(file.substr(8 + n), "abc");
  }
}

TEST(SafetensorsWriterTest, RoundTripsMetadata) {
  TempDir dir;
  const std::string path = dir.File("meta.safetensors");
  std::map<std::string, std::string> metadata = {
      {"method", "ties"}, {"quote", "a \"b\"\n\u00e9"}, {"empty", ""}};
  ASSERT_TRUE(
      WriteAll(path, {{"w", DType::kF32, {1}}}, {Zeros(4)}, metadata).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->layout().metadata, metadata);
}

TEST(SafetensorsWriterTest, WritesAtomically) {
  TempDir dir;
  const std::string path = dir.File("model.safetensors");
  {
    auto writer = SafetensorsWriter::Create(path, {{"w", DType::kU8, {4}}});
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE((*writer)->WriteTensor("w", AsBytes("abcd")).ok());
    EXPECT_FALSE(Exists(path));
    ASSERT_EQ(dir.List().size(), 1u);  // the temporary file
    EXPECT_TRUE(absl::StartsWith(dir.List()[0], "model.safetensors.tmp"));
    // Abandoned: nothing may remain.
  }
  EXPECT_FALSE(Exists(path));
  EXPECT_TRUE(dir.List().empty());

  auto writer = SafetensorsWriter::Create(path, {{"w", DType::kU8, {4}}});
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->WriteTensor("w", AsBytes("abcd")).ok());
  ASSERT_TRUE((*writer)->Commit().ok());
  EXPECT_EQ(dir.List(), std::vector<std::string>{"model.safetensors"});
  EXPECT_EQ(ReadAll(path).size(), (*writer)->TotalBytes());
  writer->reset();
  EXPECT_TRUE(Exists(path));  // committed files survive the writer
}

TEST(SafetensorsWriterTest, CommitRefusesUnwrittenBytes) {
  TempDir dir;
  const std::string path = dir.File("x.safetensors");
  auto writer = SafetensorsWriter::Create(
      path, {{"a", DType::kU8, {2}}, {"partial", DType::kU8, {8}}});
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->WriteTensor("a", AsBytes("ab")).ok());
  ASSERT_TRUE((*writer)->WriteTensorRange("partial", 0, AsBytes("0123")).ok());
  absl::Status status = (*writer)->Commit();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(status.message()),
              HasSubstr("tensor \"partial\": only 4 of 8 bytes"));
  EXPECT_FALSE(Exists(path));
}

TEST(SafetensorsWriterTest, RefusesBadRanges) {
  TempDir dir;
  auto writer = SafetensorsWriter::Create(dir.File("x.safetensors"),
                                          {{"a", DType::kU8, {8}}});
  ASSERT_TRUE(writer.ok());
  EXPECT_EQ((*writer)->WriteTensorRange("a", 6, AsBytes("xyz")).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ((*writer)->WriteTensorRange("nope", 0, AsBytes("x")).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ((*writer)->WriteTensor("a", AsBytes("short")).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*writer)->WriteTensorRange("a", 0, AsBytes("0123")).ok());
  // A repeated range would otherwise count twice and hide the hole at 4..8.
  absl::Status overlap = (*writer)->WriteTensorRange("a", 2, AsBytes("23"));
  EXPECT_EQ(overlap.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(overlap.message()), HasSubstr("tensor \"a\""));
  ASSERT_TRUE((*writer)->WriteTensorRange("a", 6, AsBytes("67")).ok());
  EXPECT_FALSE((*writer)->Commit().ok());
  ASSERT_TRUE((*writer)->WriteTensorRange("a", 4, AsBytes("45")).ok());
  EXPECT_TRUE((*writer)->Commit().ok());
  EXPECT_EQ((*writer)->Commit().code(), absl::StatusCode::kFailedPrecondition);
}

TEST(SafetensorsWriterTest, RefusesBadSpecs) {
  TempDir dir;
  const std::string path = dir.File("x.safetensors");
  EXPECT_EQ(SafetensorsWriter::Create(
                path, {{"a", DType::kU8, {1}}, {"a", DType::kU8, {1}}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"a", DType::kU8, {-1}}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"__metadata__", DType::kU8, {1}}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(path, {{"\xff", DType::kU8, {1}}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SafetensorsWriter::Create(dir.File("missing/x.safetensors"), {})
                .status()
                .code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(dir.List().empty());
}

TEST(SafetensorsWriterTest, ParallelRangesAssembleTheTensor) {
  TempDir dir;
  const std::string path = dir.File("p.safetensors");
  const size_t kChunk = 4096, kChunks = 64;
  std::string data = PatternBytes(kChunk * kChunks, 7);
  auto writer = SafetensorsWriter::Create(
      path,
      {{"big", DType::kF32, {static_cast<int64_t>(kChunk * kChunks / 4)}}});
  ASSERT_TRUE(writer.ok());
  std::vector<absl::Status> results(kChunks);
  ParallelFor(kChunks, 4, [&](size_t i) {
    results[i] = (*writer)->WriteTensorRange(
        "big", i * kChunk, AsBytes(data).subspan(i * kChunk, kChunk));
  });
  for (const absl::Status& s : results) ASSERT_TRUE(s.ok()) << s;
  ASSERT_TRUE((*writer)->Commit().ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  auto bytes = (*file)->TensorBytes("big");
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(std::string(bytes->begin(), bytes->end()), data);
}

TEST(SafetensorsWriterTest, FullDiskIsResourceExhaustedAtCreate) {
  // tmpfs checks fallocate against its size up front, so this allocates
  // nothing; other file systems might fill up first, so they are skipped.
  constexpr long kTmpfsMagic = 0x01021994;
  struct statfs fs;
  if (::statfs("/dev/shm", &fs) != 0 || fs.f_type != kTmpfsMagic) {
    GTEST_SKIP() << "/dev/shm is not tmpfs";
  }
  struct statvfs vfs;
  ASSERT_EQ(::statvfs("/dev/shm", &vfs), 0);
  const int64_t too_big = static_cast<int64_t>(vfs.f_blocks) *
                              static_cast<int64_t>(vfs.f_frsize) * 2 +
                          (int64_t{1} << 30);
  const std::string path =
      absl::StrCat("/dev/shm/mergeguard_enospc_", ::getpid(), ".safetensors");
  auto writer = SafetensorsWriter::Create(path, {{"w", DType::kU8, {too_big}}});
  ASSERT_FALSE(writer.ok());
  EXPECT_EQ(writer.status().code(), absl::StatusCode::kResourceExhausted)
      << writer.status();
  EXPECT_FALSE(Exists(path));
}

// ---------------------------------------------------------------------------
// SafetensorsFile

// MappingOf returns the [begin, end) address range mapping `path`, from
// /proc/self/maps.
std::pair<uintptr_t, uintptr_t> MappingOf(const std::string& path) {
  char resolved[PATH_MAX];
  if (::realpath(path.c_str(), resolved) == nullptr) return {0, 0};
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    if (!absl::EndsWith(line, resolved)) continue;
    uintptr_t begin = 0, end = 0;
    std::sscanf(line.c_str(), "%lx-%lx", &begin, &end);
    return {begin, end};
  }
  return {0, 0};
}

TEST(SafetensorsFileTest, TensorBytesPointIntoTheMapping) {
  TempDir dir;
  const std::string path = dir.File("z.safetensors");
  ASSERT_TRUE(WriteAll(path,
                       {{"a", DType::kF32, {256}}, {"b", DType::kU8, {5}}},
                       {PatternBytes(1024, 1), "hello"})
                  .ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  auto [begin, end] = MappingOf(path);
  ASSERT_NE(begin, 0u) << "no mapping of " << path;
  for (const char* name : {"a", "b"}) {
    auto bytes = (*file)->TensorBytes(name);
    ASSERT_TRUE(bytes.ok());
    auto p = reinterpret_cast<uintptr_t>(bytes->data());
    EXPECT_GE(p, begin) << name;
    EXPECT_LE(p + bytes->size(), end) << name;
    EXPECT_EQ(p - begin, (*file)->layout().data_offset +
                             (*file)->layout().Find(name)->data_begin);
  }
  EXPECT_EQ((*file)->TensorBytes("c").status().code(),
            absl::StatusCode::kNotFound);
  file->reset();
  EXPECT_EQ(MappingOf(path).first, 0u) << "mapping outlived the file";
}

// ResidentKb returns the Rss of the mapping starting at `begin`, from
// /proc/self/smaps, or -1.
int64_t ResidentKb(uintptr_t begin) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool in_mapping = false;
  while (std::getline(smaps, line)) {
    uintptr_t start = 0, end = 0;
    // Only mapping headers ("begin-end perms ...") parse as two hex numbers.
    if (std::sscanf(line.c_str(), "%lx-%lx ", &start, &end) == 2) {
      in_mapping = start == begin;
      continue;
    }
    long kb = 0;
    if (in_mapping && std::sscanf(line.c_str(), "Rss: %ld kB", &kb) == 1) {
      return kb;
    }
  }
  return -1;
}

TEST(SafetensorsFileTest, ReleasePagesDropsResidencyButKeepsData) {
  TempDir dir;
  const std::string path = dir.File("r.safetensors");
  const std::string data = PatternBytes(1 << 20, 5);
  ASSERT_TRUE(WriteAll(path, {{"w", DType::kU8, {1 << 20}}}, {data}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  auto bytes = (*file)->TensorBytes("w");
  ASSERT_TRUE(bytes.ok());
  EXPECT_EQ(std::string(bytes->begin(), bytes->end()), data);  // faults in
  const uintptr_t begin = MappingOf(path).first;
  ASSERT_NE(begin, 0u);
  EXPECT_GE(ResidentKb(begin), 1000);
  (*file)->ReleasePages(*(*file)->layout().Find("w"));
  EXPECT_EQ(ResidentKb(begin), 0);
  EXPECT_EQ(std::string(bytes->begin(), bytes->end()), data);
}

TEST(SafetensorsFileTest, OpenReportsErrorsWithPath) {
  TempDir dir;
  auto missing = SafetensorsFile::Open(dir.File("missing.safetensors"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);

  const std::string bad = dir.File("bad.safetensors");
  std::ofstream(bad, std::ios::binary) << FileBytes(
      R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", Zeros(4));
  auto truncated = SafetensorsFile::Open(bad);
  EXPECT_EQ(truncated.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(truncated.status().message()), HasSubstr(bad));
  EXPECT_THAT(std::string(truncated.status().message()),
              HasSubstr("tensor \"w\""));

  const std::string tiny = dir.File("tiny.safetensors");
  std::ofstream(tiny, std::ios::binary) << "abc";
  EXPECT_EQ(SafetensorsFile::Open(tiny).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(SafetensorsFile::Open(dir.path()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mergeguard
