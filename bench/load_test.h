#ifndef MERGEGUARD_BENCH_LOAD_TEST_H_
#define MERGEGUARD_BENCH_LOAD_TEST_H_

// The service load test: N concurrent clients, each on its own connection,
// repeatedly upload a task model, submit a task-arithmetic job and watch it
// to the end. Reports throughput, latency percentiles and errors.

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"

namespace mergeguard {

// LoadTestOptions configures RunLoadTest.
struct LoadTestOptions {
  // Server address (a running mergeguard-server).
  std::string target = "localhost:50051";
  // Bearer token of the tenant the load runs as.
  std::string token;
  // CA bundle for TLS; empty uses plaintext.
  std::string tls_ca_file;
  // Concurrent clients.
  int clients = 32;
  // Upload + submit + watch cycles per client.
  int jobs_per_client = 4;
  // Float32 parameters per model (the backbone), so size = 4 * this.
  int64_t model_parameters = 64 * 1024;
};

// LoadTestReport is what RunLoadTest measured.
struct LoadTestReport {
  int clients = 0;
  int64_t jobs_attempted = 0;
  int64_t jobs_succeeded = 0;
  // Failed operations by canonical code name.
  std::map<std::string, int64_t> errors;
  double seconds = 0;
  // Succeeded jobs per second over the whole run.
  double jobs_per_second = 0;
  // Latencies in milliseconds.
  double upload_p50_ms = 0, upload_p99_ms = 0;
  double submit_p50_ms = 0, submit_p99_ms = 0;
  // Upload start to the job's terminal event.
  double end_to_end_p50_ms = 0, end_to_end_p99_ms = 0;
};

// RunLoadTest uploads a shared base model, then runs the clients.
absl::StatusOr<LoadTestReport> RunLoadTest(const LoadTestOptions& options);

// FormatLoadTestReport renders the report as a few readable lines.
std::string FormatLoadTestReport(const LoadTestReport& report);

}  // namespace mergeguard

#endif  // MERGEGUARD_BENCH_LOAD_TEST_H_
