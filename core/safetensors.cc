#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/checkpoint.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "core/strict_json.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

using nlohmann::json;

// The format is little-endian and the mapping is handed out as-is.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors I/O assumes a little-endian host");

constexpr char kMetadataKey[] = "__metadata__";

std::string Quoted(absl::string_view name) {
  return absl::StrCat("tensor \"", name, "\"");
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

uint64_t ReadLittleEndian64(const char* p) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) {
    value = (value << 8) | static_cast<uint8_t>(p[i]);
  }
  return value;
}

// CheckedByteSize returns numel(shape) * element_size, or an error naming
// `name` when a dimension is negative or the product overflows int64.
absl::StatusOr<uint64_t> CheckedByteSize(absl::string_view name,
                                         const std::vector<int64_t>& shape,
                                         size_t element_size) {
  constexpr uint64_t kMax = std::numeric_limits<int64_t>::max();
  uint64_t numel = 1;
  for (int64_t dim : shape) {
    if (dim < 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          Quoted(name), ": shape ", ShapeString(shape), " has a negative dim"));
    }
    uint64_t d = static_cast<uint64_t>(dim);
    if (d != 0 && numel > kMax / d) {
      return absl::InvalidArgumentError(
          absl::StrCat(Quoted(name), ": shape ", ShapeString(shape),
                       " has more elements than fit in 64 bits"));
    }
    numel *= d;
  }
  if (numel > kMax / element_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(name), ": shape ", ShapeString(shape),
                     " has more bytes than fit in 64 bits"));
  }
  return numel * element_size;
}

// ParseEntry validates one tensor entry of the header.
absl::StatusOr<TensorEntry> ParseEntry(const std::string& name,
                                       const json& value, uint64_t data_size) {
  if (name.empty()) {
    return absl::InvalidArgumentError("tensor names must not be empty");
  }
  if (!value.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Quoted(name), ": entry must be an object, got ", JsonTypeName(value)));
  }
  for (const auto& [key, unused] : value.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      return absl::InvalidArgumentError(
          absl::StrCat(Quoted(name), ": unknown field \"", key,
                       "\" (expected dtype, shape, data_offsets)"));
    }
  }
  TensorEntry entry;
  entry.name = name;

  auto dtype = value.find("dtype");
  if (dtype == value.end() || !dtype->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(name), ": \"dtype\" must be a string"));
  }
  absl::StatusOr<DType> parsed_dtype =
      ParseDType(dtype->get_ref<const std::string&>());
  if (!parsed_dtype.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(name), ": ", parsed_dtype.status().message()));
  }
  entry.dtype = *parsed_dtype;

  auto shape = value.find("shape");
  if (shape == value.end() || !shape->is_array()) {
    return absl::InvalidArgumentError(absl::StrCat(
        Quoted(name), ": \"shape\" must be an array of non-negative integers"));
  }
  for (const json& dim : *shape) {
    if (!dim.is_number_unsigned() ||
        dim.get<uint64_t>() >
            static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return absl::InvalidArgumentError(absl::StrCat(
          Quoted(name), ": \"shape\" must hold non-negative integers, got ",
          dim.is_number_unsigned() ? "a dim above 2^63-1" : JsonTypeName(dim)));
    }
    entry.shape.push_back(static_cast<int64_t>(dim.get<uint64_t>()));
  }
  ASSIGN_OR_RETURN(uint64_t byte_size,
                   CheckedByteSize(name, entry.shape, DTypeSize(entry.dtype)));

  auto offsets = value.find("data_offsets");
  if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() ||
      !(*offsets)[1].is_number_unsigned()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(name),
                     ": \"data_offsets\" must be [begin, end] with "
                     "non-negative integers"));
  }
  entry.data_begin = (*offsets)[0].get<uint64_t>();
  entry.data_end = (*offsets)[1].get<uint64_t>();
  std::string range = absl::StrCat("data_offsets [", entry.data_begin, ", ",
                                   entry.data_end, "]");
  if (entry.data_begin > entry.data_end) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(name), ": ", range, " end before they begin"));
  }
  if (entry.data_end > data_size) {
    return absl::DataLossError(absl::StrCat(
        Quoted(name), ": ", range, " run past the end of the data section (",
        data_size, " bytes); is the file truncated?"));
  }
  if (entry.data_end - entry.data_begin != byte_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        Quoted(name), ": ", range, " hold ", entry.data_end - entry.data_begin,
        " bytes but ", DTypeName(entry.dtype), " ", ShapeString(entry.shape),
        " needs ", byte_size));
  }
  return entry;
}

