#include "client/sanitizer_client.h"

#include <fcntl.h>
#include <grpcpp/generic/generic_stub.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "core/file_util.h"
#include "core/sha256.h"
#include "core/status_macros.h"

namespace mergeguard {
namespace {

constexpr size_t kMinChunkBytes = 64 << 10;
constexpr size_t kMaxChunkBytes = 1 << 20;

bool IsRetryable(const absl::Status& status) {
  return absl::IsUnavailable(status) || absl::IsDeadlineExceeded(status) ||
         absl::IsAborted(status);
}

std::string BaseName(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// FileReader reads a file sequentially in chunks.
class FileReader {
 public:
  ~FileReader() {
    if (fd_ >= 0) ::close(fd_);
  }
  absl::Status Open(const std::string& path) {
    path_ = path;
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) return ErrnoToStatus(errno, absl::StrCat("open ", path));
    return absl::OkStatus();
  }
  absl::StatusOr<size_t> Read(char* buffer, size_t size) {
    size_t done = 0;
    while (done < size) {
      ssize_t n = ::read(fd_, buffer + done, size - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return ErrnoToStatus(errno, absl::StrCat("read ", path_));
      if (n == 0) break;
      done += static_cast<size_t>(n);
    }
    return done;
  }

 private:
  std::string path_;
  int fd_ = -1;
};

absl::Status AppendToFile(int fd, absl::string_view data,
                          const std::string& path) {
  while (!data.empty()) {
    ssize_t n = ::write(fd, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return ErrnoToStatus(errno, absl::StrCat("write ", path));
    data.remove_prefix(static_cast<size_t>(n));
  }
  return absl::OkStatus();
}

// HashFilePrefix feeds the first `size` bytes of `path` into `hasher`.
absl::Status HashFilePrefix(const std::string& path, uint64_t size,
                            Sha256& hasher) {
  FileReader reader;
  RETURN_IF_ERROR(reader.Open(path));
  std::string buffer(kMaxChunkBytes, '\0');
  uint64_t left = size;
  while (left > 0) {
    ASSIGN_OR_RETURN(
        size_t n,
        reader.Read(buffer.data(), static_cast<size_t>(std::min<uint64_t>(
                                       left, buffer.size()))));
    if (n == 0) return absl::DataLossError(absl::StrCat(path, " shrank"));
    hasher.Update(buffer.data(), n);
    left -= n;
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                      status.error_message());
}

absl::StatusOr<std::unique_ptr<SanitizerClient>> SanitizerClient::Create(
    const SanitizerClientOptions& options) {
  if (options.chunk_bytes < kMinChunkBytes ||
      options.chunk_bytes > kMaxChunkBytes) {
    return absl::InvalidArgumentError(
        "chunk_bytes must be between 64 KiB and 1 MiB");
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials;
  grpc::ChannelArguments arguments;
  if (options.use_tls || !options.tls_ca_file.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!options.tls_ca_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(options.tls_ca_file));
    }
    if (!options.tls_client_cert_file.empty()) {
      ASSIGN_OR_RETURN(ssl.pem_cert_chain,
                       ReadFile(options.tls_client_cert_file));
      ASSIGN_OR_RETURN(ssl.pem_private_key,
                       ReadFile(options.tls_client_key_file));
    }
    credentials = grpc::SslCredentials(ssl);
    if (!options.tls_server_name.empty()) {
      arguments.SetSslTargetNameOverride(options.tls_server_name);
    }
  } else {
    credentials = grpc::InsecureChannelCredentials();
  }
  if (options.dedicated_connection) {
    arguments.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  }
  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateCustomChannel(options.target, credentials, arguments);
  return std::unique_ptr<SanitizerClient>(
      new SanitizerClient(options, std::move(channel)));
}

SanitizerClient::SanitizerClient(const SanitizerClientOptions& options,
                                 std::shared_ptr<grpc::Channel> channel)
    : options_(options),
      channel_(std::move(channel)),
      stub_(v1::Sanitizer::NewStub(channel_)) {}

std::unique_ptr<grpc::ClientContext> SanitizerClient::NewContext(
    absl::Duration timeout) const {
  auto context = std::make_unique<grpc::ClientContext>();
  context->set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  if (!options_.token.empty()) {
    context->AddMetadata("authorization",
                         absl::StrCat("Bearer ", options_.token));
  }
  return context;
}

absl::StatusOr<v1::Artifact> SanitizerClient::UploadStream(
    const v1::UploadMetadata& metadata,
    const std::function<absl::StatusOr<size_t>(char*, size_t)>& read) {
  std::unique_ptr<grpc::ClientContext> context =
      NewContext(options_.transfer_timeout);
  v1::Artifact artifact;
  std::unique_ptr<grpc::ClientWriter<v1::UploadRequest>> writer =
      stub_->Upload(context.get(), &artifact);
  v1::UploadRequest request;
  *request.mutable_metadata() = metadata;
  absl::Status local_error;
  if (writer->Write(request)) {
    uint64_t sent = 0;
    while (sent < metadata.size_bytes()) {
      std::string* chunk = request.mutable_chunk();
      chunk->resize(static_cast<size_t>(std::min<uint64_t>(
          options_.chunk_bytes, metadata.size_bytes() - sent)));
      absl::StatusOr<size_t> n = read(chunk->data(), chunk->size());
      if (!n.ok() || *n != chunk->size()) {
        local_error = n.ok() ? absl::DataLossError(
                                   "the file changed while "
                                   "it was being uploaded")
                             : n.status();
        context->TryCancel();
        break;
      }
      // A failed write means the server answered early; Finish says why.
      if (!writer->Write(request)) break;
      sent += *n;
    }
  }
  writer->WritesDone();
  grpc::Status status = writer->Finish();
  if (!local_error.ok()) return local_error;
  if (!status.ok()) return FromGrpcStatus(status);
  return artifact;
}

absl::StatusOr<v1::Artifact> SanitizerClient::UploadFile(
    const std::string& path, v1::ArtifactKind kind, const std::string& name) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("stat ", path));
  }
  ASSIGN_OR_RETURN(std::string digest, Sha256File(path));
  // Content addressing: bytes the tenant already stored need no transfer.
  absl::StatusOr<v1::Artifact> existing = GetArtifact(digest);
  if (existing.ok()) {
    existing->set_already_present(true);
    return existing;
  }
  if (!absl::IsNotFound(existing.status())) return existing.status();
  v1::UploadMetadata metadata;
  metadata.set_name(name.empty() ? BaseName(path) : name);
  metadata.set_kind(kind);
  metadata.set_size_bytes(static_cast<uint64_t>(st.st_size));
  metadata.set_sha256(digest);
  FileReader reader;
  RETURN_IF_ERROR(reader.Open(path));
  return UploadStream(metadata, [&reader](char* buffer, size_t size) {
    return reader.Read(buffer, size);
  });
}

