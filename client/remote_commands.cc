#include "client/remote_commands.h"

#include <sys/stat.h>

#include <cerrno>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/progress_format.h"
#include "core/checkpoint.h"
#include "core/file_util.h"
#include "core/lora.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "proto/job_spec_convert.h"

namespace mergeguard {
namespace {

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

// ModelFileOf returns the single safetensors file a model path names. The
// service stores one file per artifact, so sharded checkpoints must be merged
// locally (or consolidated) for now.
absl::StatusOr<std::string> ModelFileOf(const std::string& path,
                                        absl::string_view field) {
  RETURN_IF_ERROR(CheckNotPickle(path));
  if (!IsDirectory(path)) {
    if (!IsFile(path)) {
      return absl::NotFoundError(absl::StrCat(field, ": no file ", path));
    }
    return path;
  }
  std::string single = absl::StrCat(path, "/", kSingleFileName);
  if (IsFile(single)) return single;
  if (IsFile(absl::StrCat(path, "/", kShardIndexFileName))) {
    return absl::UnimplementedError(absl::StrCat(
        field, ": ", path,
        " is a sharded checkpoint; the service takes single-file checkpoints "
        "(run this job with --local, or save it as one file)"));
  }
  return absl::NotFoundError(
      absl::StrCat(field, ": ", path, " holds no model.safetensors"));
}

absl::StatusOr<std::string> UploadAndLog(SanitizerClient& client,
                                         const std::string& path,
                                         v1::ArtifactKind kind,
                                         std::ostream& out) {
  ASSIGN_OR_RETURN(v1::Artifact artifact, client.UploadFile(path, kind));
  out << (artifact.already_present() ? "present  " : "uploaded ")
      << artifact.sha256().substr(0, 12) << "  " << path << std::endl;
  return artifact.sha256();
}

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

JobProgress FromProto(const v1::JobProgress& proto) {
  JobProgress progress;
  progress.phase = proto.phase();
  progress.step = proto.step();
  progress.total_steps = proto.total_steps();
  progress.losses.insert(proto.losses().begin(), proto.losses().end());
  return progress;
}

bool IsTerminal(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

absl::Status JobError(const v1::Job& job) {
  if (job.state() == v1::JOB_STATE_CANCELLED) {
    return absl::CancelledError(
        absl::StrCat("job ", job.id(), " was cancelled"));
  }
  absl::StatusCode code = static_cast<absl::StatusCode>(job.error_code());
  if (code == absl::StatusCode::kOk) code = absl::StatusCode::kUnknown;
  return absl::Status(
      code, absl::StrCat("job ", job.id(), " failed: ", job.error_message()));
}

absl::Status MakeDirectory(const std::string& path) {
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoToStatus(errno, absl::StrCat("create directory ", path));
  }
  return absl::OkStatus();
}

}  // namespace

std::string JobStateName(v1::JobState state) {
  std::string name = v1::JobState_Name(state);
  const std::string prefix = "JOB_STATE_";
  if (name.rfind(prefix, 0) == 0) name = name.substr(prefix.size());
  return name;
}

absl::StatusOr<v1::JobSpec> BuildRemoteJobSpec(SanitizerClient& client,
                                               const MergeConfig& config,
                                               std::ostream& out) {
  JobSpec spec;
  spec.method = config.method;
  spec.merge = config.options;
  spec.architecture = config.architecture;
  spec.defense_parameters = config.defense_parameters;
  // Checked before anything is uploaded: a server runs only the
  // architectures its operator registered.
  if (!IsDataFreeMerge(config.method) &&
      config.architecture.find('/') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(
        "architecture: \"", config.architecture,
        "\" is a file; a server job names an architecture registered on the "
        "server (run with --local to use a .pt file)"));
  }
  if (!config.merged.empty()) {
    return absl::InvalidArgumentError(
        "merged: a server job repairs the task-arithmetic merge of base and "
        "models; repair a given merged model locally (mergeguard merge)");
  }
  if (!config.base.empty()) {
    ASSIGN_OR_RETURN(std::string base, ModelFileOf(config.base, "base"));
    ASSIGN_OR_RETURN(spec.base_digest,
                     UploadAndLog(client, base, v1::ARTIFACT_KIND_MODEL, out));
  }
  for (size_t i = 0; i < config.models.size(); ++i) {
    const MergeInput& model = config.models[i];
    JobInputSpec input;
    input.name = model.name;
    input.weight = model.weight;
    if (IsLoraAdapterDir(model.path)) {
      ASSIGN_OR_RETURN(
          input.lora_weights_digest,
          UploadAndLog(client,
                       absl::StrCat(model.path, "/", kAdapterWeightsFileName),
                       v1::ARTIFACT_KIND_LORA_WEIGHTS, out));
      ASSIGN_OR_RETURN(
          input.lora_config_digest,
          UploadAndLog(client,
                       absl::StrCat(model.path, "/", kAdapterConfigFileName),
                       v1::ARTIFACT_KIND_LORA_CONFIG, out));
    } else {
      ASSIGN_OR_RETURN(
          std::string file,
          ModelFileOf(model.path, absl::StrCat("models[", i, "]")));
      ASSIGN_OR_RETURN(
          input.model_digest,
          UploadAndLog(client, file, v1::ARTIFACT_KIND_MODEL, out));
    }
    spec.inputs.push_back(std::move(input));
  }
  for (const auto& [task, path] : config.calibration) {
    ASSIGN_OR_RETURN(
        std::string digest,
        UploadAndLog(client, path, v1::ARTIFACT_KIND_CALIBRATION, out));
    spec.calibration.push_back({task, digest});
  }
  for (const auto& [task, path] : config.probes) {
    ASSIGN_OR_RETURN(
        std::string digest,
        UploadAndLog(client, path, v1::ARTIFACT_KIND_CALIBRATION, out));
    spec.probes.push_back({task, digest});
  }
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  v1::JobSpec proto;
  JobSpecToProto(spec, &proto);
  return proto;
}

