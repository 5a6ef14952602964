#ifndef MERGEGUARD_SERVER_JOB_JOURNAL_H_
#define MERGEGUARD_SERVER_JOB_JOURNAL_H_

// The durable job journal: one JSON file per job under <store>/jobs/,
// replaced atomically on every state change, so a restart (even after
// kill -9) sees each job's last committed state.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "core/job.h"
#include "server/artifact_store.h"

namespace mergeguard {

// JobState is where a job is in its life.
enum class JobState { kQueued, kRunning, kSucceeded, kFailed, kCancelled };

// JobStateName returns "queued", "running", ...
const char* JobStateName(JobState state);
// IsTerminal returns true for succeeded, failed and cancelled.
bool IsTerminal(JobState state);

// JobRecord is everything the server knows about one job.
struct JobRecord {
  std::string id;
  std::string tenant;
  JobSpec spec;
  JobState state = JobState::kQueued;
  // The failure (kFailed) or cancellation reason (kCancelled).
  absl::Status error;
  JobProgress progress;
  int64_t create_time_unix_ms = 0;
  int64_t start_time_unix_ms = 0;
  int64_t finish_time_unix_ms = 0;
  int attempts = 0;
  // Set when kSucceeded.
  ArtifactInfo result_model;
  ArtifactInfo result_report;
  std::map<std::string, double> metrics;
  // Bumped on every change; watchers use it to drop stale snapshots and the
  // journal to drop stale writes.
  uint64_t version = 0;
};

// JobRecordToJson and JobRecordFromJson are the journal's file format.
std::string JobRecordToJson(const JobRecord& record);
absl::StatusOr<JobRecord> JobRecordFromJson(const std::string& text);

// JobJournal persists JobRecords. Thread-safe; every method blocks on disk.
class JobJournal {
 public:
  // Open creates `directory` if needed.
  static absl::StatusOr<std::unique_ptr<JobJournal>> Open(
      const std::string& directory);

  // Write stores `record` atomically, unless a newer version of the same job
  // was already written (writes may race from different threads).
  absl::Status Write(const JobRecord& record);
  // LoadAll returns every readable record. Unreadable files are renamed to
  // `*.corrupt` and reported, never silently dropped.
  absl::StatusOr<std::vector<JobRecord>> LoadAll();

 private:
  explicit JobJournal(std::string directory)
      : directory_(std::move(directory)) {}

  const std::string directory_;
  absl::Mutex mu_;
  std::map<std::string, uint64_t> written_versions_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_JOB_JOURNAL_H_
