#ifndef MERGEGUARD_CORE_DIFFERENTIABLE_MERGE_H_
#define MERGEGUARD_CORE_DIFFERENTIABLE_MERGE_H_

// Building blocks shared by the data-dependent merges (AdaMerging, DAM):
// the differentiable merge theta_k = theta0_k + sum_t lambda[t,k] m_k * tau_tk
// installed into a Model (ALGORITHMS.md §7), Concrete masks, the entropy
// loss, bounded input perturbations, seeded calibration batches, and the
// entropy-driven lambda optimization both methods run.

#include <ATen/core/Generator.h>

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/model.h"
#include "core/task_vectors.h"
#include "core/torch_fwd.h"

namespace mergeguard {

// LambdaGranularity: one coefficient per task ([N]), or one per task and
// backbone tensor ([N, K], "layer-wise" as in AdaMerging and FusionBench,
// where every parameter tensor is a layer).
enum class LambdaGranularity { kTaskWise, kLayerWise };
// ParseLambdaGranularity accepts "task_wise" and "layer_wise".
absl::StatusOr<LambdaGranularity> ParseLambdaGranularity(
    absl::string_view name);
absl::string_view LambdaGranularityName(LambdaGranularity granularity);

// TrainingProgress is reported by the data-dependent merges.
struct TrainingProgress {
  // "adamerging", or DAM's "dam_meta" and "dam_adamerging".
  std::string phase;
  // 1-based step within the phase, and the phase's step count.
  int64_t step = 0;
  int64_t total_steps = 0;
  // Loss values of this step by name (e.g. "entropy", "inner", "trigger").
  std::map<std::string, double> losses;
  // Seconds since the method started.
  double elapsed_seconds = 0.0;
};
using ProgressCallback = std::function<void(const TrainingProgress&)>;
using CancellationCheck = std::function<bool()>;

// ParseDevice accepts "cpu", "cuda" and "cuda:N". INVALID_ARGUMENT for
// anything else, FAILED_PRECONDITION when CUDA is asked for but absent.
absl::StatusOr<c10::Device> ParseDevice(const std::string& name);

// SetTorchThreads sets LibTorch's intra-op threads (process-wide) to
// `threads`, or to the hardware concurrency when 0.
void SetTorchThreads(int threads);

// MakeGenerator returns a CPU generator seeded with `seed`. All randomness of
// these methods is drawn on the CPU from such a generator (and moved to the
// device), so a seed gives the same draws on every device.
at::Generator MakeGenerator(uint64_t seed);

// SampleConcreteMask draws a Binary Concrete mask with logits `logits`:
// u ~ U(0,1), m = sigmoid((log u - log(1 - u) + logits) / temperature).
// Differentiable in `logits`; P(m > 0.5) = sigmoid(logits).
torch::Tensor SampleConcreteMask(const torch::Tensor& logits,
                                 double temperature, at::Generator& generator);

// NormalizeMaskByMean returns mask / mean(mask), so that a masked task
// vector keeps its scale; an all-zero mask stays zero.
torch::Tensor NormalizeMaskByMean(const torch::Tensor& mask);

// StepByNormalizedGradient moves every tensor of `parameters` that has a
// gradient by -learning_rate * grad / rms(grad), the root mean square taken
// over that tensor: the typical entry moves by the learning rate, and the
// entries keep their gradients' relative sizes. A tensor whose gradient is
// undefined or all zero is left alone. No gradient is recorded.
void StepByNormalizedGradient(std::vector<torch::Tensor>& parameters,
                              double learning_rate);

// MeanEntropy returns the batch mean of the Shannon entropy (nats) of
// softmax(logits) for logits [B, C].
torch::Tensor MeanEntropy(const torch::Tensor& logits);

// ProjectPerturbation returns `delta` clamped to the L-infinity ball of
// radius `epsilon`.
torch::Tensor ProjectPerturbation(const torch::Tensor& delta, double epsilon);
// PerturbInputs returns clamp(inputs + delta, 0, 1): a universal
// perturbation cannot keep every input valid by itself, so validity is
// enforced where it is applied.
torch::Tensor PerturbInputs(const torch::Tensor& inputs,
                            const torch::Tensor& delta);

// CalibrationSampler draws batches of unlabeled inputs per task: each task's
// set is reshuffled every epoch with the generator, so a seed fixes the
// sequence. Sets smaller than the batch are used whole.
class CalibrationSampler {
 public:
  CalibrationSampler(std::vector<torch::Tensor> inputs, int64_t batch_size,
                     uint64_t seed, c10::Device device);
  // Next returns task `task`'s next batch [B, C, H, W] on the device.
  torch::Tensor Next(int task);

