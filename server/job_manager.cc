#include "server/job_manager.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <random>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "server/log.h"

namespace mergeguard {
namespace {

int64_t NowUnixMs() { return absl::ToUnixMillis(absl::Now()); }

const char* OutcomeOf(JobState state) {
  switch (state) {
    case JobState::kSucceeded:
      return "succeeded";
    case JobState::kCancelled:
      return "cancelled";
    default:
      return "failed";
  }
}

// RoleAccepts says whether an artifact of `kind` may fill a reference of
// `role`. A previous job's result is a full model, so it may be an input.
bool RoleAccepts(ArtifactRole role, ArtifactKind kind) {
  switch (role) {
    case ArtifactRole::kModel:
      return kind == ArtifactKind::kModel || kind == ArtifactKind::kResult;
    case ArtifactRole::kLoraWeights:
      return kind == ArtifactKind::kLoraWeights;
    case ArtifactRole::kLoraConfig:
      return kind == ArtifactKind::kLoraConfig;
    case ArtifactRole::kCalibration:
      return kind == ArtifactKind::kCalibration;
  }
  return false;
}

const char* RoleKindName(ArtifactRole role) {
  switch (role) {
    case ArtifactRole::kModel:
      return "model";
    case ArtifactRole::kLoraWeights:
      return "lora_weights";
    case ArtifactRole::kLoraConfig:
      return "lora_config";
    case ArtifactRole::kCalibration:
      return "calibration";
  }
  return "?";
}

std::string SanitizeReplicaName(const std::string& name) {
  std::string out;
  for (char c : absl::AsciiStrToLower(name)) {
    out += absl::ascii_isalnum(c) ? c : '-';
  }
  if (out.empty()) out = "local";
  return out.substr(0, 40);
}

}  // namespace

JobManager::JobManager(const JobManagerOptions& options, ArtifactStore* store,
                       JobJournal* journal,
                       const ArchitectureRegistry* architectures,
                       ServerMetrics* metrics, ThreadPool* io)
    : options_(options),
      store_(store),
      journal_(journal),
      architectures_(architectures),
      metrics_(metrics),
      io_(io) {}

absl::StatusOr<std::unique_ptr<JobManager>> JobManager::Create(
    const JobManagerOptions& options, ArtifactStore* store, JobJournal* journal,
    const ArchitectureRegistry* architectures, ServerMetrics* metrics,
    ThreadPool* io) {
  if (options.workers < 1) {
    return absl::InvalidArgumentError("--workers must be at least 1");
  }
  if (options.queue_capacity < 1) {
    return absl::InvalidArgumentError("--queue_capacity must be at least 1");
  }
  std::unique_ptr<JobManager> manager(
      new JobManager(options, store, journal, architectures, metrics, io));
  RETURN_IF_ERROR(manager->Recover());
  if (metrics != nullptr) metrics->SetWorkers(options.workers);
  return manager;
}

absl::Status JobManager::Recover() {
  ASSIGN_OR_RETURN(std::vector<JobRecord> records, journal_->LoadAll());
  std::sort(records.begin(), records.end(),
            [](const JobRecord& a, const JobRecord& b) {
              return a.create_time_unix_ms != b.create_time_unix_ms
                         ? a.create_time_unix_ms < b.create_time_unix_ms
                         : a.id < b.id;
            });
  int requeued = 0, interrupted = 0;
  absl::MutexLock lock(&mu_);
  for (JobRecord& record : records) {
    if (record.state == JobState::kRunning) {
      ++record.version;
      if (record.attempts >= options_.max_attempts) {
        record.state = JobState::kFailed;
        record.error = absl::AbortedError(absl::StrCat(
            "interrupted: the server stopped while the job ran (attempt ",
            record.attempts, " of ", options_.max_attempts,
            "); resubmit it, and tell the operator if it keeps happening"));
        record.finish_time_unix_ms = NowUnixMs();
        ++interrupted;
        if (metrics_ != nullptr) {
          metrics_->RecordJobFinished(JobMethodName(record.spec.method),
                                      "interrupted", 0, {});
        }
      } else {
        record.state = JobState::kQueued;
        record.progress = JobProgress{};
        ++requeued;
      }
      RETURN_IF_ERROR(journal_->Write(record));
    }
    auto entry = std::make_shared<Entry>();
    entry->record = std::move(record);
    if (entry->record.state == JobState::kQueued) {
      queue_.push_back(entry->record.id);
    }
    jobs_[entry->record.id] = std::move(entry);
  }
  LogInfo("jobs: recovered ", jobs_.size(), " jobs from the journal; ",
          queue_.size(), " queued (", requeued,
          " re-queued after an interruption), ", interrupted,
          " failed as interrupted");
  return absl::OkStatus();
}

JobManager::~JobManager() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [id, entry] : jobs_) entry->cancel_requested = true;
  }
  for (std::thread& thread : threads_) thread.join();
}

