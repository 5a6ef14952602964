#include "core/lfpm.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/evaluation.h"
#include "core/file_util.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "core/torch_status.h"
#include "core/version.h"
#include "nlohmann/json.hpp"

namespace mergeguard {

using json = nlohmann::json;

// The reported path curve's points.
constexpr double kReportAlphas[] = {0.0, 0.25, 0.5, 0.75, 1.0};
// Keeps the untargeted loss −log(1 − p_y) finite.
constexpr double kProbabilityFloor = 1e-6;
// XORed into the seed for the extra passes' random stream.
constexpr uint64_t kExtraSeedSalt = 0x9e3779b97f4a7c15ULL;
// Neural Cleanse's consistency constant: 1.4826·MAD estimates σ for normal
// data.
constexpr double kMadConsistency = 1.4826;

absl::string_view LfpmModeName(LfpmMode mode) {
  return mode == LfpmMode::kFull ? "full" : "peft";
}

absl::StatusOr<LfpmMode> ParseLfpmMode(absl::string_view name) {
  if (name == "full") return LfpmMode::kFull;
  if (name == "peft" || name == "lora") return LfpmMode::kPeft;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown LFPM mode \"", name, "\" (full, peft)"));
}

absl::string_view TriggerTargetingName(TriggerTargeting targeting) {
  return targeting == TriggerTargeting::kEasiestClass ? "easiest_class"
                                                      : "untargeted";
}

absl::StatusOr<TriggerTargeting> ParseTriggerTargeting(absl::string_view name) {
  if (name == "easiest_class" || name == "targeted") {
    return TriggerTargeting::kEasiestClass;
  }
  if (name == "untargeted") return TriggerTargeting::kUntargeted;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown trigger targeting \"", name, "\" (easiest_class, untargeted)"));
}

absl::string_view LearningRateScheduleName(LearningRateSchedule schedule) {
  return schedule == LearningRateSchedule::kCosine ? "cosine" : "constant";
}

absl::StatusOr<LearningRateSchedule> ParseLearningRateSchedule(
    absl::string_view name) {
  if (name == "constant") return LearningRateSchedule::kConstant;
  if (name == "cosine") return LearningRateSchedule::kCosine;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown learning_rate_schedule \"", name, "\" (constant, cosine)"));
}

absl::string_view WindowPlacementName(WindowPlacement placement) {
  return placement == WindowPlacement::kDensest ? "densest" : "extent";
}

absl::StatusOr<WindowPlacement> ParseWindowPlacement(absl::string_view name) {
  if (name == "extent") return WindowPlacement::kExtent;
  if (name == "densest") return WindowPlacement::kDensest;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown window_placement \"", name, "\" (extent, densest)"));
}

double LfpmLearningRateAt(const LfpmOptions& options, int64_t step) {
  const double rate = LfpmEffectiveLearningRate(options);
  if (options.learning_rate_schedule == LearningRateSchedule::kConstant ||
      options.steps <= 0) {
    return rate;
  }
  const double progress =
      static_cast<double>(step - 1) / static_cast<double>(options.steps);
  return rate * 0.5 * (1.0 + std::cos(M_PI * progress));
}

double LfpmEffectiveLearningRate(const LfpmOptions& options) {
  if (options.learning_rate > 0.0) return options.learning_rate;
  return options.mode == LfpmMode::kFull ? kLfpmFullLearningRate
                                         : kLfpmPeftLearningRate;
}

double LfpmAnomalyIndex(const std::vector<double>& norms) {
  if (norms.size() < 3) return 0.0;
  auto median = [](std::vector<double> values) {
    std::sort(values.begin(), values.end());
    const size_t n = values.size();
    return n % 2 == 1 ? values[n / 2]
                      : 0.5 * (values[n / 2 - 1] + values[n / 2]);
  };
  const double center = median(norms);
  std::vector<double> deviations;
  deviations.reserve(norms.size());
  for (double norm : norms) deviations.push_back(std::abs(norm - center));
  // A floor keeps identical norms (MAD 0) from dividing by zero.
  const double mad =
      std::max(median(deviations), 1e-6 * std::max(center, 1e-12));
  const double smallest = *std::min_element(norms.begin(), norms.end());
  return std::max(0.0, center - smallest) / (kMadConsistency * mad);
}

namespace lfpm_internal {
namespace {

// AdaptedTensor is τab for one backbone parameter.
struct AdaptedTensor {
  size_t parameter = 0;  // index into Model::Parameters()
  std::string name;
  std::vector<int64_t> shape;
  // Exactly one of `dense` (full mode, or a 1-D parameter under
  // peft_dense_vectors) and the LoRA pair is set.
  torch::Tensor dense;   // same shape as the parameter
  torch::Tensor lora_a;  // PEFT: [r, in]
  torch::Tensor lora_b;  // PEFT: [out, r]
};

// SurrogateTriggers are one task's mined triggers, k of them:
// x' = (1 − M)⊙x + M⊙P.
struct SurrogateTriggers {
  torch::Tensor mask_logits;     // [k, 1, H, W], leaf
  torch::Tensor pattern_logits;  // [k, C, H, W], leaf
  std::vector<int64_t> targets;  // -1: untargeted
  // Per trigger: unlearned (1) or not (0). A trigger is unlearned only
  // while it still reaches `reach_threshold` of the inputs (docs/lfpm.md,
  // "Reach gate").
  std::vector<double> active;
  // Per trigger: never moved by mining (its gradient is zeroed, so Adam
  // leaves it where it is) and exempt from the reach gate.
  std::vector<bool> pinned;
  std::unique_ptr<torch::optim::Adam> optimizer;

  bool AnyActive() const {
    return std::any_of(active.begin(), active.end(),
                       [](double a) { return a > 0.0; });
  }

  int64_t size() const { return static_cast<int64_t>(targets.size()); }
};

struct TaskState {
  std::string name;
  Head head;
  torch::Tensor inputs;  // [N, C, H, W] on the device
  // CE targets: the calibration labels, or θm's predictions.
  torch::Tensor labels;
  bool labeled = false;
  // θm's log-probabilities (KL target when unlabeled) and features.
  torch::Tensor merged_log_probs;
  torch::Tensor merged_features;
  // Mean ‖f(θm; x)‖² over the set: scales the CTL path term.
  double feature_scale = 1.0;
  SurrogateTriggers triggers;
  // Rows of `triggers` that are window triggers (AddWindowTriggers).
  std::vector<int64_t> window_rows;
  // The task's own backbone per model parameter, on the device; empty
  // unless trigger.scan_own_model and the caller gave one.
  std::vector<torch::Tensor> own_model;
  // The base backbone, for trigger.differential_gate; empty without it.
  std::vector<torch::Tensor> base_model;
  // False when the anomaly gate rules the task out: its triggers are then
  // never unlearned nor re-mined.
  bool unlearn = true;
  // The caller's known trigger is the task's only trigger: always active,
  // never re-mined (LfpmKnownTrigger).
  bool known = false;
};

// TriggerFromStamp is one surrogate trigger whose sigmoids give `stamp`'s
// mask and pattern back to within 1e-6 (the logits are clamped).
SurrogateTriggers TriggerFromStamp(const MaskAndPattern& stamp, int64_t target,
                                   const torch::Device& device) {
  auto logits = [&](const torch::Tensor& values) {
    return torch::logit(values.to(torch::kFloat32).clamp(1e-6, 1.0 - 1e-6))
        .to(device);
  };
  SurrogateTriggers triggers;
  triggers.targets = {target};
  triggers.active = {1.0};
  triggers.pinned = {false};
  triggers.mask_logits = logits(stamp.mask.unsqueeze(0));
  triggers.pattern_logits = logits(stamp.pattern.unsqueeze(0));
  return triggers;
}

// KnownTriggers turns a caller's trigger into one surrogate trigger
// (TriggerMaskAndPattern). Logits are clamped so that sigmoid gives M and P
// back to within 1e-6.
absl::StatusOr<SurrogateTriggers> KnownTriggers(
    const LfpmKnownTrigger& known, const std::vector<int64_t>& input_shape,
    int64_t num_classes, const torch::Device& device) {
  if (known.target < -1 || known.target >= num_classes) {
    return absl::InvalidArgumentError(
        absl::StrCat("target must be -1 (untargeted) or a class in [0, ",
                     num_classes, "); got ", known.target));
  }
  ASSIGN_OR_RETURN(MaskAndPattern stamp,
                   TriggerMaskAndPattern(known.trigger, input_shape));
  return TriggerFromStamp(stamp, known.target, device);
}

struct LossParts {
  torch::Tensor total;
  double clean = 0.0;
  double backdoor = 0.0;
  double ctl = 0.0;
};

// Stamps each of `triggers` (detached unless `differentiable`) on `inputs`
// [b, C, H, W]: returns [k·b, C, H, W], trigger-major. With `keep`
// [k, b, 1, H, W] defined, each stamp's mask is multiplied by its map.
torch::Tensor StampTriggers(const SurrogateTriggers& triggers,
                            const torch::Tensor& inputs, bool differentiable,
                            const torch::Tensor& keep = {}) {
  torch::Tensor mask = torch::sigmoid(triggers.mask_logits);
  torch::Tensor pattern = torch::sigmoid(triggers.pattern_logits);
  if (!differentiable) {
    mask = mask.detach();
    pattern = pattern.detach();
  }
  torch::Tensor stamp_mask = mask.unsqueeze(1);
  if (keep.defined()) stamp_mask = stamp_mask * keep;
  torch::Tensor stamped = (1.0 - stamp_mask) * inputs.unsqueeze(0) +
                          stamp_mask * pattern.unsqueeze(1);
  return stamped.flatten(0, 1);
}

// Repeats `labels` [b] to the trigger-major layout of StampTriggers.
torch::Tensor RepeatForTriggers(const torch::Tensor& values, int64_t k) {
  return values.repeat({k});
}

torch::Tensor TriggerTargets(const SurrogateTriggers& triggers, int64_t b,
                             const torch::Device& device) {
  return torch::tensor(triggers.targets, torch::kInt64)
      .to(device)
      .repeat_interleave(b);
}

// Mining loss per trigger, summed: targeted CE to the trigger's class, or
// untargeted −log(1 − p_y); plus the L1 weight on ‖M‖1.
torch::Tensor MiningLoss(const SurrogateTriggers& triggers,
                         const torch::Tensor& logits, const torch::Tensor& y,
                         int64_t b, double mask_l1_weight) {
  const int64_t k = triggers.size();
  torch::Tensor log_probs = torch::log_softmax(logits, 1);
  torch::Tensor targets = TriggerTargets(triggers, b, logits.device());
  torch::Tensor untargeted_mask = targets.lt(0);
  torch::Tensor own = RepeatForTriggers(y, k);
  torch::Tensor targeted_term =
      -log_probs.gather(1, targets.clamp_min(0).unsqueeze(1)).squeeze(1);
  torch::Tensor p_own = log_probs.gather(1, own.unsqueeze(1)).squeeze(1).exp();
  torch::Tensor untargeted_term =
      -torch::log((1.0 - p_own).clamp_min(kProbabilityFloor));
  torch::Tensor per_example =
      torch::where(untargeted_mask, untargeted_term, targeted_term);
  // Mean over each trigger's batch, summed over triggers: independent
  // problems in one pass.
  torch::Tensor per_trigger = per_example.view({k, b}).mean(1);
  torch::Tensor mask_l1 = torch::sigmoid(triggers.mask_logits).sum({1, 2, 3});
  return (per_trigger + mask_l1_weight * mask_l1).sum();
}

// AvoidTargetLoss is Σ over triggers of the mean −log(1 − p(target)) over
// each trigger's batch: low when the model is not sent to the target.
torch::Tensor AvoidTargetLoss(const SurrogateTriggers& triggers,
                              const torch::Tensor& logits, int64_t b) {
  torch::Tensor targets =
      TriggerTargets(triggers, b, logits.device()).clamp_min(0);
  torch::Tensor p_target =
      torch::softmax(logits, 1).gather(1, targets.unsqueeze(1)).squeeze(1);
  torch::Tensor per_example =
      -torch::log((1.0 - p_target).clamp_min(kProbabilityFloor));
  return per_example.view({triggers.size(), b}).mean(1).sum();
}

// Success returns the trigger's success from `predictions` [b] on labels
// [b]: targeted, the fraction of inputs not of the target class sent to it;
// untargeted, the fraction moved off their label.
double TriggerSuccess(int64_t target, const torch::Tensor& predictions,
                      const torch::Tensor& labels) {
  if (target < 0) {
    return predictions.ne(labels).to(torch::kFloat64).mean().item<double>();
  }
  torch::Tensor eligible = labels.ne(target);
  const double count = eligible.sum().item<double>();
  if (count == 0.0) return 0.0;
  return predictions.eq(target).logical_and(eligible).sum().item<double>() /
         count;
}

// ClassSizes is what the scan ranks classes by: the trigger norms, or with
// a base scan (differential gate) the ratios own / base.
std::vector<double> ClassSizes(const LfpmAnomaly& anomaly) {
  if (anomaly.base_class_norms.empty()) return anomaly.class_norms;
  std::vector<double> ratios;
  for (size_t c = 0; c < anomaly.class_norms.size(); ++c) {
    ratios.push_back(anomaly.class_norms[c] /
                     std::max(1e-12, anomaly.base_class_norms[c]));
  }
  return ratios;
}

}  // namespace

// State is everything one LFPM run keeps; the test hook and RunLfpm share it.
struct LfpmProblemForTesting::State {
  LfpmOptions options;
  torch::Device device = torch::kCPU;
  std::unique_ptr<Model> model;
  std::vector<torch::Tensor> merged;  // θm per parameter, on the device
  std::vector<AdaptedTensor> adapted;
  std::vector<TaskState> tasks;
  at::Generator generator;
  // Restarts and dropout refinement draw from this one, so turning them on
  // leaves every scan and outer step's draws as they were.
  at::Generator extra_generator;
  double lora_scale = 1.0;

