#include "core/probe.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "core/model.h"
#include "core/status_macros.h"
#include "core/tensor_views.h"
#include "core/torch_status.h"

namespace mergeguard {
namespace {

absl::Status ProbeError(const std::string& path, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("probe set ", path, ": ", what));
}

}  // namespace

absl::StatusOr<ProbeSet> LoadProbeSet(const std::string& task,
                                      const std::string& path) {
  ProbeSet probe;
  probe.task = task;
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(path));
  ASSIGN_OR_RETURN(probe.images, LabeledImagesFromTensors(tensors, path));
  std::map<std::string, torch::Tensor> by_name(tensors.begin(), tensors.end());
  auto get = [&](const std::string& name) -> torch::Tensor {
    auto it = by_name.find(name);
    return it == by_name.end() ? torch::Tensor() : it->second;
  };
  const torch::Tensor target = get("target");
  if (!target.defined() || target.numel() != 1 ||
      target.scalar_type() != torch::kLong) {
    return ProbeError(path, "`target` must be one int64");
  }
  probe.target = target.item<int64_t>();
  const torch::Tensor pattern = get("trigger_pattern");
  if (!pattern.defined() || pattern.dim() != 3) {
    return ProbeError(path, "`trigger_pattern` must be [C, h, w]");
  }
  probe.trigger.pattern = pattern.to(torch::kFloat32);
  const torch::Tensor position = get("trigger_position");
  const torch::Tensor alpha = get("trigger_blend_alpha");
  if (position.defined() == alpha.defined()) {
    return ProbeError(path,
                      "give exactly one of `trigger_position` (a patch) and "
                      "`trigger_blend_alpha` (a blend)");
  }
  if (position.defined()) {
    if (position.numel() != 2 || position.scalar_type() != torch::kLong) {
      return ProbeError(path,
                        "`trigger_position` must be two int64 (row, col)");
    }
    probe.trigger.kind = TriggerKind::kPatch;
    probe.trigger.row = position[0].item<int64_t>();
    probe.trigger.col = position[1].item<int64_t>();
  } else {
    if (alpha.numel() != 1) {
      return ProbeError(path, "`trigger_blend_alpha` must be one number");
    }
    probe.trigger.kind = TriggerKind::kBlend;
    probe.trigger.blend_alpha = alpha.to(torch::kFloat64).item<double>();
  }
  const auto shape = probe.images.inputs.sizes();
  absl::Status valid =
      ValidateTrigger(probe.trigger, {shape[1], shape[2], shape[3]});
  if (!valid.ok()) return ProbeError(path, valid.message());
  return probe;
}

absl::Status SaveProbeSet(const std::string& path, const ProbeSet& probe) {
  NamedTensors tensors = {
      {"inputs", probe.images.inputs},
      {"labels", probe.images.labels},
      {"target", torch::tensor({probe.target}, torch::kLong)},
      {"trigger_pattern", probe.trigger.pattern.to(torch::kFloat32)},
  };
  if (probe.trigger.kind == TriggerKind::kPatch) {
    tensors.push_back(
        {"trigger_position",
         torch::tensor({probe.trigger.row, probe.trigger.col}, torch::kLong)});
  } else {
    tensors.push_back(
        {"trigger_blend_alpha",
         torch::tensor({static_cast<float>(probe.trigger.blend_alpha)})});
  }
  return SaveTensors(path, tensors);
}

absl::StatusOr<std::vector<ProbeResult>> EvaluateProbes(
    const std::string& architecture_path, const std::string& model_path,
    const std::vector<ProbeSet>& probes) {
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
                   Model::Load(architecture_path));
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(model_path));
  NamedTensors backbone;
  for (const auto& [name, tensor] : tensors) {
    if (!IsHeadKey(name)) backbone.emplace_back(name, tensor);
  }
  RETURN_IF_ERROR(model->LoadBackbone(backbone));
  std::vector<ProbeResult> results;
  for (const ProbeSet& probe : probes) {
    absl::StatusOr<Head> head =
        HeadFromTensors(tensors, absl::StrCat(probe.task, "/head."));
    if (!head.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat("probe of task ", probe.task,
                       ": the model has no head "
                       "for it: ",
                       head.status().message()));
    }
    if (probe.target < 0 || probe.target >= head->NumClasses()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "probe of task ", probe.task, ": target ", probe.target,
          " is not a class of its head (", head->NumClasses(), " classes)"));
    }
    ProbeResult result;
    result.task = probe.task;
    ASSIGN_OR_RETURN(result.accuracy,
                     EvaluateAccuracy(*model, *head, probe.images));
    ASSIGN_OR_RETURN(AttackResult attack,
                     EvaluateAttack(*model, *head, probe.images, probe.trigger,
                                    probe.target));
    result.asr = attack.asr;
    results.push_back(result);
  }
  return results;
}

}  // namespace mergeguard
