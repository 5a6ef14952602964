#include "client/merge_config.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <set>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "core/defense_params.h"
#include "core/file_util.h"
#include "core/status_macros.h"

namespace mergeguard {
namespace {

absl::Status FieldError(const YAML::Node& node, absl::string_view field,
                        absl::string_view problem) {
  // yaml-cpp marks are 0-based; people count lines from 1.
  int line = node.IsDefined() ? node.Mark().line + 1 : 0;
  if (line > 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("line ", line, ": ", field, ": ", problem));
  }
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", problem));
}

std::string Describe(const YAML::Node& node) {
  if (node.IsScalar()) return absl::StrCat("\"", node.Scalar(), "\"");
  if (node.IsSequence()) return "a list";
  if (node.IsMap()) return "a mapping";
  return "nothing";
}

absl::StatusOr<double> ReadNumber(const YAML::Node& node,
                                  absl::string_view field) {
  double value;
  if (!node.IsScalar() || !YAML::convert<double>::decode(node, value) ||
      !std::isfinite(value)) {
    return FieldError(node, field,
                      absl::StrCat("expected a number, got ", Describe(node)));
  }
  return value;
}

absl::StatusOr<int64_t> ReadInteger(const YAML::Node& node,
                                    absl::string_view field) {
  int64_t value;
  if (!node.IsScalar() || !YAML::convert<int64_t>::decode(node, value)) {
    return FieldError(
        node, field, absl::StrCat("expected an integer, got ", Describe(node)));
  }
  return value;
}

absl::StatusOr<std::string> ReadString(const YAML::Node& node,
                                       absl::string_view field) {
  if (!node.IsScalar()) {
    return FieldError(node, field,
                      absl::StrCat("expected a string, got ", Describe(node)));
  }
  return node.Scalar();
}

// ReadChoice reads a string that must be one of `choices`.
absl::StatusOr<std::string> ReadChoice(
    const YAML::Node& node, absl::string_view field,
    const std::vector<std::string>& choices) {
  ASSIGN_OR_RETURN(std::string value, ReadString(node, field));
  value = absl::AsciiStrToLower(value);
  for (const std::string& choice : choices) {
    if (value == choice) return value;
  }
  return FieldError(
      node, field,
      absl::StrCat("expected one of ", absl::StrJoin(choices, ", "), "; got \"",
                   value, "\""));
}

// ParseByteSize accepts "512MB", "2GiB", "1000000" and the like.
absl::StatusOr<uint64_t> ReadByteSize(const YAML::Node& node,
                                      absl::string_view field) {
  ASSIGN_OR_RETURN(std::string text, ReadString(node, field));
  std::string digits;
  size_t i = 0;
  while (i < text.size() && (absl::ascii_isdigit(text[i]) || text[i] == '.')) {
    digits += text[i++];
  }
  std::string unit = absl::AsciiStrToLower(
      absl::StripAsciiWhitespace(absl::string_view(text).substr(i)));
  double number;
  if (digits.empty() || !absl::SimpleAtod(digits, &number)) {
    return FieldError(
        node, field,
        absl::StrCat("expected a size such as 2GB, got \"", text, "\""));
  }
  static const std::map<std::string, double> kUnits = {
      {"", 1},     {"b", 1},        {"kb", 1e3},        {"mb", 1e6},
      {"gb", 1e9}, {"kib", 1024.0}, {"mib", 1048576.0}, {"gib", 1073741824.0}};
  auto it = kUnits.find(unit);
  if (it == kUnits.end()) {
    return FieldError(node, field,
                      absl::StrCat("unknown size unit \"", unit,
                                   "\" (use B, KB, MB, GB, KiB, MiB or GiB)"));
  }
  return static_cast<uint64_t>(number * it->second);
}

std::string ResolvePath(const std::string& path, const std::string& base_dir) {
  if (path.empty() || path[0] == '/' || base_dir.empty()) return path;
  return absl::StrCat(base_dir, "/", path);
}

std::string StemOf(const std::string& path) {
  std::string name = path;
  while (!name.empty() && name.back() == '/') name.pop_back();
  size_t slash = name.find_last_of('/');
  if (slash != std::string::npos) name = name.substr(slash + 1);
  size_t dot = name.find('.');
  if (dot != std::string::npos && dot > 0) name = name.substr(0, dot);
  return name;
}

using ParameterSetter = std::function<absl::Status(
    const YAML::Node&, const std::string&, MergeOptions&)>;

struct ParameterSpec {
  // Methods the parameter applies to; empty means all.
  std::set<MergeMethod> methods;
  ParameterSetter set;
};

// DoubleParameter builds a setter for a double field checked against
// [min, max] (an open bound when the flag says so).
ParameterSetter DoubleParameter(double min, double max, bool min_open,
                                std::function<double&(MergeOptions&)> field) {
  return [=](const YAML::Node& node, const std::string& name,
             MergeOptions& options) -> absl::Status {
    ASSIGN_OR_RETURN(double value, ReadNumber(node, name));
    bool below = min_open ? value <= min : value < min;
    if (below || value > max) {
      return FieldError(node, name,
                        absl::StrCat("must be in ", min_open ? "(" : "[", min,
                                     ", ", max, "], got ", value));
    }
    field(options) = value;
    return absl::OkStatus();
  };
}

const std::map<std::string, ParameterSpec>& Parameters() {
  using M = MergeMethod;
  constexpr double kInf = std::numeric_limits<double>::infinity();
  static const auto* kParameters = new std::map<std::string, ParameterSpec>{
      {"lambda",
       {{M::kTaskArithmetic, M::kTies, M::kDare, M::kBreadcrumbs},
        DoubleParameter(-kInf, kInf, false,
                        [](MergeOptions& o) -> double& { return o.lambda; })}},
      {"top_k",
       {{M::kTies, M::kDare},
        DoubleParameter(
            0, 100, true,
            [](MergeOptions& o) -> double& { return o.ties.top_k_percent; })}},
      {"trim_scope",
       {{M::kTies, M::kDare},
        [](const YAML::Node& node, const std::string& name,
           MergeOptions& o) -> absl::Status {
          ASSIGN_OR_RETURN(std::string v,
                           ReadChoice(node, name, {"global", "tensor"}));
          o.ties.trim_scope =
              v == "global" ? TrimScope::kGlobal : TrimScope::kTensor;
          return absl::OkStatus();
        }}},
      {"disjoint",
       {{M::kTies, M::kDare},
        [](const YAML::Node& node, const std::string& name,
           MergeOptions& o) -> absl::Status {
          ASSIGN_OR_RETURN(std::string v,
                           ReadChoice(node, name, {"mean", "sum"}));
          o.ties.disjoint =
              v == "mean" ? DisjointMode::kMean : DisjointMode::kSum;
          return absl::OkStatus();
        }}},
      {"drop_rate",
       {{M::kDare},
        DoubleParameter(
            0, 1, false,
            [](MergeOptions& o) -> double& { return o.dare.drop_rate; })}},
      {"combine",
       {{M::kDare},
        [](const YAML::Node& node, const std::string& name,
           MergeOptions& o) -> absl::Status {
          ASSIGN_OR_RETURN(std::string v,
                           ReadChoice(node, name, {"task_arithmetic", "ties"}));
          o.dare.combine =
              v == "ties" ? DareCombine::kTies : DareCombine::kTaskArithmetic;
          return absl::OkStatus();
        }}},
      {"seed",
       {{M::kDare},
        [](const YAML::Node& node, const std::string& name,
           MergeOptions& o) -> absl::Status {
          ASSIGN_OR_RETURN(int64_t v, ReadInteger(node, name));
          if (v < 0) return FieldError(node, name, "must be >= 0");
          o.dare.seed = static_cast<uint64_t>(v);
          return absl::OkStatus();
        }}},
      {"gamma",
       {{M::kBreadcrumbs},
        DoubleParameter(
            0, 1, false,
            [](MergeOptions& o) -> double& { return o.breadcrumbs.gamma; })}},
      {"density",
       {{M::kBreadcrumbs},
        DoubleParameter(
            0, 1, true,
            [](MergeOptions& o) -> double& { return o.breadcrumbs.density; })}},
      {"tall_lambda",
       {{M::kConsensus},
        DoubleParameter(0, kInf, false,
                        [](MergeOptions& o) -> double& {
                          return o.consensus.tall_lambda;
                        })}},
      {"min_agreeing",
       {{M::kConsensus},
        [](const YAML::Node& node, const std::string& name,
           MergeOptions& o) -> absl::Status {
          ASSIGN_OR_RETURN(int64_t v, ReadInteger(node, name));
          if (v < 1) return FieldError(node, name, "must be >= 1");
          o.consensus.min_agreeing = static_cast<int>(v);
          return absl::OkStatus();
        }}},
      {"alpha",
       {{M::kConsensus},
        DoubleParameter(
            -kInf, kInf, false,
            [](MergeOptions& o) -> double& { return o.consensus.alpha; })}},
      {"cosine_scope",
       {{M::kModelStock},
        [](const YAML::Node& node, const std::string& name,
           MergeOptions& o) -> absl::Status {
          ASSIGN_OR_RETURN(std::string v,
                           ReadChoice(node, name, {"global", "tensor"}));
          o.model_stock.cosine_scope =
              v == "global" ? CosineScope::kGlobal : CosineScope::kTensor;
          return absl::OkStatus();
        }}},
  };
  return *kParameters;
}

absl::Status ParseModels(const YAML::Node& node, const std::string& base_dir,
                         MergeConfig& config) {
  if (!node.IsSequence() || node.size() == 0) {
    return FieldError(node, "models",
                      absl::StrCat("expected a non-empty list of models, got ",
                                   Describe(node)));
  }
  std::set<std::string> names;
  for (size_t i = 0; i < node.size(); ++i) {
    const YAML::Node& entry = node[i];
    std::string field = absl::StrCat("models[", i, "]");
    MergeInput input;
    std::string calibration;
    std::string probe;
    if (entry.IsScalar()) {
      input.path = ResolvePath(entry.Scalar(), base_dir);
    } else if (entry.IsMap()) {
      for (const auto& kv : entry) {
        std::string key = kv.first.Scalar();
        std::string sub = absl::StrCat(field, ".", key);
        if (key == "path") {
          ASSIGN_OR_RETURN(std::string path, ReadString(kv.second, sub));
          input.path = ResolvePath(path, base_dir);
        } else if (key == "name") {
          ASSIGN_OR_RETURN(input.name, ReadString(kv.second, sub));
        } else if (key == "weight") {
          ASSIGN_OR_RETURN(input.weight, ReadNumber(kv.second, sub));
        } else if (key == "calibration") {
          if (IsDataFreeMerge(config.method)) {
            return FieldError(kv.first, sub,
                              absl::StrCat("does not apply to method ",
                                           JobMethodName(config.method),
                                           " (data-free merges need no "
                                           "calibration data)"));
          }
          ASSIGN_OR_RETURN(calibration, ReadString(kv.second, sub));
          calibration = ResolvePath(calibration, base_dir);
        } else if (key == "probe") {
          if (IsDataFreeMerge(config.method)) {
            return FieldError(kv.first, sub,
                              absl::StrCat("does not apply to method ",
                                           JobMethodName(config.method),
                                           " (probe sets are evaluated by "
                                           "adamerging, dam and lfpm jobs)"));
          }
          ASSIGN_OR_RETURN(probe, ReadString(kv.second, sub));
          probe = ResolvePath(probe, base_dir);
        } else {
          return FieldError(kv.first, sub,
                            "unknown field (expected path, name, weight, "
                            "calibration or probe)");
        }
      }
      if (input.path.empty() && config.merged.empty()) {
        return FieldError(entry, absl::StrCat(field, ".path"), "is required");
      }
    } else {
      return FieldError(entry, field,
                        "expected a path or a mapping with path, name, weight");
    }
    if (input.name.empty()) input.name = StemOf(input.path);
    if (input.name.empty() || input.name.find('/') != std::string::npos) {
      return FieldError(entry, absl::StrCat(field, ".name"),
                        absl::StrCat("invalid task name \"", input.name,
                                     "\" (non-empty, no '/')"));
    }
    if (!names.insert(input.name).second) {
      return FieldError(entry, absl::StrCat(field, ".name"),
                        absl::StrCat("duplicate task name \"", input.name,
                                     "\"; give each model a distinct name"));
    }
    if (!calibration.empty()) config.calibration[input.name] = calibration;
    if (!probe.empty()) config.probes[input.name] = probe;
    config.models.push_back(std::move(input));
  }
  return absl::OkStatus();
}

std::vector<DefenseParameterInfo> DefenseParameterInfoOf(JobMethod method) {
  switch (method) {
    case JobMethod::kAdaMerging:
      return AdaMergingParameterInfo();
    case JobMethod::kDam:
      return DamParameterInfo();
    case JobMethod::kLfpm:
      return LfpmParameterInfo();
    default:
      return {};
  }
}

// ApplyToDefaultOptions checks `parameters` the way the job's runner will
// read them.
absl::Status ApplyToDefaultOptions(JobMethod method,
                                   const DefenseParameters& parameters) {
  absl::Status status;
  switch (method) {
    case JobMethod::kAdaMerging: {
      AdaMergingOptions options;
      status = ApplyAdaMergingParameters(parameters, &options);
      break;
    }
    case JobMethod::kDam: {
      DamOptions options;
      status = ApplyDamParameters(parameters, &options);
      break;
    }
    case JobMethod::kLfpm: {
      LfpmOptions options;
      status = ApplyLfpmParameters(parameters, &options);
      break;
    }
    default:
      return absl::InternalError("not a data-dependent method");
  }
  // FAILED_PRECONDITION only says CUDA is absent here (the device is checked
  // after everything else); a server may have the GPU this client lacks.
  if (status.code() == absl::StatusCode::kFailedPrecondition) {
    return absl::OkStatus();
  }
  return status;
}

// FlatParameter is one entry of `parameters:` as text, with its key for
// errors.
struct FlatParameter {
  std::string text;
  YAML::Node key;
};

// FlattenParameters turns nested mappings into dotted names and lists (of
// the list-typed parameters in `lists`) into comma-separated text.
absl::Status FlattenParameters(const YAML::Node& node,
                               const std::string& prefix,
                               const std::set<std::string>& lists,
                               std::map<std::string, FlatParameter>& flat) {
  for (const auto& kv : node) {
    const std::string name = absl::StrCat(prefix, kv.first.Scalar());
    const std::string field = absl::StrCat("parameters.", name);
    const YAML::Node& value = kv.second;
    FlatParameter entry{"", kv.first};
    if (value.IsMap()) {
      RETURN_IF_ERROR(
          FlattenParameters(value, absl::StrCat(name, "."), lists, flat));
      continue;
    }
    if (value.IsSequence()) {
      if (!lists.count(name)) {
        return FieldError(value, field, "expected a single value, got a list");
      }
      std::vector<std::string> items;
      for (const YAML::Node& item : value) {
        if (!item.IsScalar() || item.Scalar().find(',') != std::string::npos) {
          return FieldError(item, field,
                            absl::StrCat("expected a list of names without "
                                         "commas, got ",
                                         Describe(item)));
        }
        items.push_back(item.Scalar());
      }
      entry.text = absl::StrJoin(items, ",");
    } else if (value.IsScalar()) {
      entry.text = value.Scalar();
    } else {
      return FieldError(kv.first, field, "expected a value, got nothing");
    }
    if (!flat.emplace(name, std::move(entry)).second) {
      return FieldError(kv.first, field, "is given twice");
    }
  }
  return absl::OkStatus();
}

// LocateParameterError adds the line of the entry `status` is about.
absl::Status LocateParameterError(
    const absl::Status& status, const YAML::Node& node, JobMethod method,
    const std::map<std::string, FlatParameter>& flat) {
  const absl::string_view message = status.message();
  constexpr absl::string_view kPrefix = "parameters.";
  if (absl::StartsWith(message, kPrefix)) {
    const size_t colon = message.find(':');
    const std::string name(
        message.substr(kPrefix.size(), colon - kPrefix.size()));
    if (auto it = flat.find(name); it != flat.end()) {
      const absl::string_view problem =
          colon == absl::string_view::npos
              ? message
              : absl::StripLeadingAsciiWhitespace(message.substr(colon + 1));
      return FieldError(it->second.key, absl::StrCat(kPrefix, name), problem);
    }
  }
  // Range checks name the options field, not the entry: find the entry that
  // fails on its own, else blame the whole block.
  for (const auto& [name, entry] : flat) {
    absl::Status alone = ApplyToDefaultOptions(method, {{name, entry.text}});
    if (!alone.ok()) {
      return FieldError(entry.key, absl::StrCat(kPrefix, name),
                        alone.message());
    }
  }
  return FieldError(node, "parameters", message);
}

absl::Status ParseDefenseParameters(const YAML::Node& node,
                                    MergeConfig& config) {
  std::set<std::string> lists;
  for (const DefenseParameterInfo& info :
       DefenseParameterInfoOf(config.method)) {
    if (absl::StartsWith(info.type, "comma-separated")) lists.insert(info.name);
  }
  std::map<std::string, FlatParameter> flat;
  RETURN_IF_ERROR(FlattenParameters(node, "", lists, flat));
  DefenseParameters parameters;
  for (const auto& [name, entry] : flat) parameters[name] = entry.text;
  absl::Status status = ApplyToDefaultOptions(config.method, parameters);
  if (!status.ok()) {
    return LocateParameterError(status, node, config.method, flat);
  }
  config.defense_parameters = std::move(parameters);
  return absl::OkStatus();
}

absl::Status ParseParameters(const YAML::Node& node, MergeConfig& config) {
  if (!node.IsMap()) {
    return FieldError(node, "parameters",
                      absl::StrCat("expected a mapping, got ", Describe(node)));
  }
  if (!IsDataFreeMerge(config.method)) {
    return ParseDefenseParameters(node, config);
  }
  const MergeMethod method = config.options.method;
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    const std::string field = absl::StrCat("parameters.", key);
    auto it = Parameters().find(key);
    if (it == Parameters().end()) {
      std::vector<std::string> known;
      for (const auto& [name, spec] : Parameters()) {
        if (spec.methods.empty() || spec.methods.count(method)) {
          known.push_back(name);
        }
      }
      return FieldError(
          kv.first, field,
          absl::StrCat("unknown parameter; ", MergeMethodName(method),
                       " accepts: ",
                       known.empty() ? "none" : absl::StrJoin(known, ", ")));
    }
    if (!it->second.methods.empty() && !it->second.methods.count(method)) {
      return FieldError(
          kv.first, field,
          absl::StrCat("does not apply to method ", MergeMethodName(method)));
    }
    RETURN_IF_ERROR(it->second.set(kv.second, field, config.options));
  }
  return absl::OkStatus();
}

