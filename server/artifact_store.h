#ifndef MERGEGUARD_SERVER_ARTIFACT_STORE_H_
#define MERGEGUARD_SERVER_ARTIFACT_STORE_H_

// ArtifactStore: content-addressed artifacts in a local directory, with
// per-tenant ownership records and quotas. Layout under the root:
//
//   blobs/<aa>/<sha256>          the bytes, written once, read-only
//   owners/<tenant>/<sha256>.json  one ownership record per tenant and blob
//   tmp/                         uploads in progress (cleared at start)
//   work/                        job work directories (cleared at start)
//
// Every file appears under its final name by rename after fsync, so a crash
// leaves either the whole artifact or nothing.

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "core/sha256.h"
#include "core/thread_pool.h"

namespace mergeguard {

// ArtifactKind says what an artifact holds (mirrors the proto enum).
enum class ArtifactKind {
  kModel,
  kLoraWeights,
  kLoraConfig,
  kCalibration,
  kArchitecture,
  kResult,
  kReport,
};

// ArtifactKindName returns the kind's lowercase name, e.g. "lora_weights".
absl::string_view ArtifactKindName(ArtifactKind kind);
// ParseArtifactKind inverts ArtifactKindName.
absl::StatusOr<ArtifactKind> ParseArtifactKind(absl::string_view name);

// ArtifactInfo describes one artifact as one tenant owns it.
struct ArtifactInfo {
  std::string sha256;
  uint64_t size_bytes = 0;
  std::string name;
  ArtifactKind kind = ArtifactKind::kModel;
  int64_t create_time_unix_ms = 0;
  // Set by uploads and imports: the tenant already owned these bytes.
  bool already_present = false;
};

// UploadDeclaration is what a client announces before sending bytes.
struct UploadDeclaration {
  std::string name;
  ArtifactKind kind = ArtifactKind::kModel;
  uint64_t size_bytes = 0;
  std::string sha256;
};

// ArtifactStoreOptions configures the store and its limits.
struct ArtifactStoreOptions {
  // Root directory; created if missing.
  std::string root;
  // Largest single upload in bytes.
  uint64_t max_upload_bytes = 64ull << 30;
  // Bytes each tenant may own; 0 means unlimited.
  uint64_t tenant_quota_bytes = 0;
  // Uploads streaming at once, across tenants.
  int max_concurrent_uploads = 64;
  // Free-disk guard: uploads and jobs are refused when they would leave less
  // than this many bytes free on the store's filesystem.
  uint64_t min_free_bytes = 1ull << 30;
};

class ArtifactStore;

// UploadPipeline receives one upload's chunks, hashes them and writes them to
// a temporary file on the store's I/O threads, one chunk after the other,
// keeping at most a few chunks buffered. Thread-safe.
class UploadPipeline : public std::enable_shared_from_this<UploadPipeline> {
 public:
  ~UploadPipeline();
  UploadPipeline(const UploadPipeline&) = delete;
  UploadPipeline& operator=(const UploadPipeline&) = delete;

  // Append hashes `chunk` on the caller's thread, then queues it for
  // writing. It returns true when the caller may read the next chunk now;
  // otherwise the pipeline calls `on_room` (from an I/O thread) once it has
  // room again or has failed. Calls must not overlap (one reader per
  // stream), and Commit must follow the last one.
  bool Append(std::string chunk);
  // status returns the first write error (e.g. RESOURCE_EXHAUSTED when the
  // disk filled up), or OK.
  absl::Status status() const;
  // received_bytes returns the bytes passed to Append.
  uint64_t received_bytes() const;
  const UploadDeclaration& declaration() const { return declaration_; }

  // Commit waits for the queued chunks, then checks size (DATA_LOSS when
  // short) and digest (DATA_LOSS on mismatch) and stores the artifact.
  // `done` runs on an I/O thread.
  void Commit(std::function<void(absl::StatusOr<ArtifactInfo>)> done);
  // Abort drops the upload. `done` runs once no I/O task uses the pipeline
  // any more, possibly before Abort returns; a pending Commit is answered
  // CANCELLED first. `on_room` is not called after.
  void Abort(std::function<void()> done);

 private:
  friend class ArtifactStore;
  UploadPipeline(ArtifactStore* store, ThreadPool* io, std::string tenant,
                 UploadDeclaration declaration, std::function<void()> on_room);

  // Drain runs on an I/O thread while there is queued work.
  void Drain();
  absl::Status WriteChunk(const std::string& chunk);
  // ReleaseSlot gives back the upload slot and the quota reservation, once.
  void ReleaseSlot();
  absl::StatusOr<ArtifactInfo> Finalize();

  ArtifactStore* const store_;
  ThreadPool* const io_;
  const std::string tenant_;
  const UploadDeclaration declaration_;
  const std::function<void()> on_room_;

  std::atomic<bool> slot_released_{false};
  // Fed by Append on the reader's thread, read by Finalize after Commit
  // (ordered by mu_): hashing there overlaps it with the writes below.
  Sha256 hasher_;
  // Touched only by the single Drain task running at a time.
  int fd_ = -1;
  std::string temp_path_;
  uint64_t written_bytes_ = 0;

