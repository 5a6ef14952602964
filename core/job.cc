#include "core/job.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <filesystem>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/adamerging.h"
#include "core/checkpoint.h"
#include "core/dam.h"
#include "core/defense_params.h"
#include "core/file_util.h"
#include "core/lfpm.h"
#include "core/probe.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

using nlohmann::json;

struct MethodName {
  JobMethod method;
  const char* name;
};

constexpr MethodName kMethodNames[] = {
    {JobMethod::kTaskArithmetic, "task_arithmetic"},
    {JobMethod::kTies, "ties"},
    {JobMethod::kDare, "dare"},
    {JobMethod::kBreadcrumbs, "breadcrumbs"},
    {JobMethod::kConsensus, "consensus"},
    {JobMethod::kModelStock, "model_stock"},
    {JobMethod::kWeightedAverage, "weighted_average"},
    {JobMethod::kDam, "dam"},
    {JobMethod::kLfpm, "lfpm"},
    {JobMethod::kAdaMerging, "adamerging"},
};

constexpr size_t kMaxTaskNameBytes = 128;
constexpr size_t kMaxInputs = 256;
constexpr size_t kMaxArchitectureNameBytes = 64;

absl::Status FieldError(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

absl::Status CheckDigest(absl::string_view field, const std::string& digest) {
  if (!IsSha256Hex(digest)) {
    return FieldError(
        field, absl::StrCat("expected 64 lowercase hex characters (a SHA-256), "
                            "got \"",
                            digest.substr(0, 80), "\""));
  }
  return absl::OkStatus();
}

absl::Status CheckRange(absl::string_view field, double value, double min,
                        double max, bool min_open, bool max_open) {
  bool below = min_open ? !(value > min) : !(value >= min);
  bool above = max_open ? !(value < max) : !(value <= max);
  if (std::isnan(value) || below || above) {
    return FieldError(
        field, absl::StrCat("must be in ", min_open ? "(" : "[", min, ", ", max,
                            max_open ? ")" : "]", ", got ", value));
  }
  return absl::OkStatus();
}

bool UsesLambda(JobMethod method) {
  return method == JobMethod::kTaskArithmetic || method == JobMethod::kTies ||
         method == JobMethod::kDare || method == JobMethod::kBreadcrumbs;
}

bool UsesTies(const JobSpec& spec) {
  return spec.method == JobMethod::kTies ||
         (spec.method == JobMethod::kDare &&
          spec.merge.dare.combine == DareCombine::kTies);
}

absl::Status ValidateHyperparameters(const JobSpec& spec) {
  const MergeOptions& o = spec.merge;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (!std::isnan(o.lambda) && !std::isfinite(o.lambda)) {
    return FieldError("lambda", "must be finite");
  }
  if (UsesTies(spec)) {
    RETURN_IF_ERROR(CheckRange("ties.top_k_percent", o.ties.top_k_percent, 0,
                               100, true, false));
  }
  if (spec.method == JobMethod::kDare) {
    RETURN_IF_ERROR(
        CheckRange("dare.drop_rate", o.dare.drop_rate, 0, 1, false, true));
  }
  if (spec.method == JobMethod::kBreadcrumbs) {
    RETURN_IF_ERROR(CheckRange("breadcrumbs.gamma", o.breadcrumbs.gamma, 0, 1,
                               false, false));
    RETURN_IF_ERROR(CheckRange("breadcrumbs.density", o.breadcrumbs.density, 0,
                               1, true, false));
  }
  if (spec.method == JobMethod::kConsensus) {
    RETURN_IF_ERROR(CheckRange("consensus.tall_lambda", o.consensus.tall_lambda,
                               0, kInf, false, true));
    if (o.consensus.min_agreeing < 1) {
      return FieldError(
          "consensus.min_agreeing",
          absl::StrCat("must be >= 1, got ", o.consensus.min_agreeing));
    }
    if (!std::isfinite(o.consensus.alpha)) {
      return FieldError("consensus.alpha", "must be finite");
    }
  }
  if (o.output_dtype.has_value() && !IsFloatingPoint(*o.output_dtype)) {
    return FieldError("output_dtype", "must be F32, F16, BF16 or F64");
  }
  if (o.head_prefix.size() > kMaxTaskNameBytes) {
    return FieldError("head_prefix", "must be at most 128 bytes");
  }
  return absl::OkStatus();
}

// ---- JSON ------------------------------------------------------------------

json ParametersToJson(const JobSpec& spec) {
  const MergeOptions& o = spec.merge;
  json p = json::object();
  if (UsesLambda(spec.method) && !std::isnan(o.lambda)) p["lambda"] = o.lambda;
  if (UsesTies(spec)) {
    p["top_k"] = o.ties.top_k_percent;
    p["trim_scope"] =
        o.ties.trim_scope == TrimScope::kGlobal ? "global" : "tensor";
    p["disjoint"] = o.ties.disjoint == DisjointMode::kMean ? "mean" : "sum";
  }
  if (spec.method == JobMethod::kDare) {
    p["drop_rate"] = o.dare.drop_rate;
    p["combine"] =
        o.dare.combine == DareCombine::kTies ? "ties" : "task_arithmetic";
    p["seed"] = o.dare.seed;
  }
  if (spec.method == JobMethod::kBreadcrumbs) {
    p["gamma"] = o.breadcrumbs.gamma;
    p["density"] = o.breadcrumbs.density;
  }
  if (spec.method == JobMethod::kConsensus) {
    p["tall_lambda"] = o.consensus.tall_lambda;
    p["min_agreeing"] = o.consensus.min_agreeing;
    p["alpha"] = o.consensus.alpha;
  }
  if (spec.method == JobMethod::kModelStock) {
    p["cosine_scope"] = o.model_stock.cosine_scope == CosineScope::kGlobal
                            ? "global"
                            : "tensor";
  }
  return p;
}

json InputsToJson(const JobSpec& spec) {
  json inputs = json::array();
  for (const JobInputSpec& input : spec.inputs) {
    json entry = {{"name", input.name}, {"weight", input.weight}};
    if (input.is_lora()) {
      entry["lora"] = {{"weights_sha256", input.lora_weights_digest},
                       {"config_sha256", input.lora_config_digest}};
    } else {
      entry["model_sha256"] = input.model_digest;
    }
    inputs.push_back(std::move(entry));
  }
  return inputs;
}

json SpecToJsonValue(const JobSpec& spec) {
  json j = {
      {"method", std::string(JobMethodName(spec.method))},
      {"base_sha256", spec.base_digest},
      {"inputs", InputsToJson(spec)},
      {"parameters", ParametersToJson(spec)},
      {"head_prefix", spec.merge.head_prefix},
      {"compute_dtype", spec.merge.compute_in_double ? "float64" : "float32"},
  };
  if (spec.merge.output_dtype.has_value()) {
    j["dtype"] = std::string(DTypeName(*spec.merge.output_dtype));
  }
  if (!spec.architecture.empty()) j["architecture"] = spec.architecture;
  if (!spec.calibration.empty()) {
    json calibration = json::array();
    for (const CalibrationRef& ref : spec.calibration) {
      calibration.push_back({{"task", ref.task}, {"sha256", ref.digest}});
    }
    j["calibration"] = std::move(calibration);
  }
  if (!spec.defense_parameters.empty()) {
    j["defense_parameters"] = spec.defense_parameters;
  }
  if (!spec.probes.empty()) {
    json probes = json::array();
    for (const CalibrationRef& ref : spec.probes) {
      probes.push_back({{"task", ref.task}, {"sha256", ref.digest}});
    }
    j["probes"] = std::move(probes);
  }
  return j;
}

// The Get* helpers read one typed member, reporting the path on mismatch.
absl::StatusOr<std::string> GetString(const json& j, const char* key,
                                      bool required) {
  auto it = j.find(key);
  if (it == j.end()) {
    if (required) return FieldError(key, "is required");
    return std::string();
  }
  if (!it->is_string()) return FieldError(key, "expected a string");
  return it->get<std::string>();
}

absl::StatusOr<double> GetNumber(const json& j, const char* key,
                                 double fallback) {
  auto it = j.find(key);
  if (it == j.end()) return fallback;
  if (!it->is_number()) return FieldError(key, "expected a number");
  return it->get<double>();
}

absl::Status ParametersFromJson(const json& p, JobSpec& spec) {
  if (!p.is_object()) return FieldError("parameters", "expected an object");
  MergeOptions& o = spec.merge;
  ASSIGN_OR_RETURN(
      o.lambda,
      GetNumber(p, "lambda", std::numeric_limits<double>::quiet_NaN()));
  ASSIGN_OR_RETURN(o.ties.top_k_percent,
                   GetNumber(p, "top_k", o.ties.top_k_percent));
  ASSIGN_OR_RETURN(std::string trim, GetString(p, "trim_scope", false));
  if (trim == "tensor") o.ties.trim_scope = TrimScope::kTensor;
  ASSIGN_OR_RETURN(std::string disjoint, GetString(p, "disjoint", false));
  if (disjoint == "sum") o.ties.disjoint = DisjointMode::kSum;
  ASSIGN_OR_RETURN(o.dare.drop_rate,
                   GetNumber(p, "drop_rate", o.dare.drop_rate));
  ASSIGN_OR_RETURN(std::string combine, GetString(p, "combine", false));
  if (combine == "ties") o.dare.combine = DareCombine::kTies;
  if (auto it = p.find("seed"); it != p.end()) {
    if (!it->is_number_unsigned()) return FieldError("seed", "expected >= 0");
    o.dare.seed = it->get<uint64_t>();
  }
  ASSIGN_OR_RETURN(o.breadcrumbs.gamma,
                   GetNumber(p, "gamma", o.breadcrumbs.gamma));
  ASSIGN_OR_RETURN(o.breadcrumbs.density,
                   GetNumber(p, "density", o.breadcrumbs.density));
  ASSIGN_OR_RETURN(o.consensus.tall_lambda,
                   GetNumber(p, "tall_lambda", o.consensus.tall_lambda));
  ASSIGN_OR_RETURN(double min_agreeing,
                   GetNumber(p, "min_agreeing", o.consensus.min_agreeing));
  o.consensus.min_agreeing = static_cast<int>(min_agreeing);
  ASSIGN_OR_RETURN(o.consensus.alpha, GetNumber(p, "alpha", o.consensus.alpha));
  ASSIGN_OR_RETURN(std::string cosine, GetString(p, "cosine_scope", false));
  if (cosine == "tensor") o.model_stock.cosine_scope = CosineScope::kTensor;
  return absl::OkStatus();
}

absl::StatusOr<JobSpec> SpecFromJsonValue(const json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("expected an object");
  JobSpec spec;
  ASSIGN_OR_RETURN(std::string method, GetString(j, "method", true));
  ASSIGN_OR_RETURN(spec.method, ParseJobMethod(method));
  ASSIGN_OR_RETURN(spec.base_digest, GetString(j, "base_sha256", false));
  auto inputs = j.find("inputs");
  if (inputs == j.end() || !inputs->is_array()) {
    return FieldError("inputs", "expected an array");
  }
  for (const json& entry : *inputs) {
    if (!entry.is_object()) return FieldError("inputs", "expected objects");
    JobInputSpec input;
    ASSIGN_OR_RETURN(input.name, GetString(entry, "name", true));
    ASSIGN_OR_RETURN(input.weight, GetNumber(entry, "weight", 1.0));
    ASSIGN_OR_RETURN(input.model_digest,
                     GetString(entry, "model_sha256", false));
    if (auto lora = entry.find("lora"); lora != entry.end()) {
      if (!lora->is_object()) return FieldError("lora", "expected an object");
      ASSIGN_OR_RETURN(input.lora_weights_digest,
                       GetString(*lora, "weights_sha256", true));
      ASSIGN_OR_RETURN(input.lora_config_digest,
                       GetString(*lora, "config_sha256", true));
    }
    spec.inputs.push_back(std::move(input));
  }
  if (auto params = j.find("parameters"); params != j.end()) {
    RETURN_IF_ERROR(ParametersFromJson(*params, spec));
  }
  ASSIGN_OR_RETURN(spec.merge.head_prefix, GetString(j, "head_prefix", true));
  ASSIGN_OR_RETURN(std::string compute, GetString(j, "compute_dtype", false));
  spec.merge.compute_in_double = compute == "float64";
  ASSIGN_OR_RETURN(std::string dtype, GetString(j, "dtype", false));
  if (!dtype.empty()) {
    ASSIGN_OR_RETURN(DType parsed, ParseDType(dtype));
    spec.merge.output_dtype = parsed;
  }
  ASSIGN_OR_RETURN(spec.architecture, GetString(j, "architecture", false));
  if (auto calibration = j.find("calibration"); calibration != j.end()) {
    if (!calibration->is_array()) {
      return FieldError("calibration", "expected an array");
    }
    for (const json& entry : *calibration) {
      if (!entry.is_object()) {
        return FieldError("calibration", "expected objects");
      }
      CalibrationRef ref;
      ASSIGN_OR_RETURN(ref.task, GetString(entry, "task", true));
      ASSIGN_OR_RETURN(ref.digest, GetString(entry, "sha256", true));
      spec.calibration.push_back(std::move(ref));
    }
  }
  if (auto params = j.find("defense_parameters"); params != j.end()) {
    if (!params->is_object()) {
      return FieldError("defense_parameters", "expected an object");
    }
    for (const auto& [name, value] : params->items()) {
      if (!value.is_string()) {
        return FieldError("defense_parameters", "expected string values");
      }
      spec.defense_parameters[name] = value.get<std::string>();
    }
  }
  if (auto probes = j.find("probes"); probes != j.end()) {
    if (!probes->is_array()) return FieldError("probes", "expected an array");
    for (const json& entry : *probes) {
      if (!entry.is_object()) return FieldError("probes", "expected objects");
      CalibrationRef ref;
      ASSIGN_OR_RETURN(ref.task, GetString(entry, "task", true));
      ASSIGN_OR_RETURN(ref.digest, GetString(entry, "sha256", true));
      spec.probes.push_back(std::move(ref));
    }
  }
  return spec;
}

// ---- running ---------------------------------------------------------------

absl::Status MakeDirectory(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoToStatus(errno, absl::StrCat("create directory ", path));
  }
  return absl::OkStatus();
}

