#include "server/job_journal.h"

#include <filesystem>
#include <string>

#include "core/sha256.h"
#include "gtest/gtest.h"
#include "tests/server/server_process.h"

namespace mergeguard {
namespace {

JobRecord SampleRecord() {
  JobRecord record;
  record.id = "j-test-0123456789abcdef";
  record.tenant = "acme";
  record.spec.method = JobMethod::kTaskArithmetic;
  record.spec.base_digest = Sha256Hex("base");
  record.spec.inputs.push_back({"a", 2.0, Sha256Hex("a"), "", ""});
  record.state = JobState::kSucceeded;
  record.error = absl::OkStatus();
  record.progress = {"merge", 3, 3, {{"loss", 0.25}}};
  record.create_time_unix_ms = 1000;
  record.start_time_unix_ms = 2000;
  record.finish_time_unix_ms = 3000;
  record.attempts = 1;
  record.result_model = {Sha256Hex("m"),        10, "m",
                         ArtifactKind::kResult, 5,  false};
  record.result_report = {Sha256Hex("r"),        4, "r",
                          ArtifactKind::kReport, 5, false};
  record.metrics = {{"seconds", 0.5}};
  record.version = 4;
  return record;
}

TEST(JobJournalTest, RecordsRoundTrip) {
  JobRecord record = SampleRecord();
  auto parsed = JobRecordFromJson(JobRecordToJson(record));
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_EQ(JobRecordToJson(*parsed), JobRecordToJson(record));
  record.state = JobState::kFailed;
  record.error = absl::FailedPreconditionError("shape mismatch");
  parsed = JobRecordFromJson(JobRecordToJson(record));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(parsed->error, record.error);
}

TEST(JobJournalTest, KeepsTheNewestVersionAndSetsCorruptFilesAside) {
  const std::string dir = testing::MakeTempDir("mergeguard-journal-test");
  auto journal = JobJournal::Open(dir);
  ASSERT_TRUE(journal.ok());
  JobRecord record = SampleRecord();
  ASSERT_TRUE((*journal)->Write(record).ok());
  JobRecord stale = record;
  stale.version = 2;
  stale.state = JobState::kRunning;
  ASSERT_TRUE((*journal)->Write(stale).ok());  // skipped
  testing::WriteFile(dir + "/j-broken.json", "{not json");

  auto reopened = JobJournal::Open(dir);
  auto records = (*reopened)->LoadAll();
  ASSERT_TRUE(records.ok());
  ASSERT_EQ(records->size(), 1u);
  EXPECT_EQ((*records)[0].state, JobState::kSucceeded);
  EXPECT_TRUE(std::filesystem::exists(dir + "/j-broken.json.corrupt"));
  testing::RemoveTree(dir);
}

}  // namespace
}  // namespace mergeguard
