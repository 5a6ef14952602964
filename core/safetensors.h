#ifndef MERGEGUARD_CORE_SAFETENSORS_H_
#define MERGEGUARD_CORE_SAFETENSORS_H_

// safetensors reading (memory-mapped, strictly validated) and writing
// (streaming, atomic). This header is LibTorch-free so that the parser and
// its fuzz target build quickly; torch views live in tensor_views.h.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "core/dtype.h"

namespace mergeguard {

// Largest JSON header accepted, as in the reference implementation.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull * 1000 * 1000;

// TensorSpec describes one tensor: its name, storage type and shape.
struct TensorSpec {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;

  // NumElements returns the product of `shape` (1 for a scalar).
  int64_t NumElements() const;
  // ByteSize returns NumElements() * DTypeSize(dtype).
  uint64_t ByteSize() const;
};

// TensorEntry is a TensorSpec plus where its bytes lie, relative to the start
// of the data section (just after the header).
struct TensorEntry : TensorSpec {
  uint64_t data_begin = 0;
  uint64_t data_end = 0;
};

// SafetensorsLayout is a validated header.
struct SafetensorsLayout {
  // Entries sorted by name.
  std::vector<TensorEntry> tensors;
  // The `__metadata__` map (string to string), empty when absent.
  std::map<std::string, std::string> metadata;
  // Byte offset of the data section in the file: 8 + header length.
  uint64_t data_offset = 0;

  // Find returns the entry called `name`, or nullptr.
  const TensorEntry* Find(absl::string_view name) const;
};

// ParseSafetensors validates a whole safetensors file held in memory and
// returns its layout. Every failure is INVALID_ARGUMENT (DATA_LOSS for a
// truncated file) and names the offending tensor. Checks: header length and
// JSON validity, each entry's dtype/shape/data_offsets, offsets in bounds,
// no overlaps and no holes, byte size == numel * dtype size, no duplicate
// names, and `__metadata__` mapping strings to strings.
absl::StatusOr<SafetensorsLayout> ParseSafetensors(
    absl::string_view file_bytes);

// SafetensorsFile is a read-only memory-mapped, validated safetensors file.
// Thread-safe: all methods are const and the mapping is immutable.
class SafetensorsFile {
 public:
  // Open maps and validates `path`. Pickle checkpoints are refused with
  // INVALID_ARGUMENT; a missing file is NOT_FOUND.
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(
      const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsLayout& layout() const { return layout_; }
  uint64_t file_size() const { return size_; }

  // TensorBytes returns the raw little-endian bytes of tensor `name`, or
  // NOT_FOUND. The span lives as long as this object.
  absl::StatusOr<absl::Span<const uint8_t>> TensorBytes(
      absl::string_view name) const;
  // Bytes returns the bytes of an entry of this file's layout.
  absl::Span<const uint8_t> Bytes(const TensorEntry& entry) const;
  // ReleasePages tells the kernel this process is done with `entry`'s pages
  // (madvise MADV_DONTNEED). They stay in the page cache, but leave this
  // process's resident set, so streaming over large files keeps RSS small.
  void ReleasePages(const TensorEntry& entry) const;

 private:
  SafetensorsFile() = default;

  std::string path_;
  const uint8_t* data_ = nullptr;  // the whole mapped file
  uint64_t size_ = 0;
  SafetensorsLayout layout_;
};

// SafetensorsWriter writes one safetensors file whose layout is fixed up
// front, so tensors can be written in any order, in pieces, from several
// threads. Nothing appears under `path` until Commit() succeeds: bytes go to a
// temporary file in the same directory that is fsynced and renamed.
class SafetensorsWriter {
 public:
  // Create lays out `tensors` (in the given order, header padded to 8 bytes)
  // and opens the temporary file. RESOURCE_EXHAUSTED when the disk is full.
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, std::vector<TensorSpec> tensors,
      const std::map<std::string, std::string>& metadata = {});

  // The destructor discards the temporary file unless Commit() succeeded.
  ~SafetensorsWriter();

  // WriteTensor writes all bytes of tensor `name`.
  absl::Status WriteTensor(absl::string_view name,
                           absl::Span<const uint8_t> bytes);
  // WriteTensorRange writes `bytes` at `offset` within tensor `name`'s data.
  // Thread-safe; ranges of one tensor must not overlap.
  absl::Status WriteTensorRange(absl::string_view name, uint64_t offset,
                                absl::Span<const uint8_t> bytes);

  // Commit checks that every tensor byte was written, fsyncs, renames the
  // temporary file to `path` and fsyncs the directory.
  absl::Status Commit();

  const SafetensorsLayout& layout() const { return layout_; }
  // TotalBytes returns the size of the finished file.
  uint64_t TotalBytes() const;

 private:
  SafetensorsWriter() = default;

  std::string path_;
  std::string temp_path_;
  // fd_ and committed_ change only in Commit(), under mu_.
  int fd_ = -1;
  bool committed_ = false;
  SafetensorsLayout layout_;
  absl::Mutex mu_;
  // Byte ranges [begin, end) written per tensor index (of layout_.tensors);
  // guards against silent holes and overlapping writes.
  std::vector<std::map<uint64_t, uint64_t>> written_ ABSL_GUARDED_BY(mu_);
};

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_SAFETENSORS_H_