void JobManager::Start() {
  for (int i = 0; i < options_.workers; ++i) {
    threads_.emplace_back([this] { WorkerLoop(); });
  }
}

std::string JobManager::NewJobId() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrFormat("j-%s-%016x",
                         SanitizeReplicaName(options_.replica_name), rng());
}

absl::Status JobManager::CheckInputs(const std::string& tenant,
                                     const JobSpec& spec) const {
  for (const ArtifactReference& ref : ReferencedArtifacts(spec)) {
    absl::StatusOr<ArtifactInfo> info = store_->Lookup(tenant, ref.digest);
    if (!info.ok()) {
      return absl::Status(
          info.status().code(),
          absl::StrCat(ref.field, ": ", info.status().message()));
    }
    if (!RoleAccepts(ref.role, info->kind)) {
      return absl::InvalidArgumentError(absl::StrCat(
          ref.field, ": artifact ", ref.digest.substr(0, 12), "… (\"",
          info->name, "\") was uploaded as ", ArtifactKindName(info->kind),
          "; this field needs kind ", RoleKindName(ref.role)));
    }
  }
  if (!spec.architecture.empty()) {
    absl::StatusOr<ArchitectureInfo> arch =
        architectures_->Lookup(spec.architecture);
    if (!arch.ok()) {
      return absl::Status(
          arch.status().code(),
          absl::StrCat("architecture: ", arch.status().message()));
    }
  }
  return store_->CheckQuota(tenant);
}

void JobManager::Submit(const std::string& tenant, JobSpec spec, Done done) {
  absl::Status valid = ValidateJobSpec(spec);
  if (valid.ok()) valid = CheckInputs(tenant, spec);
  if (!valid.ok()) {
    done(valid);
    return;
  }
  JobRecord record;
  {
    absl::MutexLock lock(&mu_);
    if (draining_) {
      done(absl::UnavailableError(
          "the server is shutting down and takes no new jobs; retry on "
          "another replica or after the restart"));
      return;
    }
    const int waiting = static_cast<int>(queue_.size()) + pending_submits_;
    if (waiting >= options_.queue_capacity) {
      done(absl::ResourceExhaustedError(
          absl::StrCat("the job queue is full (", waiting,
                       " jobs waiting, limit ", options_.queue_capacity,
                       " set by --queue_capacity); retry later with backoff")));
      return;
    }
    ++pending_submits_;
  }
  record.id = NewJobId();
  record.tenant = tenant;
  record.spec = std::move(spec);
  record.state = JobState::kQueued;
  record.create_time_unix_ms = NowUnixMs();
  record.version = 1;
  io_->Schedule([this, record = std::move(record), done = std::move(done)] {
    absl::Status written = journal_->Write(record);
    JobSnapshot snapshot;
    {
      absl::MutexLock lock(&mu_);
      --pending_submits_;
      if (written.ok()) {
        auto entry = std::make_shared<Entry>();
        entry->record = record;
        jobs_[record.id] = entry;
        queue_.push_back(record.id);
        snapshot = SnapshotLocked(*entry);
      }
    }
    if (!written.ok()) {
      done(absl::Status(
          written.code(),
          absl::StrCat("could not record the job: ", written.message())));
      return;
    }
    done(std::move(snapshot));
  });
}

JobSnapshot JobManager::SnapshotLocked(const Entry& entry) const {
  JobSnapshot snapshot;
  snapshot.record = entry.record;
  if (entry.record.state == JobState::kQueued) {
    auto it = std::find(queue_.begin(), queue_.end(), entry.record.id);
    if (it != queue_.end()) {
      snapshot.queue_position = static_cast<int>(it - queue_.begin());
    }
  }
  return snapshot;
}

