#ifndef MERGEGUARD_CORE_TENSOR_VIEWS_H_
#define MERGEGUARD_CORE_TENSOR_VIEWS_H_

// Bridges between safetensors storage and torch::Tensor.

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/checkpoint.h"
#include "core/safetensors.h"
#include "core/torch_fwd.h"

namespace mergeguard {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// ToTorchDType / FromTorchDType map between storage and torch types.
absl::StatusOr<c10::ScalarType> ToTorchDType(DType dtype);
absl::StatusOr<DType> FromTorchDType(c10::ScalarType type);

// TensorView returns a zero-copy CPU tensor over tensor `name` of `file`; the
// tensor keeps the mapping alive. The view is read-only by contract: never
// write into it. Falls back to a copy when the data is misaligned.
absl::StatusOr<torch::Tensor> TensorView(
    std::shared_ptr<const SafetensorsFile> file, const std::string& name);

// LoadTensors returns copies of every tensor of `checkpoint` (any layout).
absl::StatusOr<NamedTensors> LoadTensors(const Checkpoint& checkpoint);
// LoadTensorsFromPath opens `path` with Checkpoint::Open and loads it.
absl::StatusOr<NamedTensors> LoadTensorsFromPath(const std::string& path);

// SaveTensors writes `tensors` (moved to CPU, made contiguous) atomically to
// `path`, sharded when `options.max_shard_bytes` > 0.
absl::Status SaveTensors(
    const std::string& path, const NamedTensors& tensors,
    const std::map<std::string, std::string>& metadata = {},
    const CheckpointWriterOptions& options = {});

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_TENSOR_VIEWS_H_
