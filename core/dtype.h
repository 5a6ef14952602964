#ifndef MERGEGUARD_CORE_DTYPE_H_
#define MERGEGUARD_CORE_DTYPE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace mergeguard {

// DType is a safetensors storage type. Names follow the safetensors spec.
enum class DType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// ParseDType returns the DType for a safetensors name such as "F32", or
// INVALID_ARGUMENT for an unsupported one.
absl::StatusOr<DType> ParseDType(absl::string_view name);

// DTypeName returns the safetensors name of `dtype`, e.g. "BF16".
absl::string_view DTypeName(DType dtype);

// DTypeSize returns the size in bytes of one element of `dtype`.
size_t DTypeSize(DType dtype);

// IsFloatingPoint returns true for F64, F32, F16 and BF16.
bool IsFloatingPoint(DType dtype);

// ConvertToFloat decodes `count` elements of `dtype` starting at `src` into
// `dst`. Floating types decode exactly; integers convert by value.
void ConvertToFloat(DType dtype, const void* src, size_t count, float* dst);
void ConvertToDouble(DType dtype, const void* src, size_t count, double* dst);

// ConvertFromFloat encodes `count` values into `dtype` at `dst`, rounding to
// nearest even for F16/BF16 (as torch does).
void ConvertFromFloat(const float* src, size_t count, DType dtype, void* dst);
void ConvertFromDouble(const double* src, size_t count, DType dtype, void* dst);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_DTYPE_H_
