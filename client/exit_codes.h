#ifndef MERGEGUARD_CLIENT_EXIT_CODES_H_
#define MERGEGUARD_CLIENT_EXIT_CODES_H_

#include "absl/status/status.h"

namespace mergeguard {

// Exit codes of the `mergeguard` CLI (documented in docs/cli.md).
enum ExitCode : int {
  kExitOk = 0,
  kExitFailure = 1,       // internal error, job failed, anything else
  kExitUsage = 2,         // bad flags or subcommand
  kExitInvalidInput = 3,  // INVALID_ARGUMENT, FAILED_PRECONDITION,
                          // NOT_FOUND, DATA_LOSS, OUT_OF_RANGE
  kExitResourceExhausted = 4,
  kExitAuth = 5,         // UNAUTHENTICATED, PERMISSION_DENIED
  kExitUnavailable = 6,  // UNAVAILABLE, DEADLINE_EXCEEDED
  kExitCancelled = 7,    // CANCELLED
};

// ExitCodeFor returns the exit code for a final status.
int ExitCodeFor(const absl::Status& status);

}  // namespace mergeguard

#endif  // MERGEGUARD_CLIENT_EXIT_CODES_H_
