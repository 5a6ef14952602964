#include "bench/glyphs.h"

#include <ft2build.h>
#include FT_FREETYPE_H
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "core/status_macros.h"
#include "core/torch_status.h"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kCanvas = 28;
constexpr int64_t kBox = 20;
constexpr int kRenderPixels = 64;

// FreeTypeFace owns a library and one face; FreeType objects are not shared
// across threads, so each caller gets its own.
class FreeTypeFace {
 public:
  ~FreeTypeFace() {
    if (face_ != nullptr) FT_Done_Face(face_);
    if (library_ != nullptr) FT_Done_FreeType(library_);
  }

  absl::Status Open(const std::string& path, int64_t index) {
    if (FT_Init_FreeType(&library_) != 0) {
      return absl::InternalError("FT_Init_FreeType failed");
    }
    if (FT_New_Face(library_, path.c_str(), static_cast<FT_Long>(index),
                    &face_) != 0) {
      face_ = nullptr;
      return absl::InvalidArgumentError(
          absl::StrCat("FreeType cannot open ", path));
    }
    if (FT_Select_Charmap(face_, FT_ENCODING_UNICODE) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, " has no Unicode character map"));
    }
    return absl::OkStatus();
  }

  FT_Face face() const { return face_; }

 private:
  FT_Library library_ = nullptr;
  FT_Face face_ = nullptr;
};

// Faces whose glyphs are not letters of a text typeface.
bool IsExcludedFamily(const std::string& family) {
  const std::string lower = absl::AsciiStrToLower(family);
  for (const char* word : {"symbol", "math", "dingbat", "d050000l", "nushu",
                           "keyboard", "initials", "emoji"}) {
    if (absl::StrContains(lower, word)) return true;
  }
  return false;
}

// GroupOf strips weight and width words so that "Lato Black" and "Open Sans
// Condensed Light" group with their regular faces.
std::string GroupOf(const std::string& family) {
  static const std::set<std::string>* const kStyleWords =
      new std::set<std::string>{
          "thin",   "hairline",  "light", "extralight", "medium",    "semibold",
          "bold",   "extrabold", "heavy", "black",      "condensed", "cn",
          "narrow", "display",   "08",    "12",         "o"};
  std::vector<std::string> kept;
  for (absl::string_view word :
       absl::StrSplit(absl::AsciiStrToLower(family), ' ', absl::SkipEmpty())) {
    if (kStyleWords->count(std::string(word)) == 0) {
      kept.emplace_back(word);
    }
  }
  return absl::StrJoin(kept, " ");
}

}  // namespace

std::u32string Utf8ToUtf32(const std::string& text) {
  std::u32string out;
  for (size_t i = 0; i < text.size();) {
    const auto byte = static_cast<unsigned char>(text[i]);
    char32_t code = 0;
    size_t length = 1;
    if (byte < 0x80) {
      code = byte;
    } else if ((byte >> 5) == 0x6) {
      code = byte & 0x1f;
      length = 2;
    } else if ((byte >> 4) == 0xe) {
      code = byte & 0x0f;
      length = 3;
    } else {
      code = byte & 0x07;
      length = 4;
    }
    for (size_t k = 1; k < length && i + k < text.size(); ++k) {
      code = (code << 6) | (static_cast<unsigned char>(text[i + k]) & 0x3f);
    }
    out.push_back(code);
    i += length;
  }
  return out;
}

std::string CodePointToUtf8(char32_t code) {
  std::string out;
  if (code < 0x80) {
    out.push_back(static_cast<char>(code));
  } else if (code < 0x800) {
    out.push_back(static_cast<char>(0xc0 | (code >> 6)));
    out.push_back(static_cast<char>(0x80 | (code & 0x3f)));
  } else if (code < 0x10000) {
    out.push_back(static_cast<char>(0xe0 | (code >> 12)));
    out.push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (code & 0x3f)));
  } else {
    out.push_back(static_cast<char>(0xf0 | (code >> 18)));
    out.push_back(static_cast<char>(0x80 | ((code >> 12) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3f)));
    out.push_back(static_cast<char>(0x80 | (code & 0x3f)));
  }
  return out;
}

