// DAM end to end on the tiny benchmark preset: a BadMerging-attacked
// scenario is built in-process, then DAM's merge must carry less of the
// backdoor than Task Arithmetic's while keeping clean accuracy.

#include <torch/torch.h>

#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "bench/dam_rows.h"
#include "bench/merge_table.h"
#include "bench/scenario_builder.h"
#include "bench/scenario_eval.h"
#include "core/checkpoint.h"
#include "core/dam.h"
#include "core/merge.h"
#include "core/scenario.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class DamEndToEndTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    std::random_device random;
    root_ = new fs::path(fs::temp_directory_path() /
                         absl::StrCat("dam_e2e_", random(), random()));
    fs::create_directories(*root_);
    bench::BuildOptions options;
    options.preset = bench::Preset::kTiny;
    options.architecture = bench::Architecture::kCnn;
    options.attack.kind = bench::AttackKind::kBadMerging;
    // The tiny preset's defaults: mnist compromised, target 0, seed 0.
    options.threads = 2;
    options.out_dir = (*root_ / "scenario").string();
    auto result = bench::BuildScenario(options);
    ASSERT_TRUE(result.ok()) << result.status();
    scenario_ = new Scenario(result->scenario);
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
    delete scenario_;
  }

  static std::vector<MergeInput> BackdooredInputs() {
    std::vector<MergeInput> inputs;
    for (const ScenarioTask& task : scenario_->tasks) {
      inputs.push_back({task.name, scenario_->Path(task.checkpoint), 1.0});
    }
    return inputs;
  }

  static bench::ModelEvaluation Evaluate(const std::string& path) {
    auto evaluation = bench::EvaluateModelFile(*scenario_, path);
    EXPECT_TRUE(evaluation.ok()) << evaluation.status();
    return evaluation.ok() ? *evaluation : bench::ModelEvaluation();
  }

  static fs::path* root_;
  static Scenario* scenario_;
};

fs::path* DamEndToEndTest::root_ = nullptr;
Scenario* DamEndToEndTest::scenario_ = nullptr;

// The objective is run G (docs/dam.md), not the reference's defaults, which
// leave the masks where they start in 150 steps. Not robust: on the tiny
// scenario with fashion compromised (target 3, seed 5) the same setting
// raises the ASR above TA's (61.7% vs 41.7%, docs/dam.md), so this checks
// that the defense works where it is documented to, not that it always does.
TEST_F(DamEndToEndTest, DamCarriesLessBackdoorThanTaskArithmetic) {
  ASSERT_NE(scenario_, nullptr);
  const std::string ta_path = (*root_ / "ta.safetensors").string();
  MergeOptions ta;
  ta.method = MergeMethod::kTaskArithmetic;
  ASSERT_TRUE(
      Merge(scenario_->Path(scenario_->base), BackdooredInputs(), ta_path, ta)
          .ok());
  bench::ModelEvaluation ta_eval = Evaluate(ta_path);
  ASSERT_EQ(ta_eval.asr.size(), 1u);

  auto tasks =
      bench::ScenarioDataDependentTasks(*scenario_, BackdooredInputs());
  ASSERT_TRUE(tasks.ok()) << tasks.status();
  DamOptions options;
  options.steps = 150;
  options.adamerging_steps = 50;
  options.backdoor_loss = BackdoorLoss::kAnchored;
  options.beta = 1.0;
  options.detection_mask_learning_rate = 0.02;
  options.trigger_learning_rate = 0.01;
  // More intra-op threads than free cores slows LibTorch's CPU kernels by an
  // order of magnitude on a loaded machine.
  options.threads = 1;
  const std::string dam_path = (*root_ / "dam.safetensors").string();
  auto dam = DamMergeFiles(scenario_->Path(scenario_->architecture.file),
                           scenario_->Path(scenario_->base), *tasks, dam_path,
                           options);
  ASSERT_TRUE(dam.ok()) << dam.status();
  bench::ModelEvaluation dam_eval = Evaluate(dam_path);
  ASSERT_EQ(dam_eval.asr.size(), 1u);
  std::cout << "TA: accuracy " << ta_eval.mean_accuracy << ", ASR "
            << ta_eval.asr[0].asr << "; DAM: accuracy "
            << dam_eval.mean_accuracy << ", ASR " << dam_eval.asr[0].asr
            << ", M2 flags " << dam->report.m2_flagged_fraction << ", "
            << dam->report.seconds_per_outer_step << " s/outer step\n";
  // The attack works on the undefended merge.
  EXPECT_GT(ta_eval.asr[0].asr, 0.3);
  EXPECT_LT(dam_eval.asr[0].asr, ta_eval.asr[0].asr);
  EXPECT_GT(dam_eval.mean_accuracy, ta_eval.mean_accuracy - 0.05);
}

TEST_F(DamEndToEndTest, DefenseRowsReportAccuracyAttackAndCosts) {
  ASSERT_NE(scenario_, nullptr);
  bench::DefenseRowOptions options;
  options.adamerging.steps = 5;
  options.adamerging.threads = 1;
  options.dam.steps = 4;
  options.dam.adamerging_steps = 3;
  options.dam.threads = 1;
  auto rows = bench::RunDefenseRows(*scenario_, options);
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 2u);
  EXPECT_EQ((*rows)[0].row.method, "AdaMerging");
  EXPECT_EQ((*rows)[1].row.method, "DAM");
  for (const bench::DefenseRow& row : *rows) {
    EXPECT_GT(row.row.clean.mean_accuracy, 0.2);
    EXPECT_GT(row.row.backdoored.mean_accuracy, 0.2);
    EXPECT_EQ(row.row.backdoored.asr.size(), 1u);
    EXPECT_GT(row.seconds_per_step, 0.0);
    EXPECT_GT(row.peak_rss_bytes, 0);
  }
  EXPECT_EQ((*rows)[1].steps, 4);
  std::string text = bench::DefenseRowsToText(*scenario_, *rows);
  EXPECT_THAT(text, HasSubstr("peak RSS"));
  EXPECT_THAT(text, HasSubstr("ASR(mnist)"));
}

}  // namespace
}  // namespace mergeguard
