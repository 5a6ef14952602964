#ifndef MERGEGUARD_CORE_LORA_H_
#define MERGEGUARD_CORE_LORA_H_

// PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors) read
// as task vectors: per target key, dW = (B A) * scale (ALGORITHMS.md §1).

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/checkpoint.h"
#include "core/torch_fwd.h"

namespace mergeguard {

inline constexpr char kAdapterConfigFileName[] = "adapter_config.json";
inline constexpr char kAdapterWeightsFileName[] = "adapter_model.safetensors";

// LoraConfig holds the fields of adapter_config.json that shape dW.
struct LoraConfig {
  // Rank of the factors; must match the tensors.
  int64_t r = 8;
  // Scaling numerator.
  double lora_alpha = 8.0;
  // When true the scale is lora_alpha / sqrt(r), else lora_alpha / r.
  bool use_rslora = false;
  // When true the layer stores W transposed (GPT-2 Conv1D), so dW is too.
  bool fan_in_fan_out = false;

  // Scale returns the multiplier applied to B A.
  double Scale() const;
};

// IsLoraAdapterDir returns true when `path` is a directory holding
// adapter_config.json.
bool IsLoraAdapterDir(const std::string& path);

// LoraAdapter is a loaded PEFT adapter. Thread-safe after Open.
class LoraAdapter {
 public:
  // Open reads `dir`/adapter_config.json and `dir`/adapter_model.safetensors
  // and checks that every lora_A has its lora_B with matching rank.
  static absl::StatusOr<std::unique_ptr<LoraAdapter>> Open(
      const std::string& dir);

  const LoraConfig& config() const { return config_; }
  // TargetKeys returns the model keys the adapter changes, e.g.
  // "blocks.0.attn.qkv.weight" for PEFT key
  // "base_model.model.blocks.0.attn.qkv.lora_A.weight". Sorted.
  const std::vector<std::string>& TargetKeys() const { return keys_; }
  // DeltaWeight returns dW for `key` as a float32 tensor of `shape` (the
  // base tensor's shape; conv weights are reshaped from 2-D), or NOT_FOUND.
  // FAILED_PRECONDITION when the factor shapes do not fit `shape`.
  absl::StatusOr<torch::Tensor> DeltaWeight(
      const std::string& key, const std::vector<int64_t>& shape) const;

 private:
  LoraAdapter() = default;

  LoraConfig config_;
  std::unique_ptr<Checkpoint> weights_;
  // model key -> (lora_A name, lora_B name)
  std::map<std::string, std::pair<std::string, std::string>> factors_;
  std::vector<std::string> keys_;
};

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_LORA_H_
