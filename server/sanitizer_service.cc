#include "server/sanitizer_service.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <deque>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "server/log.h"
#include "server/proto_convert.h"
#include "server/status_util.h"

namespace mergeguard {
namespace {

// RpcRecorder times one RPC and records it in the metrics when it finishes.
class RpcRecorder {
 public:
  RpcRecorder(ServerMetrics* metrics, const char* method)
      : metrics_(metrics), method_(method), start_(absl::Now()) {}

  // Done converts `status` for the wire and records the RPC.
  grpc::Status Done(const absl::Status& status) const {
    grpc::Status result = ToGrpcStatus(status);
    metrics_->RecordRpc(method_, result.error_code(),
                        absl::ToDoubleSeconds(absl::Now() - start_));
    return result;
  }
  const char* method() const { return method_; }

 private:
  ServerMetrics* metrics_;
  const char* method_;
  absl::Time start_;
};

absl::StatusOr<Principal> Authenticate(const ServiceDeps& deps,
                                       grpc::CallbackServerContext* context,
                                       const char* method,
                                       bool require_admin = false) {
  const auto& metadata = context->client_metadata();
  auto it = metadata.find("authorization");
  absl::string_view value;
  if (it != metadata.end()) {
    value = absl::string_view(it->second.data(), it->second.size());
  }
  absl::StatusOr<Principal> principal = deps.auth->Authenticate(value);
  if (!principal.ok()) {
    deps.metrics->RecordAuthFailure(method, grpc::StatusCode::UNAUTHENTICATED);
    return principal.status();
  }
  if (require_admin && principal->role != Role::kAdmin) {
    deps.metrics->RecordAuthFailure(method,
                                    grpc::StatusCode::PERMISSION_DENIED);
    return absl::PermissionDeniedError(
        absl::StrCat(method, " needs an admin token; this token of tenant ",
                     principal->tenant, " has the user role"));
  }
  return principal;
}

absl::Status DrainingError() {
  return absl::UnavailableError(
      "the server is shutting down; retry on another replica or after the "
      "restart");
}

absl::StatusOr<UploadDeclaration> DeclarationFromProto(
    const v1::UploadMetadata& metadata) {
  UploadDeclaration declaration;
  absl::StatusOr<ArtifactKind> kind = ArtifactKindFromProto(metadata.kind());
  if (!kind.ok()) return kind.status();
  declaration.kind = *kind;
  declaration.name = metadata.name();
  declaration.size_bytes = metadata.size_bytes();
  declaration.sha256 = metadata.sha256();
  return declaration;
}

// CheckChunk validates one upload chunk against the declaration.
absl::Status CheckChunk(const std::string& chunk, uint64_t received,
                        const UploadDeclaration& declaration) {
  if (chunk.empty() || chunk.size() > kMaxChunkBytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "chunks must hold 1 byte to 1 MiB, got ", chunk.size(), " bytes"));
  }
  if (received + chunk.size() > declaration.size_bytes) {
    return absl::DataLossError(absl::StrCat(
        "upload \"", declaration.name, "\" sent more than the declared ",
        declaration.size_bytes, " bytes; declare the file's real size"));
  }
  return absl::OkStatus();
}

