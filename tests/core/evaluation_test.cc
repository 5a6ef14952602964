#include "core/evaluation.h"

#include <torch/torch.h>

#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/tensor_views.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  std::random_device random;
  return (fs::temp_directory_path() /
          absl::StrCat("evaluation_test_", random(), "_", name))
      .string();
}

TEST(TriggerTest, PatchReplacesExactlyItsRegion) {
  Trigger trigger;
  trigger.kind = TriggerKind::kPatch;
  trigger.pattern = torch::tensor({{{1.0f, 0.0f}, {0.0f, 1.0f}}});
  trigger.row = 5;
  trigger.col = 6;
  torch::Tensor inputs = torch::full({2, 1, 8, 8}, 0.5f);
  auto out = ApplyTrigger(trigger, inputs);
  ASSERT_TRUE(out.ok()) << out.status();
  torch::Tensor expected = inputs.clone();
  expected.index_put_({torch::indexing::Slice(), 0, 5, 6}, 1.0f);
  expected.index_put_({torch::indexing::Slice(), 0, 5, 7}, 0.0f);
  expected.index_put_({torch::indexing::Slice(), 0, 6, 6}, 0.0f);
  expected.index_put_({torch::indexing::Slice(), 0, 6, 7}, 1.0f);
  EXPECT_TRUE(torch::equal(*out, expected));
  // The input is untouched.
  EXPECT_TRUE(torch::equal(inputs, torch::full({2, 1, 8, 8}, 0.5f)));
}

TEST(TriggerTest, BlendMixesWholeImage) {
  Trigger trigger;
  trigger.kind = TriggerKind::kBlend;
  trigger.pattern = torch::ones({1, 4, 4});
  trigger.blend_alpha = 0.25;
  auto out = ApplyTrigger(trigger, torch::zeros({3, 1, 4, 4}));
  ASSERT_TRUE(out.ok());
  EXPECT_TRUE(torch::allclose(*out, torch::full({3, 1, 4, 4}, 0.25f)));
}

TEST(TriggerTest, PatchIsDifferentiableInThePattern) {
  Trigger trigger;
  trigger.pattern = torch::full({1, 2, 2}, 0.5f, torch::requires_grad());
  auto out = ApplyTrigger(trigger, torch::zeros({1, 1, 4, 4}));
  ASSERT_TRUE(out.ok());
  out->sum().backward();
  EXPECT_TRUE(torch::equal(trigger.pattern.grad(), torch::ones({1, 2, 2})));
}

TEST(TriggerTest, ValidationRejectsBadTriggers) {
  Trigger outside;
  outside.pattern = torch::ones({1, 4, 4});
  outside.row = 26;
  EXPECT_THAT(ValidateTrigger(outside, {1, 28, 28}).message(),
              HasSubstr("does not fit"));
  Trigger channels;
  channels.pattern = torch::ones({3, 4, 4});
  EXPECT_FALSE(ValidateTrigger(channels, {1, 28, 28}).ok());
  Trigger blend;
  blend.kind = TriggerKind::kBlend;
  blend.pattern = torch::ones({1, 27, 28});
  EXPECT_FALSE(ValidateTrigger(blend, {1, 28, 28}).ok());
  blend.pattern = torch::ones({1, 28, 28});
  blend.blend_alpha = 0.0;
  EXPECT_FALSE(ValidateTrigger(blend, {1, 28, 28}).ok());
  blend.blend_alpha = 0.15;
  EXPECT_TRUE(ValidateTrigger(blend, {1, 28, 28}).ok());
  EXPECT_FALSE(ApplyTrigger(outside, torch::zeros({1, 1, 28, 28})).ok());
}

