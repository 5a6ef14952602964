#include "core/job.h"

#include <cmath>
#include <string>

#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;

JobSpec ValidSpec() {
  JobSpec spec;
  spec.method = JobMethod::kTies;
  spec.base_digest = Sha256Hex("base");
  spec.inputs.push_back({"mnist", 1.0, Sha256Hex("a"), "", ""});
  spec.inputs.push_back(
      {"svhn", 0.5, "", Sha256Hex("lora-w"), Sha256Hex("lora-c")});
  spec.merge.lambda = 0.7;
  spec.merge.ties.top_k_percent = 30;
  spec.merge.ties.trim_scope = TrimScope::kTensor;
  spec.merge.ties.disjoint = DisjointMode::kSum;
  spec.merge.output_dtype = DType::kBF16;
  return spec;
}

std::string Error(const JobSpec& spec) {
  return std::string(ValidateJobSpec(spec).message());
}

TEST(JobMethodTest, NamesRoundTrip) {
  for (JobMethod method :
       {JobMethod::kTaskArithmetic, JobMethod::kTies, JobMethod::kDare,
        JobMethod::kBreadcrumbs, JobMethod::kConsensus, JobMethod::kModelStock,
        JobMethod::kWeightedAverage, JobMethod::kDam, JobMethod::kLfpm}) {
    auto parsed = ParseJobMethod(JobMethodName(method));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, method);
  }
  EXPECT_EQ(*ParseJobMethod("ta"), JobMethod::kTaskArithmetic);
  EXPECT_THAT(std::string(ParseJobMethod("magic").status().message()),
              HasSubstr("expected one of"));
  EXPECT_TRUE(IsDataFreeMerge(JobMethod::kModelStock));
  EXPECT_FALSE(IsDataFreeMerge(JobMethod::kDam));
  EXPECT_EQ(FromMergeMethod(ToMergeMethod(JobMethod::kDare)), JobMethod::kDare);
}

TEST(ValidateJobSpecTest, AcceptsAValidSpec) {
  EXPECT_TRUE(ValidateJobSpec(ValidSpec()).ok());
}

TEST(ValidateJobSpecTest, NamesTheBadField) {
  JobSpec spec = ValidSpec();
  spec.inputs.clear();
  EXPECT_THAT(Error(spec), HasSubstr("inputs: at least one"));

  spec = ValidSpec();
  spec.base_digest.clear();
  EXPECT_THAT(Error(spec), HasSubstr("base_sha256: is required"));

  spec = ValidSpec();
  spec.base_digest = "ABC";
  EXPECT_THAT(Error(spec), HasSubstr("base_sha256: expected 64 lowercase hex"));

  spec = ValidSpec();
  spec.inputs[1].name = "mnist";
  EXPECT_THAT(Error(spec), HasSubstr("inputs[1].name: duplicate"));

  spec = ValidSpec();
  spec.inputs[0].name = "a/b";
  EXPECT_THAT(Error(spec), HasSubstr("inputs[0].name"));

  spec = ValidSpec();
  spec.inputs[0].weight = std::nan("");
  EXPECT_THAT(Error(spec), HasSubstr("inputs[0].weight: must be finite"));

  spec = ValidSpec();
  spec.inputs[1].lora_config_digest = "";
  EXPECT_THAT(Error(spec), HasSubstr("inputs[1].lora.config_sha256"));

  spec = ValidSpec();
  spec.merge.ties.top_k_percent = 0;
  EXPECT_THAT(Error(spec),
              HasSubstr("ties.top_k_percent: must be in (0, 100]"));

  spec = ValidSpec();
  spec.method = JobMethod::kDare;
  spec.merge.dare.drop_rate = 1.0;
  EXPECT_THAT(Error(spec), HasSubstr("dare.drop_rate"));

  spec = ValidSpec();
  spec.calibration.push_back({"cifar", Sha256Hex("c")});
  EXPECT_THAT(Error(spec), HasSubstr("calibration[0].task"));
}

