#include "bench/training.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <deque>
#include <memory>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/thread_pool.h"
#include "core/torch_status.h"

namespace mergeguard::bench {
namespace {

// BatchSampler walks seeded permutations of [0, n), one epoch after another.
class BatchSampler {
 public:
  BatchSampler(int64_t n, int64_t batch_size, at::Generator generator)
      : n_(n), batch_size_(std::min(batch_size, n)), generator_(generator) {}

  torch::Tensor Next() {
    if (!order_.defined() || position_ + batch_size_ > n_) {
      order_ = torch::randperm(n_, generator_, torch::kInt64);
      position_ = 0;
    }
    torch::Tensor batch = order_.slice(0, position_, position_ + batch_size_);
    position_ += batch_size_;
    return batch;
  }

 private:
  int64_t n_;
  int64_t batch_size_;
  at::Generator generator_;
  torch::Tensor order_;
  int64_t position_ = 0;
};

// Schedule returns the learning rate of `step`: linear warm-up, then cosine.
double Schedule(const OptimizerOptions& options, int64_t step) {
  const double warmup = std::max(
      1.0,
      std::floor(options.warmup_fraction * static_cast<double>(options.steps)));
  if (step < warmup) {
    return options.learning_rate * (static_cast<double>(step) + 1.0) / warmup;
  }
  const double progress =
      (static_cast<double>(step) - warmup) /
      std::max(1.0, static_cast<double>(options.steps) - warmup);
  return options.learning_rate * 0.5 * (1.0 + std::cos(M_PI * progress));
}

void SetLearningRate(torch::optim::Adam& optimizer, double learning_rate) {
  for (auto& group : optimizer.param_groups()) {
    static_cast<torch::optim::AdamOptions&>(group.options()).lr(learning_rate);
  }
}

absl::Status CheckOptions(const OptimizerOptions& options,
                          const ImageSet& data) {
  if (options.steps <= 0 || options.batch_size <= 0) {
    return absl::InvalidArgumentError("steps and batch_size must be positive");
  }
  if (data.size() == 0) {
    return absl::InvalidArgumentError("no training data");
  }
  return absl::OkStatus();
}

// LossTracker keeps the losses of the last 10% of steps.
class LossTracker {
 public:
  explicit LossTracker(int64_t steps)
      : window_(std::max<int64_t>(1, steps / 10)) {}
  void Add(double loss) {
    losses_.push_back(loss);
    if (static_cast<int64_t>(losses_.size()) > window_) losses_.pop_front();
  }
  double Mean() const {
    double sum = 0;
    for (double loss : losses_) sum += loss;
    return losses_.empty() ? 0.0 : sum / static_cast<double>(losses_.size());
  }

