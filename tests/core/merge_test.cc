#include "core/merge.h"

#include <torch/torch.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/tensor_views.h"
#include "core/version.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

// Every expected value below is computed independently with plain torch ops
// on whole flattened task vectors, from the formulas of ALGORITHMS.md §1 and
// the choices documented in docs/merges.md.

namespace mergeguard {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

using TensorMap = std::map<std::string, torch::Tensor>;

// The merged (floating, non-head) keys of the test models, sorted.
const std::vector<std::string>& MergedKeys() {
  static const auto* keys = new std::vector<std::string>{
      "backbone.bias", "backbone.weight", "conv.weight"};
  return *keys;
}

// MakeBase returns a small model: a 2-D weight, a bias, a conv-shaped 4-D
// tensor, an integer buffer and a head.
TensorMap MakeBase(int64_t seed) {
  torch::manual_seed(static_cast<uint64_t>(seed));
  return {
      {"backbone.weight", torch::randn({32, 48})},
      {"backbone.bias", torch::randn({32})},
      {"conv.weight", torch::randn({8, 4, 3, 3})},
      {"counter", torch::tensor({7, 9}, torch::kLong)},
      {"head.weight", torch::randn({5, 32})},
      {"head.bias", torch::randn({5})},
  };
}

// MakeTask returns a fine-tune of `base`: floats moved by a direction all
// tasks share plus noise of their own (so task vectors correlate), a head of
// its own, and the integer buffer changed (it must not be merged).
TensorMap MakeTask(const TensorMap& base, int64_t seed) {
  torch::manual_seed(999);
  TensorMap shared;
  for (const auto& [name, t] : base) shared[name] = torch::randn(t.sizes());
  torch::manual_seed(static_cast<uint64_t>(seed));
  TensorMap task;
  for (const auto& [name, t] : base) {
    if (name == "counter") {
      task[name] = t + 100 * (seed + 1);
    } else if (name.rfind("head.", 0) == 0) {
      task[name] = torch::randn(t.sizes());
    } else {
      task[name] = t + 0.05 * shared[name] + 0.1 * torch::randn(t.sizes());
    }
  }
  return task;
}

NamedTensors ToNamed(const TensorMap& map, torch::ScalarType dtype) {
  NamedTensors out;
  for (const auto& [name, t] : map) {
    out.emplace_back(name, t.is_floating_point() ? t.to(dtype) : t);
  }
  return out;
}

TensorMap ToMap(const NamedTensors& named) {
  TensorMap map;
  for (const auto& [name, t] : named) map[name] = t;
  return map;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// --- Independent reference: DARE's documented counter-based RNG. ---------

uint64_t RefSplitMix(uint64_t state, uint64_t index) {
  uint64_t z = state + (index + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t RefFnv(const std::string& s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

// DareKeepMask returns the entries DARE keeps for (seed, task, name).
torch::Tensor DareKeepMask(uint64_t seed, uint64_t task,
                           const std::string& name, int64_t numel, double p) {
  uint64_t stream = RefSplitMix(seed, 0);
  stream = RefSplitMix(stream ^ task, 0);
  stream = RefSplitMix(stream ^ RefFnv(name), 0);
  const uint64_t below = static_cast<uint64_t>(std::ldexp(p, 53));
  torch::Tensor mask = torch::empty({numel}, torch::kBool);
  bool* m = mask.data_ptr<bool>();
  for (int64_t i = 0; i < numel; ++i) {
    m[i] = (RefSplitMix(stream, static_cast<uint64_t>(i)) >> 11) >= below;
  }
  return mask;
}

// --- Fixture --------------------------------------------------------------

class MergeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern =
        absl::StrCat(::testing::TempDir(), "/merge_test_XXXXXX");
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string File(const std::string& name) const {
    return absl::StrCat(dir_, "/", name);
  }

  // WriteModels writes a base and `n` tasks stored as `dtype`; the float32
  // copies used for reference computations are the stored values.
  void WriteModels(int n, torch::ScalarType dtype = torch::kFloat) {
    TensorMap base = MakeBase(1);
    base_path_ = File("base.safetensors");
    ASSERT_TRUE(SaveTensors(base_path_, ToNamed(base, dtype)).ok());
    base_ = Stored(base, dtype);
    inputs_.clear();
    tasks_.clear();
    for (int t = 0; t < n; ++t) {
      TensorMap task = MakeTask(base, 10 + t);
      MergeInput input;
      input.name = absl::StrCat("t", t);
      input.path = File(absl::StrCat("task", t, ".safetensors"));
      ASSERT_TRUE(SaveTensors(input.path, ToNamed(task, dtype)).ok());
      inputs_.push_back(input);
      tasks_.push_back(Stored(task, dtype));
    }
  }

  // Stored returns `map` as it reads back after storing as `dtype`, in
  // float64 (exact for every storage type).
  static TensorMap Stored(const TensorMap& map, torch::ScalarType dtype) {
    TensorMap out;
    for (const auto& [name, t] : map) {
      out[name] = t.is_floating_point() ? t.to(dtype).to(torch::kDouble) : t;
    }
    return out;
  }

  absl::StatusOr<MergeReport> Run(const MergeOptions& options,
                                  const std::string& out_name = "out") {
    out_path_ = File(absl::StrCat(out_name, ".safetensors"));
    return Merge(base_path_, inputs_, out_path_, options);
  }

  TensorMap Output() const {
    absl::StatusOr<NamedTensors> loaded = LoadTensorsFromPath(out_path_);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? ToMap(*loaded) : TensorMap();
  }

  // Tau returns task t's task vector for `key`, in float32 (the engine's
  // arithmetic) and widened to float64.
  torch::Tensor Tau(size_t t, const std::string& key,
                    torch::ScalarType compute = torch::kFloat) const {
    return (tasks_[t].at(key).to(compute) - base_.at(key).to(compute))
        .to(torch::kDouble);
  }

  // FlatTau concatenates task t's task vector over the merged keys.
  torch::Tensor FlatTau(size_t t) const {
    std::vector<torch::Tensor> parts;
    for (const std::string& key : MergedKeys()) {
      parts.push_back(Tau(t, key).flatten());
    }
    return torch::cat(parts);
  }

  // Split cuts a flat vector back into the merged keys' shapes.
  TensorMap Split(const torch::Tensor& flat) const {
    TensorMap out;
    int64_t offset = 0;
    for (const std::string& key : MergedKeys()) {
      const torch::Tensor& like = base_.at(key);
      out[key] =
          flat.slice(0, offset, offset + like.numel()).view(like.sizes());
      offset += like.numel();
    }
    return out;
  }

  // ExpectMerged compares the output's merged tensors with `expected`
  // (deltas from the base, float64), checks heads, the integer buffer and
  // that the base's head is gone.
  void ExpectMerged(const TensorMap& expected_delta, double atol = 2e-6,
                    double rtol = 1e-5,
                    torch::ScalarType out_dtype = torch::kFloat) {
    TensorMap out = Output();
    for (const std::string& key : MergedKeys()) {
      ASSERT_TRUE(out.count(key)) << key;
      EXPECT_EQ(out[key].scalar_type(), out_dtype) << key;
      torch::Tensor want = base_.at(key) + expected_delta.at(key);
      torch::Tensor got = out[key].to(torch::kDouble);
      ASSERT_EQ(got.sizes(), want.sizes()) << key;
      EXPECT_TRUE(torch::allclose(got, want, rtol, atol))
          << key << ": max |diff| " << (got - want).abs().max().item<double>();
    }
    ExpectHeadsAndBuffers(out);
  }

  void ExpectHeadsAndBuffers(const TensorMap& out) {
    EXPECT_EQ(out.count("head.weight"), 0u);
    EXPECT_EQ(out.count("head.bias"), 0u);
    for (size_t t = 0; t < inputs_.size(); ++t) {
      if (fs::is_directory(inputs_[t].path)) continue;  // LoRA: no head
      for (const char* key : {"head.weight", "head.bias"}) {
        const std::string name = absl::StrCat(inputs_[t].name, "/", key);
        ASSERT_TRUE(out.count(name)) << name;
        EXPECT_TRUE(torch::equal(out.at(name).to(torch::kDouble),
                                 tasks_[t].at(key).to(torch::kDouble)))
            << name;
      }
    }
    ASSERT_TRUE(out.count("counter"));
    EXPECT_TRUE(torch::equal(out.at("counter"), base_.at("counter")));
  }

  std::string dir_;
  std::string base_path_;
  std::string out_path_;
  std::vector<MergeInput> inputs_;
  TensorMap base_;
  std::vector<TensorMap> tasks_;
};

// --- References ------------------------------------------------------------

// Trim keeps |v| >= the keep-th largest |v|, keep = max(1, llround(k% n)).
torch::Tensor Trim(const torch::Tensor& v, double top_k_percent) {
  const int64_t n = v.numel();
  const int64_t keep =
      std::max<int64_t>(1, std::llround(top_k_percent / 100.0 * n));
  torch::Tensor threshold =
      std::get<0>(torch::kthvalue(v.abs().flatten(), n - keep + 1));
  return torch::where(v.abs() >= threshold, v, torch::zeros_like(v));
}

// TiesCombine: elect the sign per entry (zero sums take the tensor's
// majority elected sign, + on a tie) and merge the agreeing entries.
torch::Tensor TiesCombine(const std::vector<torch::Tensor>& trimmed,
                          bool mean) {
  torch::Tensor sum = torch::zeros_like(trimmed[0]);
  for (const torch::Tensor& v : trimmed) sum = sum + v;
  torch::Tensor sign = torch::sign(sum);
  const int64_t pos = (sign > 0).sum().item<int64_t>();
  const int64_t neg = (sign < 0).sum().item<int64_t>();
  const double majority = neg > pos ? -1.0 : 1.0;
  sign = torch::where(sign == 0, torch::full_like(sign, majority), sign);
  torch::Tensor acc = torch::zeros_like(sum);
  torch::Tensor count = torch::zeros_like(sum);
  for (const torch::Tensor& v : trimmed) {
    torch::Tensor agree = (torch::sign(v) == sign) & (v != 0);
    acc = acc + torch::where(agree, v, torch::zeros_like(v));
    count = count + agree.to(torch::kDouble);
  }
  if (!mean) return acc;
  return torch::where(count > 0, acc / count.clamp_min(1),
                      torch::zeros_like(acc));
}

// --- Task arithmetic -------------------------------------------------------

TEST_F(MergeTest, TaskArithmeticDefaults) {
  WriteModels(3);
  MergeOptions options;
  absl::StatusOr<MergeReport> report = Run(options);
  ASSERT_TRUE(report.ok()) << report.status();
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    delta[key] = 0.3 * (Tau(0, key) + Tau(1, key) + Tau(2, key));
  }
  ExpectMerged(delta);
  EXPECT_EQ(report->merged_tensors, 3);
  EXPECT_EQ(report->copied_tensors, 1);
  EXPECT_EQ(report->head_tensors, 6);
  EXPECT_EQ(report->passes, 1);
  EXPECT_GT(report->bytes_read, 0u);
  EXPECT_GT(report->bytes_written, 0u);
  EXPECT_GE(report->seconds, 0.0);
  EXPECT_EQ(report->output_path, out_path_);
}

TEST_F(MergeTest, TaskArithmeticLambdaAndWeights) {
  WriteModels(2);
  inputs_[0].weight = 2.0;
  inputs_[1].weight = -0.5;
  MergeOptions options;
  options.lambda = 0.7;
  ASSERT_TRUE(Run(options).ok());
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    delta[key] = 0.7 * (2.0 * Tau(0, key) - 0.5 * Tau(1, key));
  }
  ExpectMerged(delta);
}

TEST_F(MergeTest, ProvenanceMetadata) {
  WriteModels(2);
  inputs_[1].weight = 0.5;
  MergeOptions options;
  options.metadata["job"] = "42";
  ASSERT_TRUE(Run(options).ok());
  auto checkpoint = Checkpoint::Open(out_path_);
  ASSERT_TRUE(checkpoint.ok());
  const auto& metadata = (*checkpoint)->Metadata();
  EXPECT_EQ(metadata.at("mergeguard.method"), "task_arithmetic");
  EXPECT_EQ(metadata.at("mergeguard.version"), MergeguardVersion());
  EXPECT_FALSE(MergeguardVersion().empty());
  EXPECT_EQ(metadata.at("mergeguard.base"), base_path_);
  EXPECT_EQ(metadata.at("job"), "42");
  auto effective = nlohmann::json::parse(metadata.at("mergeguard.options"));
  EXPECT_DOUBLE_EQ(effective.at("lambda").get<double>(), 0.3);
  EXPECT_EQ(effective.at("head_prefix"), "head.");
  EXPECT_EQ(effective.at("compute_dtype"), "F32");
  auto inputs = nlohmann::json::parse(metadata.at("mergeguard.inputs"));
  ASSERT_EQ(inputs.size(), 2u);
  EXPECT_EQ(inputs[1].at("name"), "t1");
  EXPECT_EQ(inputs[1].at("path"), inputs_[1].path);
  EXPECT_DOUBLE_EQ(inputs[1].at("weight").get<double>(), 0.5);
  EXPECT_EQ(inputs[1].at("kind"), "checkpoint");
}

// --- TIES -------------------------------------------------------------------

struct TiesCase {
  TrimScope scope;
  DisjointMode disjoint;
};

class MergeTiesTest : public MergeTest,
                      public ::testing::WithParamInterface<TiesCase> {};

TEST_P(MergeTiesTest, MatchesReference) {
  WriteModels(3);
  MergeOptions options;
  options.method = MergeMethod::kTies;
  options.ties.trim_scope = GetParam().scope;
  options.ties.disjoint = GetParam().disjoint;
  options.ties.top_k_percent = 30.0;
  options.chunk_elements = 100;  // many chunks per tensor
  absl::StatusOr<MergeReport> report = Run(options);
  ASSERT_TRUE(report.ok()) << report.status();
  const bool global = GetParam().scope == TrimScope::kGlobal;
  EXPECT_EQ(report->passes, global ? 3 : 1);

  std::vector<TensorMap> trimmed(3);
  for (size_t t = 0; t < 3; ++t) {
    if (global) {
      trimmed[t] = Split(Trim(FlatTau(t), 30.0));
    } else {
      for (const std::string& key : MergedKeys()) {
        trimmed[t][key] = Trim(Tau(t, key), 30.0);
      }
    }
  }
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    delta[key] =
        1.0 * TiesCombine({trimmed[0][key], trimmed[1][key], trimmed[2][key]},
                          GetParam().disjoint == DisjointMode::kMean);
  }
  ExpectMerged(delta);
}

INSTANTIATE_TEST_SUITE_P(
    MergeTies, MergeTiesTest,
    ::testing::Values(TiesCase{TrimScope::kGlobal, DisjointMode::kMean},
                      TiesCase{TrimScope::kGlobal, DisjointMode::kSum},
                      TiesCase{TrimScope::kTensor, DisjointMode::kMean},
                      TiesCase{TrimScope::kTensor, DisjointMode::kSum}),
    [](const ::testing::TestParamInfo<TiesCase>& info) {
      return absl::StrCat(
          info.param.scope == TrimScope::kGlobal ? "Global" : "Tensor",
          info.param.disjoint == DisjointMode::kMean ? "Mean" : "Sum");
    });

TEST_F(MergeTest, TiesGlobalTrimDiffersFromTensorTrim) {
  // Scale one tensor's task vectors so a global threshold keeps mostly it.
  TensorMap base = MakeBase(1);
  base_path_ = File("base.safetensors");
  ASSERT_TRUE(SaveTensors(base_path_, ToNamed(base, torch::kFloat)).ok());
  TensorMap task = MakeTask(base, 5);
  task["backbone.bias"] = base["backbone.bias"] + 10 * torch::randn({32});
  inputs_ = {{"a", File("a.safetensors"), 1.0}};
  ASSERT_TRUE(SaveTensors(inputs_[0].path, ToNamed(task, torch::kFloat)).ok());
  MergeOptions options;
  options.method = MergeMethod::kTies;
  options.ties.top_k_percent = 2.0;
  ASSERT_TRUE(Run(options, "global").ok());
  TensorMap global = Output();
  options.ties.trim_scope = TrimScope::kTensor;
  ASSERT_TRUE(Run(options, "tensor").ok());
  TensorMap tensor = Output();
  // ~37 entries survive globally, nearly all in the bias; per tensor ~2%
  // of each.
  auto changed = [&](const TensorMap& out, const std::string& key) {
    return (out.at(key) != base.at(key)).sum().item<int64_t>();
  };
  EXPECT_EQ(changed(global, "backbone.bias") +
                changed(global, "backbone.weight") +
                changed(global, "conv.weight"),
            std::llround(0.02 * (32 + 32 * 48 + 8 * 4 * 9)));
  EXPECT_GE(changed(global, "backbone.bias"), 30);
  EXPECT_EQ(changed(tensor, "backbone.weight"), std::llround(0.02 * 32 * 48));
  EXPECT_EQ(changed(tensor, "backbone.bias"), 1);
}

TEST_F(MergeTest, TiesZeroSumTakesTensorMajoritySign) {
  // One tensor, two tasks, keep everything: entries 0-2 sum positive
  // (negative in the second case), entry 3 cancels exactly.
  for (double direction : {1.0, -1.0}) {
    SCOPED_TRACE(direction);
    TensorMap base = {{"w", torch::zeros({4})}};
    TensorMap a = {{"w", torch::tensor({1.0f, 1.0f, 1.0f, 2.0f})}};
    TensorMap b = {{"w", torch::tensor({1.0f, 1.0f, 1.0f, -2.0f})}};
    a["w"].slice(0, 0, 3).mul_(direction);
    b["w"].slice(0, 0, 3).mul_(direction);
    base_path_ = File("zbase.safetensors");
    ASSERT_TRUE(SaveTensors(base_path_, ToNamed(base, torch::kFloat)).ok());
    inputs_ = {{"a", File("za.safetensors"), 1.0},
               {"b", File("zb.safetensors"), 1.0}};
    ASSERT_TRUE(SaveTensors(inputs_[0].path, ToNamed(a, torch::kFloat)).ok());
    ASSERT_TRUE(SaveTensors(inputs_[1].path, ToNamed(b, torch::kFloat)).ok());
    MergeOptions options;
    options.method = MergeMethod::kTies;
    options.ties.top_k_percent = 100.0;
    options.chunk_elements = 2;  // the cancelling entry in its own chunk
    ASSERT_TRUE(Run(options).ok());
    torch::Tensor got = Output().at("w");
    torch::Tensor want = torch::tensor(
        {direction, direction, direction, 2.0 * direction}, torch::kFloat);
    EXPECT_TRUE(torch::equal(got, want)) << got;
  }
}

// --- DARE ------------------------------------------------------------------

TEST_F(MergeTest, DareMatchesDocumentedRng) {
  WriteModels(3);
  MergeOptions options;
  options.method = MergeMethod::kDare;
  options.dare.seed = 1234;
  options.chunk_elements = 77;
  ASSERT_TRUE(Run(options).ok());
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    torch::Tensor sum = torch::zeros_like(base_.at(key));
    for (size_t t = 0; t < 3; ++t) {
      torch::Tensor keep =
          DareKeepMask(1234, t, key, base_.at(key).numel(), 0.9)
              .view(base_.at(key).sizes());
      sum = sum +
            torch::where(keep, Tau(t, key) / (1 - 0.9), torch::zeros_like(sum));
    }
    delta[key] = 0.3 * sum;
  }
  ExpectMerged(delta, 1e-5);
}