absl::Status ParseRoot(const YAML::Node& root, const std::string& base_dir,
                       MergeConfig& config) {
  if (!root.IsMap()) {
    return absl::InvalidArgumentError(
        "the merge config must be a YAML mapping with method, base and models");
  }
  const YAML::Node method = root["method"];
  if (!method.IsDefined()) {
    return absl::InvalidArgumentError(
        "method: is required (e.g. task_arithmetic, ties, dare, breadcrumbs, "
        "consensus, model_stock, weighted_average, adamerging, dam, lfpm)");
  }
  {
    ASSIGN_OR_RETURN(std::string name, ReadString(method, "method"));
    absl::StatusOr<JobMethod> parsed = ParseJobMethod(name);
    if (!parsed.ok()) {
      return FieldError(method, "method", parsed.status().message());
    }
    config.method = *parsed;
    if (IsDataFreeMerge(config.method)) {
      config.options.method = ToMergeMethod(config.method);
    }
  }
  static const std::set<std::string> kTopLevel = {
      "method",      "base",         "models",        "parameters",
      "head_prefix", "dtype",        "compute_dtype", "threads",
      "shard_size",  "architecture", "merged"};
  // Read first: it decides whether models need paths.
  if (const YAML::Node merged = root["merged"]; merged.IsDefined()) {
    if (config.method != JobMethod::kLfpm) {
      return FieldError(merged, "merged",
                        absl::StrCat("does not apply to method ",
                                     JobMethodName(config.method),
                                     " (only lfpm repairs a merged model)"));
    }
    ASSIGN_OR_RETURN(std::string path, ReadString(merged, "merged"));
    config.merged = ResolvePath(path, base_dir);
  }
  for (const auto& kv : root) {
    const std::string key = kv.first.Scalar();
    if (!kTopLevel.count(key)) {
      return FieldError(kv.first, key,
                        absl::StrCat("unknown field (expected one of ",
                                     absl::StrJoin(kTopLevel, ", "), ")"));
    }
    const YAML::Node& value = kv.second;
    if (key == "base") {
      ASSIGN_OR_RETURN(std::string base, ReadString(value, key));
      config.base = ResolvePath(base, base_dir);
    } else if (key == "models") {
      RETURN_IF_ERROR(ParseModels(value, base_dir, config));
    } else if (key == "head_prefix") {
      ASSIGN_OR_RETURN(config.options.head_prefix, ReadString(value, key));
    } else if (key == "dtype") {
      ASSIGN_OR_RETURN(std::string name, ReadString(value, key));
      absl::StatusOr<DType> dtype = ParseDType(absl::AsciiStrToUpper(name));
      if (!dtype.ok() || !IsFloatingPoint(*dtype)) {
        return FieldError(
            value, key,
            absl::StrCat("expected F32, F16, BF16 or F64, got \"", name, "\""));
      }
      config.options.output_dtype = *dtype;
    } else if (key == "compute_dtype") {
      ASSIGN_OR_RETURN(std::string v,
                       ReadChoice(value, key, {"float32", "float64"}));
      config.options.compute_in_double = v == "float64";
    } else if (key == "threads") {
      ASSIGN_OR_RETURN(int64_t threads, ReadInteger(value, key));
      if (threads < 0 || threads > 1024) {
        return FieldError(value, key, "must be in [0, 1024] (0 = all cores)");
      }
      config.options.threads = static_cast<int>(threads);
    } else if (key == "architecture") {
      if (IsDataFreeMerge(config.method)) {
        return FieldError(kv.first, key,
                          absl::StrCat("does not apply to method ",
                                       JobMethodName(config.method)));
      }
      ASSIGN_OR_RETURN(std::string architecture, ReadString(value, key));
      // A path for local runs, a registered name for the server: resolve
      // only what looks like a file.
      config.architecture = architecture.find('/') != std::string::npos ||
                                    absl::EndsWith(architecture, ".pt")
                                ? ResolvePath(architecture, base_dir)
                                : architecture;
    } else if (key == "shard_size") {
      if (!IsDataFreeMerge(config.method)) {
        return FieldError(kv.first, key,
                          absl::StrCat("does not apply to method ",
                                       JobMethodName(config.method),
                                       " (its output is one file)"));
      }
      ASSIGN_OR_RETURN(config.options.writer.max_shard_bytes,
                       ReadByteSize(value, key));
    }
  }
  if (!root["models"].IsDefined()) {
    return absl::InvalidArgumentError("models: is required (a list of models)");
  }
  if (config.base.empty() && config.method != JobMethod::kWeightedAverage &&
      config.merged.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "base: is required for method ", JobMethodName(config.method),
        " (only weighted_average works without a base model)"));
  }
  if (!IsDataFreeMerge(config.method)) {
    if (config.architecture.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "architecture: is required for method ", JobMethodName(config.method),
          " (a TorchScript .pt path, or a name registered on the server)"));
    }
    for (const MergeInput& input : config.models) {
      if (!config.calibration.count(input.name)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "models: task \"", input.name, "\" needs a calibration set for ",
            JobMethodName(config.method),
            " (add `calibration: FILE.safetensors` to its entry)"));
      }
    }
  }
  if (const YAML::Node params = root["parameters"]; params.IsDefined()) {
    RETURN_IF_ERROR(ParseParameters(params, config));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<MergeConfig> ParseMergeConfig(absl::string_view text,
                                             const std::string& base_dir) {
  MergeConfig config;
  YAML::Node root;
  try {
    root = YAML::Load(std::string(text));
    RETURN_IF_ERROR(ParseRoot(root, base_dir, config));
  } catch (const YAML::Exception& e) {
    // Syntax errors carry a mark; yaml-cpp's message already names the line.
    return absl::InvalidArgumentError(
        absl::StrCat("line ", e.mark.line + 1, ", column ", e.mark.column + 1,
                     ": YAML syntax error: ", e.msg));
  }
  return config;
}

absl::StatusOr<MergeConfig> LoadMergeConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  size_t slash = path.find_last_of('/');
  std::string dir = slash == std::string::npos ? "" : path.substr(0, slash);
  absl::StatusOr<MergeConfig> config = ParseMergeConfig(text, dir);
  if (!config.ok()) {
    return absl::Status(config.status().code(),
                        absl::StrCat(path, ": ", config.status().message()));
  }
  return config;
}

