#ifndef MERGEGUARD_CORE_PROBE_H_
#define MERGEGUARD_CORE_PROBE_H_

// Probe sets: held-out labeled inputs of one task with a known trigger and
// target class, as red-team and CI pipelines have. A job that carries them
// reports clean accuracy and attack success (ALGORITHMS.md §6) of the model
// before the defense (the task-arithmetic merge of its inputs) and after.
//
// On disk a probe set is one safetensors file:
//   inputs             [N, C, H, W] float32 in [0, 1] (or uint8 / 255)
//   labels             [N] int64
//   target             [1] int64, the attack's target class
//   trigger_pattern    [C, s, s] (patch) or [C, H, W] (blend), in [0, 1]
//   trigger_position   [2] int64 (row, col): a patch trigger, or
//   trigger_blend_alpha [1] float32: a blended trigger.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/evaluation.h"

namespace mergeguard {

struct ProbeSet {
  // The task whose head (`<task>/head.*`) the probe runs.
  std::string task;
  LabeledImages images;
  Trigger trigger;
  int64_t target = 0;
};

// LoadProbeSet reads a probe file for `task`. INVALID_ARGUMENT naming the
// tensor when one is missing or malformed.
absl::StatusOr<ProbeSet> LoadProbeSet(const std::string& task,
                                      const std::string& path);
// SaveProbeSet writes `probe` (all but its task name) to `path` atomically.
absl::Status SaveProbeSet(const std::string& path, const ProbeSet& probe);

// ProbeResult is one probe on one model.
struct ProbeResult {
  std::string task;
  double accuracy = 0.0;
  double asr = 0.0;
};

// EvaluateProbes runs every probe on the model file `model_path` (backbone
// plus `<task>/head.*`) through the TorchScript architecture.
// FAILED_PRECONDITION when a probe's task has no head in the model or its
// target is not a class of that head.
absl::StatusOr<std::vector<ProbeResult>> EvaluateProbes(
    const std::string& architecture_path, const std::string& model_path,
    const std::vector<ProbeSet>& probes);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_PROBE_H_