 private:
  std::vector<torch::Tensor> inputs_;
  std::vector<torch::Tensor> order_;
  std::vector<int64_t> position_;
  int64_t batch_size_;
  at::Generator generator_;
  c10::Device device_;
};

// TaskVectorMerger forms theta(lambda, m) from a TaskVectorSet on one device
// and installs it into a Model with its autograd history, so that losses on
// the model's outputs reach lambda and whatever produced the masks.
class TaskVectorMerger {
 public:
  // Create checks that `set` fits `model` (CheckFitsModel) and moves the
  // tensors to `device`, task vectors stacked per key as [N, ...].
  static absl::StatusOr<TaskVectorMerger> Create(const TaskVectorSet& set,
                                                 const Model& model,
                                                 c10::Device device);

  int num_tasks() const { return num_tasks_; }
  int num_tensors() const { return static_cast<int>(keys_.size()); }
  const std::vector<std::string>& keys() const { return keys_; }
  const std::vector<torch::Tensor>& base() const { return base_; }
  // stacked_task_vectors()[k] is [N, ...shape of key k].
  const std::vector<torch::Tensor>& stacked_task_vectors() const {
    return stacked_;
  }
  c10::Device device() const { return device_; }

  // InitialLambdas returns a fresh leaf tensor filled with `value`: [N] for
  // task-wise, [N, K] for layer-wise.
  torch::Tensor InitialLambdas(LambdaGranularity granularity,
                               double value) const;
  // MergedTensor returns theta_k = theta0_k + sum_t lambda[t,k] mask_k tau_tk
  // (an undefined mask means all ones). Differentiable in both.
  torch::Tensor MergedTensor(int k, const torch::Tensor& lambdas,
                             const torch::Tensor& mask) const;
  // Install installs MergedTensor for every key into `model`. `masks` is
  // empty (no mask) or has one tensor per key.
  absl::Status Install(Model& model, const torch::Tensor& lambdas,
                       const std::vector<torch::Tensor>& masks) const;
  // MergedBackbone returns the merged tensors without history, parallel to
  // keys().
  std::vector<torch::Tensor> MergedBackbone(
      const torch::Tensor& lambdas,
      const std::vector<torch::Tensor>& masks) const;
  // Logits returns task `task`'s logits on `inputs` through `model` (which
  // holds whatever was installed last).
  absl::StatusOr<torch::Tensor> Logits(Model& model, int task,
                                       const torch::Tensor& inputs) const;

 private:
  TaskVectorMerger() = default;

  int num_tasks_ = 0;
  std::vector<std::string> keys_;
  std::vector<torch::Tensor> base_;
  std::vector<torch::Tensor> stacked_;
  std::vector<Head> heads_;
  c10::Device device_ = c10::Device(c10::kCPU);
};

// LambdaColumn returns task-wise lambdas [N] as is, and column k of
// layer-wise lambdas [N, K].
torch::Tensor LambdaColumn(const torch::Tensor& lambdas, int k);

// EntropyOptimization configures OptimizeLambdasByEntropy.
struct EntropyOptimization {
  std::string phase = "adamerging";
  int64_t steps = 500;
  double learning_rate = 1e-3;
  int64_t progress_interval = 1;
  ProgressCallback on_progress;
  CancellationCheck is_cancelled;
  // Time origin for TrainingProgress::elapsed_seconds (steady clock, s).
  double start_seconds = 0.0;
};

// OptimizeLambdasByEntropy runs AdaMerging (ALGORITHMS.md §2): Adam on
// `lambdas` (a leaf that requires grad, updated in place) minimizing the sum
// over tasks of the mean prediction entropy on a fresh calibration batch per
// task and step, with `masks` (per key, or empty) fixed. Returns the loss
// curve; CANCELLED when `is_cancelled` says so between steps.
absl::StatusOr<std::vector<double>> OptimizeLambdasByEntropy(
    Model& model, const TaskVectorMerger& merger, CalibrationSampler& sampler,
    torch::Tensor& lambdas, const std::vector<torch::Tensor>& masks,
    const EntropyOptimization& options);

// SteadySeconds returns the steady clock in seconds.
double SteadySeconds();

// LoadCalibrationInputs reads the `inputs` tensor [N, C, H, W] (float32 in
// [0, 1], or uint8 read as value / 255) of a calibration file; labels, if
// present, are ignored. INVALID_ARGUMENT when it is missing, mistyped,
// empty, or not of `input_shape` [C, H, W] (when non-empty).
absl::StatusOr<torch::Tensor> LoadCalibrationInputs(
    const std::string& path, const std::vector<int64_t>& input_shape = {});

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_DIFFERENTIABLE_MERGE_H_
