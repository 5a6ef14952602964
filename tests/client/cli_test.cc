// Runs the real `mergeguard` binary: flags, exit codes and a local merge.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/tensor_views.h"
#include "tests/client/cli_runner.h"
#include "tests/client/defense_world.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

using ::mergeguard::testing::CommandResult;
using ::mergeguard::testing::RunCli;
using ::mergeguard::testing::RunShell;

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("mergeguard_cli_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  void WriteModel(const std::string& name, const NamedTensors& tensors) {
    ASSERT_TRUE(SaveTensors((dir_ / name).string(), tensors).ok());
  }
  void WriteText(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }

  fs::path dir_;
};

TEST_F(CliTest, NoCommandIsUsageError) {
  CommandResult r = RunCli("");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("no command given"));
  EXPECT_THAT(r.output, HasSubstr("Usage: mergeguard <command>"));
}

TEST_F(CliTest, UnknownCommandAndFlag) {
  EXPECT_EQ(RunCli("frobnicate").exit_code, 2);
  CommandResult r = RunCli("merge --bogus 1");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("unknown flag --bogus"));
}

TEST_F(CliTest, MergeNeedsConfigAndOut) {
  CommandResult r = RunCli("merge --out x");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("merge needs --config FILE"));
  r = RunCli("merge --config");
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.output, HasSubstr("--config needs a value"));
}

TEST_F(CliTest, HelpShowsExample) {
  CommandResult r = RunCli("merge --help");
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("Example merge.yaml"));
}

TEST_F(CliTest, MissingConfigIsInvalidInput) {
  CommandResult r = RunCli("merge --config " + (dir_ / "nope.yaml").string() +
                           " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.output, HasSubstr("NOT_FOUND"));
  EXPECT_THAT(r.output, HasSubstr("nope.yaml"));
}

TEST_F(CliTest, ConfigErrorNamesLine) {
  WriteText("bad.yaml",
            "method: ties\nbase: b\nmodels: [x]\nparameters:\n"
            "  top_k: -3\n");
  CommandResult r = RunCli("merge --config " + (dir_ / "bad.yaml").string() +
                           " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 3);
  EXPECT_THAT(r.output, HasSubstr("line 5: parameters.top_k"));
}

TEST_F(CliTest, LocalTaskArithmeticMatchesFormula) {
  torch::manual_seed(7);
  torch::Tensor base_w = torch::randn({6, 5});
  torch::Tensor a_w = base_w + 0.1 * torch::randn({6, 5});
  torch::Tensor b_w = base_w + 0.1 * torch::randn({6, 5});
  torch::Tensor head_a = torch::randn({3, 5});
  WriteModel("base.safetensors", {{"w", base_w}});
  WriteModel("a.safetensors", {{"w", a_w}, {"head.weight", head_a}});
  WriteModel("b.safetensors",
             {{"w", b_w}, {"head.weight", torch::randn({4, 5})}});
  WriteText("merge.yaml",
            "method: task_arithmetic\nbase: base.safetensors\nmodels:\n"
            "  - {name: ta, path: a.safetensors}\n"
            "  - {name: tb, path: b.safetensors, weight: 2}\n"
            "parameters: {lambda: 0.5}\n");
  CommandResult r = RunCli("merge --config " + (dir_ / "merge.yaml").string() +
                           " --out " + (dir_ / "out").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(dir_ / "out" / "report.json"));
  absl::StatusOr<NamedTensors> merged =
      LoadTensorsFromPath((dir_ / "out" / "model.safetensors").string());
  ASSERT_TRUE(merged.ok()) << merged.status();
  std::map<std::string, torch::Tensor> by_name(merged->begin(), merged->end());
  ASSERT_TRUE(by_name.count("w"));
  torch::Tensor expected =
      base_w + 0.5 * ((a_w - base_w) + 2.0 * (b_w - base_w));
  EXPECT_TRUE(torch::allclose(by_name["w"], expected, 1e-5, 1e-6));
  ASSERT_TRUE(by_name.count("ta/head.weight"));
  EXPECT_TRUE(torch::equal(by_name["ta/head.weight"], head_a));
  EXPECT_TRUE(by_name.count("tb/head.weight"));
}

TEST_F(CliTest, ShapeMismatchLeavesNoOutput) {
  WriteModel("base.safetensors", {{"w", torch::zeros({2, 2})}});
  WriteModel("a.safetensors", {{"w", torch::zeros({2, 3})}});
  WriteText("merge.yaml",
            "method: ties\nbase: base.safetensors\nmodels: [a.safetensors]\n");
  CommandResult r = RunCli("merge --config " + (dir_ / "merge.yaml").string() +
                           " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("\"w\""));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "report.json"));
}

