#include "server/artifact_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/log.h"

namespace mergeguard {
namespace {

namespace fs = std::filesystem;

// Chunks buffered per upload before the reader is paused: enough to overlap
// network reads with hashing and writing, small enough to bound memory.
constexpr size_t kMaxBufferedChunks = 4;
constexpr size_t kMaxNameBytes = 255;

struct KindName {
  ArtifactKind kind;
  const char* name;
};
constexpr KindName kKindNames[] = {
    {ArtifactKind::kModel, "model"},
    {ArtifactKind::kLoraWeights, "lora_weights"},
    {ArtifactKind::kLoraConfig, "lora_config"},
    {ArtifactKind::kCalibration, "calibration"},
    {ArtifactKind::kArchitecture, "architecture"},
    {ArtifactKind::kResult, "result"},
    {ArtifactKind::kReport, "report"},
};

int64_t NowUnixMs() { return absl::ToUnixMillis(absl::Now()); }

absl::Status MakeDirectories(const std::string& path) {
  std::error_code error;
  fs::create_directories(path, error);
  if (error) {
    return ErrnoToStatus(error.value(),
                         absl::StrCat("create directory ", path));
  }
  return absl::OkStatus();
}

// ClearDirectory removes everything inside `path`, creating it if needed.
absl::Status ClearDirectory(const std::string& path) {
  RETURN_IF_ERROR(MakeDirectories(path));
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(path, error)) {
    fs::remove_all(entry.path(), error);
    if (error) {
      return ErrnoToStatus(error.value(),
                           absl::StrCat("remove ", entry.path().string()));
    }
  }
  if (error) return ErrnoToStatus(error.value(), absl::StrCat("list ", path));
  return absl::OkStatus();
}

std::string HumanBytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double value = static_cast<double>(bytes);
  int unit = 0;
  while (value >= 1024 && unit < 4) {
    value /= 1024;
    ++unit;
  }
  return absl::StrCat(static_cast<int64_t>(value * 10) / 10.0, " ",
                      units[unit]);
}

std::string RecordToJson(const ArtifactInfo& info) {
  nlohmann::json j = {{"sha256", info.sha256},
                      {"size_bytes", info.size_bytes},
                      {"name", info.name},
                      {"kind", std::string(ArtifactKindName(info.kind))},
                      {"create_time_unix_ms", info.create_time_unix_ms}};
  return j.dump();
}

absl::StatusOr<ArtifactInfo> RecordFromJson(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError("ownership record is not JSON");
  }
  ArtifactInfo info;
  try {
    info.sha256 = j.at("sha256").get<std::string>();
    info.size_bytes = j.at("size_bytes").get<uint64_t>();
    info.name = j.at("name").get<std::string>();
    info.create_time_unix_ms = j.at("create_time_unix_ms").get<int64_t>();
    ASSIGN_OR_RETURN(info.kind,
                     ParseArtifactKind(j.at("kind").get<std::string>()));
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(
        absl::StrCat("ownership record is malformed: ", e.what()));
  }
  if (!IsSha256Hex(info.sha256)) {
    return absl::DataLossError("ownership record has a bad digest");
  }
  return info;
}

absl::Status WriteAll(int fd, const char* data, size_t size,
                      const std::string& path) {
  while (size > 0) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, absl::StrCat("write ", path));
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::string_view ArtifactKindName(ArtifactKind kind) {
  for (const KindName& entry : kKindNames) {
    if (entry.kind == kind) return entry.name;
  }
  return "unknown";
}

absl::StatusOr<ArtifactKind> ParseArtifactKind(absl::string_view name) {
  for (const KindName& entry : kKindNames) {
    if (name == entry.name) return entry.kind;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown artifact kind \"", name, "\""));
}

// ---- UploadPipeline ---------------------------------------------------------

UploadPipeline::UploadPipeline(ArtifactStore* store, ThreadPool* io,
                               std::string tenant,
                               UploadDeclaration declaration,
                               std::function<void()> on_room)
    : store_(store),
      io_(io),
      tenant_(std::move(tenant)),
      declaration_(std::move(declaration)),
      on_room_(std::move(on_room)) {}

