#include "bench/transfer_bench.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/sanitizer_client.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

constexpr size_t kChunkBytes = 1 << 20;

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? 0 : values[values.size() / 2];
}

double MegabytesPerSecond(uint64_t bytes, absl::Duration elapsed) {
  return static_cast<double>(bytes) / 1e6 / absl::ToDoubleSeconds(elapsed);
}

std::string PseudoRandomBytes(uint64_t size) {
  std::string bytes(size, '\0');
  uint64_t state = 0x243F6A8885A308D3ull;
  for (uint64_t i = 0; i + 8 <= size; i += 8) {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    std::memcpy(&bytes[i], &state, 8);
  }
  return bytes;
}

// UploadFromMemory streams `bytes` with a precomputed digest, so the figure
// is the transfer (and the server's verification), not client hashing.
absl::Status UploadFromMemory(SanitizerClient& client, const std::string& bytes,
                              const std::string& sha256) {
  auto context = client.NewContext(absl::Minutes(30));
  v1::Artifact artifact;
  auto writer = client.stub()->Upload(context.get(), &artifact);
  v1::UploadRequest request;
  v1::UploadMetadata* metadata = request.mutable_metadata();
  metadata->set_name("transfer-bench");
  metadata->set_kind(v1::ARTIFACT_KIND_MODEL);
  metadata->set_size_bytes(bytes.size());
  metadata->set_sha256(sha256);
  bool open = writer->Write(request);
  for (size_t offset = 0; open && offset < bytes.size();
       offset += kChunkBytes) {
    request.mutable_chunk()->assign(bytes, offset, kChunkBytes);
    open = writer->Write(request);
  }
  writer->WritesDone();
  return FromGrpcStatus(writer->Finish());
}

// IperfLoopback runs a one-off iperf3 server and a client against it and
// returns the received throughput in MB/s.
absl::StatusOr<double> IperfLoopback(const TransferBenchOptions& options) {
  const std::string server =
      absl::StrCat(options.iperf3, " -s -1 -D -p ", options.iperf3_port,
                   " > /dev/null 2>&1");
  if (std::system(server.c_str()) != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot start `", server, "` (install iperf3)"));
  }
  absl::SleepFor(absl::Milliseconds(300));
  const std::string client =
      absl::StrCat(options.iperf3, " -c 127.0.0.1 -J -p ", options.iperf3_port,
                   " -t ", options.iperf3_seconds, " 2>/dev/null");
  FILE* pipe = ::popen(client.c_str(), "r");
  if (pipe == nullptr) return absl::UnavailableError("cannot run iperf3");
  std::string output;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) {
    output.append(buffer, n);
  }
  ::pclose(pipe);
  nlohmann::json parsed = nlohmann::json::parse(output, nullptr, false);
  if (parsed.is_discarded()) {
    return absl::InternalError("iperf3 printed no JSON");
  }
  try {
    return parsed.at("end")
               .at("sum_received")
               .at("bits_per_second")
               .get<double>() /
           8e6;
  } catch (const nlohmann::json::exception& e) {
    return absl::InternalError(absl::StrCat("iperf3 JSON: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<TransferBenchReport> RunTransferBench(
    const TransferBenchOptions& options) {
  SanitizerClientOptions client_options;
  client_options.target = options.target;
  client_options.token = options.token;
  client_options.tls_ca_file = options.tls_ca_file;
  client_options.transfer_timeout = absl::Minutes(30);
  ASSIGN_OR_RETURN(std::unique_ptr<SanitizerClient> client,
                   SanitizerClient::Create(client_options));
  TransferBenchReport report;
  report.bytes = options.bytes;
  std::string bytes = PseudoRandomBytes(options.bytes);
  std::string sha256;

  std::vector<double> upload, download, download_to_file;
  for (int i = 0; i < std::max(1, options.repetitions); ++i) {
    // New content each time: the store keeps content once, so a repeated
    // digest would measure deduplication rather than a transfer.
    if (!sha256.empty()) client->DeleteArtifact(sha256).IgnoreError();
    if (!bytes.empty()) bytes[0] = static_cast<char>(i);
    sha256 = Sha256Hex(bytes);
    absl::Time start = absl::Now();
    RETURN_IF_ERROR(UploadFromMemory(*client, bytes, sha256));
    upload.push_back(MegabytesPerSecond(bytes.size(), absl::Now() - start));
    if (options.upload_only) continue;

    start = absl::Now();
    uint64_t received = 0;
    ASSIGN_OR_RETURN(
        uint64_t total,
        client->Download(sha256, 0, [&](const v1::DownloadResponse& chunk) {
          received += chunk.data().size();
          return absl::OkStatus();
        }));
    download.push_back(MegabytesPerSecond(total, absl::Now() - start));
    if (received != bytes.size()) {
      return absl::DataLossError("download returned the wrong size");
    }

    const std::string path = absl::StrCat(
        options.scratch_dir, "/mergeguard-transfer-bench-", ::getpid());
    start = absl::Now();
    RETURN_IF_ERROR(client->DownloadToFile(sha256, path));
    download_to_file.push_back(
        MegabytesPerSecond(bytes.size(), absl::Now() - start));
    ::unlink(path.c_str());
  }
  report.upload_mb_per_s = Median(upload);
  if (!options.upload_only) {
    report.download_mb_per_s = Median(download);
    report.download_to_file_mb_per_s = Median(download_to_file);
  }
  if (!options.iperf3.empty()) {
    ASSIGN_OR_RETURN(report.tcp_mb_per_s, IperfLoopback(options));
    report.upload_ratio = report.upload_mb_per_s / report.tcp_mb_per_s;
    report.download_ratio = report.download_mb_per_s / report.tcp_mb_per_s;
  }
  client->DeleteArtifact(sha256).IgnoreError();
  return report;
}

std::string FormatTransferBenchReport(const TransferBenchReport& r) {
  return absl::StrFormat(
      "transfer of %.0f MB, median of the repetitions (MB/s = 1e6 B/s)\n"
      "upload (memory -> store)      %9.1f MB/s  %.2f of TCP\n"
      "download (store -> memory)    %9.1f MB/s  %.2f of TCP\n"
      "download (store -> file, verified) %4.1f MB/s\n"
      "raw TCP loopback (iperf3)     %9.1f MB/s\n",
      static_cast<double>(r.bytes) / 1e6, r.upload_mb_per_s, r.upload_ratio,
      r.download_mb_per_s, r.download_ratio, r.download_to_file_mb_per_s,
      r.tcp_mb_per_s);
}

}  // namespace mergeguard
