#ifndef MERGEGUARD_BENCH_MERGE_TABLE_H_
#define MERGEGUARD_BENCH_MERGE_TABLE_H_

// `mergeguard-bench table`: every merge method of a list of row producers is
// run twice on one scenario, on the clean fine-tunes only (CA) and with the
// backdoored ones (BA, ASR), and the results are printed side by side.
// Defenses join the table by adding a producer (ALGORITHMS.md §6).

#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "bench/scenario_eval.h"
#include "core/merge.h"
#include "core/scenario.h"

namespace mergeguard::bench {

// RowProducer merges `inputs` (one per task, heads included) of `scenario`
// into a model file at `output_path`: a backbone plus `<task>/head.*`.
struct RowProducer {
  // Row label, e.g. "TA", "TIES", "DAM".
  std::string name;
  std::function<absl::Status(const Scenario& scenario,
                             const std::vector<MergeInput>& inputs,
                             const std::string& output_path)>
      merge;
};

// UndefendedProducers returns the data-free merges: TA (lambda 0.3) and
// TIES (top 20%, lambda 1.0), with core/merge.h's defaults.
std::vector<RowProducer> UndefendedProducers();

struct TableRow {
  std::string method;
  // Merge of clean fine-tunes only.
  ModelEvaluation clean;
  // Merge including the backdoored fine-tunes.
  ModelEvaluation backdoored;
};

struct TableOptions {
  // Where merged models are written; empty uses a temporary directory
  // (removed afterwards).
  std::string work_dir;
  ScenarioEvalOptions eval;
};

// RunTable runs every producer on `scenario`.
absl::StatusOr<std::vector<TableRow>> RunTable(
    const Scenario& scenario, const std::vector<RowProducer>& producers,
    const TableOptions& options = {});

// TableToText prints CA, BA and ASR per compromised task (of the backdoored
// merge, and of the clean merge as the false-trigger baseline).
std::string TableToText(const Scenario& scenario,
                        const std::vector<TableRow>& rows);
// TableToJson returns {"scenario":..,"rows":[{"method","ca","ba",
// "asr":[{"task","target","asr","clean_merge_asr"}],"clean":{eval},
// "backdoored":{eval}}]}.
std::string TableToJson(const Scenario& scenario,
                        const std::vector<TableRow>& rows);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_MERGE_TABLE_H_
