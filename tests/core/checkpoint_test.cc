#include "core/checkpoint.h"

#include <dirent.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

class TempDir {
 public:
  TempDir() {
    std::string pattern = absl::StrCat(::testing::TempDir(), "/ckpt_XXXXXX");
    path_ = ::mkdtemp(pattern.data()) ? pattern : "";
  }
  ~TempDir() {
    std::string cmd = absl::StrCat("rm -rf '", path_, "'");
    if (!path_.empty()) {
      EXPECT_EQ(std::system(cmd.c_str()), 0);
    }
  }
  std::string File(const std::string& name) const {
    return absl::StrCat(path_, "/", name);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::vector<std::string> ListDir(const std::string& path) {
  std::vector<std::string> names;
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return names;
  while (dirent* e = ::readdir(dir)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void WriteString(const std::string& path, const std::string& contents) {
  std::ofstream(path, std::ios::binary) << contents;
}

absl::Span<const uint8_t> AsBytes(const std::string& s) {
  return absl::Span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()),
                                   s.size());
}

// Model is a set of tensors with distinct, recognisable bytes.
struct Model {
  std::vector<TensorSpec> specs;
  std::vector<std::string> data;
};

Model MakeModel(int count, int64_t floats_each) {
  Model model;
  for (int i = 0; i < count; ++i) {
    model.specs.push_back(
        {absl::StrCat("layers.", i, ".weight"), DType::kF32, {floats_each}});
    std::string bytes(floats_each * 4, '\0');
    for (size_t j = 0; j < bytes.size(); ++j)
      bytes[j] = static_cast<char>(i * 7 + j);
    model.data.push_back(bytes);
  }
  return model;
}

absl::StatusOr<std::string> Save(
    const std::string& path, const Model& model, uint64_t max_shard_bytes,
    const std::map<std::string, std::string>& metadata = {}) {
  CheckpointWriterOptions options;
  options.max_shard_bytes = max_shard_bytes;
  auto writer = CheckpointWriter::Create(path, model.specs, metadata, options);
  if (!writer.ok()) return writer.status();
  for (size_t i = 0; i < model.specs.size(); ++i) {
    absl::Status s =
        (*writer)->WriteTensor(model.specs[i].name, AsBytes(model.data[i]));
    if (!s.ok()) return s;
  }
  absl::Status s = (*writer)->Commit();
  if (!s.ok()) return s;
  return (*writer)->OutputPath();
}

void ExpectSameTensors(const Checkpoint& checkpoint, const Model& model) {
  ASSERT_EQ(checkpoint.Names().size(), model.specs.size());
  uint64_t total = 0;
  for (size_t i = 0; i < model.specs.size(); ++i) {
    auto ref = checkpoint.Get(model.specs[i].name);
    ASSERT_TRUE(ref.ok()) << ref.status();
    EXPECT_EQ(ref->entry->shape, model.specs[i].shape);
    EXPECT_EQ(std::string(ref->bytes.begin(), ref->bytes.end()), model.data[i]);
    total += model.data[i].size();
  }
  EXPECT_EQ(checkpoint.TotalBytes(), total);
}

// ---------------------------------------------------------------------------
// Sharded and single-file round trips

TEST(CheckpointTest, ShardedRoundTrip) {
  TempDir dir;
  Model model = MakeModel(7, 25);  // 100 bytes each
  const std::string out = dir.File("merged");
  auto index_path = Save(out, model, 250, {{"method", "ties"}});
  ASSERT_TRUE(index_path.ok()) << index_path.status();
  EXPECT_EQ(*index_path, absl::StrCat(out, "/", kShardIndexFileName));
  // Greedy packing: two 100-byte tensors per 250-byte shard.
  EXPECT_EQ(ListDir(out),
            (std::vector<std::string>{"model-00001-of-00004.safetensors",
                                      "model-00002-of-00004.safetensors",
                                      "model-00003-of-00004.safetensors",
                                      "model-00004-of-00004.safetensors",
                                      kShardIndexFileName}));
  json index = json::parse(ReadAll(*index_path));
  EXPECT_EQ(index["metadata"]["total_size"], 700);
  ASSERT_EQ(index["weight_map"].size(), 7u);
  EXPECT_EQ(index["weight_map"]["layers.0.weight"],
            "model-00001-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.2.weight"],
            "model-00002-of-00004.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.6.weight"],
            "model-00004-of-00004.safetensors");

