// End to end on the tiny preset: build a scenario, evaluate models on it,
// run the merge table, rebuild from the configuration cache, and check that
// a seeded build is reproducible byte for byte.

#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "bench/merge_table.h"
#include "bench/scenario_builder.h"
#include "bench/scenario_eval.h"
#include "core/merge.h"
#include "core/scenario.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

fs::path NewRoot() {
  std::random_device random;
  fs::path root = fs::temp_directory_path() /
                  absl::StrCat("bench_e2e_", random(), random());
  fs::create_directories(root);
  return root;
}

BuildOptions TinyOptions(const fs::path& root, const std::string& out) {
  BuildOptions options;
  options.preset = Preset::kTiny;
  options.architecture = Architecture::kCnn;
  options.attack.kind = AttackKind::kBadMerging;
  options.attack.compromised = {"fashion"};
  options.attack.target_class = 3;
  options.seed = 5;
  options.threads = 2;
  options.out_dir = (root / out).string();
  options.cache_dir = (root / "cache").string();
  return options;
}

// Each check below runs on one freshly built tiny scenario. ctest runs every
// TEST in its own process, so the build is shared by steps, not by tests.
void CheckValidScenario(const Scenario* scenario) {
  auto loaded = LoadScenario(scenario->dir);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  ASSERT_EQ(loaded->tasks.size(), 3u);
  EXPECT_EQ(loaded->architecture.name, "cnn");
  const ScenarioTask* fashion = loaded->FindTask("fashion");
  ASSERT_NE(fashion, nullptr);
  EXPECT_TRUE(fashion->compromised);
  EXPECT_NE(fashion->checkpoint, fashion->clean_checkpoint);
  EXPECT_TRUE(fashion->finetuned_asr.has_value());
  const ScenarioTask* mnist = loaded->FindTask("mnist");
  EXPECT_FALSE(mnist->compromised);
  EXPECT_EQ(mnist->checkpoint, mnist->clean_checkpoint);
  // Fine-tunes learn something even in the tiny preset.
  EXPECT_GT(mnist->clean_finetuned_accuracy, 0.5);
  ASSERT_TRUE(loaded->attack.has_value());
  EXPECT_EQ(loaded->attack->trigger.pattern, "learned");
  auto trigger = LoadScenarioTrigger(*loaded);
  ASSERT_TRUE(trigger.ok()) << trigger.status();
  EXPECT_EQ(trigger->pattern.sizes(), (std::vector<int64_t>{1, 4, 4}));
  auto calibration = LoadLabeledImages(loaded->Path(mnist->calibration));
  ASSERT_TRUE(calibration.ok());
  EXPECT_LE(calibration->size(), 512);
  // The architecture file is TorchScript and matches the checkpoints.
  auto model = Model::Load(loaded->Path(loaded->architecture.file));
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_TRUE(
      (*model)->LoadBackboneFromPath(loaded->Path(mnist->checkpoint)).ok());
}