absl::Status Symlink(const std::string& target, const std::string& link) {
  ::unlink(link.c_str());
  if (::symlink(target.c_str(), link.c_str()) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("symlink ", link));
  }
  return absl::OkStatus();
}

// ResolveMergeInputs turns the spec's digests into the paths core/merge.h
// reads. A LoRA adapter becomes a PEFT directory of symlinks in `work_dir`.
absl::StatusOr<std::vector<MergeInput>> ResolveMergeInputs(
    const JobSpec& spec, const ArtifactResolver& resolve,
    const std::string& work_dir) {
  std::vector<MergeInput> inputs;
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    const JobInputSpec& input = spec.inputs[i];
    MergeInput merge_input;
    merge_input.name = input.name;
    merge_input.weight = input.weight;
    if (!input.is_lora()) {
      ASSIGN_OR_RETURN(merge_input.path, resolve(input.model_digest));
    } else {
      std::string dir = absl::StrCat(work_dir, "/adapter-", i);
      RETURN_IF_ERROR(MakeDirectory(dir));
      ASSIGN_OR_RETURN(std::string weights, resolve(input.lora_weights_digest));
      ASSIGN_OR_RETURN(std::string config, resolve(input.lora_config_digest));
      RETURN_IF_ERROR(
          Symlink(weights, absl::StrCat(dir, "/adapter_model.safetensors")));
      RETURN_IF_ERROR(
          Symlink(config, absl::StrCat(dir, "/adapter_config.json")));
      merge_input.path = dir;
    }
    inputs.push_back(std::move(merge_input));
  }
  return inputs;
}

