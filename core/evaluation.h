#ifndef MERGEGUARD_CORE_EVALUATION_H_
#define MERGEGUARD_CORE_EVALUATION_H_

// Evaluation (ALGORITHMS.md §5, §6): labeled image sets, triggers, clean
// accuracy, attack success rate and normalized accuracy.

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/model.h"
#include "core/torch_fwd.h"

namespace mergeguard {

// LabeledImages is a set of inputs in [0, 1] with their class labels. On disk
// (calibration and test sets) it is a safetensors file with `inputs`
// [N, C, H, W] float32 (or uint8, read as value / 255, which keeps large
// test sets small) and `labels` [N] int64.
struct LabeledImages {
  torch::Tensor inputs;  // [N, C, H, W] float32
  torch::Tensor labels;  // [N] int64

  int64_t size() const;
};

// LoadLabeledImages reads a labeled set from `path`. INVALID_ARGUMENT when
// tensors are missing, mistyped or of different lengths, or a label is
// negative.
absl::StatusOr<LabeledImages> LoadLabeledImages(const std::string& path);
// LabeledImagesFromTensors checks and converts a loaded labeled set the same
// way, for files that hold more than the set; `path` names it in errors.
absl::StatusOr<LabeledImages> LabeledImagesFromTensors(
    const NamedTensors& tensors, const std::string& path);
// SaveLabeledImages writes `images` to `path` atomically; uint8 inputs stay
// uint8, anything else is stored as float32.
absl::Status SaveLabeledImages(const std::string& path,
                               const LabeledImages& images);

// TriggerKind: how a trigger is stamped onto an input.
enum class TriggerKind {
  // The s x s region at (row, col) is replaced by the pattern (BadNets,
  // BadMerging's learned patch).
  kPatch,
  // x' = (1 - alpha) x + alpha P over the whole input (Blended).
  kBlend,
};

// TriggerKindName returns "patch" or "blend"; ParseTriggerKind inverts it.
absl::string_view TriggerKindName(TriggerKind kind);
absl::StatusOr<TriggerKind> ParseTriggerKind(absl::string_view name);

// Trigger is a concrete trigger for one input shape.
struct Trigger {
  TriggerKind kind = TriggerKind::kPatch;
  // kPatch: [C, s, s]; kBlend: [C, H, W]. Values in [0, 1].
  torch::Tensor pattern;
  // Top-left corner of the patch (kPatch only).
  int64_t row = 0;
  int64_t col = 0;
  // Blend weight of the pattern (kBlend only), in (0, 1].
  double blend_alpha = 0.15;
};

// ValidateTrigger checks `trigger` against inputs of shape [C, H, W]: the
// pattern's shape, that the patch lies inside the image, and alpha.
absl::Status ValidateTrigger(const Trigger& trigger,
                             const std::vector<int64_t>& input_shape);

// ApplyTrigger returns a copy of `inputs` [B, C, H, W] with the trigger
// stamped on every example, clamped to [0, 1]. Differentiable in the pattern.
absl::StatusOr<torch::Tensor> ApplyTrigger(const Trigger& trigger,
                                           const torch::Tensor& inputs);

// TriggerMaskAndPattern is a trigger in the stamped form
// x' = (1 − M)⊙x + M⊙P that DAM's and LFPM's own triggers take: mask M
// [1, H, W] is 1 on a patch and 0 elsewhere (the blend weight at every
// pixel for a blend); pattern P [C, H, W] is the patch on a zero canvas
// (the blend pattern). Float32, on the CPU.
struct MaskAndPattern {
  torch::Tensor mask;
  torch::Tensor pattern;
};
absl::StatusOr<MaskAndPattern> TriggerMaskAndPattern(
    const Trigger& trigger, const std::vector<int64_t>& input_shape);

// TriggerLocation names where a patch goes; ResolvePatchLocation returns the
// top-left (row, col) of an s x s patch on an h x w image, `margin` pixels
// from the named edges.
enum class TriggerLocation {
  kBottomRight,
  kBottomLeft,
  kTopRight,
  kTopLeft,
  kCenter
};
absl::StatusOr<TriggerLocation> ParseTriggerLocation(absl::string_view name);
absl::string_view TriggerLocationName(TriggerLocation location);
std::pair<int64_t, int64_t> ResolvePatchLocation(TriggerLocation location,
                                                 int64_t size, int64_t height,
                                                 int64_t width,
                                                 int64_t margin = 1);

// EvalOptions tunes evaluation runs.
struct EvalOptions {
  // Examples per forward pass.
  int64_t batch_size = 500;
};

// Predict returns the argmax class [N] (int64) of `head` over `model`'s
// features of `inputs`, in batches, without autograd.
absl::StatusOr<torch::Tensor> Predict(Model& model, const Head& head,
                                      const torch::Tensor& inputs,
                                      const EvalOptions& options = {});

// Accuracy returns the fraction of `predictions` equal to `labels`
// (0 for empty sets).
double Accuracy(const torch::Tensor& predictions, const torch::Tensor& labels);

// AttackResult is the attack success rate over one test set.
struct AttackResult {
  // Fraction of evaluated examples predicted as the target after triggering.
  double asr = 0.0;
  // Examples whose true label is not the target (the denominator).
  int64_t evaluated = 0;
};

// AttackSuccessRate computes ASR from the predictions on triggered inputs:
// over examples whose label is not `target`, the fraction predicted as
// `target` (ALGORITHMS.md §6).
AttackResult AttackSuccessRate(const torch::Tensor& triggered_predictions,
                               const torch::Tensor& labels, int64_t target);

// EvaluateAccuracy returns the clean accuracy of (model, head) on `test`.
absl::StatusOr<double> EvaluateAccuracy(Model& model, const Head& head,
                                        const LabeledImages& test,
                                        const EvalOptions& options = {});

// EvaluateAttack triggers the non-target examples of `test` and returns the
// ASR of (model, head) for `target`. INVALID_ARGUMENT when `target` is not a
// class of the head.
absl::StatusOr<AttackResult> EvaluateAttack(Model& model, const Head& head,
                                            const LabeledImages& test,
                                            const Trigger& trigger,
                                            int64_t target,
                                            const EvalOptions& options = {});

// NormalizedAccuracy returns merged / individual (0 when individual is 0).
double NormalizedAccuracy(double merged_accuracy, double individual_accuracy);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_EVALUATION_H_