absl::StatusOr<JobSnapshot> JobManager::Get(const std::string& tenant,
                                            const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(id);
  // Another tenant's job gets the same answer as a missing one.
  if (it == jobs_.end() || it->second->record.tenant != tenant) {
    return absl::NotFoundError(absl::StrCat(
        "no job \"", id.substr(0, 140),
        "\" for your tenant on this replica; check the id (ListJobs)"));
  }
  return SnapshotLocked(*it->second);
}

void JobManager::Cancel(const std::string& tenant, const std::string& id,
                        Done done) {
  std::shared_ptr<Entry> entry;
  JobSnapshot snapshot;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second->record.tenant != tenant) {
      done(absl::NotFoundError(
          absl::StrCat("no job \"", id.substr(0, 140),
                       "\" for your tenant on this replica")));
      return;
    }
    entry = it->second;
    JobRecord& record = entry->record;
    if (record.state == JobState::kRunning || entry->starting) {
      // The worker notices at the job's next step and records the outcome.
      entry->cancel_requested = true;
    } else if (record.state == JobState::kQueued) {
      queue_.erase(std::find(queue_.begin(), queue_.end(), id));
      record.state = JobState::kCancelled;
      record.error =
          absl::CancelledError("cancelled by the client while queued");
      record.finish_time_unix_ms = NowUnixMs();
      ++record.version;
      snapshot = SnapshotLocked(*entry);
      io_->Schedule([this, snapshot, done = std::move(done)] {
        absl::Status written = journal_->Write(snapshot.record);
        if (!written.ok()) {
          LogError("journal: ", snapshot.record.id, ": ", written.ToString());
        }
        if (metrics_ != nullptr) {
          metrics_->RecordJobFinished(
              JobMethodName(snapshot.record.spec.method), "cancelled", 0, {});
        }
        Notify(snapshot);
        done(snapshot);
      });
      return;
    }
    snapshot = SnapshotLocked(*entry);
  }
  done(std::move(snapshot));
}

absl::StatusOr<JobManager::JobPage> JobManager::List(
    const std::string& tenant, int page_size,
    const std::string& page_token) const {
  if (page_size < 0 || page_size > 1000) {
    return absl::InvalidArgumentError("page_size must be in [0, 1000]");
  }
  if (page_size == 0) page_size = 100;
  size_t offset = 0;
  if (!page_token.empty() && !absl::SimpleAtoi(page_token, &offset)) {
    return absl::InvalidArgumentError(
        "page_token is not one this server issued; pass next_page_token "
        "unchanged");
  }
  std::vector<JobSnapshot> all;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, entry] : jobs_) {
      if (entry->record.tenant == tenant) all.push_back(SnapshotLocked(*entry));
    }
  }
  std::sort(
      all.begin(), all.end(), [](const JobSnapshot& a, const JobSnapshot& b) {
        return a.record.create_time_unix_ms != b.record.create_time_unix_ms
                   ? a.record.create_time_unix_ms > b.record.create_time_unix_ms
                   : a.record.id > b.record.id;
      });
  JobPage page;
  for (size_t i = offset;
       i < all.size() && page.jobs.size() < static_cast<size_t>(page_size);
       ++i) {
    page.jobs.push_back(std::move(all[i]));
  }
  if (offset + page.jobs.size() < all.size()) {
    page.next_page_token = absl::StrCat(offset + page.jobs.size());
  }
  return page;
}

absl::StatusOr<uint64_t> JobManager::Watch(const std::string& tenant,
                                           const std::string& id,
                                           Watcher watcher) {
  // Registering and reading the state under watch_mu_ means no change can
  // slip between the first snapshot and the notifications that follow.
  absl::MutexLock watch_lock(&watch_mu_);
  JobSnapshot snapshot;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second->record.tenant != tenant) {
      return absl::NotFoundError(
          absl::StrCat("no job \"", id.substr(0, 140),
                       "\" for your tenant on this replica"));
    }
    snapshot = SnapshotLocked(*it->second);
  }
  const uint64_t watch_id = next_watch_id_++;
  watchers_[watch_id] = WatchEntry{id, watcher};
  watcher(snapshot);
  return watch_id;
}

