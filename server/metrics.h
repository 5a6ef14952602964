#ifndef MERGEGUARD_SERVER_METRICS_H_
#define MERGEGUARD_SERVER_METRICS_H_

// The process-wide Prometheus registry and its /metrics exposer. Families are
// built once; labels are methods, codes and outcomes, never job ids.

#include <grpcpp/support/status.h>

#include <map>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/metrics_http.h"

namespace mergeguard {

// MetricsOptions configures ServerMetrics.
struct MetricsOptions {
  // host:port of the /metrics HTTP endpoint; empty serves nothing (tests).
  std::string listen_address = "0.0.0.0:9464";
  // Reported by mergeguard_build_info.
  std::string version;
  // Jobs whose surrogate-trigger anomaly index exceeds this count as
  // suspicious (Neural Cleanse flags an index over 2).
  double anomaly_index_threshold = 2.0;
};

// ServerMetrics owns every metric family. Thread-safe.
class ServerMetrics {
 public:
  // Create registers the families and, if `options.listen_address` is set,
  // serves /metrics there. UNAVAILABLE when the port cannot be bound.
  static absl::StatusOr<std::unique_ptr<ServerMetrics>> Create(
      const MetricsOptions& options);

  // RecordRpc counts one finished RPC and observes its latency.
  void RecordRpc(absl::string_view method, grpc::StatusCode code,
                 double seconds);
  // RecordAuthFailure counts an UNAUTHENTICATED or PERMISSION_DENIED answer.
  void RecordAuthFailure(absl::string_view method, grpc::StatusCode code);
  void AddUploadedBytes(uint64_t bytes);
  void AddDownloadedBytes(uint64_t bytes);
  // RecordJobFinished counts a job by method and outcome ("succeeded",
  // "failed", "cancelled", "interrupted"), observes its duration, and exports
  // the security metrics found in `job_metrics` (core/job.h kMetric*).
  void RecordJobFinished(absl::string_view method, absl::string_view outcome,
                         double seconds,
                         const std::map<std::string, double>& job_metrics);

  void SetQueueDepth(int64_t jobs);
  void SetBusyWorkers(int64_t workers);
  void SetWorkers(int64_t workers);
  void SetUploadsInProgress(int64_t uploads);
  void SetStoreBytes(uint64_t bytes);
  void SetStoreFreeBytes(uint64_t bytes);

  // port returns the bound /metrics port, or 0 when not serving.
  int port() const;
  prometheus::Registry& registry() { return *registry_; }

 private:
  explicit ServerMetrics(const MetricsOptions& options);

  MetricsOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<MetricsHttpServer> http_;

  // Families are owned by registry_; the pointers stay valid for its life.
  prometheus::Family<prometheus::Counter>* rpcs_;
  prometheus::Family<prometheus::Histogram>* rpc_seconds_;
  prometheus::Family<prometheus::Counter>* auth_failures_;
  prometheus::Counter* uploaded_bytes_;
  prometheus::Counter* downloaded_bytes_;
  prometheus::Family<prometheus::Counter>* jobs_;
  prometheus::Family<prometheus::Histogram>* job_seconds_;
  prometheus::Gauge* queue_depth_;
  prometheus::Gauge* busy_workers_;
  prometheus::Gauge* workers_;
  prometheus::Gauge* uploads_in_progress_;
  prometheus::Gauge* store_bytes_;
  prometheus::Gauge* store_free_bytes_;
  // Security families (filled by DAM, LFPM and probe sets).
  prometheus::Family<prometheus::Histogram>* m2_flagged_ratio_;
  prometheus::Family<prometheus::Histogram>* tau_ab_norm_;
  prometheus::Family<prometheus::Histogram>* anomaly_index_;
  prometheus::Family<prometheus::Histogram>* mined_asr_;
  prometheus::Family<prometheus::Histogram>* probe_asr_;
  prometheus::Family<prometheus::Histogram>* probe_accuracy_;
  prometheus::Family<prometheus::Counter>* suspicious_jobs_;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_METRICS_H_
