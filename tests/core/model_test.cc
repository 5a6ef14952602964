#include "core/model.h"

#include <torch/script.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// A two-layer TorchScript architecture built in the test:
// [B, 1, 28, 28] -> relu(fc2(relu(fc1(flatten(x))))), fc1 784->8, fc2 8->3.
torch::jit::Module TinyModule() {
  auto unit = std::make_shared<torch::jit::CompilationUnit>();
  auto linear = [&](int64_t in, int64_t out, int64_t seed) {
    torch::jit::Module m(c10::QualifiedName("__torch__.test.Linear"), unit,
                         true);
    torch::manual_seed(seed);
    m.register_parameter("weight", torch::randn({out, in}) * 0.1, false);
    m.register_parameter("bias", torch::randn({out}) * 0.1, false);
    m.define(
        "def forward(self, x):\n"
        "    return torch.linear(x, self.weight, self.bias)\n");
    return m;
  };
  torch::jit::Module root(c10::QualifiedName("__torch__.test.Tiny"), unit,
                          true);
  root.register_module("fc1", linear(784, 8, 1));
  root.register_module("fc2", linear(8, 3, 2));
  root.define(
      "def forward(self, x):\n"
      "    h = torch.relu(self.fc1.forward(torch.flatten(x, 1)))\n"
      "    return torch.relu(self.fc2.forward(h)) + 0.5 * h.sum(1, True)\n");
  return root;
}

std::unique_ptr<Model> TinyModel() {
  auto model = Model::FromModule(TinyModule());
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

std::string TempPath(const std::string& name) {
  std::random_device random;
  return (fs::temp_directory_path() /
          absl::StrCat("model_test_", random(), "_", name))
      .string();
}

torch::Tensor Inputs() {
  torch::manual_seed(7);
  return torch::rand({5, 1, 28, 28});
}

// Reference forward pass with plain torch ops.
torch::Tensor ReferenceFeatures(const NamedTensors& tensors,
                                const torch::Tensor& x) {
  std::map<std::string, torch::Tensor> t(tensors.begin(), tensors.end());
  torch::Tensor h = torch::relu(
      torch::linear(x.flatten(1), t.at("fc1.weight"), t.at("fc1.bias")));
  return torch::relu(torch::linear(h, t.at("fc2.weight"), t.at("fc2.bias"))) +
         0.5 * h.sum(1, true);
}

NamedTensors RandomBackbone(int64_t seed) {
  torch::manual_seed(seed);
  return {{"fc1.weight", torch::randn({8, 784}) * 0.05},
          {"fc1.bias", torch::randn({8}) * 0.05},
          {"fc2.weight", torch::randn({3, 8})},
          {"fc2.bias", torch::randn({3})}};
}

TEST(ModelTest, ListsParametersAndFeatureDim) {
  auto model = TinyModel();
  ASSERT_NE(model, nullptr);
  ASSERT_EQ(model->Parameters().size(), 4u);
  EXPECT_EQ(model->Parameters()[0].name, "fc1.weight");
  EXPECT_EQ(model->Parameters()[0].shape, (std::vector<int64_t>{8, 784}));
  EXPECT_EQ(model->Parameters()[3].name, "fc2.bias");
  EXPECT_EQ(model->NumParameters(), 784 * 8 + 8 + 8 * 3 + 3);
  EXPECT_EQ(model->FeatureDim(), 3);
}

TEST(ModelTest, LoadBackboneInstallsValuesAndIgnoresHeads) {
  auto model = TinyModel();
  NamedTensors backbone = RandomBackbone(3);
  NamedTensors with_heads = backbone;
  with_heads.emplace_back("head.weight", torch::zeros({2, 3}));
  with_heads.emplace_back("mnist/head.bias", torch::zeros({2}));
  ASSERT_TRUE(model->LoadBackbone(with_heads).ok());
  auto features = model->Features(Inputs());
  ASSERT_TRUE(features.ok()) << features.status();
  EXPECT_TRUE(torch::allclose(*features, ReferenceFeatures(backbone, Inputs()),
                              1e-5, 1e-5));
}

TEST(ModelTest, LoadBackboneReportsMissingWrongShapeAndUnknownKeys) {
  auto model = TinyModel();
  NamedTensors missing = RandomBackbone(3);
  missing.pop_back();
  absl::Status status = model->LoadBackbone(missing);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("fc2.bias"));

  NamedTensors wrong = RandomBackbone(3);
  wrong[2].second = torch::zeros({3, 9});
  status = model->LoadBackbone(wrong);
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("fc2.weight"));

  NamedTensors unknown = RandomBackbone(3);
  unknown.emplace_back("fc3.weight", torch::zeros({1}));
  status = model->LoadBackbone(unknown);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("fc3.weight"));
}

