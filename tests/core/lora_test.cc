#include "core/lora.h"

#include <sys/stat.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/tensor_views.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

class AdapterDir {
 public:
  AdapterDir() {
    std::string pattern = absl::StrCat(::testing::TempDir(), "/lora_XXXXXX");
    path_ = ::mkdtemp(pattern.data()) ? pattern : "";
  }
  ~AdapterDir() {
    std::string cmd = absl::StrCat("rm -rf '", path_, "'");
    if (!path_.empty()) {
      EXPECT_EQ(std::system(cmd.c_str()), 0);
    }
  }
  const std::string& path() const { return path_; }

  void WriteConfig(const std::string& json) {
    std::ofstream(absl::StrCat(path_, "/", kAdapterConfigFileName)) << json;
  }
  void WriteWeights(const NamedTensors& tensors) {
    ASSERT_TRUE(
        SaveTensors(absl::StrCat(path_, "/", kAdapterWeightsFileName), tensors)
            .ok());
  }

 private:
  std::string path_;
};

std::string Config(int r, double alpha, bool rslora = false,
                   bool fan_in_fan_out = false) {
  return absl::StrCat(R"({"peft_type": "LORA", "r": )", r,
                      R"(, "lora_alpha": )", alpha, R"(, "use_rslora": )",
                      rslora ? "true" : "false", R"(, "fan_in_fan_out": )",
                      fan_in_fan_out ? "true" : "false",
                      R"(, "target_modules": ["q"], "bias": "none"})");
}

// Reference dW[o][i] = scale * sum_k B[o][k] A[k][i], by plain loops in
// double, with A flattened to [r, in] and B to [out, r].
std::vector<double> ReferenceDelta(const torch::Tensor& a,
                                   const torch::Tensor& b, double scale) {
  torch::Tensor a2 =
      a.to(torch::kFloat64).reshape({a.size(0), -1}).contiguous();
  torch::Tensor b2 =
      b.to(torch::kFloat64).reshape({b.size(0), -1}).contiguous();
  const int64_t r = a2.size(0), in = a2.size(1), out = b2.size(0);
  const double* pa = a2.data_ptr<double>();
  const double* pb = b2.data_ptr<double>();
  std::vector<double> delta(out * in, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      double sum = 0;
      for (int64_t k = 0; k < r; ++k) sum += pb[o * r + k] * pa[k * in + i];
      delta[o * in + i] = sum * scale;
    }
  }
  return delta;
}

// ExpectDelta compares `got` (flattened in row-major order, transposed when
// `transposed`) with the reference [out, in] matrix.
void ExpectDelta(const torch::Tensor& got, const std::vector<double>& want,
                 int64_t out, int64_t in, bool transposed = false) {
  ASSERT_EQ(got.scalar_type(), torch::kFloat32);
  torch::Tensor flat = got.contiguous().reshape({-1});
  ASSERT_EQ(flat.numel(), out * in);
  const float* p = flat.data_ptr<float>();
  for (int64_t o = 0; o < out; ++o) {
    for (int64_t i = 0; i < in; ++i) {
      const float value = transposed ? p[i * out + o] : p[o * in + i];
      ASSERT_NEAR(value, want[o * in + i],
                  1e-4 * (1 + std::fabs(want[o * in + i])))
          << "at [" << o << ", " << i << "]";
    }
  }
}

TEST(LoraConfigTest, Scale) {
  LoraConfig config;
  config.r = 16;
  config.lora_alpha = 32;
  EXPECT_DOUBLE_EQ(config.Scale(), 2.0);
  config.use_rslora = true;
  EXPECT_DOUBLE_EQ(config.Scale(), 8.0);
}

