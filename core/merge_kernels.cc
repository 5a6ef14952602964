#include "core/merge_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace mergeguard {
namespace merge_internal {
namespace {

// Decode / Encode convert storage to compute type, with a plain copy when
// they coincide.
template <typename T>
void Decode(DType dtype, const uint8_t* src, size_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (dtype == DType::kF32) {
      std::memcpy(dst, src, n * sizeof(float));
    } else {
      ConvertToFloat(dtype, src, n, dst);
    }
  } else {
    if (dtype == DType::kF64) {
      std::memcpy(dst, src, n * sizeof(double));
    } else {
      ConvertToDouble(dtype, src, n, dst);
    }
  }
}

template <typename T>
void Encode(const T* src, size_t n, DType dtype, uint8_t* dst) {
  if constexpr (std::is_same_v<T, float>) {
    if (dtype == DType::kF32) {
      std::memcpy(dst, src, n * sizeof(float));
    } else {
      ConvertFromFloat(src, n, dtype, dst);
    }
  } else {
    if (dtype == DType::kF64) {
      std::memcpy(dst, src, n * sizeof(double));
    } else {
      ConvertFromDouble(src, n, dtype, dst);
    }
  }
}

// View returns `m` values of storage type `dtype` at `src` in compute type
// T: the mapped bytes themselves when they already are aligned T, else
// decoded into `scratch`.
template <typename T>
const T* View(DType dtype, const uint8_t* src, size_t m, T* scratch) {
  constexpr DType kNative =
      std::is_same_v<T, float> ? DType::kF32 : DType::kF64;
  if (dtype == kNative && reinterpret_cast<uintptr_t>(src) % alignof(T) == 0) {
    return reinterpret_cast<const T*>(src);
  }
  Decode(dtype, src, m, scratch);
  return scratch;
}

// Dot returns sum_e a[e] b[e] in double over 8 interleaved partial sums:
// independent chains that vectorize, in an order fixed by `m` alone.
template <typename T>
double Dot(const T* __restrict a, const T* __restrict b, size_t m) {
  constexpr size_t kLanes = 8;
  double lanes[kLanes] = {};
  size_t e = 0;
  for (; e + kLanes <= m; e += kLanes) {
    for (size_t k = 0; k < kLanes; ++k) {
      lanes[k] += static_cast<double>(a[e + k]) * static_cast<double>(b[e + k]);
    }
  }
  for (; e < m; ++e) {
    lanes[0] += static_cast<double>(a[e]) * static_cast<double>(b[e]);
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

}  // namespace

uint64_t Fnv1a64(absl::string_view bytes) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (char c : bytes) {
    hash ^= static_cast<uint8_t>(c);
    hash *= 0x100000001b3ull;
  }
  return hash;
}

uint64_t DareStream(uint64_t seed, uint64_t task, absl::string_view name) {
  uint64_t state = SplitMix64(seed, 0);
  state = SplitMix64(state ^ task, 0);
  return SplitMix64(state ^ Fnv1a64(name), 0);
}

uint64_t DareDropBelow(double drop_rate) {
  // p in [0, 1), so p * 2^53 is exact and below 2^53.
  return static_cast<uint64_t>(std::ldexp(drop_rate, 53));
}

template <typename T>
ChunkKernels<T>::ChunkKernels(const MergeParams& params)
    : params_(params),
      base_(kBlockElements),
      acc_(kBlockElements),
      aux_(kBlockElements),
      sign_(kBlockElements),
      count_(kBlockElements),
      out_(kBlockElements),
      tau_(kBlockElements * std::max<size_t>(1, params.num_tasks)),
      keys_(kBlockElements) {
  task_scale_.resize(params.num_tasks);
  for (size_t t = 0; t < params.num_tasks; ++t) {
    double scale = params.weights[t];
    if (params.dare) scale *= params.dare_rescale;
    task_scale_[t] = static_cast<T>(scale);
  }
}

template <typename T>
void ChunkKernels<T>::LoadBase(const TensorState& s, int64_t begin, size_t m) {
  if (s.base == nullptr) {
    base_ptr_ = nullptr;
    return;
  }
  base_ptr_ =
      View(s.dtype, s.base + static_cast<size_t>(begin) * DTypeSize(s.dtype), m,
           base_.data());
}

template <typename T>
const T* ChunkKernels<T>::Input(const TensorState& s, size_t t, int64_t begin,
                                size_t m, T* scratch) {
  return View(s.dtype,
              s.full[t] + static_cast<size_t>(begin) * DTypeSize(s.dtype), m,
              scratch);
}

template <typename T>
void ChunkKernels<T>::LoadTau(const TensorState& s, size_t t, int64_t begin,
                              size_t m, T* dst) {
  if (s.full[t] != nullptr) {
    // `theta` is either the mapped input or `dst` itself.
    const T* theta = Input(s, t, begin, m, dst);
    const T* __restrict base = base_ptr_;
    for (size_t i = 0; i < m; ++i) dst[i] = theta[i] - base[i];
  } else if (s.delta[t] != nullptr) {
    const float* __restrict delta = s.delta[t] + begin;
    for (size_t i = 0; i < m; ++i) dst[i] = static_cast<T>(delta[i]);
  } else {
    std::fill(dst, dst + m, T(0));
  }
}

template <typename T>
void ChunkKernels<T>::DropDare(const TensorState& s, size_t t, int64_t begin,
                               size_t m, T* __restrict tau) const {
  const uint64_t stream = s.dare_stream[t];
  const uint64_t drop_below = params_.dare_drop_below;
  const uint64_t first = static_cast<uint64_t>(begin);
  for (size_t i = 0; i < m; ++i) {
    const bool keep = (SplitMix64(stream, first + i) >> 11) >= drop_below;
    tau[i] = keep ? tau[i] : T(0);
  }
}

// theta = theta0 + lambda * sum_t c_t tau_t, c_t = w_t (DARE: w_t / (1-p)).
template <typename T>
void ChunkKernels<T>::TaskArithmeticBlock(const TensorState& s, int64_t begin,
                                          size_t m) {
  LoadBase(s, begin, m);
  T* __restrict acc = acc_.data();
  T* __restrict tau = tau_.data();
  std::fill(acc, acc + m, T(0));
  for (size_t t = 0; t < params_.num_tasks; ++t) {
    const T c = task_scale_[t];
    if (s.full[t] != nullptr && !params_.dare) {
      // The hot path: one pass over the mapped input.
      const T* __restrict theta = Input(s, t, begin, m, tau);
      const T* __restrict base = base_ptr_;
      for (size_t i = 0; i < m; ++i) acc[i] += c * (theta[i] - base[i]);
      continue;
    }
    LoadTau(s, t, begin, m, tau);
    if (params_.dare) DropDare(s, t, begin, m, tau);
    for (size_t i = 0; i < m; ++i) acc[i] += c * tau[i];
  }
  const T lambda = static_cast<T>(params_.lambda);
  const T* __restrict base = base_ptr_;
  T* __restrict out = out_ptr_;
  for (size_t i = 0; i < m; ++i) out[i] = base[i] + lambda * acc[i];
}

// Trim, elect, disjoint merge (ALGORITHMS.md §1, TIES).
template <typename T>
void ChunkKernels<T>::TiesBlock(const TensorState& s, int64_t begin, size_t m,
                                TieCounts* ties) {
  LoadBase(s, begin, m);
  const size_t num_tasks = params_.num_tasks;
  T* __restrict sum = aux_.data();
  // Holds sum_t |tau_t| until the election overwrites it with the sign.
  T* __restrict sign = sign_.data();
  std::fill(sum, sum + m, T(0));
  std::fill(sign, sign + m, T(0));
  for (size_t t = 0; t < num_tasks; ++t) {
    T* __restrict tau = tau_.data() + t * kBlockElements;
    LoadTau(s, t, begin, m, tau);
    if (params_.dare) DropDare(s, t, begin, m, tau);
    const Key trim_min = static_cast<Key>(s.trim_min[t]);
    const T c = task_scale_[t];
    for (size_t i = 0; i < m; ++i) {
      tau[i] = AbsKey(tau[i]) >= trim_min ? c * tau[i] : T(0);
      sum[i] += tau[i];
      sign[i] += std::abs(tau[i]);
    }
  }
  // Elected sign; an exact zero sum with nonzero terms takes tie_sign.
  // Branch-free, with integer counters as wide as T, so it vectorizes.
  using Counter = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const T tie_sign = static_cast<T>(s.tie_sign);
  Counter positive = 0;
  Counter negative = 0;
  Counter ambiguous = 0;
  for (size_t i = 0; i < m; ++i) {
    const T v = sum[i];
    const T nonzero_terms = sign[i];
    positive += v > T(0) ? 1 : 0;
    negative += v < T(0) ? 1 : 0;
    ambiguous += (v == T(0)) & (nonzero_terms > T(0)) ? 1 : 0;
    const T elected = v > T(0) ? T(1) : T(-1);
    sign[i] = v == T(0) ? tie_sign : elected;
  }
  ties->positive += positive;
  ties->negative += negative;
  ties->ambiguous |= ambiguous > 0 && s.tie_sign == 0;

  T* __restrict acc = acc_.data();
  T* __restrict count = count_.data();
  std::fill(acc, acc + m, T(0));
  std::fill(count, count + m, T(0));
  for (size_t t = 0; t < num_tasks; ++t) {
    const T* __restrict tau = tau_.data() + t * kBlockElements;
    for (size_t i = 0; i < m; ++i) {
      const bool agree = tau[i] * sign[i] > T(0);
      acc[i] += agree ? tau[i] : T(0);
      count[i] += agree ? T(1) : T(0);
    }
  }
  const T lambda = static_cast<T>(params_.lambda);
  const T* __restrict base = base_ptr_;
  T* __restrict out = out_ptr_;
  if (params_.disjoint == DisjointMode::kMean) {
    // acc is 0 where count is 0, so dividing by max(count, 1) gives 0 there.
    for (size_t i = 0; i < m; ++i) {
      out[i] = base[i] + lambda * (acc[i] / std::max(count[i], T(1)));
    }
  } else {
    for (size_t i = 0; i < m; ++i) out[i] = base[i] + lambda * acc[i];
  }
}

// Keep band_lo <= |tau_t| <= band_hi per task, then task arithmetic.
template <typename T>
void ChunkKernels<T>::BreadcrumbsBlock(const TensorState& s, int64_t begin,
                                       size_t m) {
  LoadBase(s, begin, m);
  T* __restrict acc = acc_.data();
  T* __restrict tau = tau_.data();
  std::fill(acc, acc + m, T(0));
  for (size_t t = 0; t < params_.num_tasks; ++t) {
    LoadTau(s, t, begin, m, tau);
    const Key lo = static_cast<Key>(s.band_lo[t]);
    const Key hi = static_cast<Key>(s.band_hi[t]);
    const T c = task_scale_[t];
    for (size_t i = 0; i < m; ++i) {
      const Key key = AbsKey(tau[i]);
      acc[i] += (key >= lo && key <= hi) ? c * tau[i] : T(0);
    }
  }
  const T lambda = static_cast<T>(params_.lambda);
  const T* __restrict base = base_ptr_;
  T* __restrict out = out_ptr_;
  for (size_t i = 0; i < m; ++i) out[i] = base[i] + lambda * acc[i];
}

// TALL masks: m_t = |tau_t| >= lambda_t |tau_MTL - tau_t|; consensus where
// at least k masks agree; theta = theta0 + alpha * m * tau_MTL.
template <typename T>
void ChunkKernels<T>::ConsensusBlock(const TensorState& s, int64_t begin,
                                     size_t m) {
  LoadBase(s, begin, m);
  const size_t num_tasks = params_.num_tasks;
  T* __restrict mtl = acc_.data();
  std::fill(mtl, mtl + m, T(0));
  for (size_t t = 0; t < num_tasks; ++t) {
    T* __restrict tau = tau_.data() + t * kBlockElements;
    LoadTau(s, t, begin, m, tau);
    const T c = task_scale_[t];
    for (size_t i = 0; i < m; ++i) {
      tau[i] *= c;
      mtl[i] += tau[i];
    }
  }
  T* __restrict votes = aux_.data();
  std::fill(votes, votes + m, T(0));
  const T tall_lambda = static_cast<T>(params_.consensus.tall_lambda);
  for (size_t t = 0; t < num_tasks; ++t) {
    const T* __restrict tau = tau_.data() + t * kBlockElements;
    for (size_t i = 0; i < m; ++i) {
      votes[i] += std::abs(tau[i]) >= tall_lambda * std::abs(mtl[i] - tau[i])
                      ? T(1)
                      : T(0);
    }
  }
  const T min_votes = static_cast<T>(params_.consensus.min_agreeing);
  const T alpha = static_cast<T>(params_.consensus.alpha);
  const T* __restrict base = base_ptr_;
  T* __restrict out = out_ptr_;
  for (size_t i = 0; i < m; ++i) {
    const T v = mtl[i];
    out[i] = base[i] + alpha * (votes[i] >= min_votes ? v : T(0));
  }
}

// theta = t * mean(theta_t) + (1 - t) * theta0 = theta0 + t * mean(tau_t).
template <typename T>
void ChunkKernels<T>::ModelStockBlock(const TensorState& s, int64_t begin,
                                      size_t m) {
  LoadBase(s, begin, m);
  T* __restrict acc = acc_.data();
  T* __restrict tau = tau_.data();
  std::fill(acc, acc + m, T(0));
  for (size_t t = 0; t < params_.num_tasks; ++t) {
    LoadTau(s, t, begin, m, tau);
    for (size_t i = 0; i < m; ++i) acc[i] += tau[i];
  }
  const T ratio = static_cast<T>(s.model_stock_ratio);
  const T num_tasks = static_cast<T>(params_.num_tasks);
  const T* __restrict base = base_ptr_;
  T* __restrict out = out_ptr_;
  for (size_t i = 0; i < m; ++i)
    out[i] = base[i] + ratio * (acc[i] / num_tasks);
}

// theta = sum_t w_t theta_t / sum_t w_t; a LoRA input's theta_t is
// theta0 + dW.
template <typename T>
void ChunkKernels<T>::WeightedAverageBlock(const TensorState& s, int64_t begin,
                                           size_t m) {
  LoadBase(s, begin, m);
  T* __restrict acc = acc_.data();
  T* scratch = tau_.data();
  std::fill(acc, acc + m, T(0));
  for (size_t t = 0; t < params_.num_tasks; ++t) {
    const T* theta = scratch;
    if (s.full[t] != nullptr) {
      theta = Input(s, t, begin, m, scratch);
    } else {
      const T* __restrict base = base_ptr_;
      const float* __restrict delta =
          s.delta[t] != nullptr ? s.delta[t] + begin : nullptr;
      for (size_t i = 0; i < m; ++i) {
        scratch[i] =
            delta != nullptr ? base[i] + static_cast<T>(delta[i]) : base[i];
      }
    }
    const T c = task_scale_[t];
    for (size_t i = 0; i < m; ++i) acc[i] += c * theta[i];
  }
  const T weight_sum = static_cast<T>(params_.weight_sum);
  T* __restrict out = out_ptr_;
  for (size_t i = 0; i < m; ++i) out[i] = acc[i] / weight_sum;
}

template <typename T>
void ChunkKernels<T>::Merge(const TensorState& s, int64_t begin, size_t n,
                            uint8_t* out, TieCounts* ties) {
  const size_t out_size = DTypeSize(s.out_dtype);
  constexpr DType kNative =
      std::is_same_v<T, float> ? DType::kF32 : DType::kF64;
  for (size_t off = 0; off < n; off += kBlockElements) {
    const size_t m = std::min(kBlockElements, n - off);
    const int64_t b = begin + static_cast<int64_t>(off);
    // Write straight into `out` when it holds aligned T.
    uint8_t* dst = out + off * out_size;
    const bool direct = s.out_dtype == kNative &&
                        reinterpret_cast<uintptr_t>(dst) % alignof(T) == 0;
    out_ptr_ = direct ? reinterpret_cast<T*>(dst) : out_.data();
    switch (params_.method) {
      case MergeMethod::kTaskArithmetic:
        TaskArithmeticBlock(s, b, m);
        break;
      case MergeMethod::kTies:
        TiesBlock(s, b, m, ties);
        break;
      case MergeMethod::kDare:
        if (params_.ties) {
          TiesBlock(s, b, m, ties);
        } else {
          TaskArithmeticBlock(s, b, m);
        }
        break;
      case MergeMethod::kBreadcrumbs:
        BreadcrumbsBlock(s, b, m);
        break;
      case MergeMethod::kConsensus:
        ConsensusBlock(s, b, m);
        break;
      case MergeMethod::kModelStock:
        ModelStockBlock(s, b, m);
        break;
      case MergeMethod::kWeightedAverage:
        WeightedAverageBlock(s, b, m);
        break;
    }
    if (!direct) Encode(out_.data(), m, s.out_dtype, dst);
  }
}

template <typename T>
void ChunkKernels<T>::TaskKeys(const TensorState& s, size_t task, int64_t begin,
                               size_t n, Key* keys) {
  T* __restrict tau = tau_.data();
  for (size_t off = 0; off < n; off += kBlockElements) {
    const size_t m = std::min(kBlockElements, n - off);
    const int64_t b = begin + static_cast<int64_t>(off);
    LoadBase(s, b, m);
    LoadTau(s, task, b, m, tau);
    if (params_.dare) DropDare(s, task, b, m, tau);
    Key* __restrict dst = keys + off;
    for (size_t i = 0; i < m; ++i) dst[i] = AbsKey(tau[i]);
  }
}

template <typename T>
void ChunkKernels<T>::Histogram(const TensorState& s, int64_t begin, size_t n,
                                const std::vector<RadixSelect<Key>>& selects,
                                const std::vector<uint64_t*>& histograms) {
  T* __restrict tau = tau_.data();
  Key* __restrict keys = keys_.data();
  for (size_t off = 0; off < n; off += kBlockElements) {
    const size_t m = std::min(kBlockElements, n - off);
    const int64_t b = begin + static_cast<int64_t>(off);
    LoadBase(s, b, m);
    for (size_t t = 0; t < params_.num_tasks; ++t) {
      LoadTau(s, t, b, m, tau);
      if (params_.dare) DropDare(s, t, b, m, tau);
      for (size_t i = 0; i < m; ++i) keys[i] = AbsKey(tau[i]);
      selects[t].Count(keys, m, histograms[t]);
    }
  }
}

template <typename T>
void ChunkKernels<T>::Gram(const TensorState& s, int64_t begin, size_t n,
                           double* gram) {
  const size_t num_tasks = params_.num_tasks;
  for (size_t off = 0; off < n; off += kBlockElements) {
    const size_t m = std::min(kBlockElements, n - off);
    const int64_t b = begin + static_cast<int64_t>(off);
    LoadBase(s, b, m);
    for (size_t t = 0; t < num_tasks; ++t) {
      LoadTau(s, t, b, m, tau_.data() + t * kBlockElements);
    }
    for (size_t i = 0; i < num_tasks; ++i) {
      const T* __restrict tau_i = tau_.data() + i * kBlockElements;
      for (size_t j = i; j < num_tasks; ++j) {
        const T* __restrict tau_j = tau_.data() + j * kBlockElements;
        gram[i * num_tasks + j] += Dot(tau_i, tau_j, m);
      }
    }
  }
}

template <typename T>
void ChunkKernels<T>::Convert(DType src_dtype, const uint8_t* src, size_t n,
                              DType dst_dtype, uint8_t* dst) {
  const size_t src_size = DTypeSize(src_dtype);
  const size_t dst_size = DTypeSize(dst_dtype);
  for (size_t off = 0; off < n; off += kBlockElements) {
    const size_t m = std::min(kBlockElements, n - off);
    Decode(src_dtype, src + off * src_size, m, out_.data());
    Encode(out_.data(), m, dst_dtype, dst + off * dst_size);
  }
}

template class ChunkKernels<float>;
template class ChunkKernels<double>;

}  // namespace merge_internal
}  // namespace mergeguard
