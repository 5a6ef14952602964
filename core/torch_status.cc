#include "core/torch_status.h"

#include <new>

namespace mergeguard {

absl::Status TorchErrorToStatus(const std::exception& e,
                                const std::string& context) {
  std::string what = e.what();
  // c10::Error appends a C++ backtrace after the first line; keep the message.
  size_t newline = what.find('\n');
  if (newline != std::string::npos) what.resize(newline);
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr ||
      what.find("out of memory") != std::string::npos) {
    return absl::ResourceExhaustedError(absl::StrCat(context, ": ", what));
  }
  return absl::InternalError(absl::StrCat(context, ": ", what));
}

}  // namespace mergeguard
