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
// Relative paths are resolved against the file's directory.

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/merge.h"

namespace mergeguard {

// MergeConfig is a parsed, validated job file.
struct MergeConfig {
  // Path of the base model; empty only for weighted_average.
  std::string base;
  std::vector<MergeInput> models;
  // Method and hyperparameters, defaults resolved.
  MergeOptions options;
};

// ParseMergeConfig parses YAML `text`; relative paths resolve against
// `base_dir`. Every error is INVALID_ARGUMENT naming the field and its line,
// e.g. `line 4: models[1].weight: expected a number, got "heavy"`.
absl::StatusOr<MergeConfig> ParseMergeConfig(absl::string_view text,
                                             const std::string& base_dir);

// LoadMergeConfig reads and parses the file at `path`.
absl::StatusOr<MergeConfig> LoadMergeConfig(const std::string& path);

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_MERGE_CONFIG_H_