absl::StatusOr<v1::Artifact> SanitizerClient::UploadBytes(
    absl::string_view bytes, v1::ArtifactKind kind, const std::string& name) {
  v1::UploadMetadata metadata;
  metadata.set_name(name);
  metadata.set_kind(kind);
  metadata.set_size_bytes(bytes.size());
  metadata.set_sha256(Sha256Hex(bytes));
  size_t offset = 0;
  return UploadStream(metadata,
                      [&](char* buffer, size_t size) -> absl::StatusOr<size_t> {
                        size_t n = std::min(size, bytes.size() - offset);
                        std::memcpy(buffer, bytes.data() + offset, n);
                        offset += n;
                        return n;
                      });
}

absl::StatusOr<uint64_t> SanitizerClient::Download(
    const std::string& sha256, uint64_t offset,
    const std::function<absl::Status(const v1::DownloadResponse&)>& sink) {
  std::unique_ptr<grpc::ClientContext> context =
      NewContext(options_.transfer_timeout);
  v1::DownloadRequest request;
  request.set_sha256(sha256);
  request.set_offset(offset);
  std::unique_ptr<grpc::ClientReader<v1::DownloadResponse>> reader =
      stub_->Download(context.get(), request);
  v1::DownloadResponse response;
  uint64_t total = 0;
  uint64_t expected_offset = offset;
  absl::Status local_error;
  while (reader->Read(&response)) {
    total = response.total_size_bytes();
    if (response.offset() != expected_offset) {
      local_error = absl::DataLossError(
          absl::StrCat("download: expected offset ", expected_offset, ", got ",
                       response.offset()));
    } else {
      local_error = sink(response);
    }
    if (!local_error.ok()) {
      context->TryCancel();
      break;
    }
    expected_offset += response.data().size();
  }
  grpc::Status status = reader->Finish();
  if (!local_error.ok()) return local_error;
  if (!status.ok()) return FromGrpcStatus(status);
  if (expected_offset != total) {
    return absl::DataLossError(absl::StrCat("download ended at byte ",
                                            expected_offset, " of ", total));
  }
  return total;
}