absl::StatusOr<std::vector<FontFace>> DiscoverFonts(
    const std::vector<std::string>& dirs) {
  std::vector<std::string> paths;
  for (const std::string& dir : dirs) {
    std::error_code error;
    if (!fs::is_directory(dir, error)) continue;
    for (auto it = fs::recursive_directory_iterator(dir, error);
         !error && it != fs::recursive_directory_iterator();
         it.increment(error)) {
      if (!it->is_regular_file()) continue;
      const std::string extension =
          absl::AsciiStrToLower(it->path().extension().string());
      if (extension == ".ttf" || extension == ".otf") {
        paths.push_back(it->path().string());
      }
    }
  }
  std::sort(paths.begin(), paths.end());
  std::vector<FontFace> faces;
  std::set<std::pair<std::string, std::string>> seen;
  for (const std::string& path : paths) {
    FreeTypeFace face;
    if (!face.Open(path, 0).ok()) continue;
    FT_Face ft = face.face();
    if (!FT_IS_SCALABLE(ft) || ft->family_name == nullptr) continue;
    FontFace info;
    info.path = path;
    info.family = ft->family_name;
    info.style = ft->style_name != nullptr ? ft->style_name : "";
    if (IsExcludedFamily(info.family)) continue;
    if (!seen.insert({info.family, info.style}).second) continue;
    info.group = GroupOf(info.family);
    faces.push_back(std::move(info));
  }
  if (faces.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("no usable fonts under ", absl::StrJoin(dirs, ", "),
                     "; install the font packages (scripts/fetch-data)"));
  }
  return faces;
}

absl::StatusOr<bool> FontSupportsAll(const FontFace& face,
                                     const std::u32string& characters) {
  FreeTypeFace ft;
  RETURN_IF_ERROR(ft.Open(face.path, face.face_index));
  for (char32_t code : characters) {
    if (FT_Get_Char_Index(ft.face(), code) == 0) return false;
  }
  return true;
}

absl::StatusOr<std::u32string> SupportedCharacters(
    const FontFace& face, const std::u32string& characters) {
  FreeTypeFace ft;
  RETURN_IF_ERROR(ft.Open(face.path, face.face_index));
  std::u32string supported;
  for (char32_t code : characters) {
    if (FT_Get_Char_Index(ft.face(), code) != 0) supported.push_back(code);
  }
  return supported;
}

