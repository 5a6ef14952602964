#include "core/scenario.h"

#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/tensor_views.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

// Writes a small but complete scenario (files with plausible contents; the
// architecture file is not loaded by LoadScenario) and loads it back.
class ScenarioTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::random_device random;
    dir_ = fs::temp_directory_path() /
           absl::StrCat("scenario_test_", random(), random());
    fs::create_directories(dir_ / "tasks");
    scenario_.dir = dir_.string();
    scenario_.name = "unit";
    scenario_.config_hash = std::string(64, 'a');
    scenario_.config_json = R"({"preset":"unit"})";
    scenario_.architecture = {"cnn", "architecture.pt", {1, 28, 28}, 4, 8};
    scenario_.base = "base.safetensors";
    Write("architecture.pt", "torchscript stand-in");
    ASSERT_TRUE(SaveTensors(scenario_.Path("base.safetensors"),
                            {{"w", torch::zeros({2, 4})}})
                    .ok());
    for (const std::string name : {"mnist", "fashion"}) {
      ScenarioTask task;
      task.name = name;
      task.description = name + " digits";
      task.classes = {"a", "b", "c"};
      const std::string dir = "tasks/" + name;
      fs::create_directories(dir_ / dir);
      task.checkpoint = dir + "/clean.safetensors";
      task.clean_checkpoint = task.checkpoint;
      task.calibration = dir + "/calibration.safetensors";
      task.test = dir + "/test.safetensors";
      task.finetuned_accuracy = task.clean_finetuned_accuracy = 0.9;
      ASSERT_TRUE(SaveTensors(scenario_.Path(task.checkpoint),
                              {{"w", torch::ones({2, 4})},
                               {"head.weight", torch::ones({3, 4})},
                               {"head.bias", torch::zeros({3})}})
                      .ok());
      LabeledImages set{torch::rand({4, 1, 28, 28}),
                        torch::tensor({0, 1, 2, 0}, torch::kInt64)};
      ASSERT_TRUE(
          SaveLabeledImages(scenario_.Path(task.calibration), set).ok());
      ASSERT_TRUE(SaveLabeledImages(scenario_.Path(task.test), set).ok());
      scenario_.tasks.push_back(task);
    }
    scenario_.tasks[1].compromised = true;
    scenario_.tasks[1].checkpoint = "tasks/fashion/backdoored.safetensors";
    scenario_.tasks[1].finetuned_asr = 0.97;
    ASSERT_TRUE(SaveTensors(scenario_.Path(scenario_.tasks[1].checkpoint),
                            {{"w", torch::full({2, 4}, 2.0)},
                             {"head.weight", torch::ones({3, 4})},
                             {"head.bias", torch::zeros({3})}})
                    .ok());
    ScenarioAttack attack;
    attack.kind = "badnets";
    attack.tasks = {"fashion"};
    attack.target_class = 2;
    attack.poison_rate = 0.1;
    attack.trigger = {TriggerKind::kPatch,
                      "trigger.safetensors",
                      "white",
                      4,
                      "bottom_right",
                      23,
                      23,
                      0.0};
    scenario_.attack = attack;
    Trigger trigger;
    trigger.pattern = torch::ones({1, 4, 4});
    ASSERT_TRUE(
        SaveTriggerPattern(scenario_.Path("trigger.safetensors"), trigger)
            .ok());
    ASSERT_TRUE(WriteScenario(&scenario_).ok());
  }

  void TearDown() override { fs::remove_all(dir_); }

  void Write(const std::string& relative, const std::string& text) {
    std::ofstream(dir_ / relative, std::ios::binary) << text;
  }

  nlohmann::json Json() {
    std::ifstream in(dir_ / kScenarioFileName);
    return nlohmann::json::parse(in);
  }
  void WriteJson(const nlohmann::json& json) {
    ASSERT_TRUE(
        WriteFileAtomically((dir_ / kScenarioFileName).string(), json.dump())
            .ok());
  }

  fs::path dir_;
  Scenario scenario_;
};