TEST_F(MergeTest, DareSingleInputRescalesSurvivors) {
  WriteModels(1);
  MergeOptions options;
  options.method = MergeMethod::kDare;
  options.dare.seed = 7;
  ASSERT_TRUE(Run(options, "a").ok());
  const std::string first = ReadBytes(out_path_);
  TensorMap out = Output();
  int64_t kept = 0;
  int64_t total = 0;
  for (const std::string& key : MergedKeys()) {
    torch::Tensor diff = out.at(key).to(torch::kDouble) - base_.at(key);
    torch::Tensor nonzero = diff != 0;
    kept += nonzero.sum().item<int64_t>();
    total += diff.numel();
    torch::Tensor want = 0.3 * Tau(0, key) / (1 - 0.9);
    EXPECT_TRUE(torch::allclose(diff.masked_select(nonzero),
                                want.masked_select(nonzero), 1e-4, 1e-6))
        << key;
  }
  const double fraction = static_cast<double>(kept) / total;
  EXPECT_NEAR(fraction, 0.1, 0.035) << kept << " of " << total;

  ASSERT_TRUE(Run(options, "b").ok());
  EXPECT_EQ(ReadBytes(out_path_), first);  // same seed: identical bytes
  options.dare.seed = 8;
  ASSERT_TRUE(Run(options, "c").ok());
  TensorMap other = Output();
  for (const std::string& key : MergedKeys()) {
    EXPECT_FALSE(torch::equal(other.at(key), out.at(key))) << key;
  }
}