// ReadAt fills `out` with `length` bytes at `offset` of `fd`. Blocking.
absl::Status ReadAt(int fd, uint64_t offset, size_t length, std::string* out) {
  out->resize(length);
  size_t done = 0;
  while (done < length) {
    ssize_t n = ::pread(fd, out->data() + done, length - done,
                        static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoToStatus(errno, "read artifact");
    if (n == 0) return absl::DataLossError("artifact is shorter than recorded");
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status OpenBlob(const std::string& path, int* fd) {
  *fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (*fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError("the artifact was deleted; upload it again");
    }
    return ErrnoToStatus(errno, "open artifact");
  }
  return absl::OkStatus();
}

double ElapsedSeconds(const JobRecord& record) {
  if (record.start_time_unix_ms == 0) return 0;
  const int64_t end = record.finish_time_unix_ms != 0
                          ? record.finish_time_unix_ms
                          : absl::ToUnixMillis(absl::Now());
  return static_cast<double>(end - record.start_time_unix_ms) / 1000.0;
}

// ---- Upload -----------------------------------------------------------------

// UploadReactor: metadata first, then chunks handed to an UploadPipeline.
// One read is in flight at a time; the pipeline pauses reading while its
// buffer is full.
class UploadReactor final : public grpc::ServerReadReactor<v1::UploadRequest> {
 public:
  UploadReactor(const ServiceDeps& deps, grpc::CallbackServerContext* context,
                v1::Artifact* response)
      : deps_(deps), response_(response), rpc_(deps.metrics, "Upload") {
    absl::StatusOr<Principal> principal = Authenticate(deps, context, "Upload");
    if (!principal.ok()) {
      FinishWith(principal.status());
      return;
    }
    if (deps.draining->load()) {
      FinishWith(DrainingError());
      return;
    }
    tenant_ = principal->tenant;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      if (pipeline_ == nullptr) {
        FinishWith(absl::InvalidArgumentError(
            "the upload stream ended before its UploadMetadata message"));
      } else if (cancelled_.load()) {
        AbortAndFinish(absl::CancelledError("upload cancelled by the client"));
      } else {
        pipeline_->Commit([this](absl::StatusOr<ArtifactInfo> artifact) {
          if (artifact.ok()) {
            ArtifactToProto(*artifact, response_);
            deps_.metrics->AddUploadedBytes(artifact->size_bytes);
          }
          FinishWith(artifact.status());
        });
      }
      return;
    }
    if (pipeline_ == nullptr) {
      if (request_.payload_case() != v1::UploadRequest::kMetadata) {
        FinishWith(absl::InvalidArgumentError(
            "the first message of an upload must carry UploadMetadata (name, "
            "kind, size_bytes, sha256)"));
        return;
      }
      absl::StatusOr<UploadDeclaration> declaration =
          DeclarationFromProto(request_.metadata());
      absl::StatusOr<std::shared_ptr<UploadPipeline>> pipeline =
          declaration.ok() ? deps_.store->BeginUpload(tenant_, *declaration,
                                                      [this] { OnRoom(); })
                           : declaration.status();
      if (!pipeline.ok()) {
        FinishWith(pipeline.status());
        return;
      }
      pipeline_ = *std::move(pipeline);
      StartRead(&request_);
      return;
    }
    absl::Status status =
        request_.payload_case() == v1::UploadRequest::kChunk
            ? CheckChunk(request_.chunk(), pipeline_->received_bytes(),
                         pipeline_->declaration())
            : absl::InvalidArgumentError(
                  "UploadMetadata may only be the first message");
    if (status.ok()) status = pipeline_->status();
    if (!status.ok()) {
      AbortAndFinish(status);
      return;
    }
    if (pipeline_->Append(std::move(*request_.mutable_chunk()))) {
      StartRead(&request_);
    }
  }

  void OnCancel() override { cancelled_ = true; }
  void OnDone() override { delete this; }

 private:
  // OnRoom runs on an I/O thread when the pipeline can take more chunks.
  void OnRoom() {
    absl::Status status = pipeline_->status();
    if (!status.ok()) {
      AbortAndFinish(status);
    } else {
      StartRead(&request_);
    }
  }

  void AbortAndFinish(absl::Status status) {
    pipeline_->Abort([this, status] { FinishWith(status); });
  }

  // FinishWith must be the last thing that touches the reactor.
  void FinishWith(const absl::Status& status) { Finish(rpc_.Done(status)); }

  const ServiceDeps deps_;
  v1::Artifact* const response_;
  const RpcRecorder rpc_;
  std::string tenant_;
  v1::UploadRequest request_;
  std::shared_ptr<UploadPipeline> pipeline_;
  std::atomic<bool> cancelled_{false};
};

// ---- Download ---------------------------------------------------------------

// DownloadReactor streams a blob with two buffers: while one is being
// written, the I/O pool reads the next chunk into the other. The next write
// starts from OnWriteDone (or from the read's completion if it was slower).
class DownloadReactor final
    : public grpc::ServerWriteReactor<v1::DownloadResponse> {
 public:
  DownloadReactor(const ServiceDeps& deps, grpc::CallbackServerContext* context,
                  const v1::DownloadRequest* request)
      : deps_(deps), rpc_(deps.metrics, "Download") {
    absl::StatusOr<Principal> principal =
        Authenticate(deps, context, "Download");
    absl::StatusOr<ArtifactInfo> artifact =
        principal.ok()
            ? deps.store->Lookup(principal->tenant, request->sha256())
            : principal.status();
    if (!artifact.ok()) {
      FinishWith(artifact.status());
      return;
    }
    if (request->offset() > artifact->size_bytes) {
      FinishWith(absl::OutOfRangeError(
          absl::StrCat("offset ", request->offset(), " is past the end of the ",
                       artifact->size_bytes, "-byte artifact")));
      return;
    }
    size_ = artifact->size_bytes;
    next_read_ = request->offset();
    for (v1::DownloadResponse& buffer : buffers_) {
      buffer.set_total_size_bytes(size_);
      buffer.set_sha256(artifact->sha256);
    }
    const std::string path = deps.store->BlobPath(artifact->sha256);
    absl::MutexLock lock(&mu_);
    opening_ = true;
    deps.io->Schedule([this, path] {
      absl::Status opened = OpenBlob(path, &fd_);
      {
        absl::MutexLock lock(&mu_);
        opening_ = false;
        if (!opened.ok()) error_ = opened;
      }
      Pump();
    });
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (ok) {
        bytes_sent_ += buffers_[writing_index_].data().size();
      } else if (error_.ok()) {
        error_ = absl::CancelledError("the client stopped reading");
      }
      free_.push_back(writing_index_);
    }
    Pump();
  }

  void OnCancel() override {
    {
      absl::MutexLock lock(&mu_);
      if (error_.ok()) error_ = absl::CancelledError("download cancelled");
    }
    Pump();
  }

  void OnDone() override {
    if (fd_ >= 0) ::close(fd_);
    deps_.metrics->AddDownloadedBytes(bytes_sent_);
    delete this;
  }

 private:
  // Pump starts whatever can start now and finishes once nothing is in
  // flight. Finish is called outside the lock, as the last action.
  void Pump() {
    std::optional<absl::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      const bool busy = writing_ || reading_ || opening_;
      if (!error_.ok()) {
        if (!busy) finish = error_;
      } else if (!opening_) {
        if (!writing_ && !ready_.empty()) {
          writing_index_ = ready_.front();
          ready_.pop_front();
          writing_ = true;
          StartWrite(&buffers_[writing_index_]);
        }
        if (!reading_ && !free_.empty() && (next_read_ < size_ || !started_)) {
          const int index = free_.front();
          free_.pop_front();
          const uint64_t offset = next_read_;
          const size_t length = static_cast<size_t>(
              std::min<uint64_t>(kMaxChunkBytes, size_ - offset));
          next_read_ += length;
          started_ = true;
          reading_ = true;
          deps_.io->Schedule([this, index, offset, length] {
            absl::Status read =
                ReadAt(fd_, offset, length, buffers_[index].mutable_data());
            buffers_[index].set_offset(offset);
            {
              absl::MutexLock lock(&mu_);
              reading_ = false;
              if (!read.ok() && error_.ok()) error_ = read;
              if (read.ok()) ready_.push_back(index);
            }
            Pump();
          });
        }
        if (!writing_ && !reading_ && ready_.empty() && started_ &&
            next_read_ >= size_) {
          finish = absl::OkStatus();
        }
      }
      if (finish.has_value()) finished_ = true;
    }
    if (finish.has_value()) FinishWith(*finish);
  }

  void FinishWith(const absl::Status& status) { Finish(rpc_.Done(status)); }

  const ServiceDeps deps_;
  const RpcRecorder rpc_;
  uint64_t size_ = 0;
  int fd_ = -1;  // set once by the open task, before any read
  v1::DownloadResponse buffers_[2];

  absl::Mutex mu_;
  std::deque<int> free_ ABSL_GUARDED_BY(mu_) = {0, 1};
  std::deque<int> ready_ ABSL_GUARDED_BY(mu_);
  int writing_index_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_read_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t bytes_sent_ ABSL_GUARDED_BY(mu_) = 0;
  bool started_ ABSL_GUARDED_BY(mu_) = false;
  bool opening_ ABSL_GUARDED_BY(mu_) = false;
  bool reading_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status error_ ABSL_GUARDED_BY(mu_);
};

