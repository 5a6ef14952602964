#include "core/evaluation.h"

#include <torch/torch.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "core/tensor_views.h"
#include "core/torch_status.h"

namespace mergeguard {
namespace {

const torch::Tensor* FindTensor(const NamedTensors& tensors,
                                absl::string_view name) {
  for (const auto& [key, tensor] : tensors) {
    if (key == name) return &tensor;
  }
  return nullptr;
}

}  // namespace

int64_t LabeledImages::size() const {
  return labels.defined() ? labels.size(0) : 0;
}

absl::StatusOr<LabeledImages> LoadLabeledImages(const std::string& path) {
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(path));
  return LabeledImagesFromTensors(tensors, path);
}

absl::StatusOr<LabeledImages> LabeledImagesFromTensors(
    const NamedTensors& tensors, const std::string& path) {
  const torch::Tensor* inputs = FindTensor(tensors, "inputs");
  const torch::Tensor* labels = FindTensor(tensors, "labels");
  if (inputs == nullptr || labels == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": a labeled set needs tensors \"inputs\" and \"labels\""));
  }
  if (inputs->dim() != 4 || (inputs->scalar_type() != torch::kFloat32 &&
                             inputs->scalar_type() != torch::kUInt8)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": \"inputs\" must be float32 or uint8 [N, C, H, W]"));
  }
  if (labels->dim() != 1 || labels->scalar_type() != torch::kInt64 ||
      labels->size(0) != inputs->size(0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": \"labels\" must be int64 [N] with N = ", inputs->size(0)));
  }
  if (labels->numel() > 0 && labels->min().item<int64_t>() < 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": negative label"));
  }
  if (inputs->scalar_type() == torch::kUInt8) {
    return LabeledImages{inputs->to(torch::kFloat32).div_(255.0), *labels};
  }
  return LabeledImages{*inputs, *labels};
}

absl::Status SaveLabeledImages(const std::string& path,
                               const LabeledImages& images) {
  torch::Tensor inputs = images.inputs.scalar_type() == torch::kUInt8
                             ? images.inputs
                             : images.inputs.to(torch::kFloat32);
  return SaveTensors(
      path, {{"inputs", inputs}, {"labels", images.labels.to(torch::kInt64)}});
}

absl::string_view TriggerKindName(TriggerKind kind) {
  return kind == TriggerKind::kPatch ? "patch" : "blend";
}

absl::StatusOr<TriggerKind> ParseTriggerKind(absl::string_view name) {
  if (name == "patch") return TriggerKind::kPatch;
  if (name == "blend") return TriggerKind::kBlend;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown trigger kind \"", name, "\" (patch, blend)"));
}

absl::Status ValidateTrigger(const Trigger& trigger,
                             const std::vector<int64_t>& input_shape) {
  if (input_shape.size() != 3) {
    return absl::InvalidArgumentError("input shape must be [C, H, W]");
  }
  if (!trigger.pattern.defined() || trigger.pattern.dim() != 3) {
    return absl::InvalidArgumentError("trigger pattern must be [C, h, w]");
  }
  const int64_t channels = trigger.pattern.size(0);
  const int64_t height = trigger.pattern.size(1);
  const int64_t width = trigger.pattern.size(2);
  if (channels != input_shape[0]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "trigger has ", channels, " channels, inputs have ", input_shape[0]));
  }
  if (trigger.kind == TriggerKind::kBlend) {
    if (height != input_shape[1] || width != input_shape[2]) {
      return absl::InvalidArgumentError(
          absl::StrCat("blend pattern must cover the input: [", channels, ", ",
                       input_shape[1], ", ", input_shape[2], "]"));
    }
    if (!(trigger.blend_alpha > 0.0 && trigger.blend_alpha <= 1.0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "blend alpha must be in (0, 1]; got ", trigger.blend_alpha));
    }
    return absl::OkStatus();
  }
  if (trigger.row < 0 || trigger.col < 0 ||
      trigger.row + height > input_shape[1] ||
      trigger.col + width > input_shape[2]) {
    return absl::InvalidArgumentError(
        absl::StrCat("patch of ", height, "x", width, " at (", trigger.row,
                     ", ", trigger.col, ") does not fit a ", input_shape[1],
                     "x", input_shape[2], " input"));
  }
  return absl::OkStatus();
}