TEST_F(MergeTest, DareTiesMatchesReference) {
  WriteModels(3);
  MergeOptions options;
  options.method = MergeMethod::kDare;
  options.dare.combine = DareCombine::kTies;
  options.dare.drop_rate = 0.5;
  options.dare.seed = 99;
  options.ties.top_k_percent = 30.0;  // below the 50% DARE keeps
  ASSERT_TRUE(Run(options).ok());
  std::vector<TensorMap> trimmed(3);
  for (size_t t = 0; t < 3; ++t) {
    std::vector<torch::Tensor> parts;
    for (const std::string& key : MergedKeys()) {
      torch::Tensor keep = DareKeepMask(99, t, key, base_.at(key).numel(), 0.5);
      torch::Tensor tau = Tau(t, key).flatten();
      parts.push_back(torch::where(keep, tau, torch::zeros_like(tau)));
    }
    trimmed[t] = Split(Trim(torch::cat(parts), 30.0) / (1 - 0.5));
  }
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    delta[key] =
        1.0 * TiesCombine({trimmed[0][key], trimmed[1][key], trimmed[2][key]},
                          /*mean=*/true);
  }
  ExpectMerged(delta, 1e-5);
}

// --- Breadcrumbs, Consensus, Model Stock, weighted average ----------------