TEST(LoraAdapterTest, LinearDeltaIsScaledProduct) {
  AdapterDir dir;
  torch::manual_seed(1);
  torch::Tensor a = torch::randn({4, 6}), b = torch::randn({5, 4});
  dir.WriteConfig(Config(4, 8));
  dir.WriteWeights({{"base_model.model.blocks.0.attn.q.lora_A.weight", a},
                    {"base_model.model.blocks.0.attn.q.lora_B.weight", b}});
  EXPECT_TRUE(IsLoraAdapterDir(dir.path()));
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_THAT((*adapter)->TargetKeys(), ElementsAre("blocks.0.attn.q.weight"));
  auto delta = (*adapter)->DeltaWeight("blocks.0.attn.q.weight", {5, 6});
  ASSERT_TRUE(delta.ok()) << delta.status();
  EXPECT_THAT(delta->sizes(), ElementsAre(5, 6));
  ExpectDelta(*delta, ReferenceDelta(a, b, 8.0 / 4), 5, 6);
}

TEST(LoraAdapterTest, RsLoraScalesBySquareRootOfRank) {
  AdapterDir dir;
  torch::manual_seed(2);
  torch::Tensor a = torch::randn({4, 3}), b = torch::randn({2, 4});
  dir.WriteConfig(Config(4, 8, /*rslora=*/true));
  dir.WriteWeights({{"base_model.model.fc.lora_A.weight", a},
                    {"base_model.model.fc.lora_B.weight", b}});
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_DOUBLE_EQ((*adapter)->config().Scale(), 4.0);
  auto delta = (*adapter)->DeltaWeight("fc.weight", {2, 3});
  ASSERT_TRUE(delta.ok()) << delta.status();
  ExpectDelta(*delta, ReferenceDelta(a, b, 8.0 / std::sqrt(4.0)), 2, 3);
}

TEST(LoraAdapterTest, FanInFanOutTransposes) {
  // GPT-2 Conv1D stores W as [in, out].
  AdapterDir dir;
  torch::manual_seed(3);
  torch::Tensor a = torch::randn({2, 7}), b = torch::randn({3, 2});
  dir.WriteConfig(Config(2, 4, false, /*fan_in_fan_out=*/true));
  dir.WriteWeights({{"base_model.model.h.0.attn.c_attn.lora_A.weight", a},
                    {"base_model.model.h.0.attn.c_attn.lora_B.weight", b}});
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  auto delta = (*adapter)->DeltaWeight("h.0.attn.c_attn.weight", {7, 3});
  ASSERT_TRUE(delta.ok()) << delta.status();
  EXPECT_THAT(delta->sizes(), ElementsAre(7, 3));
  ExpectDelta(*delta, ReferenceDelta(a, b, 2.0), 3, 7, /*transposed=*/true);
  // The untransposed shape no longer fits.
  EXPECT_EQ(
      (*adapter)->DeltaWeight("h.0.attn.c_attn.weight", {3, 7}).status().code(),
      absl::StatusCode::kFailedPrecondition);
}

