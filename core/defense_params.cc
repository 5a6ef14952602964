#include "core/defense_params.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "core/differentiable_merge.h"
#include "core/status_macros.h"

namespace mergeguard {
namespace {

// Field binds one parameter name to a field of Options: `set` parses text
// into it, `get` prints the field (for the documented defaults).
template <typename Options>
struct Field {
  std::string name;
  std::string type;
  std::function<absl::Status(absl::string_view, Options&)> set;
  // Takes a copy: the field accessors return mutable references.
  std::function<std::string(Options)> get;
};

absl::Status ParameterError(absl::string_view name, absl::string_view what,
                            absl::string_view text) {
  return absl::InvalidArgumentError(absl::StrCat(
      "parameters.", name, ": expected ", what, ", got \"", text, "\""));
}

// Number binds a double field, reached through `field`.
template <typename Options>
Field<Options> Number(std::string name,
                      std::function<double&(Options&)> field) {
  Field<Options> f;
  f.name = name;
  f.type = "number";
  f.set = [name, field](absl::string_view text, Options& o) -> absl::Status {
    double value = 0;
    if (!absl::SimpleAtod(text, &value) || !std::isfinite(value)) {
      return ParameterError(name, "a finite number", text);
    }
    field(o) = value;
    return absl::OkStatus();
  };
  f.get = [field](Options o) { return absl::StrCat(field(o)); };
  return f;
}

template <typename Options, typename Int>
Field<Options> Integer(std::string name, std::function<Int&(Options&)> field) {
  Field<Options> f;
  f.name = name;
  f.type = "integer";
  f.set = [name, field](absl::string_view text, Options& o) -> absl::Status {
    Int value = 0;
    if (!absl::SimpleAtoi(text, &value)) {
      return ParameterError(name, "an integer", text);
    }
    field(o) = value;
    return absl::OkStatus();
  };
  f.get = [field](Options o) { return absl::StrCat(field(o)); };
  return f;
}

template <typename Options>
Field<Options> Boolean(std::string name, std::function<bool&(Options&)> field) {
  Field<Options> f;
  f.name = name;
  f.type = "boolean";
  f.set = [name, field](absl::string_view text, Options& o) -> absl::Status {
    const std::string lower = absl::AsciiStrToLower(text);
    if (lower == "true" || lower == "1") {
      field(o) = true;
    } else if (lower == "false" || lower == "0") {
      field(o) = false;
    } else {
      return ParameterError(name, "true or false", text);
    }
    return absl::OkStatus();
  };
  f.get = [field](Options o) { return field(o) ? "true" : "false"; };
  return f;
}

// Enum binds an enum field through its parser and printer.
template <typename Options, typename E>
Field<Options> Enum(std::string name, std::string words,
                    std::function<E&(Options&)> field,
                    std::function<absl::StatusOr<E>(absl::string_view)> parse,
                    std::function<absl::string_view(E)> print) {
  Field<Options> f;
  f.name = name;
  f.type = words;
  f.set = [name, words, field, parse](absl::string_view text,
                                      Options& o) -> absl::Status {
    absl::StatusOr<E> value = parse(text);
    if (!value.ok()) {
      return ParameterError(name, absl::StrReplaceAll(words, {{"|", ", "}}),
                            text);
    }
    field(o) = *value;
    return absl::OkStatus();
  };
  f.get = [field, print](Options o) { return std::string(print(field(o))); };
  return f;
}

template <typename Options>
Field<Options> Text(std::string name, std::string type,
                    std::function<std::string&(Options&)> field) {
  Field<Options> f;
  f.name = name;
  f.type = type;
  f.set = [field](absl::string_view text, Options& o) -> absl::Status {
    field(o) = std::string(text);
    return absl::OkStatus();
  };
  f.get = [field](Options o) { return field(o); };
  return f;
}

template <typename Options>
Field<Options> Granularity(std::function<LambdaGranularity&(Options&)> field) {
  return Enum<Options, LambdaGranularity>("granularity", "task_wise|layer_wise",
                                          field, ParseLambdaGranularity,
                                          LambdaGranularityName);
}

// The runtime-only fields (threads, progress interval, callbacks, metadata)
// are the runner's, not the job's, and have no parameter.

std::vector<Field<AdaMergingOptions>> AdaMergingFields() {
  using O = AdaMergingOptions;
  return {
      Granularity<O>([](O & o) -> auto& { return o.granularity; }),
      Number<O>(
          "learning_rate", [](O & o) -> auto& { return o.learning_rate; }),
      Integer<O, int64_t>(
          "steps", [](O & o) -> auto& { return o.steps; }),
      Number<O>(
          "initial_lambda", [](O & o) -> auto& { return o.initial_lambda; }),
      Integer<O, int64_t>(
          "batch_size", [](O & o) -> auto& { return o.batch_size; }),
      Integer<O, uint64_t>(
          "seed", [](O & o) -> auto& { return o.seed; }),
      Text<O>(
          "device", "cpu|cuda|cuda:N", [](O & o) -> auto& { return o.device; }),
  };
}

std::vector<Field<DamOptions>> DamFields() {
  using O = DamOptions;
  return {
      Granularity<O>([](O & o) -> auto& { return o.granularity; }),
      Number<O>(
          "initial_lambda", [](O & o) -> auto& { return o.initial_lambda; }),
      Integer<O, int64_t>(
          "steps", [](O & o) -> auto& { return o.steps; }),
      Number<O>(
          "lambda_learning_rate",
          [](O & o) -> auto& { return o.lambda_learning_rate; }),
      Boolean<O>(
          "reset_lambda_each_step",
          [](O & o) -> auto& { return o.reset_lambda_each_step; }),
      Number<O>(
          "mask_learning_rate",
          [](O & o) -> auto& { return o.mask_learning_rate; }),
      Number<O>(
          "detection_mask_learning_rate",
          [](O & o) -> auto& { return o.detection_mask_learning_rate; }),
      Number<O>(
          "ties_pretrim_percent",
          [](O & o) -> auto& { return o.ties_pretrim_percent; }),
      Boolean<O>(
          "ties_pretrim_select",
          [](O & o) -> auto& { return o.ties_pretrim_select; }),
      Integer<O, int64_t>(
          "pretrim_select_control_classes",
          [](O & o) -> auto& { return o.pretrim_select_control_classes; }),
      Number<O>(
          "pretrim_select_max_ratio",
          [](O & o) -> auto& { return o.pretrim_select_max_ratio; }),
      Number<O>(
          "initial_mask_logit",
          [](O & o) -> auto& { return o.initial_mask_logit; }),
      Enum<O, MaskOptimizer>(
          "mask_optimizer", "adam|normalized_sgd",
          [](O & o) -> auto& { return o.mask_optimizer; }, ParseMaskOptimizer,
          MaskOptimizerName),
      Number<O>(
          "temperature", [](O & o) -> auto& { return o.temperature; }),
      Number<O>(
          "trigger_learning_rate",
          [](O & o) -> auto& { return o.trigger_learning_rate; }),
      Enum<O, TriggerShape>(
          "trigger_shape", "dense|patch",
          [](O & o) -> auto& { return o.trigger_shape; }, ParseTriggerShape,
          TriggerShapeName),
      Enum<O, DamTriggerSource>(
          "trigger_source", "synthesized|scan",
          [](O & o) -> auto& { return o.trigger_source; },
          ParseDamTriggerSource, DamTriggerSourceName),
      Integer<O, int64_t>(
          "scan_steps", [](O & o) -> auto& { return o.scan_steps; }),
      Boolean<O>(
          "scan_own_model", [](O & o) -> auto& { return o.scan_own_model; }),
      Integer<O, int64_t>(
          "scan_merge_refine_steps",
          [](O & o) -> auto& { return o.scan_merge_refine_steps; }),
      Boolean<O>(
          "scan_differential",
          [](O & o) -> auto& { return o.scan_differential; }),
      Number<O>(
          "trigger_epsilon", [](O & o) -> auto& { return o.trigger_epsilon; }),
      Number<O>(
          "patch_mask_l1_weight",
          [](O & o) -> auto& { return o.patch_mask_l1_weight; }),
      Number<O>(
          "beta", [](O & o) -> auto& { return o.beta; }),
      Enum<O, BackdoorLoss>(
          "backdoor_loss", "entropy|consistency|anchored",
          [](O & o) -> auto& { return o.backdoor_loss; }, ParseBackdoorLoss,
          BackdoorLossName),
      Enum<O, DetectionCleanLoss>(
          "detection_clean_loss", "entropy|fidelity",
          [](O & o) -> auto& { return o.detection_clean_loss; },
          ParseDetectionCleanLoss, DetectionCleanLossName),
      Enum<O, FinalMaskMode>(
          "final_mask", "expected|sample|hard|hard_detection",
          [](O & o) -> auto& { return o.final_mask; }, ParseFinalMaskMode,
          FinalMaskModeName),
      Number<O>(
          "hard_mask_margin",
          [](O & o) -> auto& { return o.hard_mask_margin; }),
      Integer<O, int64_t>(
          "adamerging_steps",
          [](O & o) -> auto& { return o.adamerging_steps; }),
      Number<O>(
          "adamerging_learning_rate",
          [](O & o) -> auto& { return o.adamerging_learning_rate; }),
      Boolean<O>(
          "adamerging_from_meta_lambda",
          [](O & o) -> auto& { return o.adamerging_from_meta_lambda; }),
      Integer<O, int64_t>(
          "batch_size", [](O & o) -> auto& { return o.batch_size; }),
      Integer<O, uint64_t>(
          "seed", [](O & o) -> auto& { return o.seed; }),
      Text<O>(
          "device", "cpu|cuda|cuda:N", [](O & o) -> auto& { return o.device; }),
  };
}

// LfpmLayerPrefixes binds the prefix list as comma-separated text.
Field<LfpmOptions> LfpmLayerPrefixes() {
  Field<LfpmOptions> f;
  f.name = "layer_prefixes";
  f.type = "comma-separated prefixes";
  f.set = [](absl::string_view text, LfpmOptions& o) -> absl::Status {
    o.layer_prefixes.clear();
    for (absl::string_view prefix :
         absl::StrSplit(text, ',', absl::SkipWhitespace())) {
      o.layer_prefixes.emplace_back(absl::StripAsciiWhitespace(prefix));
    }
    return absl::OkStatus();
  };
  f.get = [](LfpmOptions o) { return absl::StrJoin(o.layer_prefixes, ","); };
  return f;
}

std::vector<Field<LfpmOptions>> LfpmFields() {
  using O = LfpmOptions;
  return {
      Enum<O, LfpmMode>(
          "mode", "full|peft", [](O & o) -> auto& { return o.mode; },
          ParseLfpmMode, LfpmModeName),
      LfpmLayerPrefixes(),
      Integer<O, int64_t>(
          "lora_rank", [](O & o) -> auto& { return o.lora_rank; }),
      Number<O>(
          "lora_alpha", [](O & o) -> auto& { return o.lora_alpha; }),
      Boolean<O>(
          "peft_dense_vectors",
          [](O & o) -> auto& { return o.peft_dense_vectors; }),
      Number<O>(
          "beta", [](O & o) -> auto& { return o.beta; }),
      Number<O>(
          "gamma", [](O & o) -> auto& { return o.gamma; }),
      Number<O>(
          "ctl_path_weight", [](O & o) -> auto& { return o.ctl_path_weight; }),
      Boolean<O>(
          "ctl_endpoint_gradient",
          [](O & o) -> auto& { return o.ctl_endpoint_gradient; }),
      Integer<O, int64_t>(
          "path_nodes", [](O & o) -> auto& { return o.path_nodes; }),
      Integer<O, int64_t>(
          "steps", [](O & o) -> auto& { return o.steps; }),
      Number<O>(
          "learning_rate", [](O & o) -> auto& { return o.learning_rate; }),
      Enum<O, LearningRateSchedule>(
          "learning_rate_schedule", "constant|cosine",
          [](O & o) -> auto& { return o.learning_rate_schedule; },
          ParseLearningRateSchedule, LearningRateScheduleName),
      Integer<O, int64_t>(
          "batch_size", [](O & o) -> auto& { return o.batch_size; }),
      Boolean<O>(
          "use_labels", [](O & o) -> auto& { return o.use_labels; }),
      Number<O>(
          "target_hold_weight",
          [](O & o) -> auto& { return o.target_hold_weight; }),
      Integer<O, int64_t>(
          "report_examples", [](O & o) -> auto& { return o.report_examples; }),
      Integer<O, uint64_t>(
          "seed", [](O & o) -> auto& { return o.seed; }),
      Text<O>(
          "device", "cpu|cuda|cuda:N", [](O & o) -> auto& { return o.device; }),
      Enum<O, TriggerTargeting>(
          "trigger.targeting", "easiest_class|untargeted",
          [](O & o) -> auto& { return o.triggers.targeting; },
          ParseTriggerTargeting, TriggerTargetingName),
      Integer<O, int64_t>(
          "trigger.targets_per_task",
          [](O & o) -> auto& { return o.triggers.targets_per_task; }),
      Integer<O, int64_t>(
          "trigger.scan_steps",
          [](O & o) -> auto& { return o.triggers.scan_steps; }),
      Integer<O, int64_t>(
          "trigger.scan_batch_size",
          [](O & o) -> auto& { return o.triggers.scan_batch_size; }),
      Number<O>(
          "trigger.reach_threshold",
          [](O & o) -> auto& { return o.triggers.reach_threshold; }),
      Number<O>(
          "trigger.anomaly_gate",
          [](O & o) -> auto& { return o.triggers.anomaly_gate; }),
      Integer<O, int64_t>(
          "trigger.update_every",
          [](O & o) -> auto& { return o.triggers.update_every; }),
      Integer<O, int64_t>(
          "trigger.steps_per_update",
          [](O & o) -> auto& { return o.triggers.steps_per_update; }),
      Number<O>(
          "trigger.alpha",
          [](O & o) -> auto& { return o.triggers.trigger_alpha; }),
      Number<O>(
          "trigger.learning_rate",
          [](O & o) -> auto& { return o.triggers.learning_rate; }),
      Number<O>(
          "trigger.mask_l1_weight",
          [](O & o) -> auto& { return o.triggers.mask_l1_weight; }),
      Number<O>(
          "trigger.initial_mask_logit",
          [](O & o) -> auto& { return o.triggers.initial_mask_logit; }),
      Boolean<O>(
          "trigger.rescan_after",
          [](O & o) -> auto& { return o.triggers.rescan_after; }),
      Boolean<O>(
          "trigger.pin_scan_trigger",
          [](O & o) -> auto& { return o.triggers.pin_scan_trigger; }),
      Integer<O, int64_t>(
          "trigger.restarts_per_target",
          [](O & o) -> auto& { return o.triggers.restarts_per_target; }),
      Number<O>(
          "trigger.restart_overlap_weight",
          [](O & o) -> auto& { return o.triggers.restart_overlap_weight; }),
      Number<O>(
          "trigger.restart_mask_l1_scale",
          [](O & o) -> auto& { return o.triggers.restart_mask_l1_scale; }),
      Integer<O, int64_t>(
          "trigger.dropout_refine_steps",
          [](O & o) -> auto& { return o.triggers.dropout_refine_steps; }),
      Number<O>(
          "trigger.mask_dropout",
          [](O & o) -> auto& { return o.triggers.mask_dropout; }),
      Number<O>(
          "trigger.dropout_base_weight",
          [](O & o) -> auto& { return o.triggers.dropout_base_weight; }),
      Integer<O, int64_t>(
          "trigger.window_steps",
          [](O & o) -> auto& { return o.triggers.window_steps; }),
      Integer<O, int64_t>(
          "trigger.window_margin",
          [](O & o) -> auto& { return o.triggers.window_margin; }),
      Enum<O, WindowPlacement>(
          "trigger.window_placement", "extent|densest",
          [](O & o) -> auto& { return o.triggers.window_placement; },
          ParseWindowPlacement, WindowPlacementName),
      Integer<O, int64_t>(
          "trigger.windows_per_class",
          [](O & o) -> auto& { return o.triggers.windows_per_class; }),
      Integer<O, int64_t>(
          "trigger.window_refresh_steps",
          [](O & o) -> auto& { return o.triggers.window_refresh_steps; }),
      Boolean<O>(
          "trigger.scan_own_model",
          [](O & o) -> auto& { return o.triggers.scan_own_model; }),
      Integer<O, int64_t>(
          "trigger.merge_refine_steps",
          [](O & o) -> auto& { return o.triggers.merge_refine_steps; }),
      Boolean<O>(
          "trigger.differential_gate",
          [](O & o) -> auto& { return o.triggers.differential_gate; }),
      Number<O>(
          "trigger.differential_max_ratio",
          [](O & o) -> auto& { return o.triggers.differential_max_ratio; }),
  };
}

template <typename Options>
std::vector<DefenseParameterInfo> Describe(
    const std::vector<Field<Options>>& fields,
    std::vector<DefenseParameterInfo> extra = {}) {
  const Options defaults;
  std::vector<DefenseParameterInfo> info;
  for (const Field<Options>& f : fields) {
    info.push_back({f.name, f.type, f.get(defaults)});
  }
  for (DefenseParameterInfo& e : extra) info.push_back(std::move(e));
  return info;
}

// Apply sets every parameter; names in `ignored` belong to someone else.
template <typename Options>
absl::Status Apply(absl::string_view method,
                   const std::vector<Field<Options>>& fields,
                   const DefenseParameters& parameters, Options* options,
                   const std::vector<std::string>& ignored = {}) {
  for (const auto& [name, text] : parameters) {
    if (std::find(ignored.begin(), ignored.end(), name) != ignored.end()) {
      continue;
    }
    const Field<Options>* field = nullptr;
    for (const Field<Options>& f : fields) {
      if (f.name == name) field = &f;
    }
    if (field == nullptr) {
      std::vector<std::string> names = ignored;
      for (const Field<Options>& f : fields) names.push_back(f.name);
      return absl::InvalidArgumentError(absl::StrCat(
          "parameters.", name, ": unknown parameter for method ", method,
          "; expected one of ", absl::StrJoin(names, ", ")));
    }
    RETURN_IF_ERROR(field->set(absl::StripAsciiWhitespace(text), *options));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<DefenseParameterInfo> AdaMergingParameterInfo() {
  return Describe(AdaMergingFields());
}
std::vector<DefenseParameterInfo> DamParameterInfo() {
  return Describe(DamFields());
}
std::vector<DefenseParameterInfo> LfpmParameterInfo() {
  return Describe(LfpmFields(), {{kLfpmMergeLambdaParameter, "number",
                                  absl::StrCat(kLfpmDefaultMergeLambda)}});
}

absl::Status ApplyAdaMergingParameters(const DefenseParameters& parameters,
                                       AdaMergingOptions* options) {
  RETURN_IF_ERROR(Apply("adamerging", AdaMergingFields(), parameters, options));
  return ValidateAdaMergingOptions(*options);
}

absl::Status ApplyDamParameters(const DefenseParameters& parameters,
                                DamOptions* options) {
  RETURN_IF_ERROR(Apply("dam", DamFields(), parameters, options));
  return ValidateDamOptions(*options);
}

absl::Status ApplyLfpmParameters(const DefenseParameters& parameters,
                                 LfpmOptions* options) {
  RETURN_IF_ERROR(Apply("lfpm", LfpmFields(), parameters, options,
                        {kLfpmMergeLambdaParameter}));
  RETURN_IF_ERROR(LfpmMergeLambda(parameters).status());
  RETURN_IF_ERROR(ValidateLfpmOptions(*options));
  return ParseDevice(options->device).status();
}

absl::StatusOr<double> LfpmMergeLambda(const DefenseParameters& parameters) {
  auto it = parameters.find(kLfpmMergeLambdaParameter);
  if (it == parameters.end()) return kLfpmDefaultMergeLambda;
  double lambda = 0;
  if (!absl::SimpleAtod(it->second, &lambda) || !std::isfinite(lambda)) {
    return ParameterError(kLfpmMergeLambdaParameter, "a finite number",
                          it->second);
  }
  return lambda;
}

std::map<std::string, double> LfpmProgressLosses(const LfpmProgress& progress) {
  return {{"loss", progress.loss},
          {"clean", progress.clean_loss},
          {"backdoor", progress.backdoor_loss},
          {"ctl", progress.ctl_loss}};
}

}  // namespace mergeguard
