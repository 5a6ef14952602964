#ifndef MERGEGUARD_CLIENT_MERGE_CONFIG_H_
#define MERGEGUARD_CLIENT_MERGE_CONFIG_H_

// The YAML job file of `mergeguard merge` and `mergeguard submit`, in the
// spirit of mergekit:
//
//   method: ties
//   base: base.safetensors
//   models:
//     - {name: mnist, path: mnist.safetensors, weight: 1.0}
//   parameters: {lambda: 1.0, top_k: 20, trim_scope: global}
//
// AdaMerging, DAM and LFPM also take `architecture:` and a per-model
// `calibration:` file; their `parameters:` are core/defense_params.h's names,
// with LFPM's trigger options nested (`trigger: {scan_steps: 20}`) and
// `layer_prefixes` as a list.
//
// Relative paths are resolved against the file's directory.

#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/job.h"
#include "core/merge.h"

namespace mergeguard {

// MergeConfig is a parsed, validated job file.
struct MergeConfig {
  // What the job runs: a data-free merge, AdaMerging, DAM or LFPM.
  JobMethod method = JobMethod::kTaskArithmetic;
  // Path of the base model; empty only for weighted_average.
  std::string base;
  std::vector<MergeInput> models;
  // Data-free merge method and hyperparameters, defaults resolved
  // (options.method mirrors `method` for data-free merges).
  MergeOptions options;
  // AdaMerging, DAM and LFPM: the TorchScript architecture (a `.pt` path
  // locally; the registered name on a server).
  std::string architecture;
  // AdaMerging, DAM and LFPM: per-task calibration set paths, keyed by task
  // name.
  std::map<std::string, std::string> calibration;
  // AdaMerging, DAM and LFPM: `parameters:` flattened to the
  // DefenseParameters of core/defense_params.h ("trigger.scan_steps",
  // lists joined with ","), already checked by Apply*Parameters. Empty for
  // data-free merges.
  std::map<std::string, std::string> defense_parameters;
  // LFPM only: a merged model (backbone plus `<task>/head.*`) to repair
  // instead of merging `base` and the models' paths first. The models then
  // name the tasks and their calibration sets; `base` and paths are not
  // needed. Local runs only.
  std::string merged;
  // AdaMerging, DAM and LFPM on a server: per-task probe set paths
  // (core/probe.h), keyed by task name. Server jobs only.
  std::map<std::string, std::string> probes;
};

// ParseMergeConfig parses YAML `text`; relative paths resolve against
// `base_dir`. Every error is INVALID_ARGUMENT naming the field and its line,
// e.g. `line 4: models[1].weight: expected a number, got "heavy"`.
absl::StatusOr<MergeConfig> ParseMergeConfig(absl::string_view text,
                                             const std::string& base_dir);

// LoadMergeConfig reads and parses the file at `path`.
absl::StatusOr<MergeConfig> LoadMergeConfig(const std::string& path);

// DefenseParameterTable returns the `parameters:` that AdaMerging, DAM or
// LFPM accept, one per row with type and default: aligned text, or a
// Markdown table (docs/cli.md is generated from it). INVALID_ARGUMENT for a
// data-free method.
absl::StatusOr<std::string> DefenseParameterTable(JobMethod method,
                                                  bool markdown);

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_MERGE_CONFIG_H_
