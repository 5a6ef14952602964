#ifndef MERGEGUARD_BENCH_TRANSFER_BENCH_H_
#define MERGEGUARD_BENCH_TRANSFER_BENCH_H_

// Transfer benchmark: upload and download throughput against a running
// server, next to raw TCP loopback throughput measured by iperf3 in the same
// run.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace mergeguard {

// TransferBenchOptions configures RunTransferBench.
struct TransferBenchOptions {
  // Server address (a running mergeguard-server on this machine for a
  // loopback comparison).
  std::string target = "localhost:50051";
  // Bearer token.
  std::string token;
  // CA bundle for TLS; empty uses plaintext.
  std::string tls_ca_file;
  // Artifact size per transfer.
  uint64_t bytes = 512ull << 20;
  // Transfers per direction; the median is reported.
  int repetitions = 3;
  // iperf3 binary; empty skips the TCP baseline.
  std::string iperf3 = "iperf3";
  // Port for the iperf3 server, and seconds the TCP test runs.
  int iperf3_port = 5299;
  int iperf3_seconds = 3;
  // Where the download-to-file measurement writes.
  std::string scratch_dir = "/tmp";
  // Skips the downloads, so a profiler sees the upload path alone.
  bool upload_only = false;
};

// TransferBenchReport holds throughputs in MB/s (1e6 bytes per second).
struct TransferBenchReport {
  uint64_t bytes = 0;
  // Upload streaming from memory (digest known): network, server hashing,
  // server write and fsync.
  double upload_mb_per_s = 0;
  // Download into memory: network and server reads.
  double download_mb_per_s = 0;
  // Download to a file with resume support and digest check (the client
  // library's DownloadToFile).
  double download_to_file_mb_per_s = 0;
  // iperf3 over loopback; 0 when skipped.
  double tcp_mb_per_s = 0;
  // upload / tcp and download / tcp (target: >= 0.6).
  double upload_ratio = 0;
  double download_ratio = 0;
};

// RunTransferBench runs the measurements.
absl::StatusOr<TransferBenchReport> RunTransferBench(
    const TransferBenchOptions& options);

// FormatTransferBenchReport renders the report as a few readable lines.
std::string FormatTransferBenchReport(const TransferBenchReport& report);

}  // namespace mergeguard

#endif  // MERGEGUARD_BENCH_TRANSFER_BENCH_H_
