#include "core/job.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <string>

#include "core/defense_params.h"
#include "core/merge.h"
#include "core/probe.h"
#include "core/sha256.h"
#include "core/tensor_views.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/core/defense_fixtures.h"

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
  EXPECT_THAT(Error(spec),
              HasSubstr("needs a calibration set for task \"mnist\""));
  spec.calibration = {{"mnist", Sha256Hex("c1")}, {"svhn", Sha256Hex("c2")}};
  // svhn is a LoRA adapter: no head to run.
  EXPECT_THAT(Error(spec), HasSubstr("inputs[1].lora: method dam needs full"));
  spec.inputs[1] = {"svhn", 1.0, Sha256Hex("b"), "", ""};
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << Error(spec);
  spec.calibration[1].task = "mnist";
  EXPECT_THAT(Error(spec), HasSubstr("more than one calibration set"));
}

TEST(ValidateJobSpecTest, DefenseParametersAreCheckedByName) {
  JobSpec spec = ValidSpec();
  spec.method = JobMethod::kLfpm;
  spec.inputs[1] = {"svhn", 1.0, Sha256Hex("b"), "", ""};
  spec.architecture = "cnn";
  spec.calibration = {{"mnist", Sha256Hex("c1")}, {"svhn", Sha256Hex("c2")}};
  spec.defense_parameters = {{"mode", "peft"},
                             {"trigger.scan_steps", "3"},
                             {"merge_lambda", "0.4"},
                             {"layer_prefixes", "fc1., fc2."}};
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << Error(spec);
  spec.defense_parameters["steps"] = "ten";
  EXPECT_THAT(Error(spec),
              HasSubstr("parameters.steps: expected an integer, got \"ten\""));
  spec.defense_parameters.erase("steps");
  spec.defense_parameters["mode"] = "half";
  EXPECT_THAT(Error(spec), HasSubstr("parameters.mode: expected full, peft"));
  spec.defense_parameters = {{"temperature", "0.5"}};
  EXPECT_THAT(Error(spec), HasSubstr("unknown parameter for method lfpm"));
  spec.method = JobMethod::kDam;
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << Error(spec);
  spec.defense_parameters["backdoor_loss"] = "consistency";
  spec.defense_parameters["final_mask"] = "hard";
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << Error(spec);
  spec.defense_parameters["trigger_epsilon"] = "-1";
  EXPECT_EQ(ValidateJobSpec(spec).code(), absl::StatusCode::kInvalidArgument);
  spec.method = JobMethod::kAdaMerging;
  spec.defense_parameters = {{"granularity", "layer_wise"}, {"steps", "5"}};
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << Error(spec);
  spec.probes = {{"svhn", Sha256Hex("p")}};
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << Error(spec);
  spec.probes.push_back({"svhn", Sha256Hex("q")});
  EXPECT_THAT(Error(spec), HasSubstr("more than one probe set"));
  spec.probes = {{"cifar", Sha256Hex("p")}};
  EXPECT_THAT(Error(spec), HasSubstr("probes[0].task"));
  spec.probes.clear();
  spec.method = JobMethod::kTaskArithmetic;
  EXPECT_THAT(Error(spec), HasSubstr("is not a parameter of method "
                                     "task_arithmetic"));
  spec.defense_parameters.clear();
  spec.probes = {{"svhn", Sha256Hex("p")}};
  EXPECT_THAT(Error(spec), HasSubstr("adamerging, dam and lfpm jobs only"));
}

