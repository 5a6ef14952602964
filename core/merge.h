#ifndef MERGEGUARD_CORE_MERGE_H_
#define MERGEGUARD_CORE_MERGE_H_

// Data-free merges (ALGORITHMS.md §1), streamed tensor by tensor.

#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/checkpoint.h"
#include "core/dtype.h"

namespace mergeguard {

enum class MergeMethod {
  kTaskArithmetic,   // "task_arithmetic"
  kTies,             // "ties"
  kDare,             // "dare"
  kBreadcrumbs,      // "breadcrumbs"
  kConsensus,        // "consensus" (TALL masks)
  kModelStock,       // "model_stock"
  kWeightedAverage,  // "weighted_average"
};

// ParseMergeMethod accepts the quoted names above (and "ta", "tall").
absl::StatusOr<MergeMethod> ParseMergeMethod(absl::string_view name);
absl::string_view MergeMethodName(MergeMethod method);

// Where TIES trims: over the whole flattened task vector (the paper,
// FusionBench) or per tensor (mergekit).
enum class TrimScope { kGlobal, kTensor };
// How TIES combines the entries that agree with the elected sign.
enum class DisjointMode { kMean, kSum };
// Which merge DARE's rescaled task vectors feed.
enum class DareCombine { kTaskArithmetic, kTies };
// Where Model Stock's cosine is measured.
enum class CosineScope { kGlobal, kTensor };

// TiesOptions: defaults from ALGORITHMS.md §1.
struct TiesOptions {
  // Percentage of entries (by |tau|) each task keeps, in (0, 100].
  double top_k_percent = 20.0;
  TrimScope trim_scope = TrimScope::kGlobal;
  DisjointMode disjoint = DisjointMode::kMean;
};

struct DareOptions {
  // Probability of dropping an entry, in [0, 1).
  double drop_rate = 0.9;
  DareCombine combine = DareCombine::kTaskArithmetic;
  // Seeds the counter-based RNG: a (seed, task, tensor, index) always draws
  // the same number, whatever the threading.
  uint64_t seed = 0;
};

struct BreadcrumbsOptions {
  // Fraction of the largest |tau| dropped per tensor.
  double gamma = 0.01;
  // Fraction of entries that survive per tensor.
  double density = 0.9;
};

struct ConsensusOptions {
  // Mask threshold: m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|.
  double tall_lambda = 0.6;
  // Minimum number of tasks whose mask must agree.
  int min_agreeing = 2;
  // Scale on the masked tau_MTL.
  double alpha = 0.3;
};

struct ModelStockOptions {
  CosineScope cosine_scope = CosineScope::kGlobal;
};

// MergeInput is one task model: a full checkpoint or a PEFT LoRA adapter
// directory (detected by adapter_config.json).
struct MergeInput {
  // Task name; names the task's head in the output (`<name>/<head key>`).
  std::string name;
  std::string path;
  // Per-task weight w_t.
  double weight = 1.0;
};

// MergeProgress is reported after each tensor of each pass over the inputs.
// Global TIES trimming and global Model Stock take statistics passes before
// the merge pass; the merge pass is always the last.
struct MergeProgress {
  // 1-based index of the current pass, and the number of passes.
  int pass = 1;
  int passes = 1;
  // Tensors finished in this pass, and the pass's total.
  int64_t tensors_done = 0;
  int64_t tensors_total = 0;
  // Output bytes written so far (merge pass only).
  uint64_t bytes_written = 0;
};

struct MergeOptions {
  MergeMethod method = MergeMethod::kTaskArithmetic;
  // Global scale lambda. Unset (NaN) means the method's default: 0.3 for
  // task arithmetic, DARE with combine=task_arithmetic and Breadcrumbs; 1.0
  // for TIES and DARE with combine=ties. Setting it for consensus (see
  // consensus.alpha), model_stock or weighted_average is INVALID_ARGUMENT.
  double lambda = std::numeric_limits<double>::quiet_NaN();
  TiesOptions ties;
  DareOptions dare;
  BreadcrumbsOptions breadcrumbs;
  ConsensusOptions consensus;
  ModelStockOptions model_stock;
  // Tensors whose names start with this are task heads: never merged, copied
  // per task into the output as `<task name>/<key>`. Empty disables.
  std::string head_prefix = "head.";
  // Compute in float64 instead of float32.
  bool compute_in_double = false;
  // Output storage type; unset keeps each tensor's input dtype.
  std::optional<DType> output_dtype;
  // Worker threads; 0 = hardware concurrency.
  int threads = 0;
  // Elements per streamed chunk.
  int64_t chunk_elements = 1 << 16;
  // Output layout (sharding).
  CheckpointWriterOptions writer;
  // Extra `__metadata__` entries for the output (provenance).
  std::map<std::string, std::string> metadata;
  // Optional progress callback; called from worker threads, serialized.
  // It must not call back into the merge.
  std::function<void(const MergeProgress&)> on_progress;
  // Optional cancellation check, polled before each chunk from worker threads
  // (possibly concurrently: make it thread-safe, e.g. read an atomic). True
  // stops the merge with CANCELLED; nothing is left at the output path.
  std::function<bool()> is_cancelled;
};

// MergeReport summarizes a finished merge.
struct MergeReport {
  std::string output_path;
  // Backbone tensors merged; integer tensors copied from the base; heads
  // copied as `<task name>/<key>`.
  int64_t merged_tensors = 0;
  int64_t copied_tensors = 0;
  int64_t head_tensors = 0;
  // Tensor bytes consumed from the base and the inputs (each counted once,
  // however many passes read them; LoRA adapters count their weights file),
  // and tensor bytes written.
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  // Passes over the inputs: statistics passes plus the merge pass.
  int passes = 1;
  double seconds = 0.0;
  // Model Stock's interpolation ratio t: the global one, or with
  // cosine_scope=tensor the mean over merged tensors.
  double model_stock_ratio = 0.0;
};

// Merge merges `inputs` onto `base_path` with `options` and writes the result
// to `output_path` (a .safetensors file, or a directory when sharded).
// `base_path` may be empty only for kWeightedAverage over full checkpoints.
// docs/merges.md gives every formula and each choice the spec left open.
// Errors name the key and input: INVALID_ARGUMENT for bad options or files,
// FAILED_PRECONDITION for mismatched key sets, shapes or dtypes, NOT_FOUND
// for missing files. Nothing is left at `output_path` on failure.
absl::StatusOr<MergeReport> Merge(const std::string& base_path,
                                  const std::vector<MergeInput>& inputs,
                                  const std::string& output_path,
                                  const MergeOptions& options);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_MERGE_H_
