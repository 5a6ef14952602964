#ifndef MERGEGUARD_SERVER_PROTO_CONVERT_H_
#define MERGEGUARD_SERVER_PROTO_CONVERT_H_

// Conversions between the wire format (mergeguard.v1) and core/server types.

#include "absl/status/statusor.h"
#include "core/job.h"
#include "mergeguard/v1/sanitizer.pb.h"
#include "proto/job_spec_convert.h"
#include "server/architecture_registry.h"
#include "server/artifact_store.h"
#include "server/job_manager.h"

namespace mergeguard {

// JobSpecFromProto / JobSpecToProto live in proto/job_spec_convert.h.

// ArtifactKindFromProto maps an uploadable kind; INVALID_ARGUMENT otherwise.
absl::StatusOr<ArtifactKind> ArtifactKindFromProto(v1::ArtifactKind kind);
v1::ArtifactKind ArtifactKindToProto(ArtifactKind kind);

void ArtifactToProto(const ArtifactInfo& info, v1::Artifact* proto);
void JobToProto(const JobSnapshot& snapshot, v1::Job* proto);
void ArchitectureToProto(const ArchitectureInfo& info, v1::Architecture* proto);

}  // namespace mergeguard

#endif  // MERGEGUARD_SERVER_PROTO_CONVERT_H_
