#include "core/tensor_views.h"

#include <torch/torch.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;

class TempDir {
 public:
  TempDir() {
    std::string pattern = absl::StrCat(::testing::TempDir(), "/tv_XXXXXX");
    path_ = ::mkdtemp(pattern.data()) ? pattern : "";
  }
  ~TempDir() {
    std::string cmd = absl::StrCat("rm -rf '", path_, "'");
    if (!path_.empty()) {
      EXPECT_EQ(std::system(cmd.c_str()), 0);
    }
  }
  std::string File(const std::string& name) const {
    return absl::StrCat(path_, "/", name);
  }

 private:
  std::string path_;
};

// WriteRawFile writes a hand-built safetensors file.
void WriteRawFile(const std::string& path, const std::string& header,
                  const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  std::ofstream(path, std::ios::binary) << out << header << data;
}

TEST(TorchDTypeTest, MapsEveryDType) {
  for (DType dtype :
       {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64,
        DType::kI32, DType::kI16, DType::kI8, DType::kU8, DType::kBool}) {
    auto type = ToTorchDType(dtype);
    ASSERT_TRUE(type.ok());
    EXPECT_EQ(c10::elementSize(*type), DTypeSize(dtype)) << DTypeName(dtype);
    auto back = FromTorchDType(*type);
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(*back, dtype);
  }
  EXPECT_EQ(ToTorchDType(DType::kBF16).value(), torch::kBFloat16);
  EXPECT_EQ(FromTorchDType(torch::kComplexFloat).status().code(),
            absl::StatusCode::kInvalidArgument);
}

NamedTensors SampleTensors() {
  torch::manual_seed(3);
  return {
      {"f32", torch::randn({4, 5})},
      {"f64", torch::randn({3}, torch::kFloat64)},
      {"f16", torch::randn({2, 3, 4}).to(torch::kHalf)},
      {"bf16", torch::randn({7}).to(torch::kBFloat16)},
      {"i64", torch::randint(-1000, 1000, {6}, torch::kLong)},
      {"u8", torch::randint(0, 255, {2, 2}, torch::kByte)},
      {"mask", torch::rand({9}) > 0.5},
      {"scalar", torch::tensor(2.5)},
      {"empty", torch::zeros({0, 3})},
      // Not contiguous: must be written in logical order.
      {"transposed", torch::arange(12, torch::kFloat32).reshape({3, 4}).t()},
  };
}

void ExpectEqualTensors(const NamedTensors& got, const NamedTensors& want) {
  ASSERT_EQ(got.size(), want.size());
  std::map<std::string, torch::Tensor> by_name(got.begin(), got.end());
  for (const auto& [name, tensor] : want) {
    ASSERT_EQ(by_name.count(name), 1u) << name;
    const torch::Tensor& t = by_name[name];
    EXPECT_EQ(t.scalar_type(), tensor.scalar_type()) << name;
    EXPECT_EQ(t.sizes(), tensor.sizes()) << name;
    EXPECT_TRUE(torch::equal(t, tensor)) << name;
  }
}

TEST(TensorViewsTest, SaveThenLoadRoundTrips) {
  TempDir dir;
  NamedTensors tensors = SampleTensors();
  const std::string path = dir.File("m.safetensors");
  ASSERT_TRUE(SaveTensors(path, tensors, {{"k", "v"}}).ok());
  auto loaded = LoadTensorsFromPath(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectEqualTensors(*loaded, tensors);
  // Loaded tensors own their memory (writable, independent of the file).
  (*loaded)[0].second.zero_();
}

TEST(TensorViewsTest, ShardedSaveThenLoadRoundTrips) {
  TempDir dir;
  NamedTensors tensors = SampleTensors();
  CheckpointWriterOptions options;
  options.max_shard_bytes = 64;
  ASSERT_TRUE(SaveTensors(dir.File("sharded"), tensors, {}, options).ok());
  auto checkpoint = Checkpoint::Open(dir.File("sharded"));
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto loaded = LoadTensors(**checkpoint);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ExpectEqualTensors(*loaded, tensors);
}

TEST(TensorViewsTest, SaveRefusesUnsupportedTypes) {
  TempDir dir;
  NamedTensors tensors = {{"c", torch::zeros({2}, torch::kComplexFloat)}};
  absl::Status status = SaveTensors(dir.File("c.safetensors"), tensors);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(status.message()), HasSubstr("ComplexFloat"));
}

TEST(TensorViewsTest, ViewIsZeroCopyAndKeepsTheFileAlive) {
  TempDir dir;
  const std::string path = dir.File("v.safetensors");
  torch::Tensor weight = torch::randn({8, 16});
  ASSERT_TRUE(SaveTensors(path, {{"w", weight}, {"b", torch::ones({3})}}).ok());
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok());
  auto view = TensorView(*file, "w");
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_TRUE(torch::equal(*view, weight));
  EXPECT_EQ(view->data_ptr(),
            static_cast<const void*>((*file)->TensorBytes("w")->data()));
  file->reset();  // only the view holds the mapping now
  EXPECT_TRUE(torch::equal(*view, weight));
  EXPECT_EQ(view->sum().item<float>(), weight.sum().item<float>());
}

TEST(TensorViewsTest, MisalignedDataIsCopied) {
  // A 57-byte header puts the data at offset 65: F32 views would be
  // misaligned, so the view falls back to a copy.
  TempDir dir;
  const std::string path = dir.File("odd.safetensors");
  std::string header =
      R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  header.append(57 - header.size(), ' ');
  const float values[] = {1.5f, -2.25f};
  WriteRawFile(path, header,
               std::string(reinterpret_cast<const char*>(values), 8));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto bytes = (*file)->TensorBytes("w");
  ASSERT_NE(reinterpret_cast<uintptr_t>(bytes->data()) % 4, 0u);
  auto view = TensorView(*file, "w");
  ASSERT_TRUE(view.ok()) << view.status();
  EXPECT_NE(view->data_ptr(), static_cast<const void*>(bytes->data()));
  EXPECT_EQ(view->data_ptr<float>()[0], 1.5f);
  EXPECT_EQ(view->data_ptr<float>()[1], -2.25f);
}

TEST(TensorViewsTest, RejectsInvalidBoolBytesAndUnknownNames) {
  TempDir dir;
  const std::string path = dir.File("b.safetensors");
  WriteRawFile(path,
               R"({"m":{"dtype":"BOOL","shape":[3],"data_offsets":[0,3]}})",
               std::string("\x01\x02\x00", 3));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  auto view = TensorView(*file, "m");
  EXPECT_EQ(view.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(view.status().message()), HasSubstr("tensor \"m\""));
  EXPECT_EQ(TensorView(*file, "x").status().code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace mergeguard
