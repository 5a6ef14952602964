#include "core/dam.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>

#include "core/checkpoint.h"
#include "core/differentiable_merge.h"
#include "core/lfpm.h"
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

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// E[sigmoid((logit(u) + s) / T)] for u ~ U(0,1), by the midpoint rule.
double ConcreteMean(double s, double temperature) {
  constexpr int kPoints = 200000;
  double sum = 0;
  for (int i = 0; i < kPoints; ++i) {
    const double u = (i + 0.5) / kPoints;
    sum += Sigmoid((std::log(u) - std::log1p(-u) + s) / temperature);
  }
  return sum / kPoints;
}

// ---- Concrete masks, normalisation, projection ----------------------------

TEST(ConcreteMaskTest, StatisticsMatchTheRelaxedBernoulli) {
  at::Generator generator = MakeGenerator(3);
  for (double s : {-2.0, -0.5, 0.0, 1.0, 3.0}) {
    torch::Tensor logits = torch::full({400000}, s);
    torch::Tensor m = SampleConcreteMask(logits, 0.5, generator);
    EXPECT_GE(m.min().item<double>(), 0.0);
    EXPECT_LE(m.max().item<double>(), 1.0);
    // P(m > 1/2) = sigmoid(s) exactly for any temperature.
    EXPECT_NEAR((m > 0.5).to(torch::kFloat64).mean().item<double>(), Sigmoid(s),
                0.004)
        << "s = " << s;
    EXPECT_NEAR(m.to(torch::kFloat64).mean().item<double>(),
                ConcreteMean(s, 0.5), 0.004)
        << "s = " << s;
  }
  // A lower temperature pushes draws towards {0, 1}.
  torch::Tensor zeros = torch::zeros({100000});
  torch::Tensor cold = SampleConcreteMask(zeros, 0.1, generator);
  torch::Tensor warm = SampleConcreteMask(zeros, 2.0, generator);
  EXPECT_GT((cold - 0.5).abs().mean().item<double>(),
            (warm - 0.5).abs().mean().item<double>() + 0.2);
}

TEST(ConcreteMaskTest, IsDifferentiableAndSeeded) {
  torch::Tensor logits = torch::zeros({1000}).requires_grad_(true);
  at::Generator a = MakeGenerator(11), b = MakeGenerator(11);
  torch::Tensor m = SampleConcreteMask(logits, 0.5, a);
  EXPECT_TRUE(
      torch::equal(m.detach(), SampleConcreteMask(logits, 0.5, b).detach()));
  m.sum().backward();
  // dm/ds = m (1 - m) / T > 0.
  EXPECT_TRUE(torch::allclose(logits.grad(),
                              m.detach() * (1 - m.detach()) / 0.5, 1e-5, 1e-6));
}

TEST(MaskNormalisationTest, EveryTensorHasMeanOne) {
  torch::manual_seed(0);
  for (auto shape : std::vector<std::vector<int64_t>>{{7}, {3, 5}, {2, 3, 4}}) {
    torch::Tensor mask = torch::rand(shape) * 0.3;
    torch::Tensor normalised = NormalizeMaskByMean(mask);
    EXPECT_NEAR(normalised.mean().item<double>(), 1.0, 1e-6);
    // Proportions are kept.
    EXPECT_TRUE(torch::allclose(normalised * mask.mean(), mask, 1e-5, 1e-7));
  }
  torch::Tensor zeros = NormalizeMaskByMean(torch::zeros({4}));
  EXPECT_EQ(zeros.abs().sum().item<double>(), 0.0);
  EXPECT_FALSE(zeros.isnan().any().item<bool>());
}

TEST(MaskStepTest, NormalizedGradientKeepsRelativeSizesAtTheLearningRate) {
  torch::Tensor a = torch::zeros({4}).requires_grad_(true);
  torch::Tensor flat = torch::full({3}, 0.5).requires_grad_(true);
  torch::Tensor untouched = torch::ones({2}).requires_grad_(true);
  // Gradients 1, -2, 0, 4 on a; zero on `flat`; none on `untouched`.
  const torch::Tensor weights = torch::tensor({1.0f, -2.0f, 0.0f, 4.0f});
  ((a * weights).sum() + flat.sum() * 0.0).backward();
  std::vector<torch::Tensor> parameters = {a, flat, untouched};
  StepByNormalizedGradient(parameters, 0.1);
  // rms(1, -2, 0, 4) = sqrt(21 / 4).
  const double rms = std::sqrt(21.0 / 4.0);
  EXPECT_TRUE(torch::allclose(a.detach(), -0.1 * weights / rms, 1e-6, 1e-7));
  // The typical entry moves by the learning rate.
  EXPECT_NEAR(a.detach().square().mean().sqrt().item<double>(), 0.1, 1e-6);
  EXPECT_TRUE(torch::equal(flat.detach(), torch::full({3}, 0.5)));
  EXPECT_TRUE(torch::equal(untouched.detach(), torch::ones({2})));
}

TEST(PerturbationTest, ProjectionBoundsDeltaAndInputsStayValid) {
  torch::manual_seed(0);
  torch::Tensor delta = torch::randn({1, 28, 28});
  torch::Tensor projected = ProjectPerturbation(delta, 0.1);
  EXPECT_LE(projected.abs().max().item<double>(), 0.1 + 1e-7);
  // Entries inside the ball are untouched.
  torch::Tensor inside = delta.abs() < 0.1;
  EXPECT_TRUE(torch::equal(projected.masked_select(inside),
                           delta.masked_select(inside)));
  torch::Tensor inputs = torch::rand({5, 1, 28, 28});
  torch::Tensor perturbed = PerturbInputs(inputs, projected);
  EXPECT_GE(perturbed.min().item<double>(), 0.0);
  EXPECT_LE(perturbed.max().item<double>(), 1.0);
  EXPECT_LE((perturbed - inputs).abs().max().item<double>(), 0.1 + 1e-6);
}

// ---- the trainer ----------------------------------------------------------

DamOptions FastOptions() {
  DamOptions options;
  options.steps = 6;
  options.adamerging_steps = 5;
  options.batch_size = 8;
  options.threads = 1;
  options.progress_interval = 1;
  return options;
}

struct TinyWorld {
  std::unique_ptr<Model> model = DefenseTinyModel();
  TaskVectorSet set = DefenseTinySet(3);
  std::vector<torch::Tensor> calibration = DefenseTinyCalibration(3);
};

// CleanLabelCe is the merge's cross-entropy to its own predictions on task
// t's clean inputs, on those inputs and on their triggered copies.
struct CleanLabelCe {
  double clean = 0.0;
  double triggered = 0.0;
};
CleanLabelCe CrossEntropyToCleanLabels(TaskVectorMerger& merger, Model& model,
                                       int t, const torch::Tensor& x,
                                       const torch::Tensor& triggered_x) {
  auto clean = merger.Logits(model, t, x);
  auto triggered = merger.Logits(model, t, triggered_x);
  if (!clean.ok() || !triggered.ok()) {
    ADD_FAILURE() << "logits of task " << t << " failed";
    return {};
  }
  torch::Tensor labels = clean->argmax(1);
  return {torch::nll_loss(torch::log_softmax(*clean, 1), labels).item<double>(),
          torch::nll_loss(torch::log_softmax(*triggered, 1), labels)
              .item<double>()};
}

