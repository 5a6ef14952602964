#include "core/lfpm.h"

#include <torch/script.h>
#include <torch/torch.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/evaluation.h"
#include "core/merge.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

#ifdef MERGEGUARD_LFPM_TEST_WITH_BENCH
#include "bench/lfpm_rows.h"
#include "bench/scenario_builder.h"
#include "bench/scenario_eval.h"
#include "core/scenario.h"
#endif

namespace mergeguard {
namespace {

namespace fs = std::filesystem;
using lfpm_internal::LfpmProblemForTesting;
using ::testing::HasSubstr;

// A small conv + linear TorchScript architecture, so PEFT mode reshapes a
// 4-D conv weight: [B, 1, 28, 28] -> conv 3x3/2 (4 ch) -> relu -> fc 676->16.
torch::jit::Module TinyModule() {
  auto unit = std::make_shared<torch::jit::CompilationUnit>();
  auto layer = [&](const std::string& kind, torch::Tensor weight,
                   torch::Tensor bias) {
    torch::jit::Module m(
        c10::QualifiedName(absl::StrCat("__torch__.lfpm_test.", kind)), unit,
        true);
    m.register_parameter("weight", weight, false);
    m.register_parameter("bias", bias, false);
    return m;
  };
  torch::manual_seed(3);
  torch::jit::Module root(c10::QualifiedName("__torch__.lfpm_test.Tiny"), unit,
                          true);
  root.register_module("conv", layer("Conv", torch::randn({4, 1, 3, 3}) * 0.3,
                                     torch::zeros({4})));
  root.register_module(
      "fc", layer("Fc", torch::randn({16, 676}) * 0.05, torch::zeros({16})));
  root.define(R"(
def forward(self, x):
    h = torch.relu(torch.conv2d(x, self.conv.weight, self.conv.bias, [2, 2]))
    return torch.relu(torch.linear(torch.flatten(h, 1), self.fc.weight, self.fc.bias))
)");
  return root;
}

std::unique_ptr<Model> TinyModel() {
  auto model = Model::FromModule(TinyModule());
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

// A merged model: a random backbone plus heads for tasks "a" (3 classes)
// and "b" (5 classes).
NamedTensors MergedTensors() {
  torch::manual_seed(11);
  return {{"conv.weight", torch::randn({4, 1, 3, 3}) * 0.3},
          {"conv.bias", torch::randn({4}) * 0.1},
          {"fc.weight", torch::randn({16, 676}) * 0.05},
          {"fc.bias", torch::randn({16}) * 0.1},
          {"a/head.weight", torch::randn({3, 16})},
          {"a/head.bias", torch::randn({3}) * 0.1},
          {"b/head.weight", torch::randn({5, 16})},
          {"b/head.bias", torch::randn({5}) * 0.1}};
}

// Task "a" is labeled, task "b" unlabeled.
std::vector<LfpmTask> Tasks() {
  torch::manual_seed(12);
  LfpmTask a{"a",
             torch::rand({24, 1, 28, 28}),
             torch::randint(0, 3, {24}, torch::kInt64),
             std::nullopt,
             {},
             {}};
  LfpmTask b{
      "b", torch::rand({20, 1, 28, 28}), torch::Tensor(), std::nullopt, {}, {}};
  return {a, b};
}

// Small settings so each run takes well under a second.
LfpmOptions FastOptions(LfpmMode mode) {
  LfpmOptions options;
  options.mode = mode;
  options.steps = 4;
  options.batch_size = 8;
  options.report_examples = 8;
  options.triggers.scan_steps = 3;
  options.triggers.scan_batch_size = 4;
  options.triggers.update_every = 2;
  options.triggers.steps_per_update = 1;
  options.threads = 1;
  return options;
}

std::string TempPath(const std::string& name) {
  std::random_device random;
  return (fs::temp_directory_path() /
          absl::StrCat("lfpm_test_", random(), random(), "_", name))
      .string();
}

const torch::Tensor& Find(const NamedTensors& tensors,
                          const std::string& name) {
  for (const auto& [key, tensor] : tensors) {
    if (key == name) return tensor;
  }
  ADD_FAILURE() << "no tensor " << name;
  static const torch::Tensor* const kEmpty = new torch::Tensor();
  return *kEmpty;
}

// Randomizes τab's leaves, so gradients differ from node to node.
void PerturbTrainable(LfpmProblemForTesting& problem, double scale) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(21);
  for (torch::Tensor& leaf : problem.Trainable()) {
    leaf.copy_(torch::randn(leaf.sizes()) * scale);
  }
}

class LfpmModeTest : public ::testing::TestWithParam<LfpmMode> {};

INSTANTIATE_TEST_SUITE_P(Modes, LfpmModeTest,
                         ::testing::Values(LfpmMode::kFull, LfpmMode::kPeft),
                         [](const auto& info) {
                           return std::string(LfpmModeName(info.param));
                         });

TEST_P(LfpmModeTest, TauStartsAtZeroSoTheOutputIsTheMergedModel) {
  auto model = TinyModel();
  NamedTensors merged = MergedTensors();
  auto problem = LfpmProblemForTesting::Create(*model, merged, Tasks(),
                                               FastOptions(GetParam()));
  ASSERT_TRUE(problem.ok()) << problem.status();
  auto tau = (*problem)->Tau();
  ASSERT_TRUE(tau.ok()) << tau.status();
  ASSERT_FALSE(tau->empty());
  for (const auto& [name, t] : *tau) {
    EXPECT_EQ(t.abs().max().item<float>(), 0.0f) << name;
  }
  ASSERT_TRUE(model->LoadBackbone(merged).ok());
  torch::Tensor x = torch::rand({6, 1, 28, 28});
  auto reference = model->Features(x);
  ASSERT_TRUE(reference.ok());
  for (double alpha : {0.0, 0.5, 1.0}) {
    auto features = (*problem)->Features(alpha, x);
    ASSERT_TRUE(features.ok()) << features.status();
    EXPECT_TRUE(torch::equal(*features, reference->detach())) << alpha;
  }

  // A run without outer steps returns θm itself and a zero τab.
  LfpmOptions options = FastOptions(GetParam());
  options.steps = 0;
  auto result = RunLfpm(*model, merged, Tasks(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->repaired.size(), merged.size());
  for (size_t i = 0; i < merged.size(); ++i) {
    EXPECT_EQ(result->repaired[i].first, merged[i].first);
    EXPECT_TRUE(torch::equal(result->repaired[i].second, merged[i].second))
        << merged[i].first;
  }
  EXPECT_EQ(result->report.tau_norm, 0.0);
}

TEST(LfpmTest, QuadratureNodesFallInTheirStrata) {
  for (int64_t k : {1, 2, 4, 7}) {
    for (uint64_t seed = 0; seed < 50; ++seed) {
      std::vector<double> nodes =
          lfpm_internal::StratifiedNodesForTesting(k, seed);
      ASSERT_EQ(nodes.size(), static_cast<size_t>(k));
      for (int64_t i = 0; i < k; ++i) {
        EXPECT_GT(nodes[i], static_cast<double>(i) / k) << k << " " << seed;
        EXPECT_LE(nodes[i], static_cast<double>(i + 1) / k) << k << " " << seed;
      }
    }
  }
  // Stratified, not fixed: the nodes move with the seed.
  EXPECT_NE(lfpm_internal::StratifiedNodesForTesting(4, 1),
            lfpm_internal::StratifiedNodesForTesting(4, 2));
}

TEST_P(LfpmModeTest, AccumulatedGradientIsTheMeanOfPerNodeGradients) {
  auto model = TinyModel();
  auto problem = LfpmProblemForTesting::Create(*model, MergedTensors(), Tasks(),
                                               FastOptions(GetParam()));
  ASSERT_TRUE(problem.ok()) << problem.status();
  PerturbTrainable(**problem, GetParam() == LfpmMode::kFull ? 0.01 : 0.1);
  std::vector<torch::Tensor> leaves = (*problem)->Trainable();
  const std::vector<double> alphas = {0.1, 0.4, 0.6, 0.95};

  std::vector<std::vector<torch::Tensor>> per_node;
  for (double alpha : alphas) {
    auto loss = (*problem)->LossAt(alpha);
    ASSERT_TRUE(loss.ok()) << loss.status();
    per_node.push_back(torch::autograd::grad({*loss}, leaves));
  }
  ASSERT_TRUE((*problem)->AccumulateGradients(alphas).ok());
  for (size_t i = 0; i < leaves.size(); ++i) {
    torch::Tensor mean = torch::zeros_like(leaves[i]);
    for (const auto& grads : per_node) mean += grads[i] / 4.0;
    ASSERT_TRUE(leaves[i].grad().defined()) << i;
    EXPECT_TRUE(torch::allclose(leaves[i].grad(), mean, 1e-4, 1e-7))
        << "leaf " << i << " max diff "
        << (leaves[i].grad() - mean).abs().max().item<float>();
  }
  // The check has teeth: the nodes' gradients differ, and a gradient of the
  // last node alone does not match the mean.
  const torch::Tensor& first = per_node.front().back();
  const torch::Tensor& last = per_node.back().back();
  EXPECT_GT((first - last).abs().max().item<float>(), 1e-6);
  EXPECT_FALSE(torch::allclose(leaves.back().grad(), last, 1e-4, 1e-7));

  // Accumulating again starts from zero (no stale gradients).
  ASSERT_TRUE((*problem)->AccumulateGradients(alphas).ok());
  torch::Tensor mean = torch::zeros_like(leaves.back());
  for (const auto& grads : per_node) mean += grads.back() / 4.0;
  EXPECT_TRUE(torch::allclose(leaves.back().grad(), mean, 1e-4, 1e-7));
}

// With ctl_endpoint_gradient the accumulated gradient is the full one: the
// mean of the per-node gradients taken through the chord's endpoint too,
// and not the stop-gradient one.
TEST_P(LfpmModeTest, EndpointGradientAccumulatesTheFullGradient) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(GetParam());
  options.ctl_path_weight = 100.0;  // so the endpoint's share is visible
  const double scale = GetParam() == LfpmMode::kFull ? 0.05 : 0.3;
  const std::vector<double> alphas = {0.1, 0.4, 0.6, 0.95};

  auto accumulated = [&](bool through_endpoint) {
    options.ctl_endpoint_gradient = through_endpoint;
    auto problem = LfpmProblemForTesting::Create(*model, MergedTensors(),
                                                 Tasks(), options);
    EXPECT_TRUE(problem.ok()) << problem.status();
    PerturbTrainable(**problem, scale);
    std::vector<torch::Tensor> leaves = (*problem)->Trainable();
    std::vector<torch::Tensor> mean;
    for (const torch::Tensor& leaf : leaves) {
      mean.push_back(torch::zeros_like(leaf));
    }
    for (double alpha : alphas) {
      auto loss = (*problem)->LossAt(alpha);
      EXPECT_TRUE(loss.ok()) << loss.status();
      std::vector<torch::Tensor> grads = torch::autograd::grad({*loss}, leaves);
      for (size_t i = 0; i < leaves.size(); ++i) mean[i] += grads[i] / 4.0;
    }
    EXPECT_TRUE((*problem)->AccumulateGradients(alphas).ok());
    std::vector<torch::Tensor> accumulated_grads;
    for (size_t i = 0; i < leaves.size(); ++i) {
      // float32 sums in another order: tolerance relative to the largest
      // entry (the path weight makes the gradients large).
      const double difference =
          (leaves[i].grad() - mean[i]).abs().max().item<double>();
      const double largest = mean[i].abs().max().item<double>();
      EXPECT_LE(difference, 1e-5 * std::max(1.0, largest))
          << "leaf " << i << " through_endpoint " << through_endpoint;
      accumulated_grads.push_back(leaves[i].grad().clone());
    }
    return accumulated_grads;
  };
  std::vector<torch::Tensor> full = accumulated(true);
  std::vector<torch::Tensor> stopped = accumulated(false);
  ASSERT_EQ(full.size(), stopped.size());
  double largest_difference = 0.0;
  for (size_t i = 0; i < full.size(); ++i) {
    largest_difference = std::max(
        largest_difference, (full[i] - stopped[i]).abs().max().item<double>());
  }
  EXPECT_GT(largest_difference, 1e-5);
}

TEST(LfpmTest, LoraDeltaIsBTimesAScaled) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kPeft);
  options.lora_rank = 2;
  options.lora_alpha = 6.0;  // scale 3
  auto problem =
      LfpmProblemForTesting::Create(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(problem.ok()) << problem.status();
  std::vector<torch::Tensor> leaves = (*problem)->Trainable();
  // conv.weight and fc.weight only: biases have no matrix to factor.
  ASSERT_EQ(leaves.size(), 4u);
  // B starts at 0, A does not (PEFT's init).
  EXPECT_EQ(leaves[1].abs().max().item<float>(), 0.0f);
  EXPECT_GT(leaves[0].abs().max().item<float>(), 0.0f);
  EXPECT_EQ(leaves[0].sizes().vec(), (std::vector<int64_t>{2, 9}));
  EXPECT_EQ(leaves[1].sizes().vec(), (std::vector<int64_t>{4, 2}));
  EXPECT_EQ(leaves[2].sizes().vec(), (std::vector<int64_t>{2, 676}));
  EXPECT_EQ(leaves[3].sizes().vec(), (std::vector<int64_t>{16, 2}));
  PerturbTrainable(**problem, 0.5);
  auto tau = (*problem)->Tau();
  ASSERT_TRUE(tau.ok());
  ASSERT_EQ(tau->size(), 2u);
  EXPECT_EQ((*tau)[0].first, "conv.weight");
  EXPECT_TRUE(torch::allclose(
      (*tau)[0].second,
      (torch::matmul(leaves[1], leaves[0]) * 3.0).view({4, 1, 3, 3})));
  EXPECT_EQ((*tau)[1].first, "fc.weight");
  EXPECT_TRUE(torch::allclose((*tau)[1].second,
                              torch::matmul(leaves[3], leaves[2]) * 3.0));
  // And the model runs θm + α·B·A·scale.
  NamedTensors shifted = MergedTensors();
  for (auto& [name, tensor] : shifted) {
    if (name == "conv.weight") tensor = tensor + 0.5 * (*tau)[0].second;
    if (name == "fc.weight") tensor = tensor + 0.5 * (*tau)[1].second;
  }
  ASSERT_TRUE(model->LoadBackbone(shifted).ok());
  torch::Tensor x = torch::rand({3, 1, 28, 28});
  auto expected = model->Features(x);
  auto actual = (*problem)->Features(0.5, x);
  ASSERT_TRUE(expected.ok() && actual.ok());
  EXPECT_TRUE(torch::allclose(*actual, expected->detach(), 1e-4, 1e-5));
}

TEST(LfpmTest, PeftDenseVectorsTrainBiasesDenselyBesideTheLoraFactors) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kPeft);
  options.lora_rank = 2;
  options.peft_dense_vectors = true;
  auto problem =
      LfpmProblemForTesting::Create(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(problem.ok()) << problem.status();
  // conv: A, B, then its bias densely; fc likewise.
  std::vector<torch::Tensor> leaves = (*problem)->Trainable();
  ASSERT_EQ(leaves.size(), 6u);
  EXPECT_EQ(leaves[2].sizes().vec(), (std::vector<int64_t>{4}));
  EXPECT_EQ(leaves[5].sizes().vec(), (std::vector<int64_t>{16}));
  // τab still starts at 0: B = 0 and the dense vectors are zeros.
  auto zero = (*problem)->Tau();
  ASSERT_TRUE(zero.ok());
  ASSERT_EQ(zero->size(), 4u);
  for (const auto& [name, tensor] : *zero) {
    EXPECT_EQ(tensor.abs().max().item<float>(), 0.0f) << name;
  }
  PerturbTrainable(**problem, 0.5);
  auto tau = (*problem)->Tau();
  ASSERT_TRUE(tau.ok());
  EXPECT_EQ((*tau)[1].first, "conv.bias");
  EXPECT_TRUE(torch::equal((*tau)[1].second, leaves[2].detach()));
  EXPECT_TRUE(torch::allclose(
      (*tau)[2].second, torch::matmul(leaves[4], leaves[3]) * 4.0));
  // Without the flag, PEFT leaves the biases at θm.
  options.peft_dense_vectors = false;
  auto plain =
      LfpmProblemForTesting::Create(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->Trainable().size(), 4u);
}

