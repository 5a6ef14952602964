// Runs the real `mergeguard` binary: flags, exit codes and a local merge.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/tensor_views.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;
namespace fs = std::filesystem;

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

CommandResult RunCli(const std::string& args) {
  std::string command =
      std::string(MERGEGUARD_BINARY_DIR) + "/bin/mergeguard " + args + " 2>&1";
  CommandResult result;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), pipe)) > 0) {
    result.output.append(buffer, n);
  }
  int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

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

}  // namespace
}  // namespace mergeguard