TEST(LoraAdapterTest, ConvDeltaIsReshapedToTheKernel) {
  AdapterDir dir;
  torch::manual_seed(4);
  // lora_A is a 3x3 conv in->r, lora_B a 1x1 conv r->out.
  torch::Tensor a = torch::randn({2, 3, 3, 3}), b = torch::randn({4, 2, 1, 1});
  dir.WriteConfig(Config(2, 2));
  dir.WriteWeights({{"base_model.model.stem.conv.lora_A.weight", a},
                    {"base_model.model.stem.conv.lora_B.weight", b}});
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  auto delta = (*adapter)->DeltaWeight("stem.conv.weight", {4, 3, 3, 3});
  ASSERT_TRUE(delta.ok()) << delta.status();
  EXPECT_THAT(delta->sizes(), ElementsAre(4, 3, 3, 3));
  // [out, in*kh*kw] in row-major order is [out, in, kh, kw].
  ExpectDelta(*delta, ReferenceDelta(a, b, 1.0), 4, 27);
  // Same element count, different kernel: refused.
  EXPECT_EQ((*adapter)
                ->DeltaWeight("stem.conv.weight", {4, 27, 1, 1})
                .status()
                .code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(LoraAdapterTest, AcceptsNamedAdapterAndHalfFactors) {
  AdapterDir dir;
  torch::manual_seed(5);
  torch::Tensor a = torch::randn({2, 4}).to(torch::kHalf);
  torch::Tensor b = torch::randn({3, 2}).to(torch::kBFloat16);
  dir.WriteConfig(Config(2, 2));
  dir.WriteWeights({{"base_model.model.fc.lora_A.default.weight", a},
                    {"base_model.model.fc.lora_B.default.weight", b},
                    {"base_model.model.out.lora_A.default.weight", a},
                    {"base_model.model.out.lora_B.default.weight", b}});
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_THAT((*adapter)->TargetKeys(), ElementsAre("fc.weight", "out.weight"));
  auto delta = (*adapter)->DeltaWeight("out.weight", {3, 4});
  ASSERT_TRUE(delta.ok()) << delta.status();
  ExpectDelta(*delta, ReferenceDelta(a, b, 1.0), 3, 4);
}

TEST(LoraAdapterTest, ReadsUnalignedFactors) {
  // A header of odd length leaves the F32 data at an odd file offset.
  AdapterDir dir;
  dir.WriteConfig(Config(1, 1));
  std::string header =
      R"({"base_model.model.fc.lora_A.weight":{"dtype":"F32","shape":[1,2],)"
      R"("data_offsets":[0,8]},"base_model.model.fc.lora_B.weight":)"
      R"({"dtype":"F32","shape":[2,1],"data_offsets":[8,16]}})";
  if (header.size() % 2 == 0) header.push_back(' ');
  const float data[] = {1.0f, 2.0f, 3.0f, -4.0f};  // A = [1 2], B = [3; -4]
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) {
    file[i] =
        static_cast<char>(static_cast<uint64_t>(header.size()) >> (8 * i));
  }
  file += header;
  file.append(reinterpret_cast<const char*>(data), sizeof(data));
  std::ofstream(absl::StrCat(dir.path(), "/", kAdapterWeightsFileName),
                std::ios::binary)
      << file;
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  auto delta = (*adapter)->DeltaWeight("fc.weight", {2, 2});
  ASSERT_TRUE(delta.ok()) << delta.status();
  const float* p = delta->data_ptr<float>();
  EXPECT_EQ(p[0], 3.0f);
  EXPECT_EQ(p[1], 6.0f);
  EXPECT_EQ(p[2], -4.0f);
  EXPECT_EQ(p[3], -8.0f);
}

TEST(LoraAdapterTest, RejectsMissingB) {
  AdapterDir dir;
  dir.WriteConfig(Config(2, 2));
  dir.WriteWeights({{"base_model.model.fc.lora_A.weight", torch::ones({2, 4})},
                    {"base_model.model.o.lora_A.weight", torch::ones({2, 4})},
                    {"base_model.model.o.lora_B.weight", torch::ones({3, 2})}});
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_FALSE(adapter.ok());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(adapter.status().message()),
              HasSubstr("\"base_model.model.fc.lora_A.weight\" has no matching "
                        "lora_B"));
}

TEST(LoraAdapterTest, RejectsRankMismatch) {
  AdapterDir dir;
  dir.WriteConfig(Config(4, 8));
  dir.WriteWeights(
      {{"base_model.model.fc.lora_A.weight", torch::ones({4, 6})},
       {"base_model.model.fc.lora_B.weight", torch::ones({5, 3})}});
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_FALSE(adapter.ok());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(adapter.status().message()),
              HasSubstr("\"base_model.model.fc.lora_B.weight\" has rank 3"));
}