TEST(DefenseParametersTest, InfoListsEveryNameWithItsDefault) {
  auto find = [](const std::vector<DefenseParameterInfo>& info,
                 const std::string& name) {
    for (const DefenseParameterInfo& p : info) {
      if (p.name == name) return p.default_value;
    }
    return std::string("<missing>");
  };
  EXPECT_EQ(find(DamParameterInfo(), "steps"), "1000");
  EXPECT_EQ(find(DamParameterInfo(), "backdoor_loss"), "entropy");
  EXPECT_EQ(find(AdaMergingParameterInfo(), "granularity"), "task_wise");
  EXPECT_EQ(find(LfpmParameterInfo(), "trigger.scan_steps"), "100");
  EXPECT_EQ(find(LfpmParameterInfo(), "merge_lambda"), "0.3");
  // Every documented name is accepted with its own default.
  for (const DefenseParameterInfo& p : DamParameterInfo()) {
    DamOptions options;
    EXPECT_TRUE(ApplyDamParameters({{p.name, p.default_value}}, &options).ok())
        << p.name;
  }
  for (const DefenseParameterInfo& p : LfpmParameterInfo()) {
    LfpmOptions options;
    EXPECT_TRUE(ApplyLfpmParameters({{p.name, p.default_value}}, &options).ok())
        << p.name;
  }
  LfpmOptions lfpm;
  ASSERT_TRUE(ApplyLfpmParameters({{"trigger.alpha", "0.5"},
                                   {"use_labels", "false"},
                                   {"layer_prefixes", "a., b."},
                                   {"learning_rate_schedule", "cosine"}},
                                  &lfpm)
                  .ok());
  EXPECT_EQ(lfpm.learning_rate_schedule, LearningRateSchedule::kCosine);
  EXPECT_EQ(find(LfpmParameterInfo(), "learning_rate_schedule"), "constant");
  EXPECT_THAT(ApplyLfpmParameters({{"learning_rate_schedule", "step"}}, &lfpm)
                  .message(),
              HasSubstr("constant, cosine"));
  EXPECT_EQ(lfpm.triggers.trigger_alpha, 0.5);
  EXPECT_FALSE(lfpm.use_labels);
  EXPECT_EQ(lfpm.layer_prefixes, (std::vector<std::string>{"a.", "b."}));
}