absl::StatusOr<torch::Tensor> ApplyTrigger(const Trigger& trigger,
                                           const torch::Tensor& inputs) {
  if (inputs.dim() != 4) {
    return absl::InvalidArgumentError("inputs must be [B, C, H, W]");
  }
  RETURN_IF_ERROR(ValidateTrigger(
      trigger, {inputs.size(1), inputs.size(2), inputs.size(3)}));
  return CallTorch("ApplyTrigger", [&]() -> absl::StatusOr<torch::Tensor> {
    torch::Tensor pattern = trigger.pattern.to(inputs.scalar_type());
    if (trigger.kind == TriggerKind::kBlend) {
      return ((1.0 - trigger.blend_alpha) * inputs +
              trigger.blend_alpha * pattern.unsqueeze(0))
          .clamp(0.0, 1.0);
    }
    // A mask keeps the op out-of-place, so gradients reach the pattern.
    const int64_t height = pattern.size(1);
    const int64_t width = pattern.size(2);
    torch::Tensor mask =
        torch::zeros({1, 1, inputs.size(2), inputs.size(3)}, inputs.options());
    mask.index_put_({torch::indexing::Slice(), torch::indexing::Slice(),
                     torch::indexing::Slice(trigger.row, trigger.row + height),
                     torch::indexing::Slice(trigger.col, trigger.col + width)},
                    1.0);
    torch::Tensor canvas = torch::constant_pad_nd(
        pattern, {trigger.col, inputs.size(3) - trigger.col - width,
                  trigger.row, inputs.size(2) - trigger.row - height});
    return (inputs * (1.0 - mask) + canvas.unsqueeze(0) * mask).clamp(0.0, 1.0);
  });
}

absl::StatusOr<MaskAndPattern> TriggerMaskAndPattern(
    const Trigger& trigger, const std::vector<int64_t>& input_shape) {
  RETURN_IF_ERROR(ValidateTrigger(trigger, input_shape));
  return CallTorch(
      "TriggerMaskAndPattern", [&]() -> absl::StatusOr<MaskAndPattern> {
        const int64_t height = input_shape[1];
        const int64_t width = input_shape[2];
        torch::Tensor pattern = trigger.pattern.to(torch::kFloat32).cpu();
        if (trigger.kind == TriggerKind::kBlend) {
          return MaskAndPattern{
              torch::full({1, height, width}, trigger.blend_alpha),
              pattern.clone()};
        }
        const int64_t rows = pattern.size(1);
        const int64_t cols = pattern.size(2);
        MaskAndPattern stamp{torch::zeros({1, height, width}),
                             torch::zeros({input_shape[0], height, width})};
        stamp.mask.slice(1, trigger.row, trigger.row + rows)
            .slice(2, trigger.col, trigger.col + cols)
            .fill_(1.0);
        stamp.pattern.slice(1, trigger.row, trigger.row + rows)
            .slice(2, trigger.col, trigger.col + cols)
            .copy_(pattern);
        return stamp;
      });
}

absl::StatusOr<TriggerLocation> ParseTriggerLocation(absl::string_view name) {
  for (TriggerLocation location :
       {TriggerLocation::kBottomRight, TriggerLocation::kBottomLeft,
        TriggerLocation::kTopRight, TriggerLocation::kTopLeft,
        TriggerLocation::kCenter}) {
    if (name == TriggerLocationName(location)) return location;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown trigger location \"", name,
      "\" (bottom_right, bottom_left, top_right, top_left, center)"));
}

absl::string_view TriggerLocationName(TriggerLocation location) {
  switch (location) {
    case TriggerLocation::kBottomRight:
      return "bottom_right";
    case TriggerLocation::kBottomLeft:
      return "bottom_left";
    case TriggerLocation::kTopRight:
      return "top_right";
    case TriggerLocation::kTopLeft:
      return "top_left";
    case TriggerLocation::kCenter:
      return "center";
  }
  return "bottom_right";
}