absl::StatusOr<std::map<std::string, std::string>> ParseMetadata(
    const json& value) {
  if (!value.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "\"", kMetadataKey, "\" must be an object of strings, got ",
        JsonTypeName(value)));
  }
  std::map<std::string, std::string> metadata;
  for (const auto& [key, item] : value.items()) {
    if (!item.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat("\"", kMetadataKey, "\": value of \"", key,
                       "\" must be a string, got ", JsonTypeName(item)));
    }
    metadata.emplace(key, item.get<std::string>());
  }
  return metadata;
}

// CheckTiling verifies that the entries cover [0, data_size) exactly once.
absl::Status CheckTiling(const std::vector<TensorEntry>& tensors,
                         uint64_t data_size) {
  std::vector<const TensorEntry*> by_offset;
  by_offset.reserve(tensors.size());
  for (const TensorEntry& entry : tensors) by_offset.push_back(&entry);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorEntry* a, const TensorEntry* b) {
              return std::tie(a->data_begin, a->data_end, a->name) <
                     std::tie(b->data_begin, b->data_end, b->name);
            });
  uint64_t expected = 0;
  const TensorEntry* previous = nullptr;
  for (const TensorEntry* entry : by_offset) {
    std::string range = absl::StrCat("data_offsets [", entry->data_begin, ", ",
                                     entry->data_end, "]");
    if (entry->data_begin < expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          Quoted(entry->name), ": ", range, " overlap ", Quoted(previous->name),
          " (which ends at ", expected, ")"));
    }
    if (entry->data_begin > expected) {
      return absl::InvalidArgumentError(absl::StrCat(
          Quoted(entry->name), ": ", range, " leave a hole of ",
          entry->data_begin - expected, " unused bytes before it",
          previous == nullptr
              ? ""
              : absl::StrCat(" (after ", Quoted(previous->name), ")")));
    }
    expected = entry->data_end;
    previous = entry;
  }
  if (expected != data_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "data section has ", data_size - expected,
        " trailing bytes not covered by any tensor",
        previous == nullptr
            ? ""
            : absl::StrCat(" (after ", Quoted(previous->name), ")")));
  }
  return absl::OkStatus();
}

std::string HeaderJson(const std::vector<TensorEntry>& entries,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  for (const TensorEntry& entry : entries) {
    header[entry.name] = {
        {"dtype", std::string(DTypeName(entry.dtype))},
        {"shape", entry.shape},
        {"data_offsets", {entry.data_begin, entry.data_end}},
    };
  }
  // Strict UTF-8 handling throws on invalid bytes; callers catch it.
  return header.dump();
}

