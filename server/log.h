#ifndef MERGEGUARD_SERVER_LOG_H_
#define MERGEGUARD_SERVER_LOG_H_

// Minimal structured logging to stderr (Debian's Abseil has no absl/log).

#include <string>

#include "absl/strings/str_cat.h"

namespace mergeguard {

// LogLine writes "<UTC time> <level> <message>" to stderr as one write.
void LogLine(const char* level, const std::string& message);

template <typename... Args>
void LogInfo(const Args&... args) {
  LogLine("INFO", absl::StrCat(args...));
}

template <typename... Args>
void LogWarning(const Args&... args) {
  LogLine("WARN", absl::StrCat(args...));
}

template <typename... Args>
void LogError(const Args&... args) {
  LogLine("ERROR", absl::StrCat(args...));
}

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_LOG_H_
