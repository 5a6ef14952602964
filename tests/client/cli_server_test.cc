// The `mergeguard` CLI against the real mergeguard-server on a free port.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/probe.h"
#include "core/sha256.h"
#include "core/tensor_views.h"
#include "tests/client/cli_runner.h"
#include "tests/client/defense_world.h"
#include "tests/server/server_process.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

using ::mergeguard::testing::CommandResult;
using ::mergeguard::testing::RunCli;

class CliServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("mergeguard_cli_server");
    StartServer({});
  }

  void StartServer(const std::vector<std::string>& extra_flags) {
    std::string tokens = testing::WriteTestTokens(dir_);
    absl::StatusOr<std::unique_ptr<testing::ServerProcess>> server =
        testing::ServerProcess::Start(dir_ + "/store", tokens, extra_flags);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    flags_ = " --server " + server_->target() + " --token " +
             testing::kAcmeToken + " ";
  }
  void TearDown() override {
    server_.reset();
    testing::RemoveTree(dir_);
  }

  // WriteTaskScenario writes a base, two task models and a TA job file.
  void WriteTaskScenario() {
    torch::manual_seed(3);
    base_ = torch::randn({16, 8});
    a_ = base_ + 0.1 * torch::randn({16, 8});
    b_ = base_ + 0.1 * torch::randn({16, 8});
    ASSERT_TRUE(SaveTensors(dir_ + "/base.safetensors", {{"w", base_}}).ok());
    ASSERT_TRUE(SaveTensors(dir_ + "/a.safetensors",
                            {{"w", a_}, {"head.weight", torch::randn({3, 8})}})
                    .ok());
    ASSERT_TRUE(SaveTensors(dir_ + "/b.safetensors",
                            {{"w", b_}, {"head.weight", torch::randn({3, 8})}})
                    .ok());
    std::ofstream(dir_ + "/job.yaml")
        << "method: task_arithmetic\nbase: base.safetensors\n"
           "models: [a.safetensors, b.safetensors]\n"
           "parameters: {lambda: 0.4}\n";
  }

  std::string dir_;
  std::string flags_;
  std::unique_ptr<testing::ServerProcess> server_;
  torch::Tensor base_, a_, b_;
};

TEST_F(CliServerTest, HealthServing) {
  CommandResult r = RunCli("health" + flags_);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("SERVING"));
}

TEST_F(CliServerTest, RunMatchesFormulaAndListsJob) {
  WriteTaskScenario();
  CommandResult r = RunCli("run --config " + dir_ + "/job.yaml --out " + dir_ +
                           "/out" + flags_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("SUCCEEDED"));
  absl::StatusOr<NamedTensors> merged =
      LoadTensorsFromPath(dir_ + "/out/model.safetensors");
  ASSERT_TRUE(merged.ok()) << merged.status();
  std::map<std::string, torch::Tensor> by_name(merged->begin(), merged->end());
  torch::Tensor expected = base_ + 0.4 * ((a_ - base_) + (b_ - base_));
  EXPECT_TRUE(torch::allclose(by_name.at("w"), expected, 1e-5, 1e-6));
  EXPECT_TRUE(fs::exists(dir_ + "/out/report.json"));

  CommandResult jobs = RunCli("jobs" + flags_);
  EXPECT_EQ(jobs.exit_code, 0) << jobs.output;
  EXPECT_THAT(jobs.output, HasSubstr("SUCCEEDED"));
  EXPECT_THAT(jobs.output, HasSubstr("TASK_ARITHMETIC"));

  // Another tenant sees none of it.
  CommandResult other = RunCli("jobs --server " + server_->target() +
                               " --token " + testing::kGlobexToken);
  EXPECT_EQ(other.exit_code, 0);
  EXPECT_THAT(other.output, ::testing::Not(HasSubstr("SUCCEEDED")));
}

TEST_F(CliServerTest, SubmitWatchDownloadAndResume) {
  WriteTaskScenario();
  CommandResult submit =
      RunCli("submit --config " + dir_ + "/job.yaml" + flags_);
  ASSERT_EQ(submit.exit_code, 0) << submit.output;
  size_t at = submit.output.find("job ");
  ASSERT_NE(at, std::string::npos);
  std::string job_id = submit.output.substr(at + 4);
  job_id = job_id.substr(0, job_id.find(' '));

  CommandResult watch = RunCli("watch " + job_id + flags_);
  ASSERT_EQ(watch.exit_code, 0) << watch.output;
  EXPECT_THAT(watch.output, HasSubstr("SUCCEEDED"));

  CommandResult full =
      RunCli("download " + job_id + " --out " + dir_ + "/full" + flags_);
  ASSERT_EQ(full.exit_code, 0) << full.output;
  std::string bytes = testing::ReadWholeFile(dir_ + "/full/model.safetensors");
  ASSERT_GT(bytes.size(), 100u);

  // An interrupted transfer leaves a .part prefix; the next download resumes
  // from it and still verifies the digest.
  fs::create_directories(dir_ + "/resumed");
  testing::WriteFile(dir_ + "/resumed/model.safetensors.part",
                     bytes.substr(0, bytes.size() / 2));
  CommandResult resumed =
      RunCli("download " + job_id + " --out " + dir_ + "/resumed" + flags_);
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_EQ(testing::ReadWholeFile(dir_ + "/resumed/model.safetensors"), bytes);
  EXPECT_FALSE(fs::exists(dir_ + "/resumed/model.safetensors.part"));

  // A corrupt .part prefix is caught by the digest and never renamed.
  fs::create_directories(dir_ + "/corrupt");
  testing::WriteFile(dir_ + "/corrupt/model.safetensors.part",
                     std::string(bytes.size() / 2, 'x'));
  CommandResult corrupt =
      RunCli("download " + job_id + " --out " + dir_ + "/corrupt" + flags_);
  EXPECT_NE(corrupt.exit_code, 0) << corrupt.output;
  EXPECT_FALSE(fs::exists(dir_ + "/corrupt/model.safetensors"));
}

