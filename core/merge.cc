#include "core/merge.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <memory>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "core/lora.h"
#include "core/merge_kernels.h"
#include "core/radix_select.h"
#include "core/status_macros.h"
#include "core/thread_pool.h"
#include "core/torch_status.h"
#include "core/version.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

using merge_internal::ChunkKernels;
using merge_internal::MergeParams;
using merge_internal::TensorState;
using merge_internal::TieCounts;

struct MethodName {
  MergeMethod method;
  absl::string_view name;
};

constexpr MethodName kMethodNames[] = {
    {MergeMethod::kTaskArithmetic, "task_arithmetic"},
    {MergeMethod::kTies, "ties"},
    {MergeMethod::kDare, "dare"},
    {MergeMethod::kBreadcrumbs, "breadcrumbs"},
    {MergeMethod::kConsensus, "consensus"},
    {MergeMethod::kModelStock, "model_stock"},
    {MergeMethod::kWeightedAverage, "weighted_average"},
};

// ---------------------------------------------------------------------------
// Options

bool UsesLambda(MergeMethod method) {
  return method == MergeMethod::kTaskArithmetic ||
         method == MergeMethod::kTies || method == MergeMethod::kDare ||
         method == MergeMethod::kBreadcrumbs;
}

// UsesTies: TIES's trim/elect/disjoint steps run.
bool UsesTies(const MergeOptions& options) {
  return options.method == MergeMethod::kTies ||
         (options.method == MergeMethod::kDare &&
          options.dare.combine == DareCombine::kTies);
}

double ResolvedLambda(const MergeOptions& options) {
  if (!std::isnan(options.lambda)) return options.lambda;
  return UsesTies(options) ? 1.0 : 0.3;
}

absl::Status OptionError(absl::string_view option, absl::string_view rule,
                         double got) {
  return absl::InvalidArgumentError(
      absl::StrCat(option, " must be ", rule, ", got ", got));
}

// TaskName returns the resolved name of input `i`: its own, or "task<i>".
std::string TaskName(const std::vector<MergeInput>& inputs, size_t i) {
  return inputs[i].name.empty() ? absl::StrCat("task", i) : inputs[i].name;
}

