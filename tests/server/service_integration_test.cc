// Integration tests: the real mergeguard-server binary on free ports, driven
// through the client library and raw stubs.

#include <signal.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/sanitizer_client.h"
#include "core/safetensors.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/server/server_process.h"

namespace mergeguard {
namespace {

using ::mergeguard::testing::HttpGet;
using ::mergeguard::testing::kAcmeToken;
using ::mergeguard::testing::kAdminToken;
using ::mergeguard::testing::kGlobexToken;
using ::mergeguard::testing::MakeTempDir;
using ::mergeguard::testing::RandomBytes;
using ::mergeguard::testing::ReadWholeFile;
using ::mergeguard::testing::RemoveTree;
using ::mergeguard::testing::ServerProcess;
using ::mergeguard::testing::WriteFile;
using ::mergeguard::testing::WriteTestTokens;
using ::testing::HasSubstr;

constexpr size_t kMiB = 1 << 20;

// Tensors of the tiny models: a backbone that is merged and a head that is
// not.
struct Tensor {
  std::vector<int64_t> shape;
  std::vector<float> values;
};
using Model = std::map<std::string, Tensor>;

Model RandomModel(uint64_t seed, const Model* base, float scale) {
  const std::map<std::string, std::vector<int64_t>> shapes = {
      {"layer.weight", {8, 16}},
      {"layer.bias", {16}},
      {"head.weight", {4, 16}}};
  Model model;
  uint64_t state = seed * 2654435761u + 12345;
  for (const auto& [name, shape] : shapes) {
    Tensor tensor;
    tensor.shape = shape;
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    for (int64_t i = 0; i < count; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      float noise = static_cast<float>((state >> 40) % 2001) / 1000.0f - 1.0f;
      float base_value = base != nullptr ? base->at(name).values[i] : 0.0f;
      tensor.values.push_back(base_value + scale * noise);
    }
    model[name] = std::move(tensor);
  }
  return model;
}

void WriteModel(const std::string& path, const Model& model) {
  std::vector<TensorSpec> specs;
  for (const auto& [name, tensor] : model) {
    specs.push_back(TensorSpec{name, DType::kF32, tensor.shape});
  }
  auto writer = SafetensorsWriter::Create(path, specs);
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (const auto& [name, tensor] : model) {
    ASSERT_TRUE((*writer)
                    ->WriteTensor(name, absl::Span<const uint8_t>(
                                            reinterpret_cast<const uint8_t*>(
                                                tensor.values.data()),
                                            tensor.values.size() * 4))
                    .ok());
  }
  ASSERT_TRUE((*writer)->Commit().ok());
}

std::vector<float> ReadFloats(const SafetensorsFile& file,
                              const std::string& name) {
  auto bytes = file.TensorBytes(name);
  EXPECT_TRUE(bytes.ok()) << name << ": " << bytes.status();
  if (!bytes.ok()) return {};
  std::vector<float> values(bytes->size() / 4);
  std::memcpy(values.data(), bytes->data(), bytes->size());
  return values;
}

bool IsTerminalState(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

// WaitForState polls GetJob until the job reaches `state` (or any terminal
// state) or `seconds` pass.
v1::Job WaitForState(SanitizerClient& client, const std::string& id,
                     v1::JobState state, double seconds = 60) {
  const absl::Time deadline = absl::Now() + absl::Seconds(seconds);
  v1::Job job;
  while (absl::Now() < deadline) {
    absl::StatusOr<v1::Job> current = client.GetJob(id);
    if (current.ok()) {
      job = *current;
      if (job.state() == state || IsTerminalState(job.state())) return job;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
  return job;
}

// RawUpload sends `metadata` and then `bytes` in chunks of `chunk_bytes`,
// whatever the metadata says, to provoke server-side checks.
absl::Status RawUpload(SanitizerClient& client,
                       const v1::UploadMetadata& metadata,
                       const std::string& bytes, size_t chunk_bytes = kMiB) {
  auto context = client.NewContext(absl::Seconds(60));
  v1::Artifact artifact;
  auto writer = client.stub()->Upload(context.get(), &artifact);
  v1::UploadRequest request;
  *request.mutable_metadata() = metadata;
  if (writer->Write(request)) {
    for (size_t offset = 0; offset < bytes.size(); offset += chunk_bytes) {
      request.set_chunk(bytes.substr(offset, chunk_bytes));
      if (!writer->Write(request)) break;
    }
  }
  writer->WritesDone();
  return FromGrpcStatus(writer->Finish());
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = MakeTempDir("mergeguard-service-test");
    ASSERT_FALSE(dir_.empty());
    tokens_ = WriteTestTokens(dir_);
    store_ = absl::StrCat(dir_, "/store");
  }

  void TearDown() override {
    if (HasFailure() && server_ != nullptr) {
      std::fprintf(stderr, "---- server log ----\n%s\n",
                   ReadWholeFile(server_->log_path()).c_str());
    }
    server_.reset();
    RemoveTree(dir_);
  }

  void StartServer(const std::vector<std::string>& flags = {}) {
    auto server = ServerProcess::Start(store_, tokens_, flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    acme_ = server_->Client(kAcmeToken);
  }

  // UploadMergeInputs writes base and two task models and uploads them.
  void UploadMergeInputs() {
    base_ = RandomModel(1, nullptr, 1.0f);
    task_a_ = RandomModel(2, &base_, 0.1f);
    task_b_ = RandomModel(3, &base_, 0.1f);
    const std::vector<std::pair<std::string, const Model*>> files = {
        {"base", &base_}, {"a", &task_a_}, {"b", &task_b_}};
    for (const auto& [name, model] : files) {
      const std::string path = absl::StrCat(dir_, "/", name, ".safetensors");
      WriteModel(path, *model);
      auto artifact = acme_->UploadFile(path, v1::ARTIFACT_KIND_MODEL);
      ASSERT_TRUE(artifact.ok()) << artifact.status();
      digests_[name] = artifact->sha256();
      paths_[name] = path;
    }
  }

  v1::JobSpec TaskArithmeticSpec(double lambda) {
    v1::JobSpec spec;
    spec.set_method(v1::METHOD_TASK_ARITHMETIC);
    spec.set_base_sha256(digests_["base"]);
    spec.set_lambda(lambda);
    v1::JobInput* a = spec.add_inputs();
    a->set_name("a");
    a->set_model_sha256(digests_["a"]);
    a->set_weight(1.0);
    v1::JobInput* b = spec.add_inputs();
    b->set_name("b");
    b->set_model_sha256(digests_["b"]);
    b->set_weight(2.0);
    return spec;
  }

  // ExpectTaskArithmetic checks the merged model at `path` against
  // theta = theta0 + lambda * (1 * tau_a + 2 * tau_b), heads copied per task.
  void ExpectTaskArithmetic(const std::string& path, double lambda) {
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    for (const char* name : {"layer.weight", "layer.bias"}) {
      std::vector<float> merged = ReadFloats(**file, name);
      const std::vector<float>& base = base_.at(name).values;
      ASSERT_EQ(merged.size(), base.size()) << name;
      for (size_t i = 0; i < base.size(); ++i) {
        const double tau_a = task_a_.at(name).values[i] - base[i];
        const double tau_b = task_b_.at(name).values[i] - base[i];
        const double expected = base[i] + lambda * (1.0 * tau_a + 2.0 * tau_b);
        ASSERT_NEAR(merged[i], expected, 1e-5) << name << "[" << i << "]";
      }
    }
    EXPECT_EQ(ReadFloats(**file, "a/head.weight"),
              task_a_.at("head.weight").values);
    EXPECT_EQ(ReadFloats(**file, "b/head.weight"),
              task_b_.at("head.weight").values);
    const auto& metadata = (*file)->layout().metadata;
    ASSERT_TRUE(metadata.count("mergeguard.method"));
    EXPECT_EQ(metadata.at("mergeguard.method"), "task_arithmetic");
    EXPECT_EQ(metadata.at("mergeguard.base_sha256"), digests_["base"]);
    EXPECT_THAT(metadata.at("mergeguard.inputs"), HasSubstr(digests_["b"]));
    EXPECT_TRUE(metadata.count("mergeguard.server_version"));
  }

  std::string dir_;
  std::string tokens_;
  std::string store_;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<SanitizerClient> acme_;
  Model base_, task_a_, task_b_;
  std::map<std::string, std::string> digests_;
  std::map<std::string, std::string> paths_;
};

// ---- transfers
// ---------------------------------------------------------------

TEST_F(ServiceTest, UploadAndDownload200MBAreBitExact) {
  StartServer();
  const std::string source = absl::StrCat(dir_, "/big.bin");
  const std::string original = RandomBytes(200'000'000, 7);
  WriteFile(source, original);

  auto artifact = acme_->UploadFile(source, v1::ARTIFACT_KIND_MODEL);
  ASSERT_TRUE(artifact.ok()) << artifact.status();
  EXPECT_EQ(artifact->size_bytes(), original.size());
  EXPECT_EQ(artifact->sha256(), Sha256Hex(original));
  EXPECT_FALSE(artifact->already_present());

  const std::string copy = absl::StrCat(dir_, "/big.copy");
  ASSERT_TRUE(acme_->DownloadToFile(artifact->sha256(), copy).ok());
  EXPECT_TRUE(ReadWholeFile(copy) == original) << "downloaded bytes differ";

  // The same bytes again: stored once, nothing transferred.
  auto again = acme_->UploadFile(source, v1::ARTIFACT_KIND_MODEL);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->already_present());
}

TEST_F(ServiceTest, DownloadResumesFromOffset) {
  StartServer();
  const std::string bytes = RandomBytes(3 * kMiB + 123, 11);
  auto artifact = acme_->UploadBytes(bytes, v1::ARTIFACT_KIND_MODEL, "m");
  ASSERT_TRUE(artifact.ok()) << artifact.status();

  // A raw download from an offset returns exactly the tail.
  std::string tail;
  auto total = acme_->Download(artifact->sha256(), kMiB + 7,
                               [&](const v1::DownloadResponse& chunk) {
                                 tail.append(chunk.data());
                                 return absl::OkStatus();
                               });
  ASSERT_TRUE(total.ok()) << total.status();
  EXPECT_EQ(*total, bytes.size());
  EXPECT_TRUE(tail == bytes.substr(kMiB + 7));

  // DownloadToFile continues an interrupted .part file.
  const std::string out = absl::StrCat(dir_, "/resumed.bin");
  WriteFile(absl::StrCat(out, ".part"), bytes.substr(0, kMiB + 7));
  ASSERT_TRUE(acme_->DownloadToFile(artifact->sha256(), out).ok());
  EXPECT_TRUE(ReadWholeFile(out) == bytes);
  EXPECT_FALSE(std::ifstream(absl::StrCat(out, ".part")).good());

  auto past_end = acme_->Download(
      artifact->sha256(), bytes.size() + 1,
      [](const v1::DownloadResponse&) { return absl::OkStatus(); });
  EXPECT_EQ(past_end.status().code(), absl::StatusCode::kOutOfRange);
}

TEST_F(ServiceTest, BadUploadsGetCanonicalCodesAndStoreNothing) {
  StartServer({"--max_upload_bytes=8388608"});
  const std::string bytes = RandomBytes(2 * kMiB + 5, 3);
  v1::UploadMetadata metadata;
  metadata.set_name("x.safetensors");
  metadata.set_kind(v1::ARTIFACT_KIND_MODEL);
  metadata.set_size_bytes(bytes.size());

  // Digest mismatch.
  metadata.set_sha256(Sha256Hex("something else"));
  absl::Status status = RawUpload(*acme_, metadata, bytes);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("hash to"));

  // Truncated stream: half the declared bytes, then the client closes.
  metadata.set_sha256(Sha256Hex(bytes));
  status = RawUpload(*acme_, metadata, bytes.substr(0, kMiB));
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("ended after"));

  // More bytes than declared.
  metadata.set_size_bytes(kMiB);
  status = RawUpload(*acme_, metadata, bytes);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;

  // Chunks over 1 MiB.
  metadata.set_size_bytes(bytes.size());
  status = RawUpload(*acme_, metadata, bytes, 2 * kMiB);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;

  // No metadata first.
  {
    auto context = acme_->NewContext(absl::Seconds(10));
    v1::Artifact artifact;
    auto writer = acme_->stub()->Upload(context.get(), &artifact);
    v1::UploadRequest request;
    request.set_chunk("abc");
    writer->Write(request);
    writer->WritesDone();
    EXPECT_EQ(writer->Finish().error_code(),
              grpc::StatusCode::INVALID_ARGUMENT);
  }

  // Oversized: refused from the metadata alone.
  metadata.set_size_bytes(9 * kMiB);
  status = RawUpload(*acme_, metadata, "");
  EXPECT_EQ(status.code(), absl::StatusCode::kResourceExhausted) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("--max_upload_bytes"));

