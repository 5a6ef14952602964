#ifndef MERGEGUARD_CLIENT_SANITIZER_CLIENT_H_
#define MERGEGUARD_CLIENT_SANITIZER_CLIENT_H_

// SanitizerClient: the mergeguard.v1.Sanitizer stubs wrapped to return
// absl::StatusOr, with chunked transfers (downloads resume from a `.part`
// file), deadlines, the bearer token and TLS.

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "mergeguard/v1/sanitizer.grpc.pb.h"

namespace mergeguard {

// SanitizerClientOptions configures a client.
struct SanitizerClientOptions {
  // Server address, host:port.
  std::string target = "localhost:50051";
  // Bearer token, sent as `authorization: Bearer <token>`; empty sends none.
  std::string token;
  // Use TLS. Implied by tls_ca_file; without it the system roots verify.
  bool use_tls = false;
  // CA bundle (PEM) that verifies the server certificate.
  std::string tls_ca_file;
  // mTLS: client certificate chain and key (PEM).
  std::string tls_client_cert_file;
  std::string tls_client_key_file;
  // Overrides the name checked against the server certificate (tests, IPs).
  std::string tls_server_name;
  // Deadline of unary calls.
  absl::Duration rpc_timeout = absl::Seconds(30);
  // Deadline of uploads, downloads, watches and Sanitize.
  absl::Duration transfer_timeout = absl::Hours(2);
  // Bytes per upload message, 64 KiB to 1 MiB.
  size_t chunk_bytes = 1 << 20;
  // Give this client its own TCP connection instead of sharing one with
  // other channels to the same target (load tests).
  bool dedicated_connection = false;
  // Attempts of a download interrupted by UNAVAILABLE, DEADLINE_EXCEEDED or
  // a broken stream; each resumes where the last stopped.
  int download_attempts = 3;
};

// FromGrpcStatus converts a gRPC status to absl (same canonical codes).
absl::Status FromGrpcStatus(const grpc::Status& status);

// SanitizeUpload is one file Sanitize sends before the spec.
struct SanitizeUpload {
  std::string path;
  v1::ArtifactKind kind = v1::ARTIFACT_KIND_MODEL;
};

// SanitizerClient is thread-safe.
class SanitizerClient {
 public:
  // Create builds the channel (no connection is made yet).
  static absl::StatusOr<std::unique_ptr<SanitizerClient>> Create(
      const SanitizerClientOptions& options);

  // UploadFile hashes `path`, and uploads it unless the tenant already owns
  // those bytes. `name` defaults to the file's base name.
  absl::StatusOr<v1::Artifact> UploadFile(const std::string& path,
                                          v1::ArtifactKind kind,
                                          const std::string& name = "");
  // UploadBytes uploads an in-memory artifact.
  absl::StatusOr<v1::Artifact> UploadBytes(absl::string_view bytes,
                                           v1::ArtifactKind kind,
                                           const std::string& name);

  // DownloadToFile writes the artifact to `path`. Bytes arrive in
  // `path`.part, which a later call resumes from; the digest is verified
  // (DATA_LOSS otherwise) before the rename to `path`.
  absl::Status DownloadToFile(const std::string& sha256,
                              const std::string& path);
  // Download streams the artifact from `offset`, handing each chunk to
  // `sink`; returns the artifact's total size.
  absl::StatusOr<uint64_t> Download(
      const std::string& sha256, uint64_t offset,
      const std::function<absl::Status(const v1::DownloadResponse&)>& sink);
  // DownloadBytes returns the whole artifact, digest verified.
  absl::StatusOr<std::string> DownloadBytes(const std::string& sha256);

  absl::StatusOr<v1::Artifact> GetArtifact(const std::string& sha256);
  absl::StatusOr<v1::ListArtifactsResponse> ListArtifacts();
  absl::Status DeleteArtifact(const std::string& sha256);

  absl::StatusOr<v1::Job> SubmitJob(const v1::JobSpec& spec);
  absl::StatusOr<v1::Job> GetJob(const std::string& job_id);
  absl::StatusOr<v1::Job> CancelJob(const std::string& job_id);
  absl::StatusOr<v1::ListJobsResponse> ListJobs(int page_size = 0,
                                                const std::string& token = "");
  // WatchJob calls `on_event` for each event and returns the job once it is
  // terminal.
  absl::StatusOr<v1::Job> WatchJob(
      const std::string& job_id,
      const std::function<void(const v1::JobEvent&)>& on_event = nullptr);

  // Sanitize uploads `uploads`, runs `spec` and writes the result model to
  // `output_path` (digest verified). Returns the final job; a failed job's
  // status is returned as the error.
  absl::StatusOr<v1::Job> Sanitize(
      const std::vector<SanitizeUpload>& uploads, const v1::JobSpec& spec,
      const std::string& output_path,
      const std::function<void(const v1::JobEvent&)>& on_event = nullptr);

  absl::StatusOr<v1::Architecture> RegisterArchitecture(
      const std::string& name, const std::string& sha256);
  absl::StatusOr<v1::ListArchitecturesResponse> ListArchitectures();

  // HealthStatus returns the grpc.health.v1 status of the whole server:
  // "SERVING", "NOT_SERVING", ...
  absl::StatusOr<std::string> HealthStatus();

  // NewContext returns a context with the token and a deadline of `timeout`
  // (for calls on stub()).
  std::unique_ptr<grpc::ClientContext> NewContext(absl::Duration timeout) const;
  v1::Sanitizer::Stub* stub() { return stub_.get(); }
  const SanitizerClientOptions& options() const { return options_; }

 private:
  SanitizerClient(const SanitizerClientOptions& options,
                  std::shared_ptr<grpc::Channel> channel);
  // UploadStream uploads `size` bytes produced by `read` (which fills a
  // buffer and returns how many bytes it wrote).
  absl::StatusOr<v1::Artifact> UploadStream(
      const v1::UploadMetadata& metadata,
      const std::function<absl::StatusOr<size_t>(char*, size_t)>& read);

  const SanitizerClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Sanitizer::Stub> stub_;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_SANITIZER_CLIENT_H_