absl::Status ValidateOptions(const std::string& base_path,
                             const std::vector<MergeInput>& inputs,
                             const MergeOptions& options) {
  const MergeMethod method = options.method;
  const absl::string_view method_name = MergeMethodName(method);
  if (inputs.empty()) {
    return absl::InvalidArgumentError("inputs: at least one model is required");
  }
  std::set<std::string> names;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const std::string field = absl::StrCat("inputs[", i, "]");
    if (inputs[i].path.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(field, ".path is empty"));
    }
    const std::string name = TaskName(inputs, i);
    if (absl::StrContains(name, '/')) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".name \"", name, "\" must not contain '/'"));
    }
    if (!names.insert(name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ".name \"", name, "\" is used by another input"));
    }
    if (!std::isfinite(inputs[i].weight)) {
      return OptionError(absl::StrCat(field, ".weight"), "finite",
                         inputs[i].weight);
    }
  }
  if (base_path.empty() && method != MergeMethod::kWeightedAverage) {
    return absl::InvalidArgumentError(
        absl::StrCat("base_path is required for ", method_name,
                     " (only weighted_average works without a base model)"));
  }
  if (!std::isnan(options.lambda)) {
    if (!UsesLambda(method)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "lambda is not used by ", method_name,
          method == MergeMethod::kConsensus ? " (set consensus.alpha)" : ""));
    }
    if (!std::isfinite(options.lambda)) {
      return OptionError("lambda", "finite", options.lambda);
    }
  }
  if (UsesTies(options)) {
    const double k = options.ties.top_k_percent;
    if (!(k > 0.0 && k <= 100.0)) {
      return OptionError("ties.top_k_percent", "in (0, 100]", k);
    }
  }
  switch (method) {
    case MergeMethod::kDare: {
      const double p = options.dare.drop_rate;
      if (!(p >= 0.0 && p < 1.0)) {
        return OptionError("dare.drop_rate", "in [0, 1)", p);
      }
      break;
    }
    case MergeMethod::kBreadcrumbs: {
      const BreadcrumbsOptions& b = options.breadcrumbs;
      if (!(b.gamma >= 0.0 && b.gamma < 1.0)) {
        return OptionError("breadcrumbs.gamma", "in [0, 1)", b.gamma);
      }
      if (!(b.density > 0.0 && b.density <= 1.0)) {
        return OptionError("breadcrumbs.density", "in (0, 1]", b.density);
      }
      if (b.gamma + b.density > 1.0) {
        return OptionError(
            "breadcrumbs.gamma + breadcrumbs.density",
            "<= 1 (the top gamma are dropped, a density fraction survives)",
            b.gamma + b.density);
      }
      break;
    }
    case MergeMethod::kConsensus: {
      const ConsensusOptions& c = options.consensus;
      if (!(c.tall_lambda >= 0.0 && std::isfinite(c.tall_lambda))) {
        return OptionError("consensus.tall_lambda", "finite and >= 0",
                           c.tall_lambda);
      }
      if (c.min_agreeing < 1 ||
          static_cast<size_t>(c.min_agreeing) > inputs.size()) {
        return OptionError(
            "consensus.min_agreeing",
            absl::StrCat("in [1, ", inputs.size(), "] (the number of inputs)"),
            c.min_agreeing);
      }
      if (!std::isfinite(c.alpha)) {
        return OptionError("consensus.alpha", "finite", c.alpha);
      }
      break;
    }
    case MergeMethod::kModelStock:
      if (inputs.size() < 2) {
        return absl::InvalidArgumentError(
            "model_stock needs at least 2 inputs (it averages pairwise "
            "cosines)");
      }
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (inputs[i].weight != 1.0) {
          return OptionError(
              absl::StrCat("inputs[", i, "].weight"),
              "1 for model_stock (it takes no per-input weights)",
              inputs[i].weight);
        }
      }
      break;
    case MergeMethod::kWeightedAverage: {
      double sum = 0.0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (inputs[i].weight < 0.0) {
          return OptionError(absl::StrCat("inputs[", i, "].weight"),
                             ">= 0 for weighted_average", inputs[i].weight);
        }
        sum += inputs[i].weight;
      }
      if (!(sum > 0.0)) {
        return OptionError("the sum of inputs[].weight",
                           "> 0 for weighted_average", sum);
      }
      break;
    }
    case MergeMethod::kTaskArithmetic:
    case MergeMethod::kTies:
      break;
  }
  if (options.chunk_elements < 1) {
    return OptionError("chunk_elements", ">= 1",
                       static_cast<double>(options.chunk_elements));
  }
  if (options.threads < 0) {
    return OptionError("threads", ">= 0 (0 = all cores)", options.threads);
  }
  if (options.output_dtype.has_value() &&
      !IsFloatingPoint(*options.output_dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("output_dtype must be F64, F32, F16 or BF16, got ",
                     DTypeName(*options.output_dtype)));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Plan: opened inputs, validated key sets, what each output tensor is.

struct OpenedInput {
  std::string name;
  const MergeInput* input = nullptr;
  std::unique_ptr<Checkpoint> checkpoint;  // full checkpoint
  std::unique_ptr<LoraAdapter> lora;       // or PEFT adapter
};

// CopyJob is an output tensor copied (and possibly re-encoded) from one
// source tensor: a non-floating backbone tensor or a task head.
struct CopyJob {
  std::string out_name;
  const Checkpoint* source = nullptr;
  std::string source_name;
  DType in_dtype = DType::kF32;
  DType out_dtype = DType::kF32;
  int64_t numel = 0;
  const uint8_t* bytes = nullptr;
  bool head = false;
};

struct MergePlan {
  std::unique_ptr<Checkpoint> base;
  std::vector<OpenedInput> inputs;
  MergeParams params;
  // Backbone floating tensors, in name order, and per tensor the inputs
  // whose LoRA adapter targets it.
  std::vector<TensorState> merged;
  std::vector<std::vector<bool>> lora_targets;
  std::vector<std::vector<int64_t>> merged_shapes;
  std::vector<CopyJob> copies;
  std::vector<TensorSpec> output_specs;
  uint64_t bytes_read = 0;
};

absl::Status WithContext(const absl::Status& status,
                         absl::string_view context) {
  return absl::Status(status.code(),
                      absl::StrCat(context, ": ", status.message()));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string Describe(const OpenedInput& input) {
  return absl::StrCat("input \"", input.name, "\" (", input.input->path, ")");
}

absl::StatusOr<MergePlan> BuildPlan(const std::string& base_path,
                                    const std::vector<MergeInput>& inputs,
                                    const MergeOptions& options) {
  MergePlan plan;
  const size_t num_tasks = inputs.size();
  if (!base_path.empty()) {
    absl::StatusOr<std::unique_ptr<Checkpoint>> base =
        Checkpoint::Open(base_path);
    if (!base.ok()) {
      return WithContext(base.status(), absl::StrCat("base ", base_path));
    }
    plan.base = *std::move(base);
  }
  bool any_lora = false;
  for (size_t i = 0; i < num_tasks; ++i) {
    OpenedInput opened;
    opened.name = TaskName(inputs, i);
    opened.input = &inputs[i];
    const std::string context = Describe(opened);
    if (IsLoraAdapterDir(inputs[i].path)) {
      absl::StatusOr<std::unique_ptr<LoraAdapter>> adapter =
          LoraAdapter::Open(inputs[i].path);
      if (!adapter.ok()) return WithContext(adapter.status(), context);
      opened.lora = *std::move(adapter);
      any_lora = true;
      std::error_code ec;
      const uintmax_t size = std::filesystem::file_size(
          std::filesystem::path(inputs[i].path) / kAdapterWeightsFileName, ec);
      if (!ec) plan.bytes_read += size;
    } else {
      absl::StatusOr<std::unique_ptr<Checkpoint>> checkpoint =
          Checkpoint::Open(inputs[i].path);
      if (!checkpoint.ok()) return WithContext(checkpoint.status(), context);
      opened.checkpoint = *std::move(checkpoint);
    }
    plan.inputs.push_back(std::move(opened));
  }
  if (any_lora && plan.base == nullptr) {
    return absl::InvalidArgumentError(
        "LoRA adapter inputs need a base model (base_path is empty)");
  }

  // The reference key set: the base, or without one the first input.
  const Checkpoint* reference =
      plan.base != nullptr ? plan.base.get() : plan.inputs[0].checkpoint.get();
  const std::string reference_desc =
      plan.base != nullptr
          ? absl::StrCat("the base (", base_path, ")")
          : absl::StrCat("the first input (", inputs[0].path, ")");
  auto is_head = [&](absl::string_view key) {
    return !options.head_prefix.empty() &&
           absl::StartsWith(key, options.head_prefix);
  };

  // Key sets, shapes and dtypes of full inputs must match the reference's
  // backbone.
  for (const OpenedInput& input : plan.inputs) {
    if (input.checkpoint == nullptr || input.checkpoint.get() == reference) {
      continue;
    }
    for (const std::string& key : input.checkpoint->Names()) {
      if (!is_head(key) && reference->Find(key) == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat(Describe(input), " has tensor \"", key, "\", which ",
                         reference_desc, " lacks"));
      }
    }
    for (const std::string& key : reference->Names()) {
      if (is_head(key)) continue;
      const TensorEntry* want = reference->Find(key);
      const TensorEntry* got = input.checkpoint->Find(key);
      if (got == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat(Describe(input), " is missing tensor \"", key,
                         "\", which ", reference_desc, " has"));
      }
      if (got->shape != want->shape) {
        return absl::FailedPreconditionError(absl::StrCat(
            "tensor \"", key, "\" has shape ", ShapeString(got->shape), " in ",
            Describe(input), " but ", ShapeString(want->shape), " in ",
            reference_desc));
      }
      if (got->dtype != want->dtype) {
        return absl::FailedPreconditionError(absl::StrCat(
            "tensor \"", key, "\" has dtype ", DTypeName(got->dtype), " in ",
            Describe(input), " but ", DTypeName(want->dtype), " in ",
            reference_desc));
      }
    }
  }
  // LoRA targets must be floating backbone tensors of the base.
  for (const OpenedInput& input : plan.inputs) {
    if (input.lora == nullptr) continue;
    for (const std::string& key : input.lora->TargetKeys()) {
      const TensorEntry* entry = reference->Find(key);
      if (is_head(key)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "LoRA adapter ", Describe(input), " targets head tensor \"", key,
            "\"; heads are never merged"));
      }
      if (entry == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat("LoRA adapter ", Describe(input), " targets tensor \"",
                         key, "\", which ", reference_desc, " lacks"));
      }
      if (!IsFloatingPoint(entry->dtype)) {
        return absl::FailedPreconditionError(
            absl::StrCat("LoRA adapter ", Describe(input), " targets tensor \"",
                         key, "\", whose dtype ", DTypeName(entry->dtype),
                         " is not floating point"));
      }
    }
  }

  // Method constants.
  MergeParams& params = plan.params;
  params.method = options.method;
  params.num_tasks = num_tasks;
  params.lambda = ResolvedLambda(options);
  params.weight_sum = 0.0;
  for (const MergeInput& input : inputs) {
    params.weights.push_back(input.weight);
    params.weight_sum += input.weight;
  }
  params.dare = options.method == MergeMethod::kDare;
  if (params.dare) {
    params.dare_drop_below =
        merge_internal::DareDropBelow(options.dare.drop_rate);
    params.dare_rescale = 1.0 / (1.0 - options.dare.drop_rate);
  }
  params.ties = UsesTies(options);
  params.disjoint = options.ties.disjoint;
  params.consensus = options.consensus;

  // The base is read unless the method ignores it (weighted average over
  // full checkpoints).
  const bool read_base =
      plan.base != nullptr &&
      (options.method != MergeMethod::kWeightedAverage || any_lora);
  std::set<std::string> output_names;
  for (const std::string& key : reference->Names()) {
    if (is_head(key)) continue;  // the base's own head is dropped
    ASSIGN_OR_RETURN(TensorRef ref, reference->Get(key));
    const TensorEntry& entry = *ref.entry;
    output_names.insert(key);
    if (!IsFloatingPoint(entry.dtype)) {
      // Integer buffers (counters, indices) are copied, not merged.
      CopyJob job;
      job.out_name = key;
      job.source = reference;
      job.source_name = key;
      job.in_dtype = job.out_dtype = entry.dtype;
      job.numel = entry.NumElements();
      job.bytes = ref.bytes.data();
      plan.copies.push_back(std::move(job));
      plan.output_specs.push_back({key, entry.dtype, entry.shape});
      plan.bytes_read += ref.bytes.size();
      continue;
    }
    TensorState s;
    s.name = key;
    s.numel = entry.NumElements();
    s.dtype = entry.dtype;
    s.out_dtype = options.output_dtype.value_or(entry.dtype);
    if (read_base) {
      s.base = ref.bytes.data();
      plan.bytes_read += ref.bytes.size();
    }
    std::vector<bool> targets(num_tasks, false);
    for (size_t t = 0; t < num_tasks; ++t) {
      const OpenedInput& input = plan.inputs[t];
      if (input.checkpoint != nullptr) {
        ASSIGN_OR_RETURN(TensorRef in, input.checkpoint->Get(key));
        s.full.push_back(in.bytes.data());
        plan.bytes_read += in.bytes.size();
      } else {
        s.full.push_back(nullptr);
        const std::vector<std::string>& keys = input.lora->TargetKeys();
        targets[t] = std::binary_search(keys.begin(), keys.end(), key);
      }
    }
    s.delta.assign(num_tasks, nullptr);
    if (params.dare) {
      for (size_t t = 0; t < num_tasks; ++t) {
        s.dare_stream.push_back(
            merge_internal::DareStream(options.dare.seed, t, key));
      }
    }
    s.trim_min.assign(num_tasks, 0);
    s.band_lo.assign(num_tasks, 0);
    s.band_hi.assign(num_tasks, ~uint64_t{0});
    plan.output_specs.push_back({key, s.out_dtype, entry.shape});
    plan.merged.push_back(std::move(s));
    plan.lora_targets.push_back(std::move(targets));
    plan.merged_shapes.push_back(entry.shape);
  }
  // Heads, per task, as `<task name>/<key>`.
  for (const OpenedInput& input : plan.inputs) {
    if (input.checkpoint == nullptr) continue;
    for (const std::string& key : input.checkpoint->Names()) {
      if (!is_head(key)) continue;
      ASSIGN_OR_RETURN(TensorRef ref, input.checkpoint->Get(key));
      const TensorEntry& entry = *ref.entry;
      CopyJob job;
      job.out_name = absl::StrCat(input.name, "/", key);
      if (!output_names.insert(job.out_name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("head \"", key, "\" of ", Describe(input),
                         " would be written as \"", job.out_name,
                         "\", which is already a backbone tensor"));
      }
      job.source = input.checkpoint.get();
      job.source_name = key;
      job.in_dtype = entry.dtype;
      job.out_dtype = IsFloatingPoint(entry.dtype)
                          ? options.output_dtype.value_or(entry.dtype)
                          : entry.dtype;
      job.numel = entry.NumElements();
      job.bytes = ref.bytes.data();
      job.head = true;
      plan.output_specs.push_back({job.out_name, job.out_dtype, entry.shape});
      plan.bytes_read += ref.bytes.size();
      plan.copies.push_back(std::move(job));
    }
  }
  return plan;
}