TEST(LfpmTest, LayerPrefixesRestrictTau) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.layer_prefixes = {"fc."};
  auto problem =
      LfpmProblemForTesting::Create(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(problem.ok());
  auto tau = (*problem)->Tau();
  ASSERT_TRUE(tau.ok());
  ASSERT_EQ(tau->size(), 2u);
  EXPECT_EQ((*tau)[0].first, "fc.weight");
  EXPECT_EQ((*tau)[1].first, "fc.bias");
  options.layer_prefixes = {"nothing."};
  EXPECT_EQ(
      LfpmProblemForTesting::Create(*model, MergedTensors(), Tasks(), options)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
}

TEST_P(LfpmModeTest, SeededRunsAreDeterministic) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(GetParam());
  options.seed = 7;
  auto first = RunLfpm(*model, MergedTensors(), Tasks(), options);
  auto second = RunLfpm(*model, MergedTensors(), Tasks(), options);
  options.seed = 8;
  auto other = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok() && other.ok());
  ASSERT_EQ(first->tau.size(), second->tau.size());
  bool differs = false;
  for (size_t i = 0; i < first->tau.size(); ++i) {
    EXPECT_TRUE(torch::equal(first->tau[i].second, second->tau[i].second))
        << first->tau[i].first;
    differs =
        differs || !torch::equal(first->tau[i].second, other->tau[i].second);
  }
  EXPECT_TRUE(differs);
  EXPECT_EQ(first->report.loss_curve, second->report.loss_curve);
  EXPECT_GT(first->report.tau_norm, 0.0);
}

TEST(LfpmTest, ReportsProgressAndHonoursCancellation) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  std::vector<LfpmProgress> progress;
  options.on_progress = [&](const LfpmProgress& p) { progress.push_back(p); };
  auto result = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(progress.size(), 4u);
  EXPECT_EQ(progress.back().step, 4);
  EXPECT_EQ(progress.back().steps, 4);
  EXPECT_GT(progress.back().loss, 0.0);
  EXPECT_GE(progress.back().elapsed_seconds, progress.front().elapsed_seconds);

  // Cancel once the first outer step has reported.
  progress.clear();
  std::atomic<bool> cancel{false};
  options.on_progress = [&](const LfpmProgress& p) {
    progress.push_back(p);
    cancel = true;
  };
  options.is_cancelled = [&] { return cancel.load(); };
  auto cancelled = RunLfpm(*model, MergedTensors(), Tasks(), options);
  EXPECT_EQ(cancelled.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(progress.size(), 1u);

  // Cancelled before anything ran.
  options.is_cancelled = [] { return true; };
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kCancelled);
}

TEST(LfpmTest, RejectsBadInputs) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.path_nodes = 0;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options = FastOptions(LfpmMode::kFull);
  options.device = "tpu";
  EXPECT_FALSE(RunLfpm(*model, MergedTensors(), Tasks(), options).ok());
  options = FastOptions(LfpmMode::kFull);
  std::vector<LfpmTask> tasks = Tasks();
  tasks[0].name = "missing";
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), tasks, options).status().code(),
            absl::StatusCode::kNotFound);
  tasks = Tasks();
  tasks[0].labels[0] = 3;  // head "a" has 3 classes
  auto status = RunLfpm(*model, MergedTensors(), tasks, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("labels"));
  tasks = Tasks();
  tasks[1].inputs = torch::rand({4, 1, 14, 14});
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), tasks, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, AnomalyIndexIsMadBased) {
  // median 10, |dev| = {8, 1, 0, 1, 2} -> MAD 1; (10 - 2) / 1.4826.
  EXPECT_NEAR(LfpmAnomalyIndex({2, 9, 10, 11, 12}), 8.0 / 1.4826, 1e-9);
  // Only the smallest norm counts: median 12, MAD 2, (12 - 10) / (1.4826 * 2).
  EXPECT_NEAR(LfpmAnomalyIndex({10, 11, 12, 30, 31}), 1.0 / 1.4826, 1e-9);
  EXPECT_EQ(LfpmAnomalyIndex({1, 5}), 0.0);
  // Identical norms: no division by zero, no anomaly.
  EXPECT_EQ(LfpmAnomalyIndex({4, 4, 4}), 0.0);
}

TEST(LfpmTest, ReportHasPathCurveTriggersAndAnomalies) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kPeft);
  auto result = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  const LfpmReport& report = result->report;
  ASSERT_EQ(report.path.size(), 5u);
  EXPECT_EQ(report.path[0].alpha, 0.0);
  EXPECT_EQ(report.path[4].alpha, 1.0);
  EXPECT_EQ(report.path[0].task_asr.size(), 2u);
  ASSERT_EQ(report.triggers.size(), 2u);
  EXPECT_EQ(report.triggers[0].targets.size(), 1u);
  EXPECT_GT(report.triggers[0].mask_l1[0], 0.0);
  ASSERT_EQ(report.anomaly_merged.size(), 2u);
  EXPECT_EQ(report.anomaly_merged[1].class_norms.size(), 5u);
  EXPECT_EQ(report.anomaly_repaired.size(), 2u);
  ASSERT_EQ(report.loss_curve.size(), 4u);
  ASSERT_EQ(report.clean_loss_curve.size(), 4u);
  ASSERT_EQ(report.backdoor_loss_curve.size(), 4u);
  ASSERT_EQ(report.ctl_loss_curve.size(), 4u);
  ASSERT_EQ(report.tau_norm_curve.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    // J is the weighted sum of the recorded terms.
    EXPECT_NEAR(report.loss_curve[i],
                report.clean_loss_curve[i] +
                    options.beta * report.backdoor_loss_curve[i] +
                    options.gamma * report.ctl_loss_curve[i],
                1e-9);
    EXPECT_GT(report.tau_norm_curve[i], 0.0);
  }
  // ‖τab‖ after the last step is the reported one.
  EXPECT_NEAR(report.tau_norm_curve.back(), report.tau_norm,
              1e-5 * report.tau_norm);
  auto parsed = nlohmann::json::parse(LfpmReportToJson(report));
  EXPECT_EQ(parsed["mode"], "peft");
  EXPECT_EQ(parsed["ctl_loss_curve"].size(), 4u);
  EXPECT_EQ(parsed["tau_norm_curve"].size(), 4u);
  EXPECT_EQ(parsed["path"].size(), 5u);
  EXPECT_EQ(parsed["anomaly_threshold"], 2.0);
  EXPECT_TRUE(parsed["anomaly_merged"][0].contains("anomaly_index"));

  options.triggers.targeting = TriggerTargeting::kUntargeted;
  auto untargeted = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(untargeted.ok()) << untargeted.status();
  EXPECT_EQ(untargeted->report.triggers[0].targets, (std::vector<int64_t>{-1}));
}

