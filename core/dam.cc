#include "core/dam.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <optional>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/defense_json.h"
#include "core/lfpm.h"
#include "core/status_macros.h"
#include "core/torch_status.h"
#include "core/version.h"

namespace mergeguard {
namespace {

using json = nlohmann::json;

json OptionsJson(const DamOptions& options) {
  json out = {
      {"granularity", std::string(LambdaGranularityName(options.granularity))},
      {"initial_lambda", options.initial_lambda},
      {"steps", options.steps},
      {"lambda_learning_rate", options.lambda_learning_rate},
      {"reset_lambda_each_step", options.reset_lambda_each_step},
      {"mask_learning_rate", options.mask_learning_rate},
      {"detection_mask_learning_rate", options.detection_mask_learning_rate},
      {"ties_pretrim_percent", options.ties_pretrim_percent},
      {"ties_pretrim_select", options.ties_pretrim_select},
      {"pretrim_select_control_classes",
       options.pretrim_select_control_classes},
      {"pretrim_select_max_ratio", options.pretrim_select_max_ratio},
      {"mask_optimizer",
       std::string(MaskOptimizerName(options.mask_optimizer))},
      {"initial_mask_logit", options.initial_mask_logit},
      {"temperature", options.temperature},
      {"trigger_shape", std::string(TriggerShapeName(options.trigger_shape))},
      {"trigger_learning_rate", options.trigger_learning_rate},
      {"trigger_epsilon", options.trigger_epsilon},
      {"patch_mask_l1_weight", options.patch_mask_l1_weight},
      {"beta", options.beta},
      {"backdoor_loss", std::string(BackdoorLossName(options.backdoor_loss))},
      {"detection_clean_loss",
       std::string(DetectionCleanLossName(options.detection_clean_loss))},
      {"final_mask", std::string(FinalMaskModeName(options.final_mask))},
      {"hard_mask_margin", options.hard_mask_margin},
      {"adamerging_steps", options.adamerging_steps},
      {"adamerging_learning_rate", options.adamerging_learning_rate},
      {"adamerging_from_meta_lambda", options.adamerging_from_meta_lambda},
      {"batch_size", options.batch_size},
      {"seed", options.seed},
      {"device", options.device},
  };
  if (options.trigger_source != DamTriggerSource::kSynthesized) {
    out["trigger_source"] =
        std::string(DamTriggerSourceName(options.trigger_source));
    out["scan_steps"] = options.scan_steps;
    out["scan_own_model"] = options.scan_own_model;
    out["scan_merge_refine_steps"] = options.scan_merge_refine_steps;
    out["scan_differential"] = options.scan_differential;
  }
  // Only when given, so that ordinary runs' provenance is unchanged.
  if (!options.known_triggers.empty()) {
    json known = json::array();
    for (const auto& [task, trigger] : options.known_triggers) {
      known.push_back({{"task", task},
                       {"kind", std::string(TriggerKindName(trigger.kind))}});
    }
    out["known_triggers"] = known;
  }
  return out;
}

json PretrimSelectionJson(const DamPretrimSelection& selection) {
  return {{"tasks", selection.tasks},
          {"reach_without", selection.reach_without},
          {"reach_with", selection.reach_with},
          {"mean_reach_without", selection.mean_reach_without},
          {"mean_reach_with", selection.mean_reach_with},
          {"control_classes", selection.control_classes},
          {"control_reach_without", selection.control_reach_without},
          {"control_reach_with", selection.control_reach_with},
          {"flagged", selection.flagged},
          {"flag_ratios", selection.flag_ratios},
          {"score_rule", selection.score_rule},
          {"score_without", selection.score_without},
          {"score_with", selection.score_with},
          {"kept_pretrim", selection.kept_pretrim},
          {"probe_seconds", selection.probe_seconds}};
}

json ScannedTriggersJson(const std::vector<DamScannedTrigger>& scanned) {
  json out = json::array();
  for (const DamScannedTrigger& trigger : scanned) {
    out.push_back({{"task", trigger.task},
                   {"target_class", trigger.target_class},
                   {"anomaly_index", trigger.anomaly_index},
                   {"mask_l1", trigger.mask_l1},
                   {"reach", trigger.reach},
                   {"differential_ratio", trigger.differential_ratio}});
  }
  return out;
}

// MeanKl returns the batch mean of KL(softmax(p) || softmax(q)).
torch::Tensor MeanKl(const torch::Tensor& p_logits,
                     const torch::Tensor& q_logits) {
  torch::Tensor log_p = torch::log_softmax(p_logits, 1);
  torch::Tensor log_q = torch::log_softmax(q_logits, 1);
  return (log_p.exp() * (log_p - log_q)).sum(1).mean();
}

double Fraction(const torch::Tensor& condition) {
  return condition.numel() == 0
             ? 0.0
             : condition.to(torch::kFloat64).mean().item<double>();
}

// LogitQuantiles returns the quantiles at kMaskLogitQuantiles of all entries
// of `logits`, by sorting (torch::quantile refuses more than 2^24 entries).
std::vector<double> LogitQuantiles(const std::vector<torch::Tensor>& logits) {
  std::vector<torch::Tensor> flat;
  for (const torch::Tensor& t : logits) flat.push_back(t.detach().flatten());
  if (flat.empty()) return {};
  torch::Tensor sorted =
      std::get<0>(torch::cat(flat).to(torch::kCPU, torch::kFloat64).sort());
  const int64_t n = sorted.numel();
  std::vector<double> out;
  if (n == 0) return out;
  for (double p : kMaskLogitQuantiles) {
    // Nearest rank; the report needs the shape, not interpolation.
    const int64_t index = std::min<int64_t>(
        n - 1, static_cast<int64_t>(p * static_cast<double>(n)));
    out.push_back(sorted[index].item<double>());
  }
  return out;
}

// MaskTotalsJson is the report's whole-backbone mask figures, shared by the
// full report and the merged file's summary.
json MaskTotalsJson(const DamReport& report) {
  return {
      {"m1_sparsity", report.m1_sparsity},
      {"m2_sparsity", report.m2_sparsity},
      {"m2_flagged_fraction", report.m2_flagged_fraction},
      {"final_mask_zeros", report.final_mask_zeros},
      {"logit_quantile_levels",
       std::vector<double>(std::begin(kMaskLogitQuantiles),
                           std::end(kMaskLogitQuantiles))},
      {"m1_logit_quantiles", report.m1_logit_quantiles},
      {"m2_logit_quantiles", report.m2_logit_quantiles},
  };
}

// DifferentialRatio is class c's own/base mask ratio (0 without a base
// scan), floored as LFPM's ranking floors it.
double DifferentialRatio(const LfpmAnomaly& anomaly, int64_t c) {
  if (anomaly.base_class_norms.empty()) return 0.0;
  return anomaly.class_norms[c] / std::max(1e-12, anomaly.base_class_norms[c]);
}

// ScanTriggers gives every task without a known trigger the easiest class's
// trigger of LFPM's Neural-Cleanse scan (ScanLfpmTasks) on the
// task-arithmetic merge at `initial_lambda`, which phase 1 starts from, and
// records the scan in `report`.
absl::Status ScanTriggers(const Model& model, const TaskVectorSet& set,
                          const TaskVectorMerger& merger,
                          const std::vector<torch::Tensor>& calibration,
                          const DamOptions& options,
                          std::vector<MaskAndPattern>& known,
                          DamReport& report) {
  const double start = SteadySeconds();
  std::vector<LfpmTask> tasks;
  std::vector<int> task_index;
  for (int t = 0; t < set.num_tasks(); ++t) {
    if (known[t].mask.defined()) continue;
    LfpmTask task;
    task.name = set.task_names[t];
    task.inputs = calibration[t];
    tasks.push_back(std::move(task));
    task_index.push_back(t);
  }
  if (tasks.empty()) return absl::OkStatus();
  ASSIGN_OR_RETURN(
      NamedTensors merged,
      CallTorch("DAM scan merge", [&]() -> absl::StatusOr<NamedTensors> {
        torch::Tensor lambdas =
            merger.InitialLambdas(options.granularity, options.initial_lambda);
        return MergedModelTensors(set, merger.MergedBackbone(lambdas, {}));
      }));
  if (options.scan_own_model) {
    // Task t's own model: lambda 1 for t, 0 for the others; the base: all 0.
    RETURN_IF_ERROR(CallTorch("DAM own models", [&]() -> absl::Status {
      NamedTensors base;
      if (options.scan_differential) {
        std::vector<torch::Tensor> backbone = merger.MergedBackbone(
            merger.InitialLambdas(options.granularity, 0.0), {});
        for (size_t k = 0; k < backbone.size(); ++k) {
          base.emplace_back(set.keys[k], backbone[k]);
        }
      }
      for (size_t i = 0; i < tasks.size(); ++i) {
        tasks[i].base_model = base;
        torch::Tensor lambdas = merger.InitialLambdas(options.granularity, 0.0);
        {
          torch::NoGradGuard no_grad;
          lambdas[task_index[i]].fill_(1.0);
        }
        std::vector<torch::Tensor> backbone =
            merger.MergedBackbone(lambdas, {});
        for (size_t k = 0; k < backbone.size(); ++k) {
          tasks[i].own_model.emplace_back(set.keys[k], backbone[k]);
        }
      }
      return absl::OkStatus();
    }));
  }
  LfpmOptions scan;
  scan.triggers.scan_steps = options.scan_steps;
  scan.triggers.scan_own_model = options.scan_own_model;
  scan.triggers.merge_refine_steps = options.scan_merge_refine_steps;
  scan.triggers.differential_gate = options.scan_differential;
  scan.seed = options.seed;
  scan.device = options.device;
  scan.is_cancelled = options.is_cancelled;
  ASSIGN_OR_RETURN(std::vector<LfpmTaskScan> scans,
                   ScanLfpmTasks(model, merged, tasks, scan));
  for (size_t i = 0; i < scans.size(); ++i) {
    const LfpmTaskScan& found = scans[i];
    const int64_t c = found.easiest_class;
    known[task_index[i]] = {found.trigger.mask.to(merger.device()),
                            found.trigger.pattern.to(merger.device())};
    report.scanned_triggers.push_back(
        {found.anomaly.task, c, found.anomaly.anomaly_index,
         found.trigger.mask.sum().item<double>(), found.anomaly.class_reach[c],
         DifferentialRatio(found.anomaly, c)});
  }
  report.scan_seconds = SteadySeconds() - start;
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<FinalMaskMode> ParseFinalMaskMode(absl::string_view name) {
  if (name == "expected") return FinalMaskMode::kExpected;
  if (name == "sample") return FinalMaskMode::kSample;
  if (name == "hard") return FinalMaskMode::kHard;
  if (name == "hard_detection") return FinalMaskMode::kHardDetection;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown final mask \"", name,
                   "\" (expected, sample, hard, hard_detection)"));
}

absl::string_view FinalMaskModeName(FinalMaskMode mode) {
  switch (mode) {
    case FinalMaskMode::kExpected:
      return "expected";
    case FinalMaskMode::kSample:
      return "sample";
    case FinalMaskMode::kHard:
      return "hard";
    case FinalMaskMode::kHardDetection:
      return "hard_detection";
  }
  return "expected";
}

absl::StatusOr<BackdoorLoss> ParseBackdoorLoss(absl::string_view name) {
  if (name == "entropy") return BackdoorLoss::kEntropy;
  if (name == "consistency") return BackdoorLoss::kConsistency;
  if (name == "anchored") return BackdoorLoss::kAnchored;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown backdoor loss \"", name, "\" (entropy, consistency, anchored)"));
}

