#include "core/radix_select.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"

namespace mergeguard {

template <typename Key>
void RadixSelect<Key>::Count(const Key* keys, size_t n,
                             uint64_t* histogram) const {
  constexpr Key kMask = static_cast<Key>(kBins - 1);
  if (known_bits_ == 0) {
    constexpr int kShift = kKeyBits - kBitsPerPass;
    for (size_t i = 0; i < n; ++i) ++histogram[keys[i] >> kShift];
    return;
  }
  // known_bits_ < kKeyBits here, so both shifts are in range.
  const int prefix_shift = kKeyBits - known_bits_;
  const int bin_shift = prefix_shift - kBitsPerPass;
  for (size_t i = 0; i < n; ++i) {
    const Key key = keys[i];
    if ((key >> prefix_shift) == prefix_) {
      ++histogram[(key >> bin_shift) & kMask];
    }
  }
}

template <typename Key>
absl::Status RadixSelect<Key>::FinishPass(const uint64_t* histogram) {
  uint64_t above = 0;  // keys in higher bins
  for (size_t bin = kBins; bin-- > 0;) {
    if (above + histogram[bin] >= rank_) {
      rank_ -= above;
      prefix_ = static_cast<Key>((prefix_ << kBitsPerPass) | bin);
      known_bits_ += kBitsPerPass;
      return absl::OkStatus();
    }
    above += histogram[bin];
  }
  return absl::InternalError(absl::StrCat(
      "radix select: rank ", rank_, " exceeds the ", above, " keys counted"));
}

template class RadixSelect<uint32_t>;
template class RadixSelect<uint64_t>;

template <typename Key>
Key KthLargestKey(const Key* keys, size_t n, uint64_t rank) {
  RadixSelect<Key> select(rank);
  std::vector<uint64_t> histogram(RadixSelect<Key>::kBins);
  while (!select.done()) {
    std::fill(histogram.begin(), histogram.end(), 0);
    select.Count(keys, n, histogram.data());
    // Cannot fail: every pass counts the same keys.
    select.FinishPass(histogram.data()).IgnoreError();
  }
  return select.key();
}

template uint32_t KthLargestKey(const uint32_t*, size_t, uint64_t);
template uint64_t KthLargestKey(const uint64_t*, size_t, uint64_t);

}  // namespace mergeguard