TEST(DamTrainerTest, TriggersStayInsideTheEpsilonBall) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.trigger_learning_rate = 0.02;  // large, so the bound binds
  options.trigger_epsilon = 0.05;
  auto trainer =
      DamTrainer::Create(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  for (int i = 0; i < 6; ++i) ASSERT_TRUE((*trainer)->Step().ok());
  torch::Tensor delta = (*trainer)->Perturbations();
  EXPECT_THAT(delta.sizes(), ElementsAre(3, 1, 28, 28));
  EXPECT_LE(delta.abs().max().item<double>(), 0.05 + 1e-7);
  // Six Adam steps of 0.02 reach the bound somewhere.
  EXPECT_NEAR(delta.abs().max().item<double>(), 0.05, 1e-6);
  auto result = (*trainer)->Finish();
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->report.triggers.size(), 3u);
  EXPECT_LE(result->report.triggers[0].linf, 0.05 + 1e-7);
  EXPECT_GT(result->report.triggers[0].l2, 0.0);
}

TEST(DamTrainerTest, TriggerStepIncreasesTheCrossEntropy) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.trigger_learning_rate = 0.01;
  options.trigger_epsilon = 0.3;
  options.lambda_learning_rate = 1e-9;  // keep the model almost fixed
  options.mask_learning_rate = 1e-9;
  auto trainer =
      DamTrainer::Create(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  for (int i = 0; i < 30; ++i) ASSERT_TRUE((*trainer)->Step().ok());
  torch::Tensor delta = (*trainer)->Perturbations();
  // On the unmasked merge at lambda = 0.3, over each whole calibration set,
  // the learned delta_t raises the cross-entropy to the clean predictions.
  auto merger =
      TaskVectorMerger::Create(run.set, *run.model, c10::Device(c10::kCPU));
  ASSERT_TRUE(merger.ok());
  torch::NoGradGuard no_grad;
  ASSERT_TRUE(merger->Install(*run.model, torch::full({3}, 0.3f), {}).ok());
  for (int t = 0; t < 3; ++t) {
    const torch::Tensor& x = run.calibration[t];
    const CleanLabelCe ce = CrossEntropyToCleanLabels(
        *merger, *run.model, t, x, PerturbInputs(x, delta[t]));
    EXPECT_GT(ce.triggered, ce.clean + 0.05) << "task " << t;
  }
}

TEST(DamTrainerTest, PatchTriggerMovesInputsOffTheirLabelsWithASmallMask) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.trigger_shape = TriggerShape::kPatch;
  options.trigger_learning_rate = 0.1;
  options.lambda_learning_rate = 1e-9;  // keep the model almost fixed
  options.mask_learning_rate = 1e-9;
  auto trainer =
      DamTrainer::Create(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  for (int i = 0; i < 30; ++i) ASSERT_TRUE((*trainer)->Step().ok());
  torch::Tensor masks = (*trainer)->PatchMasks();
  torch::Tensor stamped = (*trainer)->Perturbations();
  EXPECT_THAT(masks.sizes(), ElementsAre(3, 1, 28, 28));
  EXPECT_THAT(stamped.sizes(), ElementsAre(3, 1, 28, 28));
  EXPECT_GE(masks.min().item<double>(), 0.0);
  EXPECT_LE(masks.max().item<double>(), 1.0);
  auto merger =
      TaskVectorMerger::Create(run.set, *run.model, c10::Device(c10::kCPU));
  ASSERT_TRUE(merger.ok());
  {
    torch::NoGradGuard no_grad;
    ASSERT_TRUE(merger->Install(*run.model, torch::full({3}, 0.3f), {}).ok());
    // The triggers were trained against masked merges, so check them on the
    // unmasked one in total, and that none makes its task's labels likelier.
    double total_increase = 0;
    for (int t = 0; t < 3; ++t) {
      const torch::Tensor& x = run.calibration[t];
      torch::Tensor m = masks[t];
      torch::Tensor p = stamped[t] / m;  // M * P / M
      const CleanLabelCe ce = CrossEntropyToCleanLabels(*merger, *run.model, t,
                                                        x, (1 - m) * x + m * p);
      EXPECT_GT(ce.triggered, ce.clean - 0.02) << "task " << t;
      total_increase += ce.triggered - ce.clean;
    }
    EXPECT_GT(total_increase, 0.1);
  }
  auto result = (*trainer)->Finish();
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->report.triggers.size(), 3u);
  EXPECT_GT(result->report.triggers[0].mask_l1, 0.0);
  // Well below the whole image (784 pixels).
  EXPECT_LT(result->report.triggers[0].mask_l1, 200.0);
}

TEST(DamOptionsTest, ParsesTriggerShapes) {
  EXPECT_EQ(*ParseTriggerShape("dense"), TriggerShape::kDense);
  EXPECT_EQ(*ParseTriggerShape("patch"), TriggerShape::kPatch);
  EXPECT_FALSE(ParseTriggerShape("blob").ok());
  EXPECT_EQ(TriggerShapeName(TriggerShape::kPatch), "patch");
  EXPECT_EQ(DamOptions().trigger_shape, TriggerShape::kDense);
}

TEST(DamOptionsTest, ParsesMaskOptimizers) {
  EXPECT_EQ(*ParseMaskOptimizer("adam"), MaskOptimizer::kAdam);
  EXPECT_EQ(*ParseMaskOptimizer("normalized_sgd"),
            MaskOptimizer::kNormalizedSgd);
  EXPECT_FALSE(ParseMaskOptimizer("sgd").ok());
  EXPECT_EQ(MaskOptimizerName(MaskOptimizer::kNormalizedSgd), "normalized_sgd");
  EXPECT_EQ(DamOptions().mask_optimizer, MaskOptimizer::kAdam);
}

TEST(DamTrainerTest, LambdaStepDescendsTheHandComputedGradient) {
  for (LambdaGranularity granularity :
       {LambdaGranularity::kTaskWise, LambdaGranularity::kLayerWise}) {
    TinyWorld run;
    DamOptions options = FastOptions();
    options.granularity = granularity;
    auto trainer =
        DamTrainer::Create(*run.model, run.set, run.calibration, options);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    (*trainer)->EnableMetaStepRecordForTesting();
    torch::Tensor first_moment, second_moment;
    for (int step = 0; step < 3; ++step) {
      ASSERT_TRUE((*trainer)->Step().ok());
      const DamTrainer::MetaStepRecord& record =
          (*trainer)->last_meta_step_for_testing();
      // dL/dtheta at theta(lambda, m) on the recorded batches.
      std::vector<torch::Tensor> thetas;
      for (int k = 0; k < run.set.num_tensors(); ++k) {
        torch::Tensor combined = torch::zeros_like(run.set.base[k]);
        for (int t = 0; t < 3; ++t) {
          combined += LambdaColumn(record.lambdas_before, k)[t] *
                      run.set.task_vectors[t][k];
        }
        thetas.push_back((run.set.base[k] + record.mask[k] * combined)
                             .detach()
                             .requires_grad_(true));
        ASSERT_TRUE(
            run.model->InstallTensor(run.set.keys[k], thetas.back()).ok());
      }
      torch::Tensor loss = torch::zeros({});
      for (int t = 0; t < 3; ++t) {
        auto features = run.model->Features(record.batches[t]);
        ASSERT_TRUE(features.ok());
        loss = loss + MeanEntropy(run.set.heads[t].Logits(*features));
      }
      loss.backward();
      // dL/dlambda_t(,k) = <dL/dtheta_k, m_k * tau_tk>.
      torch::Tensor by_hand = torch::zeros_like(record.lambdas_before);
      if (step == 0) {
        first_moment = torch::zeros_like(by_hand);
        second_moment = torch::zeros_like(by_hand);
      }
      for (int t = 0; t < 3; ++t) {
        for (int k = 0; k < run.set.num_tensors(); ++k) {
          double g =
              (thetas[k].grad() * record.mask[k] * run.set.task_vectors[t][k])
                  .sum()
                  .item<double>();
          if (by_hand.dim() == 1) {
            by_hand[t] += g;
          } else {
            by_hand[t][k] += g;
          }
        }
      }
      EXPECT_TRUE(torch::allclose(record.lambda_gradient, by_hand, 1e-3, 1e-6))
          << record.lambda_gradient << "\nvs\n"
          << by_hand;
      // The update is Adam's on the hand-computed gradients: on the first
      // step exactly -lr * sign(g), later the bias-corrected moments.
      first_moment = 0.9 * first_moment + 0.1 * by_hand;
      second_moment = 0.999 * second_moment + 0.001 * by_hand * by_hand;
      const double t = step + 1;
      torch::Tensor expected_update =
          -options.lambda_learning_rate *
          (first_moment / (1 - std::pow(0.9, t))) /
          ((second_moment / (1 - std::pow(0.999, t))).sqrt() + 1e-8);
      torch::Tensor update = record.lambdas_after - record.lambdas_before;
      EXPECT_TRUE(torch::allclose(update, expected_update, 1e-2, 1e-7))
          << update << "\nvs\n"
          << expected_update;
      if (step == 0) {
        torch::Tensor significant = by_hand.abs() > 1e-6;
        ASSERT_GT(significant.sum().item<int64_t>(), 0);
        EXPECT_TRUE(
            torch::equal(torch::sign(update).masked_select(significant),
                         -torch::sign(by_hand).masked_select(significant)));
      }
    }
  }
}