  absl::Status Check() const {
    if (options.is_cancelled && options.is_cancelled()) {
      return absl::CancelledError("LFPM cancelled");
    }
    return absl::OkStatus();
  }

  // Tau returns τab for `t`, with autograd to its leaves.
  torch::Tensor Tau(const AdaptedTensor& t) const {
    if (t.dense.defined()) return t.dense;
    return (torch::matmul(t.lora_b, t.lora_a) * lora_scale).view(t.shape);
  }

  std::vector<torch::Tensor> Trainable() const {
    std::vector<torch::Tensor> leaves;
    for (const AdaptedTensor& t : adapted) {
      if (t.dense.defined()) {
        leaves.push_back(t.dense);
      } else {
        leaves.push_back(t.lora_a);
        leaves.push_back(t.lora_b);
      }
    }
    return leaves;
  }

  // Install puts θm + α·τab into the module; with autograd when enabled by
  // the caller, so the forward pass back-propagates into τab.
  absl::Status Install(double alpha) {
    for (const AdaptedTensor& t : adapted) {
      torch::Tensor value = merged[t.parameter] + alpha * Tau(t);
      RETURN_IF_ERROR(model->InstallTensor(t.name, value));
    }
    return absl::OkStatus();
  }

  absl::Status InstallDetached(double alpha) {
    torch::NoGradGuard no_grad;
    return Install(alpha);
  }

  // InstallBackbone puts `values` (one per model parameter) into every
  // parameter of the module, adapted or not.
  absl::Status InstallBackbone(const std::vector<torch::Tensor>& values) {
    torch::NoGradGuard no_grad;
    const std::vector<ParameterInfo>& parameters = model->Parameters();
    for (size_t i = 0; i < parameters.size(); ++i) {
      RETURN_IF_ERROR(model->InstallTensor(parameters[i].name, values[i]));
    }
    return absl::OkStatus();
  }

  // InstallForScan puts `task`'s own model into the module when it has
  // one, else θm.
  absl::Status InstallForScan(const TaskState& task) {
    return InstallBackbone(task.own_model.empty() ? merged : task.own_model);
  }

  // InitialScan is the scan on θm, or on `task`'s own model when it has
  // one; it leaves that model installed.
  // With a base model it also scans the base and fills the differential
  // fields; the own model is installed again afterwards.
  absl::StatusOr<std::pair<LfpmAnomaly, SurrogateTriggers>> InitialScan(
      TaskState& task) {
    RETURN_IF_ERROR(InstallForScan(task));
    ASSIGN_OR_RETURN(auto scan, Scan(task));
    scan.first.own_model = !task.own_model.empty();
    if (!task.base_model.empty()) {
      RETURN_IF_ERROR(InstallBackbone(task.base_model));
      ASSIGN_OR_RETURN(auto base, Scan(task));
      LfpmAnomaly& anomaly = scan.first;
      anomaly.base_class_norms = base.first.class_norms;
      const std::vector<double> ratios = ClassSizes(anomaly);
      anomaly.differential_index = LfpmAnomalyIndex(ratios);
      anomaly.differential_class =
          std::min_element(ratios.begin(), ratios.end()) - ratios.begin();
      anomaly.differential_ratio = ratios[anomaly.differential_class];
      RETURN_IF_ERROR(InstallForScan(task));
    }
    return scan;
  }

  // Sample draws `batch` of the `n` input indices from `from` (the main
  // generator when null).
  torch::Tensor Sample(int64_t n, int64_t batch,
                       at::Generator* from = nullptr) {
    return torch::randperm(n, from != nullptr ? *from : generator,
                           torch::kInt64)
        .slice(0, 0, std::min(n, batch))
        .to(device);
  }

  // TargetHold is the mean over the batch of max(0, p(t|x) − θm's p(t|x))
  // on inputs labeled other than t, summed over the distinct classes t that
  // the task's counted triggers (active ones when `gated`) target.
  torch::Tensor TargetHold(const TaskState& task, const torch::Tensor& idx,
                           const torch::Tensor& y,
                           const torch::Tensor& clean_log_probs, bool gated) {
    std::set<int64_t> held;
    for (int64_t j = 0; j < task.triggers.size(); ++j) {
      if (task.triggers.targets[j] >= 0 &&
          (!gated || task.triggers.active[j] > 0.0)) {
        held.insert(task.triggers.targets[j]);
      }
    }
    torch::Tensor hold = torch::zeros({}, clean_log_probs.options());
    if (held.empty()) return hold;
    torch::Tensor merged = task.merged_log_probs.index_select(0, idx);
    for (int64_t t : held) {
      torch::Tensor rise = torch::relu(clean_log_probs.select(1, t).exp() -
                                       merged.select(1, t).exp());
      hold = hold + (rise * y.ne(t).to(rise.dtype())).mean();
    }
    return hold;
  }

  // Loss returns L(α) on `batch` (per task: input indices) given the
  // detached endpoint features f(θm + τab; x) per task. Installs θ(α).
  // With `gated`, L_bd and the invariance term count only the triggers
  // marked active, and a task with none skips its triggered pass; without
  // it (the report) every trigger counts.
  absl::StatusOr<LossParts> Loss(double alpha,
                                 const std::vector<torch::Tensor>& batch,
                                 const std::vector<torch::Tensor>& endpoint,
                                 bool gated = true) {
    RETURN_IF_ERROR(Install(alpha));
    LossParts parts;
    torch::Tensor total;
    for (size_t i = 0; i < tasks.size(); ++i) {
      TaskState& task = tasks[i];
      const torch::Tensor& idx = batch[i];
      const int64_t b = idx.size(0);
      const int64_t k = task.triggers.size();
      torch::Tensor x = task.inputs.index_select(0, idx);
      torch::Tensor y = task.labels.index_select(0, idx);
      const bool use_triggers = !gated || task.triggers.AnyActive();
      torch::Tensor features;
      if (use_triggers) {
        torch::Tensor triggered = StampTriggers(task.triggers, x, false);
        ASSIGN_OR_RETURN(features,
                         model->Features(torch::cat({x, triggered}, 0)));
      } else {
        ASSIGN_OR_RETURN(features, model->Features(x));
      }
      torch::Tensor clean_features = features.slice(0, 0, b);
      torch::Tensor clean_log_probs =
          torch::log_softmax(task.head.Logits(clean_features), 1);
      torch::Tensor clean;
      if (task.labeled) {
        clean = torch::nll_loss(clean_log_probs, y);
        if (options.target_hold_weight > 0.0) {
          clean = clean + options.target_hold_weight *
                              TargetHold(task, idx, y, clean_log_probs, gated);
        }
      } else {
        torch::Tensor target = task.merged_log_probs.index_select(0, idx);
        clean = (target.exp() * (target - clean_log_probs)).sum(1).mean();
      }
      torch::Tensor backdoor = torch::zeros({}, clean_log_probs.options());
      torch::Tensor invariance = torch::zeros({}, clean_log_probs.options());
      if (use_triggers) {
        torch::Tensor triggered_features = features.slice(0, b);
        // Per trigger (mean over its batch), weighted by the gate and
        // averaged over the k triggers: with every trigger active this is
        // the plain mean over the k·b triggered inputs.
        torch::Tensor weights =
            gated ? torch::tensor(task.triggers.active, torch::kFloat64)
                        .to(clean_log_probs.options())
                  : torch::ones({k}, clean_log_probs.options());
        torch::Tensor backdoor_each = torch::nll_loss(
            torch::log_softmax(task.head.Logits(triggered_features), 1),
            RepeatForTriggers(y, k), {}, at::Reduction::None);
        backdoor = (backdoor_each.view({k, b}).mean(1) * weights).sum() /
                   static_cast<double>(k);
        // Trigger invariance on normalized penultimate features.
        torch::Tensor invariance_each =
            (torch::nn::functional::normalize(
                 triggered_features,
                 torch::nn::functional::NormalizeFuncOptions().dim(1)) -
             torch::nn::functional::normalize(
                 clean_features,
                 torch::nn::functional::NormalizeFuncOptions().dim(1))
                 .repeat({k, 1}))
                .pow(2)
                .sum(1);
        invariance = (invariance_each.view({k, b}).mean(1) * weights).sum() /
                     static_cast<double>(k);
      }
      // CTL: θ(α)'s features stay on the chord between θm's and
      // (θm + τab)'s, in units of θm's mean squared feature norm.
      torch::Tensor chord =
          (1.0 - alpha) * task.merged_features.index_select(0, idx) +
          alpha * endpoint[i];
      torch::Tensor path =
          (clean_features - chord).pow(2).sum(1).mean() / task.feature_scale;
      torch::Tensor ctl = invariance + options.ctl_path_weight * path;
      torch::Tensor task_loss =
          clean + options.beta * backdoor + options.gamma * ctl;
      total = total.defined() ? total + task_loss : task_loss;
      parts.clean += clean.item<double>();
      parts.backdoor += backdoor.item<double>();
      parts.ctl += ctl.item<double>();
    }
    const double n = static_cast<double>(tasks.size());
    parts.total = total / n;
    parts.clean /= n;
    parts.backdoor /= n;
    parts.ctl /= n;
    return parts;
  }

  // Endpoint returns f(θm + τab; x) for each task's batch: detached, or
  // with autograd to τab when `with_gradient`.
  absl::StatusOr<std::vector<torch::Tensor>> Endpoint(
      const std::vector<torch::Tensor>& batch, bool with_gradient = false) {
    torch::AutoGradMode grad_mode(with_gradient);
    RETURN_IF_ERROR(Install(1.0));
    std::vector<torch::Tensor> features;
    for (size_t i = 0; i < tasks.size(); ++i) {
      ASSIGN_OR_RETURN(
          torch::Tensor f,
          model->Features(tasks[i].inputs.index_select(0, batch[i])));
      features.push_back(f);
    }
    return features;
  }