void CheckEvalOfTaskCheckpoints(const Scenario* scenario) {
  const ScenarioTask* mnist = scenario->FindTask("mnist");
  auto evaluation =
      EvaluateModelFile(*scenario, scenario->Path(mnist->checkpoint));
  ASSERT_TRUE(evaluation.ok()) << evaluation.status();
  ASSERT_EQ(evaluation->tasks.size(), 3u);
  // A task checkpoint has no `<task>/head.*`: heads come from the scenario.
  EXPECT_EQ(evaluation->tasks[0].head_source, "scenario");
  EXPECT_DOUBLE_EQ(evaluation->tasks[0].accuracy,
                   mnist->clean_finetuned_accuracy);
  EXPECT_DOUBLE_EQ(evaluation->tasks[0].normalized_accuracy, 1.0);
  ASSERT_EQ(evaluation->asr.size(), 1u);
  EXPECT_EQ(evaluation->asr[0].task, "fashion");
  EXPECT_EQ(evaluation->asr[0].target, 3);

  // The backdoored checkpoint alone reproduces the build's measurements.
  const ScenarioTask* fashion = scenario->FindTask("fashion");
  auto backdoored =
      EvaluateModelFile(*scenario, scenario->Path(fashion->checkpoint));
  ASSERT_TRUE(backdoored.ok());
  EXPECT_DOUBLE_EQ(backdoored->tasks[1].accuracy, fashion->finetuned_accuracy);
  EXPECT_DOUBLE_EQ(backdoored->asr[0].asr, *fashion->finetuned_asr);
  // What goes to the target without the trigger is among the fine-tune's
  // errors on fashion (the tiny scenario's fine-tune may send everything
  // there, so the rate is not compared with the ASR).
  const TaskAttack& attack = backdoored->asr[0];
  EXPECT_GE(attack.untriggered, 0.0);
  const double test_size = static_cast<double>(
      LoadLabeledImages(scenario->Path(fashion->test))->size());
  EXPECT_LE(attack.untriggered * attack.evaluated,
            (1.0 - backdoored->tasks[1].accuracy) * test_size + 1e-9);

  nlohmann::json json = nlohmann::json::parse(
      EvaluationToJson(*scenario, "m.safetensors", *evaluation));
  EXPECT_EQ(json["tasks"][0]["name"], "mnist");
  EXPECT_TRUE(json["tasks"][0]["accuracy"].is_number());
  EXPECT_TRUE(json["mean_accuracy"].is_number());
  EXPECT_EQ(json["asr"][0]["task"], "fashion");
  EXPECT_EQ(json["asr"][0]["target"], 3);
  EXPECT_TRUE(json["asr"][0]["asr"].is_number());
  EXPECT_TRUE(json["asr"][0]["untriggered"].is_number());
}

