// libFuzzer entry point for the safetensors header parser. Besides the
// sanitizers, it checks that whatever the parser accepts really is a layout
// a reader can trust.
//
// Input format (so that edits inside the JSON keep the length prefix right):
//   byte 0 even: the rest is a whole file, parsed as is;
//   byte 0 odd:  byte 1 is the data size D, the bytes after it up to the last
//                D are the header, and the target prepends its length.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "absl/strings/string_view.h"
#include "core/safetensors.h"

namespace {

void Check(bool condition) {
  if (!condition) std::abort();
}

void CheckLayout(const mergeguard::SafetensorsLayout& layout, size_t size) {
  Check(layout.data_offset >= 8 && layout.data_offset <= size);
  const uint64_t data_size = size - layout.data_offset;
  uint64_t covered = 0;
  for (size_t i = 0; i < layout.tensors.size(); ++i) {
    const mergeguard::TensorEntry& entry = layout.tensors[i];
    Check(i == 0 || layout.tensors[i - 1].name < entry.name);
    Check(entry.data_begin <= entry.data_end && entry.data_end <= data_size);
    Check(entry.data_end - entry.data_begin == entry.ByteSize());
    Check(layout.Find(entry.name) == &entry);
    covered += entry.data_end - entry.data_begin;
  }
  // No holes and no overlaps: the tensors cover the data section exactly.
  Check(covered == data_size);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  absl::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  // An exact-size buffer, so that ASan sees any read past the end.
  std::unique_ptr<char[]> assembled;
  absl::string_view file = input;
  if ((data[0] & 1) == 1) {
    if (input.empty()) return 0;
    const size_t data_size =
        std::min<size_t>(static_cast<uint8_t>(input[0]), input.size() - 1);
    input.remove_prefix(1);
    const uint64_t header_size = input.size() - data_size;
    assembled.reset(new char[8 + input.size()]);
    for (int i = 0; i < 8; ++i) {
      assembled[i] = static_cast<char>(header_size >> (8 * i));
    }
    std::memcpy(assembled.get() + 8, input.data(), input.size());
    file = absl::string_view(assembled.get(), 8 + input.size());
  }
  absl::StatusOr<mergeguard::SafetensorsLayout> layout =
      mergeguard::ParseSafetensors(file);
  if (layout.ok()) {
    CheckLayout(*layout, file.size());
  } else {
    Check(!layout.status().message().empty());
  }
  return 0;
}
