#include "server/job_journal.h"

#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "server/log.h"

namespace mergeguard {
namespace {

using nlohmann::json;

constexpr JobState kStates[] = {JobState::kQueued, JobState::kRunning,
                                JobState::kSucceeded, JobState::kFailed,
                                JobState::kCancelled};

json ArtifactToJson(const ArtifactInfo& info) {
  return {{"sha256", info.sha256},
          {"size_bytes", info.size_bytes},
          {"name", info.name},
          {"kind", std::string(ArtifactKindName(info.kind))},
          {"create_time_unix_ms", info.create_time_unix_ms}};
}

absl::StatusOr<ArtifactInfo> ArtifactFromJson(const json& j) {
  ArtifactInfo info;
  info.sha256 = j.at("sha256").get<std::string>();
  info.size_bytes = j.at("size_bytes").get<uint64_t>();
  info.name = j.at("name").get<std::string>();
  info.create_time_unix_ms = j.at("create_time_unix_ms").get<int64_t>();
  ASSIGN_OR_RETURN(info.kind,
                   ParseArtifactKind(j.at("kind").get<std::string>()));
  return info;
}

bool IsJobIdSafe(const std::string& id) {
  if (id.empty() || id.size() > 128) return false;
  for (char c : id) {
    if (!(isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_')) {
      return false;
    }
  }
  return true;
}

}  // namespace

const char* JobStateName(JobState state) {
  switch (state) {
    case JobState::kQueued:
      return "queued";
    case JobState::kRunning:
      return "running";
    case JobState::kSucceeded:
      return "succeeded";
    case JobState::kFailed:
      return "failed";
    case JobState::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

bool IsTerminal(JobState state) {
  return state == JobState::kSucceeded || state == JobState::kFailed ||
         state == JobState::kCancelled;
}

std::string JobRecordToJson(const JobRecord& r) {
  json j = {
      {"id", r.id},
      {"tenant", r.tenant},
      {"spec", json::parse(JobSpecToJson(r.spec))},
      {"state", JobStateName(r.state)},
      {"error_code", static_cast<int>(r.error.code())},
      {"error_message", std::string(r.error.message())},
      {"create_time_unix_ms", r.create_time_unix_ms},
      {"start_time_unix_ms", r.start_time_unix_ms},
      {"finish_time_unix_ms", r.finish_time_unix_ms},
      {"attempts", r.attempts},
      {"metrics", r.metrics},
      {"version", r.version},
      {"progress",
       {{"phase", r.progress.phase},
        {"step", r.progress.step},
        {"total_steps", r.progress.total_steps},
        {"losses", r.progress.losses}}},
  };
  if (r.state == JobState::kSucceeded) {
    j["result_model"] = ArtifactToJson(r.result_model);
    j["result_report"] = ArtifactToJson(r.result_report);
  }
  return j.dump(1);
}

absl::StatusOr<JobRecord> JobRecordFromJson(const std::string& text) {
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::DataLossError("job record is not a JSON object");
  }
  JobRecord r;
  try {
    r.id = j.at("id").get<std::string>();
    r.tenant = j.at("tenant").get<std::string>();
    ASSIGN_OR_RETURN(r.spec, JobSpecFromJson(j.at("spec").dump()));
    const std::string state = j.at("state").get<std::string>();
    bool known = false;
    for (JobState s : kStates) {
      if (state == JobStateName(s)) {
        r.state = s;
        known = true;
      }
    }
    if (!known) return absl::DataLossError("unknown job state " + state);
    const int code = j.at("error_code").get<int>();
    if (code != 0) {
      r.error = absl::Status(static_cast<absl::StatusCode>(code),
                             j.at("error_message").get<std::string>());
    }
    r.create_time_unix_ms = j.at("create_time_unix_ms").get<int64_t>();
    r.start_time_unix_ms = j.at("start_time_unix_ms").get<int64_t>();
    r.finish_time_unix_ms = j.at("finish_time_unix_ms").get<int64_t>();
    r.attempts = j.at("attempts").get<int>();
    r.metrics = j.at("metrics").get<std::map<std::string, double>>();
    r.version = j.at("version").get<uint64_t>();
    const json& progress = j.at("progress");
    r.progress.phase = progress.at("phase").get<std::string>();
    r.progress.step = progress.at("step").get<int64_t>();
    r.progress.total_steps = progress.at("total_steps").get<int64_t>();
    r.progress.losses =
        progress.at("losses").get<std::map<std::string, double>>();
    if (r.state == JobState::kSucceeded) {
      ASSIGN_OR_RETURN(r.result_model, ArtifactFromJson(j.at("result_model")));
      ASSIGN_OR_RETURN(r.result_report,
                       ArtifactFromJson(j.at("result_report")));
    }
  } catch (const json::exception& e) {
    return absl::DataLossError(
        absl::StrCat("job record is malformed: ", e.what()));
  }
  if (!IsJobIdSafe(r.id)) return absl::DataLossError("bad job id");
  return r;
}

absl::StatusOr<std::unique_ptr<JobJournal>> JobJournal::Open(
    const std::string& directory) {
  std::error_code error;
  std::filesystem::create_directories(directory, error);
  if (error) {
    return ErrnoToStatus(error.value(),
                         absl::StrCat("create directory ", directory));
  }
  return std::unique_ptr<JobJournal>(new JobJournal(directory));
}

absl::Status JobJournal::Write(const JobRecord& record) {
  if (!IsJobIdSafe(record.id)) {
    return absl::InternalError(absl::StrCat("unsafe job id ", record.id));
  }
  // Held across the write so that two writers of one job cannot reorder.
  absl::MutexLock lock(&mu_);
  auto it = written_versions_.find(record.id);
  if (it != written_versions_.end() && it->second >= record.version) {
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(
      WriteFileAtomically(absl::StrCat(directory_, "/", record.id, ".json"),
                          JobRecordToJson(record)));
  written_versions_[record.id] = record.version;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<JobRecord>> JobJournal::LoadAll() {
  std::vector<JobRecord> records;
  std::error_code error;
  for (const auto& entry :
       std::filesystem::directory_iterator(directory_, error)) {
    const std::string path = entry.path().string();
    if (absl::StrContains(path, ".tmp-")) {  // an interrupted write
      ::unlink(path.c_str());
      continue;
    }
    if (!absl::EndsWith(path, ".json")) continue;
    absl::StatusOr<std::string> text = ReadFile(path);
    absl::StatusOr<JobRecord> record =
        text.ok() ? JobRecordFromJson(*text)
                  : absl::StatusOr<JobRecord>(text.status());
    if (!record.ok()) {
      LogError("journal: cannot read ", path, ": ", record.status().ToString(),
               "; moved aside as .corrupt");
      std::filesystem::rename(path, path + ".corrupt", error);
      continue;
    }
    records.push_back(*std::move(record));
  }
  if (error) {
    return ErrnoToStatus(error.value(),
                         absl::StrCat("read journal ", directory_));
  }
  absl::MutexLock lock(&mu_);
  for (const JobRecord& record : records) {
    written_versions_[record.id] = record.version;
  }
  return records;
}

}  // namespace mergeguard