TEST(DamTrainerTest, ReferenceStyleLambdaResetStartsEveryMetaStepAtInit) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.reset_lambda_each_step = true;
  auto trainer =
      DamTrainer::Create(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  (*trainer)->EnableMetaStepRecordForTesting();
  for (int step = 0; step < 3; ++step) {
    ASSERT_TRUE((*trainer)->Step().ok());
    const auto& record = (*trainer)->last_meta_step_for_testing();
    EXPECT_TRUE(torch::equal(record.lambdas_before, torch::full({3}, 0.3f)));
    EXPECT_FALSE(torch::equal(record.lambdas_after, record.lambdas_before));
  }
}

TEST(DamTrainerTest, MasksAlternateOddSharedEvenDetection) {
  TinyWorld run;
  auto trainer =
      DamTrainer::Create(*run.model, run.set, run.calibration, FastOptions());
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto changed = [](const std::vector<torch::Tensor>& logits) {
    double total = 0;
    for (const torch::Tensor& s : logits) total += s.abs().sum().item<double>();
    return total;
  };
  ASSERT_TRUE((*trainer)->Step().ok());  // step 1: s1
  EXPECT_GT(changed((*trainer)->SharedMaskLogits()), 0.0);
  EXPECT_EQ(changed((*trainer)->DetectionMaskLogits()), 0.0);
  const double shared_after_one = changed((*trainer)->SharedMaskLogits());
  ASSERT_TRUE((*trainer)->Step().ok());  // step 2: s2
  EXPECT_GT(changed((*trainer)->DetectionMaskLogits()), 0.0);
  EXPECT_EQ(changed((*trainer)->SharedMaskLogits()), shared_after_one);
}

// FirstSharedMaskStep returns how far each entry of s1 that moved moved in
// the first outer step (s1 starts at 0 and step 1 updates it).
torch::Tensor FirstSharedMaskStep(const DamOptions& options) {
  TinyWorld run;
  auto trainer =
      DamTrainer::Create(*run.model, run.set, run.calibration, options);
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  if (!trainer.ok()) return torch::zeros({0});
  EXPECT_TRUE((*trainer)->Step().ok());
  std::vector<torch::Tensor> moved;
  for (const torch::Tensor& s : (*trainer)->SharedMaskLogits()) {
    torch::Tensor size = s.abs().flatten();
    moved.push_back(size.masked_select(size > 0));
  }
  return torch::cat(moved);
}

TEST(DamTrainerTest, NormalizedSgdMasksMoveByTheirGradientsNotByTheirSign) {
  DamOptions options = FastOptions();
  options.mask_learning_rate = 0.01;
  torch::Tensor adam = FirstSharedMaskStep(options);
  options.mask_optimizer = MaskOptimizer::kNormalizedSgd;
  torch::Tensor normalized = FirstSharedMaskStep(options);
  ASSERT_GT(adam.numel(), 0);
  ASSERT_GT(normalized.numel(), 0);
  auto quantile = [](const torch::Tensor& sizes, double q) {
    return sizes.quantile(q).item<double>();
  };
  // Adam's first step moves nearly every entry by its learning rate (all
  // but those whose gradient is near Adam's epsilon, 1e-8).
  EXPECT_NEAR(quantile(adam, 0.1), 0.01, 1e-3);
  EXPECT_NEAR(quantile(adam, 0.5), 0.01, 1e-4);
  EXPECT_NEAR(adam.max().item<double>(), 0.01, 1e-4);
  // The normalised step keeps the gradients' spread: the typical (root mean
  // square) entry moves by the learning rate, the median far less, the
  // strongest far more.
  EXPECT_NEAR(normalized.square().mean().sqrt().item<double>(), 0.01, 2e-3);
  EXPECT_LT(quantile(normalized, 0.5), 0.001);
  EXPECT_GT(quantile(normalized, 0.99), 0.02);
}