TEST(LoraAdapterTest, RejectsConfigRankDisagreeingWithTensors) {
  AdapterDir dir;
  dir.WriteConfig(Config(8, 8));
  dir.WriteWeights(
      {{"base_model.model.fc.lora_A.weight", torch::ones({4, 6})},
       {"base_model.model.fc.lora_B.weight", torch::ones({5, 4})}});
  auto adapter = LoraAdapter::Open(dir.path());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(adapter.status().message()), HasSubstr("r = 8"));
}

TEST(LoraAdapterTest, DeltaWeightChecksKeyAndShape) {
  AdapterDir dir;
  dir.WriteConfig(Config(2, 2));
  dir.WriteWeights(
      {{"base_model.model.fc.lora_A.weight", torch::ones({2, 4})},
       {"base_model.model.fc.lora_B.weight", torch::ones({3, 2})}});
  auto adapter = LoraAdapter::Open(dir.path());
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_EQ((*adapter)->DeltaWeight("nope.weight", {3, 4}).status().code(),
            absl::StatusCode::kNotFound);
  auto wrong = (*adapter)->DeltaWeight("fc.weight", {4, 3});
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(wrong.status().message()), HasSubstr("fc.weight"));
}

TEST(LoraAdapterTest, RejectsBadConfigFields) {
  const std::pair<std::string, std::string> cases[] = {
      {R"({"r": "8", "lora_alpha": 8})", "\"r\""},
      {R"({"r": 0, "lora_alpha": 8})", "\"r\""},
      {R"({"r": 2, "lora_alpha": "8"})", "\"lora_alpha\""},
      {R"({"r": 2, "lora_alpha": 8, "use_rslora": "yes"})", "\"use_rslora\""},
      {R"({"r": 2, "lora_alpha": 8, "fan_in_fan_out": 1})",
       "\"fan_in_fan_out\""},
      {R"({"r": 2, "lora_alpha": 8, "rank_pattern": {"fc": 4}})",
       "\"rank_pattern\""},
      {R"({"r": 2, "lora_alpha": 8, "use_dora": true})", "\"use_dora\""},
      {R"({"r": 2, "r": 4, "lora_alpha": 8})", "duplicate key \"r\""},
      {R"([2])", "JSON object"},
  };
  for (const auto& [json, needle] : cases) {
    AdapterDir dir;
    dir.WriteConfig(json);
    dir.WriteWeights(
        {{"base_model.model.fc.lora_A.weight", torch::ones({2, 4})},
         {"base_model.model.fc.lora_B.weight", torch::ones({3, 2})}});
    auto adapter = LoraAdapter::Open(dir.path());
    ASSERT_FALSE(adapter.ok()) << json;
    EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument)
        << json;
    EXPECT_THAT(std::string(adapter.status().message()), HasSubstr(needle))
        << json;
  }
}

TEST(LoraAdapterTest, RejectsTensorsThatAreNotFactors) {
  AdapterDir dir;
  dir.WriteConfig(Config(2, 2));
  dir.WriteWeights(
      {{"base_model.model.fc.lora_A.weight", torch::ones({2, 4})},
       {"base_model.model.fc.lora_B.weight", torch::ones({3, 2})},
       {"base_model.model.classifier.modules_to_save.default.weight",
        torch::ones({2, 3})}});
  auto adapter = LoraAdapter::Open(dir.path());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(adapter.status().message()),
      HasSubstr("modules_to_save.default.weight\" is not a LoRA factor"));
}

TEST(LoraAdapterTest, RefusesPickleWeights) {
  AdapterDir dir;
  dir.WriteConfig(Config(2, 2));
  std::ofstream(absl::StrCat(dir.path(), "/adapter_model.bin")) << "\x80\x02}q";
  auto adapter = LoraAdapter::Open(dir.path());
  EXPECT_EQ(adapter.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(adapter.status().message()),
              HasSubstr("arbitrary code"));
  EXPECT_FALSE(
      IsLoraAdapterDir(absl::StrCat(dir.path(), "/adapter_model.bin")));
}

}  // namespace
}  // namespace mergeguard