TEST(ValidateJobSpecTest, WeightedAverageNeedsNoBaseButLoraDoes) {
  JobSpec spec = ValidSpec();
  spec.method = JobMethod::kWeightedAverage;
  spec.base_digest.clear();
  EXPECT_THAT(Error(spec), HasSubstr("LoRA adapter needs base_sha256"));
  spec.inputs.pop_back();
  EXPECT_TRUE(ValidateJobSpec(spec).ok());
}

TEST(ValidateJobSpecTest, DefensesNeedArchitectureAndCalibration) {
  JobSpec spec = ValidSpec();
  spec.method = JobMethod::kDam;
  EXPECT_THAT(Error(spec), HasSubstr("architecture: is required"));
  spec.architecture = "resnet";
  EXPECT_THAT(Error(spec), HasSubstr("one calibration set per input"));
  spec.calibration = {{"mnist", Sha256Hex("c1")}, {"svhn", Sha256Hex("c2")}};
  EXPECT_EQ(ValidateJobSpec(spec).code(), absl::StatusCode::kUnimplemented);
}

TEST(JobSpecJsonTest, RoundTripsEveryField) {
  JobSpec spec = ValidSpec();
  spec.architecture = "resnet";
  spec.calibration = {{"mnist", Sha256Hex("c1")}};
  spec.merge.head_prefix = "classifier.";
  spec.merge.compute_in_double = true;
  auto parsed = JobSpecFromJson(JobSpecToJson(spec));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(JobSpecToJson(*parsed), JobSpecToJson(spec));
  EXPECT_EQ(parsed->merge.ties.top_k_percent, 30);
  EXPECT_EQ(parsed->merge.ties.trim_scope, TrimScope::kTensor);
  EXPECT_EQ(parsed->merge.ties.disjoint, DisjointMode::kSum);
  EXPECT_EQ(parsed->merge.lambda, 0.7);
  EXPECT_EQ(parsed->merge.output_dtype, DType::kBF16);
  EXPECT_EQ(parsed->inputs[1].lora_weights_digest, Sha256Hex("lora-w"));
  EXPECT_EQ(parsed->calibration[0].task, "mnist");
}

TEST(JobSpecJsonTest, UnsetLambdaStaysUnset) {
  JobSpec spec = ValidSpec();
  spec.merge.lambda = std::nan("");
  auto parsed = JobSpecFromJson(JobSpecToJson(spec));
  ASSERT_TRUE(parsed.ok());
  EXPECT_TRUE(std::isnan(parsed->merge.lambda));
}

TEST(JobSpecJsonTest, RejectsMalformedJson) {
  EXPECT_EQ(JobSpecFromJson("{").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(JobSpecFromJson(R"({"method": "ties"})").status().message()),
      HasSubstr("inputs"));
}

TEST(ReferencedArtifactsTest, ListsEveryDigestWithItsRole) {
  JobSpec spec = ValidSpec();
  spec.calibration = {{"mnist", Sha256Hex("c1")}};
  auto refs = ReferencedArtifacts(spec);
  ASSERT_EQ(refs.size(), 5u);
  EXPECT_EQ(refs[0].field, "base_sha256");
  EXPECT_EQ(refs[2].field, "inputs[1].lora.weights_sha256");
  EXPECT_EQ(refs[2].role, ArtifactRole::kLoraWeights);
  EXPECT_EQ(refs[4].role, ArtifactRole::kCalibration);
}

TEST(RunJobTest, UnknownDigestFailsWithTheResolverError) {
  JobSpec spec = ValidSpec();
  spec.inputs.pop_back();
  auto output = RunJob(spec,
                       [](const std::string&) -> absl::StatusOr<std::string> {
                         return absl::NotFoundError("gone");
                       },
                       "/tmp", {});
  EXPECT_EQ(output.status().code(), absl::StatusCode::kNotFound);
}

TEST(RunJobTest, CancelledBeforeStartDoesNothing) {
  JobSpec spec = ValidSpec();
  spec.inputs.pop_back();
  JobContext context;
  context.is_cancelled = [] { return true; };
  auto output = RunJob(
      spec,
      [](const std::string& digest) -> absl::StatusOr<std::string> {
        return "/nonexistent/" + digest;
      },
      "/tmp", context);
  EXPECT_EQ(output.status().code(), absl::StatusCode::kCancelled);
}

}  // namespace
}  // namespace mergeguard