// ---------------------------------------------------------------------------
// RunParallel runs fn(worker, item) for every item in [0, n) on up to
// `workers` pool threads (inline when there is no pool) and returns the first
// error by item index among those that ran; after an error no new item
// starts.
absl::Status RunParallel(
    ThreadPool* pool, size_t workers, size_t n,
    const std::function<absl::Status(size_t worker, size_t item)>& fn) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  absl::Mutex mu;
  absl::Status first_error;
  size_t first_item = n;
  auto body = [&](size_t worker) {
    while (!failed.load(std::memory_order_relaxed)) {
      const size_t item = next.fetch_add(1);
      if (item >= n) return;
      absl::Status status;
      try {
        status = fn(worker, item);
      } catch (const std::exception& e) {
        status = TorchErrorToStatus(e, "merge");
      }
      if (!status.ok()) {
        absl::MutexLock lock(&mu);
        if (item < first_item) {
          first_item = item;
          first_error = status;
        }
        failed = true;
      }
    }
  };
  const size_t threads = std::min(workers, n);
  if (pool == nullptr || threads <= 1) {
    body(0);
  } else {
    for (size_t w = 0; w < threads; ++w) {
      pool->Schedule([&body, w] { body(w); });
    }
    pool->Wait();
  }
  absl::MutexLock lock(&mu);
  return first_error;
}

