#include "server/proto_convert.h"

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "proto/job_spec_convert.h"

namespace mergeguard {
namespace {

struct KindPair {
  v1::ArtifactKind proto;
  ArtifactKind kind;
};
constexpr KindPair kKinds[] = {
    {v1::ARTIFACT_KIND_MODEL, ArtifactKind::kModel},
    {v1::ARTIFACT_KIND_LORA_WEIGHTS, ArtifactKind::kLoraWeights},
    {v1::ARTIFACT_KIND_LORA_CONFIG, ArtifactKind::kLoraConfig},
    {v1::ARTIFACT_KIND_CALIBRATION, ArtifactKind::kCalibration},
    {v1::ARTIFACT_KIND_ARCHITECTURE, ArtifactKind::kArchitecture},
    {v1::ARTIFACT_KIND_RESULT, ArtifactKind::kResult},
    {v1::ARTIFACT_KIND_REPORT, ArtifactKind::kReport},
};

v1::JobState StateToProto(JobState state) {
  switch (state) {
    case JobState::kQueued:
      return v1::JOB_STATE_QUEUED;
    case JobState::kRunning:
      return v1::JOB_STATE_RUNNING;
    case JobState::kSucceeded:
      return v1::JOB_STATE_SUCCEEDED;
    case JobState::kFailed:
      return v1::JOB_STATE_FAILED;
    case JobState::kCancelled:
      return v1::JOB_STATE_CANCELLED;
  }
  return v1::JOB_STATE_UNSPECIFIED;
}

}  // namespace

absl::StatusOr<ArtifactKind> ArtifactKindFromProto(v1::ArtifactKind kind) {
  for (const KindPair& pair : kKinds) {
    if (pair.proto == kind) return pair.kind;
  }
  return absl::InvalidArgumentError(
      "metadata.kind: is required (MODEL, LORA_WEIGHTS, LORA_CONFIG, "
      "CALIBRATION or ARCHITECTURE)");
}

v1::ArtifactKind ArtifactKindToProto(ArtifactKind kind) {
  for (const KindPair& pair : kKinds) {
    if (pair.kind == kind) return pair.proto;
  }
  return v1::ARTIFACT_KIND_UNSPECIFIED;
}

void ArtifactToProto(const ArtifactInfo& info, v1::Artifact* proto) {
  proto->set_sha256(info.sha256);
  proto->set_size_bytes(info.size_bytes);
  proto->set_name(info.name);
  proto->set_kind(ArtifactKindToProto(info.kind));
  proto->set_create_time_unix_ms(info.create_time_unix_ms);
  proto->set_already_present(info.already_present);
}

void JobToProto(const JobSnapshot& snapshot, v1::Job* proto) {
  const JobRecord& r = snapshot.record;
  proto->set_id(r.id);
  JobSpecToProto(r.spec, proto->mutable_spec());
  proto->set_state(StateToProto(r.state));
  v1::JobProgress* progress = proto->mutable_progress();
  progress->set_phase(r.progress.phase);
  progress->set_step(r.progress.step);
  progress->set_total_steps(r.progress.total_steps);
  for (const auto& [name, value] : r.progress.losses) {
    (*progress->mutable_losses())[name] = value;
  }
  if (r.state == JobState::kSucceeded) {
    v1::JobResult* result = proto->mutable_result();
    ArtifactToProto(r.result_model, result->mutable_model());
    ArtifactToProto(r.result_report, result->mutable_report());
    for (const auto& [name, value] : r.metrics) {
      (*result->mutable_metrics())[name] = value;
    }
  }
  proto->set_error_code(static_cast<int>(r.error.code()));
  proto->set_error_message(std::string(r.error.message()));
  proto->set_create_time_unix_ms(r.create_time_unix_ms);
  proto->set_start_time_unix_ms(r.start_time_unix_ms);
  proto->set_finish_time_unix_ms(r.finish_time_unix_ms);
  proto->set_attempts(r.attempts);
  proto->set_queue_position(snapshot.queue_position);
}

void ArchitectureToProto(const ArchitectureInfo& info,
                         v1::Architecture* proto) {
  proto->set_name(info.name);
  proto->set_sha256(info.sha256);
  proto->set_registered_by(info.registered_by);
  proto->set_create_time_unix_ms(info.create_time_unix_ms);
}

}  // namespace mergeguard
