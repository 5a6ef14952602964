#include "client/merge_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mergeguard {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Pair;

absl::StatusOr<MergeConfig> Parse(const std::string& yaml) {
  return ParseMergeConfig(yaml, "/cfg");
}

TEST(MergeConfigTest, ParsesTiesWithParameters) {
  absl::StatusOr<MergeConfig> config = Parse(R"(method: ties
base: base.safetensors
models:
  - {name: mnist, path: a.safetensors, weight: 2}
  - path: /abs/b.safetensors
parameters:
  lambda: 0.7
  top_k: 10
  trim_scope: tensor
  disjoint: sum
dtype: bf16
compute_dtype: float64
threads: 3
shard_size: 64MiB
)");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->base, "/cfg/base.safetensors");
  ASSERT_EQ(config->models.size(), 2u);
  EXPECT_EQ(config->models[0].name, "mnist");
  EXPECT_EQ(config->models[0].path, "/cfg/a.safetensors");
  EXPECT_EQ(config->models[0].weight, 2.0);
  EXPECT_EQ(config->models[1].name, "b");  // defaults to the file stem
  EXPECT_EQ(config->models[1].path, "/abs/b.safetensors");
  EXPECT_EQ(config->options.method, MergeMethod::kTies);
  EXPECT_DOUBLE_EQ(config->options.lambda, 0.7);
  EXPECT_DOUBLE_EQ(config->options.ties.top_k_percent, 10);
  EXPECT_EQ(config->options.ties.trim_scope, TrimScope::kTensor);
  EXPECT_EQ(config->options.ties.disjoint, DisjointMode::kSum);
  EXPECT_EQ(config->options.output_dtype, DType::kBF16);
  EXPECT_TRUE(config->options.compute_in_double);
  EXPECT_EQ(config->options.threads, 3);
  EXPECT_EQ(config->options.writer.max_shard_bytes, 64ull << 20);
}

