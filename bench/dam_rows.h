#ifndef MERGEGUARD_BENCH_DAM_ROWS_H_
#define MERGEGUARD_BENCH_DAM_ROWS_H_

// The data-dependent rows of `mergeguard-bench table`: AdaMerging (the
// undefended data-dependent baseline) and DAM, each run on the clean
// fine-tunes (CA) and on the inputs that include the backdoored ones (BA,
// ASR), with the scenario's calibration sets as unlabeled data. Costs (time
// per step, peak RSS) are measured on the backdoored run.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/merge_table.h"
#include "core/adamerging.h"
#include "core/dam.h"
#include "core/merge.h"
#include "core/scenario.h"

namespace mergeguard::bench {

// ScenarioDataDependentTasks pairs each input with its scenario task's
// calibration file. NOT_FOUND when an input names no task of `scenario`.
absl::StatusOr<std::vector<DataDependentTask>> ScenarioDataDependentTasks(
    const Scenario& scenario, const std::vector<MergeInput>& inputs);

// AdaMergingProducer and DamProducer plug the methods into RunTable.
RowProducer AdaMergingProducer(const AdaMergingOptions& options,
                               const std::string& name = "AdaMerging");
// With `known_trigger`, DAM gets the attack's trigger for each compromised
// task (DamOptions::known_triggers; an oracle diagnostic).
RowProducer DamProducer(const DamOptions& options,
                        const std::string& name = "DAM",
                        bool known_trigger = false);

struct DefenseRowOptions {
  AdaMergingOptions adamerging;
  DamOptions dam;
  // Run the AdaMerging row (it shares DAM's inner loop, so it is the
  // undefended reference of the same family).
  bool run_adamerging = true;
  bool run_dam = true;
  // Where merged models go; empty uses a temporary directory.
  std::string work_dir;
  ScenarioEvalOptions eval;
};

// DefenseRow is one method's table row plus what it cost.
struct DefenseRow {
  TableRow row;
  // Optimization steps of the backdoored run: DAM's outer steps (phase 1),
  // AdaMerging's steps.
  int64_t steps = 0;
  // Seconds per outer step (DAM phase 1) or per step (AdaMerging).
  double seconds_per_step = 0.0;
  // Wall seconds of the backdoored run's merge, all phases.
  double merge_seconds = 0.0;
  // Peak resident set during the backdoored run, in bytes (VmHWM after a
  // reset through /proc/self/clear_refs; the process's peak so far when the
  // reset is refused, flagged by peak_rss_is_process_peak).
  int64_t peak_rss_bytes = 0;
  bool peak_rss_is_process_peak = false;
  // DAM only: the report summary of the backdoored run.
  double m2_flagged_fraction = 0.0;
  double trigger_linf = 0.0;
};

// RunDefenseRows runs the enabled methods on `scenario` and evaluates them
// as RunTable does.
absl::StatusOr<std::vector<DefenseRow>> RunDefenseRows(
    const Scenario& scenario, const DefenseRowOptions& options);

// DefenseRowsToText prints the rows (TableToText) followed by their costs.
std::string DefenseRowsToText(const Scenario& scenario,
                              const std::vector<DefenseRow>& rows);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_DAM_ROWS_H_