absl::StatusOr<JobOutput> RunDataFreeMerge(const JobSpec& spec,
                                           const ArtifactResolver& resolve,
                                           const std::string& work_dir,
                                           const JobContext& context) {
  ASSIGN_OR_RETURN(std::vector<MergeInput> inputs,
                   ResolveMergeInputs(spec, resolve, work_dir));
  std::string base_path;
  if (!spec.base_digest.empty()) {
    ASSIGN_OR_RETURN(base_path, resolve(spec.base_digest));
  }
  JobOutput output;
  output.model_path = absl::StrCat(work_dir, "/", kSingleFileName);
  output.report_path = absl::StrCat(work_dir, "/report.json");

  MergeOptions options = spec.merge;
  options.method = ToMergeMethod(spec.method);
  options.threads = context.threads;
  options.writer = CheckpointWriterOptions{};  // one file: one artifact
  const json provenance = SpecToJsonValue(spec);
  options.metadata = {
      {"mergeguard.method", std::string(JobMethodName(spec.method))},
      {"mergeguard.parameters", provenance["parameters"].dump()},
      {"mergeguard.base_sha256", spec.base_digest},
      {"mergeguard.inputs", provenance["inputs"].dump()},
      {"mergeguard.server_version", context.server_version},
  };
  if (context.on_progress) {
    options.on_progress = [&context](const MergeProgress& progress) {
      context.on_progress(
          {"merge", progress.tensors_done, progress.tensors_total, {}});
    };
  }
  auto cancelled = [&context] {
    return context.is_cancelled && context.is_cancelled();
  };
  if (cancelled()) return absl::CancelledError("job cancelled before it ran");
  // Polled before each chunk, so a cancel stops the merge within one chunk.
  options.is_cancelled = context.is_cancelled;
  ASSIGN_OR_RETURN(MergeReport report,
                   Merge(base_path, inputs, output.model_path, options));
  if (cancelled()) {
    // Cancelled after the last check: the finished output is discarded.
    ::unlink(output.model_path.c_str());
    return absl::CancelledError("job cancelled while it ran");
  }
  output.metrics = {
      {kMetricSeconds, report.seconds},
      {"merged_tensors", static_cast<double>(report.merged_tensors)},
      {"copied_tensors", static_cast<double>(report.copied_tensors)},
      {"head_tensors", static_cast<double>(report.head_tensors)},
      {"bytes_read", static_cast<double>(report.bytes_read)},
      {"bytes_written", static_cast<double>(report.bytes_written)},
  };
  if (spec.method == JobMethod::kModelStock) {
    output.metrics["model_stock_ratio"] = report.model_stock_ratio;
  }
  json report_json = provenance;
  report_json["server_version"] = context.server_version;
  report_json["metrics"] = output.metrics;
  absl::Status written =
      WriteFileAtomically(output.report_path, report_json.dump(2));
  if (!written.ok()) {
    ::unlink(output.model_path.c_str());
    return written;
  }
  return output;
}

