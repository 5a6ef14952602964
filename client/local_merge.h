#ifndef MERGEGUARD_CLIENT_LOCAL_MERGE_H_
#define MERGEGUARD_CLIENT_LOCAL_MERGE_H_

// `mergeguard merge --local`: runs a job in-process with core/, no server.

#include <string>

#include "absl/status/statusor.h"
#include "client/merge_config.h"
#include "core/merge.h"

namespace mergeguard {

// LocalMergeResult names what RunLocalMerge wrote.
struct LocalMergeResult {
  // The model to load: OUT/model.safetensors, or OUT when sharded.
  std::string model_path;
  // OUT/report.json.
  std::string report_path;
  MergeReport report;
};

// RunLocalMerge creates `out_dir` if needed and writes the merged model and a
// JSON report into it. Nothing is written under the final names on failure.
absl::StatusOr<LocalMergeResult> RunLocalMerge(const MergeConfig& config,
                                               const std::string& out_dir);

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_LOCAL_MERGE_H_