// ---- WatchJob ---------------------------------------------------------------

// WatchReactor writes the newest snapshot whenever no write is in flight;
// snapshots that arrive meanwhile replace each other, so a slow client gets
// fewer events but always the latest and the terminal one.
class WatchReactor final : public grpc::ServerWriteReactor<v1::JobEvent> {
 public:
  WatchReactor(const ServiceDeps& deps, grpc::CallbackServerContext* context,
               const v1::WatchJobRequest* request)
      : deps_(deps), rpc_(deps.metrics, "WatchJob") {
    absl::StatusOr<Principal> principal =
        Authenticate(deps, context, "WatchJob");
    absl::StatusOr<uint64_t> watch_id =
        principal.ok() ? deps.jobs->Watch(principal->tenant, request->job_id(),
                                          [this](const JobSnapshot& snapshot) {
                                            OnUpdate(snapshot);
                                          })
                       : principal.status();
    if (!watch_id.ok()) {
      FinishWith(watch_id.status());
      return;
    }
    watch_id_ = *watch_id;
  }

  void OnWriteDone(bool ok) override {
    std::optional<absl::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok) {
        finish = absl::CancelledError("the client stopped reading");
      } else if (has_pending_) {
        WriteNextLocked();
      } else if (terminal_written_) {
        finish = absl::OkStatus();
      }
      if (finish.has_value()) finished_ = true;
    }
    if (finish.has_value()) FinishWith(*finish);
  }

  void OnCancel() override {
    {
      absl::MutexLock lock(&mu_);
      if (finished_ || writing_) return;  // OnWriteDone(false) finishes
      finished_ = true;
    }
    FinishWith(absl::CancelledError("watch cancelled"));
  }

  void OnDone() override {
    if (watch_id_ != 0) deps_.jobs->Unwatch(watch_id_);
    delete this;
  }

 private:
  void OnUpdate(const JobSnapshot& snapshot) {
    absl::MutexLock lock(&mu_);
    if (finished_ || snapshot.record.version <= latest_version_) return;
    latest_version_ = snapshot.record.version;
    pending_.Clear();
    JobToProto(snapshot, pending_.mutable_job());
    pending_.set_elapsed_seconds(ElapsedSeconds(snapshot.record));
    pending_terminal_ = IsTerminal(snapshot.record.state);
    has_pending_ = true;
    if (!writing_) WriteNextLocked();
  }

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    in_flight_.Swap(&pending_);
    has_pending_ = false;
    terminal_written_ = pending_terminal_;
    writing_ = true;
    StartWrite(&in_flight_);
  }

  void FinishWith(const absl::Status& status) { Finish(rpc_.Done(status)); }

  const ServiceDeps deps_;
  const RpcRecorder rpc_;
  uint64_t watch_id_ = 0;

  absl::Mutex mu_;
  v1::JobEvent pending_ ABSL_GUARDED_BY(mu_);
  v1::JobEvent in_flight_ ABSL_GUARDED_BY(mu_);
  uint64_t latest_version_ ABSL_GUARDED_BY(mu_) = 0;
  bool has_pending_ ABSL_GUARDED_BY(mu_) = false;
  bool pending_terminal_ ABSL_GUARDED_BY(mu_) = false;
  bool terminal_written_ ABSL_GUARDED_BY(mu_) = false;
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