// ---------------------------------------------------------------------------
// MergeEngine streams the plan's tensors in chunks, on a pool of workers,
// once per pass: statistics passes (radix-select histograms for global TIES
// trimming, dot products for global Model Stock) and the merge pass. Chunks
// are handed out in tensor order, so only a few tensors are in flight: a
// tensor's per-tensor state (LoRA dW, thresholds) is built by the first
// worker that needs it and freed, with its mapped pages, by the worker that
// finishes its last chunk.
template <typename T>
class MergeEngine {
 public:
  using Key = KeyFor<T>;

  MergeEngine(MergePlan* plan, const MergeOptions& options)
      : plan_(*plan), options_(options) {
    size_t workers = options.threads > 0 ? static_cast<size_t>(options.threads)
                                         : std::thread::hardware_concurrency();
    workers_ = std::max<size_t>(1, workers);
    if (workers_ > 1) pool_ = std::make_unique<ThreadPool>(workers_);
    for (size_t w = 0; w < workers_; ++w) {
      kernels_.push_back(std::make_unique<ChunkKernels<T>>(plan_.params));
    }
    out_buffers_.resize(workers_);
    for (const TensorState& st : plan_.merged) {
      total_elements_ += static_cast<uint64_t>(st.numel);
    }
    if (total_elements_ > 0) {
      global_keep_ =
          KeepCount(options_.ties.top_k_percent / 100.0, total_elements_);
    }
    passes_ = 1;
    if (GlobalTrim()) passes_ += RadixSelect<Key>::kPasses;
    if (GlobalModelStock()) passes_ += 1;
  }

  int passes() const { return passes_; }
  double model_stock_ratio() const { return model_stock_ratio_; }

  // ComputeStatistics runs the statistics passes.
  absl::Status ComputeStatistics() {
    if (GlobalTrim()) RETURN_IF_ERROR(ComputeGlobalTrim());
    if (GlobalModelStock()) RETURN_IF_ERROR(ComputeGlobalModelStock());
    return absl::OkStatus();
  }

  // WriteMerged runs the merge pass into `writer`.
  absl::Status WriteMerged(CheckpointWriter* writer) {
    writer_ = writer;
    RETURN_IF_ERROR(RunPass(Pass::kMerge));
    if (options_.method == MergeMethod::kModelStock &&
        options_.model_stock.cosine_scope == CosineScope::kTensor &&
        !plan_.merged.empty()) {
      double sum = 0.0;
      for (const TensorState& s : plan_.merged) sum += s.model_stock_ratio;
      model_stock_ratio_ = sum / static_cast<double>(plan_.merged.size());
    }
    return absl::OkStatus();
  }

 private:
  // Tensors at least this large select their per-task thresholds on
  // several threads.
  static constexpr size_t kParallelSelectElements = size_t{1} << 18;

  enum class Pass { kHistogram, kGram, kMerge };
  enum class Prep { kNone, kRunning, kReady, kFailed };

  struct Chunk {
    size_t tensor;  // merged index, or merged.size() + copy index
    int64_t begin;
    size_t n;
  };

  // TensorRuntime is one tensor's state during a pass.
  struct TensorRuntime {
    absl::Mutex mu;
    Prep prep ABSL_GUARDED_BY(mu) = Prep::kNone;
    absl::Status prep_status ABSL_GUARDED_BY(mu);
    std::vector<size_t> deferred ABSL_GUARDED_BY(mu);
    // Written by the preparing worker before prep becomes kReady, then
    // read-only until the finishing worker frees it.
    std::vector<torch::Tensor> deltas;
    std::atomic<int64_t> remaining{0};
    std::atomic<int64_t> positive{0};
    std::atomic<int64_t> negative{0};
    size_t first_chunk = 0;
    size_t num_chunks = 0;
    // Gram pass: num_tasks^2 doubles per chunk, each chunk its own slot;
    // allocated by the tensor's first chunk, freed by its last.
    std::vector<double> gram_partials ABSL_GUARDED_BY(mu);
  };

  // GlobalTrim: TIES trims over the whole task vector, and not everything
  // is kept (then trim_min stays 0).
  bool GlobalTrim() const {
    return plan_.params.ties &&
           options_.ties.trim_scope == TrimScope::kGlobal &&
           global_keep_ < total_elements_;
  }
  bool GlobalModelStock() const {
    return options_.method == MergeMethod::kModelStock &&
           options_.model_stock.cosine_scope == CosineScope::kGlobal;
  }
  size_t num_tasks() const { return plan_.params.num_tasks; }

  bool NeedsPrep(Pass pass) const {
    for (const OpenedInput& input : plan_.inputs) {
      if (input.lora != nullptr) return true;
    }
    if (pass != Pass::kMerge) return false;
    return (plan_.params.ties &&
            options_.ties.trim_scope == TrimScope::kTensor) ||
           options_.method == MergeMethod::kBreadcrumbs ||
           (options_.method == MergeMethod::kModelStock &&
            options_.model_stock.cosine_scope == CosineScope::kTensor);
  }