// TrainSixSteps runs six outer steps of a trainer on `run` with a mask
// learning rate that moves the logits visibly, for the final-mask tests.
void TrainSixSteps(TinyWorld& run, DamOptions options,
                   std::unique_ptr<DamTrainer>* trainer) {
  options.mask_learning_rate = 0.05;
  auto created =
      DamTrainer::Create(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(created.ok()) << created.status();
  *trainer = std::move(*created);
  for (int i = 0; i < 6; ++i) ASSERT_TRUE((*trainer)->Step().ok());
}

TEST(DamTrainerTest, FinalMaskModes) {
  TinyWorld run;
  std::unique_ptr<DamTrainer> trainer;
  ASSERT_NO_FATAL_FAILURE(TrainSixSteps(run, FastOptions(), &trainer));
  std::vector<torch::Tensor> s1 = trainer->SharedMaskLogits();
  std::vector<torch::Tensor> s2 = trainer->DetectionMaskLogits();
  auto expected = trainer->FinalMask(FinalMaskMode::kExpected);
  auto again = trainer->FinalMask(FinalMaskMode::kExpected);
  auto sample = trainer->FinalMask(FinalMaskMode::kSample);
  auto sample2 = trainer->FinalMask(FinalMaskMode::kSample);
  auto hard = trainer->FinalMask(FinalMaskMode::kHard);
  auto hard_detection = trainer->FinalMask(FinalMaskMode::kHardDetection);
  for (size_t k = 0; k < s1.size(); ++k) {
    // hard_detection: zero exactly where M2 flags, sigmoid(s1) elsewhere.
    torch::Tensor unflagged = s2[k] > 0;
    EXPECT_TRUE(torch::equal(hard_detection[k] > 0, unflagged));
    if (unflagged.any().item<bool>()) {
      torch::Tensor soft = torch::sigmoid(s1[k]) * unflagged;
      EXPECT_TRUE(
          torch::allclose(hard_detection[k], soft / soft.mean(), 1e-5, 1e-6));
    }
    EXPECT_TRUE(torch::equal(expected[k], again[k]));
    EXPECT_NEAR(expected[k].mean().item<double>(), 1.0, 1e-5);
    torch::Tensor product = torch::sigmoid(s1[k]) * torch::sigmoid(s2[k]);
    EXPECT_TRUE(
        torch::allclose(expected[k], product / product.mean(), 1e-5, 1e-6));
    EXPECT_NEAR(sample[k].mean().item<double>(), 1.0, 1e-5);
    EXPECT_FALSE(torch::equal(sample[k], sample2[k]));
    torch::Tensor kept = (s1[k] > 0).logical_and(s2[k] > 0);
    EXPECT_TRUE(torch::equal(hard[k] > 0, kept));
    if (kept.any().item<bool>()) {
      EXPECT_NEAR(hard[k].mean().item<double>(), 1.0, 1e-5);
      // Binary up to the normalisation: one non-zero value.
      torch::Tensor values = hard[k].masked_select(kept);
      EXPECT_NEAR(values.max().item<double>(), values.min().item<double>(),
                  1e-6);
    }
  }
}

TEST(DamTrainerTest, HardMaskMarginDropsOnlyLogitsPushedPastIt) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.hard_mask_margin = 0.1;
  std::unique_ptr<DamTrainer> trainer;
  ASSERT_NO_FATAL_FAILURE(TrainSixSteps(run, options, &trainer));
  std::vector<torch::Tensor> s1 = trainer->SharedMaskLogits();
  std::vector<torch::Tensor> s2 = trainer->DetectionMaskLogits();
  auto hard = trainer->FinalMask(FinalMaskMode::kHard);
  auto hard_detection = trainer->FinalMask(FinalMaskMode::kHardDetection);
  int64_t kept_with_margin = 0, kept_at_zero = 0;
  for (size_t k = 0; k < s1.size(); ++k) {
    torch::Tensor kept = (s1[k] > -0.1).logical_and(s2[k] > -0.1);
    EXPECT_TRUE(torch::equal(hard[k] > 0, kept));
    EXPECT_TRUE(torch::equal(hard_detection[k] > 0, s2[k] > -0.1));
    kept_with_margin += kept.sum().item<int64_t>();
    kept_at_zero += (s1[k] > 0).logical_and(s2[k] > 0).sum().item<int64_t>();
  }
  // Six steps at learning rate 0.05 move logits by up to 0.15, so the margin
  // keeps entries that the spec's hard mask drops.
  EXPECT_GT(kept_with_margin, kept_at_zero);
}

TEST(DamTest, ReportsMaskLogitQuantiles) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.mask_learning_rate = 0.05;
  auto result = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(result.ok()) << result.status();
  const DamReport& report = result->report;
  const size_t levels = std::size(kMaskLogitQuantiles);
  ASSERT_EQ(report.m1_logit_quantiles.size(), levels);
  ASSERT_EQ(report.m2_logit_quantiles.size(), levels);
  EXPECT_TRUE(std::is_sorted(report.m1_logit_quantiles.begin(),
                             report.m1_logit_quantiles.end()));
  // Training moved s1 from 0 in both directions.
  EXPECT_LT(report.m1_logit_quantiles.front(), 0.0);
  EXPECT_GT(report.m1_logit_quantiles.back(), 0.0);
  // The median sits where the sparsity says: M1's sparsity is the share of
  // negative logits.
  const bool median_negative = report.m1_logit_quantiles[3] < 0;
  const bool mostly_sparse = report.m1_sparsity > 0.5;
  EXPECT_EQ(median_negative, mostly_sparse);
  nlohmann::json json = nlohmann::json::parse(DamReportToJson(report, options));
  EXPECT_EQ(json["m2_logit_quantiles"].size(), levels);
  EXPECT_EQ(json["logit_quantile_levels"][3].get<double>(), 0.5);
}

TEST(DamTest, SeedMakesCpuRunsDeterministic) {
  auto run_once = [](uint64_t seed) {
    TinyWorld run;
    DamOptions options = FastOptions();
    options.seed = seed;
    options.final_mask = FinalMaskMode::kSample;
    auto result = RunDam(*run.model, run.set, run.calibration, options);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? std::move(*result) : DamResult();
  };
  DamResult a = run_once(7), b = run_once(7), c = run_once(8);
  ASSERT_FALSE(a.backbone.empty());
  for (size_t k = 0; k < a.backbone.size(); ++k) {
    EXPECT_TRUE(torch::equal(a.backbone[k], b.backbone[k]));
  }
  EXPECT_TRUE(torch::equal(a.report.lambdas, b.report.lambdas));
  EXPECT_EQ(a.report.mask_loss, b.report.mask_loss);
  EXPECT_FALSE(torch::equal(a.backbone[1], c.backbone[1]));
}

TEST(DamTest, CancellationIsHonouredInBothPhases) {
  for (int cancel_after : {2, 6 + 2}) {
    TinyWorld run;
    DamOptions options = FastOptions();
    int polls = 0;
    options.is_cancelled = [&polls, cancel_after] {
      return ++polls > cancel_after;
    };
    int64_t last_step = 0;
    std::string last_phase;
    options.on_progress = [&](const TrainingProgress& progress) {
      last_step = progress.step;
      last_phase = progress.phase;
    };
    auto result = RunDam(*run.model, run.set, run.calibration, options);
    EXPECT_EQ(result.status().code(), absl::StatusCode::kCancelled);
    if (cancel_after == 2) {
      EXPECT_EQ(last_phase, "dam_meta");
      EXPECT_EQ(last_step, 2);
    } else {
      EXPECT_EQ(last_phase, "dam_adamerging");
      EXPECT_EQ(last_step, 2);
    }
  }
}

TEST(DamTest, ReportCoversMasksLambdasCurvesAndTriggers) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.mask_learning_rate = 0.05;
  options.granularity = LambdaGranularity::kLayerWise;
  std::vector<std::string> phases;
  options.on_progress = [&phases](const TrainingProgress& progress) {
    if (phases.empty() || phases.back() != progress.phase) {
      phases.push_back(progress.phase);
    }
    EXPECT_GE(progress.elapsed_seconds, 0.0);
  };
  auto result = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_THAT(phases, ElementsAre("dam_meta", "dam_adamerging"));
  const DamReport& report = result->report;
  EXPECT_EQ(report.outer_steps, 6);
  EXPECT_EQ(report.inner_loss.size(), 6u);
  EXPECT_EQ(report.mask_loss.size(), 6u);
  EXPECT_EQ(report.adamerging_loss.size(), 5u);
  EXPECT_THAT(report.lambdas.sizes(), ElementsAre(3, 4));
  ASSERT_EQ(report.tensors.size(), 4u);
  int64_t elements = 0;
  for (const MaskTensorStats& stats : report.tensors) {
    elements += stats.elements;
    EXPECT_GE(stats.m2_sparsity, 0.0);
    EXPECT_LE(stats.m2_sparsity, 1.0);
  }
  EXPECT_EQ(elements, run.set.NumElements());
  // Masks moved, in both directions.
  EXPECT_GT(report.m1_sparsity, 0.0);
  EXPECT_LT(report.m1_sparsity, 1.0);
  EXPECT_GT(report.m2_flagged_fraction, 0.0);
  EXPECT_DOUBLE_EQ(report.m2_flagged_fraction, report.m2_sparsity);
  EXPECT_GT(report.seconds_per_outer_step, 0.0);

  auto json = nlohmann::json::parse(DamReportToJson(report, options));
  EXPECT_EQ(json["method"], "dam");
  EXPECT_EQ(json["tensors"].size(), 4u);
  EXPECT_EQ(json["lambdas"].size(), 3u);
  EXPECT_EQ(json["lambdas"][0].size(), 4u);
  EXPECT_EQ(json["loss_curves"]["mask"].size(), 6u);
  EXPECT_EQ(json["triggers"].size(), 3u);
  EXPECT_EQ(json["options"]["final_mask"], "expected");
  EXPECT_EQ(json["options"]["steps"], 6);
}