void UploadPipeline::ReleaseSlot() {
  if (!slot_released_.exchange(true)) {
    store_->EndUpload(tenant_, declaration_.size_bytes);
  }
}

UploadPipeline::~UploadPipeline() {
  ReleaseSlot();
  if (fd_ >= 0 || !temp_path_.empty()) {
    // Closing and unlinking a large file can take a while; keep it off the
    // thread that drops the last reference (often a gRPC reaction).
    io_->Schedule([fd = fd_, path = temp_path_] {
      if (fd >= 0) ::close(fd);
      if (!path.empty()) ::unlink(path.c_str());
    });
  }
}

bool UploadPipeline::Append(std::string chunk) {
  // Hashing here, while the chunk is still in cache from parsing, runs in
  // parallel with the I/O thread writing the previous one (about 0.7 ms per
  // MiB of CPU, no blocking).
  hasher_.Update(chunk);
  absl::MutexLock lock(&mu_);
  received_bytes_ += chunk.size();
  if (aborted_) return false;
  queue_.push_back(std::move(chunk));
  if (!draining_) {
    draining_ = true;
    io_->Schedule([self = shared_from_this()] { self->Drain(); });
  }
  if (queue_.size() >= kMaxBufferedChunks && status_.ok()) {
    waiting_for_room_ = true;
    return false;
  }
  return true;
}

absl::Status UploadPipeline::status() const {
  absl::MutexLock lock(&mu_);
  return status_;
}

uint64_t UploadPipeline::received_bytes() const {
  absl::MutexLock lock(&mu_);
  return received_bytes_;
}

void UploadPipeline::Commit(
    std::function<void(absl::StatusOr<ArtifactInfo>)> done) {
  absl::MutexLock lock(&mu_);
  commit_done_ = std::move(done);
  if (!draining_) {
    draining_ = true;
    io_->Schedule([self = shared_from_this()] { self->Drain(); });
  }
}

void UploadPipeline::Abort(std::function<void()> done) {
  {
    absl::MutexLock lock(&mu_);
    aborted_ = true;
    queue_.clear();
    waiting_for_room_ = false;
    if (draining_) {
      abort_done_ = std::move(done);
      return;
    }
  }
  ReleaseSlot();
  done();
}

void UploadPipeline::Drain() {
  for (;;) {
    std::string chunk;
    std::function<void(absl::StatusOr<ArtifactInfo>)> commit;
    std::function<void()> abort_done;
    absl::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (aborted_) {
        draining_ = false;
        abort_done = std::move(abort_done_);
        commit = std::move(commit_done_);  // answered below, as aborted
        commit_done_ = nullptr;
      } else if (!queue_.empty()) {
        chunk = std::move(queue_.front());
        queue_.pop_front();
      } else if (commit_done_) {
        commit = std::move(commit_done_);
        commit_done_ = nullptr;
      } else {
        draining_ = false;
        return;
      }
      status = status_;
    }
    if (abort_done) {
      ReleaseSlot();
      if (commit) commit(absl::CancelledError("upload aborted"));
      abort_done();
      return;
    }
    if (commit) {
      absl::StatusOr<ArtifactInfo> result =
          status.ok() ? Finalize() : absl::StatusOr<ArtifactInfo>(status);
      {
        absl::MutexLock lock(&mu_);
        draining_ = false;
      }
      // The client hears back only after its upload slot is free again.
      ReleaseSlot();
      commit(std::move(result));
      return;
    }
    if (status.ok()) status = WriteChunk(chunk);
    bool call_room = false;
    {
      absl::MutexLock lock(&mu_);
      if (!status.ok() && status_.ok()) status_ = status;
      if (waiting_for_room_ &&
          (queue_.size() < kMaxBufferedChunks || !status_.ok())) {
        waiting_for_room_ = false;
        call_room = true;
      }
    }
    if (call_room) on_room_();
  }
}

absl::Status UploadPipeline::WriteChunk(const std::string& chunk) {
  if (fd_ < 0) {
    temp_path_ = store_->NewTempPath();
    fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                 0644);
    if (fd_ < 0) {
      absl::Status error =
          ErrnoToStatus(errno, absl::StrCat("create ", temp_path_));
      temp_path_.clear();
      return error;
    }
  }
  RETURN_IF_ERROR(WriteAll(fd_, chunk.data(), chunk.size(), temp_path_));
  written_bytes_ += chunk.size();
  return absl::OkStatus();
}