absl::StatusOr<torch::Tensor> RenderGlyphs(const FontFace& face,
                                           const std::u32string& characters) {
  FreeTypeFace ft;
  RETURN_IF_ERROR(ft.Open(face.path, face.face_index));
  if (FT_Set_Pixel_Sizes(ft.face(), 0, kRenderPixels) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(face.path, ": cannot set pixel size"));
  }
  torch::Tensor out =
      torch::zeros({static_cast<int64_t>(characters.size()), kCanvas, kCanvas},
                   torch::kUInt8);
  for (size_t i = 0; i < characters.size(); ++i) {
    const char32_t code = characters[i];
    if (FT_Get_Char_Index(ft.face(), code) == 0 ||
        FT_Load_Char(ft.face(), code, FT_LOAD_RENDER) != 0) {
      return absl::NotFoundError(
          absl::StrCat(face.path, " has no glyph for ", CodePointToUtf8(code)));
    }
    const FT_Bitmap& bitmap = ft.face()->glyph->bitmap;
    const int64_t rows = bitmap.rows;
    const int64_t width = bitmap.width;
    if (rows == 0 || width == 0 || bitmap.pixel_mode != FT_PIXEL_MODE_GRAY) {
      return absl::NotFoundError(
          absl::StrCat(face.path, ": empty glyph for ", CodePointToUtf8(code)));
    }
    torch::Tensor glyph = torch::empty({rows, width}, torch::kUInt8);
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(bitmap.buffer + r * bitmap.pitch, width,
                  glyph.data_ptr<uint8_t>() + r * width);
    }
    const double scale =
        static_cast<double>(kBox) / static_cast<double>(std::max(rows, width));
    const int64_t scaled_rows =
        std::max<int64_t>(1, std::lround(static_cast<double>(rows) * scale));
    const int64_t scaled_width =
        std::max<int64_t>(1, std::lround(static_cast<double>(width) * scale));
    torch::Tensor resized =
        torch::nn::functional::interpolate(
            glyph.to(torch::kFloat32).unsqueeze(0).unsqueeze(0),
            torch::nn::functional::InterpolateFuncOptions()
                .size(std::vector<int64_t>{scaled_rows, scaled_width})
                .mode(torch::kArea))
            .squeeze(0)
            .squeeze(0);
    const int64_t top = (kCanvas - scaled_rows) / 2;
    const int64_t left = (kCanvas - scaled_width) / 2;
    out[static_cast<int64_t>(i)]
        .slice(0, top, top + scaled_rows)
        .slice(1, left, left + scaled_width)
        .copy_(resized.round().clamp(0, 255).to(torch::kUInt8));
  }
  return out;
}

torch::Tensor AugmentGlyphs(const torch::Tensor& images,
                            const GlyphAugmentation& augmentation,
                            uint64_t generator_seed) {
  torch::NoGradGuard no_grad;
  const int64_t n = images.size(0);
  at::Generator generator =
      at::make_generator<at::CPUGeneratorImpl>(generator_seed);
  auto uniform = [&](double low, double high) {
    return torch::rand({n}, generator, torch::kFloat64) * (high - low) + low;
  };
  const double max_angle = augmentation.max_rotation_degrees * M_PI / 180.0;
  torch::Tensor angle = uniform(-max_angle, max_angle);
  torch::Tensor scale = uniform(augmentation.min_scale, augmentation.max_scale);
  torch::Tensor shear =
      uniform(-augmentation.max_shear, augmentation.max_shear);
  const double shift = augmentation.max_shift_pixels * 2.0 / kCanvas;
  torch::Tensor shift_x = uniform(-shift, shift);
  torch::Tensor shift_y = uniform(-shift, shift);
  torch::Tensor thicken = torch::rand({n}, generator, torch::kFloat64) <
                          augmentation.thicken_probability;
  // theta maps output to input coordinates: the inverse of scaling up.
  torch::Tensor cos = torch::cos(angle) / scale;
  torch::Tensor sin = torch::sin(angle) / scale;
  torch::Tensor theta =
      torch::stack({torch::stack({cos, -sin + shear, shift_x}, 1),
                    torch::stack({sin, cos, shift_y}, 1)},
                   1)
          .to(torch::kFloat32);
  torch::Tensor input = images.to(torch::kFloat32).unsqueeze(1) / 255.0;
  torch::Tensor grid = torch::nn::functional::affine_grid(
      theta, {n, 1, kCanvas, kCanvas}, /*align_corners=*/false);
  torch::Tensor warped = torch::nn::functional::grid_sample(
      input, grid,
      torch::nn::functional::GridSampleFuncOptions()
          .mode(torch::kBilinear)
          .padding_mode(torch::kZeros)
          .align_corners(false));
  torch::Tensor thick = torch::max_pool2d(
      torch::constant_pad_nd(warped, {0, 1, 0, 1}), {2, 2}, {1, 1});
  warped = torch::where(thicken.view({n, 1, 1, 1}), thick, warped);
  return (warped.squeeze(1) * 255.0).round().clamp(0, 255).to(torch::kUInt8);
}

}  // namespace mergeguard::bench