TEST(DamTest, OutputIsTheMaskedMergeTheModelHolds) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.final_mask = FinalMaskMode::kHard;
  options.mask_learning_rate = 0.05;
  auto result = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const auto& [name, tensor] : run.model->Backbone()) {
    const size_t k = std::find(run.set.keys.begin(), run.set.keys.end(), name) -
                     run.set.keys.begin();
    ASSERT_LT(k, run.set.keys.size()) << name;
    EXPECT_TRUE(torch::allclose(tensor, result->backbone[k])) << name;
  }
  // Entries the hard mask drops keep theta0.
  EXPECT_GT(result->report.final_mask_zeros, 0.0);
}

Trigger WhitePatch(int64_t row, int64_t col) {
  Trigger trigger;
  trigger.kind = TriggerKind::kPatch;
  trigger.pattern = torch::ones({1, 4, 4});
  trigger.row = row;
  trigger.col = col;
  return trigger;
}

TEST(DamTest, KnownTriggerReplacesSynthesisAndIsNeverUpdated) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.trigger_learning_rate = 0.02;
  options.mask_learning_rate = 0.05;
  options.backdoor_loss = BackdoorLoss::kAnchored;
  options.beta = 1.0;
  auto without = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(without.ok()) << without.status();

  options.known_triggers["task1"] = WhitePatch(3, 3);
  auto known = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(known.ok()) << known.status();
  const DamReport& report = known->report;
  ASSERT_EQ(report.triggers.size(), 3u);
  // task1's trigger is the 4x4 white patch, unchanged by six steps.
  EXPECT_DOUBLE_EQ(report.triggers[1].mask_l1, 16.0);
  EXPECT_DOUBLE_EQ(report.triggers[1].linf, 1.0);
  EXPECT_DOUBLE_EQ(report.triggers[1].l2, 4.0);
  // The others are still synthesized.
  EXPECT_GT(report.triggers[0].linf, 0.0);
  // It enters M2's loss: the even (M2) steps differ from the run without.
  EXPECT_NE(report.mask_loss[1], without->report.mask_loss[1]);
  auto json = nlohmann::json::parse(DamReportToJson(report, options));
  EXPECT_EQ(json["options"]["known_triggers"][0]["task"], "task1");

  // Every trigger known: nothing to synthesize, and the run still works.
  for (const std::string& name : run.set.task_names) {
    options.known_triggers[name] = WhitePatch(0, 0);
  }
  EXPECT_TRUE(RunDam(*run.model, run.set, run.calibration, options).ok());

  // A name outside the set, or a patch off the image: INVALID_ARGUMENT.
  options.known_triggers = {{"zzz", WhitePatch(0, 0)}};
  auto status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("zzz"));
  options.known_triggers = {{"task0", WhitePatch(26, 0)}};
  EXPECT_EQ(
      RunDam(*run.model, run.set, run.calibration, options).status().code(),
      absl::StatusCode::kInvalidArgument);
}

// FastOptions with triggers from a short scan.
DamOptions ScanOptions() {
  DamOptions options = FastOptions();
  options.trigger_source = DamTriggerSource::kScan;
  options.scan_steps = 4;
  return options;
}

TEST(DamTest, ScannedTriggersComeFromTheScanAndStayFixed) {
  TinyWorld run;
  DamOptions options = ScanOptions();
  options.known_triggers["task1"] = WhitePatch(3, 3);
  auto result = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(result.ok()) << result.status();
  const DamReport& report = result->report;
  // task1's trigger is given, so only the other two are scanned.
  ASSERT_EQ(report.scanned_triggers.size(), 2u);
  EXPECT_EQ(report.scanned_triggers[0].task, "task0");
  EXPECT_EQ(report.scanned_triggers[1].task, "task2");
  EXPECT_GT(report.scan_seconds, 0.0);
  ASSERT_EQ(report.triggers.size(), 3u);
  EXPECT_DOUBLE_EQ(report.triggers[1].mask_l1, 16.0);
  // L2 used the scanned mask, unchanged by the outer steps.
  EXPECT_NEAR(report.triggers[0].mask_l1, report.scanned_triggers[0].mask_l1,
              1e-3);
  EXPECT_NEAR(report.triggers[2].mask_l1, report.scanned_triggers[1].mask_l1,
              1e-3);
  for (const DamScannedTrigger& scanned : report.scanned_triggers) {
    EXPECT_GE(scanned.target_class, 0);
    EXPECT_LT(scanned.target_class, run.set.heads[0].NumClasses());
    EXPECT_GE(scanned.reach, 0.0);
    EXPECT_LE(scanned.reach, 1.0);
  }
  // The same seed gives the same scan.
  auto again = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->report.scanned_triggers[0].mask_l1,
            report.scanned_triggers[0].mask_l1);
  auto json = nlohmann::json::parse(DamReportToJson(report, options));
  EXPECT_EQ(json["options"]["trigger_source"], "scan");
  EXPECT_EQ(json["scanned_triggers"].size(), 2u);

  // Synthesized (the default) scans nothing and says nothing about it.
  options.trigger_source = DamTriggerSource::kSynthesized;
  auto synthesized = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(synthesized.ok()) << synthesized.status();
  EXPECT_TRUE(synthesized->report.scanned_triggers.empty());
  json = nlohmann::json::parse(DamReportToJson(synthesized->report, options));
  EXPECT_FALSE(json["options"].contains("trigger_source"));

  options.trigger_source = DamTriggerSource::kScan;
  options.scan_steps = 0;
  auto status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("scan_steps"));
  EXPECT_EQ(*ParseDamTriggerSource("scan"), DamTriggerSource::kScan);
  EXPECT_EQ(ParseDamTriggerSource("oracle").status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DamTest, ScanOwnModelScansEachTaskVectorAlone) {
  TinyWorld run;
  DamOptions options = ScanOptions();
  auto merged = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(merged.ok()) << merged.status();
  options.scan_own_model = true;
  auto own = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(own.ok()) << own.status();
  ASSERT_EQ(own->report.scanned_triggers.size(), 3u);
  for (size_t t = 0; t < 3; ++t) {
    // Another model was scanned, so other masks came out; L2 used them.
    EXPECT_NE(own->report.scanned_triggers[t].mask_l1,
              merged->report.scanned_triggers[t].mask_l1);
    EXPECT_NEAR(own->report.triggers[t].mask_l1,
                own->report.scanned_triggers[t].mask_l1, 1e-3);
  }
  auto json = nlohmann::json::parse(DamReportToJson(own->report, options));
  EXPECT_EQ(json["options"]["scan_own_model"], true);

  // Refined against the merge: the same classes, other masks, and L2 uses
  // the refined ones.
  options.scan_merge_refine_steps = 5;
  auto refined = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(refined.ok()) << refined.status();
  ASSERT_EQ(refined->report.scanned_triggers.size(), 3u);
  for (size_t t = 0; t < 3; ++t) {
    EXPECT_EQ(refined->report.scanned_triggers[t].target_class,
              own->report.scanned_triggers[t].target_class);
    EXPECT_NE(refined->report.scanned_triggers[t].mask_l1,
              own->report.scanned_triggers[t].mask_l1);
    EXPECT_NEAR(refined->report.triggers[t].mask_l1,
                refined->report.scanned_triggers[t].mask_l1, 1e-3);
  }
  json = nlohmann::json::parse(DamReportToJson(refined->report, options));
  EXPECT_EQ(json["options"]["scan_merge_refine_steps"], 5);
  options.scan_merge_refine_steps = -1;
  auto status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("scan_merge_refine_steps"));
}