TEST_F(CliServerTest, ExitCodesForServerErrors) {
  CommandResult unknown = RunCli("watch no-such-job" + flags_);
  EXPECT_EQ(unknown.exit_code, 3) << unknown.output;
  EXPECT_THAT(unknown.output, HasSubstr("NOT_FOUND"));

  CommandResult bad_token =
      RunCli("jobs --server " + server_->target() + " --token wrong-token");
  EXPECT_EQ(bad_token.exit_code, 5) << bad_token.output;
  EXPECT_THAT(bad_token.output, HasSubstr("UNAUTHENTICATED"));

  // The token may come from the environment instead of the flag.
  CommandResult env_token =
      RunCli("jobs --server " + server_->target(),
             std::string("MERGEGUARD_TOKEN=") + testing::kAcmeToken);
  EXPECT_EQ(env_token.exit_code, 0) << env_token.output;

  CommandResult bad_timeout = RunCli("jobs --timeout soon" + flags_);
  EXPECT_EQ(bad_timeout.exit_code, 3);
  EXPECT_THAT(bad_timeout.output, HasSubstr("--timeout"));

  CommandResult bad_kind = RunCli("upload --kind weights x" + flags_);
  EXPECT_EQ(bad_kind.exit_code, 2);
  EXPECT_THAT(bad_kind.output, HasSubstr("--kind: unknown kind"));

  CommandResult missing =
      RunCli("upload " + dir_ + "/nope.safetensors" + flags_);
  EXPECT_EQ(missing.exit_code, 3) << missing.output;
}

TEST_F(CliServerTest, UploadPrintsDigest) {
  testing::WriteFile(dir_ + "/calib.safetensors", "not checked at upload");
  CommandResult r = RunCli("upload --kind calibration " + dir_ +
                           "/calib.safetensors" + flags_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr(Sha256Hex("not checked at upload")));
}

// A server whose operator registered the tiny architecture as "tiny", and
// the tiny world's files next to it.
class CliServerDefenseTest : public CliServerTest {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("mergeguard_cli_defense");
    testing::WriteDefenseWorld(dir_);
    fs::create_directories(dir_ + "/architectures");
    fs::copy_file(dir_ + "/tiny.pt", dir_ + "/architectures/tiny.pt");
    StartServer({"--architectures_dir=" + dir_ + "/architectures"});
  }

  // RunJob writes a job file for `method` and runs it into DIR/out.
  CommandResult RunJob(const std::string& method,
                       const std::string& architecture,
                       const std::string& parameters) {
    std::ofstream(dir_ + "/job.yaml")
        << testing::DefenseJobYaml(method, architecture, parameters);
    return RunCli("run --config " + dir_ + "/job.yaml --out " + dir_ + "/out" +
                  flags_);
  }

  void ExpectDownloadedModel(const std::string& method) {
    absl::StatusOr<NamedTensors> merged =
        LoadTensorsFromPath(dir_ + "/out/model.safetensors");
    ASSERT_TRUE(merged.ok()) << merged.status();
    std::map<std::string, torch::Tensor> by_name(merged->begin(),
                                                 merged->end());
    for (const std::string& key : testing::DefenseWorldBackboneKeys()) {
      EXPECT_TRUE(by_name.count(key)) << key;
    }
    for (const std::string& task : testing::DefenseWorldTasks()) {
      EXPECT_TRUE(by_name.count(task + "/head.weight")) << task;
    }
    nlohmann::json report = nlohmann::json::parse(
        testing::ReadWholeFile(dir_ + "/out/report.json"), nullptr, false);
    ASSERT_FALSE(report.is_discarded());
    EXPECT_TRUE(report.contains(method)) << report.dump(1);
    // The parameters travelled with the job.
    EXPECT_EQ(report["defense_parameters"].value("steps", ""), "2")
        << report.dump(1);
  }
};