absl::string_view BackdoorLossName(BackdoorLoss loss) {
  switch (loss) {
    case BackdoorLoss::kEntropy:
      return "entropy";
    case BackdoorLoss::kConsistency:
      return "consistency";
    case BackdoorLoss::kAnchored:
      return "anchored";
  }
  return "entropy";
}

absl::StatusOr<DetectionCleanLoss> ParseDetectionCleanLoss(
    absl::string_view name) {
  if (name == "entropy") return DetectionCleanLoss::kEntropy;
  if (name == "fidelity") return DetectionCleanLoss::kFidelity;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown detection clean loss \"", name, "\" (entropy, fidelity)"));
}

absl::string_view DetectionCleanLossName(DetectionCleanLoss loss) {
  return loss == DetectionCleanLoss::kEntropy ? "entropy" : "fidelity";
}

absl::StatusOr<MaskOptimizer> ParseMaskOptimizer(absl::string_view name) {
  if (name == "adam") return MaskOptimizer::kAdam;
  if (name == "normalized_sgd") return MaskOptimizer::kNormalizedSgd;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown mask optimizer \"", name, "\" (adam, normalized_sgd)"));
}

absl::string_view MaskOptimizerName(MaskOptimizer optimizer) {
  return optimizer == MaskOptimizer::kAdam ? "adam" : "normalized_sgd";
}

absl::StatusOr<TriggerShape> ParseTriggerShape(absl::string_view name) {
  if (name == "dense") return TriggerShape::kDense;
  if (name == "patch") return TriggerShape::kPatch;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown trigger shape \"", name, "\" (dense, patch)"));
}

absl::string_view TriggerShapeName(TriggerShape shape) {
  return shape == TriggerShape::kDense ? "dense" : "patch";
}

absl::StatusOr<DamTriggerSource> ParseDamTriggerSource(absl::string_view name) {
  if (name == "synthesized") return DamTriggerSource::kSynthesized;
  if (name == "scan") return DamTriggerSource::kScan;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown trigger source \"", name, "\" (synthesized, scan)"));
}