TEST_F(CliTest, PickleCheckpointRefused) {
  WriteModel("base.safetensors", {{"w", torch::zeros({2, 2})}});
  WriteText("a.bin", "\x80\x02}q\x00.");
  WriteText("merge.yaml",
            "method: task_arithmetic\nbase: base.safetensors\nmodels: "
            "[a.bin]\n");
  CommandResult r = RunCli("merge --config " + (dir_ / "merge.yaml").string() +
                           " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("pickle"));
}

TEST_F(CliTest, HelpNamesDataDependentMethods) {
  for (const char* command : {"merge", "submit", "run"}) {
    CommandResult r = RunCli(std::string(command) + " --help");
    EXPECT_EQ(r.exit_code, 0) << command;
    EXPECT_THAT(r.output, HasSubstr("dam")) << command;
    EXPECT_THAT(r.output, HasSubstr("lfpm")) << command;
    EXPECT_THAT(r.output, HasSubstr("adamerging")) << command;
  }
}

TEST_F(CliTest, EverySubcommandHasHelpWithAnExample) {
  for (const char* command : {"merge", "upload", "submit", "watch", "download",
                              "run", "jobs", "cancel", "health", "params"}) {
    CommandResult r = RunCli(std::string(command) + " --help");
    EXPECT_EQ(r.exit_code, 0) << command;
    EXPECT_THAT(r.output,
                HasSubstr("Usage: mergeguard " + std::string(command)))
        << command;
    EXPECT_THAT(r.output, HasSubstr("xample")) << command << ": " << r.output;
  }
}

TEST_F(CliTest, ParamsListsDefaults) {
  CommandResult r = RunCli("params lfpm");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("trigger.scan_steps"));
  EXPECT_THAT(r.output, HasSubstr("merge_lambda"));
  EXPECT_EQ(RunCli("params ties").exit_code, 2);
  EXPECT_EQ(RunCli("params blend").exit_code, 2);
}

// docs/cli.md carries `mergeguard params --markdown` verbatim, so the
// documented parameters cannot drift from the code.
TEST_F(CliTest, DocumentedParameterTablesMatchTheCode) {
  CommandResult r = RunCli("params --markdown");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream file(std::string(MERGEGUARD_SOURCE_DIR) + "/docs/cli.md");
  std::stringstream doc;
  doc << file.rdbuf();
  const std::string begin = "<!-- BEGIN mergeguard params --markdown -->\n";
  const std::string end = "<!-- END mergeguard params --markdown -->";
  size_t from = doc.str().find(begin);
  size_t to = doc.str().find(end);
  ASSERT_NE(from, std::string::npos);
  ASSERT_NE(to, std::string::npos);
  from += begin.size();
  EXPECT_EQ(doc.str().substr(from, to - from), r.output)
      << "regenerate the tables in docs/cli.md with `mergeguard params "
         "--markdown`";
}

