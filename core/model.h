#ifndef MERGEGUARD_CORE_MODEL_H_
#define MERGEGUARD_CORE_MODEL_H_

// The model runner: a TorchScript architecture (inputs -> features) whose
// backbone tensors are installed by name, plus per-task linear heads. DAM,
// LFPM and evaluation all run models through this.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tensor_views.h"
#include "core/torch_fwd.h"

namespace torch::jit {
struct Module;
}  // namespace torch::jit

namespace mergeguard {

// ParameterInfo names one backbone parameter and its shape.
struct ParameterInfo {
  std::string name;
  std::vector<int64_t> shape;
};

// HeadPrefix is the checkpoint prefix of a task's head in its own checkpoint
// ("head.weight"); merged models carry heads as `<task>/head.weight`.
inline constexpr char kHeadPrefix[] = "head.";

// IsHeadKey returns true for `head.*` and `<task>/head.*` keys.
bool IsHeadKey(const std::string& key);

// Model runs one TorchScript architecture. Not thread-safe: installing
// tensors mutates the module, so give each thread its own Clone().
class Model {
 public:
  // Load reads a TorchScript `.pt` architecture from `path` (an operator-
  // registered file; it runs code). NOT_FOUND for a missing file,
  // INVALID_ARGUMENT when it is not TorchScript or has no forward().
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& path);
  // FromModule wraps an in-memory TorchScript module (the bench's model zoo).
  static absl::StatusOr<std::unique_ptr<Model>> FromModule(
      const torch::jit::Module& module);

  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  // Clone returns an independent deep copy (its own tensors) for another
  // thread.
  absl::StatusOr<std::unique_ptr<Model>> Clone() const;

  // Parameters returns every backbone parameter, in module order.
  const std::vector<ParameterInfo>& Parameters() const { return parameters_; }
  // NumParameters returns the total element count of the backbone.
  int64_t NumParameters() const;

  // LoadBackbone copies the backbone tensors of `tensors` into the module's
  // parameters (no autograd history). Head keys are ignored; every parameter
  // must be present with its shape (FAILED_PRECONDITION naming the key
  // otherwise); other keys are INVALID_ARGUMENT.
  absl::Status LoadBackbone(const NamedTensors& tensors);
  // LoadBackboneFromPath loads the checkpoint at `path` and calls
  // LoadBackbone.
  absl::Status LoadBackboneFromPath(const std::string& path);

  // InstallTensor replaces parameter `name` by `value` itself, keeping its
  // autograd history, so a loss on Features() back-propagates into whatever
  // produced `value` (ALGORITHMS.md §7). Reinstall before each forward when
  // `value` is recomputed. The shape must match.
  absl::Status InstallTensor(const std::string& name,
                             const torch::Tensor& value);

  // ParameterTensors returns the module's own parameter tensors (leaves) in
  // Parameters() order; an optimizer may update them in place.
  std::vector<torch::Tensor> ParameterTensors() const;
  // Backbone returns detached copies of the current backbone tensors.
  NamedTensors Backbone() const;

  // Features runs forward on `inputs` [B, 1, H, W] and returns [B, D]. Uses
  // autograd when the caller has not disabled it.
  absl::StatusOr<torch::Tensor> Features(const torch::Tensor& inputs);
  // FeatureDim returns D, measured once at load with a probe input.
  int64_t FeatureDim() const { return feature_dim_; }
  // InputShape returns the per-example input shape [C, H, W].
  const std::vector<int64_t>& InputShape() const { return input_shape_; }

  // Save writes the architecture with its current parameters to `path` as a
  // TorchScript archive that loads with torch.jit.load.
  absl::Status Save(const std::string& path) const;

 private:
  Model();
  absl::Status Init();

  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::vector<ParameterInfo> parameters_;
  std::vector<int64_t> input_shape_ = {1, 28, 28};
  int64_t feature_dim_ = 0;
};

// Head is one task's linear classifier: logits = features W^T + b.
struct Head {
  torch::Tensor weight;  // [C, D]
  torch::Tensor bias;    // [C]

  // NumClasses returns C.
  int64_t NumClasses() const;
  // Logits returns [B, C] for `features` [B, D].
  torch::Tensor Logits(const torch::Tensor& features) const;
};

// HeadFromTensors returns the head stored under `prefix` (e.g. "head." or
// "mnist/head.") in `tensors`: `<prefix>weight` [C, D] and `<prefix>bias`
// [C], as float32. NOT_FOUND when absent, FAILED_PRECONDITION on bad shapes.
absl::StatusOr<Head> HeadFromTensors(const NamedTensors& tensors,
                                     const std::string& prefix);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_MODEL_H_