absl::string_view DamTriggerSourceName(DamTriggerSource source) {
  return source == DamTriggerSource::kScan ? "scan" : "synthesized";
}

absl::Status ValidateDamOptions(const DamOptions& options) {
  auto bad = [](absl::string_view field, absl::string_view rule) {
    return absl::InvalidArgumentError(
        absl::StrCat("dam: ", field, " must be ", rule));
  };
  if (options.steps < 0) return bad("steps", ">= 0");
  if (options.adamerging_steps < 0) return bad("adamerging_steps", ">= 0");
  if (!(options.lambda_learning_rate > 0)) {
    return bad("lambda_learning_rate", "> 0");
  }
  if (!(options.mask_learning_rate > 0)) {
    return bad("mask_learning_rate", "> 0");
  }
  if (!(options.trigger_learning_rate > 0)) {
    return bad("trigger_learning_rate", "> 0");
  }
  if (!(options.adamerging_learning_rate > 0)) {
    return bad("adamerging_learning_rate", "> 0");
  }
  if (!(options.temperature > 0)) return bad("temperature", "> 0");
  if (!(options.trigger_epsilon >= 0)) return bad("trigger_epsilon", ">= 0");
  if (!(options.beta >= 0)) return bad("beta", ">= 0");
  if (!(options.hard_mask_margin >= 0) ||
      !std::isfinite(options.hard_mask_margin)) {
    return bad("hard_mask_margin", ">= 0 and finite");
  }
  if (!(options.detection_mask_learning_rate >= 0)) {
    return bad("detection_mask_learning_rate", ">= 0");
  }
  if (!(options.ties_pretrim_percent >= 0 &&
        options.ties_pretrim_percent <= 100)) {
    return bad("ties_pretrim_percent", "in [0, 100] (0: off)");
  }
  if (!(options.patch_mask_l1_weight >= 0)) {
    return bad("patch_mask_l1_weight", ">= 0");
  }
  if (!std::isfinite(options.initial_mask_logit)) {
    return bad("initial_mask_logit", "finite");
  }
  if (!std::isfinite(options.initial_lambda)) {
    return bad("initial_lambda", "finite");
  }
  if (options.batch_size < 1) return bad("batch_size", ">= 1");
  if (options.threads < 0) return bad("threads", ">= 0");
  if (options.scan_steps < 1) return bad("scan_steps", ">= 1");
  if (options.scan_merge_refine_steps < 0) {
    return bad("scan_merge_refine_steps", ">= 0");
  }
  if (options.scan_differential && !options.scan_own_model) {
    return bad("scan_differential", "used with scan_own_model=true");
  }
  if (options.ties_pretrim_select &&
      !(options.ties_pretrim_percent > 0 &&
        options.trigger_source == DamTriggerSource::kScan)) {
    return bad("ties_pretrim_select",
               "used with ties_pretrim_percent > 0 and trigger_source=scan");
  }
  if (options.pretrim_select_control_classes < 0) {
    return bad("pretrim_select_control_classes", ">= 0");
  }
  if (options.pretrim_select_control_classes > 0 &&
      !options.ties_pretrim_select) {
    return bad("pretrim_select_control_classes",
               "used with ties_pretrim_select=true");
  }
  if (!(options.pretrim_select_max_ratio >= 0)) {
    return bad("pretrim_select_max_ratio", ">= 0");
  }
  if (options.pretrim_select_max_ratio > 0 &&
      !(options.ties_pretrim_select && options.scan_differential)) {
    return bad("pretrim_select_max_ratio",
               "used with ties_pretrim_select=true and scan_differential=true");
  }
  return ParseDevice(options.device).status();
}

// State is everything LibTorch-typed the trainer keeps between steps.
struct DamTrainer::State {
  TaskVectorMerger merger;
  CalibrationSampler sampler;
  at::Generator generator;
  torch::Tensor lambdas;          // [N] or [N, K], leaf
  std::vector<torch::Tensor> s1;  // task-shared mask logits, leaves
  std::vector<torch::Tensor> s2;  // backdoor-detection mask logits
  torch::Tensor delta;            // dense: [N, C, H, W], leaf
  torch::Tensor patch_mask;       // patch: mask logits [N, 1, H, W], leaf
  torch::Tensor patch_pattern;    // patch: pattern logits [N, C, H, W], leaf
  // Per task: the caller's known trigger as mask [1, H, W] and pattern
  // [C, H, W], or undefined tensors for a synthesized trigger.
  std::vector<MaskAndPattern> known;
  std::unique_ptr<torch::optim::Adam> lambda_optimizer;
  std::unique_ptr<torch::optim::Adam> s1_optimizer;
  std::unique_ptr<torch::optim::Adam> s2_optimizer;
  std::unique_ptr<torch::optim::Adam> delta_optimizer;

  State(TaskVectorMerger merger_in, CalibrationSampler sampler_in,
        uint64_t seed)
      : merger(std::move(merger_in)),
        sampler(std::move(sampler_in)),
        generator(MakeGenerator(seed)) {}
};

DamTrainer::DamTrainer(Model& model, const DamOptions& options)
    : model_(model), options_(options) {}

DamTrainer::~DamTrainer() = default;

absl::StatusOr<std::unique_ptr<DamTrainer>> DamTrainer::Create(
    Model& model, const TaskVectorSet& set,
    const std::vector<torch::Tensor>& calibration, const DamOptions& options) {
  RETURN_IF_ERROR(ValidateDamOptions(options));
  RETURN_IF_ERROR(ValidateCalibration(set, model, calibration));
  std::unique_ptr<DamTrainer> trainer(new DamTrainer(model, options));
  RETURN_IF_ERROR(trainer->Init(set, calibration));
  return trainer;
}

