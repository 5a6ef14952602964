#include "bench/training.h"

#include <torch/torch.h>

#include <vector>

#include "bench/model_zoo.h"
#include "gtest/gtest.h"

namespace mergeguard::bench {
namespace {

// Gradients of `loss` with respect to `parameters`, computed independently.
std::vector<torch::Tensor> Gradients(const torch::Tensor& loss,
                                     const std::vector<torch::Tensor>& params) {
  std::vector<torch::Tensor> grads = torch::autograd::grad({loss}, params);
  for (torch::Tensor& g : grads) g = g.detach().clone();
  return grads;
}

// Checks WeightInterpolatedBadMergingStep's gradient, with a clean term at
// the interpolated weights of weight `clean_weight` (0 = none).
void CheckWeightInterpolationGradient(double clean_weight) {
  torch::manual_seed(0);
  auto model = BuildArchitecture(Architecture::kCnn, 1);
  auto base = BuildArchitecture(Architecture::kCnn, 2);
  ASSERT_TRUE(model.ok() && base.ok());
  Head head{torch::randn({10, 128}) * 0.1, torch::zeros({10})};
  const torch::Tensor inputs = torch::rand({6, 1, 28, 28});
  const torch::Tensor labels = torch::randint(0, 10, {6}, torch::kInt64);
  BadMergingObjective attack;
  attack.trigger.pattern = torch::ones({1, 4, 4});
  attack.trigger.row = 24;
  attack.trigger.col = 24;
  attack.target = 3;
  attack.weight = 5.0;
  attack.r_min = attack.r_max = 0.4;  // a fixed r, so the check is exact
  attack.clean_weight = clean_weight;
  attack.base = base->get();

  std::vector<torch::Tensor> theta = (*model)->ParameterTensors();
  std::vector<torch::Tensor> theta0 = (*base)->ParameterTensors();
  std::vector<torch::Tensor> before;
  for (const torch::Tensor& p : theta) before.push_back(p.detach().clone());

  // Expected: the clean gradient at θ plus 0.4·(w·backdoor gradient +
  // c·clean gradient) at θ0 + 0.4·(θ−θ0), the latter from a separate copy
  // of the model.
  for (torch::Tensor& p : theta) p.set_requires_grad(true);
  auto features = (*model)->Features(inputs);
  ASSERT_TRUE(features.ok());
  std::vector<torch::Tensor> expected = Gradients(
      torch::nn::functional::cross_entropy(head.Logits(*features), labels),
      theta);
  auto scaled = (*model)->Clone();
  ASSERT_TRUE(scaled.ok());
  std::vector<torch::Tensor> scaled_params = (*scaled)->ParameterTensors();
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < scaled_params.size(); ++i) {
      scaled_params[i].copy_(theta0[i] + 0.4 * (before[i] - theta0[i]));
    }
  }
  for (torch::Tensor& p : scaled_params) p.set_requires_grad(true);
  auto triggered = ApplyTrigger(attack.trigger, inputs);
  ASSERT_TRUE(triggered.ok());
  auto triggered_features = (*scaled)->Features(*triggered);
  ASSERT_TRUE(triggered_features.ok());
  auto scaled_clean_features = (*scaled)->Features(inputs);
  ASSERT_TRUE(scaled_clean_features.ok());
  std::vector<torch::Tensor> interpolated = Gradients(
      5.0 * torch::nn::functional::cross_entropy(
                head.Logits(*triggered_features), torch::full_like(labels, 3)) +
          clean_weight * torch::nn::functional::cross_entropy(
                             head.Logits(*scaled_clean_features), labels),
      scaled_params);
  for (size_t i = 0; i < expected.size(); ++i) {
    expected[i] += 0.4 * interpolated[i];
  }

  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(1);
  auto loss = WeightInterpolatedBadMergingStep(**model, head, theta, attack,
                                               inputs, labels, generator);
  ASSERT_TRUE(loss.ok()) << loss.status();
  EXPECT_TRUE(std::isfinite(loss->item<double>()));
  for (size_t i = 0; i < theta.size(); ++i) {
    EXPECT_TRUE(torch::equal(theta[i].detach(), before[i]))
        << "weights not restored, tensor " << i;
    ASSERT_TRUE(theta[i].grad().defined());
    EXPECT_TRUE(torch::allclose(theta[i].grad(), expected[i], 1e-4, 1e-6))
        << "tensor " << i << " max diff "
        << (theta[i].grad() - expected[i]).abs().max().item<double>();
  }
}

TEST(BadMergingTest,
     WeightInterpolationGradientIsRTimesGradientAtScaledWeights) {
  CheckWeightInterpolationGradient(0.0);
}

TEST(BadMergingTest, CleanTermAtInterpolatedWeightsJoinsTheGradient) {
  CheckWeightInterpolationGradient(0.7);
}