// ---- Sanitize ---------------------------------------------------------------

// SanitizeReactor: uploads (as in Upload), then the spec, then job events,
// then the result's bytes. Writes go through an outbox with one write in
// flight; a queued job event is replaced by a newer one.
class SanitizeReactor final
    : public grpc::ServerBidiReactor<v1::SanitizeRequest,
                                     v1::SanitizeResponse> {
 public:
  SanitizeReactor(const ServiceDeps& deps, grpc::CallbackServerContext* context)
      : deps_(deps), rpc_(deps.metrics, "Sanitize") {
    absl::StatusOr<Principal> principal =
        Authenticate(deps, context, "Sanitize");
    if (!principal.ok()) {
      Fail(principal.status());
      return;
    }
    if (deps.draining->load()) {
      Fail(DrainingError());
      return;
    }
    tenant_ = principal->tenant;
    StartRead(&request_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {
      absl::MutexLock lock(&mu_);
      if (spec_received_) return;  // the client half-closed after the spec
    }
    if (!ok) {
      Fail(cancelled_ ? absl::CancelledError("cancelled by the client")
                      : absl::InvalidArgumentError(
                            "the stream ended before the JobSpec; send the "
                            "uploads, then the spec"));
      return;
    }
    absl::Status status = HandleRequest();
    if (!status.ok()) Fail(status);
  }

  void OnWriteDone(bool ok) override {
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok && error_.ok()) {
        error_ = absl::CancelledError("the client stopped reading");
      }
    }
    Pump();
  }

  void OnCancel() override {
    cancelled_ = true;
    Fail(absl::CancelledError("cancelled by the client"));
  }

  void OnDone() override {
    if (watch_id_ != 0) deps_.jobs->Unwatch(watch_id_);
    if (result_fd_ >= 0) ::close(result_fd_);
    delete this;
  }

 private:
  // HandleRequest processes one client message (reaction thread).
  absl::Status HandleRequest() {
    switch (request_.payload_case()) {
      case v1::SanitizeRequest::kUpload: {
        if (pipeline_ != nullptr) {
          return absl::InvalidArgumentError(
              "a new upload started before the previous one sent all its "
              "declared bytes");
        }
        absl::StatusOr<UploadDeclaration> declaration =
            DeclarationFromProto(request_.upload());
        if (!declaration.ok()) return declaration.status();
        absl::StatusOr<std::shared_ptr<UploadPipeline>> pipeline =
            deps_.store->BeginUpload(tenant_, *declaration,
                                     [this] { OnRoom(); });
        if (!pipeline.ok()) return pipeline.status();
        {
          absl::MutexLock lock(&mu_);
          pipeline_ = *std::move(pipeline);
        }
        if (declaration->size_bytes == 0) {
          CommitUpload();
        } else {
          StartRead(&request_);
        }
        return absl::OkStatus();
      }
      case v1::SanitizeRequest::kChunk: {
        if (pipeline_ == nullptr) {
          return absl::InvalidArgumentError(
              "a chunk arrived with no open upload; send UploadMetadata "
              "first");
        }
        RETURN_IF_ERROR(CheckChunk(request_.chunk(),
                                   pipeline_->received_bytes(),
                                   pipeline_->declaration()));
        RETURN_IF_ERROR(pipeline_->status());
        const bool complete =
            pipeline_->received_bytes() + request_.chunk().size() ==
            pipeline_->declaration().size_bytes;
        if (complete) {
          // Before Append, so that OnRoom cannot start a read meanwhile.
          absl::MutexLock lock(&mu_);
          committing_ = true;
        }
        const bool room =
            pipeline_->Append(std::move(*request_.mutable_chunk()));
        if (complete) {
          CommitUpload();
        } else if (room) {
          StartRead(&request_);
        }
        return absl::OkStatus();
      }
      case v1::SanitizeRequest::kSpec: {
        if (pipeline_ != nullptr) {
          return absl::InvalidArgumentError(
              "the JobSpec arrived before the open upload sent all its "
              "declared bytes");
        }
        absl::StatusOr<JobSpec> spec = JobSpecFromProto(request_.spec());
        if (!spec.ok()) return spec.status();
        {
          absl::MutexLock lock(&mu_);
          spec_received_ = true;
        }
        // Keep a read open to notice the client's half-close or cancel.
        StartRead(&request_);
        deps_.jobs->Submit(tenant_, *std::move(spec),
                           [this](absl::StatusOr<JobSnapshot> job) {
                             OnSubmitted(std::move(job));
                           });
        return absl::OkStatus();
      }
      case v1::SanitizeRequest::PAYLOAD_NOT_SET:
        break;
    }
    return absl::InvalidArgumentError("empty SanitizeRequest");
  }

  // Reading resumes only when the pipeline has room and no commit runs.
  void OnRoom() {
    absl::Status status = pipeline_->status();
    {
      absl::MutexLock lock(&mu_);
      if (committing_ || !error_.ok()) return;
    }
    if (!status.ok()) {
      Fail(status);
    } else {
      StartRead(&request_);
    }
  }

  void CommitUpload() {
    {
      absl::MutexLock lock(&mu_);
      committing_ = true;
      ++io_pending_;
    }
    pipeline_->Commit([this](absl::StatusOr<ArtifactInfo> artifact) {
      bool read_next = false;
      {
        absl::MutexLock lock(&mu_);
        --io_pending_;
        committing_ = false;
        if (artifact.ok() && error_.ok()) {
          deps_.metrics->AddUploadedBytes(artifact->size_bytes);
          v1::SanitizeResponse response;
          ArtifactToProto(*artifact, response.mutable_uploaded());
          outbox_.push_back(std::move(response));
          last_is_event_ = false;
          read_next = true;
        }
        pipeline_.reset();
      }
      if (!artifact.ok()) {
        Fail(artifact.status());
        return;
      }
      if (read_next) StartRead(&request_);
      Pump();
    });
  }

  void OnSubmitted(absl::StatusOr<JobSnapshot> job) {
    if (!job.ok()) {
      Fail(job.status());
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      job_id_ = job->record.id;
    }
    if (cancelled_) {
      deps_.jobs->Cancel(tenant_, job->record.id, [](auto) {});
      Fail(absl::CancelledError("cancelled by the client"));
      return;
    }
    absl::StatusOr<uint64_t> watch_id = deps_.jobs->Watch(
        tenant_, job->record.id,
        [this](const JobSnapshot& snapshot) { OnJobUpdate(snapshot); });
    if (!watch_id.ok()) {
      Fail(watch_id.status());
      return;
    }
    {
      absl::MutexLock lock(&mu_);
      watch_id_ = *watch_id;
    }
    Pump();
  }

  void OnJobUpdate(const JobSnapshot& snapshot) {
    const JobRecord& record = snapshot.record;
    {
      absl::MutexLock lock(&mu_);
      if (job_terminal_ || record.version <= latest_version_) return;
      latest_version_ = record.version;
      v1::SanitizeResponse response;
      JobToProto(snapshot, response.mutable_event()->mutable_job());
      response.mutable_event()->set_elapsed_seconds(ElapsedSeconds(record));
      if (last_is_event_ && !outbox_.empty()) {
        outbox_.back() = std::move(response);
      } else {
        outbox_.push_back(std::move(response));
      }
      last_is_event_ = true;
      if (IsTerminal(record.state)) {
        job_terminal_ = true;
        last_is_event_ = false;  // the terminal event is never replaced
        if (record.state == JobState::kSucceeded) {
          result_size_ = record.result_model.size_bytes;
          result_sha256_ = record.result_model.sha256;
          ++io_pending_;
          deps_.io->Schedule(
              [this, path = deps_.store->BlobPath(record.result_model.sha256)] {
                int fd = -1;
                absl::Status opened = OpenBlob(path, &fd);
                {
                  absl::MutexLock lock(&mu_);
                  --io_pending_;
                  result_fd_ = fd;
                  if (!opened.ok() && error_.ok()) error_ = opened;
                  streaming_result_ = opened.ok();
                  final_status_ = absl::OkStatus();
                  final_ready_ = true;
                }
                Pump();
              });
        } else {
          final_status_ = record.state == JobState::kCancelled
                              ? absl::CancelledError(record.error.message())
                              : record.error;
          final_ready_ = true;
        }
      }
    }
    Pump();
  }

  // Fail records the first error, stops the upload and the job, and
  // finishes once nothing is in flight.
  void Fail(const absl::Status& status) {
    std::shared_ptr<UploadPipeline> pipeline;
    std::string job_to_cancel;
    {
      absl::MutexLock lock(&mu_);
      if (!error_.ok() || finished_) return;
      error_ = status;
      pipeline = pipeline_;
      if (pipeline != nullptr) ++io_pending_;
      if (!job_id_.empty() && !job_terminal_) job_to_cancel = job_id_;
    }
    if (!job_to_cancel.empty()) {
      deps_.jobs->Cancel(tenant_, job_to_cancel, [](auto) {});
    }
    if (pipeline != nullptr) {
      pipeline->Abort([this] {
        {
          absl::MutexLock lock(&mu_);
          --io_pending_;
        }
        Pump();
      });
      return;
    }
    Pump();
  }

  void Pump() {
    std::optional<absl::Status> finish;
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      if (!error_.ok()) {
        if (!writing_ && io_pending_ == 0 && !result_reading_) finish = error_;
      } else {
        if (!writing_ && !outbox_.empty()) {
          in_flight_ = std::move(outbox_.front());
          outbox_.pop_front();
          if (outbox_.empty()) last_is_event_ = false;
          writing_ = true;
          StartWrite(&in_flight_);
        }
        if (streaming_result_ && !result_reading_ && outbox_.empty() &&
            result_offset_ < result_size_) {
          result_reading_ = true;
          const uint64_t offset = result_offset_;
          const size_t length = static_cast<size_t>(
              std::min<uint64_t>(kMaxChunkBytes, result_size_ - offset));
          result_offset_ += length;
          deps_.io->Schedule([this, offset, length] {
            v1::SanitizeResponse response;
            v1::DownloadResponse* chunk = response.mutable_result_chunk();
            absl::Status read =
                ReadAt(result_fd_, offset, length, chunk->mutable_data());
            chunk->set_offset(offset);
            {
              absl::MutexLock lock(&mu_);
              chunk->set_total_size_bytes(result_size_);
              chunk->set_sha256(result_sha256_);
              result_reading_ = false;
              if (!read.ok() && error_.ok()) error_ = read;
              outbox_.push_back(std::move(response));
              last_is_event_ = false;
            }
            Pump();
          });
        }
        const bool result_sent =
            !streaming_result_ || result_offset_ >= result_size_;
        if (final_ready_ && !writing_ && outbox_.empty() && io_pending_ == 0 &&
            !result_reading_ && result_sent) {
          finish = final_status_;
        }
      }
      if (finish.has_value()) finished_ = true;
    }
    if (finish.has_value()) Finish(rpc_.Done(*finish));
  }

  const ServiceDeps deps_;
  const RpcRecorder rpc_;
  std::string tenant_;
  // request_ and pipeline_ follow the read protocol: only the reaction or
  // callback that owns the current read touches them.
  v1::SanitizeRequest request_;
  std::shared_ptr<UploadPipeline> pipeline_;
  std::atomic<bool> cancelled_{false};

  absl::Mutex mu_;
  bool spec_received_ ABSL_GUARDED_BY(mu_) = false;
  bool committing_ ABSL_GUARDED_BY(mu_) = false;
  int io_pending_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<v1::SanitizeResponse> outbox_ ABSL_GUARDED_BY(mu_);
  // The outbox's last message is a job event that a newer one may replace.
  bool last_is_event_ ABSL_GUARDED_BY(mu_) = false;
  v1::SanitizeResponse in_flight_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  std::string job_id_ ABSL_GUARDED_BY(mu_);
  uint64_t watch_id_ = 0;  // set once, read in OnDone
  uint64_t latest_version_ ABSL_GUARDED_BY(mu_) = 0;
  bool job_terminal_ ABSL_GUARDED_BY(mu_) = false;
  int result_fd_ = -1;  // set once by the open task
  std::string result_sha256_ ABSL_GUARDED_BY(mu_);
  uint64_t result_size_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t result_offset_ ABSL_GUARDED_BY(mu_) = 0;
  bool streaming_result_ ABSL_GUARDED_BY(mu_) = false;
  bool result_reading_ ABSL_GUARDED_BY(mu_) = false;
  bool final_ready_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
  absl::Status error_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace

