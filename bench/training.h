#ifndef MERGEGUARD_BENCH_TRAINING_H_
#define MERGEGUARD_BENCH_TRAINING_H_

// Training for the benchmark world: pretraining the base, linear probes,
// (optionally backdoored) fine-tuning and BadMerging's universal patch
// (ALGORITHMS.md §5). Every random choice comes from a generator seeded by
// the caller, and data order is a seeded permutation, so runs are
// reproducible on CPU for a given thread count.

#include <cstdint>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "bench/datasets.h"
#include "core/evaluation.h"
#include "core/model.h"

namespace mergeguard::bench {

// OptimizerOptions: Adam with linear warm-up, then cosine decay to zero.
struct OptimizerOptions {
  int64_t steps = 1000;
  int64_t batch_size = 128;
  double learning_rate = 1e-3;
  double weight_decay = 0.0;
  // Fraction of `steps` spent warming up.
  double warmup_fraction = 0.05;
};

// TrainReport summarizes one run.
struct TrainReport {
  // Mean loss over the last 10% of steps.
  double final_loss = 0.0;
  double seconds = 0.0;
};

// Pretrain trains every backbone parameter of `model` with a temporary
// linear head over `num_classes` classes on `corpus`, then drops the head.
// Each batch is split into `shards` contiguous shards, each run on its own
// model copy with one intra-op thread (data parallel), which holds up on
// busy machines where one process's intra-op threads would wait on each
// other at every operator. Up to `threads` shards run at once. The result
// depends on `shards` (the order in which gradients are summed) but not on
// `threads`, so a base is the same on any machine size.
absl::StatusOr<TrainReport> Pretrain(Model& model, const ImageSet& corpus,
                                     int64_t num_classes,
                                     const OptimizerOptions& options,
                                     uint64_t seed, int shards = 1,
                                     int threads = 1);

// FitLinearProbe returns a head trained on `model`'s frozen features of
// `train` (features are computed once).
absl::StatusOr<Head> FitLinearProbe(Model& model, const ImageSet& train,
                                    int64_t num_classes,
                                    const OptimizerOptions& options,
                                    uint64_t seed);

// DataPoisoning is BadNets / Blended: a fixed, seeded `rate` fraction of the
// training examples is always seen triggered and labelled `target`.
struct DataPoisoning {
  Trigger trigger;
  int64_t target = 0;
  double rate = 0.1;
};

// Where BadMerging's backdoor term interpolates between the fine-tune θ and
// the base θ0 with a random r, to survive merging coefficients below 1.
enum class BadMergingInterpolation {
  // The paper's: the head sees r·f(θ; x⊕P) + (1−r)·f(θ0; x⊕P).
  kFeatures,
  // The head sees f(θ0 + r·(θ−θ0); x⊕P), the features of the scaled task
  // vector itself, which is what task arithmetic will build.
  kWeights,
};

absl::StatusOr<BadMergingInterpolation> ParseBadMergingInterpolation(
    absl::string_view name);
absl::string_view BadMergingInterpolationName(BadMergingInterpolation kind);

struct BadMergingObjective {
  Trigger trigger;
  int64_t target = 0;
  double weight = 5.0;
  double r_min = 0.2;
  double r_max = 1.0;
  BadMergingInterpolation interpolation = BadMergingInterpolation::kFeatures;
  // kWeights only: weight c of a clean term CE(h(f(θ0 + r·τ; x)), y) at the
  // same interpolated weights, so the scaled task vector keeps its own task
  // (0 = the plain variant).
  double clean_weight = 0.0;
  // When > 0, the backbone's task vector θ−θ0 is projected onto the L2 ball
  // of this radius after every step: a task vector no larger than a clean
  // fine-tune's interferes less with the other tasks once merged.
  double max_norm = 0.0;
  // theta0, frozen; not owned.
  Model* base = nullptr;
};

// WeightInterpolatedBadMergingStep adds to the grad of each tensor in
// `trained` (the backbone's parameters in ParameterTensors order, then the
// head's when it trains) the gradient at θ of
//   CE(h(f(θ; x)), y) + w·CE(h(f(θr; x⊕P)), target) + c·CE(h(f(θr; x)), y),
// θr = θ0 + r·(θ−θ0), for one r ~ U(r_min, r_max) drawn from `generator`,
// and returns that loss.
// The model's weights are θ again when it returns.
absl::StatusOr<torch::Tensor> WeightInterpolatedBadMergingStep(
    Model& model, const Head& head, const std::vector<torch::Tensor>& trained,
    const BadMergingObjective& attack, const torch::Tensor& inputs,
    const torch::Tensor& labels, at::Generator& generator);

// ProjectTaskVector scales the backbone's task vector θ−θ0 (`model` minus
// `base`) down to L2 norm `max_norm` when it is longer.
void ProjectTaskVector(Model& model, Model& base, double max_norm);

struct FineTuneOptions {
  OptimizerOptions optimizer;
  // Also train the head (it starts from the linear probe either way).
  bool train_head = false;
  std::optional<DataPoisoning> poisoning;
  std::optional<BadMergingObjective> badmerging;
};

// FineTune trains `model`'s backbone (and `head` when asked) on `train`.
absl::StatusOr<TrainReport> FineTune(Model& model, Head& head,
                                     const ImageSet& train,
                                     const FineTuneOptions& options,
                                     uint64_t seed);

// OptimizeUniversalPatch is BadMerging's first step: starting from
// `initial` (a kPatch trigger), it optimizes the pattern on the frozen
// `model` with `head` so that patched training inputs go to `target`.
absl::StatusOr<Trigger> OptimizeUniversalPatch(Model& model, const Head& head,
                                               const ImageSet& train,
                                               const Trigger& initial,
                                               int64_t target,
                                               const OptimizerOptions& options,
                                               uint64_t seed);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_TRAINING_H_