absl::Status SanitizerClient::DownloadToFile(const std::string& sha256,
                                             const std::string& path) {
  const std::string part = absl::StrCat(path, ".part");
  absl::Status last_error;
  for (int attempt = 0; attempt < std::max(1, options_.download_attempts);
       ++attempt) {
    int fd =
        ::open(part.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return ErrnoToStatus(errno, absl::StrCat("open ", part));
    struct stat st;
    ::fstat(fd, &st);
    const uint64_t have = static_cast<uint64_t>(st.st_size);
    // Resuming: the bytes already held count towards the digest.
    Sha256 hasher;
    absl::Status status = HashFilePrefix(part, have, hasher);
    absl::StatusOr<uint64_t> total =
        status.ok() ? Download(sha256, have,
                               [&](const v1::DownloadResponse& chunk) {
                                 hasher.Update(chunk.data());
                                 return AppendToFile(fd, chunk.data(), part);
                               })
                    : status;
    if (total.ok() && ::fsync(fd) != 0) {
      total = ErrnoToStatus(errno, absl::StrCat("fsync ", part));
    }
    ::close(fd);
    if (total.ok()) {
      if (hasher.FinishHex() != sha256) {
        ::unlink(part.c_str());
        return absl::DataLossError(
            absl::StrCat("downloaded bytes do not hash to ", sha256,
                         "; the partial file was removed, download again"));
      }
      if (::rename(part.c_str(), path.c_str()) != 0) {
        return ErrnoToStatus(errno, absl::StrCat("rename to ", path));
      }
      return absl::OkStatus();
    }
    last_error = total.status();
    if (absl::IsOutOfRange(last_error)) {
      ::unlink(part.c_str());  // a stale .part longer than the artifact
      continue;
    }
    if (!IsRetryable(last_error)) return last_error;
  }
  return last_error;
}

absl::StatusOr<std::string> SanitizerClient::DownloadBytes(
    const std::string& sha256) {
  std::string bytes;
  ASSIGN_OR_RETURN(uint64_t total,
                   Download(sha256, 0, [&](const v1::DownloadResponse& chunk) {
                     bytes.append(chunk.data());
                     return absl::OkStatus();
                   }));
  if (bytes.size() != total || Sha256Hex(bytes) != sha256) {
    return absl::DataLossError("downloaded bytes do not match the digest");
  }
  return bytes;
}

absl::StatusOr<v1::Artifact> SanitizerClient::GetArtifact(
    const std::string& sha256) {
  auto context = NewContext(options_.rpc_timeout);
  v1::GetArtifactRequest request;
  request.set_sha256(sha256);
  v1::Artifact response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->GetArtifact(context.get(), request, &response)));
  return response;
}

absl::StatusOr<v1::ListArtifactsResponse> SanitizerClient::ListArtifacts() {
  auto context = NewContext(options_.rpc_timeout);
  v1::ListArtifactsResponse response;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->ListArtifacts(
      context.get(), v1::ListArtifactsRequest(), &response)));
  return response;
}

absl::Status SanitizerClient::DeleteArtifact(const std::string& sha256) {
  auto context = NewContext(options_.rpc_timeout);
  v1::DeleteArtifactRequest request;
  request.set_sha256(sha256);
  v1::DeleteArtifactResponse response;
  return FromGrpcStatus(
      stub_->DeleteArtifact(context.get(), request, &response));
}

absl::StatusOr<v1::Job> SanitizerClient::SubmitJob(const v1::JobSpec& spec) {
  auto context = NewContext(options_.rpc_timeout);
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  v1::Job job;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->SubmitJob(context.get(), request, &job)));
  return job;
}

absl::StatusOr<v1::Job> SanitizerClient::GetJob(const std::string& job_id) {
  auto context = NewContext(options_.rpc_timeout);
  v1::GetJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->GetJob(context.get(), request, &job)));
  return job;
}

