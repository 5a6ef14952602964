#include "core/differentiable_merge.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "core/torch_status.h"

namespace mergeguard {

absl::StatusOr<LambdaGranularity> ParseLambdaGranularity(
    absl::string_view name) {
  if (name == "task_wise") return LambdaGranularity::kTaskWise;
  if (name == "layer_wise") return LambdaGranularity::kLayerWise;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown lambda granularity \"", name, "\" (task_wise, layer_wise)"));
}

absl::string_view LambdaGranularityName(LambdaGranularity granularity) {
  return granularity == LambdaGranularity::kTaskWise ? "task_wise"
                                                     : "layer_wise";
}

absl::StatusOr<c10::Device> ParseDevice(const std::string& name) {
  if (name == "cpu") return c10::Device(c10::kCPU);
  int index = -1;
  if (name != "cuda") {
    const std::string prefix = "cuda:";
    if (name.rfind(prefix, 0) != 0 ||
        !absl::SimpleAtoi(name.substr(prefix.size()), &index) || index < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown device \"", name, "\" (cpu, cuda, cuda:N)"));
    }
  }
  if (!torch::cuda::is_available()) {
    return absl::FailedPreconditionError(
        absl::StrCat("device \"", name,
                     "\" asked for, but this LibTorch sees no CUDA device"));
  }
  if (index >= static_cast<int>(torch::cuda::device_count())) {
    return absl::FailedPreconditionError(
        absl::StrCat("device \"", name, "\": only ",
                     torch::cuda::device_count(), " CUDA devices"));
  }
  return c10::Device(c10::kCUDA,
                     static_cast<c10::DeviceIndex>(index < 0 ? 0 : index));
}

void SetTorchThreads(int threads) {
  const int wanted =
      threads > 0
          ? threads
          : std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  if (at::get_num_threads() != wanted) at::set_num_threads(wanted);
}

