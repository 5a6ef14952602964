#ifndef MERGEGUARD_CORE_TASK_VECTORS_H_
#define MERGEGUARD_CORE_TASK_VECTORS_H_

// Task vectors in memory for the data-dependent merges (AdaMerging, DAM,
// LFPM): the base backbone theta0, per task tau_t = theta_t - theta0 (or a
// LoRA adapter's dW) and per task heads, all float32 torch tensors.

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/model.h"
#include "core/tensor_views.h"
#include "core/torch_fwd.h"

namespace mergeguard {

// TaskVectorInput names one task model.
struct TaskVectorInput {
  // Task name; names the head in merged outputs (`<name>/head.weight`).
  // Must be non-empty, unique and free of '/'.
  std::string name;
  // A full checkpoint (file, directory or shard index) or a PEFT LoRA
  // adapter directory (detected by adapter_config.json).
  std::string path;
  // Checkpoint whose `head.weight` / `head.bias` is this task's head. Empty
  // means `path` itself, which a LoRA adapter cannot be: LoRA tasks must set
  // it.
  std::string head_path;
};

struct TaskVectorOptions {
  // Checkpoint prefix of the task heads; such keys are never task vectors.
  std::string head_prefix = "head.";
};

// TaskVectorSet holds theta0, the task vectors and the heads. Backbone
// tensors are the base's floating-point, non-head tensors, in the base's
// (sorted) key order; every vector below is parallel to `keys`.
struct TaskVectorSet {
  std::vector<std::string> keys;
  // theta0, float32.
  std::vector<torch::Tensor> base;
  std::vector<std::string> task_names;
  // task_vectors[t][k]: tau of task t for keys[k], float32 (zeros where a
  // LoRA adapter leaves a key untouched).
  std::vector<std::vector<torch::Tensor>> task_vectors;
  // heads[t]: task t's head, float32.
  std::vector<Head> heads;
  // Non-floating base tensors (e.g. integer buffers): never merged, written
  // to outputs unchanged.
  NamedTensors constants;

  int num_tasks() const { return static_cast<int>(task_names.size()); }
  int num_tensors() const { return static_cast<int>(keys.size()); }
  // NumElements returns the total element count of the backbone tensors.
  int64_t NumElements() const;
};

// LoadTaskVectors reads the base checkpoint at `base_path` and every task of
// `tasks`. Full checkpoints must hold exactly the base's backbone keys with
// the base's shapes; LoRA adapters may target any subset of them.
// INVALID_ARGUMENT for bad names or files, NOT_FOUND for missing files,
// FAILED_PRECONDITION (naming the key and task) for missing or extra keys,
// shape mismatches, and heads that are absent, malformed or of different
// feature widths.
absl::StatusOr<TaskVectorSet> LoadTaskVectors(
    const std::string& base_path, const std::vector<TaskVectorInput>& tasks,
    const TaskVectorOptions& options = {});

// CheckFitsModel returns OK when every parameter of `model` is a backbone key
// of `set` with the same shape, every backbone key is a parameter, and the
// heads take the model's feature width; FAILED_PRECONDITION naming the
// first offending key otherwise.
absl::Status CheckFitsModel(const TaskVectorSet& set, const Model& model);

// TiesTrimmedTaskVectors returns `set` with its task vectors cut as TIES
// cuts them before combining: each task keeps its max(1, round(p/100 · n))
// entries of largest |τ| over all n backbone entries (entries equal to the
// threshold too), and then only those whose sign agrees with the elected
// sign sign(Σ_t kept τ_t). TIES at λ = 1 is base + Σ_t τ'_t / (number of
// agreeing tasks); an exact zero sum, where TIES takes the tensor's
// majority sign, keeps nothing here. INVALID_ARGUMENT unless p is in
// (0, 100].
absl::StatusOr<TaskVectorSet> TiesTrimmedTaskVectors(const TaskVectorSet& set,
                                                     double top_k_percent);

// MergedModelTensors returns what a merged model file holds: `backbone`
// (parallel to set.keys), the constants, and each task's head as
// `<task>/head.weight` and `<task>/head.bias`.
NamedTensors MergedModelTensors(const TaskVectorSet& set,
                                const std::vector<torch::Tensor>& backbone);

// SaveMergedModel writes MergedModelTensors to `path` (safetensors,
// atomically) with `metadata` as its `__metadata__`.
absl::Status SaveMergedModel(
    const std::string& path, const TaskVectorSet& set,
    const std::vector<torch::Tensor>& backbone,
    const std::map<std::string, std::string>& metadata);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_TASK_VECTORS_H_