// The differential scan is LFPM's, run on what DAM builds: each task's own
// model (base + its task vector), the base (all lambdas 0) and the TA merge
// at initial_lambda for the heads. Scanning those directly gives the same
// classes and ratios.
TEST(DamTest, ScanDifferentialTargetsTheClassThatShrankFromTheBase) {
  TinyWorld run;
  DamOptions options = ScanOptions();
  options.scan_own_model = true;
  options.scan_differential = true;
  auto dam = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(dam.ok()) << dam.status();
  const auto& scanned = dam->report.scanned_triggers;
  ASSERT_EQ(scanned.size(), 3u);

  NamedTensors base;
  std::vector<torch::Tensor> merged_backbone;
  for (int k = 0; k < run.set.num_tensors(); ++k) {
    base.emplace_back(run.set.keys[k], run.set.base[k]);
    torch::Tensor merged = run.set.base[k].clone();
    for (int t = 0; t < 3; ++t) {
      merged += options.initial_lambda * run.set.task_vectors[t][k];
    }
    merged_backbone.push_back(merged);
  }
  std::vector<LfpmTask> tasks;
  for (int t = 0; t < 3; ++t) {
    LfpmTask task;
    task.name = run.set.task_names[t];
    task.inputs = run.calibration[t];
    for (int k = 0; k < run.set.num_tensors(); ++k) {
      task.own_model.emplace_back(run.set.keys[k],
                                  run.set.base[k] + run.set.task_vectors[t][k]);
    }
    task.base_model = base;
    tasks.push_back(std::move(task));
  }
  LfpmOptions scan;
  scan.triggers.scan_steps = options.scan_steps;
  scan.triggers.scan_own_model = true;
  scan.triggers.differential_gate = true;
  scan.seed = options.seed;
  auto expected = ScanLfpmTasks(
      *run.model, MergedModelTensors(run.set, merged_backbone), tasks, scan);
  ASSERT_TRUE(expected.ok()) << expected.status();
  for (size_t t = 0; t < 3; ++t) {
    const LfpmAnomaly& anomaly = (*expected)[t].anomaly;
    ASSERT_EQ(anomaly.base_class_norms.size(), anomaly.class_norms.size());
    const int64_t c = (*expected)[t].easiest_class;
    EXPECT_EQ(scanned[t].target_class, c) << scanned[t].task;
    EXPECT_GT(scanned[t].differential_ratio, 0.0);
    EXPECT_NEAR(scanned[t].differential_ratio,
                anomaly.class_norms[c] / anomaly.base_class_norms[c], 1e-3);
  }
  auto json = nlohmann::json::parse(DamReportToJson(dam->report, options));
  EXPECT_EQ(json["options"]["scan_differential"], true);
  EXPECT_GT(json["scanned_triggers"][0]["differential_ratio"], 0.0);

  // It needs the own models.
  options.scan_own_model = false;
  auto status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("scan_differential"));
}

TEST(DamTest, RejectsBadOptions) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.temperature = 0;
  EXPECT_EQ(
      RunDam(*run.model, run.set, run.calibration, options).status().code(),
      absl::StatusCode::kInvalidArgument);
  options = FastOptions();
  options.trigger_epsilon = -1;
  auto status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("trigger_epsilon"));
  options = FastOptions();
  options.hard_mask_margin = -0.5;
  status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("hard_mask_margin"));
  EXPECT_EQ(ParseMaskOptimizer("lbfgs").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseFinalMaskMode("soft").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseBackdoorLoss("consistency"), BackdoorLoss::kConsistency);
}