absl::Status DamTrainer::Init(const TaskVectorSet& set,
                              const std::vector<torch::Tensor>& calibration) {
  start_seconds_ = SteadySeconds();
  task_names_ = set.task_names;
  ASSIGN_OR_RETURN(c10::Device device, ParseDevice(options_.device));
  std::vector<MaskAndPattern> known(task_names_.size());
  for (const auto& [name, trigger] : options_.known_triggers) {
    auto it = std::find(task_names_.begin(), task_names_.end(), name);
    if (it == task_names_.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "known trigger for \"", name, "\", which is not a task of the set"));
    }
    absl::StatusOr<MaskAndPattern> stamp =
        TriggerMaskAndPattern(trigger, model_.InputShape());
    if (!stamp.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "known trigger for \"", name, "\": ", stamp.status().message()));
    }
    known[it - task_names_.begin()] = {stamp->mask.to(device),
                                       stamp->pattern.to(device)};
  }
  SetTorchThreads(options_.threads);
  std::optional<TaskVectorSet> trimmed;
  if (options_.ties_pretrim_percent > 0) {
    ASSIGN_OR_RETURN(trimmed,
                     TiesTrimmedTaskVectors(set, options_.ties_pretrim_percent));
  }
  ASSIGN_OR_RETURN(
      TaskVectorMerger merger,
      TaskVectorMerger::Create(trimmed ? *trimmed : set, model_, device));
  if (options_.trigger_source == DamTriggerSource::kScan) {
    RETURN_IF_ERROR(ScanTriggers(model_, set, merger, calibration, options_,
                                 known, curves_));
  }
  return CallTorch("DamTrainer::Init", [&]() -> absl::Status {
    // Masks and batches draw from separate streams so that changing one
    // consumer does not reshuffle the other.
    state_ = std::make_unique<State>(
        std::move(merger),
        CalibrationSampler(calibration, options_.batch_size,
                           options_.seed * 2 + 1, device),
        options_.seed * 2);
    State& s = *state_;
    s.known = std::move(known);
    s.lambdas =
        s.merger.InitialLambdas(options_.granularity, options_.initial_lambda);
    for (const torch::Tensor& base : s.merger.base()) {
      s.s1.push_back(torch::full_like(base, options_.initial_mask_logit)
                         .requires_grad_(true));
      s.s2.push_back(torch::full_like(base, options_.initial_mask_logit)
                         .requires_grad_(true));
    }
    std::vector<int64_t> delta_shape = {set.num_tasks()};
    for (int64_t d : model_.InputShape()) delta_shape.push_back(d);
    const auto float_options =
        torch::TensorOptions().dtype(torch::kFloat32).device(device);
    s.delta = torch::zeros(delta_shape, float_options).requires_grad_(true);
    std::vector<torch::Tensor> trigger_parameters = {s.delta};
    if (options_.trigger_shape == TriggerShape::kPatch) {
      // The mask starts faint everywhere (sigmoid(-3) ~ 0.05 per pixel, as
      // LFPM's) and the pattern mid-grey; the gradient localises both.
      std::vector<int64_t> mask_shape = delta_shape;
      mask_shape[1] = 1;
      s.patch_mask =
          torch::full(mask_shape, -3.0, float_options).requires_grad_(true);
      s.patch_pattern =
          torch::zeros(delta_shape, float_options).requires_grad_(true);
      trigger_parameters = {s.patch_mask, s.patch_pattern};
    }
    s.lambda_optimizer = std::make_unique<torch::optim::Adam>(
        std::vector<torch::Tensor>{s.lambdas},
        torch::optim::AdamOptions(options_.lambda_learning_rate));
    s.s1_optimizer = std::make_unique<torch::optim::Adam>(
        s.s1, torch::optim::AdamOptions(options_.mask_learning_rate));
    s.s2_optimizer = std::make_unique<torch::optim::Adam>(
        s.s2, torch::optim::AdamOptions(DetectionMaskLearningRate()));
    s.delta_optimizer = std::make_unique<torch::optim::Adam>(
        trigger_parameters,
        torch::optim::AdamOptions(options_.trigger_learning_rate));
    return absl::OkStatus();
  });
}

absl::Status DamTrainer::Step() {
  const double step_start = SteadySeconds();
  absl::Status status =
      CallTorch("DAM outer step", [&]() -> absl::Status { return StepImpl(); });
  meta_seconds_ += SteadySeconds() - step_start;
  return status;
}