TEST(TriggerTest, MaskAndPatternStampLikeApplyTrigger) {
  torch::manual_seed(4);
  torch::Tensor inputs = torch::rand({3, 2, 10, 12});
  Trigger patch;
  patch.pattern = torch::rand({2, 3, 3});
  patch.row = 6;
  patch.col = 8;
  Trigger blend;
  blend.kind = TriggerKind::kBlend;
  blend.pattern = torch::rand({2, 10, 12});
  blend.blend_alpha = 0.2;
  for (const Trigger& trigger : {patch, blend}) {
    auto stamp = TriggerMaskAndPattern(trigger, {2, 10, 12});
    ASSERT_TRUE(stamp.ok()) << stamp.status();
    EXPECT_EQ(stamp->mask.sizes(), (std::vector<int64_t>{1, 10, 12}));
    EXPECT_EQ(stamp->pattern.sizes(), (std::vector<int64_t>{2, 10, 12}));
    auto applied = ApplyTrigger(trigger, inputs);
    ASSERT_TRUE(applied.ok()) << applied.status();
    EXPECT_TRUE(torch::allclose(
        (1 - stamp->mask) * inputs + stamp->mask * stamp->pattern, *applied,
        1e-6, 1e-6));
  }
  auto patch_stamp = TriggerMaskAndPattern(patch, {2, 10, 12});
  EXPECT_DOUBLE_EQ(patch_stamp->mask.sum().item<double>(), 9.0);
  // Validated like ApplyTrigger: a patch off the image is refused.
  patch.col = 10;
  EXPECT_EQ(TriggerMaskAndPattern(patch, {2, 10, 12}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(TriggerTest, ResolvesNamedLocations) {
  using Location = TriggerLocation;
  EXPECT_EQ(ResolvePatchLocation(Location::kBottomRight, 4, 28, 28),
            std::make_pair(int64_t{23}, int64_t{23}));
  EXPECT_EQ(ResolvePatchLocation(Location::kTopLeft, 4, 28, 28),
            std::make_pair(int64_t{1}, int64_t{1}));
  EXPECT_EQ(ResolvePatchLocation(Location::kCenter, 4, 28, 28),
            std::make_pair(int64_t{12}, int64_t{12}));
  EXPECT_EQ(*ParseTriggerLocation("top_right"), Location::kTopRight);
  EXPECT_FALSE(ParseTriggerLocation("middle").ok());
  EXPECT_EQ(*ParseTriggerKind("blend"), TriggerKind::kBlend);
  EXPECT_FALSE(ParseTriggerKind("warp").ok());
}

TEST(MetricsTest, AccuracyOnHandMadePredictions) {
  torch::Tensor labels = torch::tensor({0, 1, 2, 3}, torch::kInt64);
  EXPECT_DOUBLE_EQ(Accuracy(torch::tensor({0, 1, 0, 3}, torch::kInt64), labels),
                   0.75);
  EXPECT_DOUBLE_EQ(Accuracy(torch::empty({0}, torch::kInt64),
                            torch::empty({0}, torch::kInt64)),
                   0.0);
}

// ASR counts only examples whose true label is not the target.
TEST(MetricsTest, AttackSuccessRateExcludesTargetClassExamples) {
  torch::Tensor labels = torch::tensor({0, 0, 1, 2, 3, 1}, torch::kInt64);
  torch::Tensor predicted = torch::tensor({0, 0, 0, 0, 3, 1}, torch::kInt64);
  AttackResult result = AttackSuccessRate(predicted, labels, /*target=*/0);
  EXPECT_EQ(result.evaluated, 4);
  EXPECT_DOUBLE_EQ(result.asr, 0.5);
  AttackResult none = AttackSuccessRate(torch::zeros({2}, torch::kInt64),
                                        torch::zeros({2}, torch::kInt64), 0);
  EXPECT_EQ(none.evaluated, 0);
  EXPECT_DOUBLE_EQ(none.asr, 0.0);
}

TEST(MetricsTest, NormalizedAccuracy) {
  EXPECT_DOUBLE_EQ(NormalizedAccuracy(0.9, 0.96), 0.9 / 0.96);
  EXPECT_DOUBLE_EQ(NormalizedAccuracy(0.9, 0.0), 0.0);
}

// A hand-built model whose features are the mean brightness of the
// bottom-right 2x2 corner and of the whole image; with a head that reads the
// corner, a white corner patch flips every prediction to class 1.
class CornerModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto unit = std::make_shared<torch::jit::CompilationUnit>();
    torch::jit::Module module(c10::QualifiedName("__torch__.test.Corner"), unit,
                              true);
    module.register_parameter("scale", torch::ones({2}), false);
    module.define(
        "def forward(self, x):\n"
        "    corner = x[:, 0, 26:, 26:].mean([1, 2])\n"
        "    whole = x[:, 0].mean([1, 2])\n"
        "    return torch.stack([corner, whole], 1) * self.scale\n");
    auto model = Model::FromModule(module);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    head_.weight = torch::tensor({{-1.0f, 0.0f}, {1.0f, 0.0f}});
    head_.bias = torch::tensor({0.5f, -0.5f});
  }

  std::unique_ptr<Model> model_;
  Head head_;
};

TEST_F(CornerModelTest, AccuracyAndAttackThroughTheModel) {
  LabeledImages test;
  test.inputs = torch::zeros({6, 1, 28, 28});
  test.labels = torch::tensor({0, 0, 0, 1, 1, 0}, torch::kInt64);
  auto accuracy = EvaluateAccuracy(*model_, head_, test, {/*batch_size=*/4});
  ASSERT_TRUE(accuracy.ok()) << accuracy.status();
  EXPECT_DOUBLE_EQ(*accuracy, 4.0 / 6.0);

  Trigger trigger;
  trigger.pattern = torch::ones({1, 2, 2});
  trigger.row = 26;
  trigger.col = 26;
  auto attack = EvaluateAttack(*model_, head_, test, trigger, /*target=*/1);
  ASSERT_TRUE(attack.ok()) << attack.status();
  EXPECT_EQ(attack->evaluated, 4);
  EXPECT_DOUBLE_EQ(attack->asr, 1.0);
  // A patch elsewhere does nothing.
  trigger.row = 0;
  trigger.col = 0;
  attack = EvaluateAttack(*model_, head_, test, trigger, /*target=*/1);
  ASSERT_TRUE(attack.ok());
  EXPECT_DOUBLE_EQ(attack->asr, 0.0);
  EXPECT_EQ(EvaluateAttack(*model_, head_, test, trigger, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LabeledImagesTest, RoundTripsFloatAndUint8) {
  const std::string path = TempPath("set.safetensors");
  LabeledImages images{torch::rand({3, 1, 28, 28}),
                       torch::tensor({1, 2, 3}, torch::kInt64)};
  ASSERT_TRUE(SaveLabeledImages(path, images).ok());
  auto loaded = LoadLabeledImages(path);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_TRUE(torch::equal(loaded->inputs, images.inputs));
  EXPECT_TRUE(torch::equal(loaded->labels, images.labels));

  LabeledImages bytes{torch::full({2, 1, 28, 28}, 255, torch::kUInt8),
                      torch::tensor({0, 1}, torch::kInt64)};
  ASSERT_TRUE(SaveLabeledImages(path, bytes).ok());
  loaded = LoadLabeledImages(path);
  ASSERT_TRUE(loaded.ok());
  EXPECT_TRUE(torch::equal(loaded->inputs, torch::ones({2, 1, 28, 28})));
  fs::remove(path);
}

TEST(LabeledImagesTest, RejectsMismatchedTensors) {
  const std::string path = TempPath("bad.safetensors");
  ASSERT_TRUE(SaveTensors(path, {{"inputs", torch::zeros({3, 1, 28, 28})},
                                 {"labels", torch::zeros({2}, torch::kInt64)}})
                  .ok());
  EXPECT_EQ(LoadLabeledImages(path).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(
      SaveTensors(path, {{"inputs", torch::zeros({3, 1, 28, 28})}}).ok());
  EXPECT_THAT(LoadLabeledImages(path).status().message(), HasSubstr("labels"));
  fs::remove(path);
}

}  // namespace
}  // namespace mergeguard