TEST(TiesTrimTest, KeepsEachTasksLargestEntriesThatAgreeWithTheElectedSign) {
  torch::manual_seed(3);
  TaskVectorSet set;
  set.keys = {"a", "b"};
  set.base = {torch::zeros({4, 5}), torch::zeros({7})};
  set.task_names = {"x", "y", "z"};
  for (int t = 0; t < 3; ++t) {
    set.task_vectors.push_back({torch::randn({4, 5}), torch::randn({7})});
  }
  auto trimmed = TiesTrimmedTaskVectors(set, 30.0);
  ASSERT_TRUE(trimmed.ok()) << trimmed.status();
  // By hand: 27 entries, keep round(8.1) = 8 per task, then elect.
  const int64_t n = 27, keep = 8;
  std::vector<torch::Tensor> kept(3);
  for (int t = 0; t < 3; ++t) {
    torch::Tensor flat = torch::cat({set.task_vectors[t][0].flatten(),
                                     set.task_vectors[t][1].flatten()});
    std::vector<float> magnitudes(n);
    for (int64_t i = 0; i < n; ++i) magnitudes[i] = std::abs(flat[i].item<float>());
    std::sort(magnitudes.begin(), magnitudes.end(), std::greater<float>());
    kept[t] = flat * flat.abs().ge(magnitudes[keep - 1]);
    EXPECT_EQ(kept[t].ne(0).sum().item<int64_t>(), keep);
  }
  torch::Tensor sum = kept[0] + kept[1] + kept[2];
  for (int t = 0; t < 3; ++t) {
    SCOPED_TRACE(t);
    torch::Tensor expected = kept[t] * (kept[t] * sum).gt(0);
    torch::Tensor got = torch::cat({trimmed->task_vectors[t][0].flatten(),
                                    trimmed->task_vectors[t][1].flatten()});
    EXPECT_TRUE(torch::equal(got, expected));
    // The input set is left as it was.
    EXPECT_GT(set.task_vectors[t][0].ne(0).sum().item<int64_t>(), keep);
  }
  EXPECT_TRUE(TiesTrimmedTaskVectors(set, 100.0)->task_vectors[0][1].ne(0)
                  .any().item<bool>());
  EXPECT_EQ(TiesTrimmedTaskVectors(set, 0.0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TiesTrimmedTaskVectors(set, 101.0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DamTest, TiesPretrimMergesOnlyWhatTiesKeeps) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.ties_pretrim_percent = 10.0;
  auto result = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(result.ok()) << result.status();
  auto trimmed = TiesTrimmedTaskVectors(run.set, 10.0);
  ASSERT_TRUE(trimmed.ok());
  int64_t untouched = 0, moved = 0;
  for (int k = 0; k < run.set.num_tensors(); ++k) {
    torch::Tensor any_kept = torch::zeros_like(run.set.base[k], torch::kBool);
    for (int t = 0; t < run.set.num_tasks(); ++t) {
      any_kept |= trimmed->task_vectors[t][k].ne(0);
    }
    torch::Tensor changed = result->backbone[k].ne(run.set.base[k]);
    // Where TIES keeps nothing the output is θ0.
    EXPECT_FALSE((changed & ~any_kept).any().item<bool>()) << run.set.keys[k];
    untouched += (~any_kept).sum().item<int64_t>();
    moved += changed.sum().item<int64_t>();
  }
  EXPECT_GT(untouched, run.set.NumElements() / 2);
  EXPECT_GT(moved, 0);
  auto json = nlohmann::json::parse(DamReportToJson(result->report, options));
  EXPECT_EQ(json["options"]["ties_pretrim_percent"], 10.0);
  options.ties_pretrim_percent = 150.0;
  auto status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("ties_pretrim_percent"));
}

TEST(DamTest, TiesPretrimSelectKeepsTheMergeTheScannedTriggersReachLess) {
  TinyWorld run;
  DamOptions options = ScanOptions();
  options.ties_pretrim_percent = 10.0;
  options.ties_pretrim_select = true;
  options.pretrim_select_control_classes = 2;
  auto selected = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(selected.ok()) << selected.status();
  const DamPretrimSelection& selection = selected->report.pretrim_selection;
  ASSERT_TRUE(selection.ran);
  EXPECT_THAT(selection.tasks, ElementsAre("task0", "task1", "task2"));
  ASSERT_EQ(selection.reach_without.size(), 3u);
  ASSERT_EQ(selection.reach_with.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_GE(selection.reach_without[i], 0.0);
    EXPECT_LE(selection.reach_without[i], 1.0);
    EXPECT_GE(selection.reach_with[i], 0.0);
    EXPECT_LE(selection.reach_with[i], 1.0);
  }
  EXPECT_NEAR(selection.mean_reach_without,
              (selection.reach_without[0] + selection.reach_without[1] +
               selection.reach_without[2]) / 3.0,
              1e-12);
  // Two control classes per task, evenly spaced after the target among
  // the other classes; the score is the target's reach less theirs.
  const int64_t num_classes = run.set.heads[0].NumClasses();
  ASSERT_EQ(selection.control_classes.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    const int64_t target =
        selected->report.scanned_triggers[i].target_class;
    EXPECT_THAT(selection.control_classes[i],
                ElementsAre((target + 1) % num_classes,
                            (target + 1 + (num_classes - 1) / 2) %
                                num_classes));
  }
  ASSERT_EQ(selection.control_reach_without.size(), 3u);
  ASSERT_EQ(selection.control_reach_with.size(), 3u);
  double control_without = 0.0;
  double control_with = 0.0;
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_GE(selection.control_reach_without[i], 0.0);
    EXPECT_LE(selection.control_reach_without[i], 1.0);
    EXPECT_GE(selection.control_reach_with[i], 0.0);
    EXPECT_LE(selection.control_reach_with[i], 1.0);
    control_without += selection.control_reach_without[i] / 3.0;
    control_with += selection.control_reach_with[i] / 3.0;
  }
  EXPECT_NEAR(selection.score_without,
              selection.mean_reach_without - control_without, 1e-12);
  EXPECT_NEAR(selection.score_with, selection.mean_reach_with - control_with,
              1e-12);
  EXPECT_EQ(selection.kept_pretrim,
            selection.score_with < selection.score_without);

  // Each candidate is the run of its own setting alone (CPU runs are
  // deterministic), and the kept one is what the model holds.
  DamOptions alone = options;
  alone.ties_pretrim_select = false;
  alone.pretrim_select_control_classes = 0;
  auto with = RunDam(*run.model, run.set, run.calibration, alone);
  ASSERT_TRUE(with.ok()) << with.status();
  alone.ties_pretrim_percent = 0.0;
  auto without = RunDam(*run.model, run.set, run.calibration, alone);
  ASSERT_TRUE(without.ok()) << without.status();
  const DamResult& kept = selection.kept_pretrim ? *with : *without;
  const DamResult& dropped = selection.kept_pretrim ? *without : *with;
  bool differs = false;
  for (int k = 0; k < run.set.num_tensors(); ++k) {
    EXPECT_TRUE(torch::equal(selected->backbone[k], kept.backbone[k]))
        << run.set.keys[k];
    differs |= !torch::equal(selected->backbone[k], dropped.backbone[k]);
  }
  EXPECT_TRUE(differs);

  // Without control classes the targets' probes are the same and the score
  // is their mean reach; the model holds what that choice kept.
  DamOptions targets_only = options;
  targets_only.pretrim_select_control_classes = 0;
  auto rerun = RunDam(*run.model, run.set, run.calibration, targets_only);
  ASSERT_TRUE(rerun.ok()) << rerun.status();
  const DamPretrimSelection& plain = rerun->report.pretrim_selection;
  EXPECT_EQ(plain.reach_without, selection.reach_without);
  EXPECT_EQ(plain.reach_with, selection.reach_with);
  EXPECT_TRUE(plain.control_classes.empty());
  EXPECT_TRUE(plain.control_reach_with.empty());
  EXPECT_DOUBLE_EQ(plain.score_with, plain.mean_reach_with);
  EXPECT_EQ(plain.kept_pretrim,
            plain.mean_reach_with < plain.mean_reach_without);
  const DamResult& plain_kept = plain.kept_pretrim ? *with : *without;
  for (const auto& [name, tensor] : run.model->Backbone()) {
    const size_t k = std::find(run.set.keys.begin(), run.set.keys.end(), name) -
                     run.set.keys.begin();
    ASSERT_LT(k, run.set.keys.size()) << name;
    EXPECT_TRUE(torch::equal(tensor, plain_kept.backbone[k])) << name;
  }
  EXPECT_GT(selection.probe_seconds, 0.0);
  auto json = nlohmann::json::parse(DamReportToJson(selected->report, options));
  EXPECT_EQ(json["options"]["ties_pretrim_select"], true);
  EXPECT_EQ(json["pretrim_selection"]["kept_pretrim"], selection.kept_pretrim);
  EXPECT_EQ(json["pretrim_selection"]["reach_with"].size(), 3u);
  EXPECT_EQ(json["options"]["pretrim_select_control_classes"], 2);
  EXPECT_EQ(json["pretrim_selection"]["control_classes"].size(), 3u);
  EXPECT_EQ(json["pretrim_selection"]["score_with"], selection.score_with);
  json = nlohmann::json::parse(DamReportToJson(without->report, alone));
  EXPECT_FALSE(json.contains("pretrim_selection"));

  // Control classes need the selection; the selection needs the pretrim
  // and scanned triggers.
  targets_only.ties_pretrim_select = false;
  targets_only.pretrim_select_control_classes = 1;
  auto status = RunDam(*run.model, run.set, run.calibration, targets_only)
                    .status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("pretrim_select_control_classes"));
  options.ties_pretrim_percent = 0.0;
  status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("ties_pretrim_select"));
  options.ties_pretrim_percent = 10.0;
  options.trigger_source = DamTriggerSource::kSynthesized;
  EXPECT_EQ(RunDam(*run.model, run.set, run.calibration, options)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// pretrim_select_max_ratio scores only the tasks the differential scan
// flags (ratio at most the bound), by the worst of them; with none flagged
// the score is the mean rule's.
TEST(DamTest, PretrimSelectMaxRatioScoresTheWorstFlaggedTask) {
  TinyWorld run;
  DamOptions options = ScanOptions();
  options.scan_own_model = true;
  options.scan_differential = true;
  options.ties_pretrim_percent = 10.0;
  options.ties_pretrim_select = true;
  options.pretrim_select_control_classes = 1;
  // The scan is the same with or without the pretrim choice, so a plain
  // run gives the ratios the bound is set from.
  DamOptions scan_only = options;
  scan_only.ties_pretrim_select = false;
  scan_only.pretrim_select_control_classes = 0;
  scan_only.ties_pretrim_percent = 0.0;
  auto plain = RunDam(*run.model, run.set, run.calibration, scan_only);
  ASSERT_TRUE(plain.ok()) << plain.status();
  std::vector<double> ratios;
  for (const auto& scanned : plain->report.scanned_triggers) {
    ratios.push_back(scanned.differential_ratio);
  }
  ASSERT_EQ(ratios.size(), 3u);
  std::vector<double> sorted = ratios;
  std::sort(sorted.begin(), sorted.end());
  ASSERT_LT(sorted[0], sorted[1]);
  ASSERT_LT(sorted[1], sorted[2]);

  // The middle ratio as the bound flags two tasks of three.
  options.pretrim_select_max_ratio = sorted[1];
  auto selected = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(selected.ok()) << selected.status();
  const DamPretrimSelection& selection = selected->report.pretrim_selection;
  ASSERT_EQ(selection.flagged.size(), 3u);
  ASSERT_EQ(selection.control_reach_with.size(), 3u);
  // The report keeps the ratios the flags were read from.
  EXPECT_EQ(selection.flag_ratios, ratios);
  EXPECT_EQ(selection.score_rule, "max_flagged");
  double worst_without = -1.0;
  double worst_with = -1.0;
  int flagged = 0;
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(selection.flagged[i], ratios[i] <= sorted[1]) << i;
    if (!selection.flagged[i]) continue;
    ++flagged;
    worst_without =
        std::max(worst_without, selection.reach_without[i] -
                                    selection.control_reach_without[i]);
    worst_with = std::max(worst_with, selection.reach_with[i] -
                                          selection.control_reach_with[i]);
  }
  EXPECT_EQ(flagged, 2);
  EXPECT_DOUBLE_EQ(selection.score_without, worst_without);
  EXPECT_DOUBLE_EQ(selection.score_with, worst_with);
  EXPECT_EQ(selection.kept_pretrim,
            selection.score_with < selection.score_without);
  auto json = nlohmann::json::parse(DamReportToJson(selected->report, options));
  EXPECT_EQ(json["options"]["pretrim_select_max_ratio"], sorted[1]);
  EXPECT_EQ(json["pretrim_selection"]["score_rule"], "max_flagged");
  EXPECT_EQ(json["pretrim_selection"]["flagged"].size(), 3u);
  EXPECT_EQ(json["pretrim_selection"]["flag_ratios"].size(), 3u);

  // A bound under every ratio flags nothing: the mean rule decides, on the
  // same probes.
  options.pretrim_select_max_ratio = sorted[0] / 2;
  auto unflagged = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(unflagged.ok()) << unflagged.status();
  const DamPretrimSelection& mean = unflagged->report.pretrim_selection;
  EXPECT_EQ(mean.reach_without, selection.reach_without);
  EXPECT_EQ(mean.reach_with, selection.reach_with);
  EXPECT_THAT(mean.flagged, ElementsAre(false, false, false));
  EXPECT_EQ(mean.score_rule, "mean");
  EXPECT_NEAR(mean.score_with,
              mean.mean_reach_with -
                  (mean.control_reach_with[0] + mean.control_reach_with[1] +
                   mean.control_reach_with[2]) / 3.0,
              1e-12);

  // The bound needs the choice and the differential scan.
  options.scan_differential = false;
  auto status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("pretrim_select_max_ratio"));
  options.scan_differential = true;
  options.pretrim_select_max_ratio = -0.5;
  status = RunDam(*run.model, run.set, run.calibration, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(status.message(), HasSubstr("pretrim_select_max_ratio"));
}