  for (const std::string& open_path : {out, *index_path}) {
    auto checkpoint = Checkpoint::Open(open_path);
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    ExpectSameTensors(**checkpoint, model);
    EXPECT_EQ((*checkpoint)->Metadata().at("method"), "ties");
    // Releasing pages never invalidates the data.
    (*checkpoint)->ReleasePages("layers.3.weight");
    (*checkpoint)->ReleasePages("unknown");
    ExpectSameTensors(**checkpoint, model);
    auto missing = (*checkpoint)->Get("nope");
    EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(std::string(missing.status().message()),
                HasSubstr("tensor \"nope\""));
  }
}

TEST(CheckpointTest, OversizedTensorGetsItsOwnShard) {
  TempDir dir;
  Model model = MakeModel(3, 25);
  model.specs[1].shape = {100};
  model.data[1] = std::string(400, 'x');
  auto index_path = Save(dir.File("m"), model, 150);
  ASSERT_TRUE(index_path.ok()) << index_path.status();
  EXPECT_EQ(ListDir(dir.File("m")).size(), 4u);  // 3 shards + index
  auto checkpoint = Checkpoint::Open(*index_path);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  ExpectSameTensors(**checkpoint, model);
}

TEST(CheckpointTest, IndexIsWrittenLast) {
  TempDir dir;
  Model model = MakeModel(4, 25);
  CheckpointWriterOptions options;
  options.max_shard_bytes = 100;
  const std::string out = dir.File("m");
  {
    auto writer = CheckpointWriter::Create(out, model.specs, {}, options);
    ASSERT_TRUE(writer.ok());
    for (size_t i = 0; i < model.specs.size(); ++i) {
      ASSERT_TRUE((*writer)
                      ->WriteTensor(model.specs[i].name, AsBytes(model.data[i]))
                      .ok());
    }
    for (const std::string& name : ListDir(out)) {
      EXPECT_THAT(name, HasSubstr(".tmp-"));  // nothing under a final name
    }
    // Abandoned before Commit.
  }
  EXPECT_TRUE(ListDir(out).empty());
}

TEST(CheckpointTest, UnshardedWritesOneFile) {
  TempDir dir;
  Model model = MakeModel(3, 4);
  auto path = Save(dir.File(kSingleFileName), model, 0);
  ASSERT_TRUE(path.ok()) << path.status();
  EXPECT_EQ(*path, dir.File(kSingleFileName));
  EXPECT_EQ(ListDir(dir.path()), std::vector<std::string>{kSingleFileName});
  // A directory holding model.safetensors is detected.
  auto checkpoint = Checkpoint::Open(dir.path());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  ExpectSameTensors(**checkpoint, model);
  EXPECT_EQ((*checkpoint)->path(), dir.File(kSingleFileName));
}

TEST(CheckpointTest, OpensFileWithoutExtension) {
  TempDir dir;
  Model model = MakeModel(2, 4);
  // Content-addressed stores name files by digest.
  auto path = Save(dir.File("3b5d5c3712955042212316173ccf37be"), model, 0);
  ASSERT_TRUE(path.ok());
  auto checkpoint = Checkpoint::Open(*path);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  ExpectSameTensors(**checkpoint, model);
}

TEST(CheckpointTest, DirectoryDetectionErrors) {
  TempDir dir;
  auto empty = Checkpoint::Open(dir.path());
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kNotFound);

  Model model = MakeModel(2, 4);
  ASSERT_TRUE(Save(dir.File(kSingleFileName), model, 0).ok());
  WriteString(dir.File(kShardIndexFileName), "{}");
  auto both = Checkpoint::Open(dir.path());
  EXPECT_EQ(both.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(both.status().message()), HasSubstr("both"));
}

TEST(CheckpointWriterTest, RefusesDuplicateNames) {
  TempDir dir;
  std::vector<TensorSpec> specs = {{"a", DType::kU8, {1}},
                                   {"a", DType::kU8, {1}}};
  CheckpointWriterOptions options;
  options.max_shard_bytes = 1;  // would put them in different shards
  auto writer = CheckpointWriter::Create(dir.File("m"), specs, {}, options);
  EXPECT_EQ(writer.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(writer.status().message()), HasSubstr("\"a\""));
}

