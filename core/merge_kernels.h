#ifndef MERGEGUARD_CORE_MERGE_KERNELS_H_
#define MERGEGUARD_CORE_MERGE_KERNELS_H_

// Element-wise merge kernels over one range of one tensor, private to core/.
// Every method of ALGORITHMS.md §1 is element-wise once a few per-task,
// per-tensor scalars are known (trim thresholds, Breadcrumbs bands, Model
// Stock's ratio), so a range's output depends only on its elements: output is
// identical however a tensor is chunked or threaded. Ranges are processed in
// blocks of kBlockElements held in cache-resident scratch buffers. This file
// is LibTorch-free and compiled with -O3 so the loops vectorize.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"
#include "core/dtype.h"
#include "core/merge.h"
#include "core/radix_select.h"

namespace mergeguard {
namespace merge_internal {

inline constexpr size_t kBlockElements = 1024;

// DARE's counter-based RNG (docs/merges.md): entry `index` of task `task` in
// tensor `name` draws r = SplitMix64(DareStream(seed, task, name), index) and
// is dropped iff (r >> 11) < DareDropBelow(p), i.e. u = (r >> 11) / 2^53 < p.
// The draw depends on nothing else, so it is the same for any chunking or
// thread count.
inline constexpr uint64_t kGoldenGamma = 0x9e3779b97f4a7c15ull;

// SplitMix64Finalize is splitmix64's output function (Steele et al. 2014).
inline uint64_t SplitMix64Finalize(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
// SplitMix64 returns output number `index` (0-based) of a splitmix64
// generator whose state starts at `state`.
inline uint64_t SplitMix64(uint64_t state, uint64_t index) {
  return SplitMix64Finalize(state + (index + 1) * kGoldenGamma);
}
// Fnv1a64 is the 64-bit FNV-1a hash of `bytes`.
uint64_t Fnv1a64(absl::string_view bytes);
// DareStream returns the RNG state for (seed, task, tensor name):
// SplitMix64(SplitMix64(SplitMix64(seed, 0) ^ task, 0) ^ Fnv1a64(name), 0).
uint64_t DareStream(uint64_t seed, uint64_t task, absl::string_view name);
// DareDropBelow returns floor(p * 2^53).
uint64_t DareDropBelow(double drop_rate);

// MergeParams holds the method-wide constants of one merge.
struct MergeParams {
  MergeMethod method = MergeMethod::kTaskArithmetic;
  size_t num_tasks = 0;
  // Resolved lambda (TA, TIES, DARE, Breadcrumbs).
  double lambda = 0.0;
  // w_t per task.
  std::vector<double> weights;
  // DARE: drop threshold (see DareDropBelow) and survivor scale 1/(1-p).
  bool dare = false;
  uint64_t dare_drop_below = 0;
  double dare_rescale = 1.0;
  // TIES combine (method TIES, or DARE with combine=ties).
  bool ties = false;
  DisjointMode disjoint = DisjointMode::kMean;
  ConsensusOptions consensus;
  // Weighted average: sum of the weights.
  double weight_sum = 1.0;
};

// TensorState is one merged tensor: where its elements come from and its
// per-tensor statistics. Pointers refer to mapped checkpoint bytes or to
// LoRA dW buffers owned by the caller.
struct TensorState {
  std::string name;
  int64_t numel = 0;
  // Storage type of the base and the full inputs, and of the output.
  DType dtype = DType::kF32;
  DType out_dtype = DType::kF32;
  // Base bytes; nullptr when the method does not read the base.
  const uint8_t* base = nullptr;
  // Per task: the full checkpoint's bytes, or nullptr for a LoRA input.
  std::vector<const uint8_t*> full;
  // Per task: a LoRA input's dW (float32, numel values), or nullptr when the
  // adapter leaves this tensor alone (tau = 0).
  std::vector<const float*> delta;
  // DARE: per-task RNG streams.
  std::vector<uint64_t> dare_stream;
  // TIES: per task, keep entries with AbsKey(tau) >= trim_min.
  std::vector<uint64_t> trim_min;
  // Breadcrumbs: per task, keep entries with band_lo <= AbsKey(tau) <=
  // band_hi.
  std::vector<uint64_t> band_lo;
  std::vector<uint64_t> band_hi;
  // Model Stock's interpolation ratio t for this tensor.
  double model_stock_ratio = 0.0;
  // TIES: the sign elected where the signed sum is exactly zero (the
  // tensor's majority elected sign); 0 while unknown.
  int tie_sign = 0;
};

// TieCounts tallies TIES's elected signs over a range.
struct TieCounts {
  int64_t positive = 0;
  int64_t negative = 0;
  // Some entry had a zero signed sum with nonzero terms while tie_sign was
  // unknown: the range's output is not final and must be recomputed.
  bool ambiguous = false;
};

// ChunkKernels<T> runs the kernels in compute type T (float or double). It
// owns per-thread scratch: use one instance per worker thread.
template <typename T>
class ChunkKernels {
 public:
  using Key = KeyFor<T>;

  explicit ChunkKernels(const MergeParams& params);

  // Merge writes merged elements [begin, begin + n) of `s`, encoded as
  // s.out_dtype, to `out`. For TIES it adds the elected signs to `ties`.
  void Merge(const TensorState& s, int64_t begin, size_t n, uint8_t* out,
             TieCounts* ties);

  // TaskKeys writes AbsKey of task `task`'s trimming input (tau, with DARE's
  // drops applied but not its rescale) for elements [begin, begin + n).
  void TaskKeys(const TensorState& s, size_t task, int64_t begin, size_t n,
                Key* keys);

  // Histogram counts TaskKeys of every task into histograms[task] (kBins
  // counters each) through selects[task].
  void Histogram(const TensorState& s, int64_t begin, size_t n,
                 const std::vector<RadixSelect<Key>>& selects,
                 const std::vector<uint64_t*>& histograms);

  // Gram adds the dot products <tau_i, tau_j>, i <= j, over elements
  // [begin, begin + n) to gram[i * num_tasks + j], in double.
  void Gram(const TensorState& s, int64_t begin, size_t n, double* gram);

  // Convert re-encodes `n` elements from `src_dtype` to `dst_dtype` through T.
  void Convert(DType src_dtype, const uint8_t* src, size_t n, DType dst_dtype,
               uint8_t* dst);

 private:
  // LoadBase points base_ptr_ at the base's block: the mapped bytes when
  // they are aligned T, else decoded into base_.
  void LoadBase(const TensorState& s, int64_t begin, size_t m);
  // Input returns full input t's block, mapped or decoded into `scratch`.
  const T* Input(const TensorState& s, size_t t, int64_t begin, size_t m,
                 T* scratch);
  // LoadTau writes task t's tau for the block into `dst` (needs LoadBase).
  void LoadTau(const TensorState& s, size_t t, int64_t begin, size_t m, T* dst);
  // DropDare zeroes the entries DARE drops.
  void DropDare(const TensorState& s, size_t t, int64_t begin, size_t m,
                T* tau) const;

  void TaskArithmeticBlock(const TensorState& s, int64_t begin, size_t m);
  void TiesBlock(const TensorState& s, int64_t begin, size_t m,
                 TieCounts* ties);
  void BreadcrumbsBlock(const TensorState& s, int64_t begin, size_t m);
  void ConsensusBlock(const TensorState& s, int64_t begin, size_t m);
  void ModelStockBlock(const TensorState& s, int64_t begin, size_t m);
  void WeightedAverageBlock(const TensorState& s, int64_t begin, size_t m);

  const MergeParams& params_;
  // Per-task coefficient on tau: w_t, times 1/(1-p) for DARE.
  std::vector<T> task_scale_;
  // Scratch, kBlockElements each (tau_: num_tasks blocks).
  std::vector<T> base_;
  std::vector<T> acc_;
  std::vector<T> aux_;
  std::vector<T> sign_;
  std::vector<T> count_;
  std::vector<T> out_;
  std::vector<T> tau_;
  std::vector<Key> keys_;
  // The current block's base (mapped, or base_) and output (the caller's
  // buffer, or out_).
  const T* base_ptr_ = nullptr;
  T* out_ptr_ = nullptr;
};

extern template class ChunkKernels<float>;
extern template class ChunkKernels<double>;

}  // namespace merge_internal
}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_MERGE_KERNELS_H_
