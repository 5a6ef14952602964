#include "server/artifact_store.h"

#include <sys/stat.h>

#include <filesystem>
#include <string>

#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "core/sha256.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/server/server_process.h"

namespace mergeguard {
namespace {

using ::mergeguard::testing::MakeTempDir;
using ::mergeguard::testing::RandomBytes;
using ::mergeguard::testing::ReadWholeFile;
using ::mergeguard::testing::RemoveTree;
using ::testing::HasSubstr;

class ArtifactStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = MakeTempDir("mergeguard-store-test");
    Reopen();
  }
  void TearDown() override {
    store_.reset();
    RemoveTree(root_);
  }
  void Reopen(ArtifactStoreOptions options = {}) {
    store_.reset();
    options.root = root_;
    options.min_free_bytes = 0;
    auto store = ArtifactStore::Open(options, &io_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = *std::move(store);
  }

  // Upload streams `bytes` through a pipeline in 1000-byte chunks, honouring
  // its back-pressure, declaring `declared_sha256` (default: the real one).
  absl::StatusOr<ArtifactInfo> Upload(const std::string& tenant,
                                      const std::string& bytes,
                                      std::string declared_sha256 = "",
                                      uint64_t declared_size = ~0ull) {
    UploadDeclaration declaration;
    declaration.name = "file";
    declaration.size_bytes =
        declared_size == ~0ull ? bytes.size() : declared_size;
    declaration.sha256 =
        declared_sha256.empty() ? Sha256Hex(bytes) : declared_sha256;
    absl::Mutex mu;
    int rooms = 0;
    auto pipeline = store_->BeginUpload(tenant, declaration, [&] {
      absl::MutexLock lock(&mu);
      ++rooms;
    });
    if (!pipeline.ok()) return pipeline.status();
    int waited = 0;
    for (size_t offset = 0; offset < bytes.size(); offset += 1000) {
      if (!(*pipeline)->Append(bytes.substr(offset, 1000))) {
        ++waited;
        for (;;) {  // until the pipeline calls back
          {
            absl::MutexLock lock(&mu);
            if (rooms >= waited) break;
          }
          absl::SleepFor(absl::Milliseconds(1));
        }
      }
    }
    absl::Notification done;
    absl::StatusOr<ArtifactInfo> result;
    (*pipeline)->Commit([&](absl::StatusOr<ArtifactInfo> info) {
      result = std::move(info);
      done.Notify();
    });
    done.WaitForNotification();
    return result;
  }

  ThreadPool io_{2};
  std::string root_;
  std::unique_ptr<ArtifactStore> store_;
};

TEST_F(ArtifactStoreTest, StoresVerifiedBytesOnceAndSurvivesReopen) {
  const std::string bytes = RandomBytes(123457, 1);
  auto info = Upload("acme", bytes);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->sha256, Sha256Hex(bytes));
  EXPECT_EQ(ReadWholeFile(store_->BlobPath(info->sha256)), bytes);
  EXPECT_EQ(store_->UsedBytes("acme"), bytes.size());
  // Again for the same tenant: already present. Another tenant: its own
  // record, one blob.
  auto again = Upload("acme", bytes);
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->already_present);
  auto other = Upload("globex", bytes);
  ASSERT_TRUE(other.ok());
  EXPECT_FALSE(other->already_present);
  EXPECT_EQ(store_->StoredBytes(), bytes.size());

  Reopen();
  EXPECT_TRUE(store_->Lookup("acme", info->sha256).ok());
  EXPECT_TRUE(store_->Lookup("globex", info->sha256).ok());
  EXPECT_EQ(store_->StoredBytes(), bytes.size());
  // Deleting one owner keeps the blob; deleting the last removes it.
  ASSERT_TRUE(store_->Delete("acme", info->sha256).ok());
  EXPECT_EQ(store_->Lookup("acme", info->sha256).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_TRUE(std::filesystem::exists(store_->BlobPath(info->sha256)));
  ASSERT_TRUE(store_->Delete("globex", info->sha256).ok());
  EXPECT_FALSE(std::filesystem::exists(store_->BlobPath(info->sha256)));
  EXPECT_EQ(store_->StoredBytes(), 0u);
}

