#include "core/task_vectors.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <set>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/lora.h"
#include "core/status_macros.h"
#include "core/torch_status.h"

namespace mergeguard {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool IsHead(const std::string& key, const TaskVectorOptions& options) {
  return !options.head_prefix.empty() &&
         absl::StartsWith(key, options.head_prefix);
}

absl::Status ValidateNames(const std::vector<TaskVectorInput>& tasks) {
  if (tasks.empty()) {
    return absl::InvalidArgumentError("no task models given");
  }
  std::set<std::string> seen;
  for (const TaskVectorInput& task : tasks) {
    if (task.name.empty() || absl::StrContains(task.name, "/")) {
      return absl::InvalidArgumentError(absl::StrCat(
          "task name \"", task.name, "\" must be non-empty and without '/'"));
    }
    if (!seen.insert(task.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("task name \"", task.name, "\" is given twice"));
    }
  }
  return absl::OkStatus();
}

// TaskVectorsFromCheckpoint returns theta_t - theta0 for a full checkpoint.
absl::StatusOr<std::vector<torch::Tensor>> TaskVectorsFromCheckpoint(
    const TaskVectorSet& set, const std::map<std::string, size_t>& index,
    const TaskVectorInput& task, const NamedTensors& tensors,
    const TaskVectorOptions& options) {
  std::vector<torch::Tensor> result(set.keys.size());
  std::set<std::string> constant_keys;
  for (const auto& [key, unused] : set.constants) constant_keys.insert(key);
  for (const auto& [key, tensor] : tensors) {
    if (IsHead(key, options) || constant_keys.count(key) > 0) continue;
    auto it = index.find(key);
    if (it == index.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("task \"", task.name, "\" (", task.path,
                       ") has tensor \"", key, "\", which the base lacks"));
    }
    const torch::Tensor& base = set.base[it->second];
    if (tensor.sizes() != base.sizes()) {
      return absl::FailedPreconditionError(
          absl::StrCat("task \"", task.name, "\": tensor \"", key,
                       "\" has shape ", ShapeString(tensor.sizes().vec()),
                       ", the base has ", ShapeString(base.sizes().vec())));
    }
    if (!torch::isFloatingType(tensor.scalar_type())) {
      return absl::FailedPreconditionError(
          absl::StrCat("task \"", task.name, "\": tensor \"", key,
                       "\" is not floating-point but the base's is"));
    }
    result[it->second] = tensor.to(torch::kFloat32) - base;
  }
  for (size_t k = 0; k < result.size(); ++k) {
    if (!result[k].defined()) {
      return absl::FailedPreconditionError(
          absl::StrCat("task \"", task.name, "\" (", task.path,
                       ") lacks tensor \"", set.keys[k], "\""));
    }
  }
  return result;
}

// TaskVectorsFromLora returns the adapter's dW, zeros for untouched keys.
absl::StatusOr<std::vector<torch::Tensor>> TaskVectorsFromLora(
    const TaskVectorSet& set, const std::map<std::string, size_t>& index,
    const TaskVectorInput& task) {
  ASSIGN_OR_RETURN(std::unique_ptr<LoraAdapter> adapter,
                   LoraAdapter::Open(task.path));
  std::vector<torch::Tensor> result(set.keys.size());
  for (const std::string& key : adapter->TargetKeys()) {
    auto it = index.find(key);
    if (it == index.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("LoRA adapter of task \"", task.name, "\" (", task.path,
                       ") targets \"", key, "\", which the base lacks"));
    }
    ASSIGN_OR_RETURN(
        torch::Tensor delta,
        adapter->DeltaWeight(key, set.base[it->second].sizes().vec()));
    result[it->second] = delta.to(torch::kFloat32);
  }
  for (size_t k = 0; k < result.size(); ++k) {
    if (!result[k].defined()) result[k] = torch::zeros_like(set.base[k]);
  }
  return result;
}