// ---- Unary methods ----------------------------------------------------------

grpc::ServerReadReactor<v1::UploadRequest>* SanitizerService::Upload(
    grpc::CallbackServerContext* context, v1::Artifact* response) {
  return new UploadReactor(deps_, context, response);
}

grpc::ServerWriteReactor<v1::DownloadResponse>* SanitizerService::Download(
    grpc::CallbackServerContext* context, const v1::DownloadRequest* request) {
  return new DownloadReactor(deps_, context, request);
}

grpc::ServerUnaryReactor* SanitizerService::GetArtifact(
    grpc::CallbackServerContext* context, const v1::GetArtifactRequest* request,
    v1::Artifact* response) {
  RpcRecorder rpc(deps_.metrics, "GetArtifact");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  absl::StatusOr<ArtifactInfo> artifact =
      principal.ok() ? deps_.store->Lookup(principal->tenant, request->sha256())
                     : principal.status();
  if (artifact.ok()) ArtifactToProto(*artifact, response);
  reactor->Finish(rpc.Done(artifact.status()));
  return reactor;
}

grpc::ServerUnaryReactor* SanitizerService::ListArtifacts(
    grpc::CallbackServerContext* context,
    const v1::ListArtifactsRequest* request,
    v1::ListArtifactsResponse* response) {
  RpcRecorder rpc(deps_.metrics, "ListArtifacts");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  if (principal.ok()) {
    for (const ArtifactInfo& info : deps_.store->List(principal->tenant)) {
      ArtifactToProto(info, response->add_artifacts());
    }
    response->set_used_bytes(deps_.store->UsedBytes(principal->tenant));
    response->set_quota_bytes(deps_.store->quota_bytes());
  }
  reactor->Finish(rpc.Done(principal.status()));
  return reactor;
}