  // AccumulateGradients adds ∇ L(α_k)/K for every node into the leaves'
  // .grad (zeroed first) and returns the node-averaged parts.
  // With ctl_endpoint_gradient the endpoint features are computed once with
  // autograd; the nodes' gradients with respect to them are summed on a
  // detached copy and sent through the endpoint's graph in one backward
  // pass, instead of one per node.
  absl::StatusOr<LossParts> AccumulateGradients(
      const std::vector<double>& alphas,
      const std::vector<torch::Tensor>& batch) {
    const bool through_endpoint = options.ctl_endpoint_gradient;
    ASSIGN_OR_RETURN(std::vector<torch::Tensor> endpoint_graph,
                     Endpoint(batch, through_endpoint));
    std::vector<torch::Tensor> endpoint;
    for (const torch::Tensor& f : endpoint_graph) {
      endpoint.push_back(through_endpoint ? f.detach().requires_grad_(true)
                                          : f);
    }
    for (torch::Tensor& leaf : Trainable()) {
      if (leaf.grad().defined()) leaf.mutable_grad().zero_();
    }
    LossParts mean;
    const double k = static_cast<double>(alphas.size());
    for (double alpha : alphas) {
      ASSIGN_OR_RETURN(LossParts parts, Loss(alpha, batch, endpoint));
      (parts.total / k).backward();
      mean.clean += parts.clean / k;
      mean.backdoor += parts.backdoor / k;
      mean.ctl += parts.ctl / k;
    }
    if (through_endpoint) {
      std::vector<torch::Tensor> outputs;
      std::vector<torch::Tensor> grads;
      for (size_t i = 0; i < endpoint.size(); ++i) {
        // Undefined when the path term has weight 0.
        if (!endpoint[i].grad().defined()) continue;
        outputs.push_back(endpoint_graph[i]);
        grads.push_back(endpoint[i].grad());
      }
      if (!outputs.empty()) torch::autograd::backward(outputs, grads);
    }
    return mean;
  }

  // TauNorm returns ‖τab‖2 over all adapted tensors; one host read per
  // call, since it runs every outer step.
  double TauNorm() const {
    torch::NoGradGuard no_grad;
    torch::Tensor sum = torch::zeros(
        {}, torch::TensorOptions().dtype(torch::kFloat64).device(device));
    for (const AdaptedTensor& t : adapted) {
      sum += Tau(t).pow(2).sum().to(torch::kFloat64);
    }
    return std::sqrt(sum.item<double>());
  }

  std::vector<double> Nodes() {
    const int64_t k = options.path_nodes;
    torch::Tensor u = torch::rand({k}, generator, torch::kFloat64);
    std::vector<double> alphas;
    for (int64_t i = 0; i < k; ++i) {
      // 1 − u ∈ (0, 1], so α lands in the half-open stratum ((i)/K, (i+1)/K].
      alphas.push_back((static_cast<double>(i) + 1.0 - u[i].item<double>()) /
                       static_cast<double>(k));
    }
    return alphas;
  }

  // NewTriggers returns triggers for `targets` with fresh logits drawn from
  // `from` (the main generator when null).
  SurrogateTriggers NewTriggers(std::vector<int64_t> targets,
                                at::Generator* from = nullptr) {
    at::Generator& draw = from != nullptr ? *from : generator;
    const std::vector<int64_t>& shape = model->InputShape();
    const int64_t k = static_cast<int64_t>(targets.size());
    SurrogateTriggers triggers;
    triggers.targets = std::move(targets);
    triggers.active.assign(k, 1.0);
    triggers.pinned.assign(k, false);
    const double init = options.triggers.initial_mask_logit;
    triggers.mask_logits =
        (torch::randn({k, 1, shape[1], shape[2]}, draw) * 0.1 + init)
            .to(device)
            .set_requires_grad(true);
    triggers.pattern_logits =
        torch::randn({k, shape[0], shape[1], shape[2]}, draw)
            .to(device)
            .set_requires_grad(true);
    ResetTriggerOptimizer(triggers);
    return triggers;
  }

  // SelectTriggers copies the rows of `scan` for `targets` (classes, which
  // are also its row indices) into fresh, active, unpinned triggers.
  SurrogateTriggers SelectTriggers(const SurrogateTriggers& scan,
                                   std::vector<int64_t> targets) {
    torch::Tensor rows = torch::tensor(targets, torch::kInt64).to(device);
    SurrogateTriggers triggers;
    triggers.active.assign(targets.size(), 1.0);
    triggers.pinned.assign(targets.size(), false);
    triggers.targets = std::move(targets);
    {
      torch::NoGradGuard no_grad;
      triggers.mask_logits = scan.mask_logits.index_select(0, rows)
                                 .detach()
                                 .clone()
                                 .set_requires_grad(true);
      triggers.pattern_logits = scan.pattern_logits.index_select(0, rows)
                                    .detach()
                                    .clone()
                                    .set_requires_grad(true);
    }
    ResetTriggerOptimizer(triggers);
    return triggers;
  }

  // AddRestarts mines restarts_per_target − 1 more triggers for each of
  // `task`'s target classes from fresh starts against the installed model
  // and appends them to its triggers, pinned. With restart_overlap_weight,
  // one round at a time, each round penalized on the pixels that the
  // class's triggers so far hold.
  absl::Status AddRestarts(TaskState& task) {
    std::vector<int64_t> classes;
    for (int64_t target : task.triggers.targets) {
      if (std::find(classes.begin(), classes.end(), target) == classes.end()) {
        classes.push_back(target);
      }
    }
    const int64_t rounds = options.triggers.restarts_per_target - 1;
    if (rounds < 1 || classes.empty()) return absl::OkStatus();
    const double mask_l1_weight = options.triggers.mask_l1_weight *
                                  options.triggers.restart_mask_l1_scale;
    if (options.triggers.restart_overlap_weight > 0.0) {
      for (int64_t r = 0; r < rounds; ++r) {
        std::vector<torch::Tensor> rows;
        for (int64_t target : classes) rows.push_back(HeldMask(task, target));
        const torch::Tensor held = torch::stack(rows);
        SurrogateTriggers extra = NewTriggers(classes, &extra_generator);
        MiningTerms terms{mask_l1_weight, &extra_generator};
        terms.avoid = held;
        terms.overlap_weight = options.triggers.restart_overlap_weight;
        RETURN_IF_ERROR(Mine(task, extra, options.triggers.scan_steps,
                             options.triggers.scan_batch_size, &terms));
        AppendPinned(task.triggers, extra);
      }
      return absl::OkStatus();
    }
    std::vector<int64_t> targets;
    for (int64_t r = 0; r < rounds; ++r) {
      targets.insert(targets.end(), classes.begin(), classes.end());
    }
    SurrogateTriggers extra = NewTriggers(std::move(targets), &extra_generator);
    const MiningTerms terms{mask_l1_weight, &extra_generator};
    RETURN_IF_ERROR(Mine(task, extra, options.triggers.scan_steps,
                         options.triggers.scan_batch_size, &terms));
    AppendPinned(task.triggers, extra);
    return absl::OkStatus();
  }

  // DropoutRefine takes dropout_refine_steps mining steps on `task`'s
  // online triggers against the installed model, each stamp's mask
  // thinned by a random keep-map; the pinned ones stay as they are.
  absl::Status DropoutRefine(TaskState& task) {
    const int64_t steps = options.triggers.dropout_refine_steps;
    if (steps < 1 || task.triggers.size() == 0) return absl::OkStatus();
    // A pixel's mining gradient reaches the mask only in the stamps that
    // keep it, a (1 − dropout) share; the L1 weight is scaled alike, so the
    // two terms keep the scan's balance and what changes is that the
    // trigger must work with part of it missing.
    const double dropout = options.triggers.mask_dropout;
    MiningTerms terms(options.triggers.mask_l1_weight * (1.0 - dropout),
                      &extra_generator);
    terms.mask_dropout = dropout;
    if (options.triggers.dropout_base_weight > 0.0 &&
        !task.base_model.empty()) {
      terms.contrast = &task.base_model;
      terms.contrast_weight = options.triggers.dropout_base_weight;
    }
    RETURN_IF_ERROR(Mine(task, task.triggers, steps,
                         options.triggers.scan_batch_size, &terms));
    // Later mining starts from fresh Adam moments, as without this pass.
    ResetTriggerOptimizer(task.triggers);
    return absl::OkStatus();
  }

  // AddWindowTriggers appends one pinned trigger per target class of
  // `task` whose mask is a box placed on the class's held mask (PlaceWindow)
  // grown by window_margin, fixed, and whose pattern, started from the
  // class's first trigger's, is mined window_steps steps against the
  // installed model. A class with nothing to place the box on gets none.
  absl::Status AddWindowTriggers(TaskState& task) {
    const int64_t steps = options.triggers.window_steps;
    if (steps < 1 || task.triggers.size() == 0) return absl::OkStatus();
    // sigmoid(±20) is 1 and 0 to float precision: a hard box.
    constexpr double kWindowLogit = 20.0;
    const int64_t margin = options.triggers.window_margin;
    std::vector<int64_t> classes;
    std::vector<torch::Tensor> masks;
    std::vector<torch::Tensor> patterns;
    for (int64_t j = 0; j < task.triggers.size(); ++j) {
      const int64_t target = task.triggers.targets[j];
      if (std::find(classes.begin(), classes.end(), target) != classes.end()) {
        continue;
      }
      torch::Tensor held = HeldMask(task, target)[0].to(torch::kCPU);
      const int64_t height = held.size(0);
      const int64_t width = held.size(1);
      for (const PixelBox& placed : PlaceWindows(held)) {
        const int64_t top = std::max<int64_t>(0, placed.top - margin);
        const int64_t bottom = std::min(height, placed.bottom + margin);
        const int64_t left = std::max<int64_t>(0, placed.left - margin);
        const int64_t right = std::min(width, placed.right + margin);
        torch::Tensor box = torch::full({1, height, width}, -kWindowLogit);
        box.slice(1, top, bottom).slice(2, left, right).fill_(kWindowLogit);
        classes.push_back(target);
        masks.push_back(box.to(device));
        patterns.push_back(task.triggers.pattern_logits[j].detach().clone());
      }
    }
    if (classes.empty()) return absl::OkStatus();
    SurrogateTriggers window;
    window.targets = std::move(classes);
    {
      torch::NoGradGuard no_grad;
      window.mask_logits = torch::stack(masks).set_requires_grad(true);
      window.pattern_logits = torch::stack(patterns).set_requires_grad(true);
    }
    RETURN_IF_ERROR(MineWindowPatterns(task, window, steps));
    for (int64_t j = 0; j < window.size(); ++j) {
      task.window_rows.push_back(task.triggers.size() + j);
    }
    AppendPinned(task.triggers, window);
    return absl::OkStatus();
  }

  // RefreshWindows takes window_refresh_steps mining steps on `task`'s
  // window patterns against the installed model, boxes fixed, and writes
  // the patterns back; the windows stay pinned for every other pass.
  absl::Status RefreshWindows(TaskState& task) {
    const int64_t steps = options.triggers.window_refresh_steps;
    if (steps < 1 || task.window_rows.empty()) return absl::OkStatus();
    const torch::Tensor rows =
        torch::tensor(task.window_rows, torch::kInt64).to(device);
    SurrogateTriggers window;
    for (int64_t row : task.window_rows) {
      window.targets.push_back(task.triggers.targets[row]);
    }
    {
      torch::NoGradGuard no_grad;
      window.mask_logits = task.triggers.mask_logits.index_select(0, rows)
                               .clone()
                               .set_requires_grad(true);
      window.pattern_logits = task.triggers.pattern_logits.index_select(0, rows)
                                  .clone()
                                  .set_requires_grad(true);
    }
    RETURN_IF_ERROR(MineWindowPatterns(task, window, steps));
    torch::NoGradGuard no_grad;
    task.triggers.pattern_logits.index_copy_(0, rows,
                                             window.pattern_logits.detach());
    return absl::OkStatus();
  }