TEST(LfpmTest, ZeroLearningRatePicksTheModesDefaultAndTheRecordSaysWhichRan) {
  LfpmOptions options = FastOptions(LfpmMode::kPeft);
  EXPECT_EQ(LfpmEffectiveLearningRate(options), 3e-4);
  // A job's recorded options carry the rate that ran, not the 0 it asked for.
  EXPECT_EQ(nlohmann::json::parse(LfpmOptionsToJson(options))["learning_rate"],
            3e-4);
  options.mode = LfpmMode::kFull;
  EXPECT_EQ(LfpmEffectiveLearningRate(options), 1e-4);
  options.learning_rate = 2e-3;
  EXPECT_EQ(LfpmEffectiveLearningRate(options), 2e-3);
  options.mode = LfpmMode::kPeft;
  EXPECT_EQ(LfpmEffectiveLearningRate(options), 2e-3);
}

TEST(LfpmTest, CosineScheduleShrinksTheLateSteps) {
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.steps = 8;
  EXPECT_EQ(LfpmLearningRateAt(options, 1), kLfpmFullLearningRate);
  EXPECT_EQ(LfpmLearningRateAt(options, 8), kLfpmFullLearningRate);
  options.learning_rate_schedule = LearningRateSchedule::kCosine;
  EXPECT_DOUBLE_EQ(LfpmLearningRateAt(options, 1), kLfpmFullLearningRate);
  EXPECT_DOUBLE_EQ(LfpmLearningRateAt(options, 5), 0.5 * kLfpmFullLearningRate);
  EXPECT_DOUBLE_EQ(
      LfpmLearningRateAt(options, 8),
      kLfpmFullLearningRate * 0.5 * (1.0 + std::cos(M_PI * 7 / 8)));
  for (int64_t step = 2; step <= 8; ++step) {
    EXPECT_LT(LfpmLearningRateAt(options, step),
              LfpmLearningRateAt(options, step - 1));
    EXPECT_GT(LfpmLearningRateAt(options, step), 0.0);
  }

  // Same seed, same first step; the cosine run then takes smaller Adam
  // steps (its rates sum to 4.5 full steps of 8), so τab ends shorter.
  auto model = TinyModel();
  options.triggers.steps_per_update = 0;
  auto cosine = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(cosine.ok()) << cosine.status();
  options.learning_rate_schedule = LearningRateSchedule::kConstant;
  auto constant = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(constant.ok()) << constant.status();
  EXPECT_DOUBLE_EQ(cosine->report.tau_norm_curve[0],
                   constant->report.tau_norm_curve[0]);
  EXPECT_LT(cosine->report.tau_norm, 0.8 * constant->report.tau_norm);
  auto parsed = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(parsed["learning_rate_schedule"], "constant");
}

TEST(LfpmTest, ScanIsThePassRunLfpmStartsWith) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.steps = 1;
  auto run = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(run.ok()) << run.status();
  auto scans = ScanLfpmTasks(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(scans.ok()) << scans.status();
  ASSERT_EQ(scans->size(), 2u);
  for (size_t i = 0; i < scans->size(); ++i) {
    const LfpmTaskScan& scan = (*scans)[i];
    const LfpmAnomaly& started = run->report.anomaly_merged[i];
    EXPECT_EQ(scan.anomaly.task, started.task);
    EXPECT_EQ(scan.anomaly.class_norms, started.class_norms);
    EXPECT_EQ(scan.anomaly.anomaly_index, started.anomaly_index);
    // The repair's trigger was seeded from the same class.
    EXPECT_EQ(scan.easiest_class, run->report.triggers[i].targets[0]);
    EXPECT_EQ(scan.trigger.mask.sizes(), (torch::IntArrayRef{1, 28, 28}));
    EXPECT_EQ(scan.trigger.pattern.sizes(), (torch::IntArrayRef{1, 28, 28}));
    EXPECT_NEAR(scan.trigger.mask.sum().item<double>(),
                scan.anomaly.class_norms[scan.easiest_class], 1e-3);
    EXPECT_GE(scan.trigger.pattern.min().item<double>(), 0.0);
    EXPECT_LE(scan.trigger.pattern.max().item<double>(), 1.0);
  }
  // Bad input is refused as RunLfpm refuses it.
  std::vector<LfpmTask> tasks = Tasks();
  tasks[0].inputs = torch::rand({4, 1, 5, 5});
  EXPECT_EQ(
      ScanLfpmTasks(*model, MergedTensors(), tasks, options).status().code(),
      absl::StatusCode::kInvalidArgument);
}

// Another backbone for the tiny architecture, as a task's own model.
NamedTensors OwnBackbone() {
  torch::manual_seed(21);
  return {{"conv.weight", torch::randn({4, 1, 3, 3}) * 0.5},
          {"conv.bias", torch::randn({4}) * 0.1},
          {"fc.weight", torch::randn({16, 676}) * 0.08},
          {"fc.bias", torch::randn({16}) * 0.1}};
}

TEST(LfpmTest, ScanOwnModelScansEachTaskOnItsOwnBackbone) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.steps = 1;
  std::vector<LfpmTask> tasks = Tasks();
  for (LfpmTask& task : tasks) task.own_model = OwnBackbone();

  // Without the option the own models are ignored: the scan is θm's.
  auto merged_scan = ScanLfpmTasks(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(merged_scan.ok()) << merged_scan.status();
  auto plain = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(plain.ok()) << plain.status();

  options.triggers.scan_own_model = true;
  auto own = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(own.ok()) << own.status();
  // The reference: a scan of a model whose backbone is the own one (same
  // heads), as the merge.
  NamedTensors own_as_merge = OwnBackbone();
  for (const auto& [name, tensor] : MergedTensors()) {
    if (absl::StrContains(name, "/head."))
      own_as_merge.emplace_back(name, tensor);
  }
  LfpmOptions reference_options = options;
  reference_options.triggers.scan_own_model = false;
  auto reference =
      ScanLfpmTasks(*model, own_as_merge, Tasks(), reference_options);
  ASSERT_TRUE(reference.ok()) << reference.status();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_FALSE(plain->report.anomaly_merged[i].own_model);
    EXPECT_EQ(plain->report.anomaly_merged[i].class_norms,
              (*merged_scan)[i].anomaly.class_norms);
    EXPECT_TRUE(own->report.anomaly_merged[i].own_model);
    EXPECT_EQ(own->report.anomaly_merged[i].class_norms,
              (*reference)[i].anomaly.class_norms);
    EXPECT_NE(own->report.anomaly_merged[i].class_norms,
              plain->report.anomaly_merged[i].class_norms);
  }
  auto report_json = nlohmann::json::parse(LfpmReportToJson(own->report));
  EXPECT_EQ(report_json["anomaly_merged"][0]["own_model"], true);
  EXPECT_EQ(nlohmann::json::parse(
                LfpmOptionsToJson(options))["triggers"]["scan_own_model"],
            true);

  // The first reach gate is checked on the model the trigger was mined on:
  // a trigger is on exactly when its scan reach (own model, same inputs)
  // passes.
  options.triggers.anomaly_gate = 0.0;
  for (double threshold : {0.3, 0.6, 0.9}) {
    options.triggers.reach_threshold = threshold;
    auto gated = RunLfpm(*model, MergedTensors(), tasks, options);
    ASSERT_TRUE(gated.ok()) << gated.status();
    int64_t expected = 0;
    for (size_t i = 0; i < 2; ++i) {
      const LfpmAnomaly& scan = gated->report.anomaly_merged[i];
      const int64_t target = gated->report.triggers[i].targets[0];
      expected += scan.class_reach[target] >= threshold ? 1 : 0;
    }
    EXPECT_EQ(gated->report.active_triggers.front(), expected) << threshold;
  }

  // The repair itself runs on θm: with no trigger unlearned, the loss
  // curve is the plain run's, also in PEFT mode, where the biases are not
  // adapted and so are not reinstalled by the steps.
  options.mode = LfpmMode::kPeft;
  options.triggers.anomaly_gate = 1e9;
  options.triggers.scan_own_model = false;
  auto plain_peft = RunLfpm(*model, MergedTensors(), tasks, options);
  options.triggers.scan_own_model = true;
  auto own_peft = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(plain_peft.ok() && own_peft.ok());
  EXPECT_EQ(own_peft->report.active_triggers,
            std::vector<int64_t>(options.steps, 0));
  EXPECT_EQ(own_peft->report.loss_curve, plain_peft->report.loss_curve);

  // An own model that does not fit the architecture is refused by name.
  tasks[1].own_model.pop_back();
  auto status = RunLfpm(*model, MergedTensors(), tasks, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("fc.bias"));
}

TEST(LfpmTest, MergeRefineMinesOwnModelTriggersAgainstTheMerge) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.triggers.steps_per_update = 0;  // the report shows the start
  options.triggers.anomaly_gate = 0.0;
  options.triggers.pin_scan_trigger = true;
  options.triggers.mask_l1_weight = 0.0;  // mining only raises reach
  std::vector<LfpmTask> tasks = Tasks();
  for (LfpmTask& task : tasks) task.own_model = OwnBackbone();

  // Without own models the option has nothing to refine.
  auto plain = RunLfpm(*model, MergedTensors(), Tasks(), options);
  options.triggers.merge_refine_steps = 40;
  auto plain_refined = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(plain.ok() && plain_refined.ok());
  EXPECT_EQ(plain_refined->report.loss_curve, plain->report.loss_curve);

  options.triggers.scan_own_model = true;
  options.triggers.merge_refine_steps = 0;
  auto own = RunLfpm(*model, MergedTensors(), tasks, options);
  options.triggers.merge_refine_steps = 40;
  auto refined = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(own.ok()) << own.status();
  ASSERT_TRUE(refined.ok()) << refined.status();
  for (size_t i = 0; i < 2; ++i) {
    const LfpmTriggerReport& before = own->report.triggers[i];
    const LfpmTriggerReport& after = refined->report.triggers[i];
    ASSERT_EQ(after.targets, before.targets);
    // The pinned copy is the own model's trigger; the other one moved and
    // now fools θm (asr_merged: success against θm, α = 0) at least as
    // often as the own model's trigger did.
    EXPECT_NEAR(after.mask_l1[1], before.mask_l1[1], 1e-6);
    EXPECT_GT(std::abs(after.mask_l1[0] - before.mask_l1[0]), 1e-3);
    EXPECT_GE(after.asr_merged[0], before.asr_merged[0]);
    EXPECT_GE(after.asr_merged[0], 0.9) << i;
  }
  EXPECT_EQ(nlohmann::json::parse(
                LfpmOptionsToJson(options))["triggers"]["merge_refine_steps"],
            40);

  // A task the anomaly gate stops is not refined.
  options.triggers.anomaly_gate = 1e9;
  auto gated = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(gated.ok()) << gated.status();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(gated->report.triggers[i].mask_l1,
              own->report.triggers[i].mask_l1);
  }

  options.triggers.merge_refine_steps = -1;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), tasks, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// BaseBackbone is the merged model's backbone, standing in for the base