grpc::ServerUnaryReactor* SanitizerService::DeleteArtifact(
    grpc::CallbackServerContext* context,
    const v1::DeleteArtifactRequest* request,
    v1::DeleteArtifactResponse* response) {
  RpcRecorder rpc(deps_.metrics, "DeleteArtifact");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  if (!principal.ok()) {
    reactor->Finish(rpc.Done(principal.status()));
    return reactor;
  }
  deps_.io->Schedule([this, rpc, reactor, tenant = principal->tenant,
                      sha = request->sha256()] {
    reactor->Finish(rpc.Done(deps_.store->Delete(tenant, sha)));
  });
  return reactor;
}

grpc::ServerUnaryReactor* SanitizerService::SubmitJob(
    grpc::CallbackServerContext* context, const v1::SubmitJobRequest* request,
    v1::Job* response) {
  RpcRecorder rpc(deps_.metrics, "SubmitJob");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  absl::StatusOr<JobSpec> spec =
      principal.ok() ? JobSpecFromProto(request->spec()) : principal.status();
  if (spec.ok() && deps_.draining->load()) spec = DrainingError();
  if (!spec.ok()) {
    reactor->Finish(rpc.Done(spec.status()));
    return reactor;
  }
  deps_.jobs->Submit(principal->tenant, *std::move(spec),
                     [rpc, reactor, response](absl::StatusOr<JobSnapshot> job) {
                       if (job.ok()) JobToProto(*job, response);
                       reactor->Finish(rpc.Done(job.status()));
                     });
  return reactor;
}

