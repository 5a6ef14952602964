#ifndef MERGEGUARD_CORE_JOB_H_
#define MERGEGUARD_CORE_JOB_H_

// A job: what a tenant asks the service to do (method, hyperparameters,
// inputs by content digest, architecture, calibration data), its validation,
// and the runner that executes it with core/ alone. The server turns the wire
// format into a JobSpec and back; nothing here knows about gRPC.

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/merge.h"

namespace mergeguard {

// JobMethod is what a job runs: a data-free merge (core/merge.h) or one of the
// defenses, which also need an architecture and calibration data.
enum class JobMethod {
  kTaskArithmetic,
  kTies,
  kDare,
  kBreadcrumbs,
  kConsensus,
  kModelStock,
  kWeightedAverage,
  kDam,
  kLfpm,
  kAdaMerging,
};

// JobMethodName returns the method's name as in the YAML job file, e.g.
// "task_arithmetic", "ties", "dam".
absl::string_view JobMethodName(JobMethod method);
// ParseJobMethod accepts the names JobMethodName returns, and the aliases
// ParseMergeMethod accepts.
absl::StatusOr<JobMethod> ParseJobMethod(absl::string_view name);
// IsDataFreeMerge returns true for the methods core/merge.h runs.
bool IsDataFreeMerge(JobMethod method);
// ToMergeMethod maps a data-free JobMethod to its MergeMethod.
MergeMethod ToMergeMethod(JobMethod method);
// FromMergeMethod maps a MergeMethod to its JobMethod.
JobMethod FromMergeMethod(MergeMethod method);

// JobInputSpec is one task model: a full checkpoint, or a PEFT LoRA adapter
// uploaded as its two files.
struct JobInputSpec {
  // Task name: unique within the job, non-empty, no '/'.
  std::string name;
  // Per-task weight w_t.
  double weight = 1.0;
  // SHA-256 of a safetensors checkpoint; empty for a LoRA adapter.
  std::string model_digest;
  // SHA-256 of `adapter_model.safetensors` and `adapter_config.json`; both
  // empty for a full checkpoint.
  std::string lora_weights_digest;
  std::string lora_config_digest;