// Runs `method` on the tiny world through `mergeguard merge` and checks the
// model's keys and the report's section.
void ExpectLocalDefenseRun(const fs::path& dir, const std::string& method,
                           const std::string& parameters,
                           const std::string& progress_phase) {
  testing::WriteDefenseWorld(dir.string());
  std::ofstream(dir / "job.yaml")
      << testing::DefenseJobYaml(method, "tiny.pt", parameters);
  CommandResult r = RunCli("merge --config " + (dir / "job.yaml").string() +
                           " --out " + (dir / "out").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr(method + ": "));
  EXPECT_THAT(r.output, HasSubstr(progress_phase));
  absl::StatusOr<NamedTensors> merged =
      LoadTensorsFromPath((dir / "out" / "model.safetensors").string());
  ASSERT_TRUE(merged.ok()) << merged.status();
  std::map<std::string, torch::Tensor> by_name(merged->begin(), merged->end());
  for (const std::string& key : testing::DefenseWorldBackboneKeys()) {
    EXPECT_TRUE(by_name.count(key)) << key;
  }
  for (const std::string& task : testing::DefenseWorldTasks()) {
    EXPECT_TRUE(by_name.count(task + "/head.weight")) << task;
    EXPECT_TRUE(by_name.count(task + "/head.bias")) << task;
  }
  std::ifstream report_file(dir / "out" / "report.json");
  nlohmann::json report = nlohmann::json::parse(report_file, nullptr, false);
  ASSERT_FALSE(report.is_discarded());
  EXPECT_EQ(report.value("method", ""), method);
  EXPECT_TRUE(report.contains(method)) << report.dump(1);
  EXPECT_TRUE(report["parameters"].contains("steps")) << report.dump(1);
  EXPECT_EQ(report["inputs"].size(), testing::DefenseWorldTasks().size());
  // Nothing but the outputs is left behind: the model, the report and, for
  // LFPM, tau_ab alone.
  int files = 0;
  for ([[maybe_unused]] const auto& entry :
       fs::directory_iterator(dir / "out")) {
    ++files;
  }
  EXPECT_EQ(files, method == "lfpm" ? 3 : 2);
}

TEST_F(CliTest, LocalAdaMerging) {
  ExpectLocalDefenseRun(dir_, "adamerging", "  steps: 3\n  batch_size: 4\n",
                        "adamerging 3/3");
}

TEST_F(CliTest, LocalDam) {
  ExpectLocalDefenseRun(dir_, "dam",
                        "  steps: 3\n  adamerging_steps: 3\n"
                        "  batch_size: 4\n",
                        "dam_adamerging 3/3");
}

TEST_F(CliTest, LocalLfpm) {
  ExpectLocalDefenseRun(dir_, "lfpm",
                        "  steps: 3\n  batch_size: 4\n  path_nodes: 2\n"
                        "  report_examples: 8\n  merge_lambda: 0.4\n"
                        "  layer_prefixes: [fc2.]\n"
                        "  trigger:\n    scan_steps: 2\n"
                        "    scan_batch_size: 4\n    update_every: 2\n"
                        "    steps_per_update: 1\n    rescan_after: false\n",
                        "lfpm 3/3");
}

