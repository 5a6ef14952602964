#ifndef MERGEGUARD_SERVER_STATUS_UTIL_H_
#define MERGEGUARD_SERVER_STATUS_UTIL_H_

#include <grpcpp/support/status.h>

#include <string>

#include "absl/status/status.h"

namespace mergeguard {

// ToGrpcStatus is the one place an absl::Status becomes a grpc::Status. The
// canonical code and the message pass through unchanged.
grpc::Status ToGrpcStatus(const absl::Status& status);

// StatusCodeLabel returns the canonical name of `code` ("OK", "NOT_FOUND"),
// the value of the `code` label in metrics.
std::string StatusCodeLabel(grpc::StatusCode code);

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_STATUS_UTIL_H_
