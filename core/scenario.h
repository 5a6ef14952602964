#ifndef MERGEGUARD_CORE_SCENARIO_H_
#define MERGEGUARD_CORE_SCENARIO_H_

// A benchmark scenario directory (docs/scenario.md): scenario.json plus the
// architecture, the base, per-task checkpoints, calibration and test sets and
// the trigger, each listed with its sha256. The bench writes scenarios; DAM,
// LFPM and the server read them through LoadScenario.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/evaluation.h"

namespace mergeguard {

inline constexpr char kScenarioFileName[] = "scenario.json";
inline constexpr char kScenarioFormat[] = "mergeguard-scenario/1";

// ScenarioTask is one task. Paths are relative to the scenario directory.
struct ScenarioTask {
  std::string name;
  // What the task is and where its data comes from.
  std::string description;
  // True when the task is derived from another task's images (e.g. rotated).
  bool derived = false;
  std::vector<std::string> classes;
  // The fine-tune handed to the merge: backdoored when `compromised`.
  std::string checkpoint;
  // The clean fine-tune of the same task (equal to `checkpoint` unless
  // compromised); merging only these gives CA.
  std::string clean_checkpoint;
  // At most 512 labeled inputs for data-dependent defenses.
  std::string calibration;
  // The held-out test split.
  std::string test;
  bool compromised = false;
  // Test accuracy of `checkpoint` and of `clean_checkpoint` alone, measured
  // at build time; the latter is the reference of normalized accuracy.
  double finetuned_accuracy = 0.0;
  double clean_finetuned_accuracy = 0.0;
  // ASR of `checkpoint` alone, for compromised tasks.
  std::optional<double> finetuned_asr;
};

// TriggerSpec describes the attack's trigger; the pattern itself is a
// safetensors file holding `pattern` ([C, s, s] or [C, H, W]).
struct TriggerSpec {
  TriggerKind kind = TriggerKind::kPatch;
  std::string file;
  // How the pattern was made: white, checkerboard, noise, learned.
  std::string pattern;
  // Patch size s (kPatch).
  int64_t size = 0;
  // Named location and the resolved top-left corner (kPatch).
  std::string location;
  int64_t row = 0;
  int64_t col = 0;
  // Blend weight (kBlend).
  double blend_alpha = 0.0;
};

// ScenarioAttack is the planted backdoor.
struct ScenarioAttack {
  // badnets, blended, badmerging.
  std::string kind;
  // Compromised tasks.
  std::vector<std::string> tasks;
  // Target class index within each compromised task.
  int64_t target_class = 0;
  // Fraction of poisoned training examples (BadNets, Blended).
  double poison_rate = 0.0;
  TriggerSpec trigger;
};

struct ScenarioArchitecture {
  // cnn, vit, or an operator's name.
  std::string name;
  // TorchScript `.pt`, relative path.
  std::string file;
  std::vector<int64_t> input_shape;
  int64_t feature_dim = 0;
  int64_t num_parameters = 0;
};

// ScenarioFile is one listed file and its digest.
struct ScenarioFile {
  std::string path;
  std::string sha256;
  uint64_t bytes = 0;
};

struct Scenario {
  // Absolute or caller-relative directory holding scenario.json.
  std::string dir;
  std::string name;
  // Hash of the build configuration; a rebuild with the same one is skipped.
  std::string config_hash;
  // The build configuration as a JSON object (text), for provenance.
  std::string config_json = "{}";
  ScenarioArchitecture architecture;
  // The pretrained backbone, relative path.
  std::string base;
  std::vector<ScenarioTask> tasks;
  std::optional<ScenarioAttack> attack;
  // Every file of the scenario with its digest (written by WriteScenario).
  std::vector<ScenarioFile> files;

  // Path joins `dir` and a relative path of this scenario.
  std::string Path(const std::string& relative) const;
  // FindTask returns the task called `name`, or nullptr.
  const ScenarioTask* FindTask(const std::string& name) const;
};

struct ScenarioLoadOptions {
  // Recompute every file's sha256 and size (DATA_LOSS on a mismatch).
  bool verify_digests = true;
};

// LoadScenario reads and validates `dir`/scenario.json: format, unique task
// names without '/', classes, referenced files listed and present, the
// attack's tasks and target class, and (by default) every file's digest.
// NOT_FOUND for a missing file, INVALID_ARGUMENT for a malformed
// description, DATA_LOSS for a digest or size mismatch; messages name the
// field or file.
absl::StatusOr<Scenario> LoadScenario(const std::string& dir,
                                      const ScenarioLoadOptions& options = {});

// WriteScenario hashes every file `scenario` references (plus
// `extra_files`, relative paths), fills `scenario->files` and writes
// scenario.json atomically. It validates the description as LoadScenario
// does.
absl::Status WriteScenario(Scenario* scenario,
                           const std::vector<std::string>& extra_files = {});

// LoadScenarioTrigger returns the attack's trigger, validated against the
// architecture's input shape. FAILED_PRECONDITION when there is no attack.
absl::StatusOr<Trigger> LoadScenarioTrigger(const Scenario& scenario);
// SaveTriggerPattern writes `trigger.pattern` as the `pattern` tensor.
absl::Status SaveTriggerPattern(const std::string& path,
                                const Trigger& trigger);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_SCENARIO_H_
