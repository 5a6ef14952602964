#include "core/adamerging.h"

#include <sys/stat.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/differentiable_merge.h"
#include "core/lora.h"
#include "core/task_vectors.h"
#include "core/tensor_views.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/core/defense_fixtures.h"

namespace mergeguard {
namespace {

using ::mergeguard::testing::DefenseTinyBase;
using ::mergeguard::testing::DefenseTinyCalibration;
using ::mergeguard::testing::DefenseTinyModel;
using ::mergeguard::testing::DefenseTinyModule;
using ::mergeguard::testing::DefenseTinySet;
using ::mergeguard::testing::TempDir;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

NamedTensors WithHead(NamedTensors tensors, uint64_t seed) {
  torch::manual_seed(seed);
  tensors.emplace_back("head.weight", torch::randn({3, 8}));
  tensors.emplace_back("head.bias", torch::randn({3}));
  return tensors;
}

NamedTensors Shifted(const NamedTensors& base, double shift) {
  NamedTensors result;
  for (const auto& [key, tensor] : base) {
    result.emplace_back(key, tensor + shift);
  }
  return result;
}

// ---- task vectors --------------------------------------------------------

TEST(TaskVectorsTest, FullCheckpointsGiveDifferencesAndHeads) {
  TempDir dir;
  NamedTensors base = DefenseTinyBase();
  ASSERT_TRUE(SaveTensors(dir.Path("base.safetensors"), base).ok());
  ASSERT_TRUE(
      SaveTensors(dir.Path("a.safetensors"), WithHead(Shifted(base, 0.25), 1))
          .ok());
  ASSERT_TRUE(
      SaveTensors(dir.Path("b.safetensors"), WithHead(Shifted(base, -0.5), 2))
          .ok());
  auto set = LoadTaskVectors(dir.Path("base.safetensors"),
                             {{"a", dir.Path("a.safetensors"), ""},
                              {"b", dir.Path("b.safetensors"), ""}});
  ASSERT_TRUE(set.ok()) << set.status();
  EXPECT_THAT(set->keys,
              ElementsAre("fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"));
  ASSERT_EQ(set->num_tasks(), 2);
  for (int k = 0; k < set->num_tensors(); ++k) {
    EXPECT_TRUE(torch::allclose(set->task_vectors[0][k],
                                torch::full_like(set->base[k], 0.25), 1e-5,
                                1e-6));
    EXPECT_TRUE(torch::allclose(set->task_vectors[1][k],
                                torch::full_like(set->base[k], -0.5), 1e-5,
                                1e-6));
  }
  EXPECT_THAT(set->heads[1].weight.sizes(), ElementsAre(3, 8));
  torch::manual_seed(2);
  EXPECT_TRUE(torch::equal(set->heads[1].weight, torch::randn({3, 8})));
  EXPECT_TRUE(CheckFitsModel(*set, *DefenseTinyModel()).ok());
}

TEST(TaskVectorsTest, MissingExtraAndMisshapenKeysAreNamed) {
  TempDir dir;
  NamedTensors base = DefenseTinyBase();
  ASSERT_TRUE(SaveTensors(dir.Path("base.safetensors"), base).ok());
  NamedTensors missing = WithHead(base, 1);
  missing.erase(missing.begin() + 1);  // fc1.weight
  ASSERT_TRUE(SaveTensors(dir.Path("missing.safetensors"), missing).ok());
  auto status = LoadTaskVectors(dir.Path("base.safetensors"),
                                {{"m", dir.Path("missing.safetensors"), ""}})
                    .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("\"fc1.weight\""));

  NamedTensors extra = WithHead(base, 1);
  extra.emplace_back("fc3.weight", torch::zeros({2}));
  ASSERT_TRUE(SaveTensors(dir.Path("extra.safetensors"), extra).ok());
  status = LoadTaskVectors(dir.Path("base.safetensors"),
                           {{"e", dir.Path("extra.safetensors"), ""}})
               .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("\"fc3.weight\""));

  NamedTensors misshapen = WithHead(base, 1);
  misshapen[2].second = torch::zeros({9});  // fc2.bias
  ASSERT_TRUE(SaveTensors(dir.Path("shape.safetensors"), misshapen).ok());
  status = LoadTaskVectors(dir.Path("base.safetensors"),
                           {{"s", dir.Path("shape.safetensors"), ""}})
               .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("\"fc2.bias\""));

  ASSERT_TRUE(SaveTensors(dir.Path("headless.safetensors"), base).ok());
  status = LoadTaskVectors(dir.Path("base.safetensors"),
                           {{"h", dir.Path("headless.safetensors"), ""}})
               .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("head"));

  status = LoadTaskVectors(dir.Path("base.safetensors"),
                           {{"a/b", dir.Path("headless.safetensors"), ""}})
               .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
}

