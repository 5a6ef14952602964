#ifndef MERGEGUARD_SERVER_PROTO_CONVERT_H_
#define MERGEGUARD_SERVER_PROTO_CONVERT_H_

// Conversions between the wire format (mergeguard.v1) and core/server types.

#include "absl/status/statusor.h"
#include "core/job.h"
#include "mergeguard/v1/sanitizer.pb.h"
#include "server/architecture_registry.h"
#include "server/artifact_store.h"
#include "server/job_manager.h"

namespace mergeguard {

// JobSpecFromProto converts and checks the wire spec: INVALID_ARGUMENT names
// the field for an unset method, an unknown enum value, or parameters that do
// not apply to the method (as the YAML job file does).
absl::StatusOr<JobSpec> JobSpecFromProto(const v1::JobSpec& proto);
// JobSpecToProto is the inverse.
void JobSpecToProto(const JobSpec& spec, v1::JobSpec* proto);

// ArtifactKindFromProto maps an uploadable kind; INVALID_ARGUMENT otherwise.
absl::StatusOr<ArtifactKind> ArtifactKindFromProto(v1::ArtifactKind kind);
v1::ArtifactKind ArtifactKindToProto(ArtifactKind kind);

void ArtifactToProto(const ArtifactInfo& info, v1::Artifact* proto);
void JobToProto(const JobSnapshot& snapshot, v1::Job* proto);
void ArchitectureToProto(const ArchitectureInfo& info, v1::Architecture* proto);

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_PROTO_CONVERT_H_
