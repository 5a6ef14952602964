#include "bench/model_zoo.h"

#include <torch/torch.h>

#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;

TEST(ModelZooTest, CnnSizeAndShapes) {
  auto model = BuildArchitecture(Architecture::kCnn, 1);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_GE((*model)->NumParameters(), 100000);
  EXPECT_LE((*model)->NumParameters(), 500000);
  auto features = (*model)->Features(torch::rand({3, 1, 28, 28}));
  ASSERT_TRUE(features.ok()) << features.status();
  EXPECT_EQ(features->sizes(), (std::vector<int64_t>{3, 128}));
}

TEST(ModelZooTest, VitSizeAndShapes) {
  auto model = BuildArchitecture(Architecture::kVit, 1);
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_GE((*model)->NumParameters(), 500000);
  EXPECT_LE((*model)->NumParameters(), 1000000);
  int blocks = 0;
  bool has_stem = false;
  for (const ParameterInfo& info : (*model)->Parameters()) {
    if (info.name.find(".norm1.weight") != std::string::npos) ++blocks;
    has_stem |= info.name == "stem.weight";
  }
  EXPECT_GE(blocks, 4);  // pre-LayerNorm transformer blocks
  EXPECT_TRUE(has_stem);  // revision 2: the conv stem before the patchify
  auto features = (*model)->Features(torch::rand({2, 1, 28, 28}));
  ASSERT_TRUE(features.ok()) << features.status();
  EXPECT_EQ(features->sizes(), (std::vector<int64_t>{2, 128}));
}

TEST(ModelZooTest, SeededInitialization) {
  for (Architecture architecture : {Architecture::kCnn, Architecture::kVit}) {
    auto a = BuildArchitecture(architecture, 7);
    auto b = BuildArchitecture(architecture, 7);
    auto c = BuildArchitecture(architecture, 8);
    ASSERT_TRUE(a.ok() && b.ok() && c.ok());
    NamedTensors ta = (*a)->Backbone();
    NamedTensors tb = (*b)->Backbone();
    NamedTensors tc = (*c)->Backbone();
    bool any_different = false;
    for (size_t i = 0; i < ta.size(); ++i) {
      EXPECT_TRUE(torch::equal(ta[i].second, tb[i].second)) << ta[i].first;
      any_different |= !torch::equal(ta[i].second, tc[i].second);
    }
    EXPECT_TRUE(any_different);
  }
}

TEST(ModelZooTest, TorchScriptFileRoundTrip) {
  std::random_device random;
  for (Architecture architecture : {Architecture::kCnn, Architecture::kVit}) {
    auto model = BuildArchitecture(architecture, 3);
    ASSERT_TRUE(model.ok());
    const std::string path =
        (fs::temp_directory_path() /
         absl::StrCat("zoo_", random(), ArchitectureName(architecture), ".pt"))
            .string();
    ASSERT_TRUE((*model)->Save(path).ok());
    auto loaded = Model::Load(path);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    ASSERT_EQ((*loaded)->Parameters().size(), (*model)->Parameters().size());
    for (size_t i = 0; i < (*model)->Parameters().size(); ++i) {
      EXPECT_EQ((*loaded)->Parameters()[i].name,
                (*model)->Parameters()[i].name);
    }
    torch::Tensor x = torch::rand({4, 1, 28, 28});
    EXPECT_TRUE(torch::equal(*(*loaded)->Features(x), *(*model)->Features(x)));
    fs::remove(path);
  }
}

TEST(ModelZooTest, ParsesNames) {
  EXPECT_EQ(*ParseArchitecture("vit"), Architecture::kVit);
  EXPECT_EQ(ArchitectureName(Architecture::kCnn), "cnn");
  EXPECT_FALSE(ParseArchitecture("resnet").ok());
}

}  // namespace
}  // namespace mergeguard::bench
