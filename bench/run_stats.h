#ifndef MERGEGUARD_BENCH_RUN_STATS_H_
#define MERGEGUARD_BENCH_RUN_STATS_H_

// Helpers shared by the defense table rows: peak memory of this process and
// a scenario's merge inputs.

#include <cstdint>
#include <vector>

#include "core/merge.h"
#include "core/scenario.h"

namespace mergeguard::bench {

// ResetPeakRss asks the kernel to restart VmHWM from the current RSS; false
// when the kernel refuses (then PeakRssBytes is the process-wide peak).
bool ResetPeakRss();
// PeakRssBytes returns VmHWM of this process, or 0 when unknown.
int64_t PeakRssBytes();
// ScenarioInputs returns one merge input per task: its handed-out
// (possibly backdoored) checkpoint, or its clean fine-tune.
std::vector<MergeInput> ScenarioInputs(const Scenario& scenario,
                                       bool backdoored);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_RUN_STATS_H_
