#include "bench/load_test.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "client/sanitizer_client.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

// SafetensorsBytes builds a one-tensor float32 safetensors file in memory.
std::string SafetensorsBytes(const std::vector<float>& values) {
  nlohmann::json header = {
      {"w",
       {{"dtype", "F32"},
        {"shape", {values.size()}},
        {"data_offsets", {0, values.size() * sizeof(float)}}}}};
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t length = text.size();
  std::string bytes(reinterpret_cast<const char*>(&length), 8);
  bytes += text;
  bytes.append(reinterpret_cast<const char*>(values.data()),
               values.size() * sizeof(float));
  return bytes;
}

std::vector<float> Parameters(int64_t count, uint64_t seed) {
  std::vector<float> values(static_cast<size_t>(count));
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 7;
  for (float& value : values) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    value = static_cast<float>((state >> 40) % 2001) / 1000.0f - 1.0f;
  }
  return values;
}

double Percentile(std::vector<double> values, double q) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  size_t index =
      static_cast<size_t>(q * static_cast<double>(values.size() - 1) + 0.5);
  return values[std::min(index, values.size() - 1)];
}

SanitizerClientOptions ClientOptions(const LoadTestOptions& options) {
  SanitizerClientOptions client;
  client.target = options.target;
  client.token = options.token;
  client.tls_ca_file = options.tls_ca_file;
  client.dedicated_connection = true;
  client.rpc_timeout = absl::Seconds(60);
  client.transfer_timeout = absl::Minutes(30);
  return client;
}

}  // namespace

absl::StatusOr<LoadTestReport> RunLoadTest(const LoadTestOptions& options) {
  if (options.clients < 1 || options.jobs_per_client < 1 ||
      options.model_parameters < 1) {
    return absl::InvalidArgumentError(
        "clients, jobs_per_client and model_parameters must be positive");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<SanitizerClient> setup,
                   SanitizerClient::Create(ClientOptions(options)));
  ASSIGN_OR_RETURN(v1::Artifact base,
                   setup->UploadBytes(SafetensorsBytes(Parameters(
                                          options.model_parameters, 0)),
                                      v1::ARTIFACT_KIND_MODEL, "base"));

  std::mutex mu;
  std::vector<double> upload_ms, submit_ms, end_to_end_ms;
  LoadTestReport report;
  report.clients = options.clients;
  auto record_error = [&](const absl::Status& status) {
    std::lock_guard<std::mutex> lock(mu);
    ++report.errors[absl::StatusCodeToString(status.code())];
  };

  const absl::Time start = absl::Now();
  std::vector<std::thread> threads;
  for (int c = 0; c < options.clients; ++c) {
    threads.emplace_back([&, c] {
      absl::StatusOr<std::unique_ptr<SanitizerClient>> client =
          SanitizerClient::Create(ClientOptions(options));
      if (!client.ok()) {
        record_error(client.status());
        return;
      }
      for (int j = 0; j < options.jobs_per_client; ++j) {
        {
          std::lock_guard<std::mutex> lock(mu);
          ++report.jobs_attempted;
        }
        // Unique bytes per job, so every upload really transfers.
        const std::string model = SafetensorsBytes(Parameters(
            options.model_parameters,
            1 + static_cast<uint64_t>(c) * 100000 + static_cast<uint64_t>(j)));
        const absl::Time t0 = absl::Now();
        absl::StatusOr<v1::Artifact> uploaded = (*client)->UploadBytes(
            model, v1::ARTIFACT_KIND_MODEL, absl::StrCat("task-", c, "-", j));
        const absl::Time t1 = absl::Now();
        if (!uploaded.ok()) {
          record_error(uploaded.status());
          continue;
        }
        v1::JobSpec spec;
        spec.set_method(v1::METHOD_TASK_ARITHMETIC);
        spec.set_base_sha256(base.sha256());
        v1::JobInput* input = spec.add_inputs();
        input->set_name("task");
        input->set_model_sha256(uploaded->sha256());
        absl::StatusOr<v1::Job> job = (*client)->SubmitJob(spec);
        const absl::Time t2 = absl::Now();
        if (!job.ok()) {
          record_error(job.status());
          continue;
        }
        absl::StatusOr<v1::Job> done = (*client)->WatchJob(job->id());
        const absl::Time t3 = absl::Now();
        if (!done.ok()) {
          record_error(done.status());
          continue;
        }
        if (done->state() != v1::JOB_STATE_SUCCEEDED) {
          record_error(absl::Status(
              static_cast<absl::StatusCode>(done->error_code()), ""));
          continue;
        }
        std::lock_guard<std::mutex> lock(mu);
        ++report.jobs_succeeded;
        upload_ms.push_back(absl::ToDoubleMilliseconds(t1 - t0));
        submit_ms.push_back(absl::ToDoubleMilliseconds(t2 - t1));
        end_to_end_ms.push_back(absl::ToDoubleMilliseconds(t3 - t0));
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  report.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  report.jobs_per_second =
      static_cast<double>(report.jobs_succeeded) / report.seconds;
  report.upload_p50_ms = Percentile(upload_ms, 0.50);
  report.upload_p99_ms = Percentile(upload_ms, 0.99);
  report.submit_p50_ms = Percentile(submit_ms, 0.50);
  report.submit_p99_ms = Percentile(submit_ms, 0.99);
  report.end_to_end_p50_ms = Percentile(end_to_end_ms, 0.50);
  report.end_to_end_p99_ms = Percentile(end_to_end_ms, 0.99);
  return report;
}

std::string FormatLoadTestReport(const LoadTestReport& r) {
  std::string errors;
  for (const auto& [code, count] : r.errors) {
    absl::StrAppend(&errors, errors.empty() ? "" : ", ", code, "=", count);
  }
  return absl::StrFormat(
      "clients %d, jobs %d/%d succeeded in %.2f s: %.2f jobs/s\n"
      "upload      p50 %8.2f ms  p99 %8.2f ms\n"
      "submit      p50 %8.2f ms  p99 %8.2f ms\n"
      "end to end  p50 %8.2f ms  p99 %8.2f ms\n"
      "errors: %s\n",
      r.clients, r.jobs_succeeded, r.jobs_attempted, r.seconds,
      r.jobs_per_second, r.upload_p50_ms, r.upload_p99_ms, r.submit_p50_ms,
      r.submit_p99_ms, r.end_to_end_p50_ms, r.end_to_end_p99_ms,
      errors.empty() ? "none" : errors);
}

}  // namespace mergeguard
