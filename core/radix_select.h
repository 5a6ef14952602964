#ifndef MERGEGUARD_CORE_RADIX_SELECT_H_
#define MERGEGUARD_CORE_RADIX_SELECT_H_

// Exact order statistics of |x| over data too large to hold: non-negative
// IEEE floats order like their bit patterns read as unsigned integers, so a
// k-th largest |x| is a k-th largest unsigned key, which a radix select finds
// in a few streaming passes with one histogram of memory. Private to core/.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "absl/status/status.h"

namespace mergeguard {

// AbsKey returns the bit pattern of |x|. For non-negative values (NaN sorts
// above +inf) the keys order like the values.
inline uint32_t AbsKey(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & 0x7fffffffu;
}
inline uint64_t AbsKey(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & 0x7fffffffffffffffull;
}

// KeyFor<T> is the type AbsKey returns for a T.
template <typename T>
using KeyFor =
    std::conditional_t<std::is_same_v<T, double>, uint64_t, uint32_t>;

// RadixSelect finds the key of rank `rank` (1 = largest) in a multiset of
// unsigned keys that is streamed once per pass. Each pass histograms the next
// 16 bits of the keys that share the prefix selected so far: 2 passes for
// 32-bit keys, 4 for 64-bit keys. Count() is const, so several threads may
// count into their own histograms, which are summed for FinishPass().
template <typename Key>
class RadixSelect {
 public:
  static constexpr int kBitsPerPass = 16;
  static constexpr size_t kBins = size_t{1} << kBitsPerPass;
  static constexpr int kKeyBits = static_cast<int>(sizeof(Key) * 8);
  static constexpr int kPasses = kKeyBits / kBitsPerPass;

  // `rank` must be in [1, number of keys].
  explicit RadixSelect(uint64_t rank) : rank_(rank) {}

  // done returns true once every bit of the key is known.
  bool done() const { return known_bits_ == kKeyBits; }
  // key returns the selected key; valid once done().
  Key key() const { return prefix_; }

  // Count adds the `n` keys that match the prefix selected so far to
  // `histogram` (kBins counters), binned by their next 16 bits.
  void Count(const Key* keys, size_t n, uint64_t* histogram) const;

  // FinishPass consumes the histogram of one complete pass over all keys and
  // fixes 16 more bits. INTERNAL when the rank exceeds the keys counted (the
  // passes did not see the same keys).
  absl::Status FinishPass(const uint64_t* histogram);

 private:
  // Remaining rank within the keys sharing prefix_.
  uint64_t rank_;
  // The known high bits, right-aligned.
  Key prefix_ = 0;
  int known_bits_ = 0;
};

extern template class RadixSelect<uint32_t>;
extern template class RadixSelect<uint64_t>;

// KthLargestKey returns the key of rank `rank` (1 = largest, in [1, n]) of
// the `n` keys at `keys`, by a radix select over them in memory: sequential
// scans, several times faster than std::nth_element on large tensors.
template <typename Key>
Key KthLargestKey(const Key* keys, size_t n, uint64_t rank);

extern template uint32_t KthLargestKey(const uint32_t*, size_t, uint64_t);
extern template uint64_t KthLargestKey(const uint64_t*, size_t, uint64_t);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_RADIX_SELECT_H_