absl::Status DamTrainer::StepImpl() {
  State& s = *state_;
  const int64_t step = steps_done_ + 1;
  const int num_tasks = s.merger.num_tasks();
  const int num_tensors = s.merger.num_tensors();

  const bool patch = options_.trigger_shape == TriggerShape::kPatch;
  // Applies task t's trigger; `detached` cuts the history to the trigger's
  // parameters (the mask step).
  auto triggered_inputs = [&](const torch::Tensor& batch, int t,
                              bool detached) {
    if (s.known[t].mask.defined()) {
      return (1 - s.known[t].mask) * batch +
             s.known[t].mask * s.known[t].pattern;
    }
    if (!patch) {
      return PerturbInputs(batch, detached ? s.delta[t].detach() : s.delta[t]);
    }
    torch::Tensor m = torch::sigmoid(s.patch_mask[t]);
    torch::Tensor p = torch::sigmoid(s.patch_pattern[t]);
    if (detached) {
      m = m.detach();
      p = p.detach();
    }
    return (1 - m) * batch + m * p;
  };

  // 1. Draw m1 and m2 (with history to s1, s2) and form m.
  std::vector<torch::Tensor> m1(num_tensors), m2(num_tensors);
  std::vector<torch::Tensor> mask_detached(num_tensors);
  for (int k = 0; k < num_tensors; ++k) {
    m1[k] = SampleConcreteMask(s.s1[k], options_.temperature, s.generator);
    m2[k] = SampleConcreteMask(s.s2[k], options_.temperature, s.generator);
    mask_detached[k] = NormalizeMaskByMean(m1[k] * m2[k]).detach();
  }

  // 2. First-order meta step: one Adam step on lambda with the mask fixed.
  if (options_.reset_lambda_each_step) {
    torch::NoGradGuard no_grad;
    s.lambdas.fill_(options_.initial_lambda);
  }
  torch::Tensor lambdas_before;
  if (record_meta_step_) {
    lambdas_before = s.lambdas.detach().clone();
    meta_record_.batches.clear();
  }
  s.lambda_optimizer->zero_grad();
  RETURN_IF_ERROR(s.merger.Install(model_, s.lambdas, mask_detached));
  torch::Tensor inner_loss = torch::zeros({}, s.lambdas.options());
  for (int t = 0; t < num_tasks; ++t) {
    torch::Tensor batch = s.sampler.Next(t);
    if (record_meta_step_) meta_record_.batches.push_back(batch);
    ASSIGN_OR_RETURN(torch::Tensor logits, s.merger.Logits(model_, t, batch));
    inner_loss = inner_loss + MeanEntropy(logits);
  }
  inner_loss.backward();
  if (record_meta_step_) {
    meta_record_.mask = mask_detached;
    meta_record_.lambdas_before = lambdas_before;
    meta_record_.lambda_gradient = s.lambdas.grad().detach().clone();
  }
  s.lambda_optimizer->step();
  if (record_meta_step_) {
    meta_record_.lambdas_after = s.lambdas.detach().clone();
  }
  // lambda now holds lambda' (step 5, lambda <- lambda', is this in-place
  // update); later losses see it detached, so the step stays first-order.
  torch::Tensor lambdas_prime = s.lambdas.detach();

  // 3. Trigger synthesis on the detached theta(lambda', m): one Adam step
  // that increases the cross-entropy to the clean pseudo-labels (dense), or
  // that decreases -log(1 - p_yhat) plus the mask's L1 weight (patch).
  double trigger_value = 0.0;
  {
    {
      torch::NoGradGuard no_grad;
      RETURN_IF_ERROR(s.merger.Install(model_, lambdas_prime, mask_detached));
    }
    s.delta_optimizer->zero_grad();
    torch::Tensor trigger_loss = torch::zeros({}, s.lambdas.options());
    torch::Tensor patch_loss = torch::zeros({}, s.lambdas.options());
    for (int t = 0; t < num_tasks; ++t) {
      torch::Tensor batch = s.sampler.Next(t);
      // A known trigger is not synthesized; its batch is still drawn so
      // that the other tasks see the same batches as without it.
      if (s.known[t].mask.defined()) continue;
      torch::Tensor pseudo_labels;
      {
        torch::NoGradGuard no_grad;
        ASSIGN_OR_RETURN(torch::Tensor clean,
                         s.merger.Logits(model_, t, batch));
        pseudo_labels = clean.argmax(1);
      }
      ASSIGN_OR_RETURN(
          torch::Tensor logits,
          s.merger.Logits(model_, t, triggered_inputs(batch, t, false)));
      torch::Tensor log_probs = torch::log_softmax(logits, 1);
      trigger_loss = trigger_loss + torch::nll_loss(log_probs, pseudo_labels);
      if (patch) {
        // -log(1 - p_yhat) is bounded below once the input is moved off its
        // label, so the L1 term can keep the mask small.
        torch::Tensor p_label =
            log_probs.gather(1, pseudo_labels.unsqueeze(1)).squeeze(1).exp();
        patch_loss = patch_loss -
                     torch::log((1 - p_label).clamp_min(1e-6)).mean() +
                     options_.patch_mask_l1_weight *
                         torch::sigmoid(s.patch_mask[t]).sum();
      }
    }
    // Adam minimizes, so the dense trigger descends on -CE. With every
    // task's trigger known there is nothing to synthesize.
    if (trigger_loss.requires_grad()) {
      (patch ? patch_loss : -trigger_loss).backward();
      s.delta_optimizer->step();
    }
    if (!patch) {
      torch::NoGradGuard no_grad;
      s.delta.copy_(ProjectPerturbation(s.delta, options_.trigger_epsilon));
    }
    trigger_value = trigger_loss.item<double>();
  }

  // 4. Alternating mask step: s1 on odd steps with L1, s2 on even steps
  // with L2; the other mask enters detached.
  const bool update_shared = step % 2 == 1;
  std::vector<torch::Tensor> mask(num_tensors);
  for (int k = 0; k < num_tensors; ++k) {
    mask[k] = NormalizeMaskByMean(update_shared ? m1[k] * m2[k].detach()
                                                : m1[k].detach() * m2[k]);
  }
  const bool fidelity = !update_shared && options_.detection_clean_loss ==
                                              DetectionCleanLoss::kFidelity;
  const bool anchored =
      !update_shared && options_.backdoor_loss == BackdoorLoss::kAnchored;
  std::vector<torch::Tensor> batches(num_tasks);
  std::vector<torch::Tensor> reference_logits(num_tasks);
  for (int t = 0; t < num_tasks; ++t) batches[t] = s.sampler.Next(t);
  if (fidelity || anchored) {
    // The reference predictions: the same merge without M2.
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> m1_only(num_tensors);
    for (int k = 0; k < num_tensors; ++k) {
      m1_only[k] = NormalizeMaskByMean(m1[k].detach());
    }
    RETURN_IF_ERROR(s.merger.Install(model_, lambdas_prime, m1_only));
    for (int t = 0; t < num_tasks; ++t) {
      ASSIGN_OR_RETURN(reference_logits[t],
                       s.merger.Logits(model_, t, batches[t]));
    }
  }
  RETURN_IF_ERROR(s.merger.Install(model_, lambdas_prime, mask));
  torch::Tensor mask_loss = torch::zeros({}, s.lambdas.options());
  for (int t = 0; t < num_tasks; ++t) {
    const torch::Tensor& batch = batches[t];
    if (update_shared) {
      ASSIGN_OR_RETURN(torch::Tensor logits, s.merger.Logits(model_, t, batch));
      mask_loss = mask_loss + MeanEntropy(logits);
      continue;
    }
    const int64_t size = batch.size(0);
    ASSIGN_OR_RETURN(
        torch::Tensor logits,
        s.merger.Logits(model_, t,
                        torch::cat({batch, triggered_inputs(batch, t, true)})));
    torch::Tensor clean = logits.slice(0, 0, size);
    torch::Tensor triggered = logits.slice(0, size, 2 * size);
    torch::Tensor backdoor_term =
        options_.backdoor_loss == BackdoorLoss::kEntropy
            ? MeanEntropy(triggered)
        : anchored ? MeanKl(reference_logits[t], triggered)
                   : MeanKl(clean, triggered);
    torch::Tensor clean_term =
        fidelity ? MeanKl(reference_logits[t], clean) : MeanEntropy(clean);
    mask_loss = mask_loss + clean_term + options_.beta * backdoor_term;
  }
  torch::optim::Adam& mask_optimizer =
      update_shared ? *s.s1_optimizer : *s.s2_optimizer;
  mask_optimizer.zero_grad();
  mask_loss.backward();
  if (options_.mask_optimizer == MaskOptimizer::kAdam) {
    mask_optimizer.step();
  } else {
    StepByNormalizedGradient(update_shared ? s.s1 : s.s2,
                             update_shared ? options_.mask_learning_rate
                                           : DetectionMaskLearningRate());
  }
  // The detached mask received no gradient; keep both clean for the next
  // step regardless.
  s.s1_optimizer->zero_grad();
  s.s2_optimizer->zero_grad();

  steps_done_ = step;
  curves_.inner_loss.push_back(inner_loss.item<double>());
  curves_.trigger_loss.push_back(trigger_value);
  curves_.mask_loss.push_back(mask_loss.item<double>());
  if (options_.on_progress &&
      (step % std::max<int64_t>(1, options_.progress_interval) == 0 ||
       step == options_.steps)) {
    options_.on_progress(
        {"dam_meta",
         step,
         options_.steps,
         {{"inner", curves_.inner_loss.back()},
          {"trigger_ce", trigger_value},
          {update_shared ? "mask_l1" : "mask_l2", curves_.mask_loss.back()}},
         SteadySeconds() - start_seconds_});
  }
  return absl::OkStatus();
}

torch::Tensor DamTrainer::Lambdas() const {
  return state_->lambdas.detach().cpu().clone();
}

std::vector<torch::Tensor> DamTrainer::SharedMaskLogits() const {
  std::vector<torch::Tensor> result;
  for (const torch::Tensor& s : state_->s1) {
    result.push_back(s.detach().cpu().clone());
  }
  return result;
}

std::vector<torch::Tensor> DamTrainer::DetectionMaskLogits() const {
  std::vector<torch::Tensor> result;
  for (const torch::Tensor& s : state_->s2) {
    result.push_back(s.detach().cpu().clone());
  }
  return result;
}

