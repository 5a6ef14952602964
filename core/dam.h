#ifndef MERGEGUARD_CORE_DAM_H_
#define MERGEGUARD_CORE_DAM_H_

// DAM, defense-aware merging (ALGORITHMS.md §3; Yang et al., ICLR 2025):
// merge coefficients lambda and two Concrete masks over the task vectors, a
// task-shared mask M1 and a backdoor-detection mask M2, meta-learned on
// unlabeled calibration inputs against synthesized per-task triggers; then
// AdaMerging with the mask fixed. docs/dam.md records every choice the spec
// left open and every departure from the public code.

#include <ATen/core/Generator.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/adamerging.h"
#include "core/differentiable_merge.h"
#include "core/evaluation.h"
#include "core/model.h"
#include "core/task_vectors.h"
#include "core/torch_fwd.h"

namespace mergeguard {

// FinalMaskMode: how the mask m* of phase 2 and of the output is formed from
// the learned logits s1, s2. Every mode is normalised by its mean per tensor,
// as the training masks are.
enum class FinalMaskMode {
  // sigmoid(s1) * sigmoid(s2): the expected mask; deterministic.
  kExpected,
  // One Concrete draw of each mask (the public code's choice), seeded.
  kSample,
  // 1[s1 > -margin] * 1[s2 > -margin] (`hard_mask_margin`, default 0:
  // 1[sigmoid(s) > 0.5]).
  kHard,
  // sigmoid(s1) * 1[s2 > -margin]: M2's flags removed outright, the
  // task-shared mask kept soft (a departure; docs/dam.md).
  kHardDetection,
};
// ParseFinalMaskMode accepts "expected", "sample", "hard" and
// "hard_detection".
absl::StatusOr<FinalMaskMode> ParseFinalMaskMode(absl::string_view name);
absl::string_view FinalMaskModeName(FinalMaskMode mode);

// BackdoorLoss: the second term of the M2 objective L2.
enum class BackdoorLoss {
  // beta * H(predictions on x + delta): the reference's ("regu2").
  kEntropy,
  // beta * KL(p(x) || p(x + delta)): predictions must not move under the
  // synthesized trigger.
  kConsistency,
  // beta * KL(p_ref(x) || p(x + delta)), where p_ref are the predictions
  // on clean x of the same merge with M2 removed (theta(lambda', m1), no
  // gradient): the triggered predictions must follow an anchor that M2
  // cannot move, so M2 cannot satisfy the term by collapsing the clean
  // predictions onto one class.
  kAnchored,
};
// ParseBackdoorLoss accepts "entropy", "consistency" and "anchored".
absl::StatusOr<BackdoorLoss> ParseBackdoorLoss(absl::string_view name);
absl::string_view BackdoorLossName(BackdoorLoss loss);

// DetectionCleanLoss: the clean term of the M2 objective L2.
enum class DetectionCleanLoss {
  // H(predictions on x) (the spec's and the reference's).
  kEntropy,
  // KL(p_ref(x) || p(x)), where p_ref are the predictions of the same merge
  // with M2 removed (theta(lambda', m1), no gradient): M2 must keep the
  // clean predictions instead of sharpening them. Entropy is minimised by a
  // model that sends every input to one class, which the backdoored task
  // vector offers; this anchor is not.
  kFidelity,
};
// ParseDetectionCleanLoss accepts "entropy" and "fidelity".
absl::StatusOr<DetectionCleanLoss> ParseDetectionCleanLoss(
    absl::string_view name);
absl::string_view DetectionCleanLossName(DetectionCleanLoss loss);

// MaskOptimizer: how the mask logits s1 and s2 take their steps.
enum class MaskOptimizer {
  // Adam (the spec's and the reference's): every entry moves by about the
  // learning rate per step, whatever the size of its gradient.
  kAdam,
  // The gradient of each tensor divided by its root mean square: the
  // typical entry moves by the learning rate, as with Adam, but an entry
  // whose gradient is ten times the typical one moves ten times as far, so
  // the logits keep how strongly the loss pushed each entry. A departure
  // (docs/dam.md).
  kNormalizedSgd,
};
// ParseMaskOptimizer accepts "adam" and "normalized_sgd".
absl::StatusOr<MaskOptimizer> ParseMaskOptimizer(absl::string_view name);
absl::string_view MaskOptimizerName(MaskOptimizer optimizer);

// TriggerShape: the form of the synthesized per-task trigger.
enum class TriggerShape {
  // delta_t, a dense additive perturbation with ||delta_t||_inf <= epsilon,
  // trained by ascending CE to the pseudo-labels (the spec's and, apart
  // from the bound, the reference's).
  kDense,
  // A stamped patch, x' = (1 - M_t) x + M_t P_t with M_t = sigmoid(mask
  // logits) [1, H, W] and P_t = sigmoid(pattern logits) [C, H, W] (as LFPM
  // mines triggers), trained on the bounded untargeted loss
  // -log(1 - p_yhat(x')) + patch_mask_l1_weight * ||M_t||_1, so that it
  // stays small and localised like a backdoor trigger.
  kPatch,
};
// ParseTriggerShape accepts "dense" and "patch".
absl::StatusOr<TriggerShape> ParseTriggerShape(absl::string_view name);
absl::string_view TriggerShapeName(TriggerShape shape);

// DamTriggerSource: where a task's L2 trigger comes from when the caller
// gives none (DamOptions::known_triggers).
enum class DamTriggerSource {
  // Synthesized and updated every outer step, as `trigger_shape` says (the
  // spec's and the reference's).
  kSynthesized,
  // Found once, before phase 1, by LFPM's Neural-Cleanse scan
  // (ScanLfpmTasks) of the task-arithmetic merge at `initial_lambda`: the
  // task's easiest class's mined mask and pattern, then held fixed like a
  // known trigger. A departure from the reference (docs/dam.md, "Scanned
  // triggers").
  kScan,
};
// ParseDamTriggerSource accepts "synthesized" and "scan".
absl::StatusOr<DamTriggerSource> ParseDamTriggerSource(absl::string_view name);
absl::string_view DamTriggerSourceName(DamTriggerSource source);

struct DamOptions {
  // One lambda per task, or per task and backbone tensor. Default task-wise.
  LambdaGranularity granularity = LambdaGranularity::kTaskWise;
  // Initial value of every lambda. Default 0.3.
  double initial_lambda = 0.3;
  // Outer (meta) steps of phase 1. Default 1000.
  int64_t steps = 1000;
  // Adam learning rate of the first-order meta step on lambda. Default 1e-3.
  double lambda_learning_rate = 1e-3;
  // When true, lambda is reset to `initial_lambda` before every meta step,
  // as the public code does, so the masks always see lambda' one Adam step
  // from the start; by default lambda <- lambda' carries over (ALGORITHMS.md
  // §3). Default false.
  bool reset_lambda_each_step = false;
  // Adam learning rate of the mask logits s1 and s2. Default 1e-3.
  double mask_learning_rate = 1e-3;
  // When > 0, the Adam learning rate of s2 (M2) alone; 0 uses
  // `mask_learning_rate` for both masks, as the reference does. Default 0.
  double detection_mask_learning_rate = 0.0;
  // The mask logits' optimizer. Default adam (the spec's).
  MaskOptimizer mask_optimizer = MaskOptimizer::kAdam;
  // Initial mask logits (0: each entry kept with probability 1/2).
  // Default 0.
  double initial_mask_logit = 0.0;
  // Binary Concrete temperature T. Default 0.5.
  double temperature = 0.5;
  // Shape of the synthesized triggers. Default dense (the spec's).
  TriggerShape trigger_shape = TriggerShape::kDense;
  // Adam learning rate of the trigger parameters (delta_t, or the patch's
  // mask and pattern logits). Default 1e-4 (dense; a patch wants ~0.1).
  double trigger_learning_rate = 1e-4;
  // L-infinity bound epsilon on delta_t, in input units ([0, 1] images);
  // dense triggers only. Default 0.1.
  double trigger_epsilon = 0.1;
  // Weight of ||M_t||_1 (summed over pixels) in a patch trigger's loss;
  // patch triggers only. Default 0.01 (LFPM's).
  double patch_mask_l1_weight = 0.01;
  // Weight beta of the backdoor term of L2. Default 0.1.
  double beta = 0.1;
  // The backdoor term of L2. Default entropy (the reference's).
  BackdoorLoss backdoor_loss = BackdoorLoss::kEntropy;
  // The clean term of L2. Default entropy (the reference's).
  DetectionCleanLoss detection_clean_loss = DetectionCleanLoss::kEntropy;
  // The mask of phase 2 and of the output. Default expected.
  FinalMaskMode final_mask = FinalMaskMode::kExpected;
  // The hard modes drop an entry only when its logit is at most -margin,
  // i.e. when training pushed it at least this far towards dropping; 0 is
  // the spec's 1[sigmoid(s) > 0.5]. A departure (docs/dam.md). Default 0.
  double hard_mask_margin = 0.0;
  // When > 0, the task vectors DAM masks and merges are first cut as TIES
  // cuts them (TiesTrimmedTaskVectors: each task's top this-percent by
  // |τ|, then only the entries agreeing with the elected sign), so the
  // masks start from what TIES keeps. The scan sees the cut vectors too
  // (own models θ0 + cut τ_t). A departure (docs/dam.md). Default 0 (off).
  double ties_pretrim_percent = 0.0;
  // With ties_pretrim_percent > 0 and trigger_source = scan: run DAM twice,
  // without the pretrim and with it, and keep the merge on which the
  // scanned triggers reach less (DamPretrimSelection). Twice the cost. A
  // departure (docs/dam.md). Default false.
  bool ties_pretrim_select = false;
  // With ties_pretrim_select, > 0: each scanned trigger's mask is also
  // probed towards this many other classes of its task (evenly spaced from
  // the target), and the merges are compared by the mean over tasks of the
  // target's reach minus the controls' mean reach. A merge on which any
  // class is easier to reach with a patch of that footprint raises both; a
  // backdoor raises only its target's. 0 (default): the target's reach
  // alone.
  int64_t pretrim_select_control_classes = 0;
  // With ties_pretrim_select and scan_differential, > 0: only the scanned
  // tasks whose differential ratio is at most this bound (the tasks the
  // scan flags as backdoored, as LFPM's differential gate does) are
  // scored, and a merge's score is the highest of theirs: the merge is as
  // weak as its worst backdoor, and the clean tasks' easiest classes, which
  // the pretrim makes easier, no longer decide. With no task flagged the
  // score is the mean over all tasks, as with 0 (default).
  double pretrim_select_max_ratio = 0.0;
  // Phase-2 AdaMerging steps. Default 500.
  int64_t adamerging_steps = 500;
  // Phase-2 AdaMerging Adam learning rate. Default 1e-3.
  double adamerging_learning_rate = 1e-3;
  // When true phase 2 starts from phase 1's lambda; by default it restarts
  // from `initial_lambda`, as the reference does. Default false.
  bool adamerging_from_meta_lambda = false;
  // Calibration inputs per task per forward pass. Default 16 (the
  // reference's).
  int64_t batch_size = 16;
  // Seeds masks, batches and the `sample` final mask; with it, CPU results
  // are deterministic for a given thread count. Default 0.
  uint64_t seed = 0;
  // "cpu" or "cuda[:N]". Default "cpu".
  std::string device = "cpu";
  // LibTorch intra-op threads (process-wide); 0 = hardware concurrency.
  // Default 0.
  int threads = 0;
  // Steps between progress reports (the last step of each phase is always
  // reported). Default 10.
  int64_t progress_interval = 10;
  // Optional progress callback (phases "dam_meta", "dam_adamerging"), on the
  // calling thread.
  ProgressCallback on_progress;
  // Optional cancellation check, polled between steps of both phases; true
  // stops the run with CANCELLED.
  CancellationCheck is_cancelled;
  // Extra `__metadata__` entries for file outputs (provenance).
  std::map<std::string, std::string> metadata;
  // Triggers the caller already suspects, by task name (another tool's, a
  // user's report, or in the benchmark's oracle diagnostic the attack's
  // own). Such a task's trigger in L2 is this one, stamped as
  // x' = (1 − M)⊙x + M⊙P (TriggerMaskAndPattern), instead of a synthesized
  // one; it is never updated. Every name must be a task of the set.
  // Default none.
  std::map<std::string, Trigger> known_triggers;
  // Where the other tasks' triggers come from. Default synthesized.
  DamTriggerSource trigger_source = DamTriggerSource::kSynthesized;
  // trigger_source = scan: Adam steps of the scan (LFPM's `scan_steps`; the
  // rest of the scan is LfpmTriggerOptions' defaults). Default 100.
  int64_t scan_steps = 100;
  // trigger_source = scan: scan each task on its own model (base plus its
  // task vector) instead of on the task-arithmetic merge
  // (LfpmTriggerOptions::scan_own_model). Default off (docs/dam.md,
  // departure 10).
  bool scan_own_model = false;
  // With scan_own_model: mining steps on each own-model trigger against the
  // task-arithmetic merge it is used on
  // (LfpmTriggerOptions::merge_refine_steps). Default 0 (docs/dam.md,
  // departure 10).
  int64_t scan_merge_refine_steps = 0;
  // With scan_own_model: also scan the base with each task's head and take
  // the class whose trigger shrank most from base to own model (smallest
  // own/base mask ratio) instead of the own model's easiest class
  // (LfpmTriggerOptions::differential_gate's targeting). Default off
  // (docs/dam.md, departure 11).
  bool scan_differential = false;
};

// ValidateDamOptions returns INVALID_ARGUMENT naming the bad field.
absl::Status ValidateDamOptions(const DamOptions& options);

// MaskTensorStats describes the learned masks on one backbone tensor.
// "Sparsity" of a mask is the fraction of entries whose keep probability
// sigmoid(s) is below 1/2, i.e. entries training pushed towards dropping.
// M2 "flags" exactly its sparse entries: sigmoid(s2) < 0.5.
struct MaskTensorStats {
  std::string key;
  int64_t elements = 0;
  double m1_sparsity = 0.0;
  double m2_sparsity = 0.0;
  // Mean keep probability sigmoid(s) of each mask.
  double m1_keep_mean = 0.0;
  double m2_keep_mean = 0.0;
  // Fraction of zeros in the final mask m* (non-zero only for `hard`).
  double final_mask_zeros = 0.0;
};

// TriggerSize is the size of one task's synthesized perturbation delta_t.
// For a patch trigger, linf and l2 are those of M_t * P_t and mask_l1 is
// ||M_t||_1; mask_l1 is 0 for a dense trigger.
struct TriggerSize {
  std::string task;
  double linf = 0.0;
  double l2 = 0.0;
  double mask_l1 = 0.0;
};

// DamScannedTrigger is one task's trigger from the scan (trigger_source =
// scan), on the task-arithmetic merge it was mined against.
struct DamScannedTrigger {
  std::string task;
  int64_t target_class = 0;
  // The task's Neural-Cleanse anomaly index (LfpmAnomaly).
  double anomaly_index = 0.0;
  // The trigger's mask size, after scan_merge_refine_steps.
  double mask_l1 = 0.0;
  // Fraction of the task's other-class scan inputs it sends to the class,
  // on the scanned model (before any refinement).
  double reach = 0.0;
  // scan_differential: the class's own/base mask ratio; 0 without it.
  double differential_ratio = 0.0;
};

// DamPretrimSelection is how ties_pretrim_select chose. Each scanned task's
// trigger from the run without the pretrim (the full fine-tunes' scan) has
// its pattern re-mined for `scan_steps` steps against each candidate merge,
// its mask held fixed (ProbeTriggerReach); the merge with the lower score
// is kept, the one without the pretrim on a tie. The score is the mean over
// the scanned tasks of the target's reach, less the control classes' mean
// reach when pretrim_select_control_classes > 0. With
// pretrim_select_max_ratio > 0 and a task flagged, it is instead the highest
// of the flagged tasks' (target reach less control reach).
struct DamPretrimSelection {
  bool ran = false;
  std::vector<std::string> tasks;
  std::vector<double> reach_without;  // per task in `tasks`
  std::vector<double> reach_with;
  double mean_reach_without = 0.0;
  double mean_reach_with = 0.0;
  // Per task: the classes probed as controls and their mean reach on each
  // merge; empty without control classes.
  std::vector<std::vector<int64_t>> control_classes;
  std::vector<double> control_reach_without;
  std::vector<double> control_reach_with;
  // Per task: whether pretrim_select_max_ratio flagged it; empty when that
  // option is 0.
  std::vector<bool> flagged;
  // Per task: the differential ratio the flag was read from (the scan
  // without the pretrim; the kept run's scanned_triggers hold the scan of
  // the merge that was kept); empty when that option is 0.
  std::vector<double> flag_ratios;
  // "mean" (over all tasks) or "max_flagged".
  std::string score_rule = "mean";
  // What was compared.
  double score_without = 0.0;
  double score_with = 0.0;
  bool kept_pretrim = false;
  double probe_seconds = 0.0;
};

// The probabilities at which DamReport gives the mask logits' quantiles.
inline constexpr double kMaskLogitQuantiles[] = {0.01, 0.05, 0.25, 0.5,
                                                 0.75, 0.95, 0.99};

// DamReport is what a DAM run learned and what it cost.
struct DamReport {
  std::vector<std::string> task_names;
  std::vector<MaskTensorStats> tensors;
  // Element-weighted totals over the backbone.
  double m1_sparsity = 0.0;
  double m2_sparsity = 0.0;
  // Fraction of backbone parameters M2 flags (sigmoid(s2) < 0.5); equal to
  // m2_sparsity, named for what it means.
  double m2_flagged_fraction = 0.0;
  double final_mask_zeros = 0.0;
  // Quantiles of the mask logits s1 and s2 over the whole backbone, at
  // kMaskLogitQuantiles: how far training moved them from their start, which
  // the sparsities above (signs only) do not show.
  std::vector<double> m1_logit_quantiles;
  std::vector<double> m2_logit_quantiles;
  // Lambda after phase 1, and the final (phase-2) lambda: [N] or [N, K].
  torch::Tensor meta_lambdas;
  torch::Tensor lambdas;
  // Loss curves, one entry per step. mask_loss is L1 on odd steps (M1
  // updated) and L2 on even steps (M2 updated); trigger_loss is the
  // cross-entropy to the pseudo-labels that the trigger step increases,
  // summed over tasks.
  std::vector<double> inner_loss;
  std::vector<double> trigger_loss;
  std::vector<double> mask_loss;
  std::vector<double> adamerging_loss;
  std::vector<TriggerSize> triggers;
  // trigger_source = scan: the scanned tasks, and the scan's seconds.
  std::vector<DamScannedTrigger> scanned_triggers;
  double scan_seconds = 0.0;
  // ties_pretrim_select: the choice; the other fields describe the kept
  // run, except `seconds`, which covers both runs and the probe.
  DamPretrimSelection pretrim_selection;
  int64_t outer_steps = 0;
  double meta_seconds = 0.0;
  double adamerging_seconds = 0.0;
  double seconds_per_outer_step = 0.0;
  double seconds = 0.0;
};

// DamReportToJson returns the report as a JSON object (docs/dam.md), with
// the effective options under "options".
std::string DamReportToJson(const DamReport& report, const DamOptions& options);

struct DamResult {
  // theta0 + sum_t lambda_t m* tau_t, parallel to the set's keys, on the CPU.
  std::vector<torch::Tensor> backbone;
  DamReport report;
};

// DamTrainer runs DAM one outer step at a time; RunDam drives it. It
// installs tensors into `model`, which must outlive it.
class DamTrainer {
 public:
  static absl::StatusOr<std::unique_ptr<DamTrainer>> Create(
      Model& model, const TaskVectorSet& set,
      const std::vector<torch::Tensor>& calibration, const DamOptions& options);
  ~DamTrainer();