TEST(MergeConfigTest, DefaultsLeaveLambdaToTheMethod) {
  absl::StatusOr<MergeConfig> config =
      Parse("method: task_arithmetic\nbase: b\nmodels: [x, y]\n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_TRUE(std::isnan(config->options.lambda));
  EXPECT_EQ(config->options.head_prefix, "head.");
}

// DefenseJob returns a job file for `method` over two tasks with the given
// `parameters:` block (lines indented by two). The block starts on line 8.
std::string DefenseJob(const std::string& method, const std::string& block) {
  return "method: " + method +
         "\n"
         "architecture: tiny.pt\n"
         "base: base.safetensors\n"
         "models:\n"
         "  - {name: a, path: a.safetensors, calibration: a_cal.safetensors}\n"
         "  - {name: b, path: b.safetensors, calibration: b_cal.safetensors}\n"
         "parameters:\n" +
         block;
}

TEST(MergeConfigTest, DamParametersAreKeptAsText) {
  absl::StatusOr<MergeConfig> config =
      Parse(DefenseJob("dam",
                       "  steps: 20\n"
                       "  granularity: layer_wise\n"
                       "  final_mask: hard\n"
                       "  reset_lambda_each_step: true\n"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->method, JobMethod::kDam);
  EXPECT_EQ(config->architecture, "/cfg/tiny.pt");
  EXPECT_EQ(config->calibration.at("a"), "/cfg/a_cal.safetensors");
  EXPECT_EQ(config->calibration.at("b"), "/cfg/b_cal.safetensors");
  EXPECT_THAT(
      config->defense_parameters,
      ElementsAre(Pair("final_mask", "hard"), Pair("granularity", "layer_wise"),
                  Pair("reset_lambda_each_step", "true"), Pair("steps", "20")));
}

TEST(MergeConfigTest, AdaMergingParametersAndRegisteredArchitecture) {
  absl::StatusOr<MergeConfig> config = Parse(
      "method: adamerging\narchitecture: tiny\nbase: b\nmodels:\n"
      "  - {path: x, calibration: x_cal}\n"
      "parameters: {steps: 5, learning_rate: 0.01}\n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->method, JobMethod::kAdaMerging);
  // A bare name is a server's registered architecture, not a path.
  EXPECT_EQ(config->architecture, "tiny");
  EXPECT_THAT(config->defense_parameters,
              ElementsAre(Pair("learning_rate", "0.01"), Pair("steps", "5")));
}

TEST(MergeConfigTest, LfpmTriggerOptionsNestAndPrefixesAreAList) {
  absl::StatusOr<MergeConfig> config =
      Parse(DefenseJob("lfpm",
                       "  mode: peft\n"
                       "  layer_prefixes: [fc1., fc2.]\n"
                       "  merge_lambda: 0.5\n"
                       "  trigger:\n"
                       "    scan_steps: 20\n"
                       "    rescan_after: false\n"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->defense_parameters,
              ElementsAre(Pair("layer_prefixes", "fc1.,fc2."),
                          Pair("merge_lambda", "0.5"), Pair("mode", "peft"),
                          Pair("trigger.rescan_after", "false"),
                          Pair("trigger.scan_steps", "20")));

  // A block list, and the dotted name written flat, work too.
  config = Parse(DefenseJob("lfpm",
                            "  layer_prefixes:\n"
                            "    - fc1.\n"
                            "    - fc2.\n"
                            "  trigger.scan_steps: 2\n"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->defense_parameters,
              ElementsAre(Pair("layer_prefixes", "fc1.,fc2."),
                          Pair("trigger.scan_steps", "2")));
}

TEST(MergeConfigTest, DeviceIsCheckedWhereTheJobRuns) {
  // A server may have the GPU this client lacks.
  absl::StatusOr<MergeConfig> config =
      Parse(DefenseJob("dam", "  device: cuda\n"));
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(config->defense_parameters.at("device"), "cuda");
}

TEST(MergeConfigTest, DataFreeMergesHaveNoDefenseParameters) {
  absl::StatusOr<MergeConfig> config =
      Parse("method: ties\nbase: b\nmodels: [x]\nparameters: {top_k: 5}\n");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_THAT(config->defense_parameters, IsEmpty());
  EXPECT_DOUBLE_EQ(config->options.ties.top_k_percent, 5);
}

TEST(MergeConfigTest, DefenseParameterTableListsDefaults) {
  absl::StatusOr<std::string> markdown =
      DefenseParameterTable(JobMethod::kDam, /*markdown=*/true);
  ASSERT_TRUE(markdown.ok()) << markdown.status();
  EXPECT_THAT(*markdown, HasSubstr("| Parameter | Type | Default |"));
  EXPECT_THAT(*markdown, HasSubstr("| `steps` | `integer` | `1000` |"));
  EXPECT_THAT(*markdown,
              HasSubstr("| `final_mask` | "
                        "`expected\\|sample\\|hard\\|hard_detection` |"));
  absl::StatusOr<std::string> text =
      DefenseParameterTable(JobMethod::kLfpm, /*markdown=*/false);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_THAT(*text, HasSubstr("trigger.scan_steps"));
  EXPECT_THAT(*text, HasSubstr("merge_lambda"));
  EXPECT_FALSE(DefenseParameterTable(JobMethod::kTies, false).ok());
}

struct BadConfig {
  const char* yaml;
  const char* expected;  // substring of the error, with the line
};

class BadConfigTest : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigTest, NamesFieldAndLine) {
  absl::StatusOr<MergeConfig> config = Parse(GetParam().yaml);
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(config.status().message()),
              HasSubstr(GetParam().expected));
}

INSTANTIATE_TEST_SUITE_P(
    Errors, BadConfigTest,
    ::testing::Values(
        BadConfig{"method: ta\nbase: b\nmodels: [x]\nparameters:\n  lamda: 1\n",
                  "line 5: parameters.lamda: unknown parameter"},
        BadConfig{"method: ties\nbase: b\nmodels:\n  - {path: x, weight: "
                  "heavy}\n",
                  "line 4: models[0].weight: expected a number, got "
                  "\"heavy\""},
        BadConfig{"method: blend\nbase: b\nmodels: [x]\n", "line 1: method"},
        BadConfig{"method: ties\nbase: b\nmodels: [x]\nparameters: {gamma: "
                  "0.1}\n",
                  "line 4: parameters.gamma: does not apply to method ties"},
        BadConfig{"method: ties\nbase: b\nmodels: [x]\nparameters:\n  top_k: "
                  "0\n",
                  "line 5: parameters.top_k: must be in (0, 100]"},
        BadConfig{"method: dare\nbase: b\nmodels: [x]\nparameters:\n  "
                  "drop_rate: 1.5\n",
                  "line 5: parameters.drop_rate: must be in [0, 1]"},
        BadConfig{"method: ta\nmodels: [x]\n", "base: is required"},
        BadConfig{"method: ta\nbase: b\n", "models: is required"},
        BadConfig{"method: ta\nbase: b\nmodels: []\n",
                  "line 3: models: expected a non-empty list"},
        BadConfig{"method: ta\nbase: b\nmodels: [a/x, b/x]\n",
                  "duplicate task name \"x\""},
        BadConfig{"method: ta\nbase: b\nmodels: [x]\nmodles: [y]\n",
                  "line 4: modles: unknown field"},
        BadConfig{"method: ta\nbase: b\nmodels:\n  - {path: x, colour: red}\n",
                  "line 4: models[0].colour: unknown field"},
        BadConfig{"method: ta\nbase: b\nmodels: [x]\nshard_size: 3 parsecs\n",
                  "line 4: shard_size: unknown size unit"},
        BadConfig{"method: ta\nbase: [b\nmodels: [x]\n", "YAML syntax error"},
        BadConfig{"method: ta\nbase: b\nmodels: [x]\ndtype: int8\n",
                  "line 4: dtype: expected F32, F16, BF16 or F64"},
        BadConfig{
            "method: ties\nbase: b\nmodels: [x]\nparameters:\n"
            "  steps: 3\n",
            "line 5: parameters.steps: unknown parameter; ties accepts"}));

// Errors in the parameters of AdaMerging, DAM and LFPM; the block starts on
// line 8 (DefenseJob).
struct BadDefenseParameters {
  const char* method;
  const char* block;
  const char* expected;
};

class BadDefenseParametersTest
    : public ::testing::TestWithParam<BadDefenseParameters> {};

TEST_P(BadDefenseParametersTest, NamesParameterAndLine) {
  absl::StatusOr<MergeConfig> config =
      Parse(DefenseJob(GetParam().method, GetParam().block));
  ASSERT_FALSE(config.ok());
  EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(config.status().message()),
              HasSubstr(GetParam().expected));
}

INSTANTIATE_TEST_SUITE_P(
    Errors, BadDefenseParametersTest,
    ::testing::Values(
        BadDefenseParameters{
            "dam", "  beta: 0.2\n  steps: ten\n",
            "line 9: parameters.steps: expected an integer, got \"ten\""},
        BadDefenseParameters{
            "dam", "  stepz: 3\n",
            "line 8: parameters.stepz: unknown parameter for method dam; "
            "expected one of granularity"},
        BadDefenseParameters{"adamerging", "  adamerging_steps: 3\n",
                             "line 8: parameters.adamerging_steps: unknown "
                             "parameter for method adamerging"},
        BadDefenseParameters{"lfpm", "  trigger:\n    scan_stepz: 3\n",
                             "line 9: parameters.trigger.scan_stepz: unknown "
                             "parameter for method lfpm"},
        BadDefenseParameters{"lfpm", "  trigger: {scan_steps: many}\n",
                             "line 8: parameters.trigger.scan_steps: expected "
                             "an integer, got \"many\""},
        BadDefenseParameters{"dam", "  steps: -1\n",
                             "line 8: parameters.steps: dam: steps must be "
                             ">= 0"},
        BadDefenseParameters{"dam", "  final_mask: soft\n",
                             "line 8: parameters.final_mask: expected "
                             "expected, sample, hard, hard_detection, got "
                             "\"soft\""},
        BadDefenseParameters{"lfpm", "  steps: [1, 2]\n",
                             "line 8: parameters.steps: expected a single "
                             "value, got a list"},
        BadDefenseParameters{"lfpm", "  layer_prefixes: [fc1, [fc2]]\n",
                             "line 8: parameters.layer_prefixes: expected a "
                             "list of names"},
        BadDefenseParameters{"lfpm", "  merge_lambda: big\n",
                             "line 8: parameters.merge_lambda: expected a "
                             "finite number, got \"big\""},
        BadDefenseParameters{"lfpm", "  steps:\n",
                             "line 8: parameters.steps: expected a value"},
        BadDefenseParameters{"lfpm",
                             "  steps: 2\n  trigger.scan_steps: 1\n"
                             "  trigger: {scan_steps: 2}\n",
                             "line 10: parameters.trigger.scan_steps: is "
                             "given twice"},
        // Neither entry is wrong alone: the block is blamed.
        BadDefenseParameters{"lfpm", "  mode: peft\n  lora_rank: 0\n",
                             "line 8: parameters: LFPM PEFT mode needs "
                             "lora_rank >= 1"},
        BadDefenseParameters{"dam", "  device: tpu\n",
                             "line 8: parameters.device: "},
        BadDefenseParameters{"dam", "  steps: 3\nshard_size: 1GB\n",
                             "line 9: shard_size: does not apply to method "
                             "dam"}));

TEST(MergeConfigTest, DefenseMethodsNeedArchitectureAndCalibration) {
  absl::StatusOr<MergeConfig> config =
      Parse("method: dam\nbase: b\nmodels:\n  - {path: x, calibration: c}\n");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()),
              HasSubstr("architecture: is required for method dam"));
  config = Parse("method: lfpm\narchitecture: t.pt\nbase: b\nmodels: [x]\n");
  ASSERT_FALSE(config.ok());
  EXPECT_THAT(std::string(config.status().message()),
              HasSubstr("task \"x\" needs a calibration set for lfpm"));
}

}  // namespace
}  // namespace mergeguard