// the tasks were fine-tuned from.
NamedTensors BaseBackbone() {
  NamedTensors base;
  for (const auto& [name, tensor] : MergedTensors()) {
    if (!absl::StrContains(name, "/head.")) base.emplace_back(name, tensor);
  }
  return base;
}

// TasksWithOwnAndBase is Tasks(), each with OwnBackbone() as its own model
// and `base` as its base.
std::vector<LfpmTask> TasksWithOwnAndBase(const NamedTensors& base) {
  std::vector<LfpmTask> tasks = Tasks();
  for (LfpmTask& task : tasks) {
    task.own_model = OwnBackbone();
    task.base_model = base;
  }
  return tasks;
}

TEST(LfpmTest, DifferentialGateReadsOwnOverBaseNorms) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.steps = 1;
  options.triggers.scan_own_model = true;
  const NamedTensors base = BaseBackbone();
  std::vector<LfpmTask> tasks = TasksWithOwnAndBase(base);

  // Off, the base is ignored.
  auto own = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(own.ok()) << own.status();
  EXPECT_TRUE(own->report.anomaly_merged[0].base_class_norms.empty());
  EXPECT_EQ(own->report.anomaly_merged[0].differential_class, -1);

  options.triggers.differential_gate = true;
  auto differential = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(differential.ok()) << differential.status();
  for (size_t i = 0; i < 2; ++i) {
    const LfpmAnomaly& a = differential->report.anomaly_merged[i];
    // The first task's own scan runs before any base scan and is
    // unchanged; later ones draw on a generator the base scans advanced.
    if (i == 0) {
      EXPECT_EQ(a.class_norms, own->report.anomaly_merged[i].class_norms);
    }
    ASSERT_EQ(a.base_class_norms.size(), a.class_norms.size());
    EXPECT_NE(a.base_class_norms, a.class_norms);
    std::vector<double> ratios;
    for (size_t c = 0; c < a.class_norms.size(); ++c) {
      ratios.push_back(a.class_norms[c] / a.base_class_norms[c]);
    }
    EXPECT_DOUBLE_EQ(a.differential_index, LfpmAnomalyIndex(ratios));
    EXPECT_EQ(a.differential_class,
              std::min_element(ratios.begin(), ratios.end()) - ratios.begin());
  }
  auto report_json =
      nlohmann::json::parse(LfpmReportToJson(differential->report));
  EXPECT_EQ(report_json["anomaly_merged"][1]["differential_class"],
            differential->report.anomaly_merged[1].differential_class);
  EXPECT_EQ(nlohmann::json::parse(
                LfpmOptionsToJson(options))["triggers"]["differential_gate"],
            true);

  // The anomaly gate reads the differential index: with reach ungated, a
  // task's trigger is on exactly when that index passes.
  options.triggers.reach_threshold = 0.0;
  const LfpmAnomaly& a0 = differential->report.anomaly_merged[0];
  const LfpmAnomaly& a1 = differential->report.anomaly_merged[1];
  for (double gate :
       {0.01, (a0.differential_index + a1.differential_index) / 2,
        std::max(a0.differential_index, a1.differential_index) + 0.01}) {
    options.triggers.anomaly_gate = gate;
    auto gated = RunLfpm(*model, MergedTensors(), tasks, options);
    ASSERT_TRUE(gated.ok()) << gated.status();
    const int64_t expected = (a0.differential_index > gate ? 1 : 0) +
                             (a1.differential_index > gate ? 1 : 0);
    EXPECT_EQ(gated->report.active_triggers.front(), expected) << gate;
    // Every class is reached, so each trigger targets the class whose
    // ratio is smallest, which need not be the own model's easiest.
    for (size_t i = 0; i < 2; ++i) {
      ASSERT_EQ(gated->report.triggers[i].targets.size(), 1u);
      EXPECT_EQ(gated->report.triggers[i].targets[0],
                gated->report.anomaly_merged[i].differential_class);
    }
  }

  // With a ratio bound the gate reads each task's smallest ratio instead.
  options.triggers.anomaly_gate = 2.0;
  for (double bound :
       {1e-6, std::max(a0.differential_ratio, a1.differential_ratio) + 1e-6}) {
    options.triggers.differential_max_ratio = bound;
    auto gated = RunLfpm(*model, MergedTensors(), tasks, options);
    ASSERT_TRUE(gated.ok()) << gated.status();
    EXPECT_EQ(gated->report.active_triggers.front(), bound < 1e-3 ? 0 : 2)
        << bound;
  }
  for (size_t i = 0; i < 2; ++i) {
    const LfpmAnomaly& a = differential->report.anomaly_merged[i];
    EXPECT_DOUBLE_EQ(a.differential_ratio,
                     a.class_norms[a.differential_class] /
                         a.base_class_norms[a.differential_class]);
  }
  options.triggers.differential_max_ratio = -1;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), tasks, options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.triggers.differential_max_ratio = 0;

  // A base that does not fit the architecture is refused by name.
  tasks[0].base_model.pop_back();
  auto status = RunLfpm(*model, MergedTensors(), tasks, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("base model"));
}

TEST(LfpmTest, AnomalyGateKeepsUnflaggedTasksFromUnlearning) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.triggers.reach_threshold = 0.0;  // reach alone lets every trigger in

  options.triggers.anomaly_gate = 0.0;  // off: both tasks' triggers unlearned
  auto ungated = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(ungated.ok()) << ungated.status();
  EXPECT_EQ(ungated->report.active_triggers,
            std::vector<int64_t>(options.steps, 2));

  // No task's index is this large: nothing is unlearned, so the backdoor
  // term vanishes from every step's loss.
  options.triggers.anomaly_gate = 1e9;
  auto gated = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(gated.ok()) << gated.status();
  EXPECT_EQ(gated->report.active_triggers,
            std::vector<int64_t>(options.steps, 0));
  EXPECT_NE(gated->report.loss_curve, ungated->report.loss_curve);

  options.triggers.anomaly_gate = -1.0;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, PinnedScanTriggerStaysFixedAndActive) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.triggers.pin_scan_trigger = true;
  options.triggers.anomaly_gate = 0.0;
  // No mined trigger reaches every input here: only the pinned copies are
  // unlearned.
  options.triggers.reach_threshold = 1.0;
  auto result = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  const LfpmReport& report = result->report;
  EXPECT_EQ(report.active_triggers, std::vector<int64_t>(options.steps, 2));
  ASSERT_EQ(report.triggers.size(), 2u);
  for (size_t i = 0; i < report.triggers.size(); ++i) {
    const LfpmTriggerReport& t = report.triggers[i];
    ASSERT_EQ(t.targets.size(), 2u);
    EXPECT_EQ(t.targets[0], t.targets[1]);
    // The pinned copy is the scan's trigger, untouched by online mining;
    // the online one moved.
    const double scanned = report.anomaly_merged[i].class_norms[t.targets[1]];
    EXPECT_NEAR(t.mask_l1[1], scanned, 1e-3);
    EXPECT_GT(std::abs(t.mask_l1[0] - scanned), 1e-4);
  }
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["pin_scan_trigger"], true);

  // The anomaly gate still rules: a task it stops has no trigger unlearned.
  options.triggers.anomaly_gate = 1e9;
  auto gated = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(gated.ok()) << gated.status();
  EXPECT_EQ(gated->report.active_triggers,
            std::vector<int64_t>(options.steps, 0));
}

TEST(LfpmTest, RestartsAddFixedTriggersFromFreshStarts) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.triggers.anomaly_gate = 0.0;
  options.triggers.restarts_per_target = 3;
  // No mined trigger reaches every input here: only the restarts are
  // unlearned, two per task.
  options.triggers.reach_threshold = 1.0;
  auto result = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  const LfpmReport& report = result->report;
  EXPECT_EQ(report.active_triggers, std::vector<int64_t>(options.steps, 4));
  ASSERT_EQ(report.triggers.size(), 2u);
  // The restarts are mined before the first outer step and never after: a
  // run without outer steps has the same ones.
  options.steps = 0;
  auto unrepaired = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(unrepaired.ok()) << unrepaired.status();
  for (size_t i = 0; i < report.triggers.size(); ++i) {
    const LfpmTriggerReport& t = report.triggers[i];
    ASSERT_EQ(t.targets.size(), 3u);
    EXPECT_EQ(t.targets[1], t.targets[0]);
    EXPECT_EQ(t.targets[2], t.targets[0]);
    // Fresh starts end apart: from each other and from the scan's trigger.
    EXPECT_GT(std::abs(t.mask_l1[1] - t.mask_l1[2]), 1e-4);
    const double scanned = report.anomaly_merged[i].class_norms[t.targets[0]];
    EXPECT_GT(std::abs(t.mask_l1[1] - scanned), 1e-4);
    const LfpmTriggerReport& before = unrepaired->report.triggers[i];
    ASSERT_EQ(before.mask_l1.size(), 3u);
    EXPECT_NEAR(t.mask_l1[1], before.mask_l1[1], 1e-6);
    EXPECT_NEAR(t.mask_l1[2], before.mask_l1[2], 1e-6);
  }
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["restarts_per_target"], 3);

  // A task the gate stops gets no restarts.
  options.steps = 4;
  options.triggers.anomaly_gate = 1e9;
  auto gated = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(gated.ok()) << gated.status();
  EXPECT_EQ(gated->report.triggers[0].targets.size(), 1u);
  EXPECT_EQ(gated->report.active_triggers,
            std::vector<int64_t>(options.steps, 0));
  options.triggers.restarts_per_target = 0;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Overlap is Σ M_a ⊙ M_b / ‖M_a‖1: the share of mask a's mass on the
// pixels mask b holds.
double Overlap(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a * b).sum() / a.sum()).item<double>();
}

// RestartOptions: no outer steps, every task through the gate, three
// starts per target, scans long enough for the masks to take shape.
LfpmOptions RestartOptions() {
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.steps = 0;
  options.triggers.anomaly_gate = 0.0;
  options.triggers.restarts_per_target = 3;
  options.triggers.scan_steps = 40;
  return options;
}