TEST_F(CliServerDefenseTest, RunDam) {
  CommandResult r = RunJob("dam", "tiny",
                           "  steps: 2\n  adamerging_steps: 2\n"
                           "  batch_size: 4\n");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("SUCCEEDED"));
  ExpectDownloadedModel("dam");
  CommandResult jobs = RunCli("jobs" + flags_);
  EXPECT_EQ(jobs.exit_code, 0) << jobs.output;
  EXPECT_THAT(jobs.output, HasSubstr("DAM"));
  EXPECT_THAT(jobs.output, HasSubstr("SUCCEEDED"));
}

TEST_F(CliServerDefenseTest, RunLfpm) {
  CommandResult r = RunJob("lfpm", "tiny",
                           "  steps: 2\n  batch_size: 4\n  path_nodes: 2\n"
                           "  report_examples: 8\n"
                           "  trigger: {scan_steps: 2, scan_batch_size: 4, "
                           "update_every: 2, steps_per_update: 1, "
                           "rescan_after: false}\n");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("SUCCEEDED"));
  ExpectDownloadedModel("lfpm");
  CommandResult jobs = RunCli("jobs" + flags_);
  EXPECT_EQ(jobs.exit_code, 0) << jobs.output;
  EXPECT_THAT(jobs.output, HasSubstr("LFPM"));
}

// A probe set travels with the job; the report and /metrics carry its
// accuracy and attack success before and after the defense.
TEST_F(CliServerDefenseTest, ProbeSetReachesReportAndMetrics) {
  ProbeSet probe;
  torch::manual_seed(4);
  probe.images.inputs = torch::rand({10, 1, 28, 28});
  probe.images.labels = torch::randint(0, 3, {10}, torch::kLong);
  probe.trigger.pattern = torch::ones({1, 3, 3});
  probe.trigger.row = 2;
  probe.trigger.col = 2;
  probe.target = 2;
  ASSERT_TRUE(SaveProbeSet(dir_ + "/alpha_probe.safetensors", probe).ok());
  std::string yaml =
      "method: dam\narchitecture: tiny\nbase: base.safetensors\n"
      "models:\n";
  for (const std::string& task : testing::DefenseWorldTasks()) {
    yaml += "  - {name: " + task + ", path: " + task +
            ".safetensors, calibration: " + task + "_cal.safetensors" +
            (task == "alpha" ? ", probe: alpha_probe.safetensors" : "") + "}\n";
  }
  yaml += "parameters: {steps: 2, adamerging_steps: 2, batch_size: 4}\n";
  std::ofstream(dir_ + "/probe.yaml") << yaml;
  CommandResult r = RunCli("run --config " + dir_ + "/probe.yaml --out " +
                           dir_ + "/out" + flags_);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  nlohmann::json report = nlohmann::json::parse(
      testing::ReadWholeFile(dir_ + "/out/report.json"), nullptr, false);
  ASSERT_FALSE(report.is_discarded());
  ASSERT_EQ(report["probes"]["tasks"].size(), 1u) << report.dump(1);
  EXPECT_EQ(report["probes"]["tasks"][0].value("task", ""), "alpha");
  EXPECT_TRUE(report["metrics"].contains("probe_asr_after"));
  absl::StatusOr<std::string> metrics =
      testing::HttpGet(server_->metrics_port(), "/metrics");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_THAT(*metrics,
              HasSubstr("mergeguard_probe_attack_success_ratio_count{method="
                        "\"dam\",stage=\"after\"} 1"));

  // Local runs refuse probe sets rather than ignore them.
  CommandResult local =
      RunCli("merge --config " + dir_ + "/probe.yaml --out " + dir_ + "/l");
  EXPECT_NE(local.exit_code, 0);
  EXPECT_THAT(local.output, HasSubstr("evaluated by server jobs"));
}

TEST_F(CliServerDefenseTest, BadParameterFailsBeforeUpload) {
  CommandResult r = RunJob("dam", "tiny", "  steps: ten\n");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("INVALID_ARGUMENT"));
  EXPECT_THAT(r.output, HasSubstr("line 9: parameters.steps: expected an "
                                  "integer, got \"ten\""));
  EXPECT_THAT(r.output, ::testing::Not(HasSubstr("uploaded")));
  CommandResult jobs = RunCli("jobs" + flags_);
  EXPECT_THAT(jobs.output, ::testing::Not(HasSubstr("DAM")));
}

TEST_F(CliServerDefenseTest, ArchitectureFileIsRefusedBeforeUpload) {
  CommandResult r = RunJob("dam", "tiny.pt", "  steps: 1\n");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("registered on the server"));
  EXPECT_THAT(r.output, ::testing::Not(HasSubstr("uploaded")));
}

TEST_F(CliServerDefenseTest, UnknownArchitectureIsNotFound) {
  CommandResult r = RunJob("lfpm", "nosuch", "  steps: 1\n");
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(r.output, HasSubstr("unknown architecture \"nosuch\""));
  EXPECT_THAT(r.output, HasSubstr("registered: tiny"));
}

}  // namespace
}  // namespace mergeguard
