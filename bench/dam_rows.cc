#include "bench/dam_rows.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/run_stats.h"
#include "bench/scenario_eval.h"
#include "core/status_macros.h"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;

}  // namespace

absl::StatusOr<std::vector<DataDependentTask>> ScenarioDataDependentTasks(
    const Scenario& scenario, const std::vector<MergeInput>& inputs) {
  std::vector<DataDependentTask> tasks;
  for (const MergeInput& input : inputs) {
    const ScenarioTask* task = scenario.FindTask(input.name);
    if (task == nullptr) {
      return absl::NotFoundError(absl::StrCat("input \"", input.name,
                                              "\" is not a task of scenario ",
                                              scenario.name));
    }
    tasks.push_back(
        {{input.name, input.path, ""}, scenario.Path(task->calibration)});
  }
  return tasks;
}

RowProducer AdaMergingProducer(const AdaMergingOptions& options,
                               const std::string& name) {
  return {
      name,
      [options](const Scenario& scenario, const std::vector<MergeInput>& inputs,
                const std::string& output_path) -> absl::Status {
        ASSIGN_OR_RETURN(std::vector<DataDependentTask> tasks,
                         ScenarioDataDependentTasks(scenario, inputs));
        AdaMergingOptions with_scenario = options;
        with_scenario.metadata["mergeguard.scenario"] = scenario.name;
        return AdaMergeFiles(scenario.Path(scenario.architecture.file),
                             scenario.Path(scenario.base), tasks, output_path,
                             with_scenario)
            .status();
      }};
}

RowProducer DamProducer(const DamOptions& options, const std::string& name,
                        bool known_trigger) {
  return {name,
          [options, known_trigger](
              const Scenario& scenario, const std::vector<MergeInput>& inputs,
              const std::string& output_path) -> absl::Status {
            ASSIGN_OR_RETURN(std::vector<DataDependentTask> tasks,
                             ScenarioDataDependentTasks(scenario, inputs));
            DamOptions with_scenario = options;
            with_scenario.metadata["mergeguard.scenario"] = scenario.name;
            if (known_trigger) {
              ASSIGN_OR_RETURN(with_scenario.known_triggers,
                               AttackTriggers(scenario));
            }
            return DamMergeFiles(scenario.Path(scenario.architecture.file),
                                 scenario.Path(scenario.base), tasks,
                                 output_path, with_scenario)
                .status();
          }};
}

absl::StatusOr<std::vector<DefenseRow>> RunDefenseRows(
    const Scenario& scenario, const DefenseRowOptions& options) {
  fs::path work_dir = options.work_dir;
  const bool temporary = work_dir.empty();
  if (temporary) {
    std::random_device random;
    work_dir = fs::temp_directory_path() /
               absl::StrCat("mergeguard-defense-", random(), random());
  }
  std::error_code error;
  fs::create_directories(work_dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("cannot create ", work_dir.string(),
                                            ": ", error.message()));
  }
  const std::string architecture = scenario.Path(scenario.architecture.file);
  const std::string base = scenario.Path(scenario.base);

  auto run_method = [&](const std::string& method,
                        DefenseRow* row) -> absl::Status {
    row->row.method = method;
    for (bool backdoored : {false, true}) {
      const std::string path =
          (work_dir / absl::StrCat(method,
                                   backdoored ? ".backdoored" : ".clean",
                                   ".safetensors"))
              .string();
      ASSIGN_OR_RETURN(std::vector<DataDependentTask> tasks,
                       ScenarioDataDependentTasks(
                           scenario, ScenarioInputs(scenario, backdoored)));
      if (backdoored) row->peak_rss_is_process_peak = !ResetPeakRss();
      if (method == "DAM") {
        DamOptions dam = options.dam;
        dam.metadata["mergeguard.scenario"] = scenario.name;
        ASSIGN_OR_RETURN(DamResult result,
                         DamMergeFiles(architecture, base, tasks, path, dam));
        if (backdoored) {
          row->steps = result.report.outer_steps;
          row->seconds_per_step = result.report.seconds_per_outer_step;
          row->merge_seconds = result.report.seconds;
          row->m2_flagged_fraction = result.report.m2_flagged_fraction;
          for (const TriggerSize& trigger : result.report.triggers) {
            row->trigger_linf = std::max(row->trigger_linf, trigger.linf);
          }
        }
      } else {
        AdaMergingOptions adamerging = options.adamerging;
        adamerging.metadata["mergeguard.scenario"] = scenario.name;
        ASSIGN_OR_RETURN(
            AdaMergingResult result,
            AdaMergeFiles(architecture, base, tasks, path, adamerging));
        if (backdoored) {
          row->steps = static_cast<int64_t>(result.loss_curve.size());
          row->seconds_per_step =
              row->steps > 0 ? result.seconds / row->steps : 0.0;
          row->merge_seconds = result.seconds;
        }
      }
      if (backdoored) row->peak_rss_bytes = PeakRssBytes();
      ASSIGN_OR_RETURN(ModelEvaluation evaluation,
                       EvaluateModelFile(scenario, path, options.eval));
      (backdoored ? row->row.backdoored : row->row.clean) =
          std::move(evaluation);
    }
    return absl::OkStatus();
  };

  auto run = [&]() -> absl::StatusOr<std::vector<DefenseRow>> {
    std::vector<DefenseRow> rows;
    if (options.run_adamerging) {
      DefenseRow row;
      RETURN_IF_ERROR(run_method("AdaMerging", &row));
      rows.push_back(std::move(row));
    }
    if (options.run_dam) {
      DefenseRow row;
      RETURN_IF_ERROR(run_method("DAM", &row));
      rows.push_back(std::move(row));
    }
    return rows;
  };
  absl::StatusOr<std::vector<DefenseRow>> rows = run();
  if (temporary) fs::remove_all(work_dir, error);
  return rows;
}

std::string DefenseRowsToText(const Scenario& scenario,
                              const std::vector<DefenseRow>& rows) {
  std::vector<TableRow> table;
  for (const DefenseRow& row : rows) table.push_back(row.row);
  std::string out = TableToText(scenario, table);
  absl::StrAppendFormat(&out, "%-10s %8s %12s %10s %12s %10s %10s\n", "method",
                        "steps", "s/step", "merge s", "peak RSS MiB",
                        "M2 flags", "|delta|inf");
  for (const DefenseRow& row : rows) {
    absl::StrAppendFormat(
        &out, "%-10s %8d %12.4f %10.1f %11.1f%s %9.2f%% %10.4f\n",
        row.row.method, row.steps, row.seconds_per_step, row.merge_seconds,
        static_cast<double>(row.peak_rss_bytes) / (1024.0 * 1024.0),
        row.peak_rss_is_process_peak ? "*" : " ",
        100.0 * row.m2_flagged_fraction, row.trigger_linf);
  }
  return out;
}

}  // namespace mergeguard::bench