  absl::Status ComputeGlobalTrim() {
    selects_.assign(num_tasks(), RadixSelect<Key>(global_keep_));
    const size_t bins = RadixSelect<Key>::kBins;
    for (int p = 0; p < RadixSelect<Key>::kPasses; ++p) {
      histograms_.assign(workers_,
                         std::vector<uint64_t>(num_tasks() * bins, 0));
      histogram_ptrs_.assign(workers_, std::vector<uint64_t*>(num_tasks()));
      for (size_t w = 0; w < workers_; ++w) {
        for (size_t t = 0; t < num_tasks(); ++t) {
          histogram_ptrs_[w][t] = histograms_[w].data() + t * bins;
        }
      }
      RETURN_IF_ERROR(RunPass(Pass::kHistogram));
      std::vector<uint64_t> sum(bins);
      for (size_t t = 0; t < num_tasks(); ++t) {
        std::fill(sum.begin(), sum.end(), 0);
        for (const std::vector<uint64_t>& h : histograms_) {
          for (size_t b = 0; b < bins; ++b) sum[b] += h[t * bins + b];
        }
        RETURN_IF_ERROR(selects_[t].FinishPass(sum.data()));
      }
    }
    histograms_.clear();
    histogram_ptrs_.clear();
    for (TensorState& s : plan_.merged) {
      for (size_t t = 0; t < num_tasks(); ++t) {
        s.trim_min[t] = selects_[t].key();
      }
    }
    return absl::OkStatus();
  }

  absl::Status ComputeGlobalModelStock() {
    tensor_grams_.assign(plan_.merged.size(),
                         std::vector<double>(num_tasks() * num_tasks(), 0.0));
    RETURN_IF_ERROR(RunPass(Pass::kGram));
    std::vector<double> gram(num_tasks() * num_tasks(), 0.0);
    for (const std::vector<double>& g : tensor_grams_) {
      for (size_t k = 0; k < gram.size(); ++k) gram[k] += g[k];
    }
    tensor_grams_.clear();
    model_stock_ratio_ = ModelStockRatio(gram);
    for (TensorState& s : plan_.merged) {
      s.model_stock_ratio = model_stock_ratio_;
    }
    return absl::OkStatus();
  }

