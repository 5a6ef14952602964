#include "bench/merge_throughput.h"

#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"
#include "core/thread_pool.h"

namespace mergeguard {
namespace {

namespace fs = std::filesystem;

std::vector<TensorSpec> SyntheticLayout(const MergeThroughputOptions& options) {
  const int64_t total = static_cast<int64_t>(options.model_bytes / 4);
  std::vector<TensorSpec> specs;
  for (int64_t done = 0, i = 0; done < total; ++i) {
    int64_t n = std::min(options.tensor_elements, total - done);
    specs.push_back({absl::StrCat("layers.", i, ".weight"), DType::kF32, {n}});
    done += n;
  }
  return specs;
}

// WriteSyntheticModel fills a model with a cheap xorshift stream; values are
// small and centred like fine-tuning deltas, seeded per model.
absl::Status WriteSyntheticModel(const std::string& path,
                                 const std::vector<TensorSpec>& specs,
                                 uint64_t seed) {
  ASSIGN_OR_RETURN(auto writer, CheckpointWriter::Create(path, specs, {}));
  std::vector<float> buffer;
  uint64_t state = seed * 0x9E3779B97F4A7C15ull + 1;
  for (const TensorSpec& spec : specs) {
    buffer.resize(static_cast<size_t>(spec.NumElements()));
    for (float& v : buffer) {
      state ^= state << 13;
      state ^= state >> 7;
      state ^= state << 17;
      v = static_cast<float>(static_cast<int64_t>(state >> 40) - (1 << 23)) *
          1e-9f;
    }
    RETURN_IF_ERROR(writer->WriteTensor(
        spec.name,
        absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(buffer.data()),
                            buffer.size() * sizeof(float))));
  }
  return writer->Commit();
}

// CopyBaseline reads every input byte and writes an output of the base's
// size, tensor by tensor on `threads` threads, with no arithmetic.
absl::Status CopyBaseline(const std::string& base,
                          const std::vector<MergeInput>& inputs,
                          const std::string& out, int threads) {
  ASSIGN_OR_RETURN(auto base_ckpt, Checkpoint::Open(base));
  std::vector<std::unique_ptr<Checkpoint>> models;
  for (const MergeInput& input : inputs) {
    ASSIGN_OR_RETURN(auto model, Checkpoint::Open(input.path));
    models.push_back(std::move(model));
  }
  std::vector<TensorSpec> specs;
  for (const std::string& name : base_ckpt->Names()) {
    specs.push_back(*base_ckpt->Find(name));
  }
  ASSIGN_OR_RETURN(auto writer, CheckpointWriter::Create(out, specs, {}));
  const std::vector<std::string>& names = base_ckpt->Names();
  std::atomic<bool> failed{false};
  constexpr size_t kChunk = 1 << 18;  // bytes, as the merge's 64Ki floats
  ParallelFor(names.size(), static_cast<size_t>(threads), [&](size_t i) {
    std::vector<uint8_t> buffer(kChunk);
    absl::StatusOr<TensorRef> base_ref = base_ckpt->Get(names[i]);
    if (!base_ref.ok()) {
      failed = true;
      return;
    }
    const size_t size = base_ref->bytes.size();
    for (size_t off = 0; off < size; off += kChunk) {
      size_t n = std::min(kChunk, size - off);
      for (const auto& model : models) {
        absl::StatusOr<TensorRef> ref = model->Get(names[i]);
        if (!ref.ok()) {
          failed = true;
          return;
        }
        std::memcpy(buffer.data(), ref->bytes.data() + off, n);
        // Keep the compiler from eliding copies whose result is overwritten.
        asm volatile("" : : "r"(buffer.data()) : "memory");
      }
      std::memcpy(buffer.data(), base_ref->bytes.data() + off, n);
      if (!writer
               ->WriteTensorRange(names[i], off,
                                  absl::MakeConstSpan(buffer.data(), n))
               .ok()) {
        failed = true;
        return;
      }
    }
    base_ckpt->ReleasePages(names[i]);
    for (const auto& model : models) model->ReleasePages(names[i]);
  });
  if (failed) return absl::InternalError("copy baseline failed");
  return writer->Commit();
}

struct ChildRun {
  double seconds = 0;
  uint64_t peak_rss_bytes = 0;
};

// RunInChild runs `fn` in a forked process and returns its wall time and peak
// RSS. LibTorch's thread pools are never started in this process, so fork is
// safe.
absl::StatusOr<ChildRun> RunInChild(const std::function<absl::Status()>& fn) {
  int fds[2];
  if (::pipe(fds) != 0) return absl::InternalError("pipe failed");
  pid_t pid = ::fork();
  if (pid < 0) return absl::InternalError("fork failed");
  if (pid == 0) {
    ::close(fds[0]);
    auto start = std::chrono::steady_clock::now();
    absl::Status status = fn();
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    if (!status.ok()) {
      std::string message(status.message());
      ssize_t ignored = ::write(2, message.data(), message.size());
      (void)ignored;
      ::_exit(1);
    }
    ssize_t ignored = ::write(fds[1], &seconds, sizeof(seconds));
    (void)ignored;
    ::_exit(0);
  }
  ::close(fds[1]);
  double seconds = 0;
  ssize_t got = ::read(fds[0], &seconds, sizeof(seconds));
  ::close(fds[0]);
  int wstatus = 0;
  struct rusage usage {};
  ::wait4(pid, &wstatus, 0, &usage);
  if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0 ||
      got != sizeof(seconds)) {
    return absl::InternalError("benchmark child failed (see stderr)");
  }
  return ChildRun{seconds, static_cast<uint64_t>(usage.ru_maxrss) * 1024};
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

}  // namespace