  // MineWindowPatterns takes `steps` mining steps on `window`'s patterns
  // (every row active, none pinned) against the installed model, from fresh
  // Adam moments; the boxes stay fixed, since they are the windows' point.
  absl::Status MineWindowPatterns(TaskState& task, SurrogateTriggers& window,
                                  int64_t steps) {
    window.active.assign(window.targets.size(), 1.0);
    window.pinned.assign(window.targets.size(), false);
    ResetTriggerOptimizer(window);
    MiningTerms terms(0.0, &extra_generator);
    terms.freeze_masks = true;
    return Mine(task, window, steps, options.triggers.scan_batch_size, &terms);
  }

  // Half-open pixel box [top, bottom) × [left, right).
  struct PixelBox {
    int64_t top, bottom, left, right;
  };

  // PlaceWindows is the windows' boxes before the margin, from the held
  // mask `held` [H, W], per options.triggers.window_placement: none when the
  // mask holds nothing to place them on.
  std::vector<PixelBox> PlaceWindows(const torch::Tensor& held) const {
    const int64_t height = held.size(0);
    const int64_t width = held.size(1);
    if (options.triggers.window_placement == WindowPlacement::kExtent) {
      torch::Tensor pixels = held.ge(0.5).nonzero();
      if (pixels.size(0) == 0) return {};
      torch::Tensor rows = pixels.select(1, 0);
      torch::Tensor cols = pixels.select(1, 1);
      return {PixelBox{rows.min().item<int64_t>(),
                       rows.max().item<int64_t>() + 1,
                       cols.min().item<int64_t>(),
                       cols.max().item<int64_t>() + 1}};
    }
    const double mass = held.sum().item<double>();
    if (!(mass > 0.0)) return {};
    // Every square has the side the whole mask's mass gives, so a later
    // window is as large as the first.
    const int64_t side = std::clamp<int64_t>(
        static_cast<int64_t>(std::ceil(std::sqrt(mass))), 1,
        std::min(height, width));
    torch::Tensor remaining = held.clone();
    std::vector<PixelBox> boxes;
    for (int64_t w = 0; w < options.triggers.windows_per_class; ++w) {
      // Mass inside every side × side square, [H − side + 1, W − side + 1];
      // the first maximum in row-major order wins ties.
      torch::Tensor inside = torch::avg_pool2d(remaining.unsqueeze(0).unsqueeze(0),
                                               {side, side}, {1, 1})
                                 .squeeze(0)
                                 .squeeze(0);
      const int64_t best = inside.flatten().argmax().item<int64_t>();
      // A later square with no mass left has nothing to sit on.
      if (!boxes.empty() && !(inside.flatten()[best].item<double>() > 0.0)) {
        break;
      }
      const int64_t top = best / inside.size(1);
      const int64_t left = best % inside.size(1);
      boxes.push_back(PixelBox{top, top + side, left, left + side});
      // The next square is the densest of what this one leaves.
      remaining.slice(0, top, top + side).slice(1, left, left + side).zero_();
    }
    return boxes;
  }

  // HeldMask is the pixel-wise maximum of the masks of `task`'s triggers
  // for `target`, [1, H, W], detached.
  torch::Tensor HeldMask(const TaskState& task, int64_t target) const {
    const SurrogateTriggers& triggers = task.triggers;
    torch::Tensor held;
    for (int64_t j = 0; j < triggers.size(); ++j) {
      if (triggers.targets[j] != target) continue;
      torch::Tensor mask = torch::sigmoid(triggers.mask_logits[j].detach());
      held = held.defined() ? torch::maximum(held, mask) : mask;
    }
    return held;
  }

  // AppendPinned appends `extra`'s triggers to `triggers`, pinned.
  void AppendPinned(SurrogateTriggers& triggers,
                    const SurrogateTriggers& extra) const {
    {
      torch::NoGradGuard no_grad;
      triggers.mask_logits = torch::cat({triggers.mask_logits.detach(),
                                         extra.mask_logits.detach()})
                                 .set_requires_grad(true);
      triggers.pattern_logits = torch::cat({triggers.pattern_logits.detach(),
                                            extra.pattern_logits.detach()})
                                    .set_requires_grad(true);
    }
    triggers.targets.insert(triggers.targets.end(), extra.targets.begin(),
                            extra.targets.end());
    triggers.active.insert(triggers.active.end(), extra.size(), 1.0);
    triggers.pinned.insert(triggers.pinned.end(), extra.size(), true);
    ResetTriggerOptimizer(triggers);
  }

  void ResetTriggerOptimizer(SurrogateTriggers& triggers) const {
    triggers.optimizer = std::make_unique<torch::optim::Adam>(
        std::vector<torch::Tensor>{triggers.mask_logits,
                                   triggers.pattern_logits},
        torch::optim::AdamOptions(options.triggers.learning_rate));
  }

  // MiningTerms are the mining loss's terms for the extra passes
  // (restarts, dropout refinement): their L1 weight and random stream; with
  // `avoid` ([triggers, 1, H, W]) defined, overlap_weight · Σ M ⊙ avoid per
  // trigger; with mask_dropout > 0, each stamp's mask thinned by a keep-map
  // that drops that share of its pixels; with `contrast` (a backbone, one
  // tensor per parameter) set, contrast_weight · mean −log(1 − p(target))
  // on that backbone per trigger, after which the task's scan model is
  // installed again (so only for passes on the scan model).
  struct MiningTerms {
    MiningTerms(double l1_weight, at::Generator* from)
        : mask_l1_weight(l1_weight), generator(from) {}
    double mask_l1_weight = 0.0;
    at::Generator* generator = nullptr;
    torch::Tensor avoid;
    double overlap_weight = 0.0;
    double mask_dropout = 0.0;
    const std::vector<torch::Tensor>* contrast = nullptr;
    double contrast_weight = 0.0;
    // Mine only the patterns; the masks stay as they are.
    bool freeze_masks = false;
  };

  // Mine takes `steps` Adam steps on `triggers` of `task` against the model
  // currently installed (detached), `batch_size` inputs per step, with the
  // options' mining loss and the main random stream, or `terms`'.
  absl::Status Mine(TaskState& task, SurrogateTriggers& triggers, int64_t steps,
                    int64_t batch_size, const MiningTerms* terms = nullptr) {
    const double mask_l1_weight = terms != nullptr
                                      ? terms->mask_l1_weight
                                      : options.triggers.mask_l1_weight;
    at::Generator& draw = terms != nullptr && terms->generator != nullptr
                              ? *terms->generator
                              : generator;
    for (int64_t step = 0; step < steps; ++step) {
      RETURN_IF_ERROR(Check());
      torch::Tensor idx = Sample(task.inputs.size(0), batch_size, &draw);
      torch::Tensor x = task.inputs.index_select(0, idx);
      torch::Tensor y = task.labels.index_select(0, idx);
      torch::Tensor keep;
      if (terms != nullptr && terms->mask_dropout > 0.0) {
        const torch::Tensor& logits = triggers.mask_logits;
        keep = torch::rand({triggers.size(), idx.size(0), 1, logits.size(2),
                            logits.size(3)},
                           draw)
                   .ge(terms->mask_dropout)
                   .to(logits.options().requires_grad(false));
      }
      ASSIGN_OR_RETURN(torch::Tensor features,
                       model->Features(StampTriggers(triggers, x, true, keep)));
      torch::Tensor loss = MiningLoss(triggers, task.head.Logits(features), y,
                                      idx.size(0), mask_l1_weight);
      if (terms != nullptr && terms->avoid.defined()) {
        loss = loss +
               terms->overlap_weight *
                   (torch::sigmoid(triggers.mask_logits) * terms->avoid).sum();
      }
      triggers.optimizer->zero_grad();
      loss.backward();
      if (terms != nullptr && terms->contrast != nullptr) {
        RETURN_IF_ERROR(InstallBackbone(*terms->contrast));
        ASSIGN_OR_RETURN(
            torch::Tensor contrast_features,
            model->Features(StampTriggers(triggers, x, true, keep)));
        (terms->contrast_weight *
         AvoidTargetLoss(triggers, task.head.Logits(contrast_features),
                         idx.size(0)))
            .backward();
        RETURN_IF_ERROR(InstallForScan(task));
      }
      for (int64_t j = 0; j < triggers.size(); ++j) {
        if (triggers.pinned[j]) {
          triggers.mask_logits.mutable_grad()[j].zero_();
          triggers.pattern_logits.mutable_grad()[j].zero_();
        }
      }
      // Adam from fresh moments leaves a parameter with zero gradient put.
      if (terms != nullptr && terms->freeze_masks) {
        triggers.mask_logits.mutable_grad().zero_();
      }
      triggers.optimizer->step();
    }
    return absl::OkStatus();
  }

  // Success returns each trigger's success on the first `n` inputs of
  // `task` against the installed model, one trigger per forward pass.
  absl::StatusOr<std::vector<double>> Success(const TaskState& task,
                                              const SurrogateTriggers& triggers,
                                              int64_t n) {
    torch::NoGradGuard no_grad;
    n = std::min(n, task.inputs.size(0));
    torch::Tensor x = task.inputs.slice(0, 0, n);
    torch::Tensor labels = task.labels.slice(0, 0, n);
    std::vector<double> success;
    for (int64_t j = 0; j < triggers.size(); ++j) {
      torch::Tensor mask = torch::sigmoid(triggers.mask_logits[j]);
      torch::Tensor pattern = torch::sigmoid(triggers.pattern_logits[j]);
      ASSIGN_OR_RETURN(torch::Tensor features,
                       model->Features((1.0 - mask) * x + mask * pattern));
      success.push_back(TriggerSuccess(
          triggers.targets[j], task.head.Logits(features).argmax(1), labels));
    }
    return success;
  }

  // Gate marks each of `task`'s triggers active when it reaches at least
  // `reach_threshold` of the task's first `report_examples` inputs on the
  // installed model; returns how many are active. A known trigger is always
  // active.
  absl::StatusOr<int64_t> Gate(TaskState& task) {
    if (task.known) return task.triggers.size();
    ASSIGN_OR_RETURN(std::vector<double> success,
                     Success(task, task.triggers, options.report_examples));
    int64_t count = 0;
    for (size_t j = 0; j < success.size(); ++j) {
      const bool on =
          task.unlearn && (task.triggers.pinned[j] ||
                           success[j] >= options.triggers.reach_threshold);
      task.triggers.active[j] = on ? 1.0 : 0.0;
      count += on ? 1 : 0;
    }
    return count;
  }

