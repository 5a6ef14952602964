#ifndef MERGEGUARD_BENCH_GLYPHS_H_
#define MERGEGUARD_BENCH_GLYPHS_H_

// Glyph images rendered with FreeType from the system's font packages, for
// notMNIST-style tasks: one class per character, one sample per (typeface,
// character, augmentation). Typefaces are grouped into families so that a
// family's weights and widths land in one split only.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/torch_fwd.h"

namespace mergeguard::bench {

// FontFace is one scalable face with a Unicode character map.
struct FontFace {
  std::string path;
  int64_t face_index = 0;
  std::string family;  // FreeType family name
  std::string style;   // FreeType style name
  // Typeface group: the family without weight/width words ("Lato Black" ->
  // "lato"). Splits are made per group.
  std::string group;
};

// DiscoverFonts returns the usable faces under `dirs` (recursively: .ttf,
// .otf), sorted by path, skipping symbol, math and dingbat faces and exact
// (family, style) duplicates. FAILED_PRECONDITION when none is found.
absl::StatusOr<std::vector<FontFace>> DiscoverFonts(
    const std::vector<std::string>& dirs);

// FontSupportsAll returns true when `face` maps every code point of
// `characters` (UTF-32) to a real glyph.
absl::StatusOr<bool> FontSupportsAll(const FontFace& face,
                                     const std::u32string& characters);

// SupportedCharacters returns the subset of `characters` that `face` maps to
// real glyphs, in order.
absl::StatusOr<std::u32string> SupportedCharacters(
    const FontFace& face, const std::u32string& characters);

// RenderGlyphs renders each of `characters` in `face`, scaled (aspect kept)
// into a 20x20 box and centred on a 28x28 canvas, as MNIST digits are.
// Returns uint8 [len, 28, 28]. NOT_FOUND when a character has no glyph.
absl::StatusOr<torch::Tensor> RenderGlyphs(const FontFace& face,
                                           const std::u32string& characters);

// GlyphAugmentation bounds the random distortions of one rendered glyph.
struct GlyphAugmentation {
  double max_rotation_degrees = 12.0;
  double min_scale = 0.8;
  double max_scale = 1.15;
  double max_shear = 0.2;
  double max_shift_pixels = 2.5;
  // Probability of thickening strokes by a 2x2 max filter.
  double thicken_probability = 0.25;
};

// AugmentGlyphs applies one random affine distortion per image of `images`
// (uint8 [N, 28, 28]) drawn from `generator_seed`; returns uint8 [N, 28, 28].
torch::Tensor AugmentGlyphs(const torch::Tensor& images,
                            const GlyphAugmentation& augmentation,
                            uint64_t generator_seed);

// Utf8ToUtf32 decodes a UTF-8 string (the class lists are written in UTF-8).
std::u32string Utf8ToUtf32(const std::string& text);
// Utf32ToUtf8 encodes one code point.
std::string CodePointToUtf8(char32_t code_point);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_GLYPHS_H_
