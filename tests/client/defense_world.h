#ifndef MERGEGUARD_TESTS_CLIENT_DEFENSE_WORLD_H_
#define MERGEGUARD_TESTS_CLIENT_DEFENSE_WORLD_H_

// A tiny world on disk for running AdaMerging, DAM and LFPM through the CLI:
// the TorchScript architecture of tests/core/defense_fixtures.h, a base, task
// checkpoints with 3-class heads and labelled calibration sets.

#include <torch/torch.h>

#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/tensor_views.h"
#include "gtest/gtest.h"
#include "tests/core/defense_fixtures.h"

namespace mergeguard::testing {

// The task names WriteDefenseWorld uses.
inline std::vector<std::string> DefenseWorldTasks() {
  return {"alpha", "beta"};
}

// WriteDefenseWorld writes into `dir`: tiny.pt, base.safetensors and, per
// task, TASK.safetensors (backbone plus head.weight/head.bias) and
// TASK_cal.safetensors (`inputs` [8, 1, 28, 28] in [0, 1], `labels` int64).
inline void WriteDefenseWorld(const std::string& dir) {
  DefenseTinyModule().save(absl::StrCat(dir, "/tiny.pt"));
  const NamedTensors base = DefenseTinyBase();
  ASSERT_TRUE(SaveTensors(absl::StrCat(dir, "/base.safetensors"), base).ok());
  torch::manual_seed(11);
  for (const std::string& task : DefenseWorldTasks()) {
    NamedTensors model;
    for (const auto& [key, tensor] : base) {
      model.emplace_back(
          key, tensor + torch::randn_like(tensor) * 0.5 * tensor.std());
    }
    model.emplace_back("head.weight", torch::randn({3, 8}) * 2);
    model.emplace_back("head.bias", torch::randn({3}) * 0.1);
    ASSERT_TRUE(
        SaveTensors(absl::StrCat(dir, "/", task, ".safetensors"), model).ok());
    ASSERT_TRUE(
        SaveTensors(absl::StrCat(dir, "/", task, "_cal.safetensors"),
                    {{"inputs", torch::rand({8, 1, 28, 28})},
                     {"labels", torch::randint(0, 3, {8}, torch::kLong)}})
            .ok());
  }
}

// DefenseJobYaml returns a job file over WriteDefenseWorld's files;
// `parameters` is the YAML of the `parameters:` block, indented by two.
inline std::string DefenseJobYaml(const std::string& method,
                                  const std::string& architecture,
                                  const std::string& parameters) {
  std::string yaml =
      absl::StrCat("method: ", method, "\narchitecture: ", architecture,
                   "\nbase: base.safetensors\nmodels:\n");
  for (const std::string& task : DefenseWorldTasks()) {
    absl::StrAppend(&yaml, "  - {name: ", task, ", path: ", task,
                    ".safetensors, calibration: ", task, "_cal.safetensors}\n");
  }
  return absl::StrCat(yaml, "threads: 1\nparameters:\n", parameters);
}

// The backbone keys of the tiny architecture.
inline std::vector<std::string> DefenseWorldBackboneKeys() {
  return {"fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"};
}

}  // namespace mergeguard::testing

#endif  // MERGEGUARD_TESTS_CLIENT_DEFENSE_WORLD_H_
