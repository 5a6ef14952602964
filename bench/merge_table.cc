#include "bench/merge_table.h"

#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;

RowProducer DataFreeProducer(const std::string& name, MergeMethod method) {
  return {
      name,
      [method](const Scenario& scenario, const std::vector<MergeInput>& inputs,
               const std::string& output_path) -> absl::Status {
        MergeOptions options;
        options.method = method;
        options.metadata = {{"mergeguard.scenario", scenario.name}};
        return Merge(scenario.Path(scenario.base), inputs, output_path, options)
            .status();
      }};
}

std::vector<MergeInput> Inputs(const Scenario& scenario, bool backdoored) {
  std::vector<MergeInput> inputs;
  for (const ScenarioTask& task : scenario.tasks) {
    inputs.push_back(
        {task.name,
         scenario.Path(backdoored ? task.checkpoint : task.clean_checkpoint),
         1.0});
  }
  return inputs;
}

nlohmann::json EvaluationJson(const ModelEvaluation& evaluation) {
  nlohmann::json tasks = nlohmann::json::array();
  for (const TaskAccuracy& task : evaluation.tasks) {
    tasks.push_back({{"name", task.name},
                     {"accuracy", task.accuracy},
                     {"normalized_accuracy", task.normalized_accuracy}});
  }
  nlohmann::json asr = nlohmann::json::array();
  for (const TaskAttack& attack : evaluation.asr) {
    asr.push_back({{"task", attack.task},
                   {"target", attack.target},
                   {"asr", attack.asr},
                   {"untriggered", attack.untriggered}});
  }
  return {{"tasks", tasks},
          {"mean_accuracy", evaluation.mean_accuracy},
          {"mean_normalized_accuracy", evaluation.mean_normalized_accuracy},
          {"asr", asr}};
}

}  // namespace

std::vector<RowProducer> UndefendedProducers() {
  return {DataFreeProducer("TA", MergeMethod::kTaskArithmetic),
          DataFreeProducer("TIES", MergeMethod::kTies)};
}

absl::StatusOr<std::vector<TableRow>> RunTable(
    const Scenario& scenario, const std::vector<RowProducer>& producers,
    const TableOptions& options) {
  fs::path work_dir = options.work_dir;
  const bool temporary = work_dir.empty();
  if (temporary) {
    std::random_device random;
    work_dir = fs::temp_directory_path() /
               absl::StrCat("mergeguard-table-", random(), random());
  }
  std::error_code error;
  fs::create_directories(work_dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("cannot create ", work_dir.string(),
                                            ": ", error.message()));
  }
  auto run = [&]() -> absl::StatusOr<std::vector<TableRow>> {
    std::vector<TableRow> rows;
    for (const RowProducer& producer : producers) {
      TableRow row;
      row.method = producer.name;
      for (bool backdoored : {false, true}) {
        const std::string path =
            (work_dir / absl::StrCat(producer.name,
                                     backdoored ? ".backdoored" : ".clean",
                                     ".safetensors"))
                .string();
        absl::Status merged =
            producer.merge(scenario, Inputs(scenario, backdoored), path);
        if (!merged.ok()) {
          return absl::Status(merged.code(), absl::StrCat(producer.name, ": ",
                                                          merged.message()));
        }
        ASSIGN_OR_RETURN(ModelEvaluation evaluation,
                         EvaluateModelFile(scenario, path, options.eval));
        (backdoored ? row.backdoored : row.clean) = std::move(evaluation);
      }
      rows.push_back(std::move(row));
    }
    return rows;
  };
  absl::StatusOr<std::vector<TableRow>> rows = run();
  if (temporary) fs::remove_all(work_dir, error);
  return rows;
}

std::string TableToText(const Scenario& scenario,
                        const std::vector<TableRow>& rows) {
  std::string out =
      absl::StrFormat("scenario %s (%s, %d tasks)\n", scenario.name,
                      scenario.architecture.name, scenario.tasks.size());
  if (scenario.attack) {
    absl::StrAppendFormat(&out, "attack %s on", scenario.attack->kind);
    for (const std::string& task : scenario.attack->tasks) {
      absl::StrAppend(&out, " ", task);
    }
    absl::StrAppendFormat(&out, ", target class %d\n",
                          scenario.attack->target_class);
  }
  absl::StrAppendFormat(&out, "%-10s %8s %8s %8s %8s", "method", "CA",
                        "CA-norm", "BA", "BA-norm");
  const bool has_attack = !rows.empty() && !rows[0].backdoored.asr.empty();
  if (has_attack) {
    for (const TaskAttack& attack : rows[0].backdoored.asr) {
      absl::StrAppendFormat(&out, " %14s %14s",
                            absl::StrCat("ASR(", attack.task, ")"),
                            absl::StrCat("cleanASR(", attack.task, ")"));
    }
  }
  absl::StrAppend(&out, "\n");
  for (const TableRow& row : rows) {
    absl::StrAppendFormat(&out, "%-10s %7.2f%% %8.3f %7.2f%% %8.3f", row.method,
                          100.0 * row.clean.mean_accuracy,
                          row.clean.mean_normalized_accuracy,
                          100.0 * row.backdoored.mean_accuracy,
                          row.backdoored.mean_normalized_accuracy);
    for (size_t i = 0; i < row.backdoored.asr.size(); ++i) {
      absl::StrAppendFormat(
          &out, " %13.2f%% %13.2f%%", 100.0 * row.backdoored.asr[i].asr,
          i < row.clean.asr.size() ? 100.0 * row.clean.asr[i].asr : 0.0);
    }
    absl::StrAppend(&out, "\n");
  }
  absl::StrAppend(&out,
                  "CA: mean accuracy of the merge of clean fine-tunes; BA: "
                  "with the backdoored fine-tune(s); -norm: normalized by "
                  "each task's clean fine-tune; ASR: backdoored merge; "
                  "cleanASR: the same trigger on the clean merge\n");
  return out;
}

std::string TableToJson(const Scenario& scenario,
                        const std::vector<TableRow>& rows) {
  nlohmann::json out_rows = nlohmann::json::array();
  for (const TableRow& row : rows) {
    nlohmann::json asr = nlohmann::json::array();
    for (size_t i = 0; i < row.backdoored.asr.size(); ++i) {
      asr.push_back({{"task", row.backdoored.asr[i].task},
                     {"target", row.backdoored.asr[i].target},
                     {"asr", row.backdoored.asr[i].asr},
                     {"untriggered", row.backdoored.asr[i].untriggered},
                     {"clean_merge_asr",
                      i < row.clean.asr.size() ? row.clean.asr[i].asr : 0.0}});
    }
    out_rows.push_back({{"method", row.method},
                        {"ca", row.clean.mean_accuracy},
                        {"ba", row.backdoored.mean_accuracy},
                        {"asr", asr},
                        {"clean", EvaluationJson(row.clean)},
                        {"backdoored", EvaluationJson(row.backdoored)}});
  }
  nlohmann::json root = {{"scenario", scenario.name}, {"rows", out_rows}};
  return root.dump(2) + "\n";
}

}  // namespace mergeguard::bench