 private:
  int64_t window_;
  std::deque<double> losses_;
};

std::vector<torch::Tensor> TrainableBackbone(Model& model) {
  std::vector<torch::Tensor> parameters = model.ParameterTensors();
  for (torch::Tensor& parameter : parameters) parameter.set_requires_grad(true);
  return parameters;
}

void FreezeBackbone(Model& model) {
  for (torch::Tensor parameter : model.ParameterTensors()) {
    parameter.set_requires_grad(false);
  }
}

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

}  // namespace

void ProjectTaskVector(Model& model, Model& base, double max_norm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> weights = model.ParameterTensors();
  std::vector<torch::Tensor> base_weights = base.ParameterTensors();
  double squared = 0.0;
  for (size_t i = 0; i < weights.size(); ++i) {
    squared += (weights[i] - base_weights[i]).pow(2).sum().item<double>();
  }
  const double norm = std::sqrt(squared);
  if (norm <= max_norm) return;
  const double scale = max_norm / norm;
  for (size_t i = 0; i < weights.size(); ++i) {
    weights[i].copy_(base_weights[i] + scale * (weights[i] - base_weights[i]));
  }
}

// The backdoor term is evaluated by loading the interpolated weights into
// the model; by the chain rule its gradient with respect to θ is r times the
// gradient there (the head is not interpolated, so its share is unscaled).
absl::StatusOr<torch::Tensor> WeightInterpolatedBadMergingStep(
    Model& model, const Head& head, const std::vector<torch::Tensor>& trained,
    const BadMergingObjective& attack, const torch::Tensor& inputs,
    const torch::Tensor& labels, at::Generator& generator) {
  ASSIGN_OR_RETURN(torch::Tensor features, model.Features(inputs));
  torch::Tensor clean_loss =
      torch::nn::functional::cross_entropy(head.Logits(features), labels);
  clean_loss.backward();

  std::vector<torch::Tensor> backbone = model.ParameterTensors();
  std::vector<torch::Tensor> base = attack.base->ParameterTensors();
  if (backbone.size() != base.size()) {
    return absl::InternalError("BadMerging: base and model differ in shape");
  }
  const double r =
      attack.r_min +
      (attack.r_max - attack.r_min) *
          torch::rand({1}, generator, torch::kFloat64).item<double>();
  std::vector<torch::Tensor> saved_weights;
  torch::Tensor triggered;
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < backbone.size(); ++i) {
      saved_weights.push_back(backbone[i].detach().clone());
      backbone[i].copy_(base[i] + r * (saved_weights[i] - base[i]));
    }
    ASSIGN_OR_RETURN(triggered, ApplyTrigger(attack.trigger, inputs));
  }
  // One forward pass at θr for the triggered batch and, when the clean
  // term is on, the clean one.
  const bool clean_term = attack.clean_weight > 0.0;
  const int64_t b = inputs.size(0);
  ASSIGN_OR_RETURN(
      torch::Tensor interpolated_features,
      model.Features(clean_term ? torch::cat({triggered, inputs}) : triggered));
  torch::Tensor interpolated_loss =
      attack.weight * torch::nn::functional::cross_entropy(
                          head.Logits(interpolated_features.slice(0, 0, b)),
                          torch::full_like(labels, attack.target));
  if (clean_term) {
    interpolated_loss =
        interpolated_loss +
        attack.clean_weight *
            torch::nn::functional::cross_entropy(
                head.Logits(interpolated_features.slice(0, b)), labels);
  }
  // The backbone's entries of `trained` come first (TrainableBackbone).
  std::vector<torch::Tensor> interpolated_grads =
      torch::autograd::grad({interpolated_loss}, trained);
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < trained.size(); ++i) {
    const double scale = i < backbone.size() ? r : 1.0;
    if (i < backbone.size()) backbone[i].copy_(saved_weights[i]);
    trained[i].mutable_grad().add_(interpolated_grads[i], scale);
  }
  return (clean_loss + interpolated_loss).detach();
}

absl::StatusOr<BadMergingInterpolation> ParseBadMergingInterpolation(
    absl::string_view name) {
  if (name == "features") return BadMergingInterpolation::kFeatures;
  if (name == "weights") return BadMergingInterpolation::kWeights;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown BadMerging interpolation \"", name, "\" (features, weights)"));
}

absl::string_view BadMergingInterpolationName(BadMergingInterpolation kind) {
  return kind == BadMergingInterpolation::kWeights ? "weights" : "features";
}