// ---------------------------------------------------------------------------
// Index consistency

class IndexTest : public ::testing::Test {
 protected:
  void SetUp() override {
    model_ = MakeModel(4, 25);
    auto index_path = Save(dir_.File("m"), model_, 200);  // 2 shards
    ASSERT_TRUE(index_path.ok()) << index_path.status();
    index_path_ = *index_path;
    index_ = json::parse(ReadAll(index_path_));
  }

  void ExpectRejected(const std::string& index_text, absl::StatusCode code,
                      const std::string& needle) {
    WriteString(index_path_, index_text);
    auto checkpoint = Checkpoint::Open(index_path_);
    ASSERT_FALSE(checkpoint.ok()) << index_text;
    EXPECT_EQ(checkpoint.status().code(), code) << checkpoint.status();
    EXPECT_THAT(std::string(checkpoint.status().message()), HasSubstr(needle));
  }

  static constexpr char kShard1[] = "model-00001-of-00002.safetensors";
  static constexpr char kShard2[] = "model-00002-of-00002.safetensors";
  TempDir dir_;
  Model model_;
  std::string index_path_;
  json index_;
};

TEST_F(IndexTest, AcceptsTheWrittenIndex) {
  ASSERT_TRUE(Checkpoint::Open(index_path_).ok());
  EXPECT_EQ(index_["weight_map"]["layers.3.weight"], kShard2);
}

TEST_F(IndexTest, RejectsTensorMappedToTheWrongShard) {
  index_["weight_map"]["layers.0.weight"] = kShard2;
  ExpectRejected(index_.dump(), absl::StatusCode::kInvalidArgument,
                 "tensor \"layers.0.weight\"");
}

TEST_F(IndexTest, RejectsMissingShard) {
  index_["weight_map"]["layers.0.weight"] = "model-00009-of-00009.safetensors";
  ExpectRejected(index_.dump(), absl::StatusCode::kNotFound,
                 "model-00009-of-00009.safetensors");
}

TEST_F(IndexTest, RejectsShardTensorAbsentFromIndex) {
  index_["weight_map"].erase("layers.1.weight");
  ExpectRejected(index_.dump(), absl::StatusCode::kInvalidArgument,
                 "tensor \"layers.1.weight\" is in shard");
}

TEST_F(IndexTest, RejectsIndexedTensorAbsentFromShard) {
  index_["weight_map"]["ghost.weight"] = kShard1;
  ExpectRejected(index_.dump(), absl::StatusCode::kInvalidArgument,
                 "tensor \"ghost.weight\" is mapped to shard");
}

TEST_F(IndexTest, RejectsTensorInTwoShards) {
  // A third shard that also holds layers.0.weight.
  auto writer = SafetensorsWriter::Create(
      dir_.File("m/extra.safetensors"), {{"layers.0.weight", DType::kU8, {1}}});
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->WriteTensor("layers.0.weight", AsBytes("x")).ok());
  ASSERT_TRUE((*writer)->Commit().ok());
  index_["weight_map"]["other"] = "extra.safetensors";
  ExpectRejected(index_.dump(), absl::StatusCode::kInvalidArgument,
                 "tensor \"layers.0.weight\" is in shard \"extra.safetensors\" "
                 "but the index maps it to");
}

TEST_F(IndexTest, RejectsDuplicateKeys) {
  std::string text = index_.dump();
  // Repeat the first weight_map entry, pointing at the other shard.
  text = absl::StrReplaceAll(
      text, {{"\"weight_map\":{",
              absl::StrCat("\"weight_map\":{\"layers.0.weight\":\"", kShard2,
                           "\",")}});
  ExpectRejected(text, absl::StatusCode::kInvalidArgument,
                 "duplicate key \"layers.0.weight\"");
}

TEST_F(IndexTest, RejectsShardOutsideTheDirectory) {
  index_["weight_map"]["layers.0.weight"] = "../m/" + std::string(kShard1);
  ExpectRejected(index_.dump(), absl::StatusCode::kInvalidArgument,
                 "must be a file name");
}

