#include "client/local_merge.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/adamerging.h"
#include "core/dam.h"
#include "core/defense_params.h"
#include "core/file_util.h"
#include "core/lfpm.h"
#include "core/status_macros.h"

namespace mergeguard {
namespace {

absl::Status MakeDirectories(const std::string& path) {
  std::string partial;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      partial = path.substr(0, i);
      if (partial.empty()) continue;
      if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoToStatus(errno, absl::StrCat("create directory ", partial));
      }
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out ", path, " exists and is not a directory"));
  }
  return absl::OkStatus();
}

bool IsFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

using json = nlohmann::json;

absl::StatusOr<LocalMergeResult> RunDataFree(const MergeConfig& config,
                                             const std::string& out_dir,
                                             const LocalMergeOptions& hooks) {
  LocalMergeResult result;
  const bool sharded = config.options.writer.max_shard_bytes > 0;
  result.model_path =
      sharded ? out_dir : absl::StrCat(out_dir, "/", kSingleFileName);
  result.report_path = absl::StrCat(out_dir, "/report.json");
  MergeOptions options = config.options;
  options.is_cancelled = hooks.is_cancelled;
  ASSIGN_OR_RETURN(result.report, Merge(config.base, config.models,
                                        result.model_path, options));
  json report = {
      {"method", std::string(JobMethodName(config.method))},
      {"model", result.model_path},
      {"merged_tensors", result.report.merged_tensors},
      {"head_tensors", result.report.head_tensors},
      {"bytes_read", result.report.bytes_read},
      {"bytes_written", result.report.bytes_written},
      {"seconds", result.report.seconds},
  };
  if (config.options.method == MergeMethod::kModelStock) {
    report["model_stock_ratio"] = result.report.model_stock_ratio;
  }
  json inputs = json::array();
  for (const MergeInput& input : config.models) {
    inputs.push_back(
        {{"name", input.name}, {"path", input.path}, {"weight", input.weight}});
  }
  report["inputs"] = inputs;
  report["base"] = config.base;
  RETURN_IF_ERROR(WriteFileAtomically(result.report_path, report.dump(2)));
  result.summary =
      absl::StrFormat("merged %d tensors (+%d head tensors) with %s in %.2fs",
                      result.report.merged_tensors, result.report.head_tensors,
                      JobMethodName(config.method), result.report.seconds);
  return result;
}