absl::StatusOr<Head> LoadHead(const TaskVectorInput& task, bool is_lora,
                              const NamedTensors* task_tensors,
                              const TaskVectorOptions& options) {
  NamedTensors loaded;
  const NamedTensors* source = task_tensors;
  std::string source_path = task.path;
  if (!task.head_path.empty()) {
    ASSIGN_OR_RETURN(loaded, LoadTensorsFromPath(task.head_path));
    source = &loaded;
    source_path = task.head_path;
  } else if (is_lora) {
    return absl::FailedPreconditionError(absl::StrCat(
        "task \"", task.name, "\" is a LoRA adapter (", task.path,
        "), which carries no head; give a checkpoint holding its \"",
        options.head_prefix, "weight\" and \"", options.head_prefix,
        "bias\" as the task's head path"));
  }
  absl::StatusOr<Head> head = HeadFromTensors(*source, options.head_prefix);
  if (!head.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat("task \"", task.name, "\": head from ", source_path, ": ",
                     head.status().message()));
  }
  return head;
}

}  // namespace

int64_t TaskVectorSet::NumElements() const {
  int64_t total = 0;
  for (const torch::Tensor& tensor : base) total += tensor.numel();
  return total;
}

absl::StatusOr<TaskVectorSet> TiesTrimmedTaskVectors(const TaskVectorSet& set,
                                                     double top_k_percent) {
  if (!(top_k_percent > 0.0 && top_k_percent <= 100.0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "TIES trim percentage must be in (0, 100], got ", top_k_percent));
  }
  return CallTorch("TiesTrimmedTaskVectors", [&]() -> absl::StatusOr<TaskVectorSet> {
    torch::NoGradGuard no_grad;
    TaskVectorSet trimmed = set;
    const int64_t n = set.NumElements();
    if (n == 0) return trimmed;
    const int64_t keep = std::min<int64_t>(
        n, std::max<int64_t>(
               1, std::llround(top_k_percent / 100.0 * static_cast<double>(n))));
    for (int t = 0; t < set.num_tasks(); ++t) {
      std::vector<torch::Tensor> flat;
      for (const torch::Tensor& tau : set.task_vectors[t]) {
        flat.push_back(tau.abs().flatten());
      }
      // The keep-th largest |τ| is the (n − keep + 1)-th smallest.
      const torch::Tensor threshold =
          std::get<0>(torch::cat(flat).kthvalue(n - keep + 1));
      for (int k = 0; k < set.num_tensors(); ++k) {
        const torch::Tensor& tau = set.task_vectors[t][k];
        trimmed.task_vectors[t][k] = tau * tau.abs().ge(threshold);
      }
    }
    for (int k = 0; k < set.num_tensors(); ++k) {
      torch::Tensor sum = torch::zeros_like(set.base[k]);
      for (int t = 0; t < set.num_tasks(); ++t) {
        sum += trimmed.task_vectors[t][k];
      }
      const torch::Tensor elected = sum.sign();
      for (int t = 0; t < set.num_tasks(); ++t) {
        torch::Tensor& tau = trimmed.task_vectors[t][k];
        tau = tau * (tau * elected).gt(0);
      }
    }
    return trimmed;
  });
}