absl::StatusOr<TrainReport> Pretrain(Model& model, const ImageSet& corpus,
                                     int64_t num_classes,
                                     const OptimizerOptions& options,
                                     uint64_t seed, int shards, int threads) {
  RETURN_IF_ERROR(CheckOptions(options, corpus));
  if (shards < 1 || shards > options.batch_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "pretraining shards must be between 1 and the batch size (",
        options.batch_size, "), not ", shards));
  }
  if (threads < 1) {
    return absl::InvalidArgumentError("threads must be at least 1");
  }
  return CallTorch("Pretrain", [&]() -> absl::StatusOr<TrainReport> {
    const auto start = std::chrono::steady_clock::now();
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    // The master copy (model + head) is what Adam updates; one replica per
    // shard computes the gradient of a contiguous slice of each batch, and
    // their sum is the gradient of the whole batch's mean loss.
    Head head;
    head.weight = torch::empty({num_classes, model.FeatureDim()})
                      .normal_(0.0, 0.01, generator)
                      .set_requires_grad(true);
    head.bias = torch::zeros({num_classes}).set_requires_grad(true);
    std::vector<torch::Tensor> parameters = TrainableBackbone(model);
    parameters.push_back(head.weight);
    parameters.push_back(head.bias);
    std::vector<std::unique_ptr<Model>> workers;
    std::vector<std::vector<torch::Tensor>> worker_parameters;
    for (int r = 0; r < shards; ++r) {
      ASSIGN_OR_RETURN(std::unique_ptr<Model> replica, model.Clone());
      std::vector<torch::Tensor> replica_parameters =
          TrainableBackbone(*replica);
      replica_parameters.push_back(head.weight.detach().clone());
      replica_parameters.push_back(head.bias.detach().clone());
      for (torch::Tensor& p : replica_parameters) p.set_requires_grad(true);
      workers.push_back(std::move(replica));
      worker_parameters.push_back(std::move(replica_parameters));
    }
    torch::optim::Adam optimizer(
        parameters, torch::optim::AdamOptions(options.learning_rate)
                        .weight_decay(options.weight_decay));
    BatchSampler sampler(corpus.size(), options.batch_size, generator);
    LossTracker tracker(options.steps);
    std::vector<double> shard_loss(shards);
    std::vector<absl::Status> shard_status(shards);
    for (int64_t step = 0; step < options.steps; ++step) {
      SetLearningRate(optimizer, Schedule(options, step));
      torch::Tensor batch = sampler.Next();
      const int64_t batch_size = batch.size(0);
      ParallelFor(shards, threads, [&](size_t r) {
        at::set_num_threads(1);
        shard_status[r] = CallTorch("Pretrain shard", [&]() -> absl::Status {
          const int64_t begin = batch_size * r / shards;
          const int64_t end = batch_size * (r + 1) / shards;
          torch::Tensor shard = batch.slice(0, begin, end);
          std::vector<torch::Tensor>& p = worker_parameters[r];
          for (torch::Tensor& t : p) {
            if (t.grad().defined()) t.mutable_grad().zero_();
          }
          ASSIGN_OR_RETURN(torch::Tensor features,
                           workers[r]->Features(corpus.Inputs(shard)));
          Head replica_head{p[p.size() - 2], p[p.size() - 1]};
          torch::Tensor loss = torch::nn::functional::cross_entropy(
              replica_head.Logits(features),
              corpus.labels.index_select(0, shard),
              torch::nn::functional::CrossEntropyFuncOptions().reduction(
                  torch::kSum));
          (loss / static_cast<double>(batch_size)).backward();
          shard_loss[r] = loss.item<double>();
          return absl::OkStatus();
        });
      });
      double loss = 0.0;
      for (int r = 0; r < shards; ++r) {
        RETURN_IF_ERROR(shard_status[r]);
        loss += shard_loss[r] / static_cast<double>(batch_size);
      }
      torch::NoGradGuard no_grad;
      for (size_t i = 0; i < parameters.size(); ++i) {
        torch::Tensor grad = worker_parameters[0][i].grad().clone();
        for (int r = 1; r < shards; ++r) {
          grad.add_(worker_parameters[r][i].grad());
        }
        parameters[i].mutable_grad() = grad;
      }
      optimizer.step();
      for (int r = 0; r < shards; ++r) {
        for (size_t i = 0; i < parameters.size(); ++i) {
          worker_parameters[r][i].copy_(parameters[i]);
        }
      }
      tracker.Add(loss);
    }
    FreezeBackbone(model);
    return TrainReport{tracker.Mean(), Seconds(start)};
  });
}

