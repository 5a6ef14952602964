#ifndef MERGEGUARD_BENCH_LFPM_ROWS_H_
#define MERGEGUARD_BENCH_LFPM_ROWS_H_

// The LFPM rows of `mergeguard-bench table`: LFPM (full and PEFT) repairs
// the task-arithmetic merge of the scenario's inputs, with the scenario's
// calibration sets, and is evaluated as RunTable evaluates every method
// (CA on the clean fine-tunes, BA and ASR with the backdoored ones). Beside
// the row: the path curve, time per outer step, peak RSS, and the adaptive
// check, BadMerging's patch re-optimized against the repaired model.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/merge_table.h"
#include "bench/scenario_eval.h"
#include "bench/training.h"
#include "core/lfpm.h"
#include "core/merge.h"
#include "core/scenario.h"

namespace mergeguard::bench {

// ScenarioLfpmCalibration returns each input's scenario calibration file.
// NOT_FOUND when an input names no task of `scenario`.
absl::StatusOr<std::vector<LfpmCalibrationFile>> ScenarioLfpmCalibration(
    const Scenario& scenario, const std::vector<MergeInput>& inputs);

// LfpmProducer plugs LFPM into RunTable: TA-merges `inputs` (core/merge.h
// defaults, λ = 0.3), then repairs the merge with `options`. With
// `known_trigger`, LFPM gets the attack's trigger and target for each
// compromised task (LfpmKnownTrigger; an oracle diagnostic).
RowProducer LfpmProducer(const LfpmOptions& options, const std::string& name,
                         bool known_trigger = false);

struct LfpmRowOptions {
  // Shared settings; `mode` is set per row from `modes`.
  LfpmOptions lfpm;
  std::vector<LfpmMode> modes = {LfpmMode::kFull, LfpmMode::kPeft};
  // Also repair the clean fine-tunes' merge, for the CA column (doubles the
  // cost; without it CA is the TA merge's).
  bool repair_clean_merge = true;
  // Re-optimize the patch against the repaired model (patch triggers only).
  bool adaptive_check = true;
  // Oracle diagnostic: hand LFPM the attack's own trigger and target for
  // each compromised task (LfpmKnownTrigger) instead of mining one, to tell
  // a miner that misses the backdoor from an unlearning step that cannot
  // remove it.
  bool known_trigger = false;
  // The adaptive attacker's patch optimization, on the compromised task's
  // calibration set, starting from the scenario's patch.
  OptimizerOptions adaptive_patch = {/*steps=*/300, /*batch_size=*/64,
                                     /*learning_rate=*/0.05,
                                     /*weight_decay=*/0.0,
                                     /*warmup_fraction=*/0.0};
  uint64_t adaptive_seed = 0;
  // Where models go; empty uses a temporary directory.
  std::string work_dir;
  ScenarioEvalOptions eval;
};

// AdaptiveAttack is the re-optimized patch's ASR on one compromised task.
struct AdaptiveAttack {
  std::string task;
  int64_t target = 0;
  // ASR of the scenario's own trigger, and the higher test ASR of the patch
  // re-optimized from two starts (the scenario's patch and mid-grey).
  double original_asr = 0.0;
  double adaptive_asr = 0.0;
};

// TriggerPatchOverlap compares one compromised task's mined masks M with
// the attack's patch mask P (1 on the patch, 0 elsewhere), per trigger:
// mass_on_patch = Σ M⊙P / ‖M‖1, the share of the mask that lies on the
// patch, and patch_covered = Σ M⊙P / ‖P‖1, the share of the patch the mask
// holds. It says whether LFPM unlearned the planted trigger or another way
// into the target class. Where the report has the patterns, it also says
// whether the mined pattern Q is the patch's pattern R where the two meet,
// with weights w = M⊙P summed over channels: pattern_gap = Σ w|Q − R| /
// Σ w (0 when they agree; in pixel units, as the patterns are in [0, 1])
// and pattern_correlation, the w-weighted Pearson correlation of Q and R
// (0 when unrelated, or when either is constant where w is).
struct TriggerPatchOverlap {
  std::string task;
  std::vector<double> mass_on_patch;
  std::vector<double> patch_covered;
  std::vector<double> pattern_gap;
  std::vector<double> pattern_correlation;
};

// PatchOverlaps returns the overlaps of `report`'s triggers on the tasks
// that `scenario` compromises with a patch; empty for a blend or no attack.
absl::StatusOr<std::vector<TriggerPatchOverlap>> PatchOverlaps(
    const Scenario& scenario, const LfpmReport& report);

struct LfpmRow {
  // "LFPM-full" or "LFPM-peft".
  TableRow row;
  LfpmMode mode = LfpmMode::kFull;
  // Of the backdoored run: LFPM's report (path curve, triggers, anomaly
  // index), time, and peak RSS (VmHWM after a reset through
  // /proc/self/clear_refs; the process peak when the reset is refused).
  LfpmReport report;
  double seconds = 0.0;
  double seconds_per_step = 0.0;
  int64_t peak_rss_bytes = 0;
  bool peak_rss_is_process_peak = false;
  std::vector<AdaptiveAttack> adaptive;
  // Of the backdoored run: its triggers against the attack's patch.
  std::vector<TriggerPatchOverlap> patch_overlap;
  // Of the clean merge's repair (repair_clean_merge): its report, whose
  // scans and gates show what the defense does to a merge with no
  // backdoor; `clean_repaired` says whether it ran.
  bool clean_repaired = false;
  LfpmReport clean_report;
  // The adaptive attack against the clean merge's repair: the control for
  // `adaptive`, what a re-optimized patch reaches on a repaired model that
  // never had a backdoor.
  std::vector<AdaptiveAttack> clean_adaptive;
};

struct LfpmRows {
  // The undefended TA merge, the repair's starting point.
  TableRow ta;
  // The adaptive attack against TA itself (the reference), and against
  // the clean fine-tunes' TA merge: the ASR a universal patch reaches with
  // no backdoor at all.
  std::vector<AdaptiveAttack> ta_adaptive;
  std::vector<AdaptiveAttack> clean_ta_adaptive;
  std::vector<LfpmRow> rows;
};

// MeanAsr returns the mean ASR over compromised tasks (0 without attack).
double MeanAsr(const ModelEvaluation& evaluation);

// RunLfpmRows runs TA and the LFPM modes on `scenario`.
absl::StatusOr<LfpmRows> RunLfpmRows(const Scenario& scenario,
                                     const LfpmRowOptions& options);

// LfpmRowsToText prints TA and LFPM rows (TableToText), then costs, path
// curves and the adaptive check.
std::string LfpmRowsToText(const Scenario& scenario, const LfpmRows& rows);
// LfpmRowsToJson returns {"table": TableToJson, "lfpm": [{"method",
// "seconds", "seconds_per_step", "peak_rss_bytes", "adaptive": [..],
// "patch_overlap": [..], "report": LfpmReportToJson, and with the clean
// repair "clean_report", "clean_adaptive": [..]}], "ta_adaptive": [..],
// "clean_ta_adaptive": [..]}.
std::string LfpmRowsToJson(const Scenario& scenario, const LfpmRows& rows);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_LFPM_ROWS_H_