// ---- data-dependent methods (AdaMerging, DAM, LFPM) -------------------------

struct DefenseOptions {
  AdaMergingOptions adamerging;
  DamOptions dam;
  LfpmOptions lfpm;
  // Lambda of the task-arithmetic merge LFPM repairs, and the "before"
  // model of probe sets for every method.
  double merge_lambda = kLfpmDefaultMergeLambda;
};

absl::StatusOr<DefenseOptions> DefenseOptionsFromSpec(const JobSpec& spec) {
  DefenseOptions o;
  const DefenseParameters& p = spec.defense_parameters;
  switch (spec.method) {
    case JobMethod::kAdaMerging:
      RETURN_IF_ERROR(ApplyAdaMergingParameters(p, &o.adamerging));
      break;
    case JobMethod::kDam:
      RETURN_IF_ERROR(ApplyDamParameters(p, &o.dam));
      break;
    case JobMethod::kLfpm: {
      RETURN_IF_ERROR(ApplyLfpmParameters(p, &o.lfpm));
      ASSIGN_OR_RETURN(o.merge_lambda, LfpmMergeLambda(p));
      break;
    }
    default:
      break;
  }
  return o;
}

JobProgress ToJobProgress(const TrainingProgress& progress) {
  return {progress.phase, progress.step, progress.total_steps, progress.losses};
}

