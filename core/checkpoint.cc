#include "core/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "core/strict_json.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

using nlohmann::json;

constexpr const char* kPickleExtensions[] = {".bin",  ".pt",  ".pth",
                                             ".ckpt", ".pkl", ".pickle"};

std::string Quoted(absl::string_view name) {
  return absl::StrCat("tensor \"", name, "\"");
}

std::string PickleRefusal(const std::string& path, absl::string_view why) {
  return absl::StrCat(
      path, " is a pickle checkpoint (", why,
      "). Loading a pickle can run arbitrary code, so mergeguard refuses it. "
      "Convert it to safetensors on a machine you trust, e.g. "
      "safetensors.torch.save_file(torch.load(path, weights_only=True), "
      "\"model.safetensors\"), and use that file instead.");
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string JoinPath(const std::string& dir, absl::string_view name) {
  if (dir.empty()) return std::string(name);
  if (dir.back() == '/') return absl::StrCat(dir, name);
  return absl::StrCat(dir, "/", name);
}

std::string ParentDirectory(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// A shard name from an index must stay inside the index's directory.
bool IsPlainFileName(absl::string_view name) {
  return !name.empty() && name != "." && name != ".." &&
         name.find('/') == name.npos && name.find('\\') == name.npos &&
         name.find('\0') == name.npos;
}

std::string ShardFileName(size_t index, size_t count) {
  return absl::StrFormat("model-%05d-of-%05d.safetensors", index + 1, count);
}

}  // namespace

absl::Status CheckNotPickle(const std::string& path) {
  const std::string lower = absl::AsciiStrToLower(path);
  for (const char* extension : kPickleExtensions) {
    if (absl::EndsWith(lower, extension)) {
      return absl::InvalidArgumentError(
          PickleRefusal(path, absl::StrCat(extension, " file")));
    }
  }
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::OkStatus();  // the caller reports why it can't open
  uint8_t head[9] = {};
  ssize_t n;
  do {
    n = ::pread(fd, head, sizeof(head), 0);
  } while (n < 0 && errno == EINTR);
  ::close(fd);
  if (n < 4) return absl::OkStatus();
  // A safetensors file starts with its header length (little-endian, at most
  // 100 MB, so bytes 4..7 are zero) and then '{'. Its first two bytes can
  // legitimately read 0x80 0x02 (a 640-byte header), so such a file is not
  // mistaken for a pickle.
  const bool safetensors_like = n == 9 && head[4] == 0 && head[5] == 0 &&
                                head[6] == 0 && head[7] == 0 && head[8] == '{';
  if (safetensors_like) return absl::OkStatus();
  if (head[0] == 0x80 && head[1] >= 2 && head[1] <= 5) {
    return absl::InvalidArgumentError(PickleRefusal(
        path, absl::StrCat("starts with pickle protocol ",
                           static_cast<int>(head[1]), " opcodes")));
  }
  if (head[0] == 'P' && head[1] == 'K' && head[2] == 3 && head[3] == 4) {
    return absl::InvalidArgumentError(
        PickleRefusal(path, "a zip archive as written by torch.save"));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Checkpoint

namespace {

absl::StatusOr<std::string> ResolveCheckpointPath(const std::string& path) {
  if (!IsDirectory(path)) return path;
  const std::string index = JoinPath(path, kShardIndexFileName);
  const std::string single = JoinPath(path, kSingleFileName);
  const bool has_index = IsRegularFile(index);
  const bool has_single = IsRegularFile(single);
  if (has_index && has_single) {
    // Guessing which one the user meant could merge the wrong weights.
    return absl::InvalidArgumentError(
        absl::StrCat(path, " holds both ", kSingleFileName, " and ",
                     kShardIndexFileName, "; keep only one"));
  }
  if (has_index) return index;
  if (has_single) return single;
  for (const char* pickle : {"pytorch_model.bin", "model.bin", "model.pt"}) {
    std::string candidate = JoinPath(path, pickle);
    if (IsRegularFile(candidate)) return CheckNotPickle(candidate);
  }
  return absl::NotFoundError(absl::StrCat(
      path, " holds neither ", kSingleFileName, " nor ", kShardIndexFileName));
}

// ParseIndex returns the weight_map of a shard index: tensor -> shard file.
absl::StatusOr<std::map<std::string, std::string>> ParseIndex(
    const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  ASSIGN_OR_RETURN(json root, ParseStrictJson(text, path, "key"));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": index must be a JSON object"));
  }
  auto metadata = root.find("metadata");
  if (metadata != root.end()) {
    if (!metadata->is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": \"metadata\" must be an object"));
    }
    auto total = metadata->find("total_size");
    // Writers disagree on what total_size counts, so only its type is checked.
    if (total != metadata->end() && !total->is_number_unsigned()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": \"metadata.total_size\" must be a non-negative integer"));
    }
  }
  auto weight_map = root.find("weight_map");
  if (weight_map == root.end() || !weight_map->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": \"weight_map\" must be an object of tensor name to shard"));
  }
  std::map<std::string, std::string> shard_of;
  for (const auto& [name, shard] : weight_map->items()) {
    if (!shard.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", Quoted(name),
                       ": shard must be a string, got ", JsonTypeName(shard)));
    }
    const std::string& file = shard.get_ref<const std::string&>();
    if (!IsPlainFileName(file)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": ", Quoted(name), ": shard \"", file,
                       "\" must be a file name in the index's directory"));
    }
    shard_of.emplace(name, file);
  }
  if (shard_of.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": \"weight_map\" lists no tensors"));
  }
  return shard_of;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(
    const std::string& path) {
  ASSIGN_OR_RETURN(std::string resolved, ResolveCheckpointPath(path));
  std::unique_ptr<Checkpoint> checkpoint(new Checkpoint());
  checkpoint->path_ = resolved;

  if (!absl::EndsWith(resolved, ".json")) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(resolved));
    for (const TensorEntry& entry : file->layout().tensors) {
      checkpoint->index_.emplace(entry.name, std::make_pair(size_t{0}, &entry));
    }
    checkpoint->shards_.push_back(std::move(file));
  } else {
    ASSIGN_OR_RETURN(auto shard_of, ParseIndex(resolved));
    const std::string dir = ParentDirectory(resolved);
    std::set<std::string> shard_names;
    for (const auto& [name, shard] : shard_of) shard_names.insert(shard);
    // Open every shard first, so a missing one is reported as such.
    for (const std::string& shard : shard_names) {
      const std::string shard_path = JoinPath(dir, shard);
      absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file =
          SafetensorsFile::Open(shard_path);
      if (!file.ok()) {
        return absl::Status(file.status().code(),
                            absl::StrCat("shard \"", shard, "\" of ", resolved,
                                         ": ", file.status().message()));
      }
      checkpoint->shards_.push_back(*std::move(file));
    }
    size_t shard_index = 0;
    for (const std::string& shard : shard_names) {
      const SafetensorsFile& file = *checkpoint->shards_[shard_index];
      for (const TensorEntry& entry : file.layout().tensors) {
        auto listed = shard_of.find(entry.name);
        if (listed == shard_of.end()) {
          return absl::InvalidArgumentError(absl::StrCat(
              resolved, ": ", Quoted(entry.name), " is in shard \"", shard,
              "\" but not in the index's weight_map"));
        }
        if (listed->second != shard) {
          return absl::InvalidArgumentError(absl::StrCat(
              resolved, ": ", Quoted(entry.name), " is in shard \"", shard,
              "\" but the index maps it to \"", listed->second, "\""));
        }
        checkpoint->index_.emplace(entry.name,
                                   std::make_pair(shard_index, &entry));
      }
      ++shard_index;
    }
    for (const auto& [name, shard] : shard_of) {
      if (checkpoint->index_.find(name) == checkpoint->index_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(resolved, ": ", Quoted(name), " is mapped to shard \"",
                         shard, "\" but that shard does not hold it"));
      }
    }
  }
  checkpoint->names_.reserve(checkpoint->index_.size());
  for (const auto& [name, location] : checkpoint->index_) {
    checkpoint->names_.push_back(name);
    checkpoint->total_bytes_ += location.second->ByteSize();
  }
  return checkpoint;
}