TEST(LfpmTest, RestartOverlapPenaltyPushesRestartsOffHeldPixels) {
  auto model = TinyModel();
  LfpmOptions options = RestartOptions();
  auto plain = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  options.triggers.restart_overlap_weight = 50.0;
  auto spread = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(spread.ok()) << spread.status();
  for (size_t i = 0; i < spread->report.triggers.size(); ++i) {
    const torch::Tensor& before = plain->report.triggers[i].masks;
    const torch::Tensor& after = spread->report.triggers[i].masks;
    ASSERT_EQ(after.size(0), 3);
    // Restarts draw from their own random stream: every task's scan
    // trigger is the same in both runs.
    EXPECT_TRUE(torch::allclose(after[0], before[0]));
    // Each restart holds less of the scan trigger's pixels than an
    // unpenalized one, and the second less of the first restart's.
    for (int64_t r : {1, 2}) {
      SCOPED_TRACE(absl::StrCat("task ", i, " restart ", r));
      EXPECT_LT(Overlap(after[r], after[0]),
                0.8 * Overlap(before[r], before[0]));
    }
    EXPECT_LT(Overlap(after[2], after[1]), 0.8 * Overlap(before[2], before[1]));
  }
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["restart_overlap_weight"], 50.0);
  options.triggers.restart_overlap_weight = -1.0;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, RestartMaskL1ScaleGrowsOnlyTheRestarts) {
  auto model = TinyModel();
  LfpmOptions options = RestartOptions();
  auto plain = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  options.triggers.restart_mask_l1_scale = 0.1;
  auto grown = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(grown.ok()) << grown.status();
  // Same scan triggers; the restarts start from the same draws and end
  // larger with a lighter L1.
  for (size_t i = 0; i < grown->report.triggers.size(); ++i) {
    const LfpmTriggerReport& before = plain->report.triggers[i];
    const LfpmTriggerReport& after = grown->report.triggers[i];
    EXPECT_NEAR(after.mask_l1[0], before.mask_l1[0], 1e-6);
    for (size_t r : {1u, 2u}) {
      EXPECT_GT(after.mask_l1[r], before.mask_l1[r] + 1.0)
          << "task " << i << " restart " << r;
    }
  }
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["restart_mask_l1_scale"], 0.1);
  options.triggers.restart_mask_l1_scale = 0.0;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, WindowTriggersAreFixedBoxesAroundTheHeldPixels) {
  auto model = TinyModel();
  LfpmOptions options = RestartOptions();
  options.triggers.restarts_per_target = 1;
  auto plain = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  options.triggers.window_steps = 10;
  options.triggers.window_margin = 1;
  auto windowed = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(windowed.ok()) << windowed.status();
  int boxes = 0;
  for (size_t i = 0; i < windowed->report.triggers.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("task ", i));
    const LfpmTriggerReport& before = plain->report.triggers[i];
    const LfpmTriggerReport& after = windowed->report.triggers[i];
    // The window pass draws from the extra stream: the scan trigger is
    // the same in both runs.
    EXPECT_TRUE(torch::allclose(after.masks[0], before.masks[0]));
    torch::Tensor held = before.masks[0][0].ge(0.5);
    if (!held.any().item<bool>()) {
      EXPECT_EQ(after.masks.size(0), 1);
      continue;
    }
    ++boxes;
    ASSERT_EQ(after.masks.size(0), 2);
    EXPECT_EQ(after.targets[1], after.targets[0]);
    // A hard box: the held pixels' rows and columns, one more on each side.
    torch::Tensor pixels = held.nonzero();
    const int64_t h = held.size(0), w = held.size(1);
    const int64_t top = std::max<int64_t>(0, pixels.select(1, 0).min().item<int64_t>() - 1);
    const int64_t bottom = std::min<int64_t>(h, pixels.select(1, 0).max().item<int64_t>() + 2);
    const int64_t left = std::max<int64_t>(0, pixels.select(1, 1).min().item<int64_t>() - 1);
    const int64_t right = std::min<int64_t>(w, pixels.select(1, 1).max().item<int64_t>() + 2);
    torch::Tensor expected = torch::zeros({h, w}, torch::kBool);
    expected.slice(0, top, bottom).slice(1, left, right).fill_(true);
    torch::Tensor box = after.masks[1][0];
    EXPECT_TRUE(box.gt(0.999).logical_or(box.lt(0.001)).all().item<bool>());
    EXPECT_TRUE(box.gt(0.5).equal(expected));
    EXPECT_NEAR(after.mask_l1[1], (bottom - top) * (right - left), 1e-2);
    // Its pattern was mined from the scan trigger's.
    EXPECT_FALSE(torch::allclose(after.patterns[1], after.patterns[0]));
  }
  EXPECT_GT(boxes, 0);
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["window_steps"], 10);
  EXPECT_EQ(options_json["triggers"]["window_margin"], 1);
  options.triggers.window_margin = -1;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// DensestSquare searches every side × side square of `held` [H, W] for the
// most mass, in doubles; the first in row-major order wins ties.
std::pair<int64_t, int64_t> DensestSquare(const torch::Tensor& held,
                                          int64_t side) {
  const int64_t h = held.size(0), w = held.size(1);
  double best_mass = -1.0;
  int64_t best_top = 0, best_left = 0;
  for (int64_t top = 0; top + side <= h; ++top) {
    for (int64_t left = 0; left + side <= w; ++left) {
      const double mass = held.slice(0, top, top + side)
                              .slice(1, left, left + side)
                              .sum()
                              .item<double>();
      if (mass > best_mass + 1e-9) {
        best_mass = mass;
        best_top = top;
        best_left = left;
      }
    }
  }
  return {best_top, best_left};
}

// WindowBox is the square at (top, left) grown by `margin`, clamped to
// [h, w], as a bool image.
torch::Tensor WindowBox(int64_t h, int64_t w, int64_t top, int64_t left,
                        int64_t side, int64_t margin) {
  torch::Tensor box = torch::zeros({h, w}, torch::kBool);
  box.slice(0, std::max<int64_t>(0, top - margin),
            std::min<int64_t>(h, top + side + margin))
      .slice(1, std::max<int64_t>(0, left - margin),
             std::min<int64_t>(w, left + side + margin))
      .fill_(true);
  return box;
}

int64_t WindowSide(const torch::Tensor& held) {
  return std::min<int64_t>(
      std::min(held.size(0), held.size(1)),
      static_cast<int64_t>(std::ceil(std::sqrt(held.sum().item<double>()))));
}

TEST(LfpmTest, DensestWindowIsTheSquareHoldingMostOfTheMask) {
  auto model = TinyModel();
  LfpmOptions options = RestartOptions();
  options.triggers.restarts_per_target = 1;
  auto plain = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  options.triggers.window_steps = 10;
  options.triggers.window_margin = 1;
  options.triggers.window_placement = WindowPlacement::kDensest;
  auto windowed = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(windowed.ok()) << windowed.status();
  for (size_t i = 0; i < windowed->report.triggers.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("task ", i));
    const LfpmTriggerReport& before = plain->report.triggers[i];
    const LfpmTriggerReport& after = windowed->report.triggers[i];
    EXPECT_TRUE(torch::allclose(after.masks[0], before.masks[0]));
    // Every mask has mass, so every class gets a window.
    ASSERT_EQ(after.masks.size(0), 2);
    torch::Tensor held = before.masks[0][0].to(torch::kDouble);
    const int64_t side = WindowSide(held);
    const auto [top, left] = DensestSquare(held, side);
    torch::Tensor box = after.masks[1][0];
    EXPECT_TRUE(box.gt(0.999).logical_or(box.lt(0.001)).all().item<bool>());
    EXPECT_TRUE(box.gt(0.5).equal(
        WindowBox(held.size(0), held.size(1), top, left, side, 1)))
        << "side " << side;
  }
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["window_placement"], "densest");
  EXPECT_EQ(ParseWindowPlacement("extent").value(), WindowPlacement::kExtent);
  EXPECT_EQ(ParseWindowPlacement("densest").value(), WindowPlacement::kDensest);
  EXPECT_EQ(ParseWindowPlacement("centre").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, SecondWindowIsTheDensestSquareTheFirstLeaves) {
  auto model = TinyModel();
  LfpmOptions options = RestartOptions();
  options.triggers.restarts_per_target = 1;
  options.triggers.window_steps = 10;
  options.triggers.window_margin = 1;
  options.triggers.window_placement = WindowPlacement::kDensest;
  auto one = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(one.ok()) << one.status();
  options.triggers.windows_per_class = 2;
  auto two = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(two.ok()) << two.status();
  for (size_t i = 0; i < two->report.triggers.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("task ", i));
    const LfpmTriggerReport& single = one->report.triggers[i];
    const LfpmTriggerReport& pair = two->report.triggers[i];
    // The mined trigger and the first window are as with one window.
    ASSERT_EQ(pair.masks.size(0), 3);
    EXPECT_TRUE(torch::allclose(pair.masks[0], single.masks[0]));
    EXPECT_TRUE(pair.masks[1].equal(single.masks[1]));
    torch::Tensor held = single.masks[0][0].to(torch::kDouble);
    const int64_t h = held.size(0), w = held.size(1);
    const int64_t side = WindowSide(held);
    const auto [first_top, first_left] = DensestSquare(held, side);
    torch::Tensor left_over = held.clone();
    left_over.slice(0, first_top, first_top + side)
        .slice(1, first_left, first_left + side)
        .zero_();
    const auto [top, left] = DensestSquare(left_over, side);
    torch::Tensor second = pair.masks[2][0];
    EXPECT_TRUE(
        second.gt(0.999).logical_or(second.lt(0.001)).all().item<bool>());
    EXPECT_TRUE(second.gt(0.5).equal(WindowBox(h, w, top, left, side, 1)));
    EXPECT_EQ(pair.targets[1], pair.targets[2]);
  }
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["windows_per_class"], 2);
  options.triggers.window_placement = WindowPlacement::kExtent;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
  options.triggers.window_placement = WindowPlacement::kDensest;
  options.triggers.windows_per_class = 0;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, WindowRefreshReminesOnlyTheWindowPatterns) {
  auto model = TinyModel();
  LfpmOptions options = RestartOptions();
  options.triggers.restarts_per_target = 1;
  options.triggers.window_steps = 10;
  options.triggers.window_margin = 1;
  options.triggers.window_placement = WindowPlacement::kDensest;
  options.triggers.steps_per_update = 0;
  options.triggers.update_every = 2;
  options.steps = 5;
  auto fixed = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(fixed.ok()) << fixed.status();
  options.triggers.window_refresh_steps = 3;
  auto refreshed = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(refreshed.ok()) << refreshed.status();
  // The repair's first update (step 3) saw the same τab in both runs; the
  // refresh draws from the extra stream, so the scan triggers, every box
  // and the first two steps' losses are as without it.
  for (int s = 0; s < 2; ++s) {
    EXPECT_EQ(refreshed->report.loss_curve[s], fixed->report.loss_curve[s]);
  }
  for (size_t i = 0; i < refreshed->report.triggers.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("task ", i));
    const LfpmTriggerReport& before = fixed->report.triggers[i];
    const LfpmTriggerReport& after = refreshed->report.triggers[i];
    ASSERT_EQ(after.masks.size(0), 2);
    EXPECT_TRUE(torch::equal(after.masks, before.masks));
    EXPECT_TRUE(torch::equal(after.patterns[0], before.patterns[0]));
    // Row 1 is the window: its pattern moved on the repaired model.
    EXPECT_FALSE(torch::allclose(after.patterns[1], before.patterns[1]));
  }
  // Later steps train against the refreshed windows.
  EXPECT_NE(refreshed->report.loss_curve.back(),
            fixed->report.loss_curve.back());
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["window_refresh_steps"], 3);
  options.triggers.window_refresh_steps = -1;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, RestartsLeaveEveryScanAsItWas) {
  auto model = TinyModel();
  LfpmOptions options = RestartOptions();
  options.triggers.restarts_per_target = 1;
  auto single = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(single.ok()) << single.status();
  options.triggers.restarts_per_target = 3;
  auto restarted = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  ASSERT_EQ(restarted->report.anomaly_merged.size(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    const std::vector<double>& before =
        single->report.anomaly_merged[i].class_norms;
    const std::vector<double>& after =
        restarted->report.anomaly_merged[i].class_norms;
    ASSERT_EQ(after.size(), before.size());
    for (size_t c = 0; c < before.size(); ++c) {
      EXPECT_NEAR(after[c], before[c], 1e-6) << "task " << i << " class " << c;
    }
  }
}

// DropoutOptions: no outer steps, every task through the gate, the scan's
// trigger pinned next to the online one.
LfpmOptions DropoutOptions() {
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.steps = 0;
  options.triggers.anomaly_gate = 0.0;
  options.triggers.pin_scan_trigger = true;
  options.triggers.scan_steps = 40;
  options.triggers.dropout_refine_steps = 40;
  return options;
}

TEST(LfpmTest, DropoutRefineGrowsOnlyTheOnlineTriggers) {
  auto model = TinyModel();
  LfpmOptions options = DropoutOptions();
  options.triggers.mask_dropout = 0.0;
  auto whole = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(whole.ok()) << whole.status();
  options.triggers.mask_dropout = 0.5;
  auto thinned = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(thinned.ok()) << thinned.status();
  options.triggers.dropout_refine_steps = 0;
  auto scanned = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(scanned.ok()) << scanned.status();
  for (size_t i = 0; i < thinned->report.triggers.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("task ", i));
    const LfpmTriggerReport& plain = scanned->report.triggers[i];
    const LfpmTriggerReport& full = whole->report.triggers[i];
    const LfpmTriggerReport& dropped = thinned->report.triggers[i];
    ASSERT_EQ(dropped.targets.size(), 2u);
    // The pinned copy is the scan's trigger in every run: the refinement
    // draws from its own stream and leaves the scans as they were.
    EXPECT_NEAR(dropped.mask_l1[1], plain.mask_l1[1], 1e-6);
    EXPECT_NEAR(full.mask_l1[1], plain.mask_l1[1], 1e-6);
    // The same steps with a random half of each stamp's mask missing end
    // with a larger mask than with the whole mask stamped.
    EXPECT_GT(dropped.mask_l1[0], 1.3 * full.mask_l1[0]);
  }
  options.triggers.dropout_refine_steps = 40;
  auto options_json = nlohmann::json::parse(LfpmOptionsToJson(options));
  EXPECT_EQ(options_json["triggers"]["dropout_refine_steps"], 40);
  EXPECT_EQ(options_json["triggers"]["mask_dropout"], 0.5);
  for (double bad : {-0.1, 1.0}) {
    options.triggers.mask_dropout = bad;
    EXPECT_EQ(
        RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
        absl::StatusCode::kInvalidArgument)
        << bad;
  }
  options.triggers.mask_dropout = 0.5;
  options.triggers.dropout_refine_steps = -1;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), Tasks(), options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// TargetProbability is the mean probability of `target` that the tiny