std::pair<int64_t, int64_t> ResolvePatchLocation(TriggerLocation location,
                                                 int64_t size, int64_t height,
                                                 int64_t width,
                                                 int64_t margin) {
  const int64_t bottom = std::max<int64_t>(0, height - size - margin);
  const int64_t right = std::max<int64_t>(0, width - size - margin);
  const int64_t top = std::min(margin, std::max<int64_t>(0, height - size));
  const int64_t left = std::min(margin, std::max<int64_t>(0, width - size));
  switch (location) {
    case TriggerLocation::kBottomRight:
      return {bottom, right};
    case TriggerLocation::kBottomLeft:
      return {bottom, left};
    case TriggerLocation::kTopRight:
      return {top, right};
    case TriggerLocation::kTopLeft:
      return {top, left};
    case TriggerLocation::kCenter:
      return {(height - size) / 2, (width - size) / 2};
  }
  return {bottom, right};
}

absl::StatusOr<torch::Tensor> Predict(Model& model, const Head& head,
                                      const torch::Tensor& inputs,
                                      const EvalOptions& options) {
  if (options.batch_size <= 0) {
    return absl::InvalidArgumentError("batch_size must be positive");
  }
  return CallTorch("Predict", [&]() -> absl::StatusOr<torch::Tensor> {
    torch::NoGradGuard no_grad;
    const int64_t n = inputs.size(0);
    torch::Tensor predictions = torch::empty({n}, torch::kInt64);
    for (int64_t begin = 0; begin < n; begin += options.batch_size) {
      const int64_t end = std::min(n, begin + options.batch_size);
      ASSIGN_OR_RETURN(torch::Tensor features,
                       model.Features(inputs.slice(0, begin, end)));
      if (features.size(1) != head.weight.size(1)) {
        return absl::FailedPreconditionError(
            absl::StrCat("head expects ", head.weight.size(1),
                         " features; the model has ", features.size(1)));
      }
      predictions.slice(0, begin, end).copy_(head.Logits(features).argmax(1));
    }
    return predictions;
  });
}

double Accuracy(const torch::Tensor& predictions, const torch::Tensor& labels) {
  if (labels.numel() == 0) return 0.0;
  return predictions.eq(labels).sum().item<double>() /
         static_cast<double>(labels.numel());
}

AttackResult AttackSuccessRate(const torch::Tensor& triggered_predictions,
                               const torch::Tensor& labels, int64_t target) {
  torch::Tensor eligible = labels.ne(target);
  AttackResult result;
  result.evaluated = eligible.sum().item<int64_t>();
  if (result.evaluated == 0) return result;
  result.asr = triggered_predictions.eq(target)
                   .logical_and(eligible)
                   .sum()
                   .item<double>() /
               static_cast<double>(result.evaluated);
  return result;
}

absl::StatusOr<double> EvaluateAccuracy(Model& model, const Head& head,
                                        const LabeledImages& test,
                                        const EvalOptions& options) {
  ASSIGN_OR_RETURN(torch::Tensor predictions,
                   Predict(model, head, test.inputs, options));
  return Accuracy(predictions, test.labels);
}

absl::StatusOr<AttackResult> EvaluateAttack(Model& model, const Head& head,
                                            const LabeledImages& test,
                                            const Trigger& trigger,
                                            int64_t target,
                                            const EvalOptions& options) {
  if (target < 0 || target >= head.NumClasses()) {
    return absl::InvalidArgumentError(
        absl::StrCat("target class ", target, " is not a class of a head with ",
                     head.NumClasses(), " classes"));
  }
  torch::Tensor eligible;
  torch::Tensor inputs;
  {
    torch::NoGradGuard no_grad;
    eligible = test.labels.ne(target).nonzero().squeeze(1);
    inputs = test.inputs.index_select(0, eligible);
  }
  ASSIGN_OR_RETURN(torch::Tensor triggered, ApplyTrigger(trigger, inputs));
  ASSIGN_OR_RETURN(torch::Tensor predictions,
                   Predict(model, head, triggered.detach(), options));
  return AttackSuccessRate(predictions, test.labels.index_select(0, eligible),
                           target);
}

double NormalizedAccuracy(double merged_accuracy, double individual_accuracy) {
  if (individual_accuracy <= 0.0) return 0.0;
  return merged_accuracy / individual_accuracy;
}

}  // namespace mergeguard
