#include "core/adamerging.h"

#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/defense_json.h"
#include "core/lora.h"
#include "core/status_macros.h"
#include "core/torch_status.h"
#include "core/version.h"

namespace mergeguard {
namespace {

using json = nlohmann::json;

json OptionsJson(const AdaMergingOptions& options) {
  return {
      {"granularity", std::string(LambdaGranularityName(options.granularity))},
      {"learning_rate", options.learning_rate},
      {"steps", options.steps},
      {"initial_lambda", options.initial_lambda},
      {"batch_size", options.batch_size},
      {"seed", options.seed},
      {"device", options.device},
  };
}

}  // namespace

absl::Status ValidateAdaMergingOptions(const AdaMergingOptions& options) {
  if (!(options.learning_rate > 0)) {
    return absl::InvalidArgumentError("adamerging: learning_rate must be > 0");
  }
  if (options.steps < 0) {
    return absl::InvalidArgumentError("adamerging: steps must be >= 0");
  }
  if (options.batch_size < 1) {
    return absl::InvalidArgumentError("adamerging: batch_size must be >= 1");
  }
  if (options.threads < 0) {
    return absl::InvalidArgumentError("adamerging: threads must be >= 0");
  }
  return ParseDevice(options.device).status();
}

absl::Status ValidateCalibration(
    const TaskVectorSet& set, const Model& model,
    const std::vector<torch::Tensor>& calibration) {
  if (static_cast<int>(calibration.size()) != set.num_tasks()) {
    return absl::InvalidArgumentError(absl::StrCat(calibration.size(),
                                                   " calibration sets for ",
                                                   set.num_tasks(), " tasks"));
  }
  for (int t = 0; t < set.num_tasks(); ++t) {
    const torch::Tensor& inputs = calibration[t];
    if (!inputs.defined() || inputs.dim() != 4 || inputs.size(0) == 0 ||
        std::vector<int64_t>(inputs.sizes().begin() + 1,
                             inputs.sizes().end()) != model.InputShape()) {
      return absl::InvalidArgumentError(
          absl::StrCat("task \"", set.task_names[t],
                       "\": calibration inputs must be a non-empty [N, ",
                       absl::StrJoin(model.InputShape(), ", "), "] tensor"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<AdaMergingResult> AdaMerge(
    Model& model, const TaskVectorSet& set,
    const std::vector<torch::Tensor>& calibration,
    const AdaMergingOptions& options) {
  const double start = SteadySeconds();
  RETURN_IF_ERROR(ValidateAdaMergingOptions(options));
  RETURN_IF_ERROR(ValidateCalibration(set, model, calibration));
  ASSIGN_OR_RETURN(c10::Device device, ParseDevice(options.device));
  SetTorchThreads(options.threads);
  ASSIGN_OR_RETURN(TaskVectorMerger merger,
                   TaskVectorMerger::Create(set, model, device));
  CalibrationSampler sampler(calibration, options.batch_size, options.seed,
                             device);
  AdaMergingResult result;
  torch::Tensor lambdas;
  RETURN_IF_ERROR(CallTorch("AdaMerge", [&]() -> absl::Status {
    lambdas =
        merger.InitialLambdas(options.granularity, options.initial_lambda);
    return absl::OkStatus();
  }));
  EntropyOptimization optimization;
  optimization.phase = "adamerging";
  optimization.steps = options.steps;
  optimization.learning_rate = options.learning_rate;
  optimization.progress_interval = options.progress_interval;
  optimization.on_progress = options.on_progress;
  optimization.is_cancelled = options.is_cancelled;
  optimization.start_seconds = start;
  ASSIGN_OR_RETURN(result.loss_curve,
                   OptimizeLambdasByEntropy(model, merger, sampler, lambdas, {},
                                            optimization));
  RETURN_IF_ERROR(CallTorch("AdaMerge", [&]() -> absl::Status {
    result.backbone = merger.MergedBackbone(lambdas, {});
    for (torch::Tensor& tensor : result.backbone) tensor = tensor.cpu();
    result.lambdas = lambdas.detach().cpu();
    return absl::OkStatus();
  }));
  // Leave the model holding plain merged tensors, not autograd history.
  for (int k = 0; k < merger.num_tensors(); ++k) {
    RETURN_IF_ERROR(
        model.InstallTensor(merger.keys()[k], result.backbone[k].to(device)));
  }
  result.seconds = SteadySeconds() - start;
  return result;
}

std::string AdaMergingResultToJson(const AdaMergingResult& result,
                                   const AdaMergingOptions& options) {
  json report = {
      {"method", "adamerging"},
      {"options", OptionsJson(options)},
      {"lambdas", TensorToJson(result.lambdas)},
      {"loss_curve", result.loss_curve},
      {"seconds", result.seconds},
  };
  return report.dump();
}

json TensorToJson(const torch::Tensor& tensor) {
  if (!tensor.defined()) return json(nullptr);
  torch::Tensor values = tensor.detach().cpu().to(torch::kFloat64);
  if (values.dim() == 0) return values.item<double>();
  json array = json::array();
  for (int64_t i = 0; i < values.size(0); ++i) {
    array.push_back(TensorToJson(values[i]));
  }
  return array;
}

json DataDependentInputsJson(const std::vector<DataDependentTask>& tasks) {
  json inputs = json::array();
  for (const DataDependentTask& task : tasks) {
    inputs.push_back({
        {"name", task.model.name},
        {"path", task.model.path},
        {"head_path", task.model.head_path},
        {"calibration", task.calibration_path},
        {"kind", IsLoraAdapterDir(task.model.path) ? "lora" : "checkpoint"},
    });
  }
  return inputs;
}

absl::StatusOr<DataDependentJob> LoadDataDependentJob(
    const std::string& architecture_path, const std::string& base_path,
    const std::vector<DataDependentTask>& tasks) {
  DataDependentJob job;
  ASSIGN_OR_RETURN(job.model, Model::Load(architecture_path));
  std::vector<TaskVectorInput> inputs;
  for (const DataDependentTask& task : tasks) inputs.push_back(task.model);
  ASSIGN_OR_RETURN(job.set, LoadTaskVectors(base_path, inputs));
  RETURN_IF_ERROR(CheckFitsModel(job.set, *job.model));
  for (const DataDependentTask& task : tasks) {
    if (task.calibration_path.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task \"", task.model.name, "\" has no calibration file"));
    }
    ASSIGN_OR_RETURN(
        torch::Tensor inputs,
        LoadCalibrationInputs(task.calibration_path, job.model->InputShape()));
    job.calibration.push_back(std::move(inputs));
  }
  return job;
}

absl::StatusOr<AdaMergingResult> AdaMergeFiles(
    const std::string& architecture_path, const std::string& base_path,
    const std::vector<DataDependentTask>& tasks, const std::string& output_path,
    const AdaMergingOptions& options) {
  RETURN_IF_ERROR(ValidateAdaMergingOptions(options));
  ASSIGN_OR_RETURN(DataDependentJob job,
                   LoadDataDependentJob(architecture_path, base_path, tasks));
  ASSIGN_OR_RETURN(AdaMergingResult result,
                   AdaMerge(*job.model, job.set, job.calibration, options));
  std::map<std::string, std::string> metadata = {
      {"mergeguard.method", "adamerging"},
      {"mergeguard.options", OptionsJson(options).dump()},
      {"mergeguard.inputs", DataDependentInputsJson(tasks).dump()},
      {"mergeguard.base", base_path},
      {"mergeguard.architecture", architecture_path},
      {"mergeguard.lambdas", TensorToJson(result.lambdas).dump()},
      {"mergeguard.version", std::string(MergeguardVersion())},
  };
  for (const auto& [key, value] : options.metadata) metadata[key] = value;
  RETURN_IF_ERROR(
      SaveMergedModel(output_path, job.set, result.backbone, metadata));
  return result;
}

}  // namespace mergeguard