grpc::ServerUnaryReactor* SanitizerService::GetJob(
    grpc::CallbackServerContext* context, const v1::GetJobRequest* request,
    v1::Job* response) {
  RpcRecorder rpc(deps_.metrics, "GetJob");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  absl::StatusOr<JobSnapshot> job =
      principal.ok() ? deps_.jobs->Get(principal->tenant, request->job_id())
                     : principal.status();
  if (job.ok()) JobToProto(*job, response);
  reactor->Finish(rpc.Done(job.status()));
  return reactor;
}

grpc::ServerWriteReactor<v1::JobEvent>* SanitizerService::WatchJob(
    grpc::CallbackServerContext* context, const v1::WatchJobRequest* request) {
  return new WatchReactor(deps_, context, request);
}

grpc::ServerUnaryReactor* SanitizerService::CancelJob(
    grpc::CallbackServerContext* context, const v1::CancelJobRequest* request,
    v1::Job* response) {
  RpcRecorder rpc(deps_.metrics, "CancelJob");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  if (!principal.ok()) {
    reactor->Finish(rpc.Done(principal.status()));
    return reactor;
  }
  deps_.jobs->Cancel(principal->tenant, request->job_id(),
                     [rpc, reactor, response](absl::StatusOr<JobSnapshot> job) {
                       if (job.ok()) JobToProto(*job, response);
                       reactor->Finish(rpc.Done(job.status()));
                     });
  return reactor;
}