// EvaluateJobProbes runs the spec's probe sets on the task-arithmetic merge
// of the inputs (before) and on the job's output (after), and adds the means
// over probes to the metrics and the per-task figures to the report.
absl::Status EvaluateJobProbes(const JobSpec& spec,
                               const ArtifactResolver& resolve,
                               const std::string& architecture_path,
                               const std::string& base_path,
                               const std::vector<MergeInput>& inputs,
                               double before_lambda, const JobContext& context,
                               const std::string& work_dir, JobOutput& output,
                               json& report_json) {
  std::vector<ProbeSet> probes;
  for (size_t i = 0; i < spec.probes.size(); ++i) {
    ASSIGN_OR_RETURN(std::string path, resolve(spec.probes[i].digest));
    absl::StatusOr<ProbeSet> probe = LoadProbeSet(spec.probes[i].task, path);
    if (!probe.ok()) {
      return absl::Status(
          probe.status().code(),
          absl::StrCat("probes[", i, "]: ", probe.status().message()));
    }
    probes.push_back(*std::move(probe));
  }
  const std::string before_path =
      absl::StrCat(work_dir, "/probe-before.safetensors");
  MergeOptions before_options = spec.merge;
  before_options.method = MergeMethod::kTaskArithmetic;
  before_options.lambda = before_lambda;
  before_options.threads = context.threads;
  before_options.writer = CheckpointWriterOptions{};
  absl::Status merged =
      Merge(base_path, inputs, before_path, before_options).status();
  absl::StatusOr<std::vector<ProbeResult>> before =
      merged.ok() ? EvaluateProbes(architecture_path, before_path, probes)
                  : absl::StatusOr<std::vector<ProbeResult>>(merged);
  std::error_code ignored;
  std::filesystem::remove_all(before_path, ignored);
  if (!before.ok()) return before.status();
  ASSIGN_OR_RETURN(
      std::vector<ProbeResult> after,
      EvaluateProbes(architecture_path, output.model_path, probes));
  double asr_before = 0, asr_after = 0, acc_before = 0, acc_after = 0;
  json per_task = json::array();
  for (size_t i = 0; i < probes.size(); ++i) {
    asr_before += (*before)[i].asr / probes.size();
    asr_after += after[i].asr / probes.size();
    acc_before += (*before)[i].accuracy / probes.size();
    acc_after += after[i].accuracy / probes.size();
    per_task.push_back({{"task", probes[i].task},
                        {"target", probes[i].target},
                        {"examples", probes[i].images.size()},
                        {"asr_before", (*before)[i].asr},
                        {"asr_after", after[i].asr},
                        {"accuracy_before", (*before)[i].accuracy},
                        {"accuracy_after", after[i].accuracy}});
  }
  output.metrics[kMetricProbeAsrBefore] = asr_before;
  output.metrics[kMetricProbeAsrAfter] = asr_after;
  output.metrics[kMetricProbeAccuracyBefore] = acc_before;
  output.metrics[kMetricProbeAccuracyAfter] = acc_after;
  report_json["probes"] = {
      {"before", absl::StrCat("task arithmetic, lambda ", before_lambda)},
      {"tasks", per_task}};
  return absl::OkStatus();
}

