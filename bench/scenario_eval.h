#ifndef MERGEGUARD_BENCH_SCENARIO_EVAL_H_
#define MERGEGUARD_BENCH_SCENARIO_EVAL_H_

// `mergeguard-bench eval`: any model on a scenario. The model file holds a
// backbone and, optionally, heads as `<task>/head.weight` (what merges
// write); a task without its head in the file uses the head of the
// scenario's task checkpoint.

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/scenario.h"

namespace mergeguard::bench {

struct TaskAccuracy {
  std::string name;
  double accuracy = 0.0;
  // accuracy / the task's clean fine-tune accuracy (scenario.json).
  double normalized_accuracy = 0.0;
  // Where the head came from: "model" or "scenario".
  std::string head_source;
};

struct TaskAttack {
  std::string task;
  int64_t target = 0;
  std::string target_name;
  double asr = 0.0;
  int64_t evaluated = 0;
  // The same examples without the trigger: the share the model sends to the
  // target on its own. ASR counts these too, so this is the floor the
  // trigger's effect sits on.
  double untriggered = 0.0;
};

struct ModelEvaluation {
  std::vector<TaskAccuracy> tasks;
  double mean_accuracy = 0.0;
  double mean_normalized_accuracy = 0.0;
  // One entry per compromised task; empty when the scenario has no attack.
  std::vector<TaskAttack> asr;
};

struct ScenarioEvalOptions {
  // Threads in all (0 = hardware concurrency); tasks run in parallel.
  int threads = 0;
  // Examples per forward pass.
  int64_t batch_size = 500;
};

// EvaluateModelFile evaluates the checkpoint at `model_path` on every task
// of `scenario`. FAILED_PRECONDITION when the backbone does not fit the
// scenario's architecture.
absl::StatusOr<ModelEvaluation> EvaluateModelFile(
    const Scenario& scenario, const std::string& model_path,
    const ScenarioEvalOptions& options = {});

// EvaluationToJson returns the documented JSON (docs/scenario.md):
// {"model":..,"scenario":..,"tasks":[{"name","accuracy",
// "normalized_accuracy","head"}],"mean_accuracy","mean_normalized_accuracy",
// "asr":[{"task","target","target_name","asr","evaluated"}]}.
std::string EvaluationToJson(const Scenario& scenario,
                             const std::string& model_path,
                             const ModelEvaluation& evaluation);
// EvaluationToText returns a human-readable table.
std::string EvaluationToText(const ModelEvaluation& evaluation);

// AttackTriggers returns the scenario's trigger for each compromised task,
// for the oracle diagnostics that hand a defense the real trigger.
// FAILED_PRECONDITION when the scenario has no attack.
absl::StatusOr<std::map<std::string, Trigger>> AttackTriggers(
    const Scenario& scenario);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_SCENARIO_EVAL_H_