TEST(TaskVectorsTest, LoraAdaptersAreTaskVectorsWithAGivenHead) {
  TempDir dir;
  NamedTensors base = DefenseTinyBase();
  ASSERT_TRUE(SaveTensors(dir.Path("base.safetensors"), base).ok());
  ASSERT_TRUE(
      SaveTensors(dir.Path("head.safetensors"), WithHead(Shifted(base, 1.0), 3))
          .ok());
  std::string adapter = dir.Path("adapter");
  ASSERT_EQ(::mkdir(adapter.c_str(), 0755), 0);
  std::ofstream(absl::StrCat(adapter, "/", kAdapterConfigFileName))
      << R"({"peft_type": "LORA", "r": 2, "lora_alpha": 4})";
  torch::Tensor a = torch::randn({2, 16}), b = torch::randn({8, 2});
  ASSERT_TRUE(SaveTensors(absl::StrCat(adapter, "/", kAdapterWeightsFileName),
                          {{"base_model.model.fc2.lora_A.weight", a},
                           {"base_model.model.fc2.lora_B.weight", b}})
                  .ok());

  auto status =
      LoadTaskVectors(dir.Path("base.safetensors"), {{"l", adapter, ""}})
          .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(status.message(), HasSubstr("LoRA"));

  auto set = LoadTaskVectors(dir.Path("base.safetensors"),
                             {{"l", adapter, dir.Path("head.safetensors")}});
  ASSERT_TRUE(set.ok()) << set.status();
  // fc2.weight (key 3) gets (B A) * 4 / 2; the rest stays zero.
  EXPECT_TRUE(
      torch::allclose(set->task_vectors[0][3], b.matmul(a) * 2.0, 1e-5, 1e-5));
  EXPECT_EQ(set->task_vectors[0][1].abs().max().item<float>(), 0.0f);
  torch::manual_seed(3);
  EXPECT_TRUE(torch::equal(set->heads[0].weight, torch::randn({3, 8})));
}

// ---- building blocks -----------------------------------------------------

TEST(DifferentiableMergeTest, MergedTensorIsBasePlusWeightedTaskVectors) {
  auto model = DefenseTinyModel();
  TaskVectorSet set = DefenseTinySet(2);
  auto merger = TaskVectorMerger::Create(set, *model, c10::Device(c10::kCPU));
  ASSERT_TRUE(merger.ok()) << merger.status();
  torch::Tensor lambdas = torch::tensor({0.2f, -0.7f});
  for (int k = 0; k < set.num_tensors(); ++k) {
    torch::Tensor mask = torch::rand_like(set.base[k]);
    torch::Tensor expected =
        set.base[k] +
        mask * (0.2f * set.task_vectors[0][k] - 0.7f * set.task_vectors[1][k]);
    EXPECT_TRUE(torch::allclose(merger->MergedTensor(k, lambdas, mask),
                                expected, 1e-5, 1e-6));
  }
  // Layer-wise: column k scales tensor k.
  torch::Tensor layer_wise = torch::rand({2, set.num_tensors()});
  torch::Tensor expected = set.base[1] +
                           layer_wise[0][1] * set.task_vectors[0][1] +
                           layer_wise[1][1] * set.task_vectors[1][1];
  EXPECT_TRUE(
      torch::allclose(merger->MergedTensor(1, layer_wise, torch::Tensor()),
                      expected, 1e-5, 1e-6));
}

TEST(DifferentiableMergeTest, CalibrationSamplerIsSeededAndCoversEpochs) {
  torch::Tensor inputs =
      torch::arange(10).to(torch::kFloat32).view({10, 1, 1, 1});
  CalibrationSampler a({inputs}, 4, 9, c10::Device(c10::kCPU));
  CalibrationSampler b({inputs}, 4, 9, c10::Device(c10::kCPU));
  CalibrationSampler c({inputs}, 4, 10, c10::Device(c10::kCPU));
  bool any_different = false;
  for (int i = 0; i < 5; ++i) {
    torch::Tensor batch_a = a.Next(0);
    EXPECT_TRUE(torch::equal(batch_a, b.Next(0)));
    any_different |= !torch::equal(batch_a, c.Next(0));
    EXPECT_EQ(batch_a.size(0), 4);
    // No repeats within a batch.
    EXPECT_EQ(std::get<0>(torch::_unique(batch_a.flatten())).numel(), 4);
  }
  EXPECT_TRUE(any_different);
}

TEST(DifferentiableMergeTest, EntropyMatchesTheDefinition) {
  torch::Tensor logits = torch::tensor({{0.0f, 0.0f}, {100.0f, 0.0f}});
  // Mean of log 2 and 0.
  EXPECT_NEAR(MeanEntropy(logits).item<double>(), std::log(2.0) / 2, 1e-6);
}