TEST(BadMergingTest, ProjectionBoundsTheTaskVectorAndKeepsItsDirection) {
  auto model = BuildArchitecture(Architecture::kCnn, 1);
  auto base = BuildArchitecture(Architecture::kCnn, 2);
  ASSERT_TRUE(model.ok() && base.ok());
  std::vector<torch::Tensor> theta = (*model)->ParameterTensors();
  std::vector<torch::Tensor> theta0 = (*base)->ParameterTensors();
  auto task_vector = [&] {
    std::vector<torch::Tensor> tau;
    for (size_t i = 0; i < theta.size(); ++i) {
      tau.push_back((theta[i] - theta0[i]).flatten());
    }
    return torch::cat(tau);
  };
  const torch::Tensor before = task_vector();
  const double norm = before.norm().item<double>();
  ASSERT_GT(norm, 1.0);

  ProjectTaskVector(**model, **base, 2.0 * norm);  // inside: unchanged
  EXPECT_TRUE(torch::equal(task_vector(), before));

  ProjectTaskVector(**model, **base, 0.5 * norm);
  const torch::Tensor after = task_vector();
  EXPECT_NEAR(after.norm().item<double>(), 0.5 * norm, 1e-3 * norm);
  EXPECT_TRUE(torch::allclose(after, 0.5 * before, 1e-4, 1e-6));
}

// The adaptive check (bench/lfpm_rows.cc) relies on OptimizeUniversalPatch
// actually moving a patch toward the target on a given model.
TEST(UniversalPatchTest, OptimizationRaisesTheTargetRate) {
  torch::manual_seed(4);
  auto model = BuildArchitecture(Architecture::kCnn, 3);
  ASSERT_TRUE(model.ok());
  Head head{torch::randn({10, 128}) * 0.3, torch::zeros({10})};
  ImageSet train{
      torch::randint(0, 256, {128, 28, 28}, torch::kInt64).to(torch::kUInt8),
      torch::randint(0, 10, {128}, torch::kInt64)};
  Trigger initial;
  initial.pattern = torch::full({1, 6, 6}, 0.5);
  initial.row = 20;
  initial.col = 20;
  const int64_t target = 7;
  auto target_rate = [&](const Trigger& trigger) {
    torch::NoGradGuard no_grad;
    auto triggered = ApplyTrigger(trigger, train.Inputs(torch::Tensor()));
    EXPECT_TRUE(triggered.ok());
    auto features = (*model)->Features(*triggered);
    EXPECT_TRUE(features.ok());
    return (head.Logits(*features).argmax(1) == target)
        .to(torch::kFloat64)
        .mean()
        .item<double>();
  };
  OptimizerOptions options{/*steps=*/60, /*batch_size=*/32,
                           /*learning_rate=*/0.05, /*weight_decay=*/0.0,
                           /*warmup_fraction=*/0.0};
  auto adapted = OptimizeUniversalPatch(**model, head, train, initial, target,
                                        options, /*seed=*/1);
  ASSERT_TRUE(adapted.ok()) << adapted.status();
  EXPECT_FALSE(torch::equal(adapted->pattern, initial.pattern));
  EXPECT_GE(adapted->pattern.min().item<double>(), 0.0);
  EXPECT_LE(adapted->pattern.max().item<double>(), 1.0);
  EXPECT_GT(target_rate(*adapted), target_rate(initial));
}

// The pretrained base is a function of the shard count, not of how many
// threads run the shards: builds on machines of any size agree.
TEST(PretrainTest, ShardsShapeTheBaseAndThreadsDoNot) {
  ImageSet corpus{
      torch::randint(0, 256, {64, 28, 28}, torch::kInt64).to(torch::kUInt8),
      torch::randint(0, 10, {64}, torch::kInt64)};
  OptimizerOptions options{/*steps=*/4, /*batch_size=*/16,
                           /*learning_rate=*/0.01, /*weight_decay=*/0.0,
                           /*warmup_fraction=*/0.0};
  auto pretrained = [&](int shards, int threads) {
    auto model = BuildArchitecture(Architecture::kCnn, 6);
    EXPECT_TRUE(model.ok());
    auto report =
        Pretrain(**model, corpus, 10, options, /*seed=*/2, shards, threads);
    EXPECT_TRUE(report.ok()) << report.status();
    return (*model)->Backbone();
  };
  const NamedTensors two_on_one = pretrained(2, 1);
  const NamedTensors two_on_two = pretrained(2, 2);
  const NamedTensors one_shard = pretrained(1, 1);
  ASSERT_EQ(two_on_one.size(), two_on_two.size());
  bool shards_differ = false;
  for (size_t i = 0; i < two_on_one.size(); ++i) {
    EXPECT_TRUE(torch::equal(two_on_one[i].second, two_on_two[i].second))
        << two_on_one[i].first;
    if (!torch::equal(two_on_one[i].second, one_shard[i].second)) {
      shards_differ = true;
    }
  }
  // Summing shard gradients rounds differently from one whole batch.
  EXPECT_TRUE(shards_differ);

  auto model = BuildArchitecture(Architecture::kCnn, 6);
  ASSERT_TRUE(model.ok());
  EXPECT_FALSE(Pretrain(**model, corpus, 10, options, 2, /*shards=*/0).ok());
  EXPECT_FALSE(Pretrain(**model, corpus, 10, options, 2, /*shards=*/17).ok());
}

TEST(BadMergingTest, ParsesInterpolationNames) {
  EXPECT_EQ(*ParseBadMergingInterpolation("weights"),
            BadMergingInterpolation::kWeights);
  EXPECT_EQ(
      BadMergingInterpolationName(*ParseBadMergingInterpolation("features")),
      "features");
  EXPECT_FALSE(ParseBadMergingInterpolation("logits").ok());
}

}  // namespace
}  // namespace mergeguard::bench
