#ifndef MERGEGUARD_BENCH_IDX_H_
#define MERGEGUARD_BENCH_IDX_H_

// IDX files (the MNIST format): big-endian magic 0x0000TTNN (TT the element
// type, NN the number of dimensions), NN big-endian uint32 sizes, then the
// data. Only unsigned-byte data (TT = 0x08) is used by the datasets here.

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mergeguard::bench {

// IdxArray is a decoded unsigned-byte IDX array.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;  // row-major, product(dims) bytes
};

// ParseIdx decodes `bytes` (uncompressed). INVALID_ARGUMENT on a bad magic,
// an element type other than unsigned byte, or zero dimensions; DATA_LOSS
// when the data is shorter or longer than the dimensions say. `what` names
// the source in messages.
absl::StatusOr<IdxArray> ParseIdx(absl::string_view bytes,
                                  absl::string_view what);

// ReadIdxFile reads `path`, gunzipping it first when it ends in `.gz` or
// starts with the gzip magic, and parses it. `expected_dims` (when not empty)
// must match exactly; -1 matches any size.
absl::StatusOr<IdxArray> ReadIdxFile(
    const std::string& path, const std::vector<int64_t>& expected_dims = {});

// Gunzip decompresses a whole gzip stream. DATA_LOSS when truncated or
// corrupt.
absl::StatusOr<std::string> Gunzip(absl::string_view compressed,
                                   absl::string_view what);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_IDX_H_