TEST_F(ScenarioTest, RoundTripsEveryField) {
  auto loaded = LoadScenario(dir_.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->name, "unit");
  ASSERT_EQ(loaded->tasks.size(), 2u);
  EXPECT_EQ(loaded->tasks[0].classes,
            (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(loaded->tasks[1].compromised);
  EXPECT_EQ(loaded->tasks[1].checkpoint,
            "tasks/fashion/backdoored.safetensors");
  EXPECT_DOUBLE_EQ(*loaded->tasks[1].finetuned_asr, 0.97);
  EXPECT_FALSE(loaded->tasks[0].finetuned_asr.has_value());
  ASSERT_TRUE(loaded->attack.has_value());
  EXPECT_EQ(loaded->attack->target_class, 2);
  EXPECT_EQ(loaded->attack->trigger.row, 23);
  EXPECT_EQ(loaded->architecture.input_shape,
            (std::vector<int64_t>{1, 28, 28}));
  // architecture, base, 2 x (checkpoint, calibration, test), backdoored,
  // trigger.
  EXPECT_EQ(loaded->files.size(), 10u);
  EXPECT_NE(loaded->FindTask("mnist"), nullptr);
  EXPECT_EQ(loaded->FindTask("cifar"), nullptr);
  auto trigger = LoadScenarioTrigger(*loaded);
  ASSERT_TRUE(trigger.ok()) << trigger.status();
  EXPECT_EQ(trigger->row, 23);
  EXPECT_TRUE(torch::equal(trigger->pattern, torch::ones({1, 4, 4})));
}

TEST_F(ScenarioTest, TamperedFileIsDataLossNamingTheFile) {
  const fs::path test = dir_ / "tasks/mnist/test.safetensors";
  std::fstream file(test, std::ios::in | std::ios::out | std::ios::binary);
  file.seekp(-1, std::ios::end);
  file.put('\x7f');
  file.close();
  absl::Status status = LoadScenario(dir_.string()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(status.message(), HasSubstr("sha256 mismatch"));
  EXPECT_THAT(status.message(), HasSubstr("tasks/mnist/test.safetensors"));
  // Without digest verification only sizes are checked.
  EXPECT_TRUE(LoadScenario(dir_.string(), {/*verify_digests=*/false}).ok());
}

TEST_F(ScenarioTest, TruncatedAndMissingFiles) {
  fs::resize_file(dir_ / "base.safetensors", 10);
  EXPECT_EQ(LoadScenario(dir_.string()).status().code(),
            absl::StatusCode::kDataLoss);
  fs::remove(dir_ / "base.safetensors");
  absl::Status status = LoadScenario(dir_.string()).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), HasSubstr("base.safetensors"));
  EXPECT_EQ(LoadScenario((dir_ / "nowhere").string()).status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(ScenarioTest, RejectsMalformedDescriptions) {
  const nlohmann::json good = Json();
  auto expect_invalid = [&](nlohmann::json json, const std::string& needle) {
    WriteJson(json);
    absl::Status status = LoadScenario(dir_.string()).status();
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << needle;
    EXPECT_THAT(status.message(), HasSubstr(needle));
  };
  nlohmann::json json = good;
  json["attack"]["target_class"] = 3;
  expect_invalid(json, "attack.target_class");
  json = good;
  json["tasks"][0]["test"] = "../outside.safetensors";
  expect_invalid(json, "\"..\"");
  json = good;
  json["tasks"][1]["name"] = "mnist";
  expect_invalid(json, "duplicate task");
  json = good;
  json["tasks"][0].erase("classes");
  expect_invalid(json, "tasks[0].classes: missing");
  json = good;
  json["format"] = "something-else/9";
  expect_invalid(json, "format");
  json = good;
  json["files"].erase(json["files"].begin());
  expect_invalid(json, "not listed in files");
  json = good;
  json["tasks"][1]["compromised"] = false;
  expect_invalid(json, "not marked compromised");
  json = good;
  json["files"][0]["sha256"] = "xyz";
  expect_invalid(json, "sha256");
  ASSERT_TRUE(WriteFileAtomically((dir_ / kScenarioFileName).string(),
                                  R"({"format": 1, "format": 2})")
                  .ok());
  EXPECT_THAT(LoadScenario(dir_.string()).status().message(),
              HasSubstr("duplicate"));
}

TEST_F(ScenarioTest, WriteScenarioRefusesMissingFiles) {
  fs::remove(dir_ / "trigger.safetensors");
  EXPECT_EQ(WriteScenario(&scenario_).code(), absl::StatusCode::kNotFound);
  Scenario no_attack = scenario_;
  no_attack.attack.reset();
  no_attack.tasks[1].compromised = false;
  EXPECT_TRUE(WriteScenario(&no_attack).ok());
  auto loaded = LoadScenario(dir_.string());
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(LoadScenarioTrigger(*loaded).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace mergeguard
