#include "server/metrics.h"

#include <exception>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/job.h"
#include "core/status_macros.h"
#include "server/status_util.h"

namespace mergeguard {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

const Histogram::BucketBoundaries& LatencyBuckets() {
  static const auto* kBuckets = new Histogram::BucketBoundaries{
      0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
      0.5,    1,     2.5,    5,     10,   30,    60,   300};
  return *kBuckets;
}

const Histogram::BucketBoundaries& JobBuckets() {
  static const auto* kBuckets = new Histogram::BucketBoundaries{
      0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200};
  return *kBuckets;
}

const Histogram::BucketBoundaries& RatioBuckets() {
  static const auto* kBuckets = new Histogram::BucketBoundaries{
      0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2,  0.3,
      0.4,   0.5,   0.6,  0.7,  0.8,  0.9, 0.95, 1};
  return *kBuckets;
}

const Histogram::BucketBoundaries& NormBuckets() {
  static const auto* kBuckets = new Histogram::BucketBoundaries{
      0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000};
  return *kBuckets;
}

const Histogram::BucketBoundaries& AnomalyBuckets() {
  static const auto* kBuckets = new Histogram::BucketBoundaries{
      0.5, 1, 1.5, 2, 2.5, 3, 4, 5, 7.5, 10, 20};
  return *kBuckets;
}

const char* const kDefenseMethods[] = {"dam", "lfpm"};

}  // namespace

ServerMetrics::ServerMetrics(const MetricsOptions& options)
    : options_(options), registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  rpcs_ = &BuildCounter()
               .Name("mergeguard_rpcs_total")
               .Help("Finished RPCs by method and canonical status code.")
               .Register(r);
  rpc_seconds_ = &BuildHistogram()
                      .Name("mergeguard_rpc_duration_seconds")
                      .Help("RPC latency from start to finish, by method.")
                      .Register(r);
  auth_failures_ =
      &BuildCounter()
           .Name("mergeguard_auth_failures_total")
           .Help("RPCs refused with UNAUTHENTICATED or PERMISSION_DENIED.")
           .Register(r);
  uploaded_bytes_ = &BuildCounter()
                         .Name("mergeguard_uploaded_bytes_total")
                         .Help("Artifact bytes received and verified.")
                         .Register(r)
                         .Add({});
  downloaded_bytes_ = &BuildCounter()
                           .Name("mergeguard_downloaded_bytes_total")
                           .Help("Artifact bytes sent to clients.")
                           .Register(r)
                           .Add({});
  jobs_ = &BuildCounter()
               .Name("mergeguard_jobs_total")
               .Help("Finished jobs by method and outcome.")
               .Register(r);
  job_seconds_ = &BuildHistogram()
                      .Name("mergeguard_job_duration_seconds")
                      .Help("Job run time on a worker, by method.")
                      .Register(r);
  queue_depth_ = &BuildGauge()
                      .Name("mergeguard_queue_depth")
                      .Help("Jobs waiting for a worker.")
                      .Register(r)
                      .Add({});
  busy_workers_ = &BuildGauge()
                       .Name("mergeguard_busy_workers")
                       .Help("Workers running a job.")
                       .Register(r)
                       .Add({});
  workers_ = &BuildGauge()
                  .Name("mergeguard_workers")
                  .Help("Job worker threads.")
                  .Register(r)
                  .Add({});
  uploads_in_progress_ = &BuildGauge()
                              .Name("mergeguard_uploads_in_progress")
                              .Help("Uploads currently streaming.")
                              .Register(r)
                              .Add({});
  store_bytes_ = &BuildGauge()
                      .Name("mergeguard_store_bytes")
                      .Help("Bytes of stored artifacts (each digest once).")
                      .Register(r)
                      .Add({});
  store_free_bytes_ =
      &BuildGauge()
           .Name("mergeguard_store_free_bytes")
           .Help("Free bytes on the artifact store's filesystem.")
           .Register(r)
           .Add({});
  BuildGauge()
      .Name("mergeguard_build_info")
      .Help("Constant 1, labelled with the server version.")
      .Register(r)
      .Add({{"version", options.version}})
      .Set(1);

  m2_flagged_ratio_ =
      &BuildHistogram()
           .Name("mergeguard_m2_flagged_ratio")
           .Help(
               "Fraction of parameters DAM's backdoor mask M2 flags, per "
               "job.")
           .Register(r);
  tau_ab_norm_ = &BuildHistogram()
                      .Name("mergeguard_tau_ab_norm")
                      .Help(
                          "L2 norm of LFPM's anti-backdoor task vector, per "
                          "job.")
                      .Register(r);
  anomaly_index_ =
      &BuildHistogram()
           .Name("mergeguard_trigger_anomaly_index")
           .Help(
               "Anomaly index (median absolute deviation) of the mined "
               "surrogate triggers, per job.")
           .Register(r);
  mined_asr_ = &BuildHistogram()
                    .Name("mergeguard_mined_trigger_attack_success_ratio")
                    .Help(
                        "Attack success against the mined triggers, before "
                        "and after the defense.")
                    .Register(r);
  probe_asr_ = &BuildHistogram()
                    .Name("mergeguard_probe_attack_success_ratio")
                    .Help(
                        "Attack success on a job's probe set (known "
                        "trigger), before and after the defense.")
                    .Register(r);
  probe_accuracy_ =
      &BuildHistogram()
           .Name("mergeguard_probe_clean_accuracy_ratio")
           .Help(
               "Clean accuracy on a job's probe set, before and after the "
               "defense.")
           .Register(r);
  suspicious_jobs_ =
      &BuildCounter()
           .Name("mergeguard_suspicious_inputs_total")
           .Help(absl::StrCat("Jobs whose inputs look backdoored: trigger "
                              "anomaly index over ",
                              options.anomaly_index_threshold, "."))
           .Register(r);
  // Pre-create the defenses' series so dashboards and alerts see the
  // families (at zero) before the first defense job.
  for (const char* method : kDefenseMethods) {
    m2_flagged_ratio_->Add({{"method", method}}, RatioBuckets());
    tau_ab_norm_->Add({{"method", method}}, NormBuckets());
    anomaly_index_->Add({{"method", method}}, AnomalyBuckets());
    suspicious_jobs_->Add({{"method", method}});
    for (const char* stage : {"before", "after"}) {
      mined_asr_->Add({{"method", method}, {"stage", stage}}, RatioBuckets());
      probe_asr_->Add({{"method", method}, {"stage", stage}}, RatioBuckets());
      probe_accuracy_->Add({{"method", method}, {"stage", stage}},
                           RatioBuckets());
    }
  }
}

