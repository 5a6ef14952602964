#include "core/version.h"

// Defined for this file only (see core/CMakeLists.txt), so that the
// precompiled header of the other sources is unaffected.
#ifndef MERGEGUARD_VERSION
#error "MERGEGUARD_VERSION must be defined by the build"
#endif

namespace mergeguard {

absl::string_view MergeguardVersion() { return MERGEGUARD_VERSION; }

}  // namespace mergeguard