  // ModelStockRatio returns t = N c / (1 + (N - 1) c), c the mean pairwise
  // cosine read off the Gram matrix (upper triangle). A zero task vector has
  // cosine 0 with every other; a non-positive denominator (the unit task
  // vectors sum to zero) gives t = 0.
  double ModelStockRatio(const std::vector<double>& gram) const {
    const size_t n = num_tasks();
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) {
      for (size_t j = i + 1; j < n; ++j) {
        const double norms =
            std::sqrt(gram[i * n + i]) * std::sqrt(gram[j * n + j]);
        if (norms > 0.0) sum += gram[i * n + j] / norms;
      }
    }
    const double c = sum / static_cast<double>(n * (n - 1) / 2);
    const double denominator = 1.0 + static_cast<double>(n - 1) * c;
    if (!(denominator > 0.0)) return 0.0;
    return static_cast<double>(n) * c / denominator;
  }

  // KeepCount returns max(1, llround(fraction * n)), at most n.
  static uint64_t KeepCount(double fraction, uint64_t n) {
    const long long rounded = std::llround(fraction * static_cast<double>(n));
    return std::min<uint64_t>(n, std::max<long long>(1, rounded));
  }

  absl::Status RunPass(Pass pass) {
    ++pass_index_;
    const size_t num_merged = plan_.merged.size();
    const size_t num_tensors =
        num_merged + (pass == Pass::kMerge ? plan_.copies.size() : 0);
    const size_t chunk_elements = static_cast<size_t>(options_.chunk_elements);
    runtimes_.clear();
    chunks_.clear();
    for (size_t i = 0; i < num_tensors; ++i) {
      auto runtime = std::make_unique<TensorRuntime>();
      const size_t numel = static_cast<size_t>(
          i < num_merged ? plan_.merged[i].numel
                         : plan_.copies[i - num_merged].numel);
      runtime->first_chunk = chunks_.size();
      size_t begin = 0;
      do {
        const size_t n = std::min(chunk_elements, numel - begin);
        chunks_.push_back({i, static_cast<int64_t>(begin), n});
        begin += n;
      } while (begin < numel);
      runtime->num_chunks = chunks_.size() - runtime->first_chunk;
      runtime->remaining = static_cast<int64_t>(runtime->num_chunks);
      runtimes_.push_back(std::move(runtime));
    }
    progress_ = MergeProgress();
    progress_.pass = pass_index_;
    progress_.passes = passes_;
    progress_.tensors_total = static_cast<int64_t>(num_tensors);
    const bool needs_prep = NeedsPrep(pass);
    absl::Status status = RunParallel(
        pool_.get(), workers_, chunks_.size(),
        [&](size_t worker, size_t c) -> absl::Status {
          if (options_.is_cancelled && options_.is_cancelled()) {
            return absl::CancelledError("merge cancelled");
          }
          const Chunk& chunk = chunks_[c];
          TensorRuntime& rt = *runtimes_[chunk.tensor];
          if (chunk.tensor < num_merged) {
            if (needs_prep) {
              RETURN_IF_ERROR(EnsurePrepared(pass, chunk.tensor, worker, rt));
            }
            RETURN_IF_ERROR(RunMergedChunk(pass, c, worker, rt));
          } else {
            RETURN_IF_ERROR(RunCopyChunk(chunk, worker));
          }
          if (rt.remaining.fetch_sub(1) == 1) {
            RETURN_IF_ERROR(FinishTensor(pass, chunk.tensor, worker, rt));
          }
          return absl::OkStatus();
        });
    runtimes_.clear();
    chunks_.clear();
    return status;
  }

  absl::Status EnsurePrepared(Pass pass, size_t i, size_t worker,
                              TensorRuntime& rt) {
    rt.mu.Lock();
    if (rt.prep == Prep::kNone) {
      rt.prep = Prep::kRunning;
      rt.mu.Unlock();
      absl::Status status = Prepare(pass, i, worker, rt);
      rt.mu.Lock();
      rt.prep = status.ok() ? Prep::kReady : Prep::kFailed;
      rt.prep_status = status;
      rt.mu.Unlock();
      return status;
    }
    rt.mu.Await(absl::Condition(
        +[](TensorRuntime* r) ABSL_NO_THREAD_SAFETY_ANALYSIS {
          return r->prep != Prep::kRunning;
        },
        &rt));
    absl::Status status = rt.prep_status;
    rt.mu.Unlock();
    return status;
  }

  // Prepare builds tensor i's state: LoRA dW, and in the merge pass the
  // per-tensor statistics (TIES tensor-scope thresholds, Breadcrumbs bands,
  // tensor-scope Model Stock ratio).
  absl::Status Prepare(Pass pass, size_t i, size_t worker, TensorRuntime& rt) {
    TensorState& s = plan_.merged[i];
    rt.deltas.assign(num_tasks(), torch::Tensor());
    for (size_t t = 0; t < num_tasks(); ++t) {
      if (!plan_.lora_targets[i][t]) continue;
      const OpenedInput& input = plan_.inputs[t];
      absl::StatusOr<torch::Tensor> delta = CallTorch(
          absl::StrCat("LoRA dW of \"", s.name, "\""),
          [&]() -> absl::StatusOr<torch::Tensor> {
            ASSIGN_OR_RETURN(
                torch::Tensor d,
                input.lora->DeltaWeight(s.name, plan_.merged_shapes[i]));
            return d.to(torch::kFloat).contiguous();
          });
      if (!delta.ok()) {
        return WithContext(delta.status(),
                           absl::StrCat("LoRA adapter ", Describe(input)));
      }
      if (delta->numel() != s.numel) {
        return absl::FailedPreconditionError(absl::StrCat(
            "LoRA adapter ", Describe(input), ": dW of \"", s.name, "\" has ",
            delta->numel(), " elements, the base tensor ", s.numel));
      }
      rt.deltas[t] = *std::move(delta);
      s.delta[t] = rt.deltas[t].template data_ptr<float>();
    }
    if (pass != Pass::kMerge) return absl::OkStatus();

    ChunkKernels<T>& kernels = *kernels_[worker];
    const size_t n = static_cast<size_t>(s.numel);
    const bool tensor_trim =
        plan_.params.ties && options_.ties.trim_scope == TrimScope::kTensor;
    const bool bands = options_.method == MergeMethod::kBreadcrumbs;
    if ((tensor_trim || bands) && n > 0) {
      const uint64_t trim_keep =
          KeepCount(options_.ties.top_k_percent / 100.0, n);
      // Breadcrumbs survivors are the entries ranked (by |tau|, descending)
      // in [top, top + keep): the `top` largest are dropped, and the
      // smallest so that `keep` survive.
      const uint64_t keep = KeepCount(options_.breadcrumbs.density, n);
      const uint64_t top = std::min<uint64_t>(
          n - keep,
          static_cast<uint64_t>(std::llround(options_.breadcrumbs.gamma * n)));
      auto select = [&](size_t t, ChunkKernels<T>& task_kernels) {
        if (tensor_trim && trim_keep == n) {
          s.trim_min[t] = 0;  // keep everything
          return;
        }
        std::vector<Key> keys(n);
        task_kernels.TaskKeys(s, t, 0, n, keys.data());
        if (tensor_trim) {
          s.trim_min[t] = KthLargestKey(keys.data(), n, trim_keep);
        } else {
          s.band_hi[t] =
              top == 0 ? ~uint64_t{0} : KthLargestKey(keys.data(), n, top + 1);
          s.band_lo[t] = KthLargestKey(keys.data(), n, top + keep);
        }
      };
      // Large tensors select per task in parallel: the other workers are
      // mostly waiting for this tensor anyway.
      const size_t threads =
          n >= kParallelSelectElements ? std::min(workers_, num_tasks()) : 1;
      if (threads <= 1) {
        for (size_t t = 0; t < num_tasks(); ++t) select(t, kernels);
      } else {
        ParallelFor(num_tasks(), threads, [&](size_t t) {
          ChunkKernels<T> task_kernels(plan_.params);
          select(t, task_kernels);
        });
      }
    }
    if (options_.method == MergeMethod::kModelStock &&
        options_.model_stock.cosine_scope == CosineScope::kTensor) {
      std::vector<double> gram(num_tasks() * num_tasks(), 0.0);
      kernels.Gram(s, 0, n, gram.data());
      s.model_stock_ratio = ModelStockRatio(gram);
    }
    return absl::OkStatus();
  }

  absl::Status RunMergedChunk(Pass pass, size_t c, size_t worker,
                              TensorRuntime& rt) {
    const Chunk& chunk = chunks_[c];
    const TensorState& s = plan_.merged[chunk.tensor];
    ChunkKernels<T>& kernels = *kernels_[worker];
    switch (pass) {
      case Pass::kHistogram:
        kernels.Histogram(s, chunk.begin, chunk.n, selects_,
                          histogram_ptrs_[worker]);
        return absl::OkStatus();
      case Pass::kGram: {
        const size_t stride = num_tasks() * num_tasks();
        double* gram;
        {
          absl::MutexLock lock(&rt.mu);
          if (rt.gram_partials.empty()) {
            rt.gram_partials.assign(rt.num_chunks * stride, 0.0);
          }
          gram = rt.gram_partials.data() + (c - rt.first_chunk) * stride;
        }
        kernels.Gram(s, chunk.begin, chunk.n, gram);
        return absl::OkStatus();
      }
      case Pass::kMerge: {
        TieCounts ties;
        std::vector<uint8_t>& buffer = out_buffers_[worker];
        const size_t out_size = DTypeSize(s.out_dtype);
        buffer.resize(chunk.n * out_size);
        kernels.Merge(s, chunk.begin, chunk.n, buffer.data(), &ties);
        if (plan_.params.ties) {
          rt.positive += ties.positive;
          rt.negative += ties.negative;
          if (ties.ambiguous) {
            absl::MutexLock lock(&rt.mu);
            rt.deferred.push_back(c);
            return absl::OkStatus();
          }
        }
        if (chunk.n == 0) return absl::OkStatus();
        return writer_->WriteTensorRange(
            s.name, static_cast<uint64_t>(chunk.begin) * out_size,
            absl::MakeConstSpan(buffer.data(), buffer.size()));
      }
    }
    return absl::OkStatus();
  }

  absl::Status RunCopyChunk(const Chunk& chunk, size_t worker) {
    const CopyJob& job = plan_.copies[chunk.tensor - plan_.merged.size()];
    if (chunk.n == 0) return absl::OkStatus();
    const size_t in_size = DTypeSize(job.in_dtype);
    const size_t out_size = DTypeSize(job.out_dtype);
    const uint8_t* src = job.bytes + static_cast<size_t>(chunk.begin) * in_size;
    const uint64_t offset = static_cast<uint64_t>(chunk.begin) * out_size;
    if (job.in_dtype == job.out_dtype) {
      return writer_->WriteTensorRange(
          job.out_name, offset, absl::MakeConstSpan(src, chunk.n * in_size));
    }
    std::vector<uint8_t>& buffer = out_buffers_[worker];
    buffer.resize(chunk.n * out_size);
    kernels_[worker]->Convert(job.in_dtype, src, chunk.n, job.out_dtype,
                              buffer.data());
    return writer_->WriteTensorRange(
        job.out_name, offset,
        absl::MakeConstSpan(buffer.data(), buffer.size()));
  }

  // FinishTensor runs on the worker that completed tensor i's last chunk.
  absl::Status FinishTensor(Pass pass, size_t i, size_t worker,
                            TensorRuntime& rt) {
    const size_t num_merged = plan_.merged.size();
    uint64_t bytes_written = 0;
    if (i >= num_merged) {
      const CopyJob& job = plan_.copies[i - num_merged];
      job.source->ReleasePages(job.source_name);
      bytes_written =
          static_cast<uint64_t>(job.numel) * DTypeSize(job.out_dtype);
    } else {
      TensorState& s = plan_.merged[i];
      if (pass == Pass::kGram) {
        // Sum chunk partials in chunk order: the same for any threading.
        absl::MutexLock lock(&rt.mu);
        std::vector<double>& total = tensor_grams_[i];
        const size_t stride = num_tasks() * num_tasks();
        for (size_t off = 0; off < rt.gram_partials.size(); off += stride) {
          for (size_t k = 0; k < stride; ++k) {
            total[k] += rt.gram_partials[off + k];
          }
        }
        rt.gram_partials = std::vector<double>();
      }
      if (pass == Pass::kMerge && plan_.params.ties) {
        // Zero signed sums take the tensor's majority elected sign (+1 on a
        // tie); ranges that held one are recomputed now that it is known.
        s.tie_sign = rt.negative.load() > rt.positive.load() ? -1 : 1;
        std::vector<size_t> deferred;
        {
          absl::MutexLock lock(&rt.mu);
          deferred.swap(rt.deferred);
        }
        std::sort(deferred.begin(), deferred.end());
        for (size_t c : deferred) {
          const Chunk& chunk = chunks_[c];
          TieCounts ignored;
          std::vector<uint8_t>& buffer = out_buffers_[worker];
          const size_t out_size = DTypeSize(s.out_dtype);
          buffer.resize(chunk.n * out_size);
          kernels_[worker]->Merge(s, chunk.begin, chunk.n, buffer.data(),
                                  &ignored);
          RETURN_IF_ERROR(writer_->WriteTensorRange(
              s.name, static_cast<uint64_t>(chunk.begin) * out_size,
              absl::MakeConstSpan(buffer.data(), buffer.size())));
        }
      }
      for (size_t t = 0; t < num_tasks(); ++t) s.delta[t] = nullptr;
      rt.deltas.clear();
      if (plan_.base != nullptr) plan_.base->ReleasePages(s.name);
      for (const OpenedInput& input : plan_.inputs) {
        if (input.checkpoint != nullptr) input.checkpoint->ReleasePages(s.name);
      }
      if (pass == Pass::kMerge) {
        bytes_written = static_cast<uint64_t>(s.numel) * DTypeSize(s.out_dtype);
      }
    }
    absl::MutexLock lock(&progress_mu_);
    ++progress_.tensors_done;
    progress_.bytes_written += bytes_written;
    if (options_.on_progress) options_.on_progress(progress_);
    return absl::OkStatus();
  }

  MergePlan& plan_;
  const MergeOptions& options_;
  size_t workers_ = 1;
  std::unique_ptr<ThreadPool> pool_;
  // One per worker.
  std::vector<std::unique_ptr<ChunkKernels<T>>> kernels_;
  std::vector<std::vector<uint8_t>> out_buffers_;
  CheckpointWriter* writer_ = nullptr;
  int passes_ = 1;
  int pass_index_ = 0;
  // Elements of the whole task vector, and how many global TIES keeps.
  uint64_t total_elements_ = 0;
  uint64_t global_keep_ = 0;
  // The current pass's work; fixed while it runs.
  std::vector<Chunk> chunks_;
  std::vector<std::unique_ptr<TensorRuntime>> runtimes_;
  // Global TIES trimming: one selector per task; histograms per worker
  // (num_tasks * kBins counters each).
  std::vector<RadixSelect<Key>> selects_;
  std::vector<std::vector<uint64_t>> histograms_;
  std::vector<std::vector<uint64_t*>> histogram_ptrs_;
  // Global Model Stock: the Gram matrix of each merged tensor.
  std::vector<std::vector<double>> tensor_grams_;
  double model_stock_ratio_ = 0.0;
  absl::Mutex progress_mu_;
  MergeProgress progress_ ABSL_GUARDED_BY(progress_mu_);
};