void JobManager::Unwatch(uint64_t watch_id) {
  absl::MutexLock watch_lock(&watch_mu_);
  watchers_.erase(watch_id);
}

void JobManager::Notify(const JobSnapshot& snapshot) {
  absl::MutexLock watch_lock(&watch_mu_);
  for (const auto& [watch_id, entry] : watchers_) {
    if (entry.job_id == snapshot.record.id) entry.watcher(snapshot);
  }
}

void JobManager::BeginDrain() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
}

bool JobManager::Idle() const { return busy_workers_ == 0; }

bool JobManager::WaitUntilIdle(absl::Time deadline) {
  absl::MutexLock lock(&mu_);
  return mu_.AwaitWithDeadline(absl::Condition(this, &JobManager::Idle),
                               deadline);
}

int JobManager::QueueDepth() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

int JobManager::BusyWorkers() const {
  absl::MutexLock lock(&mu_);
  return busy_workers_;
}

bool JobManager::WorkAvailable() const {
  return stopping_ || (!draining_ && !queue_.empty());
}

void JobManager::WorkerLoop() {
  for (;;) {
    std::shared_ptr<Entry> entry;
    JobRecord running;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(this, &JobManager::WorkAvailable));
      if (stopping_) return;
      entry = jobs_[queue_.front()];
      queue_.pop_front();
      ++busy_workers_;
      entry->starting = true;
      running = entry->record;
    }
    running.state = JobState::kRunning;
    ++running.attempts;
    running.start_time_unix_ms = NowUnixMs();
    running.progress = JobProgress{};
    ++running.version;
    // Journal first: once a client sees "running", a restart knows it too.
    absl::Status written = journal_->Write(running);
    if (!written.ok()) {
      LogError("journal: ", running.id, ": ", written.ToString());
    }
    JobSnapshot snapshot;
    {
      absl::MutexLock lock(&mu_);
      entry->record = running;
      entry->starting = false;
      snapshot = SnapshotLocked(*entry);
    }
    Notify(snapshot);
    RunAttempt(entry);
    absl::MutexLock lock(&mu_);
    --busy_workers_;
  }
}