TEST_F(IndexTest, RejectsMalformedIndex) {
  ExpectRejected("not json", absl::StatusCode::kInvalidArgument,
                 "not valid JSON");
  ExpectRejected(R"({"metadata":{}})", absl::StatusCode::kInvalidArgument,
                 "\"weight_map\"");
  ExpectRejected(R"({"weight_map":{}})", absl::StatusCode::kInvalidArgument,
                 "lists no tensors");
  ExpectRejected(R"({"weight_map":{"a":3}})",
                 absl::StatusCode::kInvalidArgument, "tensor \"a\"");
  ExpectRejected(R"({"metadata":{"total_size":-1},"weight_map":{"a":"b"}})",
                 absl::StatusCode::kInvalidArgument, "total_size");
}

// ---------------------------------------------------------------------------
// Pickle refusal

void ExpectPickleRefused(const std::string& path) {
  absl::Status status = CheckNotPickle(path);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << path;
  EXPECT_THAT(std::string(status.message()), HasSubstr("arbitrary code"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("safetensors"));
  auto checkpoint = Checkpoint::Open(path);
  EXPECT_EQ(checkpoint.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(checkpoint.status().message()),
              HasSubstr("arbitrary code"));
}

TEST(PickleTest, RefusesByExtension) {
  TempDir dir;
  Model model = MakeModel(1, 2);
  for (const char* name : {"pytorch_model.bin", "model.pt", "model.PTH",
                           "last.ckpt", "state.pkl"}) {
    // Even valid safetensors bytes under a pickle name are refused: other
    // tools would unpickle that file.
    ASSERT_TRUE(Save(dir.File("tmp.safetensors"), model, 0).ok());
    ASSERT_EQ(
        ::rename(dir.File("tmp.safetensors").c_str(), dir.File(name).c_str()),
        0);
    ExpectPickleRefused(dir.File(name));
  }
}

TEST(PickleTest, RefusesByMagicBytes) {
  TempDir dir;
  for (int protocol = 2; protocol <= 5; ++protocol) {
    const std::string path =
        dir.File(absl::StrCat("p", protocol, ".safetensors"));
    std::string bytes = {'\x80', static_cast<char>(protocol),
                         '\x95', 'c',
                         'o',    'l',
                         'l',    'e',
                         'c',    't',
                         'i',    'o',
                         'n',    's'};
    WriteString(path, bytes);
    ExpectPickleRefused(path);
  }
  const std::string zip = dir.File("archive.safetensors");
  WriteString(zip, std::string("PK\x03\x04", 4) + std::string(26, '\0'));
  ExpectPickleRefused(zip);
  const std::string other = dir.File("protocol1.safetensors");
  WriteString(other, std::string("\x80\x01"
                                 "abcdefgh",
                                 10));
  EXPECT_TRUE(CheckNotPickle(other).ok());
}

TEST(PickleTest, RefusesDirectoryHoldingOnlyPickle) {
  TempDir dir;
  WriteString(dir.File("pytorch_model.bin"), "\x80\x02}q\x00.");
  auto checkpoint = Checkpoint::Open(dir.path());
  EXPECT_EQ(checkpoint.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(checkpoint.status().message()),
              HasSubstr("arbitrary code"));
}

TEST(PickleTest, AcceptsSafetensorsWhoseLengthLooksLikePickle) {
  // A 640-byte header starts the file with 0x80 0x02, like pickle protocol 2.
  TempDir dir;
  const std::string path = dir.File("x.safetensors");
  std::string name;
  for (int len = 1; len < 700; ++len) {
    auto writer = SafetensorsWriter::Create(
        path, {{std::string(len, 'n'), DType::kU8, {1}}});
    ASSERT_TRUE(writer.ok());
    if ((*writer)->layout().data_offset == 8 + 640) {
      name = std::string(len, 'n');
      ASSERT_TRUE((*writer)->WriteTensor(name, AsBytes("x")).ok());
      ASSERT_TRUE((*writer)->Commit().ok());
      break;
    }
  }
  ASSERT_FALSE(name.empty());
  std::string head = ReadAll(path).substr(0, 2);
  ASSERT_EQ(head, std::string("\x80\x02", 2));
  EXPECT_TRUE(CheckNotPickle(path).ok());
  auto checkpoint = Checkpoint::Open(path);
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_NE((*checkpoint)->Find(name), nullptr);
}

}  // namespace
}  // namespace mergeguard