torch::Tensor DamTrainer::Perturbations() const {
  torch::NoGradGuard no_grad;
  const State& s = *state_;
  torch::Tensor perturbations =
      options_.trigger_shape == TriggerShape::kPatch
          ? (torch::sigmoid(s.patch_mask) * torch::sigmoid(s.patch_pattern))
                .cpu()
                .clone()
          : s.delta.detach().cpu().clone();
  for (size_t t = 0; t < s.known.size(); ++t) {
    if (!s.known[t].mask.defined()) continue;
    perturbations[t].copy_(s.known[t].mask * s.known[t].pattern);
  }
  return perturbations;
}

std::vector<MaskAndPattern> DamTrainer::FixedTriggers() const {
  return state_->known;
}

torch::Tensor DamTrainer::PatchMasks() const {
  torch::NoGradGuard no_grad;
  const State& s = *state_;
  if (!s.patch_mask.defined()) return torch::Tensor();
  return torch::sigmoid(s.patch_mask).cpu().clone();
}

std::vector<torch::Tensor> DamTrainer::FinalMask(FinalMaskMode mode) {
  torch::NoGradGuard no_grad;
  State& s = *state_;
  std::vector<torch::Tensor> mask;
  // The hard modes keep an entry whose logit is above this.
  const double keep_above = -options_.hard_mask_margin;
  for (size_t k = 0; k < s.s1.size(); ++k) {
    torch::Tensor combined;
    switch (mode) {
      case FinalMaskMode::kExpected:
        combined = torch::sigmoid(s.s1[k]) * torch::sigmoid(s.s2[k]);
        break;
      case FinalMaskMode::kSample:
        combined =
            SampleConcreteMask(s.s1[k], options_.temperature, s.generator) *
            SampleConcreteMask(s.s2[k], options_.temperature, s.generator);
        break;
      case FinalMaskMode::kHard:
        // At margin 0, sigmoid(s) > 0.5 exactly when s > 0.
        combined = (s.s1[k] > keep_above).to(torch::kFloat32) *
                   (s.s2[k] > keep_above).to(torch::kFloat32);
        break;
      case FinalMaskMode::kHardDetection:
        combined = torch::sigmoid(s.s1[k]) *
                   (s.s2[k] > keep_above).to(torch::kFloat32);
        break;
    }
    mask.push_back(NormalizeMaskByMean(combined).detach());
  }
  return mask;
}

DamReport DamTrainer::MakeReport(
    const std::vector<torch::Tensor>& final_mask) const {
  torch::NoGradGuard no_grad;
  const State& s = *state_;
  DamReport report = curves_;
  report.task_names = task_names_;
  double total = 0, m1_sparse = 0, m2_sparse = 0, zeros = 0;
  for (size_t k = 0; k < s.s1.size(); ++k) {
    MaskTensorStats stats;
    stats.key = s.merger.keys()[k];
    stats.elements = s.s1[k].numel();
    stats.m1_sparsity = Fraction(s.s1[k] < 0);
    stats.m2_sparsity = Fraction(s.s2[k] < 0);
    stats.m1_keep_mean = torch::sigmoid(s.s1[k]).mean().item<double>();
    stats.m2_keep_mean = torch::sigmoid(s.s2[k]).mean().item<double>();
    stats.final_mask_zeros = Fraction(final_mask[k] == 0);
    const double n = static_cast<double>(stats.elements);
    total += n;
    m1_sparse += stats.m1_sparsity * n;
    m2_sparse += stats.m2_sparsity * n;
    zeros += stats.final_mask_zeros * n;
    report.tensors.push_back(std::move(stats));
  }
  if (total > 0) {
    report.m1_sparsity = m1_sparse / total;
    report.m2_sparsity = m2_sparse / total;
    report.final_mask_zeros = zeros / total;
  }
  report.m2_flagged_fraction = report.m2_sparsity;
  report.m1_logit_quantiles = LogitQuantiles(s.s1);
  report.m2_logit_quantiles = LogitQuantiles(s.s2);
  torch::Tensor delta = Perturbations().to(torch::kFloat64);
  torch::Tensor patch_masks = PatchMasks();
  for (size_t t = 0; t < task_names_.size(); ++t) {
    torch::Tensor d = delta[t];
    const double mask_l1 =
        s.known[t].mask.defined()
            ? s.known[t].mask.to(torch::kFloat64).sum().item<double>()
        : patch_masks.defined()
            ? patch_masks[t].to(torch::kFloat64).sum().item<double>()
            : 0.0;
    report.triggers.push_back({task_names_[t], d.abs().max().item<double>(),
                               d.norm().item<double>(), mask_l1});
  }
  report.outer_steps = steps_done_;
  report.meta_seconds = meta_seconds_;
  report.seconds_per_outer_step =
      steps_done_ > 0 ? meta_seconds_ / static_cast<double>(steps_done_) : 0.0;
  return report;
}

absl::StatusOr<DamResult> DamTrainer::Finish() {
  State& s = *state_;
  const double phase_start = SteadySeconds();
  std::vector<torch::Tensor> final_mask;
  torch::Tensor lambdas;
  RETURN_IF_ERROR(CallTorch("DAM final mask", [&]() -> absl::Status {
    final_mask = FinalMask(options_.final_mask);
    lambdas = options_.adamerging_from_meta_lambda
                  ? s.lambdas.detach().clone().requires_grad_(true)
                  : s.merger.InitialLambdas(options_.granularity,
                                            options_.initial_lambda);
    return absl::OkStatus();
  }));
  EntropyOptimization optimization;
  optimization.phase = "dam_adamerging";
  optimization.steps = options_.adamerging_steps;
  optimization.learning_rate = options_.adamerging_learning_rate;
  optimization.progress_interval = options_.progress_interval;
  optimization.on_progress = options_.on_progress;
  optimization.is_cancelled = options_.is_cancelled;
  optimization.start_seconds = start_seconds_;
  ASSIGN_OR_RETURN(curves_.adamerging_loss,
                   OptimizeLambdasByEntropy(model_, s.merger, s.sampler,
                                            lambdas, final_mask, optimization));
  DamResult result;
  RETURN_IF_ERROR(CallTorch("DAM result", [&]() -> absl::Status {
    result.backbone = s.merger.MergedBackbone(lambdas, final_mask);
    for (torch::Tensor& tensor : result.backbone) tensor = tensor.cpu();
    result.report = MakeReport(final_mask);
    result.report.meta_lambdas = s.lambdas.detach().cpu().clone();
    result.report.lambdas = lambdas.detach().cpu().clone();
    return absl::OkStatus();
  }));
  // Leave the model holding plain merged tensors, not autograd history.
  for (int k = 0; k < s.merger.num_tensors(); ++k) {
    RETURN_IF_ERROR(model_.InstallTensor(
        s.merger.keys()[k], result.backbone[k].to(s.merger.device())));
  }
  result.report.adamerging_seconds = SteadySeconds() - phase_start;
  result.report.seconds = SteadySeconds() - start_seconds_;
  return result;
}