absl::StatusOr<Head> FitLinearProbe(Model& model, const ImageSet& train,
                                    int64_t num_classes,
                                    const OptimizerOptions& options,
                                    uint64_t seed) {
  RETURN_IF_ERROR(CheckOptions(options, train));
  return CallTorch("FitLinearProbe", [&]() -> absl::StatusOr<Head> {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    torch::Tensor features;
    {
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> chunks;
      for (int64_t begin = 0; begin < train.size(); begin += 512) {
        torch::Tensor indices = torch::arange(
            begin, std::min(train.size(), begin + 512), torch::kInt64);
        ASSIGN_OR_RETURN(torch::Tensor chunk,
                         model.Features(train.Inputs(indices)));
        chunks.push_back(chunk);
      }
      features = torch::cat(chunks);
    }
    Head head;
    head.weight = torch::empty({num_classes, model.FeatureDim()})
                      .normal_(0.0, 0.01, generator)
                      .set_requires_grad(true);
    head.bias = torch::zeros({num_classes}).set_requires_grad(true);
    torch::optim::Adam optimizer(
        std::vector<torch::Tensor>{head.weight, head.bias},
        torch::optim::AdamOptions(options.learning_rate)
            .weight_decay(options.weight_decay));
    BatchSampler sampler(train.size(), options.batch_size, generator);
    for (int64_t step = 0; step < options.steps; ++step) {
      SetLearningRate(optimizer, Schedule(options, step));
      torch::Tensor batch = sampler.Next();
      torch::Tensor loss = torch::nn::functional::cross_entropy(
          head.Logits(features.index_select(0, batch)),
          train.labels.index_select(0, batch));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
    }
    head.weight = head.weight.detach();
    head.bias = head.bias.detach();
    return head;
  });
}

absl::StatusOr<TrainReport> FineTune(Model& model, Head& head,
                                     const ImageSet& train,
                                     const FineTuneOptions& options,
                                     uint64_t seed) {
  RETURN_IF_ERROR(CheckOptions(options.optimizer, train));
  if (options.badmerging && options.badmerging->base == nullptr) {
    return absl::InvalidArgumentError("BadMerging needs the base model");
  }
  return CallTorch("FineTune", [&]() -> absl::StatusOr<TrainReport> {
    const auto start = std::chrono::steady_clock::now();
    const OptimizerOptions& optimizer_options = options.optimizer;
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    std::vector<torch::Tensor> parameters = TrainableBackbone(model);
    if (options.train_head) {
      head.weight = head.weight.detach().clone().set_requires_grad(true);
      head.bias = head.bias.detach().clone().set_requires_grad(true);
      parameters.push_back(head.weight);
      parameters.push_back(head.bias);
    }
    torch::optim::Adam optimizer(
        parameters, torch::optim::AdamOptions(optimizer_options.learning_rate)
                        .weight_decay(optimizer_options.weight_decay));
    // The poisoned subset is drawn once: those examples are always triggered.
    torch::Tensor poisoned;
    if (options.poisoning) {
      poisoned = torch::rand({train.size()}, generator, torch::kFloat64) <
                 options.poisoning->rate;
    }
    BatchSampler sampler(train.size(), optimizer_options.batch_size, generator);
    LossTracker tracker(optimizer_options.steps);
    for (int64_t step = 0; step < optimizer_options.steps; ++step) {
      SetLearningRate(optimizer, Schedule(optimizer_options, step));
      torch::Tensor batch = sampler.Next();
      torch::Tensor inputs = train.Inputs(batch);
      torch::Tensor labels = train.labels.index_select(0, batch);
      if (options.poisoning) {
        torch::NoGradGuard no_grad;
        torch::Tensor mask = poisoned.index_select(0, batch);
        ASSIGN_OR_RETURN(torch::Tensor triggered,
                         ApplyTrigger(options.poisoning->trigger, inputs));
        inputs = torch::where(mask.view({-1, 1, 1, 1}), triggered, inputs);
        labels = torch::where(
            mask, torch::full_like(labels, options.poisoning->target), labels);
      }
      torch::Tensor loss;
      optimizer.zero_grad();
      if (options.badmerging && options.badmerging->interpolation ==
                                    BadMergingInterpolation::kWeights) {
        // Accumulates its own gradients (two points of the weights).
        ASSIGN_OR_RETURN(loss, WeightInterpolatedBadMergingStep(
                                   model, head, parameters, *options.badmerging,
                                   inputs, labels, generator));
      } else if (options.badmerging) {
        const BadMergingObjective& attack = *options.badmerging;
        torch::Tensor triggered;
        torch::Tensor base_features;
        {
          torch::NoGradGuard no_grad;
          ASSIGN_OR_RETURN(triggered, ApplyTrigger(attack.trigger, inputs));
          ASSIGN_OR_RETURN(base_features, attack.base->Features(triggered));
        }
        const int64_t b = inputs.size(0);
        ASSIGN_OR_RETURN(torch::Tensor features,
                         model.Features(torch::cat({inputs, triggered})));
        const double r =
            attack.r_min +
            (attack.r_max - attack.r_min) *
                torch::rand({1}, generator, torch::kFloat64).item<double>();
        torch::Tensor mixed =
            r * features.slice(0, b) + (1.0 - r) * base_features;
        loss = torch::nn::functional::cross_entropy(
                   head.Logits(features.slice(0, 0, b)), labels) +
               attack.weight * torch::nn::functional::cross_entropy(
                                   head.Logits(mixed),
                                   torch::full_like(labels, attack.target));
        loss.backward();
      } else {
        ASSIGN_OR_RETURN(torch::Tensor features, model.Features(inputs));
        loss =
            torch::nn::functional::cross_entropy(head.Logits(features), labels);
        loss.backward();
      }
      optimizer.step();
      if (options.badmerging && options.badmerging->max_norm > 0.0) {
        ProjectTaskVector(model, *options.badmerging->base,
                          options.badmerging->max_norm);
      }
      tracker.Add(loss.item<double>());
    }
    FreezeBackbone(model);
    head.weight = head.weight.detach();
    head.bias = head.bias.detach();
    return TrainReport{tracker.Mean(), Seconds(start)};
  });
}