TEST_F(MergeTest, BreadcrumbsMatchesReference) {
  WriteModels(2);
  inputs_[1].weight = 1.5;
  MergeOptions options;
  options.method = MergeMethod::kBreadcrumbs;
  options.breadcrumbs.gamma = 0.05;
  options.breadcrumbs.density = 0.8;
  options.chunk_elements = 50;
  ASSERT_TRUE(Run(options).ok());
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    torch::Tensor sum = torch::zeros({base_.at(key).numel()}, torch::kDouble);
    for (size_t t = 0; t < 2; ++t) {
      torch::Tensor tau = Tau(t, key).flatten();
      const int64_t n = tau.numel();
      const int64_t keep = std::max<int64_t>(1, std::llround(0.8 * n));
      const int64_t top = std::min<int64_t>(n - keep, std::llround(0.05 * n));
      torch::Tensor order =
          std::get<1>(torch::sort(tau.abs(), /*dim=*/0, /*descending=*/true));
      torch::Tensor mask = torch::zeros({n}, torch::kBool);
      mask.index_put_({order.slice(0, top, top + keep)}, true);
      sum = sum +
            inputs_[t].weight * torch::where(mask, tau, torch::zeros_like(tau));
    }
    delta[key] = 0.3 * sum.view(base_.at(key).sizes());
  }
  ExpectMerged(delta);
}