absl::StatusOr<JobOutput> RunDataDependent(const JobSpec& spec,
                                           const ArtifactResolver& resolve,
                                           const std::string& work_dir,
                                           const JobContext& context) {
  if (!context.resolve_architecture) {
    return absl::FailedPreconditionError(
        absl::StrCat("method ", JobMethodName(spec.method),
                     " needs an architecture registry, and this runner has "
                     "none"));
  }
  ASSIGN_OR_RETURN(DefenseOptions options, DefenseOptionsFromSpec(spec));
  ASSIGN_OR_RETURN(std::string architecture_path,
                   context.resolve_architecture(spec.architecture));
  ASSIGN_OR_RETURN(std::string base_path, resolve(spec.base_digest));
  ASSIGN_OR_RETURN(std::vector<MergeInput> inputs,
                   ResolveMergeInputs(spec, resolve, work_dir));
  std::map<std::string, std::string> calibration_paths;
  for (const CalibrationRef& ref : spec.calibration) {
    ASSIGN_OR_RETURN(calibration_paths[ref.task], resolve(ref.digest));
  }

  JobOutput output;
  output.model_path = absl::StrCat(work_dir, "/", kSingleFileName);
  output.report_path = absl::StrCat(work_dir, "/report.json");
  const json provenance = SpecToJsonValue(spec);
  const std::map<std::string, std::string> metadata = {
      {"mergeguard.method", std::string(JobMethodName(spec.method))},
      {"mergeguard.parameters",
       provenance.value("defense_parameters", json::object()).dump()},
      {"mergeguard.architecture", spec.architecture},
      {"mergeguard.base_sha256", spec.base_digest},
      {"mergeguard.inputs", provenance["inputs"].dump()},
      {"mergeguard.calibration", provenance["calibration"].dump()},
      {"mergeguard.server_version", context.server_version},
  };
  ProgressCallback on_progress;
  if (context.on_progress) {
    on_progress = [&context](const TrainingProgress& progress) {
      context.on_progress(ToJobProgress(progress));
    };
  }
  auto cancelled = [&context] {
    return context.is_cancelled && context.is_cancelled();
  };
  if (cancelled()) return absl::CancelledError("job cancelled before it ran");

  std::vector<DataDependentTask> tasks;
  for (const MergeInput& input : inputs) {
    tasks.push_back(
        {{input.name, input.path, ""}, calibration_paths.at(input.name)});
  }
  json report_json = provenance;
  report_json["server_version"] = context.server_version;
  switch (spec.method) {
    case JobMethod::kAdaMerging: {
      AdaMergingOptions& o = options.adamerging;
      o.threads = context.threads;
      o.on_progress = on_progress;
      o.is_cancelled = context.is_cancelled;
      o.metadata = metadata;
      ASSIGN_OR_RETURN(AdaMergingResult result,
                       AdaMergeFiles(architecture_path, base_path, tasks,
                                     output.model_path, o));
      output.metrics[kMetricSeconds] = result.seconds;
      report_json["adamerging"] =
          json::parse(AdaMergingResultToJson(result, o));
      break;
    }
    case JobMethod::kDam: {
      DamOptions& o = options.dam;
      o.threads = context.threads;
      o.on_progress = on_progress;
      o.is_cancelled = context.is_cancelled;
      o.metadata = metadata;
      ASSIGN_OR_RETURN(DamResult result,
                       DamMergeFiles(architecture_path, base_path, tasks,
                                     output.model_path, o));
      output.metrics[kMetricSeconds] = result.report.seconds;
      output.metrics[kMetricM2FlaggedFraction] =
          result.report.m2_flagged_fraction;
      output.metrics["seconds_per_outer_step"] =
          result.report.seconds_per_outer_step;
      report_json["dam"] = json::parse(DamReportToJson(result.report, o));
      break;
    }
    case JobMethod::kLfpm: {
      LfpmOptions& o = options.lfpm;
      o.threads = context.threads;
      o.is_cancelled = context.is_cancelled;
      o.metadata = metadata;
      if (context.on_progress) {
        o.on_progress = [&context](const LfpmProgress& p) {
          context.on_progress({"lfpm", p.step, p.steps, LfpmProgressLosses(p)});
        };
      }
      LfpmJob job;
      job.architecture_path = architecture_path;
      job.base_path = base_path;
      job.task_models = inputs;
      job.ta_merge = spec.merge;
      job.ta_merge.method = MergeMethod::kTaskArithmetic;
      job.ta_merge.lambda = options.merge_lambda;
      job.ta_merge.threads = context.threads;
      job.ta_merge.writer = CheckpointWriterOptions{};
      for (const CalibrationRef& ref : spec.calibration) {
        job.calibration.push_back({ref.task, calibration_paths.at(ref.task)});
      }
      job.output_path = output.model_path;
      ASSIGN_OR_RETURN(LfpmReport report, RunLfpmJob(job, o));
      output.metrics[kMetricSeconds] = report.seconds;
      output.metrics[kMetricTauAbNorm] = report.tau_norm;
      double anomaly = 0.0;
      for (const LfpmAnomaly& a : report.anomaly_merged) {
        anomaly = std::max(anomaly, a.anomaly_index);
      }
      if (!report.anomaly_merged.empty()) {
        output.metrics[kMetricAnomalyIndex] = anomaly;
      }
      if (!report.path.empty()) {
        output.metrics[kMetricMinedAsrBefore] = report.path.front().asr;
        output.metrics[kMetricMinedAsrAfter] = report.path.back().asr;
      }
      report_json["lfpm"] = json::parse(LfpmReportToJson(report));
      break;
    }
    default:
      return absl::InternalError("not a data-dependent method");
  }
  if (cancelled()) {
    ::unlink(output.model_path.c_str());
    return absl::CancelledError("job cancelled while it ran");
  }
  if (!spec.probes.empty()) {
    absl::Status probed = EvaluateJobProbes(
        spec, resolve, architecture_path, base_path, inputs,
        options.merge_lambda, context, work_dir, output, report_json);
    if (!probed.ok()) {
      ::unlink(output.model_path.c_str());
      return probed;
    }
  }
  report_json["metrics"] = output.metrics;
  absl::Status written =
      WriteFileAtomically(output.report_path, report_json.dump(2));
  if (!written.ok()) {
    ::unlink(output.model_path.c_str());
    return written;
  }
  return output;
}

}  // namespace

absl::string_view JobMethodName(JobMethod method) {
  for (const MethodName& entry : kMethodNames) {
    if (entry.method == method) return entry.name;
  }
  return "unknown";
}

absl::StatusOr<JobMethod> ParseJobMethod(absl::string_view name) {
  for (const MethodName& entry : kMethodNames) {
    if (name == entry.name) return entry.method;
  }
  if (name == "ta") return JobMethod::kTaskArithmetic;
  if (name == "tall") return JobMethod::kConsensus;
  std::vector<std::string> names;
  for (const MethodName& entry : kMethodNames) names.push_back(entry.name);
  return absl::InvalidArgumentError(absl::StrCat("unknown method \"", name,
                                                 "\"; expected one of ",
                                                 absl::StrJoin(names, ", ")));
}