void CheckEvalOfMergedModel(const Scenario* scenario, const fs::path* root) {
  std::vector<MergeInput> inputs;
  for (const ScenarioTask& task : scenario->tasks) {
    inputs.push_back({task.name, scenario->Path(task.checkpoint), 1.0});
  }
  const std::string merged = (*root / "ta.safetensors").string();
  auto report = Merge(scenario->Path(scenario->base), inputs, merged, {});
  ASSERT_TRUE(report.ok()) << report.status();
  auto evaluation = EvaluateModelFile(*scenario, merged);
  ASSERT_TRUE(evaluation.ok()) << evaluation.status();
  for (const TaskAccuracy& task : evaluation->tasks) {
    EXPECT_EQ(task.head_source, "model");
    EXPECT_GT(task.accuracy, 0.2) << task.name;
  }
  // A model that does not fit the architecture is refused.
  const std::string wrong = (*root / "wrong.safetensors").string();
  ASSERT_TRUE(SaveTensors(wrong, {{"conv1.weight", torch::zeros({1})}}).ok());
  EXPECT_EQ(EvaluateModelFile(*scenario, wrong).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

void CheckTable(const Scenario* scenario) {
  auto rows = RunTable(*scenario, UndefendedProducers());
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 2u);
  EXPECT_EQ((*rows)[0].method, "TA");
  EXPECT_EQ((*rows)[1].method, "TIES");
  for (const TableRow& row : *rows) {
    EXPECT_GT(row.clean.mean_accuracy, 0.2);
    EXPECT_GT(row.backdoored.mean_accuracy, 0.2);
    ASSERT_EQ(row.backdoored.asr.size(), 1u);
  }
  const std::string text = TableToText(*scenario, *rows);
  EXPECT_THAT(text, HasSubstr("TIES"));
  EXPECT_THAT(text, HasSubstr("ASR(fashion)"));
  nlohmann::json json = nlohmann::json::parse(TableToJson(*scenario, *rows));
  EXPECT_EQ(json["rows"][0]["method"], "TA");
  // Row producers are pluggable: a defense is one more entry.
  std::vector<RowProducer> producers = {
      {"BASE", [](const Scenario& scenario, const std::vector<MergeInput>&,
                  const std::string& output) {
         std::error_code error;
         fs::copy_file(scenario.Path(scenario.base), output, error);
         return error ? absl::InternalError(error.message()) : absl::OkStatus();
       }}};
  auto base_rows = RunTable(*scenario, producers);
  ASSERT_TRUE(base_rows.ok()) << base_rows.status();
  EXPECT_DOUBLE_EQ((*base_rows)[0].clean.mean_accuracy,
                   (*base_rows)[0].backdoored.mean_accuracy);
}

void CheckReuseAndArguments(const Scenario* scenario, const fs::path* root) {
  auto again = BuildScenario(TinyOptions(*root, "badmerging"));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->reused);
  EXPECT_EQ(again->scenario.config_hash, scenario->config_hash);
  BuildOptions other = TinyOptions(*root, "badmerging");
  other.attack.target_class = 4;
  EXPECT_NE(ConfigHash(other), scenario->config_hash);
  other.attack.target_class = 11;
  other.out_dir = (*root / "bad-target").string();
  EXPECT_EQ(BuildScenario(other).status().code(),
            absl::StatusCode::kInvalidArgument);
  other.attack.target_class = 0;
  other.attack.compromised = {"greek"};
  EXPECT_EQ(BuildScenario(other).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(BenchEndToEndTest, BuildEvalTableAndReuseTinyScenario) {
  const fs::path root = NewRoot();
  auto result = BuildScenario(TinyOptions(root, "badmerging"));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->reused);
  const Scenario& scenario = result->scenario;
  {
    SCOPED_TRACE("scenario");
    CheckValidScenario(&scenario);
  }
  {
    SCOPED_TRACE("eval of task checkpoints");
    CheckEvalOfTaskCheckpoints(&scenario);
  }
  {
    SCOPED_TRACE("eval of a merged model");
    CheckEvalOfMergedModel(&scenario, &root);
  }
  {
    SCOPED_TRACE("table");
    CheckTable(&scenario);
  }
  {
    SCOPED_TRACE("reuse");
    CheckReuseAndArguments(&scenario, &root);
  }
  fs::remove_all(root);
}

// Schedule overrides reach the resolved configuration and its hash, so a
// scenario built with them never reuses the preset's cached stages.
TEST(BenchEndToEndTest, ScheduleOverridesChangeConfigAndHash) {
  const BuildOptions preset =
      TinyOptions(fs::temp_directory_path(), "never-built");
  const PresetConfig preset_config = ResolvedConfig(preset);
  EXPECT_FALSE(preset_config.train_head);

  BuildOptions train_head = preset;
  train_head.finetune_train_head = true;
  EXPECT_TRUE(ResolvedConfig(train_head).train_head);
  EXPECT_NE(ConfigHash(train_head), ConfigHash(preset));

  BuildOptions pretrain = preset;
  pretrain.pretrain_steps = preset_config.pretrain.steps * 2;
  EXPECT_EQ(ResolvedConfig(pretrain).pretrain.steps,
            preset_config.pretrain.steps * 2);
  EXPECT_NE(ConfigHash(pretrain), ConfigHash(preset));
  EXPECT_NE(ConfigHash(pretrain), ConfigHash(train_head));

  // The shard count shapes the base; the thread count does not.
  BuildOptions shards = preset;
  shards.pretrain_shards = 1;
  EXPECT_NE(ConfigHash(shards), ConfigHash(preset));
  BuildOptions threads = preset;
  threads.threads = preset.threads + 1;
  EXPECT_EQ(ConfigHash(threads), ConfigHash(preset));
  BuildOptions too_many = preset;
  too_many.pretrain_shards =
      static_cast<int>(preset_config.pretrain.batch_size) + 1;
  auto refused = BuildScenario(too_many);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("--pretrain-shards"));
}

// Without the stage cache, the same seed gives the same bytes, whatever
// the thread count.
TEST(BenchEndToEndTest, SeededBuildsAreReproducible) {
  const fs::path root = NewRoot();
  BuildOptions first = TinyOptions(root, "repro-a");
  first.attack.kind = AttackKind::kBadNets;
  first.cache_dir.clear();
  BuildOptions second = first;
  second.out_dir = (root / "repro-b").string();
  second.threads = 1;
  auto a = BuildScenario(first);
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = BuildScenario(second);
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(a->scenario.files.size(), b->scenario.files.size());
  for (size_t i = 0; i < a->scenario.files.size(); ++i) {
    if (a->scenario.files[i].path == "provenance.json") continue;
    EXPECT_EQ(a->scenario.files[i].sha256, b->scenario.files[i].sha256)
        << a->scenario.files[i].path;
  }
  const ScenarioTask* fashion = a->scenario.FindTask("fashion");
  EXPECT_EQ(a->scenario.attack->trigger.pattern, "white");
  EXPECT_NE(fashion->checkpoint, fashion->clean_checkpoint);
  fs::remove_all(root);
}

}  // namespace
}  // namespace mergeguard::bench