// LFPM repairs a merged model given as it is, and writes tau_ab alone so
// that merged + tau_ab is the repaired model.
TEST_F(CliTest, LocalLfpmRepairsAGivenMergedModel) {
  testing::WriteDefenseWorld(dir_.string());
  std::string models;
  for (const std::string& task : testing::DefenseWorldTasks()) {
    models += "  - {name: " + task + ", path: " + task + ".safetensors}\n";
  }
  WriteText("ta.yaml",
            "method: task_arithmetic\nbase: base.safetensors\n"
            "models:\n" +
                models);
  CommandResult ta = RunCli("merge --config " + (dir_ / "ta.yaml").string() +
                            " --out " + (dir_ / "ta").string());
  ASSERT_EQ(ta.exit_code, 0) << ta.output;
  std::string tasks;
  for (const std::string& task : testing::DefenseWorldTasks()) {
    tasks +=
        "  - {name: " + task + ", calibration: " + task + "_cal.safetensors}\n";
  }
  WriteText("lfpm.yaml",
            "method: lfpm\narchitecture: tiny.pt\n"
            "merged: ta/model.safetensors\nmodels:\n" +
                tasks +
                "threads: 1\nparameters: {steps: 2, batch_size: 4, "
                "path_nodes: 2, report_examples: 8, trigger: {scan_steps: 2, "
                "scan_batch_size: 4, rescan_after: false}}\n");
  CommandResult r = RunCli("merge --config " + (dir_ / "lfpm.yaml").string() +
                           " --out " + (dir_ / "out").string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto load = [](const fs::path& path) {
    absl::StatusOr<NamedTensors> tensors = LoadTensorsFromPath(path.string());
    EXPECT_TRUE(tensors.ok()) << tensors.status();
    std::map<std::string, torch::Tensor> by_name;
    if (tensors.ok()) by_name.insert(tensors->begin(), tensors->end());
    return by_name;
  };
  auto merged = load(dir_ / "ta" / "model.safetensors");
  auto repaired = load(dir_ / "out" / "model.safetensors");
  auto tau = load(dir_ / "out" / "tau_ab.safetensors");
  ASSERT_FALSE(tau.empty());
  for (const auto& [key, delta] : tau) {
    ASSERT_TRUE(merged.count(key) && repaired.count(key)) << key;
    EXPECT_TRUE(torch::allclose(merged[key] + delta, repaired[key], 1e-5, 1e-6))
        << key;
  }
  EXPECT_TRUE(repaired.count("alpha/head.weight"));
}

TEST_F(CliTest, MergedIsOnlyForLfpm) {
  WriteText("job.yaml",
            "method: dam\narchitecture: tiny.pt\nmerged: m.safetensors\n"
            "models: [a.safetensors]\n");
  CommandResult r = RunCli("merge --config " + (dir_ / "job.yaml").string() +
                           " --out " + (dir_ / "out").string());
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("only lfpm repairs a merged model"));
}

TEST_F(CliTest, LocalDamStopsOnCtrlC) {
  testing::WriteDefenseWorld(dir_.string());
  WriteText("job.yaml",
            testing::DefenseJobYaml("dam", "tiny.pt",
                                    "  steps: 20000\n  batch_size: 2\n"));
  // Interrupt once progress shows the handler is installed and steps run.
  const std::string log = (dir_ / "log").string();
  WriteText("interrupt.sh",
            std::string(MERGEGUARD_BINARY_DIR) + "/bin/mergeguard merge " +
                "--config " + (dir_ / "job.yaml").string() + " --out " +
                (dir_ / "out").string() + " 2>" + log +
                " & pid=$!\n"
                "for i in $(seq 1200); do\n"
                "  grep -q dam_meta " +
                log +
                " && break; sleep 0.1\n"
                "done\n"
                "kill -INT $pid; wait $pid; echo \"exit=$?\"\n");
  CommandResult r = RunShell("sh " + (dir_ / "interrupt.sh").string());
  std::ifstream log_file(log);
  std::stringstream stderr_text;
  stderr_text << log_file.rdbuf();
  EXPECT_THAT(r.output, HasSubstr("exit=7")) << stderr_text.str();
  EXPECT_THAT(stderr_text.str(), HasSubstr("CANCELLED"));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "report.json"));
}

TEST_F(CliTest, LocalDefenseNeedsAnArchitectureFile) {
  testing::WriteDefenseWorld(dir_.string());
  WriteText("job.yaml", testing::DefenseJobYaml("dam", "tiny", "  steps: 1\n"));
  CommandResult r = RunCli("merge --config " + (dir_ / "job.yaml").string() +
                           " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("architecture: no file tiny"));
  EXPECT_FALSE(fs::exists(dir_ / "out" / "model.safetensors"));
}

TEST_F(CliTest, LocalDefenseBadParameterNamesLine) {
  testing::WriteDefenseWorld(dir_.string());
  WriteText("job.yaml",
            testing::DefenseJobYaml("dam", "tiny.pt", "  steps: ten\n"));
  CommandResult r = RunCli("merge --config " + (dir_ / "job.yaml").string() +
                           " --out " + (dir_ / "out").string());
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("line 9: parameters.steps: expected an "
                                  "integer, got \"ten\""));
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

}  // namespace
}  // namespace mergeguard