TEST(DamTest, ConsistencyVariantRuns) {
  TinyWorld run;
  DamOptions options = FastOptions();
  options.backdoor_loss = BackdoorLoss::kConsistency;
  auto result = RunDam(*run.model, run.set, run.calibration, options);
  ASSERT_TRUE(result.ok()) << result.status();
  for (double loss : result->report.mask_loss) EXPECT_TRUE(std::isfinite(loss));
}

TEST(DamTest, FilesJobWritesHeadsAndProvenance) {
  TempDir dir;
  DefenseTinyModule().save(dir.Path("arch.pt"));
  NamedTensors base = DefenseTinyBase();
  ASSERT_TRUE(SaveTensors(dir.Path("base.safetensors"), base).ok());
  TaskVectorSet set = DefenseTinySet(2);
  std::vector<torch::Tensor> calibration = DefenseTinyCalibration(2);
  std::vector<DataDependentTask> tasks;
  for (int t = 0; t < 2; ++t) {
    NamedTensors tensors;
    for (int k = 0; k < set.num_tensors(); ++k) {
      tensors.emplace_back(set.keys[k], set.base[k] + set.task_vectors[t][k]);
    }
    tensors.emplace_back("head.weight", set.heads[t].weight);
    tensors.emplace_back("head.bias", set.heads[t].bias);
    const std::string name = set.task_names[t];
    ASSERT_TRUE(SaveTensors(dir.Path(name + ".safetensors"), tensors).ok());
    ASSERT_TRUE(SaveTensors(dir.Path(name + "_cal.safetensors"),
                            {{"inputs", calibration[t]},
                             {"labels", torch::zeros({24}, torch::kLong)}})
                    .ok());
    tasks.push_back({{name, dir.Path(name + ".safetensors"), ""},
                     dir.Path(name + "_cal.safetensors")});
  }
  DamOptions options = FastOptions();
  options.metadata["mergeguard.job"] = "j1";
  auto result = DamMergeFiles(dir.Path("arch.pt"), dir.Path("base.safetensors"),
                              tasks, dir.Path("out.safetensors"), options);
  ASSERT_TRUE(result.ok()) << result.status();
  auto checkpoint = Checkpoint::Open(dir.Path("out.safetensors"));
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_NE((*checkpoint)->Find("task1/head.bias"), nullptr);
  const auto& metadata = (*checkpoint)->Metadata();
  EXPECT_EQ(metadata.at("mergeguard.method"), "dam");
  EXPECT_EQ(metadata.at("mergeguard.job"), "j1");
  auto summary = nlohmann::json::parse(metadata.at("mergeguard.dam_summary"));
  EXPECT_EQ(summary["outer_steps"], 6);
  // The summary carries the report's mask totals, quantiles included.
  EXPECT_EQ(summary["m2_flagged_fraction"].get<double>(),
            result->report.m2_flagged_fraction);
  EXPECT_EQ(summary["m1_logit_quantiles"].size(),
            std::size(kMaskLogitQuantiles));
  auto options_json = nlohmann::json::parse(metadata.at("mergeguard.options"));
  EXPECT_EQ(options_json["trigger_epsilon"], 0.1);

  // A task whose calibration file is missing fails before any work.
  tasks[1].calibration_path = dir.Path("nope.safetensors");
  EXPECT_EQ(DamMergeFiles(dir.Path("arch.pt"), dir.Path("base.safetensors"),
                          tasks, dir.Path("out2.safetensors"), options)
                .status()
                .code(),
            absl::StatusCode::kNotFound);
  EXPECT_FALSE(Checkpoint::Open(dir.Path("out2.safetensors")).ok());
}

}  // namespace
}  // namespace mergeguard