void JobManager::RunAttempt(const std::shared_ptr<Entry>& entry) {
  const absl::Time started = absl::Now();
  std::string tenant, id;
  JobSpec spec;
  {
    absl::MutexLock lock(&mu_);
    tenant = entry->record.tenant;
    id = entry->record.id;
    spec = entry->record.spec;
  }
  LogInfo("jobs: ", id, " (", JobMethodName(spec.method), ", tenant ", tenant,
          ") started");
  auto abandoned = [this] {
    absl::MutexLock lock(&mu_);
    return stopping_;
  };
  // Test hook: stay "running" for a while, cancellably.
  const absl::Time delay_end = started + options_.testonly_job_delay;
  while (absl::Now() < delay_end && !entry->cancel_requested) {
    absl::SleepFor(absl::Milliseconds(5));
  }

  const std::string work_dir = absl::StrCat(store_->WorkDirectory(), "/", id);
  std::error_code fs_error;
  std::filesystem::remove_all(work_dir, fs_error);
  std::filesystem::create_directories(work_dir, fs_error);
  absl::Status ready =
      fs_error ? ErrnoToStatus(fs_error.value(),
                               absl::StrCat("create work directory ", work_dir))
               : absl::OkStatus();
  if (ready.ok()) {
    // The merged model is about as large as the base (or the largest input).
    uint64_t expected_bytes = 0;
    for (const ArtifactReference& ref : ReferencedArtifacts(spec)) {
      absl::StatusOr<ArtifactInfo> info = store_->Lookup(tenant, ref.digest);
      if (info.ok())
        expected_bytes = std::max(expected_bytes, info->size_bytes);
    }
    ready = store_->CheckFreeDisk(expected_bytes, "the job's result");
  }
  absl::StatusOr<JobOutput> output =
      ready.ok() ? absl::StatusOr<JobOutput>(absl::UnknownError("not run"))
                 : absl::StatusOr<JobOutput>(ready);
  if (ready.ok()) {
    JobContext context;
    context.threads = options_.job_threads;
    context.server_version = options_.server_version;
    context.is_cancelled = [&entry] { return entry->cancel_requested.load(); };
    context.on_progress = [this, &entry](const JobProgress& progress) {
      JobSnapshot snapshot;
      {
        absl::MutexLock lock(&mu_);
        entry->record.progress = progress;
        ++entry->record.version;
        const absl::Time now = absl::Now();
        const bool last =
            progress.total_steps > 0 && progress.step >= progress.total_steps;
        if (!last &&
            now - entry->last_progress_notify < options_.progress_interval) {
          return;
        }
        entry->last_progress_notify = now;
        snapshot = SnapshotLocked(*entry);
      }
      Notify(snapshot);
    };
    ArtifactResolver resolve =
        [this,
         &tenant](const std::string& digest) -> absl::StatusOr<std::string> {
      absl::StatusOr<ArtifactInfo> info = store_->Lookup(tenant, digest);
      if (!info.ok()) {
        return absl::NotFoundError(
            absl::StrCat("input ", digest,
                         " was deleted after the job was submitted; "
                         "upload it again and resubmit"));
      }
      return store_->BlobPath(digest);
    };
    // Architectures are looked up again at run time: a re-registration
    // between submit and run takes effect, and a job journaled before a
    // restart finds the module by name.
    context.resolve_architecture =
        [this](const std::string& name) -> absl::StatusOr<std::string> {
      absl::StatusOr<ArchitectureInfo> info = architectures_->Lookup(name);
      if (!info.ok()) return info.status();
      return store_->BlobPath(info->sha256);
    };
    output = RunJob(spec, resolve, work_dir, context);
  }

  if (abandoned()) {
    // Shutting down past the drain deadline: leave the journal saying
    // "running" so the next start re-queues the job.
    std::filesystem::remove_all(work_dir, fs_error);
    return;
  }
  JobState state = JobState::kSucceeded;
  absl::Status error;
  if (entry->cancel_requested ||
      output.status().code() == absl::StatusCode::kCancelled) {
    state = JobState::kCancelled;
    error = absl::CancelledError("cancelled by the client while running");
  } else if (!output.ok()) {
    state = JobState::kFailed;
    error = output.status();
  } else {
    // Publish the outputs only now: until this point nothing of the job is
    // visible in the store.
    absl::StatusOr<ArtifactInfo> model = store_->ImportFile(
        tenant, output->model_path, absl::StrCat(id, ".safetensors"),
        ArtifactKind::kResult);
    absl::StatusOr<ArtifactInfo> report =
        model.ok() ? store_->ImportFile(tenant, output->report_path,
                                        absl::StrCat(id, ".report.json"),
                                        ArtifactKind::kReport)
                   : model.status();
    if (!model.ok() || !report.ok()) {
      state = JobState::kFailed;
      error = !model.ok() ? model.status() : report.status();
      error = absl::Status(
          error.code(), absl::StrCat("storing the result: ", error.message()));
      if (model.ok()) store_->Delete(tenant, model->sha256).IgnoreError();
    } else {
      absl::MutexLock lock(&mu_);
      entry->record.result_model = *model;
      entry->record.result_report = *report;
      entry->record.metrics = output->metrics;
    }
  }
  std::filesystem::remove_all(work_dir, fs_error);
  Finish(entry, state, error, started);
}

void JobManager::Finish(const std::shared_ptr<Entry>& entry, JobState state,
                        absl::Status error, absl::Time started) {
  JobSnapshot snapshot;
  {
    absl::MutexLock lock(&mu_);
    JobRecord& record = entry->record;
    record.state = state;
    record.error = error;
    record.finish_time_unix_ms = NowUnixMs();
    ++record.version;
    snapshot = SnapshotLocked(*entry);
  }
  const JobRecord& record = snapshot.record;
  absl::Status written = journal_->Write(record);
  if (!written.ok()) {
    LogError("journal: ", record.id, ": ", written.ToString());
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - started);
  if (metrics_ != nullptr) {
    metrics_->RecordJobFinished(JobMethodName(record.spec.method),
                                OutcomeOf(state), seconds, record.metrics);
  }
  LogInfo("jobs: ", record.id, " ", JobStateName(state), " after ",
          absl::StrFormat("%.3f", seconds), " s",
          error.ok() ? "" : absl::StrCat(": ", error.ToString()));
  Notify(snapshot);
}

}  // namespace mergeguard