const TensorEntry* Checkpoint::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second.second;
}

absl::StatusOr<TensorRef> Checkpoint::Get(absl::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(
        absl::StrCat(Quoted(name), " not found in checkpoint ", path_));
  }
  TensorRef ref;
  ref.entry = it->second.second;
  ref.bytes = shards_[it->second.first]->Bytes(*ref.entry);
  return ref;
}

void Checkpoint::ReleasePages(absl::string_view name) const {
  auto it = index_.find(name);
  if (it == index_.end()) return;
  shards_[it->second.first]->ReleasePages(*it->second.second);
}

const std::map<std::string, std::string>& Checkpoint::Metadata() const {
  static const auto* const kEmpty = new std::map<std::string, std::string>();
  return shards_.empty() ? *kEmpty : shards_.front()->layout().metadata;
}

// ---------------------------------------------------------------------------
// CheckpointWriter

absl::StatusOr<std::unique_ptr<CheckpointWriter>> CheckpointWriter::Create(
    const std::string& path, std::vector<TensorSpec> tensors,
    const std::map<std::string, std::string>& metadata,
    const CheckpointWriterOptions& options) {
  std::unique_ptr<CheckpointWriter> writer(new CheckpointWriter());
  {
    std::set<std::string> seen;
    for (const TensorSpec& spec : tensors) {
      if (!seen.insert(spec.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("duplicate ", Quoted(spec.name)));
      }
    }
  }
  if (options.max_shard_bytes == 0) {
    writer->path_ = path;
    for (const TensorSpec& spec : tensors) writer->shard_of_[spec.name] = 0;
    ASSIGN_OR_RETURN(auto shard, SafetensorsWriter::Create(
                                     path, std::move(tensors), metadata));
    writer->total_bytes_ = shard->TotalBytes();
    writer->shard_names_.push_back(path);
    writer->shards_.push_back(std::move(shard));
    return writer;
  }

  writer->sharded_ = true;
  writer->path_ = JoinPath(path, kShardIndexFileName);
  if (::mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    return ErrnoToStatus(errno, absl::StrCat("mkdir ", path));
  }
  if (!IsDirectory(path)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": a sharded checkpoint needs a directory"));
  }
  // Greedy packing in the given order; a tensor larger than the limit gets a
  // shard of its own.
  std::vector<std::vector<TensorSpec>> groups;
  uint64_t group_bytes = 0;
  for (TensorSpec& spec : tensors) {
    uint64_t bytes = spec.ByteSize();
    if (groups.empty() || (!groups.back().empty() &&
                           group_bytes + bytes > options.max_shard_bytes)) {
      groups.emplace_back();
      group_bytes = 0;
    }
    group_bytes += bytes;
    writer->total_bytes_ += bytes;
    groups.back().push_back(std::move(spec));
  }
  if (groups.empty()) groups.emplace_back();  // an empty model: one file
  for (size_t i = 0; i < groups.size(); ++i) {
    std::string name = ShardFileName(i, groups.size());
    for (const TensorSpec& spec : groups[i]) writer->shard_of_[spec.name] = i;
    ASSIGN_OR_RETURN(auto shard,
                     SafetensorsWriter::Create(JoinPath(path, name),
                                               std::move(groups[i]), metadata));
    writer->shard_names_.push_back(std::move(name));
    writer->shards_.push_back(std::move(shard));
  }
  return writer;
}