TEST_F(MergeTest, ConsensusMatchesReference) {
  WriteModels(4);
  MergeOptions options;
  options.method = MergeMethod::kConsensus;
  ASSERT_TRUE(Run(options).ok());
  TensorMap delta;
  int64_t masked = 0;
  for (const std::string& key : MergedKeys()) {
    // In float32, as the engine computes the masks.
    std::vector<torch::Tensor> taus;
    torch::Tensor mtl = torch::zeros(base_.at(key).sizes());
    for (size_t t = 0; t < 4; ++t) {
      taus.push_back(Tau(t, key).to(torch::kFloat));
      mtl = mtl + taus.back();
    }
    torch::Tensor votes = torch::zeros(base_.at(key).sizes(), torch::kLong);
    for (const torch::Tensor& tau : taus) {
      votes = votes + (tau.abs() >= (mtl - tau).abs() * 0.6).to(torch::kLong);
    }
    torch::Tensor mask = votes >= 2;
    masked += (~mask).sum().item<int64_t>();
    delta[key] =
        0.3 *
        torch::where(mask, mtl, torch::zeros_like(mtl)).to(torch::kDouble);
  }
  EXPECT_GT(masked, 0);  // the mask does something
  ExpectMerged(delta);
}

double ModelStockRatio(const std::vector<torch::Tensor>& taus) {
  const size_t n = taus.size();
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = i + 1; j < n; ++j) {
      sum += (taus[i].dot(taus[j]) / (taus[i].norm() * taus[j].norm()))
                 .item<double>();
    }
  }
  const double c = sum / (n * (n - 1) / 2.0);
  return n * c / (1 + (n - 1) * c);
}

TEST_F(MergeTest, ModelStockGlobalMatchesReference) {
  WriteModels(3);
  MergeOptions options;
  options.method = MergeMethod::kModelStock;
  absl::StatusOr<MergeReport> report = Run(options);
  ASSERT_TRUE(report.ok()) << report.status();
  const double ratio = ModelStockRatio({FlatTau(0), FlatTau(1), FlatTau(2)});
  EXPECT_NEAR(report->model_stock_ratio, ratio, 1e-9);
  EXPECT_EQ(report->passes, 2);
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    torch::Tensor mean =
        (tasks_[0].at(key) + tasks_[1].at(key) + tasks_[2].at(key)) / 3.0;
    delta[key] = ratio * mean + (1 - ratio) * base_.at(key) - base_.at(key);
  }
  ExpectMerged(delta);
  auto checkpoint = Checkpoint::Open(out_path_);
  ASSERT_TRUE(checkpoint.ok());
  EXPECT_NEAR(
      std::stod((*checkpoint)->Metadata().at("mergeguard.model_stock_ratio")),
      ratio, 1e-12);
}

TEST_F(MergeTest, ModelStockTensorScopeMatchesReference) {
  WriteModels(3);
  MergeOptions options;
  options.method = MergeMethod::kModelStock;
  options.model_stock.cosine_scope = CosineScope::kTensor;
  absl::StatusOr<MergeReport> report = Run(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->passes, 1);
  TensorMap delta;
  double ratio_sum = 0;
  for (const std::string& key : MergedKeys()) {
    const double ratio = ModelStockRatio(
        {Tau(0, key).flatten(), Tau(1, key).flatten(), Tau(2, key).flatten()});
    ratio_sum += ratio;
    torch::Tensor mean = (Tau(0, key) + Tau(1, key) + Tau(2, key)) / 3.0;
    delta[key] = ratio * mean;
  }
  EXPECT_NEAR(report->model_stock_ratio, ratio_sum / 3, 1e-9);
  ExpectMerged(delta);
}

TEST_F(MergeTest, WeightedAverageWithAndWithoutBase) {
  WriteModels(3);
  inputs_[0].weight = 1.0;
  inputs_[1].weight = 2.0;
  inputs_[2].weight = 3.0;
  MergeOptions options;
  options.method = MergeMethod::kWeightedAverage;
  ASSERT_TRUE(Run(options, "with_base").ok());
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    delta[key] = (1.0 * tasks_[0].at(key) + 2.0 * tasks_[1].at(key) +
                  3.0 * tasks_[2].at(key)) /
                     6.0 -
                 base_.at(key);
  }
  ExpectMerged(delta);
  const std::string with_base = ReadBytes(out_path_);

  // Without a base the first input is the reference: its integer buffer is
  // copied, and there is no base head to drop.
  base_path_.clear();
  ASSERT_TRUE(Run(options, "no_base").ok());
  TensorMap out = Output();
  for (const std::string& key : MergedKeys()) {
    torch::Tensor want = base_.at(key) + delta.at(key);
    EXPECT_TRUE(
        torch::allclose(out.at(key).to(torch::kDouble), want, 1e-5, 2e-6))
        << key;
  }
  EXPECT_TRUE(torch::equal(out.at("counter"), tasks_[0].at("counter")));
  EXPECT_EQ(out.count("t0/head.weight"), 1u);
  EXPECT_EQ(out.count("t2/head.weight"), 1u);
}

// --- Storage types ---------------------------------------------------------