  // Scan is the Neural-Cleanse pass: one targeted trigger per class of
  // `task`, mined against the installed model. Returns the triggers too.
  absl::StatusOr<std::pair<LfpmAnomaly, SurrogateTriggers>> Scan(
      TaskState& task) {
    std::vector<int64_t> classes(task.head.NumClasses());
    for (size_t c = 0; c < classes.size(); ++c) classes[c] = c;
    SurrogateTriggers triggers = NewTriggers(classes);
    RETURN_IF_ERROR(Mine(task, triggers, options.triggers.scan_steps,
                         options.triggers.scan_batch_size));
    LfpmAnomaly anomaly;
    anomaly.task = task.name;
    {
      torch::NoGradGuard no_grad;
      torch::Tensor norms =
          torch::sigmoid(triggers.mask_logits).sum({1, 2, 3}).cpu();
      for (int64_t c = 0; c < norms.size(0); ++c) {
        anomaly.class_norms.push_back(norms[c].item<double>());
      }
    }
    ASSIGN_OR_RETURN(anomaly.class_reach,
                     Success(task, triggers, options.report_examples));
    anomaly.smallest_class = std::min_element(anomaly.class_norms.begin(),
                                              anomaly.class_norms.end()) -
                             anomaly.class_norms.begin();
    anomaly.anomaly_index = LfpmAnomalyIndex(anomaly.class_norms);
    anomaly.suspicious = anomaly.anomaly_index > kLfpmAnomalyThreshold;
    return std::make_pair(std::move(anomaly), std::move(triggers));
  }

  // EasiestClasses returns the `k` reached classes with the smallest masks
  // (falling back to all classes when fewer are reached). With a base scan
  // (differential gate) "smallest" is the smallest own/base ratio: the
  // class that became easy in the fine-tune, which the gate judged.
  std::vector<int64_t> EasiestClasses(const LfpmAnomaly& anomaly,
                                      int64_t k) const {
    std::vector<int64_t> order(anomaly.class_norms.size());
    for (size_t c = 0; c < order.size(); ++c) order[c] = c;
    auto reached = [&](int64_t c) {
      return anomaly.class_reach[c] >= options.triggers.reach_threshold;
    };
    const std::vector<double> size = ClassSizes(anomaly);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      if (reached(a) != reached(b)) return reached(a);
      return size[a] < size[b];
    });
    order.resize(std::min<size_t>(order.size(), k));
    return order;
  }
};

LfpmProblemForTesting::LfpmProblemForTesting(std::unique_ptr<State> state)
    : state_(std::move(state)) {}
LfpmProblemForTesting::~LfpmProblemForTesting() = default;

namespace {

absl::Status ValidateOptions(const LfpmOptions& options) {
  const LfpmTriggerOptions& t = options.triggers;
  if (options.steps < 0 || options.path_nodes < 1 || options.batch_size < 1 ||
      options.report_examples < 1) {
    return absl::InvalidArgumentError(
        "LFPM needs steps >= 0, path_nodes >= 1, batch_size >= 1 and "
        "report_examples >= 1");
  }
  if (!(options.learning_rate >= 0.0) || !(options.beta >= 0.0) ||
      !(options.gamma >= 0.0) || !(options.ctl_path_weight >= 0.0) ||
      !(options.target_hold_weight >= 0.0)) {
    return absl::InvalidArgumentError(
        "LFPM needs learning_rate >= 0 (0: the mode's default) and beta, "
        "gamma, ctl_path_weight, target_hold_weight >= 0");
  }
  if (options.mode == LfpmMode::kPeft &&
      (options.lora_rank < 1 || !(options.lora_alpha > 0.0))) {
    return absl::InvalidArgumentError(
        "LFPM PEFT mode needs lora_rank >= 1 and lora_alpha > 0");
  }
  if (t.targets_per_task < 1 || t.restarts_per_target < 1 || t.scan_steps < 0 ||
      t.scan_batch_size < 1 || t.update_every < 1 || t.steps_per_update < 0 ||
      t.merge_refine_steps < 0 || t.dropout_refine_steps < 0 ||
      t.window_steps < 0 || t.window_margin < 0 ||
      t.window_refresh_steps < 0 || t.windows_per_class < 1 ||
      !(t.mask_dropout >= 0.0 && t.mask_dropout < 1.0) ||
      !(t.dropout_base_weight >= 0.0) ||
      !(t.trigger_alpha >= 0.0 && t.trigger_alpha <= 1.0) ||
      !(t.learning_rate > 0.0) || !(t.mask_l1_weight >= 0.0) ||
      !(t.restart_overlap_weight >= 0.0) || !(t.restart_mask_l1_scale > 0.0) ||
      !(t.reach_threshold >= 0.0 && t.reach_threshold <= 1.0) ||
      !(t.anomaly_gate >= 0.0) || !(t.differential_max_ratio >= 0.0)) {
    return absl::InvalidArgumentError(
        "LFPM trigger options: targets_per_task >= 1, restarts_per_target "
        ">= 1, scan_batch_size >= 1, "
        "update_every >= 1, steps >= 0, trigger_alpha and reach_threshold in "
        "[0, 1], learning_rate > 0, mask_l1_weight >= 0, "
        "restart_overlap_weight >= 0, restart_mask_l1_scale > 0, "
        "dropout_refine_steps >= 0, mask_dropout in [0, 1), "
        "window_steps >= 0, window_margin >= 0, window_refresh_steps >= 0, "
        "windows_per_class >= 1, "
        "dropout_base_weight >= 0, "
        "anomaly_gate >= 0, "
        "differential_max_ratio >= 0");
  }
  if (t.windows_per_class > 1 &&
      t.window_placement != WindowPlacement::kDensest) {
    return absl::InvalidArgumentError(
        "LFPM trigger.windows_per_class > 1 needs "
        "trigger.window_placement=densest: an extent box already covers "
        "everything the mask holds");
  }
  if (options.threads < 0) {
    return absl::InvalidArgumentError("LFPM threads must be >= 0");
  }
  return absl::OkStatus();
}

bool Adapts(const LfpmOptions& options, const ParameterInfo& info) {
  if (options.mode == LfpmMode::kPeft && info.shape.size() < 2 &&
      !options.peft_dense_vectors) {
    return false;
  }
  if (options.layer_prefixes.empty()) return true;
  for (const std::string& prefix : options.layer_prefixes) {
    if (absl::StartsWith(info.name, prefix)) return true;
  }
  return false;
}

// CreateState validates the inputs and builds the run's state: the model
// clone on the device holding θm, τab at 0, the tasks with θm's cached
// outputs. Triggers are left empty.
absl::StatusOr<std::unique_ptr<LfpmProblemForTesting::State>> CreateState(
    const Model& architecture, const NamedTensors& merged,
    const std::vector<LfpmTask>& tasks, const LfpmOptions& options) {
  RETURN_IF_ERROR(ValidateOptions(options));
  if (tasks.empty()) {
    return absl::InvalidArgumentError("LFPM needs at least one task");
  }
  auto state = std::make_unique<LfpmProblemForTesting::State>();
  state->options = options;
  RETURN_IF_ERROR(CallTorch("LFPM device", [&]() -> absl::Status {
    state->device = torch::Device(options.device);
    return absl::OkStatus();
  }));
  if (state->device.is_cuda() && !torch::cuda::is_available()) {
    return absl::FailedPreconditionError(
        absl::StrCat("LFPM device \"", options.device,
                     "\" requested, but this LibTorch has no usable CUDA"));
  }
  if (!state->device.is_cpu() && !state->device.is_cuda()) {
    return absl::InvalidArgumentError(
        absl::StrCat("LFPM device must be cpu or cuda; got ", options.device));
  }
  if (options.threads > 0) at::set_num_threads(options.threads);
  state->generator = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  state->extra_generator =
      at::make_generator<at::CPUGeneratorImpl>(options.seed ^ kExtraSeedSalt);
  state->lora_scale =
      options.lora_alpha / static_cast<double>(options.lora_rank);

  ASSIGN_OR_RETURN(state->model, architecture.Clone());
  RETURN_IF_ERROR(state->model->LoadBackbone(merged));
  const std::vector<ParameterInfo>& parameters = state->model->Parameters();
  std::vector<torch::Tensor> leaves = state->model->ParameterTensors();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < parameters.size(); ++i) {
    state->merged.push_back(leaves[i].detach().to(state->device).contiguous());
    RETURN_IF_ERROR(
        state->model->InstallTensor(parameters[i].name, state->merged[i]));
  }
  for (size_t i = 0; i < parameters.size(); ++i) {
    const ParameterInfo& info = parameters[i];
    if (!Adapts(options, info)) continue;
    AdaptedTensor t;
    t.parameter = i;
    t.name = info.name;
    t.shape = info.shape;
    if (options.mode == LfpmMode::kFull || info.shape.size() < 2) {
      t.dense = torch::zeros(info.shape, torch::TensorOptions(state->device))
                    .set_requires_grad(true);
    } else {
      int64_t in = 1;
      for (size_t d = 1; d < info.shape.size(); ++d) in *= info.shape[d];
      const int64_t r = options.lora_rank;
      // PEFT's default: A ~ U(−1/√in, 1/√in), B = 0, so ΔW = 0 at init.
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      t.lora_a = ((torch::rand({r, in}, state->generator) * 2.0 - 1.0) * bound)
                     .to(state->device)
                     .set_requires_grad(true);
      t.lora_b =
          torch::zeros({info.shape[0], r}, torch::TensorOptions(state->device))
              .set_requires_grad(true);
    }
    state->adapted.push_back(std::move(t));
  }
  if (state->adapted.empty()) {
    return absl::InvalidArgumentError(
        "LFPM adapts no parameter: layer_prefixes match none of the "
        "architecture's (PEFT adapts weights of rank >= 2 only, unless "
        "peft_dense_vectors is set)");
  }

  std::set<std::string> names;
  const std::vector<int64_t>& input_shape = state->model->InputShape();
  for (const LfpmTask& task : tasks) {
    if (!names.insert(task.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("duplicate LFPM task \"", task.name, "\""));
    }
    if (!task.inputs.defined() || task.inputs.dim() != 4 ||
        task.inputs.size(0) == 0 ||
        std::vector<int64_t>(task.inputs.sizes().begin() + 1,
                             task.inputs.sizes().end()) != input_shape) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task \"", task.name, "\": calibration inputs must be non-empty [N, ",
          absl::StrJoin(input_shape, ", "), "]"));
    }
    TaskState ts;
    ts.name = task.name;
    ASSIGN_OR_RETURN(
        Head head,
        HeadFromTensors(merged, absl::StrCat(task.name, "/", kHeadPrefix)));
    ts.head = {head.weight.to(state->device), head.bias.to(state->device)};
    if (ts.head.weight.size(1) != state->model->FeatureDim()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "head of task \"", task.name, "\" expects ", ts.head.weight.size(1),
          " features; the architecture gives ", state->model->FeatureDim()));
    }
    // LoadBackbone checks names and shapes; θm goes back in right after.
    auto backbone = [&](const NamedTensors& tensors, absl::string_view what)
        -> absl::StatusOr<std::vector<torch::Tensor>> {
      absl::Status loaded = state->model->LoadBackbone(tensors);
      if (!loaded.ok()) {
        return absl::Status(loaded.code(),
                            absl::StrCat("task \"", task.name, "\": ", what,
                                         ": ", loaded.message()));
      }
      std::vector<torch::Tensor> values;
      for (const torch::Tensor& leaf : state->model->ParameterTensors()) {
        values.push_back(leaf.detach().to(state->device).contiguous());
      }
      RETURN_IF_ERROR(state->InstallBackbone(state->merged));
      return values;
    };
    if (options.triggers.scan_own_model && !task.own_model.empty()) {
      ASSIGN_OR_RETURN(ts.own_model, backbone(task.own_model, "own model"));
      if (options.triggers.differential_gate && !task.base_model.empty()) {
        ASSIGN_OR_RETURN(ts.base_model,
                         backbone(task.base_model, "base model"));
      }
    }
    ts.inputs = task.inputs.to(torch::kFloat32).to(state->device).contiguous();
    ts.labeled = options.use_labels && task.labels.defined();
    if (task.labels.defined()) {
      if (task.labels.dim() != 1 ||
          task.labels.size(0) != task.inputs.size(0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "task \"", task.name,
            "\": labels must be [N] with N = ", task.inputs.size(0)));
      }
      if (task.labels.min().item<int64_t>() < 0 ||
          task.labels.max().item<int64_t>() >= ts.head.NumClasses()) {
        return absl::InvalidArgumentError(
            absl::StrCat("task \"", task.name, "\": labels must be in [0, ",
                         ts.head.NumClasses(), ")"));
      }
    }
    if (task.known_trigger.has_value()) {
      absl::StatusOr<SurrogateTriggers> known =
          KnownTriggers(*task.known_trigger, input_shape, ts.head.NumClasses(),
                        state->device);
      if (!known.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("task \"", task.name,
                         "\": known trigger: ", known.status().message()));
      }
      ts.triggers = std::move(*known);
      ts.known = true;
    }
    // θm's outputs on the whole set, once: the KL and CTL targets.
    std::vector<torch::Tensor> features;
    const int64_t n = ts.inputs.size(0);
    for (int64_t begin = 0; begin < n; begin += 256) {
      ASSIGN_OR_RETURN(torch::Tensor f,
                       state->model->Features(ts.inputs.slice(
                           0, begin, std::min(n, begin + 256))));
      features.push_back(f);
    }
    ts.merged_features = torch::cat(features, 0);
    torch::Tensor logits = ts.head.Logits(ts.merged_features);
    ts.merged_log_probs = torch::log_softmax(logits, 1);
    ts.labels = ts.labeled ? task.labels.to(torch::kInt64).to(state->device)
                           : logits.argmax(1);
    ts.feature_scale =
        std::max(1e-12, ts.merged_features.pow(2).sum(1).mean().item<double>());
    state->tasks.push_back(std::move(ts));
  }
  return state;
}

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
      .count();
}

