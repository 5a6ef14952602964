#ifndef MERGEGUARD_CLIENT_REMOTE_COMMANDS_H_
#define MERGEGUARD_CLIENT_REMOTE_COMMANDS_H_

// The CLI's server commands: upload, submit, watch, download, run, jobs,
// cancel and health. Each prints for people on `out` and returns a Status
// whose code becomes the exit code.

#include <ostream>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "client/merge_config.h"
#include "client/sanitizer_client.h"

namespace mergeguard {

// WatchOptions controls how progress is shown.
struct WatchOptions {
  // Redraw one progress line (step, losses, ETA) instead of printing lines;
  // for terminals.
  bool progress_bar = false;
};

// BuildRemoteJobSpec uploads every file `config` names (base, models, LoRA
// adapter files, calibration sets) and returns the wire spec referring to
// them by digest. Uploads the tenant already owns are skipped by the server.
absl::StatusOr<v1::JobSpec> BuildRemoteJobSpec(SanitizerClient& client,
                                               const MergeConfig& config,
                                               std::ostream& out);

// UploadCommand uploads `paths` as `kind` and prints each digest.
absl::Status UploadCommand(SanitizerClient& client,
                           const std::vector<std::string>& paths,
                           v1::ArtifactKind kind, std::ostream& out);

// SubmitCommand uploads the job's inputs, submits it and returns the job.
absl::StatusOr<v1::Job> SubmitCommand(SanitizerClient& client,
                                      const MergeConfig& config,
                                      std::ostream& out);

// WatchCommand follows `job_id` until it ends. A failed or cancelled job is
// returned as its error status.
absl::StatusOr<v1::Job> WatchCommand(SanitizerClient& client,
                                     const std::string& job_id,
                                     const WatchOptions& options,
                                     std::ostream& out);

// DownloadCommand fetches a finished job's model and report into `out_dir`
// (model.safetensors, report.json), or one artifact by digest into
// `out_dir`/<digest>. Resumes partial downloads and verifies digests.
absl::Status DownloadCommand(SanitizerClient& client,
                             const std::string& job_id_or_digest,
                             const std::string& out_dir, std::ostream& out);

// JobsCommand lists the tenant's jobs.
absl::Status JobsCommand(SanitizerClient& client, std::ostream& out);
// CancelCommand cancels `job_id` and prints its state.
absl::Status CancelCommand(SanitizerClient& client, const std::string& job_id,
                           std::ostream& out);
// HealthCommand prints the server's health; UNAVAILABLE unless SERVING.
absl::Status HealthCommand(SanitizerClient& client, std::ostream& out);

// JobStateName returns e.g. "SUCCEEDED".
std::string JobStateName(v1::JobState state);

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_REMOTE_COMMANDS_H_
