#include "bench/scenario_eval.h"

#include <torch/torch.h>

#include <map>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "core/model.h"
#include "core/status_macros.h"
#include "core/tensor_views.h"
#include "core/thread_pool.h"
#include "nlohmann/json.hpp"

namespace mergeguard::bench {

absl::StatusOr<ModelEvaluation> EvaluateModelFile(
    const Scenario& scenario, const std::string& model_path,
    const ScenarioEvalOptions& options) {
  ASSIGN_OR_RETURN(std::unique_ptr<Model> architecture,
                   Model::Load(scenario.Path(scenario.architecture.file)));
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(model_path));
  // Backbone: everything but heads; heads by task.
  NamedTensors backbone;
  for (const auto& [name, tensor] : tensors) {
    if (!IsHeadKey(name)) backbone.emplace_back(name, tensor);
  }
  absl::Status loaded = architecture->LoadBackbone(backbone);
  if (!loaded.ok()) {
    return absl::Status(
        loaded.code(),
        absl::StrCat(model_path, " does not fit architecture ",
                     scenario.architecture.name, ": ", loaded.message()));
  }
  std::optional<Trigger> trigger;
  if (scenario.attack) {
    ASSIGN_OR_RETURN(trigger, LoadScenarioTrigger(scenario));
  }

  const size_t n = scenario.tasks.size();
  ModelEvaluation evaluation;
  evaluation.tasks.resize(n);
  std::vector<std::optional<TaskAttack>> attacks(n);
  int threads =
      options.threads > 0
          ? options.threads
          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int workers = std::max(1, std::min<int>(threads, static_cast<int>(n)));
  const int intra_op = std::max(1, threads / workers);
  absl::Mutex mu;
  absl::Status first_error;
  EvalOptions eval_options;
  eval_options.batch_size = options.batch_size;
  ParallelFor(n, static_cast<size_t>(workers), [&](size_t i) {
    at::set_num_threads(intra_op);
    absl::Status status = [&]() -> absl::Status {
      const ScenarioTask& task = scenario.tasks[i];
      TaskAccuracy& result = evaluation.tasks[i];
      result.name = task.name;
      absl::StatusOr<Head> head =
          HeadFromTensors(tensors, absl::StrCat(task.name, "/", kHeadPrefix));
      result.head_source = "model";
      if (absl::IsNotFound(head.status())) {
        ASSIGN_OR_RETURN(NamedTensors checkpoint,
                         LoadTensorsFromPath(scenario.Path(task.checkpoint)));
        head = HeadFromTensors(checkpoint, kHeadPrefix);
        result.head_source = "scenario";
      }
      if (!head.ok()) return head.status();
      if (head->NumClasses() != static_cast<int64_t>(task.classes.size())) {
        return absl::FailedPreconditionError(absl::StrCat(
            "head of task ", task.name, " has ", head->NumClasses(),
            " classes; the task has ", task.classes.size()));
      }
      ASSIGN_OR_RETURN(std::unique_ptr<Model> model, architecture->Clone());
      ASSIGN_OR_RETURN(LabeledImages test,
                       LoadLabeledImages(scenario.Path(task.test)));
      ASSIGN_OR_RETURN(torch::Tensor predictions,
                       Predict(*model, *head, test.inputs, eval_options));
      result.accuracy = Accuracy(predictions, test.labels);
      result.normalized_accuracy =
          NormalizedAccuracy(result.accuracy, task.clean_finetuned_accuracy);
      if (task.compromised && trigger) {
        const int64_t target = scenario.attack->target_class;
        ASSIGN_OR_RETURN(AttackResult attack,
                         EvaluateAttack(*model, *head, test, *trigger, target,
                                        eval_options));
        attacks[i] = TaskAttack{
            task.name, target, task.classes[target], attack.asr,
            attack.evaluated,
            AttackSuccessRate(predictions, test.labels, target).asr};
      }
      return absl::OkStatus();
    }();
    if (!status.ok()) {
      absl::MutexLock lock(&mu);
      if (first_error.ok()) first_error = status;
    }
  });
  RETURN_IF_ERROR(first_error);
  for (const TaskAccuracy& task : evaluation.tasks) {
    evaluation.mean_accuracy += task.accuracy / static_cast<double>(n);
    evaluation.mean_normalized_accuracy +=
        task.normalized_accuracy / static_cast<double>(n);
  }
  for (const auto& attack : attacks) {
    if (attack) evaluation.asr.push_back(*attack);
  }
  return evaluation;
}

std::string EvaluationToJson(const Scenario& scenario,
                             const std::string& model_path,
                             const ModelEvaluation& evaluation) {
  nlohmann::json tasks = nlohmann::json::array();
  for (const TaskAccuracy& task : evaluation.tasks) {
    tasks.push_back({{"name", task.name},
                     {"accuracy", task.accuracy},
                     {"normalized_accuracy", task.normalized_accuracy},
                     {"head", task.head_source}});
  }
  nlohmann::json asr = nlohmann::json::array();
  for (const TaskAttack& attack : evaluation.asr) {
    asr.push_back({{"task", attack.task},
                   {"target", attack.target},
                   {"target_name", attack.target_name},
                   {"asr", attack.asr},
                   {"untriggered", attack.untriggered},
                   {"evaluated", attack.evaluated}});
  }
  nlohmann::json root = {
      {"scenario", scenario.name},
      {"model", model_path},
      {"tasks", std::move(tasks)},
      {"mean_accuracy", evaluation.mean_accuracy},
      {"mean_normalized_accuracy", evaluation.mean_normalized_accuracy},
      {"asr", std::move(asr)}};
  return root.dump(2) + "\n";
}

std::string EvaluationToText(const ModelEvaluation& evaluation) {
  std::string out = absl::StrFormat("%-10s %9s %11s  %s\n", "task", "accuracy",
                                    "normalized", "head");
  for (const TaskAccuracy& task : evaluation.tasks) {
    absl::StrAppendFormat(&out, "%-10s %8.2f%% %11.3f  %s\n", task.name,
                          100.0 * task.accuracy, task.normalized_accuracy,
                          task.head_source);
  }
  absl::StrAppendFormat(&out, "%-10s %8.2f%% %11.3f\n", "mean",
                        100.0 * evaluation.mean_accuracy,
                        evaluation.mean_normalized_accuracy);
  for (const TaskAttack& attack : evaluation.asr) {
    absl::StrAppendFormat(&out,
                          "ASR %s -> class %d (%s): %.2f%% of %d triggered "
                          "test images (%.2f%% untriggered)\n",
                          attack.task, attack.target, attack.target_name,
                          100.0 * attack.asr, attack.evaluated,
                          100.0 * attack.untriggered);
  }
  return out;
}

absl::StatusOr<std::map<std::string, Trigger>> AttackTriggers(
    const Scenario& scenario) {
  if (!scenario.attack.has_value()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "scenario ", scenario.name, " has no attack, so no known trigger"));
  }
  ASSIGN_OR_RETURN(Trigger trigger, LoadScenarioTrigger(scenario));
  std::map<std::string, Trigger> triggers;
  for (const std::string& task : scenario.attack->tasks) {
    triggers[task] = trigger;
  }
  return triggers;
}

}  // namespace mergeguard::bench