  mutable absl::Mutex mu_;
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t received_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  // A Drain task is scheduled or running.
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  bool waiting_for_room_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  std::function<void(absl::StatusOr<ArtifactInfo>)> commit_done_
      ABSL_GUARDED_BY(mu_);
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void()> abort_done_ ABSL_GUARDED_BY(mu_);
};

// ArtifactStore is thread-safe. Methods marked "blocking" touch the disk and
// must not run on gRPC reaction threads.
class ArtifactStore {
 public:
  // Open creates or loads the store (blocking), clears tmp/ and work/, and
  // removes blobs no tenant owns (left by a crash mid-upload).
  static absl::StatusOr<std::unique_ptr<ArtifactStore>> Open(
      const ArtifactStoreOptions& options, ThreadPool* io);

  // BeginUpload checks an upload against the limits, in memory:
  // INVALID_ARGUMENT for a bad declaration, RESOURCE_EXHAUSTED (with what to
  // do) for size, quota, concurrent uploads or free disk. It reserves the
  // declared size against the tenant's quota until the pipeline is destroyed.
  absl::StatusOr<std::shared_ptr<UploadPipeline>> BeginUpload(
      const std::string& tenant, const UploadDeclaration& declaration,
      std::function<void()> on_room);

  // Lookup returns the artifact if `tenant` owns it; NOT_FOUND otherwise
  // (also for bytes only another tenant owns).
  absl::StatusOr<ArtifactInfo> Lookup(const std::string& tenant,
                                      const std::string& sha256) const;
  // List returns `tenant`'s artifacts, newest first.
  std::vector<ArtifactInfo> List(const std::string& tenant) const;
  // BlobPath returns where the bytes of `sha256` live.
  std::string BlobPath(const std::string& sha256) const;

  // ImportFile moves `path` (on the store's filesystem) into the store,
  // owned by `tenant`. Blocking; hashes the file.
  absl::StatusOr<ArtifactInfo> ImportFile(const std::string& tenant,
                                          const std::string& path,
                                          const std::string& name,
                                          ArtifactKind kind);
  // AddOwner records that `owner` also owns the existing blob `info.sha256`
  // (e.g. the architecture registry). Blocking.
  absl::Status AddOwner(const std::string& owner, const ArtifactInfo& info);
  // Delete forgets `tenant`'s artifact and deletes the bytes once nobody owns
  // them. NOT_FOUND if the tenant does not own it. Blocking.
  absl::Status Delete(const std::string& tenant, const std::string& sha256);

  // UsedBytes returns the bytes charged to `tenant`.
  uint64_t UsedBytes(const std::string& tenant) const;
  uint64_t quota_bytes() const { return options_.tenant_quota_bytes; }
  // CheckQuota returns RESOURCE_EXHAUSTED when `tenant` is at its quota.
  absl::Status CheckQuota(const std::string& tenant) const;
  // CheckFreeDisk returns RESOURCE_EXHAUSTED when writing `bytes` would
  // leave less than min_free_bytes free.
  absl::Status CheckFreeDisk(uint64_t bytes, absl::string_view what) const;
  // StoredBytes returns the size of all blobs (each digest once).
  uint64_t StoredBytes() const;
  // FreeBytes returns the free bytes seen by the last RefreshFreeBytes.
  uint64_t FreeBytes() const { return free_bytes_.load(); }
  // RefreshFreeBytes re-reads the filesystem's free space (statvfs).
  void RefreshFreeBytes();
  int UploadsInProgress() const;

  const std::string& root() const { return options_.root; }
  // WorkDirectory returns the parent of job work directories.
  std::string WorkDirectory() const;
  // NewTempPath returns a fresh path under tmp/, on the store's filesystem.
  std::string NewTempPath();

 private:
  friend class UploadPipeline;
  explicit ArtifactStore(const ArtifactStoreOptions& options)
      : options_(options) {}

  absl::Status Load();
  std::string RecordPath(const std::string& tenant,
                         const std::string& sha256) const;
  // StoreVerifiedFile moves a fully written, fsynced, verified file into
  // blobs/ and records `tenant` as an owner. Blocking.
  absl::StatusOr<ArtifactInfo> StoreVerifiedFile(const std::string& tenant,
                                                 const std::string& path,
                                                 ArtifactInfo info);
  // EndUpload releases an upload's reservation.
  void EndUpload(const std::string& tenant, uint64_t reserved_bytes);

  const ArtifactStoreOptions options_;
  ThreadPool* io_ = nullptr;
  std::atomic<uint64_t> free_bytes_{0};
  std::atomic<uint64_t> temp_counter_{0};

  // Serializes blob creation and deletion on disk, so a blob is never
  // deleted while another tenant's record for it is being written.
  absl::Mutex disk_mu_ ABSL_ACQUIRED_BEFORE(mu_);

  mutable absl::Mutex mu_;
  // tenant -> sha256 -> record.
  std::map<std::string, std::map<std::string, ArtifactInfo>> owners_
      ABSL_GUARDED_BY(mu_);
  // sha256 -> number of owners.
  std::map<std::string, int> blob_owners_ ABSL_GUARDED_BY(mu_);
  // sha256 -> size, for every blob.
  std::map<std::string, uint64_t> blob_sizes_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> used_bytes_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, uint64_t> reserved_bytes_ ABSL_GUARDED_BY(mu_);
  uint64_t total_reserved_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t stored_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int uploads_in_progress_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_ARTIFACT_STORE_H_