absl::StatusOr<ArtifactInfo> UploadPipeline::Finalize() {
  if (written_bytes_ != declaration_.size_bytes) {
    return absl::DataLossError(absl::StrCat(
        "upload \"", declaration_.name, "\" ended after ", written_bytes_,
        " of the declared ", declaration_.size_bytes,
        " bytes; send the whole file again"));
  }
  std::string digest = hasher_.FinishHex();
  if (digest != declaration_.sha256) {
    return absl::DataLossError(absl::StrCat(
        "upload \"", declaration_.name, "\": declared sha256 ",
        declaration_.sha256, " but the received bytes hash to ", digest,
        "; the file changed or was corrupted in transit: recompute the "
        "digest and upload again"));
  }
  if (fd_ < 0) RETURN_IF_ERROR(WriteChunk(std::string()));  // empty file
  if (::fsync(fd_) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("fsync ", temp_path_));
  }
  ::close(fd_);
  fd_ = -1;
  ArtifactInfo info;
  info.sha256 = digest;
  info.size_bytes = written_bytes_;
  info.name = declaration_.name;
  info.kind = declaration_.kind;
  info.create_time_unix_ms = NowUnixMs();
  absl::StatusOr<ArtifactInfo> stored =
      store_->StoreVerifiedFile(tenant_, temp_path_, info);
  if (stored.ok()) temp_path_.clear();  // moved or removed by the store
  return stored;
}

// ---- ArtifactStore ----------------------------------------------------------

absl::StatusOr<std::unique_ptr<ArtifactStore>> ArtifactStore::Open(
    const ArtifactStoreOptions& options, ThreadPool* io) {
  if (options.root.empty()) {
    return absl::InvalidArgumentError("the store directory must be set");
  }
  std::unique_ptr<ArtifactStore> store(new ArtifactStore(options));
  store->io_ = io;
  RETURN_IF_ERROR(store->Load());
  store->RefreshFreeBytes();
  return store;
}

absl::Status ArtifactStore::Load() {
  const std::string& root = options_.root;
  RETURN_IF_ERROR(MakeDirectories(absl::StrCat(root, "/blobs")));
  RETURN_IF_ERROR(MakeDirectories(absl::StrCat(root, "/owners")));
  // Uploads and jobs that were in flight when the process stopped left only
  // temporary files; their clients retry, their jobs run again.
  RETURN_IF_ERROR(ClearDirectory(absl::StrCat(root, "/tmp")));
  RETURN_IF_ERROR(ClearDirectory(WorkDirectory()));

  std::error_code error;
  for (const auto& blob_dir :
       fs::directory_iterator(absl::StrCat(root, "/blobs"), error)) {
    for (const auto& blob : fs::directory_iterator(blob_dir.path(), error)) {
      const std::string sha = blob.path().filename().string();
      if (!IsSha256Hex(sha)) continue;
      blob_sizes_[sha] = fs::file_size(blob.path(), error);
    }
  }
  for (const auto& tenant_dir :
       fs::directory_iterator(absl::StrCat(root, "/owners"), error)) {
    const std::string tenant = tenant_dir.path().filename().string();
    for (const auto& record :
         fs::directory_iterator(tenant_dir.path(), error)) {
      const std::string file = record.path().string();
      if (absl::StrContains(file, ".tmp-")) {  // an interrupted record write
        ::unlink(file.c_str());
        continue;
      }
      absl::StatusOr<std::string> text = ReadFile(file);
      absl::StatusOr<ArtifactInfo> info =
          text.ok() ? RecordFromJson(*text)
                    : absl::StatusOr<ArtifactInfo>(text.status());
      if (!info.ok() || !blob_sizes_.count(info->sha256) ||
          blob_sizes_[info->sha256] != info->size_bytes) {
        LogWarning("store: dropping ownership record ", file, ": ",
                   info.ok() ? "its blob is missing or has the wrong size"
                             : info.status().ToString());
        ::unlink(file.c_str());
        continue;
      }
      used_bytes_[tenant] += info->size_bytes;
      ++blob_owners_[info->sha256];
      owners_[tenant][info->sha256] = *std::move(info);
    }
  }
  if (error) {
    return ErrnoToStatus(error.value(), absl::StrCat("scan store ", root));
  }
  for (auto it = blob_sizes_.begin(); it != blob_sizes_.end();) {
    if (!blob_owners_.count(it->first)) {
      // Stored but never recorded: a crash between the two steps.
      const std::string path = BlobPath(it->first);
      LogWarning("store: removing unowned blob ", path);
      ::unlink(path.c_str());
      it = blob_sizes_.erase(it);
    } else {
      stored_bytes_ += it->second;
      ++it;
    }
  }
  LogInfo("store: ", root, " holds ", blob_sizes_.size(), " blobs (",
          HumanBytes(stored_bytes_), ") for ", owners_.size(), " owners");
  return absl::OkStatus();
}

