#ifndef MERGEGUARD_TESTS_CORE_DEFENSE_FIXTURES_H_
#define MERGEGUARD_TESTS_CORE_DEFENSE_FIXTURES_H_

// A tiny in-memory world for the AdaMerging and DAM unit tests: a two-layer
// TorchScript architecture (784 -> 16 -> 8 features), a random base, task
// vectors and heads, and random calibration inputs.

#include <torch/script.h>
#include <torch/torch.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/model.h"
#include "core/task_vectors.h"
#include "gtest/gtest.h"

namespace mergeguard::testing {

inline torch::jit::Module DefenseTinyModule() {
  auto unit = std::make_shared<torch::jit::CompilationUnit>();
  auto linear = [&](int64_t in, int64_t out) {
    torch::jit::Module m(c10::QualifiedName("__torch__.defense.Linear"), unit,
                         true);
    m.register_parameter("weight", torch::zeros({out, in}), false);
    m.register_parameter("bias", torch::zeros({out}), false);
    m.define(
        "def forward(self, x):\n"
        "    return torch.linear(x, self.weight, self.bias)\n");
    return m;
  };
  torch::jit::Module root(c10::QualifiedName("__torch__.defense.Tiny"), unit,
                          true);
  root.register_module("fc1", linear(784, 16));
  root.register_module("fc2", linear(16, 8));
  root.define(
      "def forward(self, x):\n"
      "    h = torch.relu(self.fc1.forward(torch.flatten(x, 1)))\n"
      "    return torch.tanh(self.fc2.forward(h))\n");
  return root;
}

inline std::unique_ptr<Model> DefenseTinyModel() {
  auto model = Model::FromModule(DefenseTinyModule());
  EXPECT_TRUE(model.ok()) << model.status();
  return model.ok() ? std::move(*model) : nullptr;
}

inline NamedTensors DefenseTinyBase(uint64_t seed = 1) {
  torch::manual_seed(seed);
  return {{"fc1.bias", torch::randn({16}) * 0.1},
          {"fc1.weight", torch::randn({16, 784}) * 0.05},
          {"fc2.bias", torch::randn({8}) * 0.1},
          {"fc2.weight", torch::randn({8, 16}) * 0.3}};
}

// DefenseTinySet returns an in-memory set of `tasks` tasks with 3-class
// heads and task vectors of about a tenth of the base's scale.
inline TaskVectorSet DefenseTinySet(int tasks = 3, uint64_t seed = 1) {
  TaskVectorSet set;
  for (auto& [key, tensor] : DefenseTinyBase(seed)) {
    set.keys.push_back(key);
    set.base.push_back(tensor);
  }
  torch::manual_seed(seed + 100);
  for (int t = 0; t < tasks; ++t) {
    set.task_names.push_back(absl::StrCat("task", t));
    std::vector<torch::Tensor> vectors;
    for (const torch::Tensor& base : set.base) {
      vectors.push_back(torch::randn_like(base) * 0.5 * base.std());
    }
    set.task_vectors.push_back(vectors);
    set.heads.push_back({torch::randn({3, 8}) * 2, torch::randn({3}) * 0.1});
  }
  return set;
}

inline std::vector<torch::Tensor> DefenseTinyCalibration(int tasks = 3,
                                                         int64_t size = 24,
                                                         uint64_t seed = 5) {
  torch::manual_seed(seed);
  std::vector<torch::Tensor> calibration;
  for (int t = 0; t < tasks; ++t) {
    calibration.push_back(torch::rand({size, 1, 28, 28}));
  }
  return calibration;
}

// TempDir is a scratch directory removed at destruction.
class TempDir {
 public:
  TempDir() {
    std::string pattern = absl::StrCat(::testing::TempDir(), "/defense_XXXXXX");
    path_ = ::mkdtemp(pattern.data()) ? pattern : "";
  }
  ~TempDir() {
    if (!path_.empty()) {
      std::string cmd = absl::StrCat("rm -rf '", path_, "'");
      EXPECT_EQ(std::system(cmd.c_str()), 0);
    }
  }
  std::string Path(const std::string& name) const {
    return absl::StrCat(path_, "/", name);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace mergeguard::testing

#endif  // MERGEGUARD_TESTS_CORE_DEFENSE_FIXTURES_H_