  bool is_lora() const { return model_digest.empty(); }
};

// CalibrationRef names one task's calibration set.
struct CalibrationRef {
  // A JobInputSpec::name.
  std::string task;
  // SHA-256 of a safetensors file of inputs (and labels).
  std::string digest;
};

// JobSpec describes a job completely; it is what the journal stores.
struct JobSpec {
  JobMethod method = JobMethod::kTaskArithmetic;
  // SHA-256 of the base model; empty only for kWeightedAverage.
  std::string base_digest;
  std::vector<JobInputSpec> inputs;
  // Hyperparameters of the data-free merges: lambda, ties, dare, breadcrumbs,
  // consensus, model_stock, head_prefix, compute_in_double, output_dtype.
  // The runtime fields (method, threads, on_progress, writer, metadata) are
  // filled in by RunJob.
  MergeOptions merge;
  // Registered architecture name; required by DAM and LFPM.
  std::string architecture;
  // One calibration set per task; required by DAM and LFPM.
  std::vector<CalibrationRef> calibration;
  // Hyperparameters of AdaMerging, DAM and LFPM by name, as text
  // (core/defense_params.h lists them); must be empty for data-free merges.
  std::map<std::string, std::string> defense_parameters;
  // Probe sets (core/probe.h), at most one per task, for AdaMerging, DAM and
  // LFPM: the job then reports probe accuracy and ASR before (the
  // task-arithmetic merge of the inputs) and after the method.
  std::vector<CalibrationRef> probes;
};

// ValidateJobSpec checks everything that can be checked without reading the
// inputs. INVALID_ARGUMENT names the field, e.g. `inputs[1].weight: must be
// finite`; UNIMPLEMENTED for a method this build cannot run yet.
absl::Status ValidateJobSpec(const JobSpec& spec);

// ArtifactRole is what a referenced artifact must hold.
enum class ArtifactRole { kModel, kLoraWeights, kLoraConfig, kCalibration };

// ArtifactReference is one digest a spec uses, with the field naming it.
struct ArtifactReference {
  // e.g. "base_sha256", "inputs[0].lora.config_sha256".
  std::string field;
  std::string digest;
  ArtifactRole role = ArtifactRole::kModel;
};

// ReferencedArtifacts lists every artifact `spec` reads, in field order.
std::vector<ArtifactReference> ReferencedArtifacts(const JobSpec& spec);

// JobSpecToJson returns `spec` as JSON text: the job journal's format and the
// report's provenance. Hyperparameters use the YAML job file's names.
std::string JobSpecToJson(const JobSpec& spec);
// JobSpecFromJson parses JobSpecToJson's output; INVALID_ARGUMENT when it is
// malformed.
absl::StatusOr<JobSpec> JobSpecFromJson(absl::string_view json_text);

// Well-known keys of JobOutput::metrics. The server exports them as security
// metrics; DAM and LFPM fill them.
inline constexpr char kMetricSeconds[] = "seconds";
// Fraction of parameters DAM's backdoor mask M2 flags, in [0, 1].
inline constexpr char kMetricM2FlaggedFraction[] = "m2_flagged_fraction";
// L2 norm of LFPM's anti-backdoor task vector.
inline constexpr char kMetricTauAbNorm[] = "tau_ab_norm";
// Neural-Cleanse-style anomaly index of the mined surrogate triggers.
inline constexpr char kMetricAnomalyIndex[] = "anomaly_index";
// Attack success against the mined triggers, before and after the defense.
inline constexpr char kMetricMinedAsrBefore[] = "mined_asr_before";
inline constexpr char kMetricMinedAsrAfter[] = "mined_asr_after";
// With a probe set (held-out inputs and a known trigger): ASR and clean
// accuracy before and after the defense.
inline constexpr char kMetricProbeAsrBefore[] = "probe_asr_before";
inline constexpr char kMetricProbeAsrAfter[] = "probe_asr_after";
inline constexpr char kMetricProbeAccuracyBefore[] = "probe_accuracy_before";
inline constexpr char kMetricProbeAccuracyAfter[] = "probe_accuracy_after";

// JobProgress is what a running job reports.
struct JobProgress {
  // What the job is doing, e.g. "merge", "dam.outer".
  std::string phase;
  int64_t step = 0;
  // 0 when unknown.
  int64_t total_steps = 0;
  // Latest losses by name.
  std::map<std::string, double> losses;
};

// JobContext connects a running job to whoever runs it.
struct JobContext {
  // Called with progress; may be empty. Called from worker threads,
  // serialized.
  std::function<void(const JobProgress&)> on_progress;
  // Polled between steps (chunks for merges, optimizer steps for DAM and
  // LFPM), possibly from several threads at once; true stops the job with
  // CANCELLED. May be empty.
  std::function<bool()> is_cancelled;
  // Compute threads for the job; 0 = all cores.
  int threads = 0;
  // Recorded in the result's provenance.
  std::string server_version;
  // Returns the TorchScript file of a registered architecture name; needed
  // by AdaMerging, DAM and LFPM. Empty: those methods fail with
  // FAILED_PRECONDITION.
  std::function<absl::StatusOr<std::string>(const std::string& name)>
      resolve_architecture;
};

// JobOutput names what a finished job wrote into its work directory.
struct JobOutput {
  // WORK/model.safetensors.
  std::string model_path;
  // WORK/report.json.
  std::string report_path;
  // Scalar metrics (see kMetric*).
  std::map<std::string, double> metrics;
};

// ArtifactResolver returns the local path of the artifact with `digest`.
using ArtifactResolver =
    std::function<absl::StatusOr<std::string>(const std::string& digest)>;

// RunJob runs a validated `spec`, reading inputs through `resolve` and
// writing the model (provenance in `__metadata__`) and a JSON report into
// `work_dir`, which must exist. CANCELLED when `context.is_cancelled` says
// so; on any error nothing is left under the output names.
absl::StatusOr<JobOutput> RunJob(const JobSpec& spec,
                                 const ArtifactResolver& resolve,
                                 const std::string& work_dir,
                                 const JobContext& context);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_JOB_H_