// PathCurve evaluates L(α) and trigger success at the report's alphas on
// the first `report_examples` inputs per task.
absl::StatusOr<std::vector<LfpmPathPoint>> PathCurve(
    LfpmProblemForTesting::State& state,
    std::vector<LfpmTriggerReport>* triggers) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> batch;
  for (const TaskState& task : state.tasks) {
    batch.push_back(torch::arange(
        std::min(state.options.report_examples, task.inputs.size(0)),
        torch::TensorOptions(torch::kInt64).device(state.device)));
  }
  ASSIGN_OR_RETURN(std::vector<torch::Tensor> endpoint, state.Endpoint(batch));
  std::vector<LfpmPathPoint> curve;
  for (double alpha : kReportAlphas) {
    ASSIGN_OR_RETURN(LossParts parts,
                     state.Loss(alpha, batch, endpoint, /*gated=*/false));
    LfpmPathPoint point;
    point.alpha = alpha;
    point.loss = parts.total.item<double>();
    point.clean_loss = parts.clean;
    point.backdoor_loss = parts.backdoor;
    point.ctl_loss = parts.ctl;
    for (size_t i = 0; i < state.tasks.size(); ++i) {
      TaskState& task = state.tasks[i];
      ASSIGN_OR_RETURN(
          std::vector<double> success,
          state.Success(task, task.triggers, state.options.report_examples));
      const double best = *std::max_element(success.begin(), success.end());
      point.task_asr.push_back(best);
      point.asr += best / static_cast<double>(state.tasks.size());
      if (alpha == 0.0) (*triggers)[i].asr_merged = success;
      if (alpha == 1.0) (*triggers)[i].asr_repaired = success;
    }
    curve.push_back(std::move(point));
  }
  return curve;
}

absl::StatusOr<LfpmResult> Run(const Model& architecture,
                               const NamedTensors& merged,
                               const std::vector<LfpmTask>& tasks,
                               const LfpmOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(auto state,
                   CreateState(architecture, merged, tasks, options));
  LfpmResult result;
  LfpmReport& report = result.report;
  report.mode = options.mode;
  report.adapted_tensors = static_cast<int64_t>(state->adapted.size());
  for (const torch::Tensor& leaf : state->Trainable()) {
    report.trainable_parameters += leaf.numel();
  }

  // Scan θm (τab = 0 everywhere on the path), or each task's own model,
  // and seed the repair triggers.
  for (TaskState& task : state->tasks) {
    ASSIGN_OR_RETURN(auto scan, state->InitialScan(task));
    LfpmAnomaly& anomaly = scan.first;
    if (task.known) {
      // The caller's trigger stays; the scan only feeds the report.
    } else if (options.triggers.targeting == TriggerTargeting::kEasiestClass) {
      std::vector<int64_t> targets =
          state->EasiestClasses(anomaly, options.triggers.targets_per_task);
      // Pinned copies follow the online triggers: same classes, same start.
      const int64_t online = static_cast<int64_t>(targets.size());
      if (options.triggers.pin_scan_trigger) {
        for (int64_t j = 0; j < online; ++j) targets.push_back(targets[j]);
      }
      task.triggers = state->SelectTriggers(scan.second, std::move(targets));
      for (int64_t j = online; j < task.triggers.size(); ++j) {
        task.triggers.pinned[j] = true;
      }
    } else {
      task.triggers = state->NewTriggers({-1});
      RETURN_IF_ERROR(state->Mine(task, task.triggers,
                                  options.triggers.scan_steps,
                                  options.batch_size));
    }
    // With fewer than 3 classes there is no index to gate on.
    const double index = task.base_model.empty() ? anomaly.anomaly_index
                                                 : anomaly.differential_index;
    const double max_ratio = options.triggers.differential_max_ratio;
    if (!task.base_model.empty() && max_ratio > 0.0) {
      task.unlearn = task.known || anomaly.differential_ratio <= max_ratio;
    } else {
      task.unlearn = task.known || options.triggers.anomaly_gate <= 0.0 ||
                     anomaly.class_norms.size() < 3 ||
                     index > options.triggers.anomaly_gate;
    }
    // InitialScan left the scanned model installed: dropout refinement and
    // the restarts run where the scan's trigger was mined.
    if (task.unlearn && !task.known &&
        options.triggers.targeting == TriggerTargeting::kEasiestClass) {
      RETURN_IF_ERROR(state->DropoutRefine(task));
      RETURN_IF_ERROR(state->AddRestarts(task));
      RETURN_IF_ERROR(state->AddWindowTriggers(task));
    }
    report.anomaly_merged.push_back(std::move(anomaly));
  }
  // The gate before the first step, on θm (τab = 0); a trigger mined on its
  // task's own model is gated there: it stands for that task's backdoor,
  // which the merge may carry only in part, so its reach on θm says little.
  int64_t active = 0;
  for (TaskState& task : state->tasks) {
    RETURN_IF_ERROR(state->InstallForScan(task));
    ASSIGN_OR_RETURN(int64_t count, state->Gate(task));
    active += count;
  }
  // Every parameter back to θm: the steps install only the adapted ones.
  RETURN_IF_ERROR(state->InstallBackbone(state->merged));
  // Own-model triggers refined against θm; the reach gate stays the own
  // model's, and pinned copies are not mined.
  if (options.triggers.merge_refine_steps > 0) {
    for (TaskState& task : state->tasks) {
      if (task.known || task.own_model.empty() || !task.unlearn) continue;
      RETURN_IF_ERROR(state->Mine(task, task.triggers,
                                  options.triggers.merge_refine_steps,
                                  options.batch_size));
    }
  }
  report.scan_seconds = Seconds(start);

  std::vector<torch::Tensor> leaves = state->Trainable();
  torch::optim::Adam optimizer(
      leaves, torch::optim::AdamOptions(LfpmEffectiveLearningRate(options)));
  const auto loop_start = std::chrono::steady_clock::now();
  for (int64_t step = 1; step <= options.steps; ++step) {
    RETURN_IF_ERROR(state->Check());
    const bool update_step =
        step > 1 && (step - 1) % options.triggers.update_every == 0;
    // Mining, the gate and the window refresh all read θ(trigger_alpha),
    // detached; none of them changes the installed weights.
    if (update_step && (options.triggers.steps_per_update > 0 ||
                        options.triggers.window_refresh_steps > 0)) {
      RETURN_IF_ERROR(state->InstallDetached(options.triggers.trigger_alpha));
    }
    if (update_step && options.triggers.steps_per_update > 0) {
      active = 0;
      for (TaskState& task : state->tasks) {
        if (!task.unlearn) continue;
        if (!task.known) {
          RETURN_IF_ERROR(state->Mine(task, task.triggers,
                                      options.triggers.steps_per_update,
                                      options.batch_size));
        }
        ASSIGN_OR_RETURN(int64_t count, state->Gate(task));
        active += count;
      }
    }
    // Windows are pinned, so neither the mining above nor the reach gate
    // touches them; their refresh is its own pass.
    if (update_step && options.triggers.window_refresh_steps > 0) {
      for (TaskState& task : state->tasks) {
        if (!task.unlearn || task.known) continue;
        RETURN_IF_ERROR(state->RefreshWindows(task));
      }
    }
    report.active_triggers.push_back(active);
    std::vector<torch::Tensor> batch;
    for (const TaskState& task : state->tasks) {
      batch.push_back(state->Sample(task.inputs.size(0), options.batch_size));
    }
    std::vector<double> alphas = state->Nodes();
    ASSIGN_OR_RETURN(LossParts parts,
                     state->AccumulateGradients(alphas, batch));
    for (auto& group : optimizer.param_groups()) {
      static_cast<torch::optim::AdamOptions&>(group.options())
          .lr(LfpmLearningRateAt(options, step));
    }
    optimizer.step();
    const double loss =
        parts.clean + options.beta * parts.backdoor + options.gamma * parts.ctl;
    report.loss_curve.push_back(loss);
    report.clean_loss_curve.push_back(parts.clean);
    report.backdoor_loss_curve.push_back(parts.backdoor);
    report.ctl_loss_curve.push_back(parts.ctl);
    report.tau_norm_curve.push_back(state->TauNorm());
    if (options.on_progress) {
      LfpmProgress progress;
      progress.step = step;
      progress.steps = options.steps;
      progress.loss = loss;
      progress.clean_loss = parts.clean;
      progress.backdoor_loss = parts.backdoor;
      progress.ctl_loss = parts.ctl;
      progress.elapsed_seconds = Seconds(start);
      options.on_progress(progress);
    }
  }
  report.steps = options.steps;
  report.seconds_per_step =
      options.steps > 0 ? Seconds(loop_start) / options.steps : 0.0;

  // Report: triggers, path curve, norms, rescan.
  for (const TaskState& task : state->tasks) {
    LfpmTriggerReport t;
    t.task = task.name;
    t.targets = task.triggers.targets;
    t.masks = torch::sigmoid(task.triggers.mask_logits).detach().cpu();
    t.patterns = torch::sigmoid(task.triggers.pattern_logits).detach().cpu();
    torch::Tensor norms = t.masks.sum({1, 2, 3});
    const int64_t height = t.masks.size(2);
    const int64_t width = t.masks.size(3);
    torch::Tensor rows = torch::arange(height, torch::kFloat32).view({-1, 1});
    torch::Tensor cols = torch::arange(width, torch::kFloat32).view({1, -1});
    for (int64_t j = 0; j < norms.size(0); ++j) {
      const double norm = norms[j].item<double>();
      t.mask_l1.push_back(norm);
      torch::Tensor mask = t.masks[j][0];
      const double denominator = std::max(norm, 1e-12);
      t.mask_centroid.push_back(
          {(mask * rows).sum().item<double>() / denominator,
           (mask * cols).sum().item<double>() / denominator});
    }
    report.triggers.push_back(std::move(t));
  }
  ASSIGN_OR_RETURN(report.path, PathCurve(*state, &report.triggers));
  if (options.triggers.rescan_after) {
    RETURN_IF_ERROR(state->InstallDetached(1.0));
    for (TaskState& task : state->tasks) {
      ASSIGN_OR_RETURN(auto scan, state->Scan(task));
      report.anomaly_repaired.push_back(std::move(scan.first));
    }
  }

  torch::NoGradGuard no_grad;
  double merged_sq = 0.0;
  std::set<std::string> adapted_names;
  for (const AdaptedTensor& t : state->adapted) {
    torch::Tensor tau = state->Tau(t).detach().to(torch::kCPU).contiguous();
    merged_sq += state->merged[t.parameter].pow(2).sum().item<double>();
    result.tau.emplace_back(t.name, tau);
    adapted_names.insert(t.name);
  }
  report.tau_norm = state->TauNorm();
  report.merged_norm = std::sqrt(merged_sq);
  // The repaired model: merged keys in their order and dtype, with τab
  // added to the adapted backbone tensors.
  std::map<std::string, const torch::Tensor*> tau_by_name;
  for (const auto& [name, tau] : result.tau) tau_by_name[name] = &tau;
  for (const auto& [name, tensor] : merged) {
    auto it = tau_by_name.find(name);
    if (it == tau_by_name.end()) {
      result.repaired.emplace_back(name, tensor);
      continue;
    }
    result.repaired.emplace_back(name,
                                 (tensor.to(torch::kFloat32) + *it->second)
                                     .to(tensor.scalar_type())
                                     .contiguous());
  }
  report.seconds = Seconds(start);
  return result;
}

}  // namespace

