#ifndef MERGEGUARD_BENCH_SCENARIO_BUILDER_H_
#define MERGEGUARD_BENCH_SCENARIO_BUILDER_H_

// `mergeguard-bench build`: data, pretrained base, clean and backdoored
// fine-tunes, trigger and evaluation, written as a scenario directory
// (docs/scenario.md). A build is keyed by a hash of its configuration: a
// directory already holding that configuration, intact, is reused.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "bench/datasets.h"
#include "bench/model_zoo.h"
#include "bench/training.h"
#include "core/evaluation.h"
#include "core/scenario.h"

namespace mergeguard::bench {

enum class AttackKind { kBadNets, kBlended, kBadMerging };
absl::StatusOr<AttackKind> ParseAttackKind(absl::string_view name);
absl::string_view AttackKindName(AttackKind kind);

// AttackOptions: ALGORITHMS.md §5 defaults.
struct AttackOptions {
  AttackKind kind = AttackKind::kBadMerging;
  // Compromised tasks (one or more); empty means the preset's default.
  std::vector<std::string> compromised;
  // Target class index within each compromised task.
  int64_t target_class = 0;
  // Patch side s (BadNets, BadMerging).
  int64_t trigger_size = 4;
  TriggerLocation location = TriggerLocation::kBottomRight;
  // white, checkerboard or noise for BadNets; noise for Blended; the
  // learned patch's initialization (noise) for BadMerging. Empty picks the
  // attack's default (white, noise, noise).
  std::string pattern;
  // Fraction of poisoned training examples (BadNets, Blended).
  double poison_rate = 0.1;
  // Blended's alpha.
  double blend_alpha = 0.15;
  // BadMerging's weight w on the feature-interpolation loss.
  double badmerging_weight = 5.0;
  // BadMerging's interpolation: the paper's feature interpolation, or a
  // variant that interpolates the weights (bench/training.h).
  BadMergingInterpolation badmerging_interpolation =
      BadMergingInterpolation::kFeatures;
  // BadMergingObjective::clean_weight and ::max_norm (0 = off).
  double badmerging_clean_weight = 0.0;
  double badmerging_max_norm = 0.0;
  // Let the attacker also train the compromised task's head. Heads travel
  // in each task's checkpoint and are never merged, so an attacker controls
  // theirs; off by default (the paper keeps heads fixed).
  bool train_attacked_head = false;
};

enum class Preset {
  // Six tasks, full splits; at most 15 minutes per architecture on 2 cores.
  kDefault,
  // Three tasks, small splits and few steps; for tests (well under a minute).
  kTiny,
};
absl::StatusOr<Preset> ParsePreset(absl::string_view name);
absl::string_view PresetName(Preset preset);

// PresetConfig is everything a preset fixes: data sizes and schedules.
struct PresetConfig {
  DataOptions data;
  OptimizerOptions pretrain;
  OptimizerOptions probe;
  OptimizerOptions finetune;
  OptimizerOptions patch;
  // Train the head during fine-tuning (it starts from the linear probe).
  bool train_head = false;
  // Compromised task when AttackOptions::compromised is empty.
  std::string default_compromised;
};

// GetPresetConfig returns the configuration of `preset` for `architecture`.
PresetConfig GetPresetConfig(Preset preset, Architecture architecture);

struct BuildOptions {
  Preset preset = Preset::kDefault;
  Architecture architecture = Architecture::kCnn;
  AttackOptions attack;
  uint64_t seed = 0;
  // Overrides of the preset's fine-tuning schedule; 0 keeps the preset's.
  int64_t finetune_steps = 0;
  double finetune_learning_rate = 0.0;
  // Train every task's head with its backbone during fine-tuning (the
  // preset keeps heads at their linear probe, as the paper does).
  bool finetune_train_head = false;
  // Override of the preset's pretraining steps; 0 keeps the preset's.
  int64_t pretrain_steps = 0;
  // Pretraining splits each batch into this many data-parallel shards.
  // It shapes the base (gradients are summed shard by shard), so it is part
  // of the configuration; `threads` only says how many run at once. 2 is
  // what a default (all-cores) build on the 2-core machines had before.
  int pretrain_shards = 2;
  // The scenario directory to write.
  std::string out_dir;
  // Threads in all (0 = hardware concurrency). Pretraining shards and
  // fine-tunes run in parallel, one thread each; results do not depend on
  // this number.
  int threads = 0;
  DataSources sources = DefaultDataSources();
  // Shared stage cache (pretrained base, clean fine-tunes), keyed by the
  // hash of the part of the configuration that shapes them, so scenarios
  // that differ only in the attack reuse them. Empty disables it.
  std::string cache_dir;
  // Rebuild even when `out_dir` already holds this configuration.
  bool force = false;
  // Progress lines (to stderr in the CLI); may be empty.
  std::function<void(const std::string&)> log;
};

// ResolvedConfig is the preset's configuration with `options`' overrides.
PresetConfig ResolvedConfig(const BuildOptions& options);

struct BuildResult {
  Scenario scenario;
  // True when an existing directory with the same configuration was kept.
  bool reused = false;
  double seconds = 0.0;
};

// ConfigHash returns the hex sha256 of the canonical JSON of the
// configuration (preset, architecture, attack, seed, schedules, pretraining
// shards, data sizes, format version). Thread count and paths are excluded:
// they do not change what is built.
std::string ConfigHash(const BuildOptions& options);

// BuildScenario builds (or reuses) the scenario of `options`. The directory
// is written beside `out_dir` and renamed into place, so an interrupted
// build never leaves a half scenario under `out_dir`.
absl::StatusOr<BuildResult> BuildScenario(const BuildOptions& options);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_SCENARIO_BUILDER_H_