absl::Status PwriteAll(int fd, const uint8_t* data, size_t size,
                       uint64_t offset, const std::string& path) {
  while (size > 0) {
    ssize_t n = ::pwrite(fd, data, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoToStatus(errno, absl::StrCat("write ", path));
    }
    data += n;
    size -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

int64_t TensorSpec::NumElements() const {
  int64_t numel = 1;
  for (int64_t dim : shape) numel *= dim;
  return numel;
}

uint64_t TensorSpec::ByteSize() const {
  return static_cast<uint64_t>(NumElements()) * DTypeSize(dtype);
}

const TensorEntry* SafetensorsLayout::Find(absl::string_view name) const {
  auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                             [](const TensorEntry& entry, absl::string_view n) {
                               return entry.name < n;
                             });
  if (it == tensors.end() || it->name != name) return nullptr;
  return &*it;
}

absl::StatusOr<SafetensorsLayout> ParseSafetensors(
    absl::string_view file_bytes) {
  if (file_bytes.size() < 8) {
    return absl::DataLossError(
        absl::StrCat("file is ", file_bytes.size(),
                     " bytes, shorter than the 8-byte header length; is it "
                     "truncated?"));
  }
  const uint64_t header_size = ReadLittleEndian64(file_bytes.data());
  if (header_size > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("header length ", header_size, " exceeds the limit of ",
                     kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (header_size > file_bytes.size() - 8) {
    return absl::DataLossError(absl::StrCat(
        "header length ", header_size, " runs past the end of the ",
        file_bytes.size(), "-byte file; is it truncated?"));
  }
  absl::string_view header = file_bytes.substr(8, header_size);
  // The spec allows trailing spaces only, and the header must start with '{'.
  size_t last = header.find_last_not_of(' ');
  if (header.empty() || header.front() != '{' || last == header.npos ||
      header[last] != '}') {
    return absl::InvalidArgumentError(
        "header must be a JSON object, optionally padded with trailing spaces");
  }
  header = header.substr(0, last + 1);
  ASSIGN_OR_RETURN(json root, ParseStrictJson(header, "header", "tensor"));
  if (!root.is_object()) {
    return absl::InvalidArgumentError("header must be a JSON object");
  }

  SafetensorsLayout layout;
  layout.data_offset = 8 + header_size;
  const uint64_t data_size = file_bytes.size() - layout.data_offset;
  layout.tensors.reserve(root.size());
  for (const auto& [name, value] : root.items()) {
    if (name == kMetadataKey) {
      ASSIGN_OR_RETURN(layout.metadata, ParseMetadata(value));
      continue;
    }
    ASSIGN_OR_RETURN(TensorEntry entry, ParseEntry(name, value, data_size));
    layout.tensors.push_back(std::move(entry));
  }
  // nlohmann orders object keys already; sorting keeps Find() independent of
  // that detail.
  std::sort(layout.tensors.begin(), layout.tensors.end(),
            [](const TensorEntry& a, const TensorEntry& b) {
              return a.name < b.name;
            });
  RETURN_IF_ERROR(CheckTiling(layout.tensors, data_size));
  return layout;
}

// ---------------------------------------------------------------------------
// SafetensorsFile

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path) {
  RETURN_IF_ERROR(CheckNotPickle(path));
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoToStatus(errno, absl::StrCat("open ", path));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int saved = errno;
    ::close(fd);
    return ErrnoToStatus(saved, absl::StrCat("stat ", path));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(
        path, ": file is ", size, " bytes, too short for safetensors"));
  }
  void* mapped = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int saved = errno;
  ::close(fd);  // the mapping keeps the file open
  if (mapped == MAP_FAILED) {
    return ErrnoToStatus(saved, absl::StrCat("mmap ", path));
  }
  // Not make_shared: the constructor is private.
  std::shared_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->data_ = static_cast<const uint8_t*>(mapped);
  file->size_ = size;
  absl::StatusOr<SafetensorsLayout> layout = ParseSafetensors(absl::string_view(
      reinterpret_cast<const char*>(file->data_), file->size_));
  if (!layout.ok()) {
    return absl::Status(layout.status().code(),
                        absl::StrCat(path, ": ", layout.status().message()));
  }
  file->layout_ = *std::move(layout);
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

SafetensorsFile::~SafetensorsFile() {
  if (data_ != nullptr) {
    ::munmap(const_cast<uint8_t*>(data_), size_);
  }
}

absl::StatusOr<absl::Span<const uint8_t>> SafetensorsFile::TensorBytes(
    absl::string_view name) const {
  const TensorEntry* entry = layout_.Find(name);
  if (entry == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(Quoted(name), " not found in ", path_));
  }
  return Bytes(*entry);
}

absl::Span<const uint8_t> SafetensorsFile::Bytes(
    const TensorEntry& entry) const {
  return absl::Span<const uint8_t>(
      data_ + layout_.data_offset + entry.data_begin,
      entry.data_end - entry.data_begin);
}

