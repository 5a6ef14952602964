#ifndef MERGEGUARD_CORE_FILE_UTIL_H_
#define MERGEGUARD_CORE_FILE_UTIL_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mergeguard {

// ErrnoToStatus maps an errno value to a canonical status: ENOSPC/EDQUOT to
// RESOURCE_EXHAUSTED, ENOENT to NOT_FOUND, EACCES to PERMISSION_DENIED, and
// the rest to INTERNAL. The message is `what` plus strerror.
absl::Status ErrnoToStatus(int errno_value, absl::string_view what);

// WriteFileAtomically writes `contents` to a temporary file beside `path`,
// fsyncs it, renames it over `path` and fsyncs the directory.
absl::Status WriteFileAtomically(const std::string& path,
                                 absl::string_view contents);

// ReadFile returns the whole contents of `path`.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// FsyncDirectory fsyncs the directory containing `path`.
absl::Status FsyncParentDirectory(const std::string& path);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_FILE_UTIL_H_