CheckpointWriter::~CheckpointWriter() = default;

absl::Status CheckpointWriter::WriteTensorRange(
    absl::string_view name, uint64_t offset, absl::Span<const uint8_t> bytes) {
  auto it = shard_of_.find(name);
  if (it == shard_of_.end()) {
    return absl::NotFoundError(
        absl::StrCat(Quoted(name), " is not in the layout of ", path_));
  }
  return shards_[it->second]->WriteTensorRange(name, offset, bytes);
}

absl::Status CheckpointWriter::Commit() {
  if (!sharded_) return shards_.front()->Commit();
  const std::string dir = ParentDirectory(path_);
  absl::Status status;
  size_t committed = 0;
  while (committed < shards_.size() && status.ok()) {
    status = shards_[committed]->Commit();
    if (status.ok()) ++committed;
  }
  if (status.ok()) {
    json weight_map = json::object();
    for (const auto& [name, shard] : shard_of_) {
      weight_map[name] = shard_names_[shard];
    }
    json index = {{"metadata", {{"total_size", total_bytes_}}},
                  {"weight_map", std::move(weight_map)}};
    status = WriteFileAtomically(path_, index.dump(2) + "\n");
  }
  if (!status.ok()) {
    // Without the index the shards are unreachable; remove them.
    for (size_t i = 0; i < committed; ++i) {
      ::unlink(JoinPath(dir, shard_names_[i]).c_str());
    }
  }
  return status;
}

}  // namespace mergeguard
