#include "bench/datasets.h"

#include <torch/torch.h>

#include "bench/glyphs.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mergeguard::bench {
namespace {

TEST(GlyphsTest, FindsFontsAndRendersCenteredGlyphs) {
  auto faces = DiscoverFonts(DataSources().font_dirs);
  ASSERT_TRUE(faces.ok()) << faces.status();
  ASSERT_FALSE(faces->empty());
  const FontFace* dejavu = nullptr;
  for (const FontFace& face : *faces) {
    if (face.family == "DejaVu Sans" && face.style == "Book") dejavu = &face;
    EXPECT_FALSE(face.group.empty());
  }
  ASSERT_NE(dejavu, nullptr) << "fonts-dejavu-core is not installed";
  auto glyphs = RenderGlyphs(*dejavu, Utf8ToUtf32("AIβЖ"));
  ASSERT_TRUE(glyphs.ok()) << glyphs.status();
  ASSERT_EQ(glyphs->sizes(), (std::vector<int64_t>{4, 28, 28}));
  for (int64_t i = 0; i < 4; ++i) {
    torch::Tensor image = (*glyphs)[i];
    // Ink inside the 20x20 box, none on the 4-pixel border.
    EXPECT_GT(image.sum().item<int64_t>(), 255 * 10);
    EXPECT_EQ(image.slice(0, 0, 3).sum().item<int64_t>(), 0);
    EXPECT_EQ(image.slice(1, 0, 3).sum().item<int64_t>(), 0);
  }
  // 'I' is narrow, 'A' is wide.
  EXPECT_LT((*glyphs)[1].sum().item<int64_t>(),
            (*glyphs)[0].sum().item<int64_t>());
  EXPECT_EQ(RenderGlyphs(*dejavu, Utf8ToUtf32("中")).status().code(),
            absl::StatusCode::kNotFound);
}

TEST(GlyphsTest, AugmentationIsSeeded) {
  torch::Tensor images = torch::zeros({4, 28, 28}, torch::kUInt8);
  images.slice(1, 8, 20).slice(2, 12, 16).fill_(255);
  torch::Tensor a = AugmentGlyphs(images, {}, 5);
  torch::Tensor b = AugmentGlyphs(images, {}, 5);
  torch::Tensor c = AugmentGlyphs(images, {}, 6);
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_FALSE(torch::equal(a, c));
  EXPECT_FALSE(torch::equal(a, images));
}

TEST(GlyphsTest, Utf8RoundTrip) {
  const std::u32string text = Utf8ToUtf32("Aβ€\U0001F600");
  ASSERT_EQ(text.size(), 4u);
  std::string back;
  for (char32_t c : text) back += CodePointToUtf8(c);
  EXPECT_EQ(back, "Aβ€\U0001F600");
}

TEST(DatasetsTest, CatalogueHasSixDistinctTasks) {
  const auto& catalogue = TaskCatalogue();
  ASSERT_GE(catalogue.size(), 6u);
  std::set<std::string> names;
  for (const TaskInfo& info : catalogue) {
    names.insert(info.name);
    EXPECT_EQ(info.classes.size(), 10u) << info.name;
    EXPECT_FALSE(info.description.empty());
  }
  EXPECT_EQ(names.size(), catalogue.size());
  EXPECT_FALSE(FindTaskInfo("cifar").ok());
}

// Reads the packaged MNIST and Fashion-MNIST (scripts/fetch-data installs
// them) and checks the splits never leak test data into training.
TEST(DatasetsTest, LoadsPackagedDataIntoDisjointSplits) {
  DataOptions options;
  options.tasks = {"mnist", "letters"};
  options.max_train_per_task = 300;
  options.max_test_per_task = 200;
  options.calibration_size = 32;
  options.glyph_train_renders = 1;
  options.glyph_test_renders = 1;
  options.glyph_pretrain_renders = 1;
  options.max_pretrain = 500;
  auto world = LoadWorld(DefaultDataSources(), options);
  ASSERT_TRUE(world.ok()) << world.status();
  ASSERT_EQ(world->tasks.size(), 2u);
  const TaskData& mnist = world->tasks[0];
  EXPECT_EQ(mnist.info.name, "mnist");
  EXPECT_EQ(mnist.train.size(), 300);
  EXPECT_EQ(mnist.test.size(), 200);
  EXPECT_EQ(mnist.calibration.size(), 32);
  EXPECT_EQ(mnist.train.images.sizes(), (std::vector<int64_t>{300, 28, 28}));
  EXPECT_LT(mnist.train.labels.max().item<int64_t>(), 10);
  EXPECT_EQ(world->pretrain.size(), 500);
  EXPECT_GT(world->pretrain_classes, 60);
  EXPECT_LT(world->pretrain.labels.max().item<int64_t>(),
            world->pretrain_classes);
  torch::Tensor inputs = mnist.train.Inputs({});
  EXPECT_EQ(inputs.sizes(), (std::vector<int64_t>{300, 1, 28, 28}));
  EXPECT_LE(inputs.max().item<float>(), 1.0f);
  EXPECT_GT(inputs.mean().item<float>(), 0.05f);
  EXPECT_EQ(world->tasks[1].info.name, "letters");
  EXPECT_GT(world->tasks[1].test.size(), 0);
}

TEST(DatasetsTest, MissingDataNamesTheInstallStep) {
  DataSources sources = DefaultDataSources();
  sources.mnist_dir = "/nonexistent";
  DataOptions options;
  options.tasks = {"mnist"};
  absl::Status status = LoadWorld(sources, options).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(status.message(), ::testing::HasSubstr("fetch-data"));
  DataOptions duplicate;
  duplicate.tasks = {"mnist", "mnist"};
  EXPECT_EQ(LoadWorld(DefaultDataSources(), duplicate).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mergeguard::bench
