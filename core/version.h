#ifndef MERGEGUARD_CORE_VERSION_H_
#define MERGEGUARD_CORE_VERSION_H_

#include "absl/strings/string_view.h"

namespace mergeguard {

// MergeguardVersion returns the project version from CMake (e.g. "0.1.0"),
// recorded as `mergeguard.version` in merged checkpoints.
absl::string_view MergeguardVersion();

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_VERSION_H_