absl::StatusOr<v1::Job> SanitizerClient::CancelJob(const std::string& job_id) {
  auto context = NewContext(options_.rpc_timeout);
  v1::CancelJobRequest request;
  request.set_job_id(job_id);
  v1::Job job;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->CancelJob(context.get(), request, &job)));
  return job;
}

absl::StatusOr<v1::ListJobsResponse> SanitizerClient::ListJobs(
    int page_size, const std::string& token) {
  auto context = NewContext(options_.rpc_timeout);
  v1::ListJobsRequest request;
  request.set_page_size(page_size);
  request.set_page_token(token);
  v1::ListJobsResponse response;
  RETURN_IF_ERROR(
      FromGrpcStatus(stub_->ListJobs(context.get(), request, &response)));
  return response;
}

absl::StatusOr<v1::Job> SanitizerClient::WatchJob(
    const std::string& job_id,
    const std::function<void(const v1::JobEvent&)>& on_event) {
  auto context = NewContext(options_.transfer_timeout);
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  std::unique_ptr<grpc::ClientReader<v1::JobEvent>> reader =
      stub_->WatchJob(context.get(), request);
  v1::JobEvent event;
  v1::Job last;
  while (reader->Read(&event)) {
    if (on_event) on_event(event);
    last = event.job();
  }
  RETURN_IF_ERROR(FromGrpcStatus(reader->Finish()));
  const v1::JobState state = last.state();
  if (state != v1::JOB_STATE_SUCCEEDED && state != v1::JOB_STATE_FAILED &&
      state != v1::JOB_STATE_CANCELLED) {
    return absl::UnavailableError("the watch ended before the job finished");
  }
  return last;
}

