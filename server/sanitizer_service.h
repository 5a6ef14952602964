#ifndef MERGEGUARD_SERVER_SANITIZER_SERVICE_H_
#define MERGEGUARD_SERVER_SANITIZER_SERVICE_H_

// SanitizerService: the mergeguard.v1.Sanitizer callback service. Reactions
// only check requests, touch in-memory state and hand work to the I/O pool or
// the job manager; they never run models or wait on the disk.

#include <grpcpp/grpcpp.h>

#include <atomic>

#include "core/thread_pool.h"
#include "mergeguard/v1/sanitizer.grpc.pb.h"
#include "server/architecture_registry.h"
#include "server/artifact_store.h"
#include "server/auth.h"
#include "server/job_manager.h"
#include "server/metrics.h"

namespace mergeguard {

// Largest chunk accepted in an upload and sent in a download.
inline constexpr size_t kMaxChunkBytes = 1 << 20;

// ServiceDeps are the components the service works with; all outlive it.
struct ServiceDeps {
  Authenticator* auth = nullptr;
  ArtifactStore* store = nullptr;
  JobManager* jobs = nullptr;
  ArchitectureRegistry* architectures = nullptr;
  ServerMetrics* metrics = nullptr;
  ThreadPool* io = nullptr;
  // Set when the server drains: new uploads and jobs get UNAVAILABLE.
  const std::atomic<bool>* draining = nullptr;
};

class SanitizerService final : public v1::Sanitizer::CallbackService {
 public:
  explicit SanitizerService(const ServiceDeps& deps) : deps_(deps) {}

  grpc::ServerReadReactor<v1::UploadRequest>* Upload(
      grpc::CallbackServerContext* context, v1::Artifact* response) override;
  grpc::ServerWriteReactor<v1::DownloadResponse>* Download(
      grpc::CallbackServerContext* context,
      const v1::DownloadRequest* request) override;
  grpc::ServerUnaryReactor* GetArtifact(grpc::CallbackServerContext* context,
                                        const v1::GetArtifactRequest* request,
                                        v1::Artifact* response) override;
  grpc::ServerUnaryReactor* ListArtifacts(
      grpc::CallbackServerContext* context,
      const v1::ListArtifactsRequest* request,
      v1::ListArtifactsResponse* response) override;
  grpc::ServerUnaryReactor* DeleteArtifact(
      grpc::CallbackServerContext* context,
      const v1::DeleteArtifactRequest* request,
      v1::DeleteArtifactResponse* response) override;
  grpc::ServerUnaryReactor* SubmitJob(grpc::CallbackServerContext* context,
                                      const v1::SubmitJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerUnaryReactor* GetJob(grpc::CallbackServerContext* context,
                                   const v1::GetJobRequest* request,
                                   v1::Job* response) override;
  grpc::ServerWriteReactor<v1::JobEvent>* WatchJob(
      grpc::CallbackServerContext* context,
      const v1::WatchJobRequest* request) override;
  grpc::ServerUnaryReactor* CancelJob(grpc::CallbackServerContext* context,
                                      const v1::CancelJobRequest* request,
                                      v1::Job* response) override;
  grpc::ServerUnaryReactor* ListJobs(grpc::CallbackServerContext* context,
                                     const v1::ListJobsRequest* request,
                                     v1::ListJobsResponse* response) override;
  grpc::ServerBidiReactor<v1::SanitizeRequest, v1::SanitizeResponse>* Sanitize(
      grpc::CallbackServerContext* context) override;
  grpc::ServerUnaryReactor* RegisterArchitecture(
      grpc::CallbackServerContext* context,
      const v1::RegisterArchitectureRequest* request,
      v1::Architecture* response) override;
  grpc::ServerUnaryReactor* ListArchitectures(
      grpc::CallbackServerContext* context,
      const v1::ListArchitecturesRequest* request,
      v1::ListArchitecturesResponse* response) override;

 private:
  const ServiceDeps deps_;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_SANITIZER_SERVICE_H_