std::string ArtifactStore::BlobPath(const std::string& sha256) const {
  return absl::StrCat(options_.root, "/blobs/", sha256.substr(0, 2), "/",
                      sha256);
}

std::string ArtifactStore::RecordPath(const std::string& tenant,
                                      const std::string& sha256) const {
  return absl::StrCat(options_.root, "/owners/", tenant, "/", sha256, ".json");
}

std::string ArtifactStore::NewTempPath() {
  return absl::StrCat(options_.root, "/tmp/upload-", ::getpid(), "-",
                      temp_counter_.fetch_add(1));
}

std::string ArtifactStore::WorkDirectory() const {
  return absl::StrCat(options_.root, "/work");
}

absl::StatusOr<std::shared_ptr<UploadPipeline>> ArtifactStore::BeginUpload(
    const std::string& tenant, const UploadDeclaration& declaration,
    std::function<void()> on_room) {
  if (!IsSha256Hex(declaration.sha256)) {
    return absl::InvalidArgumentError(
        "metadata.sha256 must be the 64 lowercase hex characters of the "
        "file's SHA-256");
  }
  if (declaration.name.size() > kMaxNameBytes) {
    return absl::InvalidArgumentError(
        "metadata.name must be at most 255 bytes");
  }
  if (declaration.kind == ArtifactKind::kResult ||
      declaration.kind == ArtifactKind::kReport) {
    return absl::InvalidArgumentError(
        "metadata.kind: results and reports are written by the server only");
  }
  if (declaration.size_bytes > options_.max_upload_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "upload of ", declaration.size_bytes, " bytes (",
        HumanBytes(declaration.size_bytes), ") exceeds this server's limit of ",
        options_.max_upload_bytes,
        " bytes; ask the operator to raise --max_upload_bytes"));
  }
  RETURN_IF_ERROR(CheckFreeDisk(declaration.size_bytes, "this upload"));
  absl::MutexLock lock(&mu_);
  if (uploads_in_progress_ >= options_.max_concurrent_uploads) {
    return absl::ResourceExhaustedError(absl::StrCat(
        uploads_in_progress_,
        " uploads are in progress, the server's limit "
        "(--max_concurrent_uploads); retry in a few seconds with backoff"));
  }
  const bool owned = owners_[tenant].count(declaration.sha256) > 0;
  const uint64_t quota = options_.tenant_quota_bytes;
  if (quota > 0 && !owned) {
    const uint64_t used = used_bytes_[tenant] + reserved_bytes_[tenant];
    if (used + declaration.size_bytes > quota) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "tenant ", tenant, " would exceed its store quota: ",
          HumanBytes(used), " used or reserved + ",
          HumanBytes(declaration.size_bytes), " > ", HumanBytes(quota),
          "; delete artifacts you no longer need (DeleteArtifact) or ask the "
          "operator for a larger --tenant_quota_bytes"));
    }
  }
  ++uploads_in_progress_;
  reserved_bytes_[tenant] += declaration.size_bytes;
  total_reserved_bytes_ += declaration.size_bytes;
  return std::shared_ptr<UploadPipeline>(
      new UploadPipeline(this, io_, tenant, declaration, std::move(on_room)));
}