  // Step runs one outer step of phase 1 (ALGORITHMS.md §3, steps 1-5).
  absl::Status Step();
  // Finish runs phase 2 with the final mask and returns the merge; `model`
  // then holds the merged backbone (without autograd history).
  absl::StatusOr<DamResult> Finish();

  int64_t steps_done() const { return steps_done_; }
  // Current lambda, mask logits and perturbations (detached, on the CPU).
  torch::Tensor Lambdas() const;
  std::vector<torch::Tensor> SharedMaskLogits() const;     // s1
  std::vector<torch::Tensor> DetectionMaskLogits() const;  // s2
  // Perturbations() is [N, C, H, W]: delta for dense triggers, M * P for
  // patch triggers and for known ones (DamOptions::known_triggers).
  torch::Tensor Perturbations() const;
  // PatchMasks() is M = sigmoid(mask logits), [N, 1, H, W], for patch
  // triggers; undefined for dense ones.
  torch::Tensor PatchMasks() const;
  // FixedTriggers() is each task's known or scanned trigger (on the
  // device), in task order; undefined tensors where the task's trigger is
  // synthesized.
  std::vector<MaskAndPattern> FixedTriggers() const;
  // FinalMask returns m* for `mode`, per backbone tensor (on the device).
  // kSample draws from the trainer's generator.
  std::vector<torch::Tensor> FinalMask(FinalMaskMode mode);