TEST_F(MergeTest, HalfPrecisionInputsKeepTheirDtype) {
  for (torch::ScalarType dtype : {torch::kBFloat16, torch::kHalf}) {
    SCOPED_TRACE(c10::toString(dtype));
    WriteModels(2, dtype);
    MergeOptions options;
    ASSERT_TRUE(Run(options).ok());
    TensorMap out = Output();
    for (const std::string& key : MergedKeys()) {
      EXPECT_EQ(out.at(key).scalar_type(), dtype);
      // float32 arithmetic on the decoded values, one rounding at the end.
      torch::Tensor b = base_.at(key).to(torch::kFloat);
      torch::Tensor acc = torch::zeros_like(b);
      for (size_t t = 0; t < 2; ++t) {
        acc = acc + (tasks_[t].at(key).to(torch::kFloat) - b);
      }
      torch::Tensor want = (b + acc * 0.3f).to(dtype);
      EXPECT_TRUE(torch::equal(out.at(key), want))
          << key << ": "
          << (out.at(key).to(torch::kFloat) - want.to(torch::kFloat))
                 .abs()
                 .max()
                 .item<float>();
    }
    ExpectHeadsAndBuffers(out);
  }
}

TEST_F(MergeTest, ComputeInDouble) {
  WriteModels(2, torch::kDouble);
  MergeOptions options;
  options.compute_in_double = true;
  options.method = MergeMethod::kTies;
  options.ties.trim_scope = TrimScope::kGlobal;
  absl::StatusOr<MergeReport> report = Run(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->passes, 5);  // 4 radix passes over 64-bit keys
  std::vector<TensorMap> trimmed(2);
  for (size_t t = 0; t < 2; ++t) {
    std::vector<torch::Tensor> parts;
    for (const std::string& key : MergedKeys()) {
      parts.push_back(Tau(t, key, torch::kDouble).flatten());
    }
    trimmed[t] = Split(Trim(torch::cat(parts), 20.0));
  }
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    delta[key] = TiesCombine({trimmed[0][key], trimmed[1][key]}, true);
  }
  ExpectMerged(delta, 1e-13, 1e-13, torch::kDouble);
}

TEST_F(MergeTest, OutputDtypeOverride) {
  WriteModels(2);
  MergeOptions options;
  options.output_dtype = DType::kBF16;
  ASSERT_TRUE(Run(options).ok());
  TensorMap out = Output();
  for (const std::string& key : MergedKeys()) {
    EXPECT_EQ(out.at(key).scalar_type(), torch::kBFloat16) << key;
    torch::Tensor want = (base_.at(key) + 0.3 * (Tau(0, key) + Tau(1, key)))
                             .to(torch::kFloat)
                             .to(torch::kBFloat16);
    EXPECT_TRUE(torch::allclose(out.at(key).to(torch::kFloat),
                                want.to(torch::kFloat), 1e-2, 1e-2))
        << key;
  }
  EXPECT_EQ(out.at("t0/head.weight").scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(
      out.at("t0/head.weight"),
      tasks_[0].at("head.weight").to(torch::kFloat).to(torch::kBFloat16)));
  EXPECT_EQ(out.at("counter").scalar_type(), torch::kLong);
}

TEST_F(MergeTest, MisalignedTensorsAreDecoded) {
  // Three F16 values first put the F32 tensor at byte offset 6 of the data.
  auto model = [](double shift) {
    return NamedTensors{
        {"a.odd", torch::full({3}, shift, torch::kHalf)},
        {"b.weight", torch::arange(0, 100, torch::kFloat) * (1 + shift)},
    };
  };
  base_path_ = File("mbase.safetensors");
  ASSERT_TRUE(SaveTensors(base_path_, model(0)).ok());
  inputs_ = {{"a", File("ma.safetensors"), 1.0},
             {"b", File("mb.safetensors"), 1.0}};
  ASSERT_TRUE(SaveTensors(inputs_[0].path, model(0.5)).ok());
  ASSERT_TRUE(SaveTensors(inputs_[1].path, model(0.25)).ok());
  MergeOptions options;
  options.lambda = 1.0;
  ASSERT_TRUE(Run(options).ok());
  TensorMap out = Output();
  torch::Tensor x = torch::arange(0, 100, torch::kFloat);
  EXPECT_TRUE(torch::allclose(out.at("b.weight"), x * 1.75, 1e-6, 1e-5));
  EXPECT_TRUE(
      torch::equal(out.at("a.odd"), torch::full({3}, 0.75, torch::kHalf)));
}

// --- Heads, LoRA -----------------------------------------------------------

TEST_F(MergeTest, HeadsAreCarriedPerTaskAndNotMerged) {
  WriteModels(2);
  MergeOptions options;
  ASSERT_TRUE(Run(options).ok());
  TensorMap out = Output();
  ExpectHeadsAndBuffers(out);
  EXPECT_EQ(out.size(), 3u + 1u + 4u);

  // An empty head prefix merges everything (then the heads must match).
  options.head_prefix = "";
  ASSERT_TRUE(Run(options, "no_heads").ok());
  out = Output();
  EXPECT_EQ(out.count("t0/head.weight"), 0u);
  torch::Tensor want = base_.at("head.weight") +
                       0.3 * (Tau(0, "head.weight") + Tau(1, "head.weight"));
  EXPECT_TRUE(torch::allclose(out.at("head.weight").to(torch::kDouble), want,
                              1e-5, 2e-6));
}

// WriteLoraAdapter writes a PEFT adapter for backbone.weight [32, 48] and
// returns dW = B A * alpha / r.
torch::Tensor WriteLoraAdapter(const std::string& dir, int64_t in_features,
                               const std::string& module = "backbone") {
  fs::create_directories(dir);
  std::ofstream(absl::StrCat(dir, "/adapter_config.json"))
      << R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8,)"
      << R"( "target_modules": ["backbone"]})";
  torch::manual_seed(77);
  torch::Tensor a = 0.1 * torch::randn({4, in_features});
  torch::Tensor b = 0.1 * torch::randn({32, 4});
  NamedTensors factors = {
      {absl::StrCat("base_model.model.", module, ".lora_A.weight"), a},
      {absl::StrCat("base_model.model.", module, ".lora_B.weight"), b},
  };
  EXPECT_TRUE(
      SaveTensors(absl::StrCat(dir, "/adapter_model.safetensors"), factors)
          .ok());
  return torch::matmul(b, a) * 2.0;
}

