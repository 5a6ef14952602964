#include "client/progress_format.h"

#include <vector>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace mergeguard {

std::string FormatLosses(const std::map<std::string, double>& losses) {
  std::vector<std::string> parts;
  for (const auto& [name, value] : losses) {
    parts.push_back(absl::StrFormat("%s=%.4g", name, value));
  }
  return absl::StrJoin(parts, " ");
}

std::string FormatProgressLine(double elapsed_seconds, absl::string_view state,
                               const JobProgress& progress) {
  return absl::StrFormat("%7.1fs %-9s %s %d/%d %s\n", elapsed_seconds, state,
                         progress.phase, progress.step, progress.total_steps,
                         FormatLosses(progress.losses));
}

}  // namespace mergeguard
