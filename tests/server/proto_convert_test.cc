#include "server/proto_convert.h"

#include <string>

#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "server/status_util.h"

namespace mergeguard {
namespace {

using ::testing::HasSubstr;

TEST(ProtoConvertTest, SpecRoundTrips) {
  v1::JobSpec proto;
  proto.set_method(v1::METHOD_DARE);
  proto.set_base_sha256(Sha256Hex("base"));
  v1::JobInput* input = proto.add_inputs();
  input->set_name("a");
  input->set_model_sha256(Sha256Hex("a"));
  v1::JobInput* adapter = proto.add_inputs();
  adapter->set_name("b");
  adapter->set_weight(0.5);
  adapter->mutable_lora()->set_weights_sha256(Sha256Hex("w"));
  adapter->mutable_lora()->set_config_sha256(Sha256Hex("c"));
  proto.set_lambda(0.8);
  proto.mutable_dare()->set_drop_rate(0.5);
  proto.mutable_dare()->set_combine(v1::DareParameters::COMBINE_TIES);
  proto.mutable_dare()->set_seed(7);
  proto.mutable_ties()->set_top_k_percent(15);
  proto.set_output_dtype(v1::OUTPUT_DTYPE_F16);

  auto spec = JobSpecFromProto(proto);
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->method, JobMethod::kDare);
  EXPECT_EQ(spec->inputs[0].weight, 1.0);
  EXPECT_TRUE(spec->inputs[1].is_lora());
  EXPECT_EQ(spec->merge.dare.combine, DareCombine::kTies);
  EXPECT_EQ(spec->merge.ties.top_k_percent, 15);
  EXPECT_EQ(spec->merge.head_prefix, "head.");
  EXPECT_TRUE(ValidateJobSpec(*spec).ok());

  v1::JobSpec back;
  JobSpecToProto(*spec, &back);
  auto again = JobSpecFromProto(back);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(JobSpecToJson(*again), JobSpecToJson(*spec));
}

TEST(ProtoConvertTest, RejectsWhatTheYamlFileRejects) {
  v1::JobSpec proto;
  EXPECT_THAT(std::string(JobSpecFromProto(proto).status().message()),
              HasSubstr("method: is required"));
  proto.set_method(v1::METHOD_TASK_ARITHMETIC);
  proto.mutable_ties()->set_top_k_percent(10);
  EXPECT_THAT(std::string(JobSpecFromProto(proto).status().message()),
              HasSubstr("ties: does not apply to method task_arithmetic"));
  proto.clear_ties();
  proto.set_method(v1::METHOD_MODEL_STOCK);
  proto.set_lambda(1);
  EXPECT_THAT(std::string(JobSpecFromProto(proto).status().message()),
              HasSubstr("lambda: does not apply"));
  proto.clear_lambda();
  proto.add_inputs()->set_name("x");
  EXPECT_THAT(std::string(JobSpecFromProto(proto).status().message()),
              HasSubstr("inputs[0]: set model_sha256 or lora"));
  proto.set_method(static_cast<v1::Method>(99));
  EXPECT_THAT(std::string(JobSpecFromProto(proto).status().message()),
              HasSubstr("unknown value 99"));
}

TEST(StatusUtilTest, MapsEveryCanonicalCode) {
  for (int code = 0; code <= 16; ++code) {
    absl::Status status(static_cast<absl::StatusCode>(code), "why");
    grpc::Status converted = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(converted.error_code()), code);
    if (code != 0) {
      EXPECT_EQ(converted.error_message(), "why");
    }
  }
  EXPECT_EQ(StatusCodeLabel(grpc::StatusCode::DATA_LOSS), "DATA_LOSS");
}

}  // namespace
}  // namespace mergeguard