void ArtifactStore::EndUpload(const std::string& tenant,
                              uint64_t reserved_bytes) {
  absl::MutexLock lock(&mu_);
  --uploads_in_progress_;
  reserved_bytes_[tenant] -= reserved_bytes;
  total_reserved_bytes_ -= reserved_bytes;
}

absl::StatusOr<ArtifactInfo> ArtifactStore::StoreVerifiedFile(
    const std::string& tenant, const std::string& path, ArtifactInfo info) {
  absl::MutexLock disk_lock(&disk_mu_);
  bool blob_exists;
  {
    absl::MutexLock lock(&mu_);
    auto& owned = owners_[tenant];
    if (auto it = owned.find(info.sha256); it != owned.end()) {
      ::unlink(path.c_str());
      ArtifactInfo existing = it->second;
      existing.already_present = true;
      return existing;
    }
    blob_exists = blob_sizes_.count(info.sha256) > 0;
  }
  const std::string blob = BlobPath(info.sha256);
  if (blob_exists) {
    ::unlink(path.c_str());  // the same bytes are stored once
  } else {
    RETURN_IF_ERROR(MakeDirectories(blob.substr(0, blob.find_last_of('/'))));
    ::chmod(path.c_str(), 0444);
    if (::rename(path.c_str(), blob.c_str()) != 0) {
      return ErrnoToStatus(errno, absl::StrCat("rename ", path, " to ", blob));
    }
    RETURN_IF_ERROR(FsyncParentDirectory(blob));
  }
  const std::string record = RecordPath(tenant, info.sha256);
  RETURN_IF_ERROR(MakeDirectories(record.substr(0, record.find_last_of('/'))));
  absl::Status written = WriteFileAtomically(record, RecordToJson(info));
  absl::MutexLock lock(&mu_);
  if (!blob_exists) {
    blob_sizes_[info.sha256] = info.size_bytes;
    stored_bytes_ += info.size_bytes;
  }
  if (!written.ok()) {
    if (!blob_owners_.count(info.sha256)) {
      ::unlink(blob.c_str());
      blob_sizes_.erase(info.sha256);
      stored_bytes_ -= info.size_bytes;
    }
    return written;
  }
  owners_[tenant][info.sha256] = info;
  ++blob_owners_[info.sha256];
  used_bytes_[tenant] += info.size_bytes;
  return info;
}

absl::StatusOr<ArtifactInfo> ArtifactStore::Lookup(
    const std::string& tenant, const std::string& sha256) const {
  absl::MutexLock lock(&mu_);
  auto tenant_it = owners_.find(tenant);
  if (tenant_it != owners_.end()) {
    auto it = tenant_it->second.find(sha256);
    if (it != tenant_it->second.end()) return it->second;
  }
  // The same answer whether or not another tenant holds these bytes, so
  // digests cannot be probed across tenants.
  return absl::NotFoundError(
      absl::StrCat("no artifact with sha256 ", sha256.substr(0, 80),
                   " in your tenant's store; upload it first (Upload)"));
}

std::vector<ArtifactInfo> ArtifactStore::List(const std::string& tenant) const {
  std::vector<ArtifactInfo> list;
  absl::MutexLock lock(&mu_);
  auto tenant_it = owners_.find(tenant);
  if (tenant_it == owners_.end()) return list;
  for (const auto& [sha, info] : tenant_it->second) list.push_back(info);
  std::stable_sort(list.begin(), list.end(),
                   [](const ArtifactInfo& a, const ArtifactInfo& b) {
                     return a.create_time_unix_ms > b.create_time_unix_ms;
                   });
  return list;
}

absl::StatusOr<ArtifactInfo> ArtifactStore::ImportFile(
    const std::string& tenant, const std::string& path, const std::string& name,
    ArtifactKind kind) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("stat ", path));
  }
  ArtifactInfo info;
  ASSIGN_OR_RETURN(info.sha256, Sha256File(path));
  info.size_bytes = static_cast<uint64_t>(st.st_size);
  info.name = name;
  info.kind = kind;
  info.create_time_unix_ms = NowUnixMs();
  return StoreVerifiedFile(tenant, path, info);
}