  // Nothing was stored, and the server is still up.
  EXPECT_EQ(acme_->GetArtifact(Sha256Hex(bytes)).status().code(),
            absl::StatusCode::kNotFound);
  auto listed = acme_->ListArtifacts();
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->artifacts_size(), 0);
  EXPECT_EQ(listed->used_bytes(), 0u);

  // Unknown digest.
  auto missing = acme_->DownloadBytes(Sha256Hex("never uploaded"));
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("upload it"));
}

TEST_F(ServiceTest, QuotaConcurrencyAndDiskLimitsAreResourceExhausted) {
  StartServer({"--tenant_quota_bytes=1500000", "--max_concurrent_uploads=1"});
  const std::string first = RandomBytes(1'000'000, 1);
  const std::string second = RandomBytes(1'000'000, 2);
  auto stored = acme_->UploadBytes(first, v1::ARTIFACT_KIND_MODEL, "first");
  ASSERT_TRUE(stored.ok()) << stored.status();
  auto refused = acme_->UploadBytes(second, v1::ARTIFACT_KIND_MODEL, "second");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("quota"));
  // Another tenant has its own quota.
  auto globex = server_->Client(kGlobexToken);
  EXPECT_TRUE(globex->UploadBytes(second, v1::ARTIFACT_KIND_MODEL, "g").ok());
  // Deleting frees the quota.
  ASSERT_TRUE(acme_->DeleteArtifact(stored->sha256()).ok());
  EXPECT_TRUE(
      acme_->UploadBytes(second, v1::ARTIFACT_KIND_MODEL, "second").ok());

  // One upload at a time: a second stream is refused while the first is open.
  auto context = acme_->NewContext(absl::Seconds(30));
  v1::Artifact artifact;
  auto open_upload = acme_->stub()->Upload(context.get(), &artifact);
  v1::UploadRequest request;
  request.mutable_metadata()->set_name("slow");
  request.mutable_metadata()->set_kind(v1::ARTIFACT_KIND_MODEL);
  request.mutable_metadata()->set_size_bytes(100);
  request.mutable_metadata()->set_sha256(Sha256Hex(std::string(100, 'x')));
  ASSERT_TRUE(open_upload->Write(request));
  absl::SleepFor(absl::Milliseconds(300));  // the server takes the slot
  absl::Status concurrent;
  for (int i = 0; i < 100; ++i) {
    concurrent =
        acme_->UploadBytes("tiny", v1::ARTIFACT_KIND_MODEL, "t").status();
    if (absl::IsResourceExhausted(concurrent)) break;
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(concurrent.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(concurrent.message()), HasSubstr("in progress"));
  request.set_chunk(std::string(100, 'x'));
  open_upload->Write(request);
  open_upload->WritesDone();
  EXPECT_TRUE(open_upload->Finish().ok());
}

