#ifndef MERGEGUARD_SERVER_ARCHITECTURE_REGISTRY_H_
#define MERGEGUARD_SERVER_ARCHITECTURE_REGISTRY_H_

// Architectures tenants may choose by name: TorchScript modules registered by
// an admin (RPC) or the operator (a directory of *.pt files). Tenants never
// make the server run a module of their own.

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/artifact_store.h"

namespace mergeguard {

// ArchitectureInfo is one registered architecture.
struct ArchitectureInfo {
  std::string name;
  std::string sha256;
  // Tenant of the admin who registered it, or "operator".
  std::string registered_by;
  int64_t create_time_unix_ms = 0;
};

// IsValidArchitectureName returns true for 1-64 of [A-Za-z0-9_.-].
bool IsValidArchitectureName(const std::string& name);

// ArchitectureRegistry is thread-safe; Open and Register block on disk.
class ArchitectureRegistry {
 public:
  // Open loads `<store>/architectures.json` and registers every `*.pt` in
  // `operator_dir` (if set) under its file stem.
  static absl::StatusOr<std::unique_ptr<ArchitectureRegistry>> Open(
      ArtifactStore* store, const std::string& operator_dir);

  // Lookup returns the architecture, or NOT_FOUND listing the known names.
  absl::StatusOr<ArchitectureInfo> Lookup(const std::string& name) const;
  // List returns every architecture, sorted by name.
  std::vector<ArchitectureInfo> List() const;
  // Register names `artifact` (kind architecture) `name`, replacing any
  // previous registration.
  absl::StatusOr<ArchitectureInfo> Register(const std::string& name,
                                            const ArtifactInfo& artifact,
                                            const std::string& registered_by);

 private:
  explicit ArchitectureRegistry(ArtifactStore* store);
  ArtifactStore* const store_;
  const std::string path_;
  absl::Mutex save_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  mutable absl::Mutex mu_;
  std::map<std::string, ArchitectureInfo> architectures_ ABSL_GUARDED_BY(mu_);
};

// kArchitectureOwner owns the registered modules' blobs in the store, so a
// tenant deleting its upload does not unregister them.
inline constexpr char kArchitectureOwner[] = "_architectures";

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_ARCHITECTURE_REGISTRY_H_
