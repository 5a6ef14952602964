#include "core/dtype.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gtest/gtest.h"

namespace mergeguard {
namespace {

const DType kAll[] = {DType::kF64, DType::kF32, DType::kF16, DType::kBF16,
                      DType::kI64, DType::kI32, DType::kI16, DType::kI8,
                      DType::kU8,  DType::kBool};

TEST(DTypeTest, NamesRoundTrip) {
  for (DType dtype : kAll) {
    auto parsed = ParseDType(DTypeName(dtype));
    ASSERT_TRUE(parsed.ok()) << DTypeName(dtype);
    EXPECT_EQ(*parsed, dtype);
  }
  EXPECT_EQ(ParseDType("F8_E5M2").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ParseDType("f32").ok());  // names are case-sensitive
}

TEST(DTypeTest, Sizes) {
  EXPECT_EQ(DTypeSize(DType::kF64), 8u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kI32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBool), 1u);
  EXPECT_TRUE(IsFloatingPoint(DType::kF16));
  EXPECT_FALSE(IsFloatingPoint(DType::kI64));
}

TEST(DTypeTest, BFloat16DecodesByShifting) {
  const uint16_t bits[] = {0x3f80, 0xc000, 0x7f80, 0x0001};
  float out[4];
  ConvertToFloat(DType::kBF16, bits, 4, out);
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_TRUE(std::isinf(out[2]));
  EXPECT_GT(out[3], 0.0f);  // subnormal, not flushed
}

TEST(DTypeTest, EncodingRoundsToNearestEven) {
  // 1 + 2^-8 lies halfway between two BF16 values: ties go to even (1.0).
  // 1 + 3*2^-8 lies halfway too: ties go to the even 1 + 2^-6.
  const float in[] = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256};
  uint16_t bits[2];
  ConvertFromFloat(in, 2, DType::kBF16, bits);
  EXPECT_EQ(bits[0], 0x3f80);
  EXPECT_EQ(bits[1], 0x3f82);
  // F16: 1 + 2^-11 is halfway between 1 and 1 + 2^-10.
  const float half_in[] = {1.0f + 1.0f / 2048, 65504.0f};
  uint16_t half[2];
  ConvertFromFloat(half_in, 2, DType::kF16, half);
  EXPECT_EQ(half[0], 0x3c00);
  EXPECT_EQ(half[1], 0x7bff);
}

TEST(DTypeTest, EveryTypeRoundTripsSmallIntegers) {
  const double values[] = {0, 1, 2, 7, 100};
  for (DType dtype : kAll) {
    if (dtype == DType::kBool) continue;
    std::vector<uint8_t> storage(DTypeSize(dtype) * 5);
    ConvertFromDouble(values, 5, dtype, storage.data());
    double back[5];
    ConvertToDouble(dtype, storage.data(), 5, back);
    for (int i = 0; i < 5; ++i)
      EXPECT_EQ(back[i], values[i]) << DTypeName(dtype);
  }
  const float flags[] = {0.0f, -3.0f, 0.5f};
  uint8_t bools[3];
  ConvertFromFloat(flags, 3, DType::kBool, bools);
  EXPECT_EQ(bools[0], 0);
  EXPECT_EQ(bools[1], 1);
  EXPECT_EQ(bools[2], 1);
}

}  // namespace
}  // namespace mergeguard