// ---------------------------------------------------------------------------
// Provenance

absl::string_view TrimScopeName(TrimScope scope) {
  return scope == TrimScope::kGlobal ? "global" : "tensor";
}
absl::string_view DisjointName(DisjointMode mode) {
  return mode == DisjointMode::kMean ? "mean" : "sum";
}
absl::string_view CombineName(DareCombine combine) {
  return combine == DareCombine::kTies ? "ties" : "task_arithmetic";
}
absl::string_view CosineScopeName(CosineScope scope) {
  return scope == CosineScope::kGlobal ? "global" : "tensor";
}

std::map<std::string, std::string> BuildMetadata(
    const std::string& base_path, const std::vector<MergeInput>& inputs,
    const MergePlan& plan, const MergeOptions& options,
    double model_stock_ratio) {
  using nlohmann::json;
  json effective = json::object();
  if (UsesLambda(options.method)) effective["lambda"] = ResolvedLambda(options);
  if (UsesTies(options)) {
    effective["ties"] = {
        {"top_k_percent", options.ties.top_k_percent},
        {"trim_scope", std::string(TrimScopeName(options.ties.trim_scope))},
        {"disjoint", std::string(DisjointName(options.ties.disjoint))},
    };
  }
  switch (options.method) {
    case MergeMethod::kDare:
      effective["dare"] = {
          {"drop_rate", options.dare.drop_rate},
          {"combine", std::string(CombineName(options.dare.combine))},
          {"seed", options.dare.seed},
      };
      break;
    case MergeMethod::kBreadcrumbs:
      effective["breadcrumbs"] = {{"gamma", options.breadcrumbs.gamma},
                                  {"density", options.breadcrumbs.density}};
      break;
    case MergeMethod::kConsensus:
      effective["consensus"] = {
          {"tall_lambda", options.consensus.tall_lambda},
          {"min_agreeing", options.consensus.min_agreeing},
          {"alpha", options.consensus.alpha},
      };
      break;
    case MergeMethod::kModelStock:
      effective["model_stock"] = {
          {"cosine_scope",
           std::string(CosineScopeName(options.model_stock.cosine_scope))}};
      break;
    default:
      break;
  }
  effective["head_prefix"] = options.head_prefix;
  effective["compute_dtype"] = options.compute_in_double ? "F64" : "F32";
  effective["output_dtype"] =
      options.output_dtype.has_value()
          ? json(std::string(DTypeName(*options.output_dtype)))
          : json(nullptr);

  json input_list = json::array();
  for (size_t i = 0; i < inputs.size(); ++i) {
    input_list.push_back({
        {"name", plan.inputs[i].name},
        {"path", inputs[i].path},
        {"weight", inputs[i].weight},
        {"kind", plan.inputs[i].lora != nullptr ? "lora" : "checkpoint"},
    });
  }
  std::map<std::string, std::string> metadata;
  metadata["mergeguard.method"] = std::string(MergeMethodName(options.method));
  metadata["mergeguard.options"] = effective.dump();
  metadata["mergeguard.inputs"] = input_list.dump();
  if (!base_path.empty()) metadata["mergeguard.base"] = base_path;
  metadata["mergeguard.version"] = std::string(MergeguardVersion());
  if (options.method == MergeMethod::kModelStock &&
      options.model_stock.cosine_scope == CosineScope::kGlobal) {
    metadata["mergeguard.model_stock_ratio"] = json(model_stock_ratio).dump();
  }
  for (const auto& [key, value] : options.metadata) metadata[key] = value;
  return metadata;
}