// model with `backbone` and task `head`'s head gives to `inputs` stamped
// with mask `mask` [1, H, W] and pattern `pattern` [C, H, W].
double TargetProbability(const NamedTensors& backbone, const std::string& head,
                         const torch::Tensor& inputs, const torch::Tensor& mask,
                         const torch::Tensor& pattern, int64_t target) {
  auto model = TinyModel();
  for (const auto& [name, tensor] : backbone) {
    EXPECT_TRUE(model->InstallTensor(name, tensor).ok()) << name;
  }
  auto features = model->Features((1.0 - mask) * inputs + mask * pattern);
  EXPECT_TRUE(features.ok()) << features.status();
  if (!features.ok()) return 0.0;
  const NamedTensors merged = MergedTensors();
  torch::Tensor logits =
      torch::linear(*features, Find(merged, head + "/head.weight"),
                    Find(merged, head + "/head.bias"));
  return torch::softmax(logits, 1).select(1, target).mean().item<double>();
}

// StampedPredictions are the tiny merged model's predictions for task
// `head` on `inputs` stamped with `mask` and `pattern`.
torch::Tensor StampedPredictions(const std::string& head,
                                 const torch::Tensor& inputs,
                                 const torch::Tensor& mask,
                                 const torch::Tensor& pattern) {
  auto model = TinyModel();
  const NamedTensors merged = MergedTensors();
  for (const auto& [name, tensor] : merged) {
    if (absl::StrContains(name, "/head.")) continue;
    EXPECT_TRUE(model->InstallTensor(name, tensor).ok()) << name;
  }
  torch::NoGradGuard no_grad;
  auto features = model->Features((1.0 - mask) * inputs + mask * pattern);
  EXPECT_TRUE(features.ok()) << features.status();
  if (!features.ok()) return torch::Tensor();
  return torch::linear(*features, Find(merged, head + "/head.weight"),
                       Find(merged, head + "/head.bias"))
      .argmax(1);
}

TEST(LfpmTest, ProbeTriggerReachCountsOtherClassInputsSentToTheTarget) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  options.report_examples = 16;
  torch::manual_seed(5);
  torch::Tensor mask = torch::zeros({1, 28, 28});
  mask.slice(1, 0, 10).slice(2, 0, 10).fill_(1.0);
  torch::Tensor pattern = torch::rand({1, 28, 28});
  const std::vector<LfpmTask> tasks = Tasks();
  const std::vector<LfpmTriggerProbe> probes = {{{mask, pattern}, 1},
                                                {{mask, pattern}, 2}};
  auto untouched =
      ProbeTriggerReach(*model, MergedTensors(), tasks, probes, 0, options);
  ASSERT_TRUE(untouched.ok()) << untouched.status();
  ASSERT_EQ(untouched->size(), 2u);
  // By hand: task a against its labels, task b (unlabeled) against the
  // model's own clean predictions, on the first report_examples inputs.
  const torch::Tensor no_mask = torch::zeros_like(mask);
  for (size_t i = 0; i < 2; ++i) {
    const std::string head = tasks[i].name;
    const torch::Tensor inputs = tasks[i].inputs.slice(0, 0, 16);
    const torch::Tensor labels =
        tasks[i].labels.defined()
            ? tasks[i].labels.slice(0, 0, 16)
            : StampedPredictions(head, inputs, no_mask, pattern);
    const torch::Tensor stamped =
        StampedPredictions(head, inputs, mask, pattern);
    const torch::Tensor other = labels.ne(probes[i].target);
    const double expected =
        stamped.eq(probes[i].target).logical_and(other).sum().item<double>() /
        other.sum().item<double>();
    EXPECT_NEAR((*untouched)[i], expected, 1e-12) << head;
  }
  // Re-mining the pattern towards the target sends more inputs there.
  auto remined =
      ProbeTriggerReach(*model, MergedTensors(), tasks, probes, 40, options);
  ASSERT_TRUE(remined.ok()) << remined.status();
  EXPECT_GT((*remined)[0] + (*remined)[1], (*untouched)[0] + (*untouched)[1]);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_GE((*remined)[i], (*untouched)[i]);
    EXPECT_LE((*remined)[i], 1.0);
  }

  // Bad input: one probe per task, a class of the head, steps >= 0.
  EXPECT_EQ(ProbeTriggerReach(*model, MergedTensors(), tasks, {probes[0]}, 0,
                              options)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<LfpmTriggerProbe> outside = probes;
  outside[0].target = 3;  // task a has 3 classes
  auto status =
      ProbeTriggerReach(*model, MergedTensors(), tasks, outside, 0, options)
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), ::testing::HasSubstr("task \"a\""));
  EXPECT_EQ(
      ProbeTriggerReach(*model, MergedTensors(), tasks, probes, -1, options)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, DropoutBaseWeightSteersTriggersOffTheBase) {
  auto model = TinyModel();
  LfpmOptions options = DropoutOptions();
  options.triggers.pin_scan_trigger = false;
  options.triggers.scan_own_model = true;
  options.triggers.differential_gate = true;
  const NamedTensors base = BaseBackbone();
  std::vector<LfpmTask> tasks = TasksWithOwnAndBase(base);
  auto plain = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  options.triggers.dropout_base_weight = 50.0;
  auto steered = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(steered.ok()) << steered.status();
  for (size_t i = 0; i < tasks.size(); ++i) {
    SCOPED_TRACE(absl::StrCat("task ", i));
    const LfpmTriggerReport& a = plain->report.triggers[i];
    const LfpmTriggerReport& b = steered->report.triggers[i];
    ASSERT_EQ(b.targets, a.targets);
    const int64_t target = a.targets[0];
    // The base is sent to the target less by the steered trigger. (Its
    // rate on clean inputs is about a third here, a floor a small mask
    // cannot push far below.)
    const double on_base_plain =
        TargetProbability(base, tasks[i].name, tasks[i].inputs, a.masks[0],
                          a.patterns[0], target);
    const double on_base_steered =
        TargetProbability(base, tasks[i].name, tasks[i].inputs, b.masks[0],
                          b.patterns[0], target);
    EXPECT_LT(on_base_steered, 0.8 * on_base_plain);
  }
  EXPECT_EQ(nlohmann::json::parse(
                LfpmOptionsToJson(options))["triggers"]["dropout_base_weight"],
            50.0);
  options.triggers.dropout_base_weight = -1.0;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), tasks, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, ReportGivesEachMaskAndItsCentroid) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  auto result = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const LfpmTriggerReport& t : result->report.triggers) {
    ASSERT_EQ(t.masks.dim(), 4);
    ASSERT_EQ(t.masks.size(0), static_cast<int64_t>(t.targets.size()));
    ASSERT_EQ(t.mask_centroid.size(), t.targets.size());
    ASSERT_EQ(t.patterns.dim(), 4);
    ASSERT_EQ(t.patterns.size(0), t.masks.size(0));
    EXPECT_EQ(t.patterns.size(2), t.masks.size(2));
    for (size_t j = 0; j < t.targets.size(); ++j) {
      torch::Tensor mask = t.masks[j][0];
      EXPECT_NEAR(mask.sum().item<double>(), t.mask_l1[j], 1e-3);
      // The centroid is where the mass balances: Σ M·(row − r̄) = 0.
      torch::Tensor rows =
          torch::arange(mask.size(0), torch::kFloat32).view({-1, 1});
      torch::Tensor cols =
          torch::arange(mask.size(1), torch::kFloat32).view({1, -1});
      EXPECT_NEAR((mask * (rows - t.mask_centroid[j][0])).sum().item<double>(),
                  0.0, 1e-2);
      EXPECT_NEAR((mask * (cols - t.mask_centroid[j][1])).sum().item<double>(),
                  0.0, 1e-2);
    }
  }
  auto report_json = nlohmann::json::parse(LfpmReportToJson(result->report));
  EXPECT_EQ(report_json["triggers"][0]["mask_centroid"].size(),
            result->report.triggers[0].targets.size());
}