absl::Status UploadCommand(SanitizerClient& client,
                           const std::vector<std::string>& paths,
                           v1::ArtifactKind kind, std::ostream& out) {
  if (paths.empty()) {
    return absl::InvalidArgumentError("upload needs at least one FILE");
  }
  for (const std::string& path : paths) {
    if (kind == v1::ARTIFACT_KIND_MODEL) RETURN_IF_ERROR(CheckNotPickle(path));
    ASSIGN_OR_RETURN(v1::Artifact artifact, client.UploadFile(path, kind));
    out << artifact.sha256() << "  " << artifact.size_bytes() << "  " << path
        << (artifact.already_present() ? "  (already stored)" : "") << "\n";
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::Job> SubmitCommand(SanitizerClient& client,
                                      const MergeConfig& config,
                                      std::ostream& out) {
  ASSIGN_OR_RETURN(v1::JobSpec spec, BuildRemoteJobSpec(client, config, out));
  ASSIGN_OR_RETURN(v1::Job job, client.SubmitJob(spec));
  out << "job " << job.id() << " " << JobStateName(job.state()) << std::endl;
  return job;
}

absl::StatusOr<v1::Job> WatchCommand(SanitizerClient& client,
                                     const std::string& job_id,
                                     const WatchOptions& options,
                                     std::ostream& out) {
  int64_t last_step = -1;
  std::string last_phase;
  v1::JobState last_state = v1::JOB_STATE_UNSPECIFIED;
  bool drew_bar = false;
  auto on_event = [&](const v1::JobEvent& event) {
    const v1::Job& job = event.job();
    const JobProgress progress = FromProto(job.progress());
    if (options.progress_bar) {
      constexpr int kWidth = 30;
      double fraction =
          progress.total_steps > 0
              ? std::min(1.0, static_cast<double>(progress.step) /
                                  static_cast<double>(progress.total_steps))
              : 0.0;
      int filled = static_cast<int>(fraction * kWidth);
      double eta = fraction > 0
                       ? event.elapsed_seconds() * (1 - fraction) / fraction
                       : NAN;
      out << "\r\033[K" << JobStateName(job.state()) << " ["
          << std::string(filled, '#') << std::string(kWidth - filled, '.')
          << "] " << progress.phase << " " << progress.step << "/"
          << progress.total_steps << " " << FormatLosses(progress.losses)
          << " ETA " << FormatDuration(eta) << std::flush;
      drew_bar = true;
      return;
    }
    // Plain lines for logs: one per state change, phase change or step.
    if (job.state() == last_state && progress.phase == last_phase &&
        progress.step == last_step) {
      return;
    }
    last_state = job.state();
    last_phase = progress.phase;
    last_step = progress.step;
    // Flushed: a log or pipe should see progress as it happens.
    out << FormatProgressLine(event.elapsed_seconds(),
                              JobStateName(job.state()), progress)
        << std::flush;
  };
  absl::StatusOr<v1::Job> job = client.WatchJob(job_id, on_event);
  if (drew_bar) out << "\n";
  if (!job.ok()) return job.status();
  out << "job " << job->id() << " " << JobStateName(job->state()) << "\n";
  if (job->state() != v1::JOB_STATE_SUCCEEDED) return JobError(*job);
  return job;
}

absl::Status DownloadCommand(SanitizerClient& client,
                             const std::string& job_id_or_digest,
                             const std::string& out_dir, std::ostream& out) {
  RETURN_IF_ERROR(MakeDirectory(out_dir));
  if (IsSha256Hex(job_id_or_digest)) {
    std::string path = absl::StrCat(out_dir, "/", job_id_or_digest);
    RETURN_IF_ERROR(client.DownloadToFile(job_id_or_digest, path));
    out << "downloaded " << path << "\n";
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(v1::Job job, client.GetJob(job_id_or_digest));
  if (job.state() != v1::JOB_STATE_SUCCEEDED) {
    if (IsTerminal(job.state())) return JobError(job);
    return absl::FailedPreconditionError(
        absl::StrCat("job ", job.id(), " is ", JobStateName(job.state()),
                     "; wait for it with `mergeguard watch ", job.id(), "`"));
  }
  const std::string model = absl::StrCat(out_dir, "/", kSingleFileName);
  const std::string report = absl::StrCat(out_dir, "/report.json");
  RETURN_IF_ERROR(client.DownloadToFile(job.result().model().sha256(), model));
  RETURN_IF_ERROR(
      client.DownloadToFile(job.result().report().sha256(), report));
  out << "model:  " << model << "\nreport: " << report << "\n";
  return absl::OkStatus();
}

absl::Status JobsCommand(SanitizerClient& client, std::ostream& out) {
  std::string page_token;
  out << absl::StrFormat("%-36s %-10s %-16s %s\n", "JOB", "STATE", "METHOD",
                         "PROGRESS");
  do {
    ASSIGN_OR_RETURN(v1::ListJobsResponse page,
                     client.ListJobs(100, page_token));
    for (const v1::Job& job : page.jobs()) {
      std::string method = v1::Method_Name(job.spec().method());
      if (method.rfind("METHOD_", 0) == 0) method = method.substr(7);
      out << absl::StrFormat("%-36s %-10s %-16s %s %d/%d\n", job.id(),
                             JobStateName(job.state()), method,
                             job.progress().phase(), job.progress().step(),
                             job.progress().total_steps());
    }
    page_token = page.next_page_token();
  } while (!page_token.empty());
  return absl::OkStatus();
}

absl::Status CancelCommand(SanitizerClient& client, const std::string& job_id,
                           std::ostream& out) {
  ASSIGN_OR_RETURN(v1::Job job, client.CancelJob(job_id));
  out << "job " << job.id() << " " << JobStateName(job.state()) << "\n";
  return absl::OkStatus();
}

absl::Status HealthCommand(SanitizerClient& client, std::ostream& out) {
  ASSIGN_OR_RETURN(std::string status, client.HealthStatus());
  out << status << "\n";
  if (status != "SERVING") {
    return absl::UnavailableError(absl::StrCat("server is ", status));
  }
  return absl::OkStatus();
}

}  // namespace mergeguard
