#include "core/dtype.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>

#include "absl/strings/str_cat.h"

namespace mergeguard {
namespace {

struct DTypeInfo {
  DType dtype;
  absl::string_view name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kF64, "F64", 8},   {DType::kF32, "F32", 4}, {DType::kF16, "F16", 2},
    {DType::kBF16, "BF16", 2}, {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},   {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};

const DTypeInfo& Info(DType dtype) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.dtype == dtype) return info;
  }
  return kDTypes[1];  // unreachable: the table covers the enum
}

// Safetensors data need not be aligned (a header length that is not a
// multiple of 8 shifts it), so loads go through memcpy, which compiles to a
// plain load on x86 and stays defined behaviour everywhere.
template <typename V>
inline V LoadUnaligned(const char* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Decode/Encode convert between a storage type and a compute type `T`.
template <typename T>
void Decode(DType dtype, const void* src, size_t n, T* dst) {
  switch (dtype) {
#define MG_DECODE(kind, ctype)                                              \
  case DType::kind: {                                                       \
    const char* s = static_cast<const char*>(src);                          \
    for (size_t i = 0; i < n; ++i) {                                        \
      dst[i] = static_cast<T>(LoadUnaligned<ctype>(s + i * sizeof(ctype))); \
    }                                                                       \
    return;                                                                 \
  }
    MG_DECODE(kF64, double)
    MG_DECODE(kF32, float)
    MG_DECODE(kI64, int64_t)
    MG_DECODE(kI32, int32_t)
    MG_DECODE(kI16, int16_t)
    MG_DECODE(kI8, int8_t)
    MG_DECODE(kU8, uint8_t)
#undef MG_DECODE
    case DType::kF16: {
      const char* s = static_cast<const char*>(src);
      for (size_t i = 0; i < n; ++i) {
        c10::Half h(LoadUnaligned<uint16_t>(s + 2 * i), c10::Half::from_bits());
        dst[i] = static_cast<T>(static_cast<float>(h));
      }
      return;
    }
    case DType::kBF16: {
      const char* s = static_cast<const char*>(src);
      for (size_t i = 0; i < n; ++i) {
        uint32_t bits =
            static_cast<uint32_t>(LoadUnaligned<uint16_t>(s + 2 * i)) << 16;
        float f;
        std::memcpy(&f, &bits, sizeof(f));
        dst[i] = static_cast<T>(f);
      }
      return;
    }
    case DType::kBool: {
      const uint8_t* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = s[i] != 0 ? T(1) : T(0);
      return;
    }
  }
}

template <typename T>
void Encode(const T* src, size_t n, DType dtype, void* dst) {
  switch (dtype) {
#define MG_ENCODE(kind, ctype)                                        \
  case DType::kind: {                                                 \
    ctype* d = static_cast<ctype*>(dst);                              \
    for (size_t i = 0; i < n; ++i) d[i] = static_cast<ctype>(src[i]); \
    return;                                                           \
  }
    MG_ENCODE(kF64, double)
    MG_ENCODE(kF32, float)
    MG_ENCODE(kI64, int64_t)
    MG_ENCODE(kI32, int32_t)
    MG_ENCODE(kI16, int16_t)
    MG_ENCODE(kI8, int8_t)
    MG_ENCODE(kU8, uint8_t)
#undef MG_ENCODE
    case DType::kF16: {
      c10::Half* d = static_cast<c10::Half*>(dst);
      for (size_t i = 0; i < n; ++i)
        d[i] = c10::Half(static_cast<float>(src[i]));
      return;
    }
    case DType::kBF16: {
      // c10::BFloat16's float constructor rounds to nearest even.
      c10::BFloat16* d = static_cast<c10::BFloat16*>(dst);
      for (size_t i = 0; i < n; ++i)
        d[i] = c10::BFloat16(static_cast<float>(src[i]));
      return;
    }
    case DType::kBool: {
      uint8_t* d = static_cast<uint8_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = src[i] != T(0) ? 1 : 0;
      return;
    }
  }
}

}  // namespace

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  for (const DTypeInfo& info : kDTypes) {
    if (info.name == name) return info.dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unsupported dtype \"", name,
                   "\" (expected F64, F32, F16, BF16, I64, I32, I16, I8, U8 or "
                   "BOOL)"));
}

absl::string_view DTypeName(DType dtype) { return Info(dtype).name; }
size_t DTypeSize(DType dtype) { return Info(dtype).size; }

bool IsFloatingPoint(DType dtype) {
  return dtype == DType::kF64 || dtype == DType::kF32 || dtype == DType::kF16 ||
         dtype == DType::kBF16;
}

void ConvertToFloat(DType dtype, const void* src, size_t count, float* dst) {
  Decode<float>(dtype, src, count, dst);
}
void ConvertToDouble(DType dtype, const void* src, size_t count, double* dst) {
  Decode<double>(dtype, src, count, dst);
}
void ConvertFromFloat(const float* src, size_t count, DType dtype, void* dst) {
  Encode<float>(src, count, dtype, dst);
}
void ConvertFromDouble(const double* src, size_t count, DType dtype,
                       void* dst) {
  Encode<double>(src, count, dtype, dst);
}

}  // namespace mergeguard