void SafetensorsFile::ReleasePages(const TensorEntry& entry) const {
  if (entry.data_end == entry.data_begin) return;
  const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  const uintptr_t base = reinterpret_cast<uintptr_t>(data_);
  // Whole pages only; a neighbour's pages caught at the edges simply fault
  // back in from the page cache when read. The mapping is read-only, so
  // nothing is lost.
  uintptr_t begin = base + layout_.data_offset + entry.data_begin;
  uintptr_t end = base + layout_.data_offset + entry.data_end;
  begin &= ~(page - 1);
  end = (end + page - 1) & ~(page - 1);
  ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

// ---------------------------------------------------------------------------
// SafetensorsWriter

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, std::vector<TensorSpec> tensors,
    const std::map<std::string, std::string>& metadata) {
  // Lay the data out in the caller's order.
  std::vector<TensorEntry> entries;
  entries.reserve(tensors.size());
  std::set<std::string> seen;
  uint64_t data_size = 0;
  for (TensorSpec& spec : tensors) {
    if (spec.name.empty()) {
      return absl::InvalidArgumentError("tensor names must not be empty");
    }
    if (spec.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrCat(Quoted(spec.name), ": name is reserved"));
    }
    if (!seen.insert(spec.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("duplicate ", Quoted(spec.name)));
    }
    ASSIGN_OR_RETURN(
        uint64_t byte_size,
        CheckedByteSize(spec.name, spec.shape, DTypeSize(spec.dtype)));
    if (byte_size > std::numeric_limits<int64_t>::max() - data_size) {
      return absl::InvalidArgumentError(
          absl::StrCat(Quoted(spec.name), ": total size overflows 64 bits"));
    }
    TensorEntry entry;
    static_cast<TensorSpec&>(entry) = std::move(spec);
    entry.data_begin = data_size;
    entry.data_end = data_size + byte_size;
    data_size = entry.data_end;
    entries.push_back(std::move(entry));
  }

  std::string header;
  try {
    header = HeaderJson(entries, metadata);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "tensor names and metadata must be valid UTF-8: ", e.what()));
  }
  // Padding to 8 keeps every tensor's data 8-byte aligned in the file.
  header.append((8 - header.size() % 8) % 8, ' ');

  std::unique_ptr<SafetensorsWriter> writer(new SafetensorsWriter());
  writer->path_ = path;
  writer->layout_.metadata = metadata;
  writer->layout_.data_offset = 8 + header.size();
  writer->layout_.tensors = std::move(entries);
  std::sort(writer->layout_.tensors.begin(), writer->layout_.tensors.end(),
            [](const TensorEntry& a, const TensorEntry& b) {
              return a.name < b.name;
            });
  {
    absl::MutexLock lock(&writer->mu_);
    writer->written_.resize(writer->layout_.tensors.size());
  }

  std::string temp = absl::StrCat(path, ".tmp-XXXXXX");
  int fd = ::mkostemp(temp.data(), O_CLOEXEC);
  if (fd < 0) return ErrnoToStatus(errno, absl::StrCat("create ", temp));
  // From here the destructor removes the temporary file on any error.
  writer->fd_ = fd;
  writer->temp_path_ = temp;
  if (::fchmod(fd, 0644) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("chmod ", temp));
  }
  const uint64_t total = writer->TotalBytes();
  // Reserve the space now so that a full disk fails here, not mid-merge.
  int rc = ::posix_fallocate(fd, 0, static_cast<off_t>(total));
  if (rc == EINVAL || rc == EOPNOTSUPP) {
    if (::ftruncate(fd, static_cast<off_t>(total)) != 0)
      rc = errno;
    else
      rc = 0;
  }
  if (rc != 0) {
    return ErrnoToStatus(rc,
                         absl::StrCat("reserve ", total, " bytes for ", path));
  }
  uint8_t length[8];
  for (int i = 0; i < 8; ++i) {
    length[i] = static_cast<uint8_t>(header.size() >> (8 * i));
  }
  RETURN_IF_ERROR(PwriteAll(fd, length, 8, 0, temp));
  RETURN_IF_ERROR(PwriteAll(fd, reinterpret_cast<const uint8_t*>(header.data()),
                            header.size(), 8, temp));
  return writer;
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_ && !temp_path_.empty()) ::unlink(temp_path_.c_str());
}