absl::StatusOr<TaskVectorSet> LoadTaskVectors(
    const std::string& base_path, const std::vector<TaskVectorInput>& tasks,
    const TaskVectorOptions& options) {
  RETURN_IF_ERROR(ValidateNames(tasks));
  ASSIGN_OR_RETURN(NamedTensors base_tensors, LoadTensorsFromPath(base_path));
  return CallTorch("LoadTaskVectors", [&]() -> absl::StatusOr<TaskVectorSet> {
    TaskVectorSet set;
    std::map<std::string, size_t> index;
    for (auto& [key, tensor] : base_tensors) {
      if (IsHead(key, options)) continue;
      if (!torch::isFloatingType(tensor.scalar_type())) {
        set.constants.emplace_back(key, tensor);
        continue;
      }
      index[key] = set.keys.size();
      set.keys.push_back(key);
      set.base.push_back(tensor.to(torch::kFloat32).contiguous());
    }
    if (set.keys.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "base ", base_path, " has no floating-point backbone tensors"));
    }
    for (const TaskVectorInput& task : tasks) {
      const bool is_lora = IsLoraAdapterDir(task.path);
      std::vector<torch::Tensor> vectors;
      Head head;
      if (is_lora) {
        ASSIGN_OR_RETURN(vectors, TaskVectorsFromLora(set, index, task));
        ASSIGN_OR_RETURN(head, LoadHead(task, true, nullptr, options));
      } else {
        ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(task.path));
        ASSIGN_OR_RETURN(vectors, TaskVectorsFromCheckpoint(set, index, task,
                                                            tensors, options));
        ASSIGN_OR_RETURN(head, LoadHead(task, false, &tensors, options));
      }
      if (!set.heads.empty() &&
          head.weight.size(1) != set.heads.front().weight.size(1)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "task \"", task.name, "\": head takes ", head.weight.size(1),
            " features, task \"", set.task_names.front(), "\"'s takes ",
            set.heads.front().weight.size(1)));
      }
      set.task_names.push_back(task.name);
      set.task_vectors.push_back(std::move(vectors));
      set.heads.push_back(std::move(head));
    }
    return set;
  });
}

absl::Status CheckFitsModel(const TaskVectorSet& set, const Model& model) {
  std::map<std::string, size_t> index;
  for (size_t k = 0; k < set.keys.size(); ++k) index[set.keys[k]] = k;
  for (const ParameterInfo& info : model.Parameters()) {
    auto it = index.find(info.name);
    if (it == index.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the base lacks the architecture's parameter \"", info.name, "\""));
    }
    if (set.base[it->second].sizes().vec() != info.shape) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor \"", info.name, "\" has shape ",
                       ShapeString(set.base[it->second].sizes().vec()),
                       ", the architecture expects ", ShapeString(info.shape)));
    }
    index.erase(it);
  }
  if (!index.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor \"", index.begin()->first,
                     "\" is not a parameter of the architecture"));
  }
  for (size_t t = 0; t < set.heads.size(); ++t) {
    if (set.heads[t].weight.size(1) != model.FeatureDim()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "task \"", set.task_names[t], "\": head takes ",
          set.heads[t].weight.size(1), " features, the architecture gives ",
          model.FeatureDim()));
    }
  }
  return absl::OkStatus();
}

NamedTensors MergedModelTensors(const TaskVectorSet& set,
                                const std::vector<torch::Tensor>& backbone) {
  NamedTensors result;
  for (size_t k = 0; k < set.keys.size(); ++k) {
    result.emplace_back(set.keys[k], backbone[k].detach().to(torch::kCPU));
  }
  for (const auto& constant : set.constants) result.push_back(constant);
  for (size_t t = 0; t < set.task_names.size(); ++t) {
    const std::string prefix = absl::StrCat(set.task_names[t], "/head.");
    result.emplace_back(prefix + "weight",
                        set.heads[t].weight.detach().to(torch::kCPU));
    result.emplace_back(prefix + "bias",
                        set.heads[t].bias.detach().to(torch::kCPU));
  }
  return result;
}

absl::Status SaveMergedModel(
    const std::string& path, const TaskVectorSet& set,
    const std::vector<torch::Tensor>& backbone,
    const std::map<std::string, std::string>& metadata) {
  if (backbone.size() != set.keys.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("SaveMergedModel: ", backbone.size(), " tensors for ",
                     set.keys.size(), " keys"));
  }
  NamedTensors tensors;
  RETURN_IF_ERROR(CallTorch("SaveMergedModel", [&]() -> absl::Status {
    tensors = MergedModelTensors(set, backbone);
    return absl::OkStatus();
  }));
  return SaveTensors(path, tensors, metadata);
}

}  // namespace mergeguard
