#ifndef MERGEGUARD_BENCH_MERGE_THROUGHPUT_H_
#define MERGEGUARD_BENCH_MERGE_THROUGHPUT_H_

// `mergeguard-bench merge`: data-free merge throughput against a plain copy
// of the same bytes, measured in the same run, plus peak RSS.

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "core/merge.h"

namespace mergeguard {

struct MergeThroughputOptions {
  // Scratch directory for the synthetic models; needs about
  // (num_models + 2) * model_bytes of free disk.
  std::string work_dir = "/tmp/mergeguard-bench-merge";
  // Task models merged onto one base.
  int num_models = 4;
  // Size of each model (and of the base and the output), in bytes of F32.
  uint64_t model_bytes = 256ull << 20;
  // Elements per tensor; models are split into tensors of this size.
  int64_t tensor_elements = 4ll << 20;
  MergeMethod method = MergeMethod::kTaskArithmetic;
  // Merge worker threads (0 = all cores); the copy uses as many.
  int threads = 0;
  // Timed repetitions of each side; the median is reported.
  int repetitions = 3;
  // Keep the synthetic models for the next run (they are reused if present).
  bool keep_files = true;
};

struct MergeThroughputResult {
  uint64_t model_bytes = 0;
  uint64_t bytes_read = 0;     // per run: base + models
  uint64_t bytes_written = 0;  // per run: the output
  double merge_seconds = 0;    // median
  double copy_seconds = 0;     // median
  double merge_bytes_per_second = 0;
  double copy_bytes_per_second = 0;
  // merge throughput / copy throughput; the target is >= 0.7.
  double throughput_ratio = 0;
  // Highest resident set of a merge run (its own process), in bytes.
  uint64_t merge_peak_rss_bytes = 0;
  uint64_t copy_peak_rss_bytes = 0;
  // merge_peak_rss_bytes / model_bytes; the target is < 2.
  double rss_to_model_ratio = 0;
};

// RunMergeThroughputBenchmark writes (or reuses) base + N synthetic F32
// models, then alternates timed runs of the merge and of the copy baseline,
// each in a child process so that its peak RSS is its own. The copy reads
// every input byte through the same mapped checkpoints and writes an output
// file of the same size through the same atomic writer, with no arithmetic.
absl::StatusOr<MergeThroughputResult> RunMergeThroughputBenchmark(
    const MergeThroughputOptions& options);

}  // namespace mergeguard

#endif  // MERGEGUARD_BENCH_MERGE_THROUGHPUT_H_