uint64_t SafetensorsWriter::TotalBytes() const {
  uint64_t data_size = 0;
  for (const TensorEntry& entry : layout_.tensors) {
    data_size = std::max(data_size, entry.data_end);
  }
  return layout_.data_offset + data_size;
}

absl::Status SafetensorsWriter::WriteTensor(absl::string_view name,
                                            absl::Span<const uint8_t> bytes) {
  const TensorEntry* entry = layout_.Find(name);
  if (entry != nullptr && bytes.size() != entry->ByteSize()) {
    return absl::InvalidArgumentError(
        absl::StrCat(Quoted(name), ": got ", bytes.size(), " bytes, expected ",
                     entry->ByteSize()));
  }
  return WriteTensorRange(name, 0, bytes);
}

absl::Status SafetensorsWriter::WriteTensorRange(
    absl::string_view name, uint64_t offset, absl::Span<const uint8_t> bytes) {
  const TensorEntry* entry = layout_.Find(name);
  if (entry == nullptr) {
    return absl::NotFoundError(
        absl::StrCat(Quoted(name), " is not in the layout of ", path_));
  }
  const uint64_t size = entry->data_end - entry->data_begin;
  if (offset > size || bytes.size() > size - offset) {
    return absl::OutOfRangeError(absl::StrCat(
        Quoted(name), ": write of ", bytes.size(), " bytes at offset ", offset,
        " exceeds its ", size, " bytes"));
  }
  const size_t index = static_cast<size_t>(entry - layout_.tensors.data());
  const uint64_t begin = offset;
  const uint64_t end = offset + bytes.size();
  if (begin == end) return absl::OkStatus();
  {
    // Claim the range first so that overlapping writes are refused rather
    // than counted twice (which would hide a hole from Commit).
    absl::MutexLock lock(&mu_);
    if (fd_ < 0 || committed_) {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, ": write after Commit"));
    }
    std::map<uint64_t, uint64_t>& ranges = written_[index];
    auto next = ranges.lower_bound(begin);
    if ((next != ranges.end() && next->first < end) ||
        (next != ranges.begin() && std::prev(next)->second > begin)) {
      return absl::InvalidArgumentError(
          absl::StrCat(Quoted(name), ": bytes [", begin, ", ", end,
                       ") overlap a range already written"));
    }
    ranges.emplace(begin, end);
  }
  absl::Status status =
      PwriteAll(fd_, bytes.data(), bytes.size(),
                layout_.data_offset + entry->data_begin + offset, temp_path_);
  if (!status.ok()) {
    absl::MutexLock lock(&mu_);
    written_[index].erase(begin);
  }
  return status;
}

absl::Status SafetensorsWriter::Commit() {
  absl::MutexLock lock(&mu_);
  if (committed_ || fd_ < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": Commit called twice"));
  }
  for (size_t i = 0; i < layout_.tensors.size(); ++i) {
    uint64_t covered = 0;
    for (const auto& [begin, end] : written_[i]) covered += end - begin;
    const uint64_t size = layout_.tensors[i].ByteSize();
    if (covered != size) {
      return absl::FailedPreconditionError(
          absl::StrCat(Quoted(layout_.tensors[i].name), ": only ", covered,
                       " of ", size, " bytes were written"));
    }
  }
  if (::fsync(fd_) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("fsync ", temp_path_));
  }
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) return ErrnoToStatus(errno, absl::StrCat("close ", temp_path_));
  if (::rename(temp_path_.c_str(), path_.c_str()) != 0) {
    return ErrnoToStatus(errno, absl::StrCat("rename to ", path_));
  }
  committed_ = true;
  return FsyncParentDirectory(path_);
}

}  // namespace mergeguard
