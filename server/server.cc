#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "core/version.h"
#include "server/log.h"

namespace mergeguard {
namespace {

constexpr char kServiceName[] = "mergeguard.v1.Sanitizer";

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeCredentials(
    const ServerOptions& options) {
  if (options.tls_cert_file.empty() != options.tls_key_file.empty()) {
    return absl::InvalidArgumentError(
        "--tls_cert and --tls_key must be given together");
  }
  if (options.tls_cert_file.empty()) {
    if (!options.tls_client_ca_file.empty()) {
      return absl::InvalidArgumentError(
          "--tls_client_ca (mTLS) needs --tls_cert and --tls_key");
    }
    return grpc::InsecureServerCredentials();
  }
  ASSIGN_OR_RETURN(std::string cert, ReadFile(options.tls_cert_file));
  ASSIGN_OR_RETURN(std::string key, ReadFile(options.tls_key_file));
  grpc::SslServerCredentialsOptions ssl(
      options.tls_client_ca_file.empty()
          ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
          : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  if (!options.tls_client_ca_file.empty()) {
    ASSIGN_OR_RETURN(ssl.pem_root_certs, ReadFile(options.tls_client_ca_file));
  }
  ssl.pem_key_cert_pairs.push_back({key, cert});
  return grpc::SslServerCredentials(ssl);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MergeguardServer>> MergeguardServer::Start(
    const ServerOptions& options) {
  std::unique_ptr<MergeguardServer> server(new MergeguardServer());
  server->options_ = options;
  MetricsOptions metrics_options = options.metrics;
  metrics_options.version = std::string(MergeguardVersion());
  ASSIGN_OR_RETURN(server->metrics_, ServerMetrics::Create(metrics_options));
  ASSIGN_OR_RETURN(server->auth_, Authenticator::Create(options.auth));
  ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                   MakeCredentials(options));
  if (options.io_threads < 1) {
    return absl::InvalidArgumentError("--io_threads must be at least 1");
  }
  server->io_ = std::make_unique<ThreadPool>(options.io_threads);
  ASSIGN_OR_RETURN(server->store_,
                   ArtifactStore::Open(options.store, server->io_.get()));
  ASSIGN_OR_RETURN(server->journal_,
                   JobJournal::Open(absl::StrCat(options.store.root, "/jobs")));
  ASSIGN_OR_RETURN(server->architectures_,
                   ArchitectureRegistry::Open(server->store_.get(),
                                              options.architectures_dir));
  JobManagerOptions job_options = options.jobs;
  job_options.server_version = std::string(MergeguardVersion());
  ASSIGN_OR_RETURN(
      server->jobs_,
      JobManager::Create(job_options, server->store_.get(),
                         server->journal_.get(), server->architectures_.get(),
                         server->metrics_.get(), server->io_.get()));

  ServiceDeps deps;
  deps.auth = server->auth_.get();
  deps.store = server->store_.get();
  deps.jobs = server->jobs_.get();
  deps.architectures = server->architectures_.get();
  deps.metrics = server->metrics_.get();
  deps.io = server->io_.get();
  deps.draining = &server->draining_;
  server->service_ = std::make_unique<SanitizerService>(deps);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen_address, credentials, &server->port_);
  builder.RegisterService(server->service_.get());
  // Chunks are at most 1 MiB; the default 4 MiB limit stays as a guard.
  builder.SetMaxReceiveMessageSize(4 << 20);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.listen_address,
                     " (is the port in use? set --port or --listen_address)"));
  }
  grpc::HealthCheckServiceInterface* health =
      server->server_->GetHealthCheckService();
  health->SetServingStatus(kServiceName, true);
  health->SetServingStatus(true);
  server->jobs_->Start();
  server->housekeeping_ =
      std::thread([raw = server.get()] { raw->HousekeepingLoop(); });
  LogInfo("mergeguard-server ", MergeguardVersion(), " serving gRPC on port ",
          server->port_,
          options.tls_cert_file.empty()
              ? " (plaintext)"
              : (options.tls_client_ca_file.empty() ? " (TLS)" : " (mTLS)"),
          ", /metrics on port ", server->metrics_->port(), ", store ",
          options.store.root, ", ", options.jobs.workers, " workers");
  return server;
}

void MergeguardServer::HousekeepingLoop() {
  do {
    store_->RefreshFreeBytes();
    metrics_->SetStoreFreeBytes(store_->FreeBytes());
    metrics_->SetStoreBytes(store_->StoredBytes());
    metrics_->SetQueueDepth(jobs_->QueueDepth());
    metrics_->SetBusyWorkers(jobs_->BusyWorkers());
    metrics_->SetUploadsInProgress(store_->UploadsInProgress());
    absl::Status reloaded = auth_->ReloadIfChanged();
    if (!reloaded.ok()) LogError("auth: ", reloaded.ToString());
  } while (!stop_housekeeping_.WaitForNotificationWithTimeout(
      options_.housekeeping_interval));
}

bool MergeguardServer::Drain(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  LogInfo("draining: health NOT_SERVING, no new jobs; waiting up to ",
          absl::FormatDuration(timeout), " for running jobs");
  server_->GetHealthCheckService()->SetServingStatus(false);
  draining_ = true;
  jobs_->BeginDrain();
  const bool idle = jobs_->WaitUntilIdle(deadline);
  if (!idle) {
    LogWarning(
        "draining: jobs still running at the deadline; they will be "
        "re-queued at the next start");
  }
  server_->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
  shut_down_ = true;
  return idle;
}

MergeguardServer::~MergeguardServer() {
  if (housekeeping_.joinable()) {
    stop_housekeeping_.Notify();
    housekeeping_.join();
  }
  if (server_ != nullptr && !shut_down_) {
    server_->Shutdown(absl::ToChronoTime(absl::Now()));
  }
  if (server_ != nullptr) server_->Wait();
  // I/O tasks may still call into the job manager (journaling a submit).
  if (io_ != nullptr) io_->Wait();
  jobs_.reset();  // joins the workers before what they use goes away
  io_.reset();
}

}  // namespace mergeguard