absl::StatusOr<v1::Job> SanitizerClient::Sanitize(
    const std::vector<SanitizeUpload>& uploads, const v1::JobSpec& spec,
    const std::string& output_path,
    const std::function<void(const v1::JobEvent&)>& on_event) {
  auto context = NewContext(options_.transfer_timeout);
  std::unique_ptr<
      grpc::ClientReaderWriter<v1::SanitizeRequest, v1::SanitizeResponse>>
      stream = stub_->Sanitize(context.get());
  v1::SanitizeRequest request;
  v1::SanitizeResponse response;
  absl::Status local_error;
  bool open = true;
  // Uploads go one after the other; the server acknowledges each.
  for (const SanitizeUpload& upload : uploads) {
    struct stat st;
    if (::stat(upload.path.c_str(), &st) != 0) {
      local_error = ErrnoToStatus(errno, absl::StrCat("stat ", upload.path));
      break;
    }
    absl::StatusOr<std::string> digest = Sha256File(upload.path);
    FileReader reader;
    if (digest.ok()) local_error = reader.Open(upload.path);
    if (!digest.ok()) local_error = digest.status();
    if (!local_error.ok()) break;
    v1::UploadMetadata* metadata = request.mutable_upload();
    metadata->set_name(BaseName(upload.path));
    metadata->set_kind(upload.kind);
    metadata->set_size_bytes(static_cast<uint64_t>(st.st_size));
    metadata->set_sha256(*digest);
    open = stream->Write(request);
    uint64_t sent = 0;
    const uint64_t size = static_cast<uint64_t>(st.st_size);
    while (open && sent < size) {
      std::string* chunk = request.mutable_chunk();
      chunk->resize(static_cast<size_t>(
          std::min<uint64_t>(options_.chunk_bytes, size - sent)));
      absl::StatusOr<size_t> n = reader.Read(chunk->data(), chunk->size());
      if (!n.ok() || *n != chunk->size()) {
        local_error = n.ok() ? absl::DataLossError(absl::StrCat(
                                   upload.path, " changed during the upload"))
                             : n.status();
        break;
      }
      open = stream->Write(request);
      sent += *n;
    }
    if (!local_error.ok() || !open) break;
    if (!stream->Read(&response) || !response.has_uploaded()) {
      open = false;
      break;
    }
  }
  if (local_error.ok() && open) {
    *request.mutable_spec() = spec;
    open = stream->Write(request);
    if (open) stream->WritesDone();
  }
  if (!local_error.ok()) context->TryCancel();

  const std::string part = absl::StrCat(output_path, ".part");
  int fd = -1;
  Sha256 hasher;
  v1::Job job;
  uint64_t received = 0;
  while (local_error.ok() && stream->Read(&response)) {
    if (response.has_event()) {
      job = response.event().job();
      if (on_event) on_event(response.event());
    } else if (response.has_result_chunk()) {
      const v1::DownloadResponse& chunk = response.result_chunk();
      if (fd < 0) {
        fd = ::open(part.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC,
                    0644);
        if (fd < 0) {
          local_error = ErrnoToStatus(errno, absl::StrCat("create ", part));
          break;
        }
      }
      hasher.Update(chunk.data());
      received += chunk.data().size();
      local_error = AppendToFile(fd, chunk.data(), part);
    }
  }
  if (!local_error.ok()) context->TryCancel();
  grpc::Status status = stream->Finish();
  if (fd >= 0) {
    if (local_error.ok() && ::fsync(fd) != 0) {
      local_error = ErrnoToStatus(errno, absl::StrCat("fsync ", part));
    }
    ::close(fd);
  }
  if (local_error.ok()) local_error = FromGrpcStatus(status);
  if (local_error.ok() && job.state() != v1::JOB_STATE_SUCCEEDED) {
    local_error = absl::InternalError("the stream ended without a result");
  }
  if (local_error.ok()) {
    if (fd < 0) {  // an empty result model never sends a chunk
      fd = ::open(part.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
      if (fd >= 0) ::close(fd);
    }
    if (received != job.result().model().size_bytes() ||
        hasher.FinishHex() != job.result().model().sha256()) {
      local_error = absl::DataLossError(
          "the result's bytes do not match its digest; run again");
    } else if (::rename(part.c_str(), output_path.c_str()) != 0) {
      local_error = ErrnoToStatus(errno, absl::StrCat("rename ", output_path));
    }
  }
  if (!local_error.ok()) {
    ::unlink(part.c_str());
    return local_error;
  }
  return job;
}

absl::StatusOr<v1::Architecture> SanitizerClient::RegisterArchitecture(
    const std::string& name, const std::string& sha256) {
  auto context = NewContext(options_.rpc_timeout);
  v1::RegisterArchitectureRequest request;
  request.set_name(name);
  request.set_sha256(sha256);
  v1::Architecture response;
  RETURN_IF_ERROR(FromGrpcStatus(
      stub_->RegisterArchitecture(context.get(), request, &response)));
  return response;
}

absl::StatusOr<v1::ListArchitecturesResponse>
SanitizerClient::ListArchitectures() {
  auto context = NewContext(options_.rpc_timeout);
  v1::ListArchitecturesResponse response;
  RETURN_IF_ERROR(FromGrpcStatus(stub_->ListArchitectures(
      context.get(), v1::ListArchitecturesRequest(), &response)));
  return response;
}

absl::StatusOr<std::string> SanitizerClient::HealthStatus() {
  // grpc.health.v1.Health/Check with an empty HealthCheckRequest (the whole
  // server). The reply is field 1, a varint enum; decoded by hand so the
  // client needs no generated health stubs.
  grpc::GenericStub generic(channel_);
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + options_.rpc_timeout));
  // An empty message still needs one (empty) slice to be sendable.
  grpc::Slice empty_slice(std::string{});
  grpc::ByteBuffer request(&empty_slice, 1);
  grpc::ByteBuffer response;
  grpc::Status status;
  absl::Notification done;
  generic.UnaryCall(&context, "/grpc.health.v1.Health/Check",
                    grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) {
                      status = std::move(s);
                      done.Notify();
                    });
  done.WaitForNotification();
  RETURN_IF_ERROR(FromGrpcStatus(status));
  std::vector<grpc::Slice> slices;
  if (!response.Dump(&slices).ok()) {
    return absl::InternalError("unreadable health response");
  }
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  int value = 0;  // proto3 default: UNKNOWN
  if (bytes.size() >= 2 && bytes[0] == 0x08) value = bytes[1];
  switch (value) {
    case 1:
      return std::string("SERVING");
    case 2:
      return std::string("NOT_SERVING");
    case 3:
      return std::string("SERVICE_UNKNOWN");
    default:
      return std::string("UNKNOWN");
  }
}

}  // namespace mergeguard