TEST(DifferentiableMergeTest, CalibrationFilesNeedInputs) {
  TempDir dir;
  ASSERT_TRUE(
      SaveTensors(dir.Path("u8.safetensors"),
                  {{"inputs", torch::full({2, 1, 28, 28}, 255, torch::kUInt8)}})
          .ok());
  auto inputs = LoadCalibrationInputs(dir.Path("u8.safetensors"), {1, 28, 28});
  ASSERT_TRUE(inputs.ok()) << inputs.status();
  EXPECT_FLOAT_EQ(inputs->min().item<float>(), 1.0f);
  EXPECT_EQ(LoadCalibrationInputs(dir.Path("u8.safetensors"), {1, 32, 32})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(SaveTensors(dir.Path("none.safetensors"),
                          {{"labels", torch::zeros({2}, torch::kLong)}})
                  .ok());
  EXPECT_EQ(LoadCalibrationInputs(dir.Path("none.safetensors")).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// ---- AdaMerging ----------------------------------------------------------

AdaMergingOptions FastOptions() {
  AdaMergingOptions options;
  options.steps = 40;
  options.learning_rate = 1e-2;
  options.batch_size = 8;
  options.threads = 1;
  return options;
}

TEST(AdaMergingTest, LambdaGradientIsInnerProductOfThetaGradient) {
  // dL/dlambda_t = <dL/dtheta, tau_t> (ALGORITHMS.md §7), checked against
  // autograd through the installed TorchScript module.
  auto model = DefenseTinyModel();
  TaskVectorSet set = DefenseTinySet(3);
  auto merger = TaskVectorMerger::Create(set, *model, c10::Device(c10::kCPU));
  ASSERT_TRUE(merger.ok());
  torch::Tensor lambdas = torch::tensor({0.3f, 0.1f, 0.6f}).requires_grad_();
  torch::Tensor inputs = DefenseTinyCalibration(1)[0];
  ASSERT_TRUE(merger->Install(*model, lambdas, {}).ok());
  torch::Tensor loss = torch::zeros({});
  for (int t = 0; t < 3; ++t) {
    loss = loss + MeanEntropy(*merger->Logits(*model, t, inputs));
  }
  loss.backward();

  std::vector<torch::Tensor> thetas;
  for (int k = 0; k < set.num_tensors(); ++k) {
    thetas.push_back(merger->MergedTensor(k, lambdas.detach(), {})
                         .detach()
                         .requires_grad_(true));
    ASSERT_TRUE(model->InstallTensor(set.keys[k], thetas.back()).ok());
  }
  torch::Tensor loss_theta = torch::zeros({});
  for (int t = 0; t < 3; ++t) {
    loss_theta = loss_theta + MeanEntropy(*merger->Logits(*model, t, inputs));
  }
  loss_theta.backward();
  for (int t = 0; t < 3; ++t) {
    double by_hand = 0;
    for (int k = 0; k < set.num_tensors(); ++k) {
      by_hand +=
          (thetas[k].grad() * set.task_vectors[t][k]).sum().item<double>();
    }
    EXPECT_NEAR(lambdas.grad()[t].item<double>(), by_hand,
                1e-4 * std::max(1.0, std::abs(by_hand)));
  }
}

TEST(AdaMergingTest, LowersEntropyAndReturnsTheMergeItLearned) {
  auto model = DefenseTinyModel();
  TaskVectorSet set = DefenseTinySet(3);
  auto result = AdaMerge(*model, set, DefenseTinyCalibration(), FastOptions());
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->loss_curve.size(), 40u);
  double first = 0, last = 0;
  for (int i = 0; i < 5; ++i) {
    first += result->loss_curve[i];
    last += result->loss_curve[35 + i];
  }
  EXPECT_LT(last, first);
  EXPECT_THAT(result->lambdas.sizes(), ElementsAre(3));
  EXPECT_FALSE(torch::allclose(result->lambdas, torch::full({3}, 0.3f)));
  for (int k = 0; k < set.num_tensors(); ++k) {
    torch::Tensor expected = set.base[k].clone();
    for (int t = 0; t < 3; ++t) {
      expected += result->lambdas[t] * set.task_vectors[t][k];
    }
    EXPECT_TRUE(torch::allclose(result->backbone[k], expected, 1e-5, 1e-6));
  }
  // The model holds the merge, without autograd history.
  for (const auto& [name, tensor] : model->Backbone()) {
    const size_t k =
        std::find(set.keys.begin(), set.keys.end(), name) - set.keys.begin();
    ASSERT_LT(k, set.keys.size()) << name;
    EXPECT_TRUE(torch::allclose(tensor, result->backbone[k])) << name;
  }
  EXPECT_EQ(model->ParameterTensors()[0].grad_fn(), nullptr);
}

TEST(AdaMergingTest, LayerWiseHasOneLambdaPerTaskAndTensor) {
  auto model = DefenseTinyModel();
  AdaMergingOptions options = FastOptions();
  options.granularity = LambdaGranularity::kLayerWise;
  auto result =
      AdaMerge(*model, DefenseTinySet(3), DefenseTinyCalibration(), options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(result->lambdas.sizes(), ElementsAre(3, 4));
  // Different tensors learn different coefficients.
  EXPECT_FALSE(torch::allclose(result->lambdas.select(1, 0),
                               result->lambdas.select(1, 3)));
}

TEST(AdaMergingTest, SeedMakesRunsDeterministic) {
  auto run = [](uint64_t seed) {
    auto model = DefenseTinyModel();
    AdaMergingOptions options = FastOptions();
    options.seed = seed;
    auto result =
        AdaMerge(*model, DefenseTinySet(3), DefenseTinyCalibration(), options);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->lambdas : torch::Tensor();
  };
  torch::Tensor a = run(4), b = run(4), c = run(5);
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_FALSE(torch::equal(a, c));
}

TEST(AdaMergingTest, CancellationStopsBetweenSteps) {
  auto model = DefenseTinyModel();
  AdaMergingOptions options = FastOptions();
  int polls = 0;
  options.is_cancelled = [&polls] { return ++polls > 3; };
  int reports = 0;
  options.progress_interval = 1;
  options.on_progress = [&reports](const TrainingProgress& progress) {
    EXPECT_EQ(progress.phase, "adamerging");
    EXPECT_EQ(progress.step, reports + 1);
    EXPECT_TRUE(progress.losses.count("entropy"));
    ++reports;
  };
  auto result =
      AdaMerge(*model, DefenseTinySet(3), DefenseTinyCalibration(), options);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled);
  EXPECT_EQ(reports, 3);
}

TEST(AdaMergingTest, RejectsBadOptionsAndCalibration) {
  auto model = DefenseTinyModel();
  AdaMergingOptions options = FastOptions();
  options.learning_rate = 0;
  EXPECT_EQ(
      AdaMerge(*model, DefenseTinySet(3), DefenseTinyCalibration(), options)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  options = FastOptions();
  options.device = "tpu";
  EXPECT_EQ(
      AdaMerge(*model, DefenseTinySet(3), DefenseTinyCalibration(), options)
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AdaMerge(*model, DefenseTinySet(3), DefenseTinyCalibration(2),
                     FastOptions())
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(AdaMergingTest, FilesJobWritesHeadsAndProvenance) {
  TempDir dir;
  ASSERT_TRUE(DefenseTinyModel() != nullptr);
  DefenseTinyModule().save(dir.Path("arch.pt"));
  NamedTensors base = DefenseTinyBase();
  ASSERT_TRUE(SaveTensors(dir.Path("base.safetensors"), base).ok());
  std::vector<DataDependentTask> tasks;
  std::vector<torch::Tensor> calibration = DefenseTinyCalibration(2);
  for (int t = 0; t < 2; ++t) {
    std::string name = absl::StrCat("t", t);
    ASSERT_TRUE(SaveTensors(dir.Path(name + ".safetensors"),
                            WithHead(Shifted(base, 0.01 * (t + 1)), t))
                    .ok());
    ASSERT_TRUE(SaveTensors(dir.Path(name + "_cal.safetensors"),
                            {{"inputs", calibration[t]}})
                    .ok());
    tasks.push_back({{name, dir.Path(name + ".safetensors"), ""},
                     dir.Path(name + "_cal.safetensors")});
  }
  AdaMergingOptions options = FastOptions();
  options.steps = 5;
  options.metadata["job"] = "42";
  auto result = AdaMergeFiles(dir.Path("arch.pt"), dir.Path("base.safetensors"),
                              tasks, dir.Path("out.safetensors"), options);
  ASSERT_TRUE(result.ok()) << result.status();
  auto checkpoint = Checkpoint::Open(dir.Path("out.safetensors"));
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_NE((*checkpoint)->Find("t1/head.weight"), nullptr);
  EXPECT_NE((*checkpoint)->Find("fc1.weight"), nullptr);
  EXPECT_EQ((*checkpoint)->Metadata().at("mergeguard.method"), "adamerging");
  EXPECT_EQ((*checkpoint)->Metadata().at("job"), "42");
  auto report = nlohmann::json::parse(AdaMergingResultToJson(*result, options));
  EXPECT_EQ(report["lambdas"].size(), 2u);
}

}  // namespace
}  // namespace mergeguard