std::vector<double> StratifiedNodesForTesting(int64_t nodes, uint64_t seed) {
  LfpmProblemForTesting::State state;
  state.options.path_nodes = nodes;
  state.generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return state.Nodes();
}

absl::StatusOr<std::unique_ptr<LfpmProblemForTesting>>
LfpmProblemForTesting::Create(const Model& architecture,
                              const NamedTensors& merged,
                              const std::vector<LfpmTask>& tasks,
                              const LfpmOptions& options) {
  return CallTorch(
      "LFPM", [&]() -> absl::StatusOr<std::unique_ptr<LfpmProblemForTesting>> {
        ASSIGN_OR_RETURN(auto state,
                         CreateState(architecture, merged, tasks, options));
        for (TaskState& task : state->tasks) {
          if (!task.known) task.triggers = state->NewTriggers({-1});
        }
        return std::unique_ptr<LfpmProblemForTesting>(
            new LfpmProblemForTesting(std::move(state)));
      });
}

std::vector<torch::Tensor> LfpmProblemForTesting::Trainable() const {
  return state_->Trainable();
}

absl::StatusOr<NamedTensors> LfpmProblemForTesting::Tau() const {
  return CallTorch("LFPM", [&]() -> absl::StatusOr<NamedTensors> {
    torch::NoGradGuard no_grad;
    NamedTensors tau;
    for (const AdaptedTensor& t : state_->adapted) {
      tau.emplace_back(t.name, state_->Tau(t).detach().cpu());
    }
    return tau;
  });
}

namespace {
std::vector<torch::Tensor> FixedBatch(const LfpmProblemForTesting::State& s) {
  std::vector<torch::Tensor> batch;
  for (const TaskState& task : s.tasks) {
    batch.push_back(
        torch::arange(std::min(s.options.batch_size, task.inputs.size(0)),
                      torch::TensorOptions(torch::kInt64).device(s.device)));
  }
  return batch;
}
}  // namespace

absl::StatusOr<torch::Tensor> LfpmProblemForTesting::LossAt(double alpha) {
  return CallTorch("LFPM", [&]() -> absl::StatusOr<torch::Tensor> {
    std::vector<torch::Tensor> batch = FixedBatch(*state_);
    ASSIGN_OR_RETURN(
        std::vector<torch::Tensor> endpoint,
        state_->Endpoint(batch, state_->options.ctl_endpoint_gradient));
    ASSIGN_OR_RETURN(LossParts parts, state_->Loss(alpha, batch, endpoint));
    return parts.total;
  });
}

absl::Status LfpmProblemForTesting::AccumulateGradients(
    const std::vector<double>& alphas) {
  return CallTorch("LFPM", [&]() -> absl::Status {
    return state_->AccumulateGradients(alphas, FixedBatch(*state_)).status();
  });
}

absl::StatusOr<torch::Tensor> LfpmProblemForTesting::Features(
    double alpha, const torch::Tensor& inputs) {
  return CallTorch("LFPM", [&]() -> absl::StatusOr<torch::Tensor> {
    torch::NoGradGuard no_grad;
    RETURN_IF_ERROR(state_->Install(alpha));
    return state_->model->Features(inputs.to(state_->device));
  });
}

}  // namespace lfpm_internal

absl::Status ValidateLfpmOptions(const LfpmOptions& options) {
  return lfpm_internal::ValidateOptions(options);
}

absl::StatusOr<LfpmResult> RunLfpm(const Model& architecture,
                                   const NamedTensors& merged,
                                   const std::vector<LfpmTask>& tasks,
                                   const LfpmOptions& options) {
  return CallTorch("LFPM", [&]() -> absl::StatusOr<LfpmResult> {
    return lfpm_internal::Run(architecture, merged, tasks, options);
  });
}

absl::StatusOr<std::vector<LfpmTaskScan>> ScanLfpmTasks(
    const Model& architecture, const NamedTensors& model,
    const std::vector<LfpmTask>& tasks, const LfpmOptions& options) {
  return CallTorch(
      "LFPM scan", [&]() -> absl::StatusOr<std::vector<LfpmTaskScan>> {
        ASSIGN_OR_RETURN(auto state, lfpm_internal::CreateState(
                                         architecture, model, tasks, options));
        std::vector<LfpmTaskScan> scans;
        for (lfpm_internal::TaskState& task : state->tasks) {
          ASSIGN_OR_RETURN(auto scan, state->InitialScan(task));
          LfpmTaskScan out;
          out.easiest_class = state->EasiestClasses(scan.first, 1).front();
          lfpm_internal::SurrogateTriggers found =
              state->SelectTriggers(scan.second, {out.easiest_class});
          // As in Run: an own-model trigger refined against the model given.
          const int64_t refine = options.triggers.merge_refine_steps;
          if (refine > 0 && !task.own_model.empty()) {
            RETURN_IF_ERROR(state->InstallBackbone(state->merged));
            RETURN_IF_ERROR(
                state->Mine(task, found, refine, options.batch_size));
          }
          torch::NoGradGuard no_grad;
          out.trigger.mask = torch::sigmoid(found.mask_logits[0]).cpu();
          out.trigger.pattern = torch::sigmoid(found.pattern_logits[0]).cpu();
          out.anomaly = std::move(scan.first);
          scans.push_back(std::move(out));
        }
        return scans;
      });
}

absl::StatusOr<std::vector<double>> ProbeTriggerReach(
    const Model& architecture, const NamedTensors& model,
    const std::vector<LfpmTask>& tasks,
    const std::vector<LfpmTriggerProbe>& probes, int64_t steps,
    const LfpmOptions& options) {
  if (probes.size() != tasks.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("trigger probe: ", probes.size(), " probes for ",
                     tasks.size(), " tasks; give one per task"));
  }
  if (steps < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("trigger probe: steps must be >= 0; got ", steps));
  }
  return CallTorch(
      "LFPM trigger probe", [&]() -> absl::StatusOr<std::vector<double>> {
        ASSIGN_OR_RETURN(auto state, lfpm_internal::CreateState(
                                         architecture, model, tasks, options));
        RETURN_IF_ERROR(state->InstallBackbone(state->merged));
        std::vector<double> reach;
        for (size_t i = 0; i < state->tasks.size(); ++i) {
          lfpm_internal::TaskState& task = state->tasks[i];
          const int64_t target = probes[i].target;
          if (target < 0 || target >= task.head.NumClasses()) {
            return absl::InvalidArgumentError(absl::StrCat(
                "trigger probe for task \"", task.name, "\": target ",
                target, " is not a class in [0, ", task.head.NumClasses(),
                ")"));
          }
          lfpm_internal::SurrogateTriggers trigger =
              lfpm_internal::TriggerFromStamp(probes[i].trigger, target,
                                              state->device);
          trigger.mask_logits.requires_grad_(true);
          trigger.pattern_logits.requires_grad_(true);
          state->ResetTriggerOptimizer(trigger);
          // Only the pattern adapts: the footprint stays the probe's, so a
          // model is not judged by a patch grown until anything flips.
          lfpm_internal::LfpmProblemForTesting::State::MiningTerms terms(
              options.triggers.mask_l1_weight, &state->generator);
          terms.freeze_masks = true;
          RETURN_IF_ERROR(state->Mine(task, trigger, steps,
                                      options.triggers.scan_batch_size,
                                      &terms));
          ASSIGN_OR_RETURN(std::vector<double> success,
                           state->Success(task, trigger,
                                          options.report_examples));
          reach.push_back(success.front());
        }
        return reach;
      });
}

// ---------------------------------------------------------------------------
// JSON and files.

