#include "client/merge_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace mergeguard {
namespace {

using ::testing::HasSubstr;

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
                  "line 4: dtype: expected F32, F16, BF16 or F64"}));

}  // namespace
}  // namespace mergeguard