at::Generator MakeGenerator(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

torch::Tensor SampleConcreteMask(const torch::Tensor& logits,
                                 double temperature, at::Generator& generator) {
  // Keep log u and log(1 - u) finite.
  constexpr double kEps = 1e-6;
  torch::Tensor u = torch::rand(logits.sizes(), generator,
                                torch::TensorOptions().dtype(torch::kFloat32))
                        .clamp_(kEps, 1.0 - kEps)
                        .to(logits.device());
  torch::Tensor noise = torch::log(u) - torch::log1p(-u);
  return torch::sigmoid((noise + logits) / temperature);
}

torch::Tensor NormalizeMaskByMean(const torch::Tensor& mask) {
  torch::Tensor mean = mask.mean();
  // An all-zero mask (possible only for the hard mask) keeps theta0.
  return mask / torch::where(mean > 0, mean, torch::ones_like(mean));
}

void StepByNormalizedGradient(std::vector<torch::Tensor>& parameters,
                              double learning_rate) {
  torch::NoGradGuard no_grad;
  // Every rms is computed where the gradients live and read back in one
  // transfer: reading each with item() would wait on the device once per
  // tensor.
  std::vector<torch::Tensor*> stepped;
  std::vector<torch::Tensor> squared_means;
  for (torch::Tensor& parameter : parameters) {
    const torch::Tensor& grad = parameter.grad();
    if (!grad.defined()) continue;
    stepped.push_back(&parameter);
    squared_means.push_back(grad.to(torch::kFloat64).square().mean());
  }
  if (stepped.empty()) return;
  const torch::Tensor rms_values =
      torch::stack(squared_means).sqrt().to(torch::kCPU);
  const auto rms = rms_values.accessor<double, 1>();
  for (size_t i = 0; i < stepped.size(); ++i) {
    if (!(rms[i] > 0)) continue;
    stepped[i]->sub_(stepped[i]->grad(), learning_rate / rms[i]);
  }
}

torch::Tensor MeanEntropy(const torch::Tensor& logits) {
  torch::Tensor log_p = torch::log_softmax(logits, /*dim=*/1);
  return -(log_p.exp() * log_p).sum(1).mean();
}

torch::Tensor ProjectPerturbation(const torch::Tensor& delta, double epsilon) {
  return delta.clamp(-epsilon, epsilon);
}

torch::Tensor PerturbInputs(const torch::Tensor& inputs,
                            const torch::Tensor& delta) {
  return (inputs + delta).clamp(0.0, 1.0);
}

CalibrationSampler::CalibrationSampler(std::vector<torch::Tensor> inputs,
                                       int64_t batch_size, uint64_t seed,
                                       c10::Device device)
    : batch_size_(std::max<int64_t>(1, batch_size)),
      generator_(MakeGenerator(seed)),
      device_(device) {
  for (torch::Tensor& set : inputs) {
    inputs_.push_back(set.to(device_, torch::kFloat32).contiguous());
    order_.push_back(torch::Tensor());
    position_.push_back(0);
  }
}

torch::Tensor CalibrationSampler::Next(int task) {
  const int64_t size = inputs_[task].size(0);
  const int64_t take = std::min(batch_size_, size);
  if (!order_[task].defined() || position_[task] + take > size) {
    order_[task] = torch::randperm(size, generator_,
                                   torch::TensorOptions().dtype(torch::kLong));
    position_[task] = 0;
  }
  torch::Tensor indices =
      order_[task].slice(0, position_[task], position_[task] + take);
  position_[task] += take;
  return inputs_[task].index_select(0, indices.to(device_));
}

absl::StatusOr<TaskVectorMerger> TaskVectorMerger::Create(
    const TaskVectorSet& set, const Model& model, c10::Device device) {
  RETURN_IF_ERROR(CheckFitsModel(set, model));
  if (set.num_tasks() == 0) {
    return absl::InvalidArgumentError("no task vectors to merge");
  }
  return CallTorch(
      "TaskVectorMerger::Create", [&]() -> absl::StatusOr<TaskVectorMerger> {
        torch::NoGradGuard no_grad;
        TaskVectorMerger merger;
        merger.device_ = device;
        merger.num_tasks_ = set.num_tasks();
        merger.keys_ = set.keys;
        for (int k = 0; k < set.num_tensors(); ++k) {
          merger.base_.push_back(set.base[k].to(device, torch::kFloat32));
          std::vector<torch::Tensor> per_task;
          for (int t = 0; t < set.num_tasks(); ++t) {
            per_task.push_back(set.task_vectors[t][k]);
          }
          merger.stacked_.push_back(
              torch::stack(per_task).to(device, torch::kFloat32));
        }
        for (const Head& head : set.heads) {
          merger.heads_.push_back({head.weight.to(device, torch::kFloat32),
                                   head.bias.to(device, torch::kFloat32)});
        }
        return merger;
      });
}

torch::Tensor LambdaColumn(const torch::Tensor& lambdas, int k) {
  return lambdas.dim() == 1 ? lambdas : lambdas.select(1, k);
}

torch::Tensor TaskVectorMerger::InitialLambdas(LambdaGranularity granularity,
                                               double value) const {
  std::vector<int64_t> shape = {num_tasks_};
  if (granularity == LambdaGranularity::kLayerWise) {
    shape.push_back(num_tensors());
  }
  return torch::full(
             shape, value,
             torch::TensorOptions().dtype(torch::kFloat32).device(device_))
      .requires_grad_(true);
}

torch::Tensor TaskVectorMerger::MergedTensor(int k,
                                             const torch::Tensor& lambdas,
                                             const torch::Tensor& mask) const {
  torch::Tensor combined =
      torch::tensordot(LambdaColumn(lambdas, k), stacked_[k], {0}, {0});
  if (mask.defined()) combined = mask * combined;
  return base_[k] + combined;
}

absl::Status TaskVectorMerger::Install(
    Model& model, const torch::Tensor& lambdas,
    const std::vector<torch::Tensor>& masks) const {
  if (!masks.empty() && masks.size() != keys_.size()) {
    return absl::InternalError("one mask per backbone tensor expected");
  }
  for (int k = 0; k < num_tensors(); ++k) {
    torch::Tensor merged;
    RETURN_IF_ERROR(
        CallTorch("TaskVectorMerger::Install", [&]() -> absl::Status {
          merged = MergedTensor(k, lambdas,
                                masks.empty() ? torch::Tensor() : masks[k]);
          return absl::OkStatus();
        }));
    RETURN_IF_ERROR(model.InstallTensor(keys_[k], merged));
  }
  return absl::OkStatus();
}

std::vector<torch::Tensor> TaskVectorMerger::MergedBackbone(
    const torch::Tensor& lambdas,
    const std::vector<torch::Tensor>& masks) const {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> result;
  for (int k = 0; k < num_tensors(); ++k) {
    result.push_back(
        MergedTensor(k, lambdas.detach(),
                     masks.empty() ? torch::Tensor() : masks[k].detach())
            .contiguous());
  }
  return result;
}

absl::StatusOr<torch::Tensor> TaskVectorMerger::Logits(
    Model& model, int task, const torch::Tensor& inputs) const {
  ASSIGN_OR_RETURN(torch::Tensor features, model.Features(inputs));
  return CallTorch("TaskVectorMerger::Logits",
                   [&]() -> absl::StatusOr<torch::Tensor> {
                     return heads_[task].Logits(features);
                   });
}

double SteadySeconds() {
  return std::chrono::duration<double>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

absl::StatusOr<std::vector<double>> OptimizeLambdasByEntropy(
    Model& model, const TaskVectorMerger& merger, CalibrationSampler& sampler,
    torch::Tensor& lambdas, const std::vector<torch::Tensor>& masks,
    const EntropyOptimization& options) {
  return CallTorch("AdaMerging", [&]() -> absl::StatusOr<std::vector<double>> {
    torch::optim::Adam optimizer(
        {lambdas}, torch::optim::AdamOptions(options.learning_rate));
    std::vector<double> curve;
    curve.reserve(options.steps);
    for (int64_t step = 1; step <= options.steps; ++step) {
      if (options.is_cancelled && options.is_cancelled()) {
        return absl::CancelledError(
            absl::StrCat(options.phase, " cancelled before step ", step));
      }
      optimizer.zero_grad();
      RETURN_IF_ERROR(merger.Install(model, lambdas, masks));
      torch::Tensor loss = torch::zeros({}, lambdas.options());
      for (int t = 0; t < merger.num_tasks(); ++t) {
        ASSIGN_OR_RETURN(torch::Tensor logits,
                         merger.Logits(model, t, sampler.Next(t)));
        loss = loss + MeanEntropy(logits);
      }
      loss.backward();
      optimizer.step();
      curve.push_back(loss.item<double>());
      if (options.on_progress &&
          (step % std::max<int64_t>(1, options.progress_interval) == 0 ||
           step == options.steps)) {
        options.on_progress({options.phase,
                             step,
                             options.steps,
                             {{"entropy", curve.back()}},
                             SteadySeconds() - options.start_seconds});
      }
    }
    return curve;
  });
}

absl::StatusOr<torch::Tensor> LoadCalibrationInputs(
    const std::string& path, const std::vector<int64_t>& input_shape) {
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(path));
  const torch::Tensor* inputs = nullptr;
  for (const auto& [name, tensor] : tensors) {
    if (name == "inputs") inputs = &tensor;
  }
  if (inputs == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": a calibration set needs an \"inputs\" tensor [N, C, H, W]"));
  }
  if (inputs->dim() != 4 || (inputs->scalar_type() != torch::kFloat32 &&
                             inputs->scalar_type() != torch::kUInt8)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": \"inputs\" must be float32 or uint8 [N, C, H, W]"));
  }
  if (inputs->size(0) == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the calibration set is empty"));
  }
  if (!input_shape.empty() &&
      std::vector<int64_t>(inputs->sizes().begin() + 1,
                           inputs->sizes().end()) != input_shape) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": inputs are [N, ",
        absl::StrJoin(inputs->sizes().begin() + 1, inputs->sizes().end(), ", "),
        "], the architecture takes [N, ", absl::StrJoin(input_shape, ", "),
        "]"));
  }
  return CallTorch("LoadCalibrationInputs",
                   [&]() -> absl::StatusOr<torch::Tensor> {
                     if (inputs->scalar_type() == torch::kUInt8) {
                       return inputs->to(torch::kFloat32).div_(255.0);
                     }
                     return inputs->contiguous();
                   });
}

}  // namespace mergeguard