TEST_F(ServiceTest, FreeDiskGuardRefusesUploads) {
  // A reserve larger than any disk: every upload would break the guard.
  StartServer({"--min_free_bytes=1000000000000000"});
  auto refused = acme_->UploadBytes("bytes", v1::ARTIFACT_KIND_MODEL, "m");
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("disk"));
}

// ---- jobs
// --------------------------------------------------------------------

TEST_F(ServiceTest, TaskArithmeticJobEndToEnd) {
  StartServer();
  UploadMergeInputs();
  auto job = acme_->SubmitJob(TaskArithmeticSpec(0.5));
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_THAT(job->id(), HasSubstr("j-test-"));
  std::vector<v1::JobState> states;
  auto done = acme_->WatchJob(job->id(), [&](const v1::JobEvent& event) {
    states.push_back(event.job().state());
  });
  ASSERT_TRUE(done.ok()) << done.status();
  ASSERT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error_message();
  EXPECT_EQ(states.back(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(done->attempts(), 1);
  EXPECT_GT(done->result().metrics().at("merged_tensors"), 0);

  const std::string merged = absl::StrCat(dir_, "/merged.safetensors");
  ASSERT_TRUE(
      acme_->DownloadToFile(done->result().model().sha256(), merged).ok());
  ExpectTaskArithmetic(merged, 0.5);

  auto report = acme_->DownloadBytes(done->result().report().sha256());
  ASSERT_TRUE(report.ok());
  nlohmann::json parsed = nlohmann::json::parse(*report);
  EXPECT_EQ(parsed["method"], "task_arithmetic");
  EXPECT_EQ(parsed["base_sha256"], digests_["base"]);

  // Bad specs are refused up front with the field named.
  v1::JobSpec bad = TaskArithmeticSpec(0.5);
  bad.mutable_inputs(1)->set_name("a");
  auto duplicate = acme_->SubmitJob(bad);
  EXPECT_EQ(duplicate.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(duplicate.status().message()),
              HasSubstr("inputs[1].name"));
  bad = TaskArithmeticSpec(0.5);
  bad.mutable_ties()->set_top_k_percent(10);
  EXPECT_THAT(std::string(acme_->SubmitJob(bad).status().message()),
              HasSubstr("does not apply"));
  bad = TaskArithmeticSpec(0.5);
  bad.mutable_inputs(0)->set_model_sha256(Sha256Hex("not uploaded"));
  EXPECT_EQ(acme_->SubmitJob(bad).status().code(), absl::StatusCode::kNotFound);

  // Shape mismatch fails the job (FAILED_PRECONDITION) and leaves nothing.
  Model other = RandomModel(9, nullptr, 1.0f);
  other["layer.weight"].shape = {16, 8};
  const std::string other_path = absl::StrCat(dir_, "/other.safetensors");
  WriteModel(other_path, other);
  auto other_artifact = acme_->UploadFile(other_path, v1::ARTIFACT_KIND_MODEL);
  ASSERT_TRUE(other_artifact.ok());
  bad = TaskArithmeticSpec(0.5);
  bad.mutable_inputs(1)->set_model_sha256(other_artifact->sha256());
  auto failing = acme_->SubmitJob(bad);
  ASSERT_TRUE(failing.ok()) << failing.status();
  auto failed = acme_->WatchJob(failing->id());
  ASSERT_TRUE(failed.ok());
  EXPECT_EQ(failed->state(), v1::JOB_STATE_FAILED);
  EXPECT_NE(failed->error_code(), 0);
  EXPECT_FALSE(failed->error_message().empty());
  EXPECT_FALSE(failed->has_result());
}

TEST_F(ServiceTest, SanitizeOneShotStreamsTheResult) {
  StartServer();
  base_ = RandomModel(1, nullptr, 1.0f);
  task_a_ = RandomModel(2, &base_, 0.1f);
  task_b_ = RandomModel(3, &base_, 0.1f);
  std::vector<SanitizeUpload> uploads;
  for (const auto& [name, model] :
       std::vector<std::pair<std::string, const Model*>>{
           {"base", &base_}, {"a", &task_a_}, {"b", &task_b_}}) {
    const std::string path = absl::StrCat(dir_, "/", name, ".safetensors");
    WriteModel(path, *model);
    digests_[name] = *Sha256File(path);
    uploads.push_back({path, v1::ARTIFACT_KIND_MODEL});
  }
  const std::string out = absl::StrCat(dir_, "/sanitized.safetensors");
  int events = 0;
  auto job = acme_->Sanitize(uploads, TaskArithmeticSpec(0.3), out,
                             [&](const v1::JobEvent&) { ++events; });
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_GE(events, 1);
  ExpectTaskArithmetic(out, 0.3);

  // A failing spec ends the stream with the job's error.
  v1::JobSpec bad = TaskArithmeticSpec(0.3);
  bad.set_method(v1::METHOD_DAM);
  auto refused = acme_->Sanitize({}, bad, out + ".2");
  EXPECT_FALSE(refused.ok());
  EXPECT_FALSE(std::ifstream(out + ".2").good());
}

TEST_F(ServiceTest, CancelQueuedAndRunningJobs) {
  StartServer({"--workers=1", "--testonly_job_delay=20s"});
  UploadMergeInputs();
  auto running = acme_->SubmitJob(TaskArithmeticSpec(0.3));
  auto queued = acme_->SubmitJob(TaskArithmeticSpec(0.4));
  ASSERT_TRUE(running.ok() && queued.ok());
  ASSERT_EQ(WaitForState(*acme_, running->id(), v1::JOB_STATE_RUNNING).state(),
            v1::JOB_STATE_RUNNING);
  auto queued_now = acme_->GetJob(queued->id());
  ASSERT_TRUE(queued_now.ok());
  EXPECT_EQ(queued_now->state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(queued_now->queue_position(), 0);

  auto cancelled = acme_->CancelJob(queued->id());
  ASSERT_TRUE(cancelled.ok()) << cancelled.status();
  EXPECT_EQ(cancelled->state(), v1::JOB_STATE_CANCELLED);

  const absl::Time start = absl::Now();
  ASSERT_TRUE(acme_->CancelJob(running->id()).ok());
  auto stopped = acme_->WatchJob(running->id());
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->state(), v1::JOB_STATE_CANCELLED);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  EXPECT_FALSE(stopped->has_result());
  // No result or report became visible.
  auto listed = acme_->ListArtifacts();
  ASSERT_TRUE(listed.ok());
  for (const v1::Artifact& artifact : listed->artifacts()) {
    EXPECT_EQ(artifact.kind(), v1::ARTIFACT_KIND_MODEL);
  }
  // Cancelling a finished job changes nothing.
  auto again = acme_->CancelJob(running->id());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->state(), v1::JOB_STATE_CANCELLED);
}

TEST_F(ServiceTest, FullQueueIsResourceExhausted) {
  StartServer(
      {"--workers=1", "--queue_capacity=1", "--testonly_job_delay=20s"});
  UploadMergeInputs();
  auto first = acme_->SubmitJob(TaskArithmeticSpec(0.3));
  ASSERT_TRUE(first.ok());
  WaitForState(*acme_, first->id(), v1::JOB_STATE_RUNNING);
  auto second = acme_->SubmitJob(TaskArithmeticSpec(0.3));
  ASSERT_TRUE(second.ok()) << second.status();
  auto third = acme_->SubmitJob(TaskArithmeticSpec(0.3));
  EXPECT_EQ(third.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(third.status().message()),
              HasSubstr("--queue_capacity"));
  // Freeing the slot makes room again.
  ASSERT_TRUE(acme_->CancelJob(second->id()).ok());
  EXPECT_TRUE(acme_->SubmitJob(TaskArithmeticSpec(0.3)).ok());
}

// ---- durability
// --------------------------------------------------------------

TEST_F(ServiceTest, KillNineKeepsResultsAndQueuedJobs) {
  StartServer();
  UploadMergeInputs();
  auto finished = acme_->SubmitJob(TaskArithmeticSpec(0.5));
  ASSERT_TRUE(finished.ok());
  auto done = acme_->WatchJob(finished->id());
  ASSERT_TRUE(done.ok() && done->state() == v1::JOB_STATE_SUCCEEDED);
  const std::string result_sha = done->result().model().sha256();
  server_->Signal(SIGKILL);
  server_->Wait(10);

  // Second life: one job running (held by the test delay), one queued.
  StartServer({"--workers=1", "--testonly_job_delay=30s"});
  auto interrupted = acme_->SubmitJob(TaskArithmeticSpec(0.5));
  auto queued = acme_->SubmitJob(TaskArithmeticSpec(0.25));
  ASSERT_TRUE(interrupted.ok() && queued.ok());
  ASSERT_EQ(
      WaitForState(*acme_, interrupted->id(), v1::JOB_STATE_RUNNING).state(),
      v1::JOB_STATE_RUNNING);
  server_->Signal(SIGKILL);
  EXPECT_EQ(server_->Wait(10), 128 + SIGKILL);

  // Third life: the completed result survived, the running job is re-queued
  // and both run to completion.
  StartServer();
  auto kept = acme_->GetJob(finished->id());
  ASSERT_TRUE(kept.ok());
  EXPECT_EQ(kept->state(), v1::JOB_STATE_SUCCEEDED);
  const std::string merged = absl::StrCat(dir_, "/kept.safetensors");
  ASSERT_TRUE(acme_->DownloadToFile(result_sha, merged).ok());
  ExpectTaskArithmetic(merged, 0.5);

  auto rerun = acme_->WatchJob(interrupted->id());
  ASSERT_TRUE(rerun.ok());
  EXPECT_EQ(rerun->state(), v1::JOB_STATE_SUCCEEDED) << rerun->error_message();
  EXPECT_EQ(rerun->attempts(), 2);
  auto later = acme_->WatchJob(queued->id());
  ASSERT_TRUE(later.ok());
  EXPECT_EQ(later->state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(later->attempts(), 1);
  // The killed upload and job left no temporary files behind.
  for (const char* scratch : {"/tmp", "/work"}) {
    const std::string path = absl::StrCat(store_, scratch);
    EXPECT_TRUE(std::filesystem::is_empty(path)) << path;
  }
}

TEST_F(ServiceTest, InterruptedJobFailsOnceAttemptsAreUsed) {
  StartServer(
      {"--workers=1", "--testonly_job_delay=30s", "--max_job_attempts=1"});
  UploadMergeInputs();
  auto job = acme_->SubmitJob(TaskArithmeticSpec(0.5));
  ASSERT_TRUE(job.ok());
  WaitForState(*acme_, job->id(), v1::JOB_STATE_RUNNING);
  server_->Signal(SIGKILL);
  server_->Wait(10);
  StartServer({"--max_job_attempts=1"});
  auto failed = acme_->GetJob(job->id());
  ASSERT_TRUE(failed.ok());
  EXPECT_EQ(failed->state(), v1::JOB_STATE_FAILED);
  EXPECT_EQ(failed->error_code(), static_cast<int>(absl::StatusCode::kAborted));
  EXPECT_THAT(failed->error_message(), HasSubstr("interrupted"));
}

// ---- security
// ----------------------------------------------------------------

TEST_F(ServiceTest, TenantsAreIsolatedAndAuthIsEnforced) {
  StartServer();
  UploadMergeInputs();
  auto job = acme_->SubmitJob(TaskArithmeticSpec(0.5));
  ASSERT_TRUE(job.ok());
  auto globex = server_->Client(kGlobexToken);

  EXPECT_EQ(globex->GetArtifact(digests_["base"]).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(globex->DownloadBytes(digests_["base"]).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(globex->DeleteArtifact(digests_["base"]).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(globex->SubmitJob(TaskArithmeticSpec(0.5)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(globex->GetJob(job->id()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(globex->CancelJob(job->id()).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(globex->WatchJob(job->id()).status().code(),
            absl::StatusCode::kNotFound);
  auto globex_jobs = globex->ListJobs();
  ASSERT_TRUE(globex_jobs.ok());
  EXPECT_EQ(globex_jobs->jobs_size(), 0);
  auto acme_jobs = acme_->ListJobs();
  ASSERT_TRUE(acme_jobs.ok());
  EXPECT_EQ(acme_jobs->jobs_size(), 1);
  // Uploading the same bytes does not reveal that another tenant has them.
  auto same = globex->UploadFile(paths_["base"], v1::ARTIFACT_KIND_MODEL);
  ASSERT_TRUE(same.ok());
  EXPECT_FALSE(same->already_present());

  auto anonymous = server_->Client("");
  EXPECT_EQ(anonymous->ListJobs().status().code(),
            absl::StatusCode::kUnauthenticated);
  auto forged = server_->Client("not-a-real-token-0000000000000000");
  EXPECT_EQ(forged->ListArtifacts().status().code(),
            absl::StatusCode::kUnauthenticated);

  // Only admins register architectures.
  auto module = acme_->UploadBytes("torchscript",
                                   v1::ARTIFACT_KIND_ARCHITECTURE, "net.pt");
  ASSERT_TRUE(module.ok());
  auto denied = acme_->RegisterArchitecture("net", module->sha256());
  EXPECT_EQ(denied.status().code(), absl::StatusCode::kPermissionDenied);
  auto admin = server_->Client(kAdminToken);
  auto admin_module = admin->UploadBytes(
      "torchscript", v1::ARTIFACT_KIND_ARCHITECTURE, "net.pt");
  ASSERT_TRUE(admin_module.ok());
  auto registered = admin->RegisterArchitecture("net", admin_module->sha256());
  ASSERT_TRUE(registered.ok()) << registered.status();
  auto listed = acme_->ListArchitectures();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->architectures_size(), 1);
  EXPECT_EQ(listed->architectures(0).name(), "net");
  v1::JobSpec unknown_arch = TaskArithmeticSpec(0.5);
  unknown_arch.set_architecture("resnet");
  auto refused = acme_->SubmitJob(unknown_arch);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("net"));

  // Auth failures are counted.
  auto metrics = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok());
  EXPECT_THAT(*metrics, HasSubstr("mergeguard_auth_failures_total{code="
                                  "\"UNAUTHENTICATED\""));
  EXPECT_THAT(*metrics, HasSubstr("code=\"PERMISSION_DENIED\""));

  // The token file is reloaded when it changes: revoke globex, add a new one.
  const std::string new_token = "fresh-token-for-acme-000000000000";
  WriteFile(tokens_, absl::StrCat(kAcmeToken, " acme user\n", new_token,
                                  " acme user\n"));
  auto fresh = server_->Client(new_token);
  absl::Status fresh_status;
  for (int i = 0; i < 100; ++i) {
    fresh_status = fresh->ListJobs().status();
    if (fresh_status.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_TRUE(fresh_status.ok()) << fresh_status;
  EXPECT_EQ(globex->ListJobs().status().code(),
            absl::StatusCode::kUnauthenticated);
  // A broken edit keeps the previous tokens.
  WriteFile(tokens_, "this line is not a token entry\n");
  absl::SleepFor(absl::Milliseconds(2500));
  EXPECT_TRUE(fresh->ListJobs().ok());
}

TEST_F(ServiceTest, TlsAndMutualTls) {
  if (std::system("command -v openssl > /dev/null 2>&1") != 0) {
    GTEST_SKIP() << "openssl is not installed";
  }
  const std::string certs = absl::StrCat(dir_, "/certs");
  const std::string script = absl::StrCat(
      "set -e; mkdir -p ", certs, "; cd ", certs,
      "; EC='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes';"
      " openssl req -x509 $EC -keyout ca.key -out ca.pem -days 1"
      " -subj /CN=mergeguard-test-ca 2>/dev/null;"
      " printf 'subjectAltName=DNS:localhost,IP:127.0.0.1' > san.cnf;"
      " for who in server client; do"
      "  openssl req $EC -keyout $who.key -out $who.csr -subj /CN=$who"
      "   2>/dev/null;"
      "  openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key"
      "   -CAcreateserial -out $who.pem -days 1 -extfile san.cnf 2>/dev/null;"
      " done");
  ASSERT_EQ(std::system(script.c_str()), 0);
  StartServer({absl::StrCat("--tls_cert=", certs, "/server.pem"),
               absl::StrCat("--tls_key=", certs, "/server.key"),
               absl::StrCat("--tls_client_ca=", certs, "/ca.pem")});
  SanitizerClientOptions options;
  options.target = absl::StrCat("localhost:", server_->port());
  options.token = kAcmeToken;
  options.rpc_timeout = absl::Seconds(5);
  options.tls_ca_file = absl::StrCat(certs, "/ca.pem");
  options.tls_client_cert_file = absl::StrCat(certs, "/client.pem");
  options.tls_client_key_file = absl::StrCat(certs, "/client.key");
  auto mtls = SanitizerClient::Create(options);
  ASSERT_TRUE(mtls.ok());
  EXPECT_TRUE((*mtls)->ListArtifacts().ok());
  EXPECT_TRUE(
      (*mtls)->UploadBytes("over tls", v1::ARTIFACT_KIND_MODEL, "t").ok());

  options.tls_client_cert_file.clear();
  options.tls_client_key_file.clear();
  auto no_client_cert = SanitizerClient::Create(options);
  ASSERT_TRUE(no_client_cert.ok());
  EXPECT_FALSE((*no_client_cert)->ListArtifacts().ok());
  // Plaintext cannot talk to a TLS port.
  EXPECT_FALSE(acme_->ListArtifacts().ok());
}

// ---- operations
// --------------------------------------------------------------

TEST_F(ServiceTest, MetricsAfterAJobHaveTheExpectedFamilies) {
  StartServer();
  UploadMergeInputs();
  auto job = acme_->SubmitJob(TaskArithmeticSpec(0.5));
  ASSERT_TRUE(job.ok());
  auto done = acme_->WatchJob(job->id());
  ASSERT_TRUE(done.ok() && done->state() == v1::JOB_STATE_SUCCEEDED);
  ASSERT_TRUE(acme_->DownloadBytes(done->result().model().sha256()).ok());
  server_->Client("")->ListJobs().IgnoreError();  // one auth failure
  absl::SleepFor(absl::Milliseconds(1200));       // gauges refresh each second

  auto metrics = HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  for (const char* family : {
           "mergeguard_rpcs_total{code=\"OK\",method=\"SubmitJob\"} 1",
           "mergeguard_rpc_duration_seconds_bucket{method=\"Upload\"",
           "mergeguard_uploaded_bytes_total",
           "mergeguard_downloaded_bytes_total",
           "mergeguard_jobs_total{method=\"task_arithmetic\",outcome="
           "\"succeeded\"} 1",
           "mergeguard_job_duration_seconds_count{method=\"task_arithmetic\"} "
           "1",
           "mergeguard_queue_depth 0",
           "mergeguard_busy_workers 0",
           "mergeguard_workers 1",
           "mergeguard_store_bytes",
           "mergeguard_store_free_bytes",
           "mergeguard_build_info{version=",
           "mergeguard_auth_failures_total",
           "mergeguard_m2_flagged_ratio_bucket{method=\"dam\"",
           "mergeguard_tau_ab_norm_bucket{method=\"lfpm\"",
           "mergeguard_trigger_anomaly_index_bucket",
           "mergeguard_mined_trigger_attack_success_ratio_bucket",
           "mergeguard_probe_attack_success_ratio_bucket",
           "mergeguard_probe_clean_accuracy_ratio_bucket",
           "mergeguard_suspicious_inputs_total{method=\"dam\"} 0",
       }) {
    EXPECT_THAT(*metrics, HasSubstr(family));
  }
  EXPECT_THAT(*metrics, ::testing::Not(HasSubstr(job->id())));
  if (std::system("command -v promtool > /dev/null 2>&1") == 0) {
    const std::string scrape = absl::StrCat(dir_, "/metrics.txt");
    WriteFile(scrape, *metrics);
    const std::string check = absl::StrCat("promtool check metrics < ", scrape);
    EXPECT_EQ(std::system(check.c_str()), 0) << "promtool check metrics failed";
  }
}

TEST_F(ServiceTest, SigtermStopsTakingJobsAndDrains) {
  StartServer(
      {"--workers=1", "--testonly_job_delay=3s", "--drain_timeout=30s"});
  UploadMergeInputs();
  EXPECT_EQ(*acme_->HealthStatus(), "SERVING");
  auto job = acme_->SubmitJob(TaskArithmeticSpec(0.5));
  ASSERT_TRUE(job.ok());
  WaitForState(*acme_, job->id(), v1::JOB_STATE_RUNNING);
  server_->Signal(SIGTERM);
  absl::StatusOr<std::string> health;
  for (int i = 0; i < 100; ++i) {
    health = acme_->HealthStatus();
    if (health.ok() && *health == "NOT_SERVING") break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, "NOT_SERVING");
  EXPECT_EQ(acme_->SubmitJob(TaskArithmeticSpec(0.5)).status().code(),
            absl::StatusCode::kUnavailable);
  EXPECT_EQ(server_->Wait(30), 0);

  // The running job finished during the drain.
  StartServer();
  auto finished = acme_->GetJob(job->id());
  ASSERT_TRUE(finished.ok());
  EXPECT_EQ(finished->state(), v1::JOB_STATE_SUCCEEDED);
}

}  // namespace
}  // namespace mergeguard