namespace {

// DamRun is one DAM run's result and the fixed triggers its L2 used.
struct DamRun {
  DamResult result;
  std::vector<MaskAndPattern> triggers;
};

absl::StatusOr<DamRun> RunDamOnce(Model& model, const TaskVectorSet& set,
                                  const std::vector<torch::Tensor>& calibration,
                                  const DamOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<DamTrainer> trainer,
                   DamTrainer::Create(model, set, calibration, options));
  for (int64_t step = 1; step <= options.steps; ++step) {
    if (options.is_cancelled && options.is_cancelled()) {
      return absl::CancelledError(
          absl::StrCat("DAM cancelled before outer step ", step));
    }
    RETURN_IF_ERROR(trainer->Step());
  }
  DamRun run;
  ASSIGN_OR_RETURN(run.result, trainer->Finish());
  run.triggers = trainer->FixedTriggers();
  return run;
}

// The index of a scanned trigger's task in the set; the scan names only
// tasks of the set, so the name is always found.
int TaskIndex(const TaskVectorSet& set, const std::string& name) {
  return static_cast<int>(
      std::find(set.task_names.begin(), set.task_names.end(), name) -
      set.task_names.begin());
}

// ScannedProbe is one probe of a scanned trigger: the trigger of
// scan.result.report.scanned_triggers[scanned] with its pattern re-mined
// towards `target`.
struct ScannedProbe {
  size_t scanned = 0;
  int64_t target = 0;
};

// ProbeScannedReach is ProbeTriggerReach of `probes` (scanned triggers of
// `scan`, the run without the pretrim) on `backbone`, in their order. A
// probe state holds a task once, so each call takes at most one probe per
// task.
absl::StatusOr<std::vector<double>> ProbeScannedReach(
    const Model& model, const TaskVectorSet& set,
    const std::vector<torch::Tensor>& calibration, const DamRun& scan,
    const std::vector<torch::Tensor>& backbone,
    const std::vector<ScannedProbe>& probes, const DamOptions& options) {
  std::vector<LfpmTask> tasks;
  std::vector<LfpmTriggerProbe> triggers;
  for (const ScannedProbe& probe : probes) {
    const DamScannedTrigger& scanned =
        scan.result.report.scanned_triggers[probe.scanned];
    const int t = TaskIndex(set, scanned.task);
    LfpmTask task;
    task.name = scanned.task;
    task.inputs = calibration[t];
    tasks.push_back(std::move(task));
    triggers.push_back({{scan.triggers[t].mask.cpu(),
                         scan.triggers[t].pattern.cpu()},
                        probe.target});
  }
  LfpmOptions probe;
  probe.seed = options.seed;
  probe.device = options.device;
  probe.is_cancelled = options.is_cancelled;
  return ProbeTriggerReach(model, MergedModelTensors(set, backbone), tasks,
                           triggers, options.scan_steps, probe);
}

// ControlClasses is `count` classes of a `num_classes`-class task other
// than `target`, evenly spaced after it (every other class when count is
// larger).
std::vector<int64_t> ControlClasses(int64_t target, int64_t num_classes,
                                    int64_t count) {
  const int64_t others = num_classes - 1;
  count = std::min(count, others);
  std::vector<int64_t> classes;
  for (int64_t j = 0; j < count; ++j) {
    classes.push_back((target + 1 + j * others / count) % num_classes);
  }
  return classes;
}

// SelectionReach fills `target_reach` and `control_reach` (per scanned task)
// with the probes of `scan`'s triggers on `backbone`: the target first, then
// each control class of `control_classes`, one call per round.
absl::Status SelectionReach(
    const Model& model, const TaskVectorSet& set,
    const std::vector<torch::Tensor>& calibration, const DamRun& scan,
    const std::vector<torch::Tensor>& backbone,
    const std::vector<std::vector<int64_t>>& control_classes,
    const DamOptions& options, std::vector<double>& target_reach,
    std::vector<double>& control_reach) {
  const size_t num_scanned = scan.result.report.scanned_triggers.size();
  std::vector<ScannedProbe> targets;
  for (size_t i = 0; i < num_scanned; ++i) {
    targets.push_back({i, scan.result.report.scanned_triggers[i].target_class});
  }
  ASSIGN_OR_RETURN(target_reach,
                   ProbeScannedReach(model, set, calibration, scan, backbone,
                                     targets, options));
  control_reach.clear();
  if (control_classes.empty()) return absl::OkStatus();
  std::vector<double> sums(num_scanned, 0.0);
  for (size_t round = 0;; ++round) {
    std::vector<ScannedProbe> controls;
    for (size_t i = 0; i < num_scanned; ++i) {
      if (round < control_classes[i].size()) {
        controls.push_back({i, control_classes[i][round]});
      }
    }
    if (controls.empty()) break;
    ASSIGN_OR_RETURN(std::vector<double> reach,
                     ProbeScannedReach(model, set, calibration, scan,
                                       backbone, controls, options));
    for (size_t j = 0; j < controls.size(); ++j) {
      sums[controls[j].scanned] += reach[j];
    }
  }
  for (size_t i = 0; i < num_scanned; ++i) {
    control_reach.push_back(
        control_classes[i].empty()
            ? 0.0
            : sums[i] / static_cast<double>(control_classes[i].size()));
  }
  return absl::OkStatus();
}

double Mean(const std::vector<double>& values) {
  double sum = 0.0;
  for (double value : values) sum += value;
  return values.empty() ? 0.0 : sum / static_cast<double>(values.size());
}

}  // namespace