absl::StatusOr<std::unique_ptr<ServerMetrics>> ServerMetrics::Create(
    const MetricsOptions& options) {
  std::unique_ptr<ServerMetrics> metrics(new ServerMetrics(options));
  if (!options.listen_address.empty()) {
    const size_t colon = options.listen_address.rfind(':');
    int port = 0;
    if (colon == std::string::npos ||
        !absl::SimpleAtoi(options.listen_address.substr(colon + 1), &port)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "metrics address \"", options.listen_address, "\" is not host:port"));
    }
    ASSIGN_OR_RETURN(
        metrics->http_,
        MetricsHttpServer::Start(options.listen_address.substr(0, colon), port,
                                 metrics->registry_));
  }
  return metrics;
}

void ServerMetrics::RecordRpc(absl::string_view method, grpc::StatusCode code,
                              double seconds) {
  rpcs_->Add({{"method", std::string(method)}, {"code", StatusCodeLabel(code)}})
      .Increment();
  rpc_seconds_->Add({{"method", std::string(method)}}, LatencyBuckets())
      .Observe(seconds);
}

void ServerMetrics::RecordAuthFailure(absl::string_view method,
                                      grpc::StatusCode code) {
  auth_failures_
      ->Add({{"method", std::string(method)}, {"code", StatusCodeLabel(code)}})
      .Increment();
}

void ServerMetrics::AddUploadedBytes(uint64_t bytes) {
  uploaded_bytes_->Increment(static_cast<double>(bytes));
}

void ServerMetrics::AddDownloadedBytes(uint64_t bytes) {
  downloaded_bytes_->Increment(static_cast<double>(bytes));
}

void ServerMetrics::RecordJobFinished(
    absl::string_view method, absl::string_view outcome, double seconds,
    const std::map<std::string, double>& job_metrics) {
  const std::string m(method);
  jobs_->Add({{"method", m}, {"outcome", std::string(outcome)}}).Increment();
  job_seconds_->Add({{"method", m}}, JobBuckets()).Observe(seconds);
  auto observe = [&](const char* key, prometheus::Family<Histogram>* family,
                     const prometheus::Labels& labels,
                     const Histogram::BucketBoundaries& buckets) {
    auto it = job_metrics.find(key);
    if (it != job_metrics.end())
      family->Add(labels, buckets).Observe(it->second);
  };
  observe(kMetricM2FlaggedFraction, m2_flagged_ratio_, {{"method", m}},
          RatioBuckets());
  observe(kMetricTauAbNorm, tau_ab_norm_, {{"method", m}}, NormBuckets());
  observe(kMetricAnomalyIndex, anomaly_index_, {{"method", m}},
          AnomalyBuckets());
  observe(kMetricMinedAsrBefore, mined_asr_,
          {{"method", m}, {"stage", "before"}}, RatioBuckets());
  observe(kMetricMinedAsrAfter, mined_asr_, {{"method", m}, {"stage", "after"}},
          RatioBuckets());
  observe(kMetricProbeAsrBefore, probe_asr_,
          {{"method", m}, {"stage", "before"}}, RatioBuckets());
  observe(kMetricProbeAsrAfter, probe_asr_, {{"method", m}, {"stage", "after"}},
          RatioBuckets());
  observe(kMetricProbeAccuracyBefore, probe_accuracy_,
          {{"method", m}, {"stage", "before"}}, RatioBuckets());
  observe(kMetricProbeAccuracyAfter, probe_accuracy_,
          {{"method", m}, {"stage", "after"}}, RatioBuckets());
  auto anomaly = job_metrics.find(kMetricAnomalyIndex);
  if (anomaly != job_metrics.end() &&
      anomaly->second > options_.anomaly_index_threshold) {
    suspicious_jobs_->Add({{"method", m}}).Increment();
  }
}

void ServerMetrics::SetQueueDepth(int64_t jobs) {
  queue_depth_->Set(static_cast<double>(jobs));
}
void ServerMetrics::SetBusyWorkers(int64_t workers) {
  busy_workers_->Set(static_cast<double>(workers));
}
void ServerMetrics::SetWorkers(int64_t workers) {
  workers_->Set(static_cast<double>(workers));
}
void ServerMetrics::SetUploadsInProgress(int64_t uploads) {
  uploads_in_progress_->Set(static_cast<double>(uploads));
}
void ServerMetrics::SetStoreBytes(uint64_t bytes) {
  store_bytes_->Set(static_cast<double>(bytes));
}
void ServerMetrics::SetStoreFreeBytes(uint64_t bytes) {
  store_free_bytes_->Set(static_cast<double>(bytes));
}

int ServerMetrics::port() const { return http_ ? http_->port() : 0; }

}  // namespace mergeguard