TEST_F(MergeTest, LoraAdapterIsATaskVector) {
  WriteModels(1);
  torch::Tensor delta_w = WriteLoraAdapter(File("adapter"), 48);
  inputs_.push_back({"lora", File("adapter"), 1.0});
  MergeOptions options;
  absl::StatusOr<MergeReport> report = Run(options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_EQ(report->head_tensors, 2);
  TensorMap delta;
  for (const std::string& key : MergedKeys()) {
    torch::Tensor lora = key == "backbone.weight"
                             ? delta_w.to(torch::kDouble)
                             : torch::zeros_like(base_.at(key));
    delta[key] = 0.3 * (Tau(0, key) + lora);
  }
  ExpectMerged(delta);
  auto checkpoint = Checkpoint::Open(out_path_);
  ASSERT_TRUE(checkpoint.ok());
  auto inputs =
      nlohmann::json::parse((*checkpoint)->Metadata().at("mergeguard.inputs"));
  EXPECT_EQ(inputs[1].at("kind"), "lora");
}

TEST_F(MergeTest, LoraAdapterErrors) {
  WriteModels(1);
  // A target the base lacks.
  WriteLoraAdapter(File("unknown"), 48, "nowhere");
  inputs_.push_back({"lora", File("unknown"), 1.0});
  absl::StatusOr<MergeReport> report = Run(MergeOptions());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(report.status().message(), HasSubstr("nowhere.weight"));
  EXPECT_THAT(report.status().message(), HasSubstr(File("unknown")));
  EXPECT_FALSE(fs::exists(out_path_));

  // Factors that do not fit: found only while merging, after the output
  // was opened; nothing is left behind.
  WriteLoraAdapter(File("misfit"), 40);
  inputs_.back() = {"lora", File("misfit"), 1.0};
  report = Run(MergeOptions());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(report.status().message(), HasSubstr("backbone.weight"));
  EXPECT_FALSE(fs::exists(out_path_));
  for (const auto& entry : fs::directory_iterator(dir_)) {
    EXPECT_THAT(entry.path().filename().string(),
                ::testing::Not(HasSubstr("out")));
  }
}

// --- Determinism and layout ------------------------------------------------

TEST_F(MergeTest, ThreadCountDoesNotChangeBytes) {
  WriteModels(3);
  const MergeMethod methods[] = {
      MergeMethod::kTaskArithmetic, MergeMethod::kTies,
      MergeMethod::kDare,           MergeMethod::kBreadcrumbs,
      MergeMethod::kConsensus,      MergeMethod::kModelStock,
      MergeMethod::kWeightedAverage};
  for (MergeMethod method : methods) {
    SCOPED_TRACE(MergeMethodName(method));
    MergeOptions options;
    options.method = method;
    options.chunk_elements = 64;
    options.threads = 1;
    ASSERT_TRUE(Run(options, "one").ok());
    const std::string one = ReadBytes(out_path_);
    options.threads = 4;
    ASSERT_TRUE(Run(options, "four").ok());
    EXPECT_EQ(ReadBytes(out_path_), one);
    if (method != MergeMethod::kModelStock) {  // Gram sums follow chunks
      options.chunk_elements = 1 << 16;
      ASSERT_TRUE(Run(options, "big").ok());
      EXPECT_EQ(ReadBytes(out_path_), one);
    }
  }
}

TEST_F(MergeTest, ShardedOutput) {
  WriteModels(2);
  MergeOptions options;
  ASSERT_TRUE(Run(options, "single").ok());
  TensorMap single = Output();
  options.writer.max_shard_bytes = 2048;
  out_path_ = File("sharded");
  absl::StatusOr<MergeReport> report =
      Merge(base_path_, inputs_, out_path_, options);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_TRUE(fs::exists(File("sharded/model.safetensors.index.json")));
  TensorMap sharded = Output();
  ASSERT_EQ(sharded.size(), single.size());
  for (const auto& [name, t] : single) {
    EXPECT_TRUE(torch::equal(sharded.at(name), t)) << name;
  }
}

TEST_F(MergeTest, ProgressAndCancellation) {
  WriteModels(2);
  MergeOptions options;
  options.method = MergeMethod::kTies;  // 2 statistics passes + merge
  std::vector<MergeProgress> seen;
  options.on_progress = [&](const MergeProgress& p) { seen.push_back(p); };
  absl::StatusOr<MergeReport> report = Run(options);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(seen.size(), 3u + 3u + 8u);
  EXPECT_EQ(seen.front().pass, 1);
  EXPECT_EQ(seen.front().passes, 3);
  EXPECT_EQ(seen.back().pass, 3);
  EXPECT_EQ(seen.back().tensors_done, 8);
  EXPECT_EQ(seen.back().tensors_total, 8);
  EXPECT_EQ(seen.back().bytes_written, report->bytes_written);

  // Cancelled in the merge pass, after the output was opened.
  std::atomic<int> polls{0};
  options.method = MergeMethod::kTaskArithmetic;
  options.on_progress = nullptr;
  options.is_cancelled = [&] { return ++polls > 3; };
  report = Run(options, "cancelled");
  EXPECT_EQ(report.status().code(), absl::StatusCode::kCancelled);
  EXPECT_FALSE(fs::exists(out_path_));
}

// --- Validation ------------------------------------------------------------

TEST_F(MergeTest, MismatchesNameTheKeyAndInput) {
  WriteModels(2);
  TensorMap base = MakeBase(1);
  struct Case {
    std::string what;
    std::function<void(TensorMap&)> edit;
    std::string key;
  };
  const std::vector<Case> cases = {
      {"missing", [](TensorMap& m) { m.erase("conv.weight"); }, "conv.weight"},
      {"extra", [](TensorMap& m) { m["extra.bias"] = torch::zeros({3}); },
       "extra.bias"},
      {"shape", [](TensorMap& m) { m["backbone.bias"] = torch::zeros({31}); },
       "backbone.bias"},
      {"dtype",
       [](TensorMap& m) {
         m["backbone.weight"] = m["backbone.weight"].to(torch::kHalf);
       },
       "backbone.weight"},
      {"integer shape",
       [](TensorMap& m) { m["counter"] = torch::zeros({3}, torch::kLong); },
       "counter"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    TensorMap task = MakeTask(base, 3);
    c.edit(task);
    const std::string path = File(absl::StrCat("bad_", c.what, ".safetensors"));
    NamedTensors named;
    for (const auto& [name, t] : task) named.emplace_back(name, t);
    ASSERT_TRUE(SaveTensors(path, named).ok());
    std::vector<MergeInput> inputs = inputs_;
    inputs[1].path = path;
    out_path_ = File("out.safetensors");
    absl::StatusOr<MergeReport> report =
        Merge(base_path_, inputs, out_path_, MergeOptions());
    EXPECT_EQ(report.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(report.status().message(), HasSubstr(c.key));
    EXPECT_THAT(report.status().message(), HasSubstr(path));
    EXPECT_FALSE(fs::exists(out_path_));
  }
}

TEST_F(MergeTest, HeadsMayDifferAcrossInputs) {
  WriteModels(2);
  TensorMap task = MakeTask(MakeBase(1), 4);
  task["head.weight"] = torch::randn({9, 32});  // a 9-class task
  task.erase("head.bias");
  ASSERT_TRUE(SaveTensors(inputs_[1].path, ToNamed(task, torch::kFloat)).ok());
  ASSERT_TRUE(Run(MergeOptions()).ok());
  TensorMap out = Output();
  EXPECT_EQ(out.at("t1/head.weight").size(0), 9);
  EXPECT_EQ(out.count("t1/head.bias"), 0u);
}

TEST_F(MergeTest, BadOptionsNameTheOption) {
  WriteModels(2);
  struct Case {
    std::function<void(MergeOptions&, std::vector<MergeInput>&)> edit;
    std::string message;
  };
  using O = MergeOptions;
  using I = std::vector<MergeInput>;
  const std::vector<Case> cases = {
      {[](O& o, I&) {
         o.method = MergeMethod::kTies;
         o.ties.top_k_percent = 0;
       },
       "ties.top_k_percent must be in (0, 100], got 0"},
      {[](O& o, I&) {
         o.method = MergeMethod::kTies;
         o.ties.top_k_percent = 101;
       },
       "ties.top_k_percent"},
      {[](O& o, I&) {
         o.method = MergeMethod::kDare;
         o.dare.drop_rate = 1.0;
       },
       "dare.drop_rate must be in [0, 1), got 1"},
      {[](O& o, I&) {
         o.method = MergeMethod::kBreadcrumbs;
         o.breadcrumbs.density = 0;
       },
       "breadcrumbs.density"},
      {[](O& o, I&) {
         o.method = MergeMethod::kBreadcrumbs;
         o.breadcrumbs.gamma = 0.2;
       },
       "breadcrumbs.gamma + breadcrumbs.density"},
      {[](O& o, I&) {
         o.method = MergeMethod::kConsensus;
         o.consensus.min_agreeing = 3;
       },
       "consensus.min_agreeing"},
      {[](O& o, I&) {
         o.method = MergeMethod::kConsensus;
         o.lambda = 0.5;
       },
       "lambda is not used by consensus"},
      {[](O& o, I& i) {
         o.method = MergeMethod::kModelStock;
         i[0].weight = 2;
       },
       "inputs[0].weight"},
      {[](O& o, I& i) {
         o.method = MergeMethod::kModelStock;
         i.pop_back();
       },
       "model_stock needs at least 2 inputs"},
      {[](O& o, I& i) {
         o.method = MergeMethod::kWeightedAverage;
         i[0].weight = 0;
         i[1].weight = 0;
       },
       "weight"},
      {[](O& o, I&) { o.lambda = INFINITY; }, "lambda must be finite"},
      {[](O& o, I&) { o.chunk_elements = 0; }, "chunk_elements"},
      {[](O& o, I&) { o.threads = -1; }, "threads"},
      {[](O& o, I&) { o.output_dtype = DType::kI32; }, "output_dtype"},
      {[](O&, I& i) { i[1].name = "t0"; }, "inputs[1].name"},
      {[](O&, I& i) { i[1].name = "a/b"; }, "inputs[1].name"},
      {[](O&, I& i) { i.clear(); }, "inputs"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.message);
    MergeOptions options;
    std::vector<MergeInput> inputs = inputs_;
    c.edit(options, inputs);
    out_path_ = File("out.safetensors");
    absl::StatusOr<MergeReport> report =
        Merge(base_path_, inputs, out_path_, options);
    EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(report.status().message(), HasSubstr(c.message));
    EXPECT_FALSE(fs::exists(out_path_));
  }
  // Only weighted_average works without a base.
  absl::StatusOr<MergeReport> report =
      Merge("", inputs_, File("out.safetensors"), MergeOptions());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(report.status().message(), HasSubstr("base_path"));
  // A missing input file.
  std::vector<MergeInput> inputs = inputs_;
  inputs[0].path = File("nope.safetensors");
  report = Merge(base_path_, inputs, File("out.safetensors"), MergeOptions());
  EXPECT_EQ(report.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(report.status().message(), HasSubstr("nope.safetensors"));
}

TEST(MergeMethodTest, NamesRoundTrip) {
  for (MergeMethod method :
       {MergeMethod::kTaskArithmetic, MergeMethod::kTies, MergeMethod::kDare,
        MergeMethod::kBreadcrumbs, MergeMethod::kConsensus,
        MergeMethod::kModelStock, MergeMethod::kWeightedAverage}) {
    EXPECT_EQ(ParseMergeMethod(MergeMethodName(method)).value(), method);
  }
  EXPECT_EQ(ParseMergeMethod("ta").value(), MergeMethod::kTaskArithmetic);
  EXPECT_EQ(ParseMergeMethod("tall").value(), MergeMethod::kConsensus);
  EXPECT_EQ(ParseMergeMethod("nope").status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mergeguard