TEST(ModelTest, FeaturesRejectsWrongInputShape) {
  auto model = TinyModel();
  EXPECT_EQ(model->Features(torch::zeros({2, 1, 14, 14})).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ALGORITHMS.md §7: a merged tensor with autograd history, installed into the
// module, carries the loss gradient back to the merge coefficient; it must
// equal <dL/dtheta, tau>, read off a leaf installed in its place.
TEST(ModelTest, InstalledTensorsCarryGradientsToMergeCoefficients) {
  auto model = TinyModel();
  NamedTensors base = RandomBackbone(3);
  ASSERT_TRUE(model->LoadBackbone(base).ok());
  torch::manual_seed(11);
  torch::Tensor tau = torch::randn({8, 784}) * 0.05;
  torch::Tensor lambda = torch::full({}, 0.3, torch::requires_grad());
  torch::Tensor theta = base[0].second + lambda * tau;
  ASSERT_TRUE(model->InstallTensor("fc1.weight", theta).ok());
  auto features = model->Features(Inputs());
  ASSERT_TRUE(features.ok()) << features.status();
  features->pow(2).sum().backward();
  ASSERT_TRUE(lambda.grad().defined());

  torch::Tensor leaf = theta.detach().clone().requires_grad_(true);
  ASSERT_TRUE(model->InstallTensor("fc1.weight", leaf).ok());
  auto again = model->Features(Inputs());
  ASSERT_TRUE(again.ok());
  again->pow(2).sum().backward();
  const double by_hand = (leaf.grad() * tau).sum().item<double>();
  EXPECT_NEAR(lambda.grad().item<double>(), by_hand,
              1e-4 * std::max(1.0, std::abs(by_hand)));
  EXPECT_NE(by_hand, 0.0);
}

TEST(ModelTest, InstallTensorChecksNameAndShape) {
  auto model = TinyModel();
  EXPECT_EQ(model->InstallTensor("nope", torch::zeros({1})).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(model->InstallTensor("fc2.bias", torch::zeros({4})).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(ModelTest, SavedArchitectureLoadsWithSameOutputs) {
  auto model = TinyModel();
  ASSERT_TRUE(model->LoadBackbone(RandomBackbone(5)).ok());
  const std::string path = TempPath("tiny.pt");
  ASSERT_TRUE(model->Save(path).ok());
  auto loaded = Model::Load(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ((*loaded)->NumParameters(), model->NumParameters());
  EXPECT_TRUE(
      torch::equal(*(*loaded)->Features(Inputs()), *model->Features(Inputs())));
  fs::remove(path);
}

TEST(ModelTest, LoadRejectsMissingAndGarbageFiles) {
  EXPECT_EQ(Model::Load(TempPath("absent.pt")).status().code(),
            absl::StatusCode::kNotFound);
  const std::string path = TempPath("garbage.pt");
  std::ofstream(path) << "not a zip archive";
  auto garbage = Model::Load(path);
  EXPECT_EQ(garbage.status().code(), absl::StatusCode::kInvalidArgument);
  fs::remove(path);
}

TEST(ModelTest, ClonesAreIndependentAndRunInParallel) {
  auto model = TinyModel();
  ASSERT_TRUE(model->LoadBackbone(RandomBackbone(3)).ok());
  auto clone = model->Clone();
  ASSERT_TRUE(clone.ok());
  ASSERT_TRUE((*clone)->LoadBackbone(RandomBackbone(4)).ok());
  EXPECT_TRUE(torch::allclose(*model->Features(Inputs()),
                              ReferenceFeatures(RandomBackbone(3), Inputs()),
                              1e-5, 1e-5));
  torch::Tensor a;
  torch::Tensor b;
  std::thread first([&] { a = *model->Features(Inputs()); });
  std::thread second([&] { b = *(*clone)->Features(Inputs()); });
  first.join();
  second.join();
  EXPECT_TRUE(torch::allclose(b, ReferenceFeatures(RandomBackbone(4), Inputs()),
                              1e-5, 1e-5));
  EXPECT_FALSE(torch::allclose(a, b));
}

TEST(HeadTest, ReadsHeadsByPrefixAndComputesLogits) {
  NamedTensors tensors = {{"mnist/head.weight", torch::eye(3)},
                          {"mnist/head.bias", torch::tensor({1.0, 0.0, 0.0})}};
  auto head = HeadFromTensors(tensors, "mnist/head.");
  ASSERT_TRUE(head.ok()) << head.status();
  EXPECT_EQ(head->NumClasses(), 3);
  torch::Tensor logits = head->Logits(torch::tensor({{0.0, 2.0, 0.0}}));
  EXPECT_TRUE(torch::equal(logits, torch::tensor({{1.0, 2.0, 0.0}})));
  EXPECT_EQ(HeadFromTensors(tensors, "head.").status().code(),
            absl::StatusCode::kNotFound);
  NamedTensors bad = {{"head.weight", torch::zeros({3, 4})},
                      {"head.bias", torch::zeros({2})}};
  EXPECT_EQ(HeadFromTensors(bad, "head.").status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(HeadTest, RecognizesHeadKeys) {
  EXPECT_TRUE(IsHeadKey("head.weight"));
  EXPECT_TRUE(IsHeadKey("fashion/head.bias"));
  EXPECT_FALSE(IsHeadKey("conv1.weight"));
  EXPECT_FALSE(IsHeadKey("block0.headless.weight"));
}

}  // namespace
}  // namespace mergeguard
