#include "bench/idx.h"

#include <zlib.h>

#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/file_util.h"
#include "core/status_macros.h"

namespace mergeguard::bench {
namespace {

constexpr uint8_t kUnsignedByteType = 0x08;
// Generous bound on one dimension, to reject garbage before multiplying.
constexpr uint32_t kMaxDim = 1u << 28;

uint32_t ReadBigEndian32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
         (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

}  // namespace

absl::StatusOr<IdxArray> ParseIdx(absl::string_view bytes,
                                  absl::string_view what) {
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() < 4) {
    return absl::DataLossError(
        absl::StrCat(what, ": IDX file too short for its magic"));
  }
  if (data[0] != 0 || data[1] != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": bad IDX magic (first two bytes must be zero)"));
  }
  if (data[2] != kUnsignedByteType) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": IDX element type 0x", absl::Hex(data[2]),
                     " is not unsigned byte (0x08)"));
  }
  const size_t num_dims = data[3];
  if (num_dims == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": IDX file has no dimensions"));
  }
  const size_t header = 4 + 4 * num_dims;
  if (bytes.size() < header) {
    return absl::DataLossError(absl::StrCat(what, ": IDX header truncated"));
  }
  IdxArray array;
  uint64_t count = 1;
  for (size_t i = 0; i < num_dims; ++i) {
    const uint32_t dim = ReadBigEndian32(data + 4 + 4 * i);
    if (dim > kMaxDim) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": IDX dimension ", i, " is implausible: ", dim));
    }
    array.dims.push_back(dim);
    count *= dim;
    if (count > (uint64_t{1} << 34)) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": IDX array too large"));
    }
  }
  const uint64_t available = bytes.size() - header;
  if (available != count) {
    return absl::DataLossError(
        absl::StrCat(what, ": IDX dims [", absl::StrJoin(array.dims, ", "),
                     "] need ", count, " data bytes, found ", available,
                     available < count ? " (truncated)" : " (trailing bytes)"));
  }
  array.data.assign(data + header, data + header + count);
  return array;
}

absl::StatusOr<std::string> Gunzip(absl::string_view compressed,
                                   absl::string_view what) {
  z_stream stream{};
  // 16 + MAX_WBITS: expect a gzip wrapper.
  if (inflateInit2(&stream, 16 + MAX_WBITS) != Z_OK) {
    return absl::InternalError("zlib inflateInit2 failed");
  }
  std::string out;
  std::string buffer(1 << 20, '\0');
  stream.next_in =
      reinterpret_cast<Bytef*>(const_cast<char*>(compressed.data()));
  stream.avail_in = static_cast<uInt>(compressed.size());
  int result = Z_OK;
  while (result != Z_STREAM_END) {
    stream.next_out = reinterpret_cast<Bytef*>(buffer.data());
    stream.avail_out = static_cast<uInt>(buffer.size());
    result = inflate(&stream, Z_NO_FLUSH);
    if (result != Z_OK && result != Z_STREAM_END) {
      inflateEnd(&stream);
      return absl::DataLossError(
          absl::StrCat(what, ": corrupt gzip data (",
                       stream.msg != nullptr ? stream.msg : "zlib error", ")"));
    }
    out.append(buffer.data(), buffer.size() - stream.avail_out);
    if (result == Z_OK && stream.avail_in == 0 && stream.avail_out != 0) {
      inflateEnd(&stream);
      return absl::DataLossError(absl::StrCat(what, ": gzip stream truncated"));
    }
  }
  inflateEnd(&stream);
  return out;
}

absl::StatusOr<IdxArray> ReadIdxFile(
    const std::string& path, const std::vector<int64_t>& expected_dims) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
  const bool gzipped = bytes.size() >= 2 &&
                       static_cast<unsigned char>(bytes[0]) == 0x1f &&
                       static_cast<unsigned char>(bytes[1]) == 0x8b;
  if (gzipped) {
    ASSIGN_OR_RETURN(bytes, Gunzip(bytes, path));
  }
  ASSIGN_OR_RETURN(IdxArray array, ParseIdx(bytes, path));
  if (!expected_dims.empty()) {
    bool matches = expected_dims.size() == array.dims.size();
    for (size_t i = 0; matches && i < expected_dims.size(); ++i) {
      matches = expected_dims[i] < 0 || expected_dims[i] == array.dims[i];
    }
    if (!matches) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": IDX dims [", absl::StrJoin(array.dims, ", "),
          "], expected [", absl::StrJoin(expected_dims, ", "), "]"));
    }
  }
  return array;
}

}  // namespace mergeguard::bench
