#ifndef MERGEGUARD_PROTO_JOB_SPEC_CONVERT_H_
#define MERGEGUARD_PROTO_JOB_SPEC_CONVERT_H_

// The job spec on the wire (mergeguard.v1.JobSpec) and in core (JobSpec).
// Shared by the server, which receives specs, and the client, which builds
// them from the YAML job file.

#include "absl/status/statusor.h"
#include "core/job.h"
#include "mergeguard/v1/sanitizer.pb.h"

namespace mergeguard {

// JobSpecFromProto converts and checks the wire spec: INVALID_ARGUMENT names
// the field for an unset method, an unknown enum value, or parameters that do
// not apply to the method (as the YAML job file does).
absl::StatusOr<JobSpec> JobSpecFromProto(const v1::JobSpec& proto);
// JobSpecToProto is the inverse.
void JobSpecToProto(const JobSpec& spec, v1::JobSpec* proto);

}  // namespace mergeguard

#endif  // MERGEGUARD_PROTO_JOB_SPEC_CONVERT_H_
