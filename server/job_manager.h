#ifndef MERGEGUARD_SERVER_JOB_MANAGER_H_
#define MERGEGUARD_SERVER_JOB_MANAGER_H_

// JobManager: a bounded queue of jobs, N worker threads that run them with
// core/ (RunJob), the durable journal behind them, and watchers that follow a
// job's state. gRPC handlers only enqueue, query and subscribe; the journal
// writes they cause run on the I/O pool.

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "core/job.h"
#include "core/thread_pool.h"
#include "server/architecture_registry.h"
#include "server/artifact_store.h"
#include "server/job_journal.h"
#include "server/metrics.h"

namespace mergeguard {

// JobManagerOptions configures the queue and the workers.
struct JobManagerOptions {
  // Worker threads, i.e. jobs running at once.
  int workers = 1;
  // Jobs that may wait in the queue; SubmitJob answers RESOURCE_EXHAUSTED
  // beyond it.
  int queue_capacity = 64;
  // A job interrupted by a server restart runs again until it has been
  // started this many times; then it fails as interrupted.
  int max_attempts = 2;
  // Names this replica in job ids ("j-<replica>-<hex>").
  std::string replica_name = "local";
  // Compute threads per job; 0 = all cores.
  int job_threads = 0;
  // Recorded in results' provenance.
  std::string server_version;
  // Watchers see progress at most this often (state changes always).
  absl::Duration progress_interval = absl::Milliseconds(100);
  // Test-only: each attempt waits this long (cancellably) before running, so
  // tests can observe queued and running jobs.
  absl::Duration testonly_job_delay = absl::ZeroDuration();
};

// JobSnapshot is a JobRecord plus where it waits in the queue.
struct JobSnapshot {
  JobRecord record;
  // Jobs ahead of this one (queued jobs only).
  int queue_position = 0;
};

// JobManager is thread-safe.
class JobManager {
 public:
  using Watcher = std::function<void(const JobSnapshot&)>;
  using Done = std::function<void(absl::StatusOr<JobSnapshot>)>;

  // Create recovers the journal (blocking): queued jobs are queued again; a
  // job that was running is re-queued, or fails as interrupted once it has
  // used max_attempts. Workers start with Start().
  static absl::StatusOr<std::unique_ptr<JobManager>> Create(
      const JobManagerOptions& options, ArtifactStore* store,
      JobJournal* journal, const ArchitectureRegistry* architectures,
      ServerMetrics* metrics, ThreadPool* io);
  // The destructor stops the workers; a job still running is abandoned as
  // "running" in the journal, so the next start re-queues it.
  ~JobManager();

  void Start();

  // Submit validates `spec` against the tenant's artifacts and the limits
  // (in memory), then journals the job on the I/O pool and queues it. `done`
  // gets the queued job, or INVALID_ARGUMENT / NOT_FOUND / UNIMPLEMENTED /
  // RESOURCE_EXHAUSTED (queue full, quota) / UNAVAILABLE (draining). It may
  // run before Submit returns.
  void Submit(const std::string& tenant, JobSpec spec, Done done);
  // Get returns the tenant's job, or NOT_FOUND.
  absl::StatusOr<JobSnapshot> Get(const std::string& tenant,
                                  const std::string& id) const;
  // Cancel cancels a queued job at once and asks a running one to stop at
  // its next step. `done` gets the job's state afterwards.
  void Cancel(const std::string& tenant, const std::string& id, Done done);

  // JobPage is one page of List.
  struct JobPage {
    std::vector<JobSnapshot> jobs;
    std::string next_page_token;
  };
  // List returns the tenant's jobs, newest first. INVALID_ARGUMENT for a bad
  // token or size.
  absl::StatusOr<JobPage> List(const std::string& tenant, int page_size,
                               const std::string& page_token) const;

  // Watch calls `watcher` with the job's current state, then after every
  // change until Unwatch. Snapshots can arrive out of order from different
  // threads; keep the one with the highest record.version. Returns an id
  // for Unwatch, or NOT_FOUND.
  absl::StatusOr<uint64_t> Watch(const std::string& tenant,
                                 const std::string& id, Watcher watcher);
  // Unwatch removes a watcher; once it returns, the watcher is not running
  // and will not be called again.
  void Unwatch(uint64_t watch_id);

  // BeginDrain refuses new jobs and stops workers from starting queued ones
  // (they stay queued in the journal for the next start).
  void BeginDrain();
  // WaitUntilIdle waits until no job runs, or `deadline`; true if idle.
  bool WaitUntilIdle(absl::Time deadline);

  int QueueDepth() const;
  int BusyWorkers() const;
  int workers() const { return options_.workers; }

 private:
  struct Entry {
    JobRecord record;  // guarded by JobManager::mu_
    std::atomic<bool> cancel_requested{false};
    // Taken off the queue; "running" is being journaled. Guarded by mu_.
    bool starting = false;
    absl::Time last_progress_notify;  // guarded by JobManager::mu_
  };

  JobManager(const JobManagerOptions& options, ArtifactStore* store,
             JobJournal* journal, const ArchitectureRegistry* architectures,
             ServerMetrics* metrics, ThreadPool* io);

  absl::Status Recover();
  absl::Status CheckInputs(const std::string& tenant,
                           const JobSpec& spec) const;
  std::string NewJobId();
  JobSnapshot SnapshotLocked(const Entry& entry) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Notify(const JobSnapshot& snapshot);
  void WorkerLoop();
  void RunAttempt(const std::shared_ptr<Entry>& entry);
  // Finish records a terminal state: journal, metrics, watchers.
  void Finish(const std::shared_ptr<Entry>& entry, JobState state,
              absl::Status error, absl::Time started);
  bool WorkAvailable() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool Idle() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const JobManagerOptions options_;
  ArtifactStore* const store_;
  JobJournal* const journal_;
  const ArchitectureRegistry* const architectures_;
  ServerMetrics* const metrics_;
  ThreadPool* const io_;
  std::vector<std::thread> threads_;

  // Lock order: watch_mu_ before mu_.
  absl::Mutex watch_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  struct WatchEntry {
    std::string job_id;
    Watcher watcher;
  };
  std::map<uint64_t, WatchEntry> watchers_ ABSL_GUARDED_BY(watch_mu_);
  uint64_t next_watch_id_ ABSL_GUARDED_BY(watch_mu_) = 1;

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<Entry>> jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  // Submissions being journaled; they hold a queue slot.
  int pending_submits_ ABSL_GUARDED_BY(mu_) = 0;
  int busy_workers_ ABSL_GUARDED_BY(mu_) = 0;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_JOB_MANAGER_H_