  // MetaStepRecord is what the last meta step on lambda saw, recorded only
  // after EnableMetaStepRecordForTesting.
  struct MetaStepRecord {
    // The detached, normalised mask m per backbone tensor.
    std::vector<torch::Tensor> mask;
    // The batch of each task.
    std::vector<torch::Tensor> batches;
    torch::Tensor lambdas_before;
    torch::Tensor lambdas_after;
    // dL_in/dlambda as autograd computed it.
    torch::Tensor lambda_gradient;
  };
  void EnableMetaStepRecordForTesting() { record_meta_step_ = true; }
  const MetaStepRecord& last_meta_step_for_testing() const {
    return meta_record_;
  }

 private:
  DamTrainer(Model& model, const DamOptions& options);
  absl::Status Init(const TaskVectorSet& set,
                    const std::vector<torch::Tensor>& calibration);
  absl::Status StepImpl();
  DamReport MakeReport(const std::vector<torch::Tensor>& final_mask) const;
  // s2's learning rate: `detection_mask_learning_rate`, or when that is 0
  // `mask_learning_rate`.
  double DetectionMaskLearningRate() const {
    return options_.detection_mask_learning_rate > 0
               ? options_.detection_mask_learning_rate
               : options_.mask_learning_rate;
  }

  Model& model_;
  DamOptions options_;
  double start_seconds_ = 0.0;
  double meta_seconds_ = 0.0;
  int64_t steps_done_ = 0;
  bool record_meta_step_ = false;
  MetaStepRecord meta_record_;
  std::vector<std::string> task_names_;
  // Pimpl keeps LibTorch's optimizers out of this header.
  struct State;
  std::unique_ptr<State> state_;
  DamReport curves_;
};

// RunDam runs both phases on `set` through `model` with calibration[t]
// ([N_t, C, H, W] in [0, 1]) for task t. On success `model` holds the
// merged backbone. INVALID_ARGUMENT for bad options or calibration sets,
// FAILED_PRECONDITION when the set does not fit the model, CANCELLED,
// INTERNAL (or RESOURCE_EXHAUSTED) for LibTorch errors.
absl::StatusOr<DamResult> RunDam(Model& model, const TaskVectorSet& set,
                                 const std::vector<torch::Tensor>& calibration,
                                 const DamOptions& options);

// DamMergeFiles loads the architecture, the base, the tasks and their
// calibration files (LoadDataDependentJob), runs DAM and writes the merged
// model (backbone plus `<task>/head.*`, provenance and a report summary in
// `__metadata__`) to `output_path`. Nothing is written on failure.
absl::StatusOr<DamResult> DamMergeFiles(
    const std::string& architecture_path, const std::string& base_path,
    const std::vector<DataDependentTask>& tasks, const std::string& output_path,
    const DamOptions& options);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_DAM_H_