TEST_F(ArtifactStoreTest, MismatchesAreDataLossAndLeaveNothing) {
  const std::string bytes = RandomBytes(5000, 2);
  auto wrong = Upload("acme", bytes, Sha256Hex("other"));
  EXPECT_EQ(wrong.status().code(), absl::StatusCode::kDataLoss);
  auto short_upload = Upload("acme", bytes, "", bytes.size() + 10);
  EXPECT_EQ(short_upload.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(short_upload.status().message()),
              HasSubstr("ended after 5000 of the declared 5010 bytes"));
  EXPECT_EQ(store_->StoredBytes(), 0u);
  EXPECT_EQ(store_->UsedBytes("acme"), 0u);
  EXPECT_EQ(store_->UploadsInProgress(), 0);
  io_.Wait();
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/tmp"));
}

TEST_F(ArtifactStoreTest, LimitsAreCheckedUpFront) {
  ArtifactStoreOptions options;
  options.max_upload_bytes = 10000;
  options.tenant_quota_bytes = 15000;
  options.max_concurrent_uploads = 1;
  Reopen(options);
  EXPECT_EQ(Upload("acme", RandomBytes(10001, 1)).status().code(),
            absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(Upload("acme", RandomBytes(9000, 1)).ok());
  auto over_quota = Upload("acme", RandomBytes(9000, 2));
  EXPECT_EQ(over_quota.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(over_quota.status().message()), HasSubstr("quota"));
  // The same bytes again cost nothing.
  EXPECT_TRUE(Upload("acme", RandomBytes(9000, 1)).ok());

  UploadDeclaration declaration{"x", ArtifactKind::kModel, 10, Sha256Hex("x")};
  auto open = store_->BeginUpload("acme", declaration, [] {});
  ASSERT_TRUE(open.ok());
  EXPECT_EQ(store_->BeginUpload("globex", declaration, [] {}).status().code(),
            absl::StatusCode::kResourceExhausted);
  absl::Notification aborted;
  (*open)->Abort([&] { aborted.Notify(); });
  aborted.WaitForNotification();
  open->reset();
  EXPECT_TRUE(store_->BeginUpload("globex", declaration, [] {}).ok());

  UploadDeclaration bad = declaration;
  bad.sha256 = "xyz";
  EXPECT_EQ(store_->BeginUpload("acme", bad, [] {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = declaration;
  bad.kind = ArtifactKind::kResult;
  EXPECT_EQ(store_->BeginUpload("acme", bad, [] {}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ArtifactStoreTest, ImportMovesAFileInAndOpenCleansLeftovers) {
  const std::string path = store_->NewTempPath();
  ::mergeguard::testing::WriteFile(path, "result bytes");
  auto info = store_->ImportFile("acme", path, "r", ArtifactKind::kResult);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_FALSE(std::filesystem::exists(path));
  EXPECT_EQ(info->kind, ArtifactKind::kResult);

  // A crash leaves a temp file, a work dir and an unowned blob.
  ::mergeguard::testing::WriteFile(root_ + "/tmp/upload-dead", "partial");
  std::filesystem::create_directories(root_ + "/work/j-1");
  const std::string orphan = store_->BlobPath(Sha256Hex("orphan"));
  std::filesystem::create_directories(orphan.substr(0, orphan.rfind('/')));
  ::mergeguard::testing::WriteFile(orphan, "orphan");
  Reopen();
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/tmp"));
  EXPECT_TRUE(std::filesystem::is_empty(root_ + "/work"));
  EXPECT_FALSE(std::filesystem::exists(orphan));
  EXPECT_TRUE(store_->Lookup("acme", info->sha256).ok());
}

TEST_F(ArtifactStoreTest, FreeDiskGuard) {
  ArtifactStoreOptions options;
  options.min_free_bytes = 0;
  Reopen(options);
  EXPECT_TRUE(store_->CheckFreeDisk(1, "x").ok());
  EXPECT_EQ(store_->CheckFreeDisk(~0ull / 2, "this upload").code(),
            absl::StatusCode::kResourceExhausted);
}

}  // namespace
}  // namespace mergeguard
