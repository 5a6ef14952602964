#ifndef MERGEGUARD_CORE_CHECKPOINT_H_
#define MERGEGUARD_CORE_CHECKPOINT_H_

// Checkpoint: one logical set of named tensors stored as a single
// safetensors file or as shards listed by `model.safetensors.index.json`.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/safetensors.h"

namespace mergeguard {

inline constexpr char kShardIndexFileName[] = "model.safetensors.index.json";
inline constexpr char kSingleFileName[] = "model.safetensors";

// CheckPickleRefusal returns INVALID_ARGUMENT with an explanation when `path`
// names a pickle checkpoint (.bin, .pt, .pth, .ckpt, .pkl, or a file whose
// leading bytes are a pickle or torch zip archive); OK otherwise.
absl::Status CheckNotPickle(const std::string& path);

// TensorRef is a tensor's entry plus its bytes in a mapped file.
struct TensorRef {
  const TensorEntry* entry = nullptr;
  absl::Span<const uint8_t> bytes;
};

// Checkpoint is a read-only view of a model checkpoint. Thread-safe.
class Checkpoint {
 public:
  // Open accepts a `.safetensors` file, a directory holding
  // `model.safetensors` or `model.safetensors.index.json`, or the index file
  // itself. Pickle formats are refused (see CheckNotPickle). Every shard is
  // validated; a tensor listed in the index must live in its named shard.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(
      const std::string& path);

  // Names returns all tensor names, sorted.
  const std::vector<std::string>& Names() const { return names_; }
  // Find returns the entry for `name`, or nullptr.
  const TensorEntry* Find(absl::string_view name) const;
  // Get returns the tensor `name`, or NOT_FOUND naming it.
  absl::StatusOr<TensorRef> Get(absl::string_view name) const;
  // ReleasePages drops tensor `name`'s mapped pages from this process's
  // resident set (see SafetensorsFile::ReleasePages). Views stay valid.
  void ReleasePages(absl::string_view name) const;
  // Metadata returns the `__metadata__` of the first shard.
  const std::map<std::string, std::string>& Metadata() const;
  // TotalBytes returns the sum of tensor byte sizes.
  uint64_t TotalBytes() const { return total_bytes_; }
  const std::string& path() const { return path_; }

 private:
  Checkpoint() = default;

  std::string path_;
  std::vector<std::shared_ptr<const SafetensorsFile>> shards_;
  // name -> (shard index, entry in that shard)
  std::map<std::string, std::pair<size_t, const TensorEntry*>, std::less<>>
      index_;
  std::vector<std::string> names_;
  uint64_t total_bytes_ = 0;
};

// CheckpointWriterOptions controls how a checkpoint is laid out on disk.
struct CheckpointWriterOptions {
  // Largest shard in bytes; 0 writes one file. When sharding, files are
  // named model-00001-of-0000N.safetensors beside the index file.
  uint64_t max_shard_bytes = 0;
};

// CheckpointWriter writes a checkpoint whose tensors are known up front,
// streaming and atomically (no partial output under the final names). The
// index, if any, is written last, so a reader never sees a half set.
class CheckpointWriter {
 public:
  // Create plans the layout. `path` is a `.safetensors` file when unsharded,
  // or a directory when `options.max_shard_bytes` > 0.
  static absl::StatusOr<std::unique_ptr<CheckpointWriter>> Create(
      const std::string& path, std::vector<TensorSpec> tensors,
      const std::map<std::string, std::string>& metadata,
      const CheckpointWriterOptions& options = {});
  ~CheckpointWriter();

  // WriteTensorRange writes bytes at `offset` within tensor `name`.
  // Thread-safe for non-overlapping ranges.
  absl::Status WriteTensorRange(absl::string_view name, uint64_t offset,
                                absl::Span<const uint8_t> bytes);
  absl::Status WriteTensor(absl::string_view name,
                           absl::Span<const uint8_t> bytes) {
    return WriteTensorRange(name, 0, bytes);
  }
  // Commit finishes every shard, then the index.
  absl::Status Commit();

  // OutputPath returns the path a reader should Open().
  const std::string& OutputPath() const { return path_; }

 private:
  CheckpointWriter() = default;

  std::string path_;
  bool sharded_ = false;
  std::vector<std::unique_ptr<SafetensorsWriter>> shards_;
  std::vector<std::string> shard_names_;
  std::map<std::string, size_t, std::less<>> shard_of_;
  uint64_t total_bytes_ = 0;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_CHECKPOINT_H_