LfpmKnownTrigger KnownPatch(int64_t target) {
  Trigger trigger;
  trigger.kind = TriggerKind::kPatch;
  trigger.pattern = torch::ones({1, 3, 3});
  trigger.row = 2;
  trigger.col = 5;
  return {trigger, target};
}

// The target hold adds W·Σ_t mean(max(0, p(t|x) − θm's p(t|x))·[y ≠ t])
// over the classes t that a labeled task's triggers target: nothing while
// τab = 0, and exactly that once τab moves. Task "b" is unlabeled and has
// a targeted trigger too: it adds nothing.
TEST(LfpmTest, TargetHoldPenalizesRisesOfTheTargetClassOnOtherLabels) {
  auto model = TinyModel();
  NamedTensors merged = MergedTensors();
  std::vector<LfpmTask> tasks = Tasks();
  const int64_t target = 2;
  tasks[0].known_trigger = KnownPatch(target);
  tasks[1].known_trigger = KnownPatch(target);
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  LfpmOptions held = options;
  held.target_hold_weight = 5.0;
  auto plain = LfpmProblemForTesting::Create(*model, merged, tasks, options);
  auto holding = LfpmProblemForTesting::Create(*model, merged, tasks, held);
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_TRUE(holding.ok()) << holding.status();
  for (double alpha : {0.5, 1.0}) {
    auto without = (*plain)->LossAt(alpha);
    auto with = (*holding)->LossAt(alpha);
    ASSERT_TRUE(without.ok() && with.ok());
    EXPECT_NEAR(with->item<double>(), without->item<double>(), 1e-6) << alpha;
  }

  PerturbTrainable(**plain, 0.05);
  PerturbTrainable(**holding, 0.05);
  const int64_t b = options.batch_size;  // LossAt's batch: the first b
  torch::Tensor x = tasks[0].inputs.slice(0, 0, b);
  torch::Tensor y = tasks[0].labels.slice(0, 0, b);
  Head head{Find(merged, "a/head.weight"), Find(merged, "a/head.bias")};
  auto probability_of_target = [&](LfpmProblemForTesting& problem,
                                   double alpha) {
    auto features = problem.Features(alpha, x);
    EXPECT_TRUE(features.ok()) << features.status();
    return torch::softmax(head.Logits(*features), 1).select(1, target);
  };
  torch::Tensor before = probability_of_target(**holding, 0.0);
  for (double alpha : {0.5, 1.0}) {
    torch::Tensor rise =
        (probability_of_target(**holding, alpha) - before).clamp_min(0.0);
    const double hold =
        (rise * y.ne(target).to(torch::kFloat32)).mean().item<double>();
    auto without = (*plain)->LossAt(alpha);
    auto with = (*holding)->LossAt(alpha);
    ASSERT_TRUE(without.ok() && with.ok());
    // The total is the mean over the two tasks.
    EXPECT_NEAR(with->item<double>() - without->item<double>(),
                held.target_hold_weight * hold / 2.0, 1e-5)
        << alpha;
    if (alpha == 1.0) {
      EXPECT_GT(hold, 1e-4);  // so the check can fail
    }
  }

  held.target_hold_weight = -1.0;
  EXPECT_EQ(RunLfpm(*model, merged, tasks, held).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, KnownTriggerReplacesMiningAndSkipsTheGates) {
  auto model = TinyModel();
  LfpmOptions options = FastOptions(LfpmMode::kFull);
  // Gates no mined trigger could pass: only the known one is unlearned.
  options.triggers.anomaly_gate = 1e9;
  options.triggers.reach_threshold = 1.0;
  std::vector<LfpmTask> tasks = Tasks();
  tasks[0].known_trigger = KnownPatch(/*target=*/1);
  auto result = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(result.ok()) << result.status();
  const LfpmReport& report = result->report;
  EXPECT_EQ(report.active_triggers, std::vector<int64_t>(options.steps, 1));
  ASSERT_EQ(report.triggers.size(), 2u);
  EXPECT_EQ(report.triggers[0].targets, (std::vector<int64_t>{1}));
  // Never re-mined: the mask is still the 3x3 patch.
  EXPECT_NEAR(report.triggers[0].mask_l1[0], 9.0, 1e-3);
  // The task is still scanned for the report.
  EXPECT_EQ(report.anomaly_merged.size(), 2u);
  // The backdoor term is there: the run differs from one with no trigger
  // unlearned at all.
  auto without = RunLfpm(*model, MergedTensors(), Tasks(), options);
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_EQ(without->report.active_triggers,
            std::vector<int64_t>(options.steps, 0));
  EXPECT_NE(without->report.loss_curve, report.loss_curve);

  // A blend: M is the blend weight at every pixel.
  tasks = Tasks();
  Trigger blend;
  blend.kind = TriggerKind::kBlend;
  blend.pattern = torch::rand({1, 28, 28});
  blend.blend_alpha = 0.25;
  tasks[1].known_trigger = LfpmKnownTrigger{blend, -1};
  auto blended = RunLfpm(*model, MergedTensors(), tasks, options);
  ASSERT_TRUE(blended.ok()) << blended.status();
  EXPECT_NEAR(blended->report.triggers[1].mask_l1[0], 0.25 * 28 * 28, 1e-2);

  // Bad known triggers: a target outside the head, a patch off the image.
  tasks = Tasks();
  tasks[0].known_trigger = KnownPatch(/*target=*/3);  // head "a": 3 classes
  auto status = RunLfpm(*model, MergedTensors(), tasks, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("known trigger"));
  tasks[0].known_trigger = KnownPatch(0);
  tasks[0].known_trigger->trigger.col = 26;
  EXPECT_EQ(RunLfpm(*model, MergedTensors(), tasks, options).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LfpmTest, JobWritesRepairedModelTauAndReport) {
  auto model = TinyModel();
  const std::string dir = TempPath("job");
  fs::create_directories(dir);
  const std::string arch = dir + "/arch.pt";
  ASSERT_TRUE(model->Save(arch).ok());
  // From base + task checkpoints: TA first.
  NamedTensors merged = MergedTensors();
  NamedTensors base, task_a, task_b;
  for (const auto& [name, t] : merged) {
    if (IsHeadKey(name)) continue;
    base.emplace_back(name, t);
    task_a.emplace_back(name, t + 0.01);
    task_b.emplace_back(name, t - 0.02);
  }
  task_a.emplace_back("head.weight", Find(merged, "a/head.weight"));
  task_a.emplace_back("head.bias", Find(merged, "a/head.bias"));
  task_b.emplace_back("head.weight", Find(merged, "b/head.weight"));
  task_b.emplace_back("head.bias", Find(merged, "b/head.bias"));
  ASSERT_TRUE(SaveTensors(dir + "/base.safetensors", base).ok());
  ASSERT_TRUE(SaveTensors(dir + "/a.safetensors", task_a).ok());
  ASSERT_TRUE(SaveTensors(dir + "/b.safetensors", task_b).ok());
  std::vector<LfpmTask> tasks = Tasks();
  ASSERT_TRUE(
      SaveTensors(dir + "/cal_a.safetensors",
                  {{"inputs", tasks[0].inputs}, {"labels", tasks[0].labels}})
          .ok());
  ASSERT_TRUE(
      SaveTensors(dir + "/cal_b.safetensors", {{"inputs", tasks[1].inputs}})
          .ok());

  LfpmJob job;
  job.architecture_path = arch;
  job.base_path = dir + "/base.safetensors";
  job.task_models = {{"a", dir + "/a.safetensors"},
                     {"b", dir + "/b.safetensors"}};
  job.calibration = {{"a", dir + "/cal_a.safetensors"},
                     {"b", dir + "/cal_b.safetensors"}};
  job.output_path = dir + "/repaired.safetensors";
  job.tau_output_path = dir + "/tau.safetensors";
  job.report_path = dir + "/report.json";
  auto report = RunLfpmJob(job, FastOptions(LfpmMode::kFull));
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_FALSE(fs::exists(job.output_path + ".ta.safetensors"));
  auto repaired = SafetensorsFile::Open(job.output_path);
  ASSERT_TRUE(repaired.ok()) << repaired.status();
  EXPECT_EQ((*repaired)->layout().metadata.at("mergeguard.method"), "lfpm");
  EXPECT_THAT((*repaired)->layout().metadata.at("mergeguard.inputs"),
              HasSubstr("calibration:b"));
  auto repaired_tensors = LoadTensorsFromPath(job.output_path);
  auto tau = LoadTensorsFromPath(job.tau_output_path);
  ASSERT_TRUE(repaired_tensors.ok() && tau.ok());
  EXPECT_EQ(tau->size(), 4u);
  // repaired = TA(base, a, b) + τab, heads carried.
  const torch::Tensor ta_fc = Find(base, "fc.weight") + 0.3 * (0.01 - 0.02);
  EXPECT_TRUE(torch::allclose(Find(*repaired_tensors, "fc.weight"),
                              ta_fc + Find(*tau, "fc.weight"), 1e-5, 1e-6));
  EXPECT_TRUE(torch::equal(Find(*repaired_tensors, "b/head.weight"),
                           Find(merged, "b/head.weight")));
  std::ifstream in(job.report_path);
  auto parsed = nlohmann::json::parse(in);
  EXPECT_EQ(parsed["steps"], 4);

  // A known trigger is recorded in the provenance; one for a task without
  // a calibration set is refused.
  job.known_triggers["a"] = KnownPatch(0);
  job.output_path = dir + "/known.safetensors";
  ASSERT_TRUE(RunLfpmJob(job, FastOptions(LfpmMode::kFull)).ok());
  auto known = SafetensorsFile::Open(job.output_path);
  ASSERT_TRUE(known.ok()) << known.status();
  EXPECT_THAT((*known)->layout().metadata.at("mergeguard.lfpm.known_triggers"),
              HasSubstr("\"task\":\"a\""));
  job.known_triggers["zzz"] = KnownPatch(0);
  job.output_path = dir + "/unknown.safetensors";
  auto refused = RunLfpmJob(job, FastOptions(LfpmMode::kFull)).status();
  EXPECT_EQ(refused.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.message(), HasSubstr("zzz"));
  EXPECT_FALSE(fs::exists(job.output_path));
  job.known_triggers.clear();

  // scan_own_model: the job scans each task on base + its own vector (the
  // merge at lambda 1), and leaves no intermediate file behind.
  LfpmOptions own_options = FastOptions(LfpmMode::kFull);
  own_options.triggers.scan_own_model = true;
  job.output_path = dir + "/own.safetensors";
  job.report_path = dir + "/own.json";
  auto own = RunLfpmJob(job, own_options);
  ASSERT_TRUE(own.ok()) << own.status();
  ASSERT_EQ(own->anomaly_merged.size(), 2u);
  EXPECT_TRUE(own->anomaly_merged[0].own_model);
  EXPECT_TRUE(own->anomaly_merged[1].own_model);
  EXPECT_NE(own->anomaly_merged[0].class_norms,
            report->anomaly_merged[0].class_norms);
  EXPECT_FALSE(fs::exists(job.output_path + ".own.safetensors"));
  EXPECT_TRUE(own->anomaly_merged[0].base_class_norms.empty());
  // differential_gate: the job hands every task the base it merged from.
  own_options.triggers.differential_gate = true;
  auto differential = RunLfpmJob(job, own_options);
  ASSERT_TRUE(differential.ok()) << differential.status();
  for (const LfpmAnomaly& anomaly : differential->anomaly_merged) {
    EXPECT_EQ(anomaly.base_class_norms.size(), anomaly.class_norms.size());
    EXPECT_GE(anomaly.differential_class, 0);
  }
  job.report_path = dir + "/report.json";
  job.output_path = dir + "/repaired.safetensors";

  // Neither or both input kinds: INVALID_ARGUMENT, nothing written.
  job.merged_model_path = job.output_path;
  job.output_path = dir + "/again.safetensors";
  EXPECT_EQ(RunLfpmJob(job, FastOptions(LfpmMode::kFull)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(job.output_path));
  // A missing calibration file fails and leaves no output behind.
  job.base_path.clear();
  job.task_models.clear();
  job.calibration[1].path = dir + "/none.safetensors";
  EXPECT_FALSE(RunLfpmJob(job, FastOptions(LfpmMode::kFull)).ok());
  EXPECT_FALSE(fs::exists(job.output_path));
  fs::remove_all(dir);
}

#ifdef MERGEGUARD_LFPM_TEST_WITH_BENCH
// The tiny benchmark scenario (BadMerging on-task): LFPM's repair of the TA
// merge must bring the real trigger's ASR below TA's.
TEST(LfpmScenarioTest, TinyScenarioAsrBelowTaskArithmetic) {
  const std::string root = TempPath("scenario");
  bench::BuildOptions build;
  build.preset = bench::Preset::kTiny;
  build.architecture = bench::Architecture::kCnn;
  build.attack.kind = bench::AttackKind::kBadMerging;
  build.seed = 0;
  build.threads = 2;
  build.out_dir = root + "/tiny";
  build.cache_dir = root + "/cache";
  auto built = bench::BuildScenario(build);
  ASSERT_TRUE(built.ok()) << built.status();

  bench::LfpmRowOptions options;
  options.lfpm.steps = 25;
  options.lfpm.batch_size = 16;
  // One thread: under `ctest -j2` on two cores, two OpenMP threads per test
  // oversubscribe the machine and spin.
  options.lfpm.threads = 1;
  options.lfpm.triggers.scan_steps = 30;
  options.lfpm.triggers.scan_batch_size = 8;
  options.lfpm.triggers.rescan_after = false;
  options.modes = {LfpmMode::kFull};
  // A short adaptive attack: its ASR figures are checked for bookkeeping,
  // not strength.
  options.adaptive_patch.steps = 2;
  options.adaptive_patch.batch_size = 16;
  auto rows = bench::RunLfpmRows(built->scenario, options);
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->rows.size(), 1u);
  // The clean merge's repair keeps its own report, scans included.
  const bench::LfpmRow& row = rows->rows[0];
  ASSERT_TRUE(row.clean_repaired);
  EXPECT_EQ(row.clean_report.steps, 25);
  EXPECT_EQ(row.clean_report.anomaly_merged.size(),
            row.report.anomaly_merged.size());
  auto rows_json =
      nlohmann::json::parse(bench::LfpmRowsToJson(built->scenario, *rows));
  EXPECT_EQ(rows_json["lfpm"][0]["clean_report"]["steps"], 25);
  EXPECT_EQ(rows_json["lfpm"][0]["clean_repaired"], true);
  EXPECT_EQ(bench::LfpmRowsToText(built->scenario, *rows).find("CA is TA's"),
            std::string::npos);
  // Without the clean repair the row's CA is TA's, and both outputs say so.
  bench::LfpmRows unrepaired = *rows;
  unrepaired.rows[0].clean_repaired = false;
  unrepaired.rows[0].row.clean = unrepaired.ta.clean;
  auto unrepaired_json =
      nlohmann::json::parse(bench::LfpmRowsToJson(built->scenario, unrepaired));
  EXPECT_EQ(unrepaired_json["lfpm"][0]["clean_repaired"], false);
  EXPECT_FALSE(unrepaired_json["lfpm"][0].contains("clean_report"));
  EXPECT_NE(bench::LfpmRowsToText(built->scenario, unrepaired)
                .find("LFPM-full: CA is TA's"),
            std::string::npos);
  // The backdoored run's triggers are measured against the planted patch.
  const std::string& compromised = built->scenario.attack->tasks[0];
  ASSERT_EQ(row.patch_overlap.size(), 1u);
  EXPECT_EQ(row.patch_overlap[0].task, compromised);
  for (double share : row.patch_overlap[0].mass_on_patch) {
    EXPECT_GE(share, 0.0);
    EXPECT_LE(share, 1.0);
  }
  ASSERT_EQ(row.patch_overlap[0].pattern_gap.size(),
            row.patch_overlap[0].mass_on_patch.size());
  for (size_t j = 0; j < row.patch_overlap[0].pattern_gap.size(); ++j) {
    EXPECT_GE(row.patch_overlap[0].pattern_gap[j], 0.0);
    EXPECT_LE(row.patch_overlap[0].pattern_gap[j], 1.0);
    EXPECT_GE(row.patch_overlap[0].pattern_correlation[j], -1.0 - 1e-6);
    EXPECT_LE(row.patch_overlap[0].pattern_correlation[j], 1.0 + 1e-6);
  }
  EXPECT_EQ(rows_json["lfpm"][0]["patch_overlap"][0]["patch_covered"].size(),
            row.patch_overlap[0].mass_on_patch.size());
  EXPECT_NE(bench::LfpmRowsToText(built->scenario, *rows)
                .find("mined triggers on the attack's patch"),
            std::string::npos);
  // A mask that is the patch lies all on it and covers it; one on the
  // opposite corner does neither.
  auto planted = bench::AttackTriggers(built->scenario);
  ASSERT_TRUE(planted.ok()) << planted.status();
  const Trigger& patch = planted->at(compromised);
  const torch::Tensor& masks = row.report.triggers[0].masks;
  auto stamp = TriggerMaskAndPattern(
      patch, {patch.pattern.size(0), masks.size(2), masks.size(3)});
  ASSERT_TRUE(stamp.ok()) << stamp.status();
  LfpmReport crafted;
  LfpmTriggerReport on_and_off;
  on_and_off.task = compromised;
  on_and_off.masks = torch::stack({stamp->mask, stamp->mask.flip({1, 2})});
  crafted.triggers = {on_and_off};
  auto overlaps = bench::PatchOverlaps(built->scenario, crafted);
  ASSERT_TRUE(overlaps.ok()) << overlaps.status();
  ASSERT_EQ(overlaps->size(), 1u);
  EXPECT_EQ((*overlaps)[0].mass_on_patch, (std::vector<double>{1.0, 0.0}));
  EXPECT_EQ((*overlaps)[0].patch_covered, (std::vector<double>{1.0, 0.0}));
  EXPECT_TRUE((*overlaps)[0].pattern_gap.empty());
  // With patterns: the patch's own pattern agrees with it, its negative is
  // as far from it as it can be, and a mask off the patch compares nothing.
  crafted.triggers[0].masks = torch::stack({stamp->mask, stamp->mask});
  crafted.triggers[0].patterns =
      torch::stack({stamp->pattern, 1.0 - stamp->pattern});
  overlaps = bench::PatchOverlaps(built->scenario, crafted);
  ASSERT_TRUE(overlaps.ok()) << overlaps.status();
  const bench::TriggerPatchOverlap& same_and_negative = (*overlaps)[0];
  ASSERT_EQ(same_and_negative.pattern_gap.size(), 2u);
  EXPECT_NEAR(same_and_negative.pattern_gap[0], 0.0, 1e-6);
  EXPECT_NEAR(same_and_negative.pattern_correlation[0], 1.0, 1e-5);
  const torch::Tensor on_patch = stamp->mask.expand_as(stamp->pattern).gt(0);
  const double negative_gap =
      (1.0 - 2.0 * stamp->pattern.masked_select(on_patch))
          .abs()
          .mean()
          .item<double>();
  EXPECT_NEAR(same_and_negative.pattern_gap[1], negative_gap, 1e-5);
  EXPECT_NEAR(same_and_negative.pattern_correlation[1], -1.0, 1e-5);
  crafted.triggers[0].masks = stamp->mask.flip({1, 2}).unsqueeze(0);
  crafted.triggers[0].patterns = stamp->pattern.unsqueeze(0);
  overlaps = bench::PatchOverlaps(built->scenario, crafted);
  ASSERT_TRUE(overlaps.ok()) << overlaps.status();
  EXPECT_EQ((*overlaps)[0].pattern_gap, (std::vector<double>{0.0}));
  EXPECT_EQ((*overlaps)[0].pattern_correlation, (std::vector<double>{0.0}));
  // The adaptive attack runs on all four models; each one's `original_asr`
  // is the scenario trigger's ASR that the table measured separately.
  auto expect_attack = [&](const std::vector<bench::AdaptiveAttack>& attacks,
                           const bench::ModelEvaluation& evaluation,
                           const std::string& model) {
    ASSERT_EQ(attacks.size(), 1u) << model;
    ASSERT_EQ(evaluation.asr.size(), 1u) << model;
    EXPECT_EQ(attacks[0].task, compromised) << model;
    EXPECT_NEAR(attacks[0].original_asr, evaluation.asr[0].asr, 1e-9) << model;
    EXPECT_GE(attacks[0].adaptive_asr, 0.0) << model;
    EXPECT_LE(attacks[0].adaptive_asr, 1.0) << model;
  };
  expect_attack(rows->ta_adaptive, rows->ta.backdoored, "TA");
  expect_attack(rows->clean_ta_adaptive, rows->ta.clean, "clean TA");
  expect_attack(row.adaptive, row.row.backdoored, "LFPM");
  expect_attack(row.clean_adaptive, row.row.clean, "clean LFPM");
  EXPECT_EQ(rows_json["clean_ta_adaptive"].size(), 1u);
  EXPECT_EQ(rows_json["lfpm"][0]["clean_adaptive"].size(), 1u);
  EXPECT_NE(bench::LfpmRowsToText(built->scenario, *rows).find("no backdoor"),
            std::string::npos);
  const double ta_asr = bench::MeanAsr(rows->ta.backdoored);
  const double lfpm_asr = bench::MeanAsr(rows->rows[0].row.backdoored);
  // The scenario must plant a backdoor that survives TA, or the comparison
  // says nothing.
  EXPECT_GT(ta_asr, 0.2);
  EXPECT_LT(lfpm_asr, ta_asr);
  EXPECT_LT(lfpm_asr, 0.5 * ta_asr);
  fs::remove_all(root);
}
#endif

}  // namespace
}  // namespace mergeguard
