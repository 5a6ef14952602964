#ifndef MERGEGUARD_CLIENT_PROGRESS_FORMAT_H_
#define MERGEGUARD_CLIENT_PROGRESS_FORMAT_H_

// How the CLI shows a job's progress, the same for `watch` (remote) and
// `merge` (local).

#include <map>
#include <string>

#include "absl/strings/string_view.h"
#include "core/job.h"

namespace mergeguard {

// FormatLosses returns "name=value ..." sorted by name.
std::string FormatLosses(const std::map<std::string, double>& losses);

// FormatProgressLine returns one plain line (with '\n') for logs: seconds
// since the start, state, phase, step/total and losses.
std::string FormatProgressLine(double elapsed_seconds, absl::string_view state,
                               const JobProgress& progress);

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_PROGRESS_FORMAT_H_