absl::StatusOr<DamResult> RunDam(Model& model, const TaskVectorSet& set,
                                 const std::vector<torch::Tensor>& calibration,
                                 const DamOptions& options) {
  if (!options.ties_pretrim_select) {
    ASSIGN_OR_RETURN(DamRun run, RunDamOnce(model, set, calibration, options));
    return std::move(run.result);
  }
  RETURN_IF_ERROR(ValidateDamOptions(options));
  const double start = SteadySeconds();
  DamOptions without_options = options;
  without_options.ties_pretrim_select = false;
  without_options.pretrim_select_control_classes = 0;
  without_options.pretrim_select_max_ratio = 0.0;
  without_options.ties_pretrim_percent = 0.0;
  DamOptions with_options = without_options;
  with_options.ties_pretrim_percent = options.ties_pretrim_percent;
  ASSIGN_OR_RETURN(DamRun without,
                   RunDamOnce(model, set, calibration, without_options));
  ASSIGN_OR_RETURN(DamRun with,
                   RunDamOnce(model, set, calibration, with_options));
  const double probe_start = SteadySeconds();
  // Both merges are probed from the same triggers, those the full
  // fine-tunes' scan found, so neither is judged by its own L2 trigger.
  DamPretrimSelection selection;
  selection.ran = true;
  for (const DamScannedTrigger& scanned :
       without.result.report.scanned_triggers) {
    selection.tasks.push_back(scanned.task);
    if (options.pretrim_select_control_classes > 0) {
      const int t = TaskIndex(set, scanned.task);
      selection.control_classes.push_back(
          ControlClasses(scanned.target_class, set.heads[t].NumClasses(),
                         options.pretrim_select_control_classes));
    }
  }
  RETURN_IF_ERROR(SelectionReach(model, set, calibration, without,
                                 without.result.backbone,
                                 selection.control_classes, options,
                                 selection.reach_without,
                                 selection.control_reach_without));
  RETURN_IF_ERROR(SelectionReach(model, set, calibration, without,
                                 with.result.backbone,
                                 selection.control_classes, options,
                                 selection.reach_with,
                                 selection.control_reach_with));
  selection.mean_reach_without = Mean(selection.reach_without);
  selection.mean_reach_with = Mean(selection.reach_with);
  // A task's control reach is what a patch of its trigger's footprint gets
  // on any class; subtracting it leaves what is particular to the target.
  selection.score_without =
      selection.mean_reach_without - Mean(selection.control_reach_without);
  selection.score_with =
      selection.mean_reach_with - Mean(selection.control_reach_with);
  if (options.pretrim_select_max_ratio > 0) {
    const auto& scanned = without.result.report.scanned_triggers;
    double worst_without = -std::numeric_limits<double>::infinity();
    double worst_with = -std::numeric_limits<double>::infinity();
    for (size_t i = 0; i < scanned.size(); ++i) {
      const bool flagged =
          scanned[i].differential_ratio <= options.pretrim_select_max_ratio;
      selection.flagged.push_back(flagged);
      selection.flag_ratios.push_back(scanned[i].differential_ratio);
      if (!flagged) continue;
      const auto control = [&](const std::vector<double>& reach) {
        return reach.empty() ? 0.0 : reach[i];
      };
      worst_without =
          std::max(worst_without, selection.reach_without[i] -
                                      control(selection.control_reach_without));
      worst_with = std::max(worst_with,
                            selection.reach_with[i] -
                                control(selection.control_reach_with));
    }
    if (std::isfinite(worst_without)) {
      selection.score_rule = "max_flagged";
      selection.score_without = worst_without;
      selection.score_with = worst_with;
    }
  }
  selection.kept_pretrim = selection.score_with < selection.score_without;
  selection.probe_seconds = SteadySeconds() - probe_start;
  DamResult kept =
      std::move(selection.kept_pretrim ? with.result : without.result);
  if (!selection.kept_pretrim) {
    // The second run left its own merge installed.
    ASSIGN_OR_RETURN(c10::Device device, ParseDevice(options.device));
    for (int k = 0; k < set.num_tensors(); ++k) {
      RETURN_IF_ERROR(
          model.InstallTensor(set.keys[k], kept.backbone[k].to(device)));
    }
  }
  kept.report.pretrim_selection = std::move(selection);
  kept.report.seconds = SteadySeconds() - start;
  return kept;
}

std::string DamReportToJson(const DamReport& report,
                            const DamOptions& options) {
  json tensors = json::array();
  for (const MaskTensorStats& stats : report.tensors) {
    tensors.push_back({
        {"key", stats.key},
        {"elements", stats.elements},
        {"m1_sparsity", stats.m1_sparsity},
        {"m2_sparsity", stats.m2_sparsity},
        {"m1_keep_mean", stats.m1_keep_mean},
        {"m2_keep_mean", stats.m2_keep_mean},
        {"final_mask_zeros", stats.final_mask_zeros},
    });
  }
  json triggers = json::array();
  for (const TriggerSize& trigger : report.triggers) {
    triggers.push_back({{"task", trigger.task},
                        {"linf", trigger.linf},
                        {"l2", trigger.l2},
                        {"mask_l1", trigger.mask_l1}});
  }
  json out = {
      {"method", "dam"},
      {"options", OptionsJson(options)},
      {"tasks", report.task_names},
      {"tensors", tensors},
      {"meta_lambdas", TensorToJson(report.meta_lambdas)},
      {"lambdas", TensorToJson(report.lambdas)},
      {"loss_curves",
       {{"inner", report.inner_loss},
        {"trigger_ce", report.trigger_loss},
        {"mask", report.mask_loss},
        {"adamerging", report.adamerging_loss}}},
      {"triggers", triggers},
      {"scanned_triggers", ScannedTriggersJson(report.scanned_triggers)},
      {"scan_seconds", report.scan_seconds},
      {"outer_steps", report.outer_steps},
      {"meta_seconds", report.meta_seconds},
      {"adamerging_seconds", report.adamerging_seconds},
      {"seconds_per_outer_step", report.seconds_per_outer_step},
      {"seconds", report.seconds},
  };
  out.update(MaskTotalsJson(report));
  if (report.pretrim_selection.ran) {
    out["pretrim_selection"] = PretrimSelectionJson(report.pretrim_selection);
  }
  return out.dump();
}

absl::StatusOr<DamResult> DamMergeFiles(
    const std::string& architecture_path, const std::string& base_path,
    const std::vector<DataDependentTask>& tasks, const std::string& output_path,
    const DamOptions& options) {
  RETURN_IF_ERROR(ValidateDamOptions(options));
  ASSIGN_OR_RETURN(DataDependentJob job,
                   LoadDataDependentJob(architecture_path, base_path, tasks));
  ASSIGN_OR_RETURN(DamResult result,
                   RunDam(*job.model, job.set, job.calibration, options));
  json summary = {
      {"lambdas", TensorToJson(result.report.lambdas)},
      {"outer_steps", result.report.outer_steps},
      {"seconds", result.report.seconds},
  };
  summary.update(MaskTotalsJson(result.report));
  if (!result.report.scanned_triggers.empty()) {
    summary["scanned_triggers"] =
        ScannedTriggersJson(result.report.scanned_triggers);
    summary["scan_seconds"] = result.report.scan_seconds;
  }
  if (result.report.pretrim_selection.ran) {
    summary["pretrim_selection"] =
        PretrimSelectionJson(result.report.pretrim_selection);
  }
  std::map<std::string, std::string> metadata = {
      {"mergeguard.method", "dam"},
      {"mergeguard.options", OptionsJson(options).dump()},
      {"mergeguard.inputs", DataDependentInputsJson(tasks).dump()},
      {"mergeguard.base", base_path},
      {"mergeguard.architecture", architecture_path},
      {"mergeguard.lambdas", TensorToJson(result.report.lambdas).dump()},
      {"mergeguard.dam_summary", summary.dump()},
      {"mergeguard.version", std::string(MergeguardVersion())},
  };
  for (const auto& [key, value] : options.metadata) metadata[key] = value;
  RETURN_IF_ERROR(
      SaveMergedModel(output_path, job.set, result.backbone, metadata));
  return result;
}

}  // namespace mergeguard