absl::StatusOr<std::string> DefenseParameterTable(JobMethod method,
                                                  bool markdown) {
  const std::vector<DefenseParameterInfo> info = DefenseParameterInfoOf(method);
  if (info.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "method ", JobMethodName(method),
        " has no parameter table; expected adamerging, dam or lfpm"));
  }
  std::string table;
  if (markdown) {
    // A '|' inside a cell would end it, even in a code span.
    auto cell = [](absl::string_view text) {
      return absl::StrCat("`", absl::StrReplaceAll(text, {{"|", "\\|"}}), "`");
    };
    table = "| Parameter | Type | Default |\n|---|---|---|\n";
    for (const DefenseParameterInfo& p : info) {
      absl::StrAppend(
          &table, "| ", cell(p.name), " | ", cell(p.type), " | ",
          p.default_value.empty() ? "(empty)" : cell(p.default_value), " |\n");
    }
    return table;
  }
  constexpr absl::string_view kName = "PARAMETER", kType = "TYPE";
  size_t name_width = kName.size(), type_width = kType.size();
  for (const DefenseParameterInfo& p : info) {
    name_width = std::max(name_width, p.name.size());
    type_width = std::max(type_width, p.type.size());
  }
  auto row = [&](absl::string_view name, absl::string_view type,
                 absl::string_view value) {
    absl::StrAppend(
        &table,
        absl::StrFormat("%-*s  %-*s  %s\n", static_cast<int>(name_width), name,
                        static_cast<int>(type_width), type, value));
  };
  row(kName, kType, "DEFAULT");
  for (const DefenseParameterInfo& p : info) {
    row(p.name, p.type, p.default_value.empty() ? "(empty)" : p.default_value);
  }
  return table;
}

}  // namespace mergeguard
