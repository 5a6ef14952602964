#ifndef MERGEGUARD_CORE_STATUS_MACROS_H_
#define MERGEGUARD_CORE_STATUS_MACROS_H_

// Debian's Abseil (20220623) ships no status macros; these are the project's.

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define MG_STATUS_CONCAT_INNER_(a, b) a##b
#define MG_STATUS_CONCAT_(a, b) MG_STATUS_CONCAT_INNER_(a, b)

// RETURN_IF_ERROR evaluates `expr` (an absl::Status) and returns it if not ok.
#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status mg_status_ = (expr);      \
    if (!mg_status_.ok()) return mg_status_; \
  } while (0)

// ASSIGN_OR_RETURN(lhs, expr) evaluates `expr` (an absl::StatusOr<T>); on
// error returns its status, otherwise moves the value into `lhs`, which may be
// a declaration such as `auto x`.
#define ASSIGN_OR_RETURN(lhs, expr)                                         \
  MG_ASSIGN_OR_RETURN_IMPL_(MG_STATUS_CONCAT_(mg_statusor_, __LINE__), lhs, \
                            expr)

#define MG_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr)     \
  auto statusor = (expr);                                  \
  if (!statusor.ok()) return std::move(statusor).status(); \
  lhs = std::move(statusor).value()

#endif  // MERGEGUARD_CORE_STATUS_MACROS_H_