template <typename T>
absl::StatusOr<MergeReport> RunMerge(const std::string& base_path,
                                     const std::vector<MergeInput>& inputs,
                                     const std::string& output_path,
                                     const MergeOptions& options,
                                     MergePlan* plan) {
  MergeEngine<T> engine(plan, options);
  RETURN_IF_ERROR(engine.ComputeStatistics());
  ASSIGN_OR_RETURN(
      std::unique_ptr<CheckpointWriter> writer,
      CheckpointWriter::Create(output_path, plan->output_specs,
                               BuildMetadata(base_path, inputs, *plan, options,
                                             engine.model_stock_ratio()),
                               options.writer));
  // Without Commit the writer leaves nothing behind.
  RETURN_IF_ERROR(engine.WriteMerged(writer.get()));
  RETURN_IF_ERROR(writer->Commit());

  MergeReport report;
  report.output_path = writer->OutputPath();
  report.merged_tensors = static_cast<int64_t>(plan->merged.size());
  for (const CopyJob& job : plan->copies) {
    ++(job.head ? report.head_tensors : report.copied_tensors);
  }
  report.bytes_read = plan->bytes_read;
  for (const TensorSpec& spec : plan->output_specs) {
    report.bytes_written += spec.ByteSize();
  }
  report.passes = engine.passes();
  report.model_stock_ratio = engine.model_stock_ratio();
  return report;
}

}  // namespace

absl::StatusOr<MergeMethod> ParseMergeMethod(absl::string_view name) {
  std::string lower = absl::AsciiStrToLower(name);
  std::replace(lower.begin(), lower.end(), '-', '_');
  if (lower == "ta") return MergeMethod::kTaskArithmetic;
  if (lower == "tall") return MergeMethod::kConsensus;
  for (const MethodName& entry : kMethodNames) {
    if (entry.name == lower) return entry.method;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown merge method \"", name,
      "\" (expected task_arithmetic, ties, dare, breadcrumbs, consensus, "
      "model_stock or weighted_average)"));
}

absl::string_view MergeMethodName(MergeMethod method) {
  for (const MethodName& entry : kMethodNames) {
    if (entry.method == method) return entry.name;
  }
  return "unknown";
}

absl::StatusOr<MergeReport> Merge(const std::string& base_path,
                                  const std::vector<MergeInput>& inputs,
                                  const std::string& output_path,
                                  const MergeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(ValidateOptions(base_path, inputs, options));
  ASSIGN_OR_RETURN(MergePlan plan, BuildPlan(base_path, inputs, options));
  absl::StatusOr<MergeReport> report =
      options.compute_in_double
          ? RunMerge<double>(base_path, inputs, output_path, options, &plan)
          : RunMerge<float>(base_path, inputs, output_path, options, &plan);
  if (report.ok()) {
    report->seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
  }
  return report;
}

}  // namespace mergeguard