absl::Status ArtifactStore::AddOwner(const std::string& owner,
                                     const ArtifactInfo& info) {
  absl::MutexLock disk_lock(&disk_mu_);
  {
    absl::MutexLock lock(&mu_);
    if (!blob_sizes_.count(info.sha256)) {
      return absl::NotFoundError(absl::StrCat("no stored blob ", info.sha256));
    }
    if (owners_[owner].count(info.sha256)) return absl::OkStatus();
  }
  const std::string record = RecordPath(owner, info.sha256);
  RETURN_IF_ERROR(MakeDirectories(record.substr(0, record.find_last_of('/'))));
  RETURN_IF_ERROR(WriteFileAtomically(record, RecordToJson(info)));
  absl::MutexLock lock(&mu_);
  owners_[owner][info.sha256] = info;
  ++blob_owners_[info.sha256];
  used_bytes_[owner] += info.size_bytes;
  return absl::OkStatus();
}

absl::Status ArtifactStore::Delete(const std::string& tenant,
                                   const std::string& sha256) {
  absl::MutexLock disk_lock(&disk_mu_);
  ASSIGN_OR_RETURN(ArtifactInfo info, Lookup(tenant, sha256));
  const std::string record = RecordPath(tenant, sha256);
  if (::unlink(record.c_str()) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("delete ", record));
  }
  RETURN_IF_ERROR(FsyncParentDirectory(record));
  bool last_owner;
  {
    absl::MutexLock lock(&mu_);
    owners_[tenant].erase(sha256);
    used_bytes_[tenant] -= info.size_bytes;
    last_owner = --blob_owners_[sha256] == 0;
    if (last_owner) {
      blob_owners_.erase(sha256);
      stored_bytes_ -= blob_sizes_[sha256];
      blob_sizes_.erase(sha256);
    }
  }
  // Readers that already opened the blob keep their file; new ones see
  // NOT_FOUND.
  if (last_owner) ::unlink(BlobPath(sha256).c_str());
  return absl::OkStatus();
}

uint64_t ArtifactStore::UsedBytes(const std::string& tenant) const {
  absl::MutexLock lock(&mu_);
  auto it = used_bytes_.find(tenant);
  return it == used_bytes_.end() ? 0 : it->second;
}

absl::Status ArtifactStore::CheckQuota(const std::string& tenant) const {
  const uint64_t quota = options_.tenant_quota_bytes;
  if (quota == 0) return absl::OkStatus();
  const uint64_t used = UsedBytes(tenant);
  if (used >= quota) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "tenant ", tenant, " uses ", HumanBytes(used), " of its ",
        HumanBytes(quota),
        " store quota, so a job result cannot be stored; delete artifacts "
        "you no longer need (DeleteArtifact) or ask for a larger quota"));
  }
  return absl::OkStatus();
}

absl::Status ArtifactStore::CheckFreeDisk(uint64_t bytes,
                                          absl::string_view what) const {
  uint64_t reserved;
  {
    absl::MutexLock lock(&mu_);
    reserved = total_reserved_bytes_;
  }
  const uint64_t free_bytes = free_bytes_.load();
  const uint64_t available = free_bytes > reserved ? free_bytes - reserved : 0;
  if (available < bytes || available - bytes < options_.min_free_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the server's disk is nearly full: ", HumanBytes(available),
        " free (after uploads in progress), ", what, " needs ",
        HumanBytes(bytes), " and ", HumanBytes(options_.min_free_bytes),
        " must stay free (--min_free_bytes); delete artifacts you no longer "
        "need or ask the operator to add disk"));
  }
  return absl::OkStatus();
}

uint64_t ArtifactStore::StoredBytes() const {
  absl::MutexLock lock(&mu_);
  return stored_bytes_;
}

void ArtifactStore::RefreshFreeBytes() {
  struct statvfs st;
  if (::statvfs(options_.root.c_str(), &st) == 0) {
    free_bytes_.store(static_cast<uint64_t>(st.f_bavail) * st.f_frsize);
  }
}

int ArtifactStore::UploadsInProgress() const {
  absl::MutexLock lock(&mu_);
  return uploads_in_progress_;
}

}  // namespace mergeguard