TEST(JobSpecJsonTest, RoundTripsEveryField) {
  JobSpec spec = ValidSpec();
  spec.architecture = "resnet";
  spec.calibration = {{"mnist", Sha256Hex("c1")}};
  spec.merge.head_prefix = "classifier.";
  spec.merge.compute_in_double = true;
  spec.defense_parameters = {{"steps", "7"}};
  spec.probes = {{"mnist", Sha256Hex("p")}};
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
  EXPECT_EQ(parsed->defense_parameters.at("steps"), "7");
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

namespace mergeguard {
namespace {

// A tiny on-disk world for the data-dependent methods: the two-layer
// architecture of defense_fixtures.h, a base, two task checkpoints with
// heads and labelled calibration sets. Artifacts are "stored" under the
// SHA-256 of their name.
class DataDependentJobTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_FALSE(dir_.path().empty());
    testing::DefenseTinyModule().save(dir_.Path("tiny.pt"));
    ASSERT_TRUE(Store("base", testing::DefenseTinyBase()).ok());
    TaskVectorSet set = testing::DefenseTinySet(2);
    std::vector<torch::Tensor> calibration =
        testing::DefenseTinyCalibration(2, 16);
    spec_.base_digest = Sha256Hex("base");
    spec_.architecture = "tiny";
    for (size_t t = 0; t < 2; ++t) {
      NamedTensors checkpoint;
      for (size_t k = 0; k < set.keys.size(); ++k) {
        checkpoint.push_back(
            {set.keys[k], set.base[k] + set.task_vectors[t][k]});
      }
      checkpoint.push_back({"head.weight", set.heads[t].weight});
      checkpoint.push_back({"head.bias", set.heads[t].bias});
      const std::string name = set.task_names[t];
      ASSERT_TRUE(Store(name, checkpoint).ok());
      ASSERT_TRUE(Store(name + ".calibration",
                        {{"inputs", calibration[t]},
                         {"labels", torch::randint(0, 3, {16}, torch::kLong)}})
                      .ok());
      spec_.inputs.push_back({name, 1.0, Sha256Hex(name), "", ""});
      spec_.calibration.push_back({name, Sha256Hex(name + ".calibration")});
    }
    context_.threads = 1;
    context_.resolve_architecture =
        [this](const std::string& name) -> absl::StatusOr<std::string> {
      if (name != "tiny") return absl::NotFoundError("no such architecture");
      return dir_.Path("tiny.pt");
    };
    ASSERT_EQ(::mkdir(dir_.Path("work").c_str(), 0755), 0);
  }

  absl::Status Store(const std::string& name, const NamedTensors& tensors) {
    paths_[Sha256Hex(name)] = dir_.Path(name + ".safetensors");
    return SaveTensors(dir_.Path(name + ".safetensors"), tensors);
  }

  absl::StatusOr<JobOutput> Run() {
    return RunJob(
        spec_,
        [this](const std::string& digest) -> absl::StatusOr<std::string> {
          auto it = paths_.find(digest);
          if (it == paths_.end()) return absl::NotFoundError(digest);
          return it->second;
        },
        dir_.Path("work"), context_);
  }

  // ExpectMergedModel checks the backbone and the per-task heads.
  void ExpectMergedModel(const JobOutput& output) {
    absl::StatusOr<NamedTensors> model = LoadTensorsFromPath(output.model_path);
    ASSERT_TRUE(model.ok()) << model.status();
    std::set<std::string> keys;
    for (const auto& [key, tensor] : *model) {
      keys.insert(key);
      EXPECT_TRUE(torch::isfinite(tensor).all().item<bool>()) << key;
    }
    EXPECT_TRUE(keys.count("fc1.weight"));
    EXPECT_TRUE(keys.count("task0/head.weight"));
    EXPECT_TRUE(keys.count("task1/head.bias"));
  }

  testing::TempDir dir_;
  std::map<std::string, std::string> paths_;
  JobSpec spec_;
  JobContext context_;
};

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST_F(DataDependentJobTest, DamWritesModelReportMetricsAndProgress) {
  spec_.method = JobMethod::kDam;
  spec_.defense_parameters = {
      {"steps", "4"}, {"adamerging_steps", "2"}, {"batch_size", "8"}};
  std::set<std::string> phases;
  context_.on_progress = [&](const JobProgress& p) { phases.insert(p.phase); };
  absl::StatusOr<JobOutput> output = Run();
  ASSERT_TRUE(output.ok()) << output.status();
  ExpectMergedModel(*output);
  EXPECT_TRUE(phases.count("dam_meta"));
  EXPECT_TRUE(phases.count("dam_adamerging"));
  double flagged = output->metrics.at(kMetricM2FlaggedFraction);
  EXPECT_GE(flagged, 0.0);
  EXPECT_LE(flagged, 1.0);
  const std::string report = ReadFile(output->report_path);
  EXPECT_THAT(report, HasSubstr("\"dam\""));
  EXPECT_THAT(report, HasSubstr("\"steps\": \"4\""));
}

TEST_F(DataDependentJobTest, ProbeSetsReportBeforeAndAfter) {
  ProbeSet probe;
  torch::manual_seed(9);
  probe.images.inputs = torch::rand({12, 1, 28, 28});
  probe.images.labels = torch::randint(0, 3, {12}, torch::kLong);
  probe.trigger.kind = TriggerKind::kPatch;
  probe.trigger.pattern = torch::ones({1, 4, 4});
  probe.trigger.row = 23;
  probe.trigger.col = 23;
  probe.target = 1;
  paths_[Sha256Hex("probe")] = dir_.Path("probe.safetensors");
  ASSERT_TRUE(SaveProbeSet(dir_.Path("probe.safetensors"), probe).ok());
  absl::StatusOr<ProbeSet> loaded =
      LoadProbeSet("task1", dir_.Path("probe.safetensors"));
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->target, 1);
  EXPECT_EQ(loaded->trigger.row, 23);
  EXPECT_TRUE(torch::equal(loaded->images.labels, probe.images.labels));

  spec_.method = JobMethod::kDam;
  spec_.defense_parameters = {
      {"steps", "2"}, {"adamerging_steps", "2"}, {"batch_size", "8"}};
  spec_.probes = {{"task1", Sha256Hex("probe")}};
  absl::StatusOr<JobOutput> output = Run();
  ASSERT_TRUE(output.ok()) << output.status();
  for (const char* key :
       {kMetricProbeAsrBefore, kMetricProbeAsrAfter, kMetricProbeAccuracyBefore,
        kMetricProbeAccuracyAfter}) {
    ASSERT_TRUE(output->metrics.count(key)) << key;
    EXPECT_GE(output->metrics.at(key), 0.0) << key;
    EXPECT_LE(output->metrics.at(key), 1.0) << key;
  }
  // The "before" model is the TA merge, independent of DAM: recompute its
  // probe accuracy directly.
  MergeOptions ta;
  ta.lambda = 0.3;
  std::vector<MergeInput> inputs = {{"task0", paths_[Sha256Hex("task0")], 1.0},
                                    {"task1", paths_[Sha256Hex("task1")], 1.0}};
  ASSERT_TRUE(
      Merge(paths_[Sha256Hex("base")], inputs, dir_.Path("ta.safetensors"), ta)
          .ok());
  auto before = EvaluateProbes(dir_.Path("tiny.pt"),
                               dir_.Path("ta.safetensors"), {*loaded});
  ASSERT_TRUE(before.ok()) << before.status();
  EXPECT_DOUBLE_EQ(output->metrics.at(kMetricProbeAccuracyBefore),
                   (*before)[0].accuracy);
  EXPECT_DOUBLE_EQ(output->metrics.at(kMetricProbeAsrBefore), (*before)[0].asr);
  EXPECT_THAT(ReadFile(output->report_path), HasSubstr("\"asr_after\""));
  // The work directory holds only the outputs.
  EXPECT_NE(::access(dir_.Path("work/probe-before.safetensors").c_str(), F_OK),
            0);

  // A probe whose target is not a class of the head fails the job.
  probe.target = 7;
  ASSERT_TRUE(SaveProbeSet(dir_.Path("probe.safetensors"), probe).ok());
  EXPECT_EQ(Run().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(::access(dir_.Path("work/model.safetensors").c_str(), F_OK), 0);
}

TEST_F(DataDependentJobTest, AdaMergingWritesModel) {
  spec_.method = JobMethod::kAdaMerging;
  spec_.defense_parameters = {{"steps", "3"}, {"batch_size", "8"}};
  absl::StatusOr<JobOutput> output = Run();
  ASSERT_TRUE(output.ok()) << output.status();
  ExpectMergedModel(*output);
  EXPECT_THAT(ReadFile(output->report_path), HasSubstr("\"adamerging\""));
}

TEST_F(DataDependentJobTest, LfpmRepairsTheTaskArithmeticMerge) {
  spec_.method = JobMethod::kLfpm;
  spec_.defense_parameters = {{"steps", "3"},
                              {"path_nodes", "2"},
                              {"batch_size", "8"},
                              {"report_examples", "8"},
                              {"trigger.scan_steps", "2"},
                              {"trigger.scan_batch_size", "4"},
                              {"merge_lambda", "0.5"}};
  int64_t last_step = 0;
  context_.on_progress = [&](const JobProgress& p) {
    if (p.phase == "lfpm") last_step = p.step;
  };
  absl::StatusOr<JobOutput> output = Run();
  ASSERT_TRUE(output.ok()) << output.status();
  ExpectMergedModel(*output);
  EXPECT_EQ(last_step, 3);
  EXPECT_GT(output->metrics.at(kMetricTauAbNorm), 0.0);
  EXPECT_TRUE(output->metrics.count(kMetricMinedAsrBefore));
  EXPECT_TRUE(output->metrics.count(kMetricMinedAsrAfter));
  EXPECT_TRUE(output->metrics.count(kMetricAnomalyIndex));
  EXPECT_THAT(ReadFile(output->report_path), HasSubstr("\"lfpm\""));
}

TEST_F(DataDependentJobTest, CancelledMidRunLeavesNoModel) {
  spec_.method = JobMethod::kDam;
  spec_.defense_parameters = {{"steps", "50"}, {"batch_size", "8"}};
  int polls = 0;
  context_.is_cancelled = [&] { return ++polls > 5; };
  absl::StatusOr<JobOutput> output = Run();
  EXPECT_EQ(output.status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(::access(dir_.Path("work/model.safetensors").c_str(), F_OK), 0);
}

TEST_F(DataDependentJobTest, UnknownArchitectureIsNotFound) {
  spec_.method = JobMethod::kDam;
  spec_.architecture = "resnet";
  EXPECT_EQ(Run().status().code(), absl::StatusCode::kNotFound);
  context_.resolve_architecture = nullptr;
  EXPECT_EQ(Run().status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace mergeguard