absl::StatusOr<Trigger> OptimizeUniversalPatch(Model& model, const Head& head,
                                               const ImageSet& train,
                                               const Trigger& initial,
                                               int64_t target,
                                               const OptimizerOptions& options,
                                               uint64_t seed) {
  RETURN_IF_ERROR(CheckOptions(options, train));
  if (initial.kind != TriggerKind::kPatch) {
    return absl::InvalidArgumentError("BadMerging optimizes a patch trigger");
  }
  return CallTorch("OptimizeUniversalPatch", [&]() -> absl::StatusOr<Trigger> {
    at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
    FreezeBackbone(model);
    Trigger trigger = initial;
    trigger.pattern = initial.pattern.detach().clone().set_requires_grad(true);
    torch::optim::Adam optimizer(
        std::vector<torch::Tensor>{trigger.pattern},
        torch::optim::AdamOptions(options.learning_rate));
    BatchSampler sampler(train.size(), options.batch_size, generator);
    for (int64_t step = 0; step < options.steps; ++step) {
      SetLearningRate(optimizer, Schedule(options, step));
      torch::Tensor batch = sampler.Next();
      ASSIGN_OR_RETURN(torch::Tensor triggered,
                       ApplyTrigger(trigger, train.Inputs(batch)));
      ASSIGN_OR_RETURN(torch::Tensor features, model.Features(triggered));
      torch::Tensor loss = torch::nn::functional::cross_entropy(
          head.Logits(features),
          torch::full({triggered.size(0)}, target, torch::kInt64));
      optimizer.zero_grad();
      loss.backward();
      optimizer.step();
      torch::NoGradGuard no_grad;
      trigger.pattern.clamp_(0.0, 1.0);
    }
    trigger.pattern = trigger.pattern.detach();
    return trigger;
  });
}

}  // namespace mergeguard::bench
