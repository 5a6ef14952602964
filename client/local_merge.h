#ifndef MERGEGUARD_CLIENT_LOCAL_MERGE_H_
#define MERGEGUARD_CLIENT_LOCAL_MERGE_H_

// `mergeguard merge --local`: runs a job in-process with core/, no server.

#include <functional>
#include <string>

#include "absl/status/statusor.h"
#include "client/merge_config.h"
#include "core/job.h"
#include "core/merge.h"

namespace mergeguard {

// LocalMergeOptions connects a local run to whoever started it.
struct LocalMergeOptions {
  // Progress of AdaMerging, DAM and LFPM (phase, step, losses), on the
  // calling thread. May be empty.
  std::function<void(const JobProgress&)> on_progress;
  // Polled between steps (between chunks for data-free merges, possibly
  // from several threads); true stops the run with CANCELLED. May be empty.
  std::function<bool()> is_cancelled;
};

// LocalMergeResult names what RunLocalMerge wrote.
struct LocalMergeResult {
  // The model to load: OUT/model.safetensors, or OUT when sharded.
  std::string model_path;
  // OUT/report.json.
  std::string report_path;
  // One line for people, e.g. "merged 4 tensors (+2 head tensors) with ties
  // in 0.01s".
  std::string summary;
  // Data-free merges only.
  MergeReport report;
};

// RunLocalMerge creates `out_dir` if needed and writes the merged model and a
// JSON report into it: for AdaMerging, DAM and LFPM the method's report under
// "adamerging", "dam" or "lfpm". Nothing is written under the final names on
// failure.
absl::StatusOr<LocalMergeResult> RunLocalMerge(
    const MergeConfig& config, const std::string& out_dir,
    const LocalMergeOptions& options = {});

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_LOCAL_MERGE_H_