namespace {

json AnomalyJson(const std::vector<LfpmAnomaly>& anomalies) {
  json out = json::array();
  for (const LfpmAnomaly& a : anomalies) {
    out.push_back({{"task", a.task},
                   {"class_norms", a.class_norms},
                   {"class_reach", a.class_reach},
                   {"smallest_class", a.smallest_class},
                   {"anomaly_index", a.anomaly_index},
                   {"suspicious", a.suspicious},
                   {"own_model", a.own_model},
                   {"base_class_norms", a.base_class_norms},
                   {"differential_index", a.differential_index},
                   {"differential_class", a.differential_class},
                   {"differential_ratio", a.differential_ratio}});
  }
  return out;
}

json ReportJson(const LfpmReport& report) {
  json path = json::array();
  for (const LfpmPathPoint& p : report.path) {
    path.push_back({{"alpha", p.alpha},
                    {"loss", p.loss},
                    {"clean_loss", p.clean_loss},
                    {"backdoor_loss", p.backdoor_loss},
                    {"ctl_loss", p.ctl_loss},
                    {"asr", p.asr},
                    {"task_asr", p.task_asr}});
  }
  json triggers = json::array();
  for (const LfpmTriggerReport& t : report.triggers) {
    triggers.push_back({{"task", t.task},
                        {"targets", t.targets},
                        {"mask_l1", t.mask_l1},
                        {"mask_centroid", t.mask_centroid},
                        {"asr_merged", t.asr_merged},
                        {"asr_repaired", t.asr_repaired}});
  }
  return {{"mode", std::string(LfpmModeName(report.mode))},
          {"steps", report.steps},
          {"trainable_parameters", report.trainable_parameters},
          {"adapted_tensors", report.adapted_tensors},
          {"seconds", report.seconds},
          {"seconds_per_step", report.seconds_per_step},
          {"scan_seconds", report.scan_seconds},
          {"tau_norm", report.tau_norm},
          {"merged_norm", report.merged_norm},
          {"path", path},
          {"triggers", triggers},
          {"anomaly_threshold", kLfpmAnomalyThreshold},
          {"anomaly_merged", AnomalyJson(report.anomaly_merged)},
          {"anomaly_repaired", AnomalyJson(report.anomaly_repaired)},
          {"loss_curve", report.loss_curve},
          {"clean_loss_curve", report.clean_loss_curve},
          {"backdoor_loss_curve", report.backdoor_loss_curve},
          {"ctl_loss_curve", report.ctl_loss_curve},
          {"tau_norm_curve", report.tau_norm_curve},
          {"active_triggers", report.active_triggers}};
}

json OptionsJson(const LfpmOptions& o) {
  const LfpmTriggerOptions& t = o.triggers;
  return {{"mode", std::string(LfpmModeName(o.mode))},
          {"layer_prefixes", o.layer_prefixes},
          {"lora_rank", o.lora_rank},
          {"lora_alpha", o.lora_alpha},
          {"peft_dense_vectors", o.peft_dense_vectors},
          {"beta", o.beta},
          {"gamma", o.gamma},
          {"ctl_path_weight", o.ctl_path_weight},
          {"ctl_endpoint_gradient", o.ctl_endpoint_gradient},
          {"path_nodes", o.path_nodes},
          {"steps", o.steps},
          {"learning_rate", LfpmEffectiveLearningRate(o)},
          {"learning_rate_schedule",
           std::string(LearningRateScheduleName(o.learning_rate_schedule))},
          {"batch_size", o.batch_size},
          {"use_labels", o.use_labels},
          {"target_hold_weight", o.target_hold_weight},
          {"device", o.device},
          {"seed", o.seed},
          {"threads", o.threads},
          {"report_examples", o.report_examples},
          {"triggers",
           {{"targeting", std::string(TriggerTargetingName(t.targeting))},
            {"targets_per_task", t.targets_per_task},
            {"scan_steps", t.scan_steps},
            {"scan_batch_size", t.scan_batch_size},
            {"reach_threshold", t.reach_threshold},
            {"anomaly_gate", t.anomaly_gate},
            {"update_every", t.update_every},
            {"steps_per_update", t.steps_per_update},
            {"trigger_alpha", t.trigger_alpha},
            {"learning_rate", t.learning_rate},
            {"mask_l1_weight", t.mask_l1_weight},
            {"initial_mask_logit", t.initial_mask_logit},
            {"rescan_after", t.rescan_after},
            {"pin_scan_trigger", t.pin_scan_trigger},
            {"restarts_per_target", t.restarts_per_target},
            {"restart_overlap_weight", t.restart_overlap_weight},
            {"restart_mask_l1_scale", t.restart_mask_l1_scale},
            {"dropout_refine_steps", t.dropout_refine_steps},
            {"mask_dropout", t.mask_dropout},
            {"dropout_base_weight", t.dropout_base_weight},
            {"window_steps", t.window_steps},
            {"window_margin", t.window_margin},
            {"window_placement",
             std::string(WindowPlacementName(t.window_placement))},
            {"window_refresh_steps", t.window_refresh_steps},
            {"windows_per_class", t.windows_per_class},
            {"scan_own_model", t.scan_own_model},
            {"merge_refine_steps", t.merge_refine_steps},
            {"differential_gate", t.differential_gate},
            {"differential_max_ratio", t.differential_max_ratio}}}};
}

const torch::Tensor* FindTensor(const NamedTensors& tensors,
                                absl::string_view name) {
  for (const auto& [key, tensor] : tensors) {
    if (key == name) return &tensor;
  }
  return nullptr;
}

// DigestEntry returns {"role", "path", "sha256"} for a provenance list.
absl::StatusOr<json> DigestEntry(const std::string& role,
                                 const std::string& path) {
  ASSIGN_OR_RETURN(std::string digest, Sha256File(path));
  return json{{"role", role}, {"path", path}, {"sha256", digest}};
}

// RemoveOnFailure deletes the listed outputs unless Keep() was called.
class RemoveOnFailure {
 public:
  explicit RemoveOnFailure(std::vector<std::string> paths)
      : paths_(std::move(paths)) {}
  ~RemoveOnFailure() {
    if (keep_) return;
    for (const std::string& path : paths_) {
      std::error_code error;
      if (!path.empty()) std::filesystem::remove_all(path, error);
    }
  }
  void Keep() { keep_ = true; }

 private:
  std::vector<std::string> paths_;
  bool keep_ = false;
};

}  // namespace

std::string LfpmReportToJson(const LfpmReport& report) {
  return ReportJson(report).dump(2);
}

std::string LfpmOptionsToJson(const LfpmOptions& options) {
  return OptionsJson(options).dump();
}

absl::StatusOr<LfpmTask> LoadLfpmCalibration(const LfpmCalibrationFile& file) {
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(file.path));
  return CallTorch("LoadLfpmCalibration", [&]() -> absl::StatusOr<LfpmTask> {
    const torch::Tensor* inputs = FindTensor(tensors, "inputs");
    const torch::Tensor* labels = FindTensor(tensors, "labels");
    if (inputs == nullptr || inputs->dim() != 4 ||
        (inputs->scalar_type() != torch::kFloat32 &&
         inputs->scalar_type() != torch::kUInt8)) {
      return absl::InvalidArgumentError(
          absl::StrCat(file.path,
                       ": a calibration set needs \"inputs\" float32 or uint8 "
                       "[N, C, H, W]"));
    }
    LfpmTask task;
    task.name = file.task;
    task.inputs = inputs->scalar_type() == torch::kUInt8
                      ? inputs->to(torch::kFloat32).div_(255.0)
                      : inputs->clone();
    if (labels != nullptr) {
      if (labels->dim() != 1 || labels->scalar_type() != torch::kInt64 ||
          labels->size(0) != inputs->size(0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            file.path,
            ": \"labels\" must be int64 [N] with N = ", inputs->size(0)));
      }
      task.labels = labels->clone();
    }
    return task;
  });
}

absl::StatusOr<LfpmReport> RunLfpmJob(const LfpmJob& job,
                                      const LfpmOptions& options) {
  if (job.output_path.empty()) {
    return absl::InvalidArgumentError("LFPM job needs an output path");
  }
  const bool from_merged = !job.merged_model_path.empty();
  const bool from_tasks = !job.base_path.empty() || !job.task_models.empty();
  if (from_merged == from_tasks) {
    return absl::InvalidArgumentError(
        "LFPM job needs either a merged model or a base plus task models");
  }
  if (from_tasks && (job.base_path.empty() || job.task_models.empty())) {
    return absl::InvalidArgumentError(
        "LFPM job from task models needs the base and at least one task");
  }
  if (job.calibration.empty()) {
    return absl::InvalidArgumentError(
        "LFPM job needs a calibration set per task");
  }
  // Checked before the TA merge and the loads, which it would waste.
  for (const auto& [name, known] : job.known_triggers) {
    if (std::none_of(job.calibration.begin(), job.calibration.end(),
                     [&](const LfpmCalibrationFile& file) {
                       return file.task == name;
                     })) {
      return absl::InvalidArgumentError(absl::StrCat(
          "known trigger for \"", name, "\", which has no calibration set"));
    }
  }
  RemoveOnFailure cleanup(
      {job.output_path, job.tau_output_path, job.report_path});

  json inputs = json::array();
  ASSIGN_OR_RETURN(json arch_entry,
                   DigestEntry("architecture", job.architecture_path));
  inputs.push_back(arch_entry);
  std::string merged_path = job.merged_model_path;
  const std::string ta_path =
      from_tasks ? absl::StrCat(job.output_path, ".ta.safetensors") : "";
  // The TA merge is an intermediate: removed whatever happens.
  RemoveOnFailure remove_ta({ta_path});
  if (from_tasks) {
    MergeOptions merge_options = job.ta_merge;
    merge_options.method = MergeMethod::kTaskArithmetic;
    merge_options.is_cancelled = options.is_cancelled;
    RETURN_IF_ERROR(
        Merge(job.base_path, job.task_models, ta_path, merge_options).status());
    merged_path = ta_path;
    ASSIGN_OR_RETURN(json base_entry, DigestEntry("base", job.base_path));
    inputs.push_back(base_entry);
    for (const MergeInput& input : job.task_models) {
      if (std::filesystem::is_regular_file(input.path)) {
        ASSIGN_OR_RETURN(json entry,
                         DigestEntry("task:" + input.name, input.path));
        inputs.push_back(entry);
      } else {
        inputs.push_back(
            {{"role", "task:" + input.name}, {"path", input.path}});
      }
    }
  } else {
    ASSIGN_OR_RETURN(json entry, DigestEntry("merged", merged_path));
    inputs.push_back(entry);
  }
  absl::StatusOr<NamedTensors> merged = LoadTensorsFromPath(merged_path);
  if (!merged.ok()) return merged.status();

  // Each task's own model, for the scan: the task-arithmetic merge of the
  // base and that task alone at lambda 1, which handles every task format
  // the merge reads (full checkpoints, task vectors, LoRA adapters).
  std::map<std::string, NamedTensors> own_models;
  if (from_tasks && options.triggers.scan_own_model) {
    const std::string own_path =
        absl::StrCat(job.output_path, ".own.safetensors");
    RemoveOnFailure remove_own({own_path});
    for (const MergeInput& input : job.task_models) {
      MergeOptions own_options = job.ta_merge;
      own_options.method = MergeMethod::kTaskArithmetic;
      own_options.lambda = 1.0;
      own_options.is_cancelled = options.is_cancelled;
      RETURN_IF_ERROR(
          Merge(job.base_path, {input}, own_path, own_options).status());
      ASSIGN_OR_RETURN(own_models[input.name], LoadTensorsFromPath(own_path));
    }
  }
  // The base, for the differential gate.
  NamedTensors base_model;
  if (from_tasks && options.triggers.scan_own_model &&
      options.triggers.differential_gate) {
    ASSIGN_OR_RETURN(base_model, LoadTensorsFromPath(job.base_path));
  }

  std::vector<LfpmTask> tasks;
  json known_triggers = json::array();
  for (const LfpmCalibrationFile& file : job.calibration) {
    ASSIGN_OR_RETURN(LfpmTask task, LoadLfpmCalibration(file));
    auto own = own_models.find(file.task);
    if (own != own_models.end()) task.own_model = std::move(own->second);
    if (own != own_models.end()) task.base_model = base_model;
    auto known = job.known_triggers.find(file.task);
    if (known != job.known_triggers.end()) {
      task.known_trigger = known->second;
      known_triggers.push_back(
          {{"task", file.task},
           {"kind", std::string(TriggerKindName(known->second.trigger.kind))},
           {"target", known->second.target}});
    }
    tasks.push_back(std::move(task));
    ASSIGN_OR_RETURN(json entry,
                     DigestEntry("calibration:" + file.task, file.path));
    inputs.push_back(entry);
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Model> architecture,
                   Model::Load(job.architecture_path));
  ASSIGN_OR_RETURN(LfpmResult result,
                   RunLfpm(*architecture, *merged, tasks, options));

  std::map<std::string, std::string> metadata;
  metadata["mergeguard.method"] = "lfpm";
  metadata["mergeguard.options"] = LfpmOptionsToJson(options);
  metadata["mergeguard.inputs"] = inputs.dump();
  metadata["mergeguard.version"] = std::string(MergeguardVersion());
  if (from_tasks) {
    metadata["mergeguard.lfpm.merged_by"] = "task_arithmetic";
  }
  if (!known_triggers.empty()) {
    metadata["mergeguard.lfpm.known_triggers"] = known_triggers.dump();
  }
  json summary = {{"tau_norm", result.report.tau_norm},
                  {"seconds", result.report.seconds}};
  if (!result.report.path.empty()) {
    summary["mined_asr_merged"] = result.report.path.front().asr;
    summary["mined_asr_repaired"] = result.report.path.back().asr;
  }
  metadata["mergeguard.lfpm.summary"] = summary.dump();
  for (const auto& [key, value] : options.metadata) metadata[key] = value;
  RETURN_IF_ERROR(SaveTensors(job.output_path, result.repaired, metadata));
  if (!job.tau_output_path.empty()) {
    std::map<std::string, std::string> tau_metadata = metadata;
    tau_metadata["mergeguard.lfpm.content"] = "tau_ab";
    RETURN_IF_ERROR(SaveTensors(job.tau_output_path, result.tau, tau_metadata));
  }
  if (!job.report_path.empty()) {
    RETURN_IF_ERROR(
        WriteFileAtomically(job.report_path, LfpmReportToJson(result.report)));
  }
  cleanup.Keep();
  return result.report;
}

}  // namespace mergeguard
