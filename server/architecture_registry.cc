#include "server/architecture_registry.h"

#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/log.h"

namespace mergeguard {

bool IsValidArchitectureName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!(absl::ascii_isalnum(c) || c == '_' || c == '.' || c == '-')) {
      return false;
    }
  }
  return true;
}

ArchitectureRegistry::ArchitectureRegistry(ArtifactStore* store)
    : store_(store),
      path_(absl::StrCat(store->root(), "/architectures.json")) {}

absl::StatusOr<std::unique_ptr<ArchitectureRegistry>>
ArchitectureRegistry::Open(ArtifactStore* store,
                           const std::string& operator_dir) {
  std::unique_ptr<ArchitectureRegistry> registry(
      new ArchitectureRegistry(store));
  if (std::filesystem::exists(registry->path_)) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(registry->path_));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_array()) {
      return absl::DataLossError(
          absl::StrCat(registry->path_, " is not a JSON array"));
    }
    absl::MutexLock lock(&registry->mu_);
    for (const nlohmann::json& entry : j) {
      ArchitectureInfo info;
      info.name = entry.value("name", "");
      info.sha256 = entry.value("sha256", "");
      info.registered_by = entry.value("registered_by", "");
      info.create_time_unix_ms = entry.value("create_time_unix_ms", int64_t{0});
      registry->architectures_[info.name] = info;
    }
  }
  if (!operator_dir.empty()) {
    std::error_code error;
    for (const auto& entry :
         std::filesystem::directory_iterator(operator_dir, error)) {
      if (entry.path().extension() != ".pt") continue;
      const std::string name = entry.path().stem().string();
      if (!IsValidArchitectureName(name)) {
        LogWarning("architectures: skipping ", entry.path().string(),
                   " (name must be 1-64 of [A-Za-z0-9_.-])");
        continue;
      }
      // Copy, since importing moves the file into the store.
      const std::string copy = store->NewTempPath();
      std::filesystem::copy_file(entry.path(), copy, error);
      if (error) {
        return ErrnoToStatus(error.value(),
                             absl::StrCat("copy ", entry.path().string()));
      }
      ASSIGN_OR_RETURN(ArtifactInfo artifact,
                       store->ImportFile(kArchitectureOwner, copy,
                                         entry.path().filename().string(),
                                         ArtifactKind::kArchitecture));
      RETURN_IF_ERROR(registry->Register(name, artifact, "operator").status());
    }
    if (error) {
      return ErrnoToStatus(
          error.value(),
          absl::StrCat("read --architectures_dir ", operator_dir));
    }
  }
  return registry;
}

absl::StatusOr<ArchitectureInfo> ArchitectureRegistry::Lookup(
    const std::string& name) const {
  absl::MutexLock lock(&mu_);
  auto it = architectures_.find(name);
  if (it != architectures_.end()) return it->second;
  std::vector<std::string> names;
  for (const auto& [known, info] : architectures_) names.push_back(known);
  return absl::NotFoundError(
      absl::StrCat("unknown architecture \"", name, "\"; registered: ",
                   names.empty() ? "none (an admin registers them)"
                                 : absl::StrJoin(names, ", ")));
}

std::vector<ArchitectureInfo> ArchitectureRegistry::List() const {
  absl::MutexLock lock(&mu_);
  std::vector<ArchitectureInfo> list;
  for (const auto& [name, info] : architectures_) list.push_back(info);
  return list;
}

absl::StatusOr<ArchitectureInfo> ArchitectureRegistry::Register(
    const std::string& name, const ArtifactInfo& artifact,
    const std::string& registered_by) {
  if (!IsValidArchitectureName(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("architecture name \"", name,
                     "\" must be 1-64 characters of [A-Za-z0-9_.-]"));
  }
  if (artifact.kind != ArtifactKind::kArchitecture) {
    return absl::InvalidArgumentError(
        absl::StrCat("artifact ", artifact.sha256, " was uploaded as ",
                     ArtifactKindName(artifact.kind),
                     "; upload the TorchScript module with kind ARCHITECTURE"));
  }
  RETURN_IF_ERROR(store_->AddOwner(kArchitectureOwner, artifact));
  ArchitectureInfo info;
  info.name = name;
  info.sha256 = artifact.sha256;
  info.registered_by = registered_by;
  info.create_time_unix_ms = absl::ToUnixMillis(absl::Now());
  // save_mu_ orders the file writes; mu_ is never held across the disk.
  absl::MutexLock save_lock(&save_mu_);
  nlohmann::json j = nlohmann::json::array();
  {
    absl::MutexLock lock(&mu_);
    architectures_[name] = info;
    for (const auto& [known, entry] : architectures_) {
      j.push_back({{"name", entry.name},
                   {"sha256", entry.sha256},
                   {"registered_by", entry.registered_by},
                   {"create_time_unix_ms", entry.create_time_unix_ms}});
    }
  }
  RETURN_IF_ERROR(WriteFileAtomically(path_, j.dump(1)));
  return info;
}

}  // namespace mergeguard