bool IsDataFreeMerge(JobMethod method) {
  return method != JobMethod::kDam && method != JobMethod::kLfpm &&
         method != JobMethod::kAdaMerging;
}

MergeMethod ToMergeMethod(JobMethod method) {
  switch (method) {
    case JobMethod::kTies:
      return MergeMethod::kTies;
    case JobMethod::kDare:
      return MergeMethod::kDare;
    case JobMethod::kBreadcrumbs:
      return MergeMethod::kBreadcrumbs;
    case JobMethod::kConsensus:
      return MergeMethod::kConsensus;
    case JobMethod::kModelStock:
      return MergeMethod::kModelStock;
    case JobMethod::kWeightedAverage:
      return MergeMethod::kWeightedAverage;
    default:
      return MergeMethod::kTaskArithmetic;
  }
}

JobMethod FromMergeMethod(MergeMethod method) {
  switch (method) {
    case MergeMethod::kTies:
      return JobMethod::kTies;
    case MergeMethod::kDare:
      return JobMethod::kDare;
    case MergeMethod::kBreadcrumbs:
      return JobMethod::kBreadcrumbs;
    case MergeMethod::kConsensus:
      return JobMethod::kConsensus;
    case MergeMethod::kModelStock:
      return JobMethod::kModelStock;
    case MergeMethod::kWeightedAverage:
      return JobMethod::kWeightedAverage;
    case MergeMethod::kTaskArithmetic:
      break;
  }
  return JobMethod::kTaskArithmetic;
}

absl::Status ValidateJobSpec(const JobSpec& spec) {
  if (spec.inputs.empty()) {
    return FieldError("inputs", "at least one task model is required");
  }
  if (spec.inputs.size() > kMaxInputs) {
    return FieldError("inputs",
                      absl::StrCat("at most ", kMaxInputs, " task models, got ",
                                   spec.inputs.size()));
  }
  const bool needs_base = spec.method != JobMethod::kWeightedAverage;
  if (spec.base_digest.empty()) {
    if (needs_base) {
      return FieldError(
          "base_sha256",
          absl::StrCat("is required for method ", JobMethodName(spec.method),
                       " (only weighted_average works without "
                       "a base model)"));
    }
  } else {
    RETURN_IF_ERROR(CheckDigest("base_sha256", spec.base_digest));
  }
  std::set<std::string> names;
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    const JobInputSpec& input = spec.inputs[i];
    const std::string field = absl::StrCat("inputs[", i, "]");
    if (input.name.empty() || input.name.size() > kMaxTaskNameBytes ||
        input.name.find('/') != std::string::npos) {
      return FieldError(absl::StrCat(field, ".name"),
                        absl::StrCat("invalid task name \"", input.name,
                                     "\" (1-128 bytes, no '/')"));
    }
    if (!names.insert(input.name).second) {
      return FieldError(absl::StrCat(field, ".name"),
                        absl::StrCat("duplicate task name \"", input.name,
                                     "\"; give each model a distinct name"));
    }
    if (!std::isfinite(input.weight)) {
      return FieldError(absl::StrCat(field, ".weight"), "must be finite");
    }
    if (!input.model_digest.empty()) {
      if (!input.lora_weights_digest.empty() ||
          !input.lora_config_digest.empty()) {
        return FieldError(field, "set either model_sha256 or lora, not both");
      }
      RETURN_IF_ERROR(CheckDigest(absl::StrCat(field, ".model_sha256"),
                                  input.model_digest));
    } else {
      if (input.lora_weights_digest.empty() &&
          input.lora_config_digest.empty()) {
        return FieldError(field, "set model_sha256 or lora");
      }
      RETURN_IF_ERROR(CheckDigest(absl::StrCat(field, ".lora.weights_sha256"),
                                  input.lora_weights_digest));
      RETURN_IF_ERROR(CheckDigest(absl::StrCat(field, ".lora.config_sha256"),
                                  input.lora_config_digest));
      if (spec.base_digest.empty()) {
        return FieldError(absl::StrCat(field, ".lora"),
                          "a LoRA adapter needs base_sha256 (the model it "
                          "adapts)");
      }
    }
  }
  if (spec.architecture.size() > kMaxArchitectureNameBytes) {
    return FieldError("architecture", "must be at most 64 bytes");
  }
  for (size_t i = 0; i < spec.calibration.size(); ++i) {
    const CalibrationRef& ref = spec.calibration[i];
    const std::string field = absl::StrCat("calibration[", i, "]");
    if (!names.count(ref.task)) {
      return FieldError(
          absl::StrCat(field, ".task"),
          absl::StrCat("\"", ref.task, "\" is not the name of an input"));
    }
    RETURN_IF_ERROR(CheckDigest(absl::StrCat(field, ".sha256"), ref.digest));
  }
  RETURN_IF_ERROR(ValidateHyperparameters(spec));
  std::set<std::string> probed;
  for (size_t i = 0; i < spec.probes.size(); ++i) {
    const CalibrationRef& ref = spec.probes[i];
    const std::string field = absl::StrCat("probes[", i, "]");
    if (IsDataFreeMerge(spec.method)) {
      return FieldError(field,
                        "probe sets are evaluated for adamerging, dam "
                        "and lfpm jobs only");
    }
    if (!names.count(ref.task)) {
      return FieldError(
          absl::StrCat(field, ".task"),
          absl::StrCat("\"", ref.task, "\" is not the name of an input"));
    }
    if (!probed.insert(ref.task).second) {
      return FieldError(
          absl::StrCat(field, ".task"),
          absl::StrCat("task \"", ref.task, "\" has more than one probe set"));
    }
    RETURN_IF_ERROR(CheckDigest(absl::StrCat(field, ".sha256"), ref.digest));
  }
  if (!IsDataFreeMerge(spec.method)) {
    if (spec.architecture.empty()) {
      return FieldError(
          "architecture",
          absl::StrCat("is required for method ", JobMethodName(spec.method)));
    }
    std::set<std::string> calibrated;
    for (const CalibrationRef& ref : spec.calibration) {
      if (!calibrated.insert(ref.task).second) {
        return FieldError("calibration",
                          absl::StrCat("task \"", ref.task,
                                       "\" has more than one calibration set"));
      }
    }
    for (size_t i = 0; i < spec.inputs.size(); ++i) {
      const JobInputSpec& input = spec.inputs[i];
      if (!calibrated.count(input.name)) {
        return FieldError("calibration",
                          absl::StrCat("method ", JobMethodName(spec.method),
                                       " needs a calibration set for task \"",
                                       input.name, "\""));
      }
      if (input.is_lora()) {
        // A data-dependent method runs each task's head, which an adapter
        // does not carry.
        return FieldError(
            absl::StrCat("inputs[", i, "].lora"),
            absl::StrCat("method ", JobMethodName(spec.method),
                         " needs full task checkpoints (backbone and head); "
                         "merge the adapter into its model first"));
      }
    }
    if (spec.base_digest.empty()) {
      return FieldError(
          "base_sha256",
          absl::StrCat("is required for method ", JobMethodName(spec.method)));
    }
    RETURN_IF_ERROR(DefenseOptionsFromSpec(spec).status());
  } else if (!spec.defense_parameters.empty()) {
    return FieldError(
        absl::StrCat("parameters.", spec.defense_parameters.begin()->first),
        absl::StrCat("is not a parameter of method ",
                     JobMethodName(spec.method)));
  }
  return absl::OkStatus();
}