grpc::ServerUnaryReactor* SanitizerService::ListJobs(
    grpc::CallbackServerContext* context, const v1::ListJobsRequest* request,
    v1::ListJobsResponse* response) {
  RpcRecorder rpc(deps_.metrics, "ListJobs");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  absl::StatusOr<JobManager::JobPage> page =
      principal.ok() ? deps_.jobs->List(principal->tenant, request->page_size(),
                                        request->page_token())
                     : principal.status();
  if (page.ok()) {
    for (const JobSnapshot& job : page->jobs) {
      JobToProto(job, response->add_jobs());
    }
    response->set_next_page_token(page->next_page_token);
  }
  reactor->Finish(rpc.Done(page.status()));
  return reactor;
}

grpc::ServerBidiReactor<v1::SanitizeRequest, v1::SanitizeResponse>*
SanitizerService::Sanitize(grpc::CallbackServerContext* context) {
  return new SanitizeReactor(deps_, context);
}

grpc::ServerUnaryReactor* SanitizerService::RegisterArchitecture(
    grpc::CallbackServerContext* context,
    const v1::RegisterArchitectureRequest* request,
    v1::Architecture* response) {
  RpcRecorder rpc(deps_.metrics, "RegisterArchitecture");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method(), /*require_admin=*/true);
  absl::StatusOr<ArtifactInfo> artifact =
      principal.ok() ? deps_.store->Lookup(principal->tenant, request->sha256())
                     : principal.status();
  if (!artifact.ok()) {
    reactor->Finish(rpc.Done(artifact.status()));
    return reactor;
  }
  deps_.io->Schedule([this, rpc, reactor, response, name = request->name(),
                      artifact = *artifact, tenant = principal->tenant] {
    absl::StatusOr<ArchitectureInfo> info =
        deps_.architectures->Register(name, artifact, tenant);
    if (info.ok()) ArchitectureToProto(*info, response);
    reactor->Finish(rpc.Done(info.status()));
  });
  return reactor;
}

grpc::ServerUnaryReactor* SanitizerService::ListArchitectures(
    grpc::CallbackServerContext* context,
    const v1::ListArchitecturesRequest* request,
    v1::ListArchitecturesResponse* response) {
  RpcRecorder rpc(deps_.metrics, "ListArchitectures");
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  absl::StatusOr<Principal> principal =
      Authenticate(deps_, context, rpc.method());
  if (principal.ok()) {
    for (const ArchitectureInfo& info : deps_.architectures->List()) {
      ArchitectureToProto(info, response->add_architectures());
    }
  }
  reactor->Finish(rpc.Done(principal.status()));
  return reactor;
}

}  // namespace mergeguard