absl::StatusOr<MergeThroughputResult> RunMergeThroughputBenchmark(
    const MergeThroughputOptions& options) {
  if (options.num_models < 1 || options.repetitions < 1 ||
      options.model_bytes < 4 || options.tensor_elements < 1) {
    return absl::InvalidArgumentError(
        "merge benchmark needs >= 1 model, >= 1 repetition, a positive size");
  }
  std::error_code ec;
  fs::create_directories(options.work_dir, ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("create ", options.work_dir, ": ", ec.message()));
  }
  const std::vector<TensorSpec> specs = SyntheticLayout(options);
  const std::string tag =
      absl::StrCat(options.model_bytes, "_", options.tensor_elements);
  const std::string base =
      absl::StrCat(options.work_dir, "/base_", tag, ".safetensors");
  std::vector<MergeInput> inputs;
  for (int i = 0; i <= options.num_models; ++i) {
    std::string path = i == 0 ? base
                              : absl::StrCat(options.work_dir, "/model", i, "_",
                                             tag, ".safetensors");
    if (!fs::exists(path)) {
      RETURN_IF_ERROR(WriteSyntheticModel(path, specs, i + 1));
    }
    if (i > 0) inputs.push_back({absl::StrCat("task", i), path, 1.0});
  }
  MergeOptions merge_options;
  merge_options.method = options.method;
  merge_options.threads = options.threads;
  merge_options.head_prefix = "";
  const std::string out = absl::StrCat(options.work_dir, "/out.safetensors");

  MergeThroughputResult result;
  result.model_bytes = options.model_bytes;
  std::vector<double> merge_times, copy_times;
  for (int rep = 0; rep < options.repetitions; ++rep) {
    ASSIGN_OR_RETURN(ChildRun copy, RunInChild([&] {
                       return CopyBaseline(base, inputs, out, options.threads);
                     }));
    fs::remove(out, ec);
    ASSIGN_OR_RETURN(ChildRun merge, RunInChild([&]() -> absl::Status {
                       return Merge(base, inputs, out, merge_options).status();
                     }));
    fs::remove(out, ec);
    copy_times.push_back(copy.seconds);
    merge_times.push_back(merge.seconds);
    result.copy_peak_rss_bytes =
        std::max(result.copy_peak_rss_bytes, copy.peak_rss_bytes);
    result.merge_peak_rss_bytes =
        std::max(result.merge_peak_rss_bytes, merge.peak_rss_bytes);
  }
  result.bytes_read = options.model_bytes * (options.num_models + 1);
  result.bytes_written = options.model_bytes;
  result.merge_seconds = Median(merge_times);
  result.copy_seconds = Median(copy_times);
  const double moved =
      static_cast<double>(result.bytes_read + result.bytes_written);
  result.merge_bytes_per_second = moved / result.merge_seconds;
  result.copy_bytes_per_second = moved / result.copy_seconds;
  result.throughput_ratio =
      result.merge_bytes_per_second / result.copy_bytes_per_second;
  result.rss_to_model_ratio = static_cast<double>(result.merge_peak_rss_bytes) /
                              static_cast<double>(options.model_bytes);
  if (!options.keep_files) {
    for (const MergeInput& input : inputs) fs::remove(input.path, ec);
    fs::remove(base, ec);
  }
  return result;
}

}  // namespace mergeguard