// RunDataDependent runs AdaMerging, DAM or LFPM on local files, as the
// server's runner does on stored artifacts.
absl::StatusOr<LocalMergeResult> RunDataDependent(
    const MergeConfig& config, const std::string& out_dir,
    const LocalMergeOptions& hooks) {
  if (!IsFile(config.architecture)) {
    return absl::NotFoundError(absl::StrCat(
        "architecture: no file ", config.architecture,
        " (locally, architecture: is a TorchScript .pt file; registered "
        "names work only on a server)"));
  }
  LocalMergeResult result;
  result.model_path = absl::StrCat(out_dir, "/", kSingleFileName);
  result.report_path = absl::StrCat(out_dir, "/report.json");
  const std::string method(JobMethodName(config.method));
  const DefenseParameters& parameters = config.defense_parameters;
  const std::map<std::string, std::string> metadata = {
      {"mergeguard.method", method},
      {"mergeguard.parameters", json(parameters).dump()},
      {"mergeguard.architecture", config.architecture},
  };
  ProgressCallback on_progress;
  if (hooks.on_progress) {
    on_progress = [&hooks](const TrainingProgress& p) {
      hooks.on_progress({p.phase, p.step, p.total_steps, p.losses});
    };
  }
  std::vector<DataDependentTask> tasks;
  json inputs = json::array();
  for (const MergeInput& input : config.models) {
    const std::string& calibration = config.calibration.at(input.name);
    tasks.push_back({{input.name, input.path, ""}, calibration});
    inputs.push_back({{"name", input.name},
                      {"path", input.path},
                      {"weight", input.weight},
                      {"calibration", calibration}});
  }
  json report = {
      {"method", method},    {"model", result.model_path},
      {"base", config.base}, {"architecture", config.architecture},
      {"inputs", inputs},    {"parameters", parameters},
  };
  switch (config.method) {
    case JobMethod::kAdaMerging: {
      AdaMergingOptions o;
      RETURN_IF_ERROR(ApplyAdaMergingParameters(parameters, &o));
      o.threads = config.options.threads;
      o.on_progress = on_progress;
      o.is_cancelled = hooks.is_cancelled;
      o.metadata = metadata;
      ASSIGN_OR_RETURN(AdaMergingResult merged,
                       AdaMergeFiles(config.architecture, config.base, tasks,
                                     result.model_path, o));
      report["seconds"] = merged.seconds;
      report["adamerging"] = json::parse(AdaMergingResultToJson(merged, o));
      result.summary = absl::StrFormat(
          "adamerging: %d steps, final entropy %.4g, in %.2fs",
          merged.loss_curve.size(),
          merged.loss_curve.empty() ? 0.0 : merged.loss_curve.back(),
          merged.seconds);
      break;
    }
    case JobMethod::kDam: {
      DamOptions o;
      RETURN_IF_ERROR(ApplyDamParameters(parameters, &o));
      o.threads = config.options.threads;
      o.on_progress = on_progress;
      o.is_cancelled = hooks.is_cancelled;
      o.metadata = metadata;
      ASSIGN_OR_RETURN(DamResult merged,
                       DamMergeFiles(config.architecture, config.base, tasks,
                                     result.model_path, o));
      const DamReport& r = merged.report;
      report["seconds"] = r.seconds;
      report["dam"] = json::parse(DamReportToJson(r, o));
      result.summary = absl::StrFormat(
          "dam: %d meta steps + %d AdaMerging steps, M2 flags %.2f%% of the "
          "backbone, in %.2fs",
          r.outer_steps, r.adamerging_loss.size(),
          100.0 * r.m2_flagged_fraction, r.seconds);
      break;
    }
    case JobMethod::kLfpm: {
      LfpmOptions o;
      RETURN_IF_ERROR(ApplyLfpmParameters(parameters, &o));
      ASSIGN_OR_RETURN(double merge_lambda, LfpmMergeLambda(parameters));
      o.threads = config.options.threads;
      o.is_cancelled = hooks.is_cancelled;
      o.metadata = metadata;
      if (hooks.on_progress) {
        o.on_progress = [&hooks](const LfpmProgress& p) {
          hooks.on_progress({"lfpm", p.step, p.steps, LfpmProgressLosses(p)});
        };
      }
      LfpmJob job;
      job.architecture_path = config.architecture;
      if (!config.merged.empty()) {
        job.merged_model_path = config.merged;
      } else {
        job.base_path = config.base;
        job.task_models = config.models;
      }
      job.tau_output_path = absl::StrCat(out_dir, "/tau_ab.safetensors");
      job.ta_merge = config.options;
      job.ta_merge.method = MergeMethod::kTaskArithmetic;
      job.ta_merge.lambda = merge_lambda;
      job.ta_merge.is_cancelled = hooks.is_cancelled;
      job.ta_merge.writer = CheckpointWriterOptions{};
      for (const MergeInput& input : config.models) {
        job.calibration.push_back(
            {input.name, config.calibration.at(input.name)});
      }
      job.output_path = result.model_path;
      ASSIGN_OR_RETURN(LfpmReport r, RunLfpmJob(job, o));
      report["seconds"] = r.seconds;
      if (config.merged.empty()) {
        report["merge_lambda"] = merge_lambda;
      } else {
        report["merged"] = config.merged;
      }
      report["tau_ab"] = job.tau_output_path;
      report["lfpm"] = json::parse(LfpmReportToJson(r));
      result.summary = absl::StrFormat(
          "lfpm: %d steps, |tau_ab| = %.4g, mined-trigger ASR %.3f -> %.3f, "
          "in %.2fs",
          r.steps, r.tau_norm, r.path.empty() ? 0.0 : r.path.front().asr,
          r.path.empty() ? 0.0 : r.path.back().asr, r.seconds);
      break;
    }
    default:
      return absl::InternalError("not a data-dependent method");
  }
  absl::Status written =
      WriteFileAtomically(result.report_path, report.dump(2));
  if (!written.ok()) {
    ::unlink(result.model_path.c_str());
    return written;
  }
  return result;
}

}  // namespace

absl::StatusOr<LocalMergeResult> RunLocalMerge(
    const MergeConfig& config, const std::string& out_dir,
    const LocalMergeOptions& options) {
  if (!config.probes.empty()) {
    return absl::InvalidArgumentError(
        "probe: probe sets are evaluated by server jobs (mergeguard run); "
        "evaluate a local result with mergeguard-bench eval");
  }
  RETURN_IF_ERROR(MakeDirectories(out_dir));
  if (IsDataFreeMerge(config.method)) {
    return RunDataFree(config, out_dir, options);
  }
  return RunDataDependent(config, out_dir, options);
}

}  // namespace mergeguard