std::vector<ArtifactReference> ReferencedArtifacts(const JobSpec& spec) {
  std::vector<ArtifactReference> refs;
  if (!spec.base_digest.empty()) {
    refs.push_back({"base_sha256", spec.base_digest, ArtifactRole::kModel});
  }
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    const JobInputSpec& input = spec.inputs[i];
    const std::string field = absl::StrCat("inputs[", i, "]");
    if (!input.is_lora()) {
      refs.push_back({absl::StrCat(field, ".model_sha256"), input.model_digest,
                      ArtifactRole::kModel});
    } else {
      refs.push_back({absl::StrCat(field, ".lora.weights_sha256"),
                      input.lora_weights_digest, ArtifactRole::kLoraWeights});
      refs.push_back({absl::StrCat(field, ".lora.config_sha256"),
                      input.lora_config_digest, ArtifactRole::kLoraConfig});
    }
  }
  for (size_t i = 0; i < spec.calibration.size(); ++i) {
    refs.push_back({absl::StrCat("calibration[", i, "].sha256"),
                    spec.calibration[i].digest, ArtifactRole::kCalibration});
  }
  // Probe sets are uploaded as calibration data: labeled inputs.
  for (size_t i = 0; i < spec.probes.size(); ++i) {
    refs.push_back({absl::StrCat("probes[", i, "].sha256"),
                    spec.probes[i].digest, ArtifactRole::kCalibration});
  }
  return refs;
}

std::string JobSpecToJson(const JobSpec& spec) {
  return SpecToJsonValue(spec).dump();
}

absl::StatusOr<JobSpec> JobSpecFromJson(absl::string_view json_text) {
  json parsed =
      json::parse(std::string(json_text), nullptr, /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    return absl::InvalidArgumentError("job spec: invalid JSON");
  }
  absl::StatusOr<JobSpec> spec = SpecFromJsonValue(parsed);
  if (!spec.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("job spec: ", spec.status().message()));
  }
  return spec;
}

absl::StatusOr<JobOutput> RunJob(const JobSpec& spec,
                                 const ArtifactResolver& resolve,
                                 const std::string& work_dir,
                                 const JobContext& context) {
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  if (IsDataFreeMerge(spec.method)) {
    return RunDataFreeMerge(spec, resolve, work_dir, context);
  }
  // They report progress per optimizer step and poll context.is_cancelled
  // before each one.
  return RunDataDependent(spec, resolve, work_dir, context);
}

}  // namespace mergeguard
