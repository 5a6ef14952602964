#ifndef MERGEGUARD_CORE_ADAMERGING_H_
#define MERGEGUARD_CORE_ADAMERGING_H_

// AdaMerging (ALGORITHMS.md §2): merge coefficients lambda, task-wise or
// layer-wise, learned by Adam on the prediction entropy of unlabeled
// calibration inputs. It is an undefended baseline and DAM's inner loop.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/differentiable_merge.h"
#include "core/model.h"
#include "core/task_vectors.h"
#include "core/torch_fwd.h"

namespace mergeguard {

struct AdaMergingOptions {
  // One lambda per task, or per task and backbone tensor. Default task-wise.
  LambdaGranularity granularity = LambdaGranularity::kTaskWise;
  // Adam learning rate on lambda. Default 1e-3.
  double learning_rate = 1e-3;
  // Adam steps. Default 500.
  int64_t steps = 500;
  // Initial value of every lambda. Default 0.3.
  double initial_lambda = 0.3;
  // Calibration inputs per task per step. Default 16 (the reference's).
  int64_t batch_size = 16;
  // Seeds batch sampling; with it, CPU results are deterministic for a given
  // thread count. Default 0.
  uint64_t seed = 0;
  // "cpu" or "cuda[:N]". Default "cpu".
  std::string device = "cpu";
  // LibTorch intra-op threads (process-wide); 0 = hardware concurrency.
  // Default 0.
  int threads = 0;
  // Steps between progress reports (the last step is always reported).
  // Default 10.
  int64_t progress_interval = 10;
  // Optional progress callback, called on the calling thread.
  ProgressCallback on_progress;
  // Optional cancellation check, polled between steps; true stops the run
  // with CANCELLED.
  CancellationCheck is_cancelled;
  // Extra `__metadata__` entries for file outputs (provenance).
  std::map<std::string, std::string> metadata;
};

// AdaMergingResult is the merge and how it was reached.
struct AdaMergingResult {
  // Merged backbone theta0 + sum_t lambda_t tau_t, parallel to the task
  // vector set's keys, on the CPU.
  std::vector<torch::Tensor> backbone;
  // Final lambdas: [N] or [N, K] (K = backbone tensors), on the CPU.
  torch::Tensor lambdas;
  // Summed mean entropy per step.
  std::vector<double> loss_curve;
  double seconds = 0.0;
};

// AdaMerge runs AdaMerging of `set` through `model` with `calibration[t]`
// ([N_t, C, H, W] in [0, 1]) for task t. On success `model` holds the merged
// backbone. INVALID_ARGUMENT for bad options or calibration sets,
// FAILED_PRECONDITION when the set does not fit the model, CANCELLED,
// INTERNAL for LibTorch errors.
absl::StatusOr<AdaMergingResult> AdaMerge(
    Model& model, const TaskVectorSet& set,
    const std::vector<torch::Tensor>& calibration,
    const AdaMergingOptions& options);

// ValidateAdaMergingOptions returns INVALID_ARGUMENT naming the bad field.
absl::Status ValidateAdaMergingOptions(const AdaMergingOptions& options);

// ValidateCalibration checks one non-empty [N, C, H, W] set per task
// matching the model's input shape.
absl::Status ValidateCalibration(const TaskVectorSet& set, const Model& model,
                                 const std::vector<torch::Tensor>& calibration);

// AdaMergingResultToJson returns {"method":"adamerging","granularity",
// "lambdas":[[..]..] or [..],"loss_curve":[..],"seconds"}.
std::string AdaMergingResultToJson(const AdaMergingResult& result,
                                   const AdaMergingOptions& options);

// DataDependentTask is one task of a file-level job: its model and its
// unlabeled calibration file (safetensors with `inputs`; labels ignored).
struct DataDependentTask {
  TaskVectorInput model;
  std::string calibration_path;
};

// DataDependentJob is a file-level job loaded into memory.
struct DataDependentJob {
  std::unique_ptr<Model> model;
  TaskVectorSet set;
  // calibration[t]: task t's inputs [N_t, C, H, W], float32 in [0, 1].
  std::vector<torch::Tensor> calibration;
};

// LoadDataDependentJob loads the architecture (TorchScript `.pt`), the base,
// the tasks and their calibration inputs, and checks that they fit together.
absl::StatusOr<DataDependentJob> LoadDataDependentJob(
    const std::string& architecture_path, const std::string& base_path,
    const std::vector<DataDependentTask>& tasks);

// AdaMergeFiles loads the architecture (TorchScript `.pt`), the base and the
// tasks, runs AdaMerge and writes the merged model (backbone plus
// `<task>/head.*`, provenance in `__metadata__`) to `output_path`. Nothing is
// written on failure.
absl::StatusOr<AdaMergingResult> AdaMergeFiles(
    const std::string& architecture_path, const std::string& base_path,
    const std::vector<DataDependentTask>& tasks, const std::string& output_path,
    const AdaMergingOptions& options);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_ADAMERGING_H_
