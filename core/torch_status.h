#ifndef MERGEGUARD_CORE_TORCH_STATUS_H_
#define MERGEGUARD_CORE_TORCH_STATUS_H_

// LibTorch reports errors by throwing c10::Error; core turns them into
// absl::Status where it calls LibTorch.

#include <exception>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace mergeguard {

// TorchErrorToStatus returns INTERNAL (or RESOURCE_EXHAUSTED for an
// allocation failure) describing `e`, prefixed with `context`.
absl::Status TorchErrorToStatus(const std::exception& e,
                                const std::string& context);

// CallTorch runs `fn` and converts any exception into a Status.
// `fn` returns absl::Status or absl::StatusOr<T>.
template <typename Fn>
auto CallTorch(const std::string& context, Fn&& fn) -> decltype(fn()) {
  try {
    return std::forward<Fn>(fn)();
  } catch (const std::exception& e) {
    return TorchErrorToStatus(e, context);
  }
}

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_TORCH_STATUS_H_
