#include "core/lora.h"

#include <sys/stat.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "core/file_util.h"
#include "core/status_macros.h"
#include "core/strict_json.h"
#include "core/torch_status.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

using nlohmann::json;

constexpr char kPeftPrefix[] = "base_model.model.";

std::string JoinPath(const std::string& dir, absl::string_view name) {
  if (!dir.empty() && dir.back() == '/') return absl::StrCat(dir, name);
  return absl::StrCat(dir, "/", name);
}

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

absl::Status ConfigError(absl::string_view field, absl::string_view problem) {
  return absl::InvalidArgumentError(
      absl::StrCat(kAdapterConfigFileName, ": \"", field, "\" ", problem));
}

absl::StatusOr<LoraConfig> ParseLoraConfig(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  ASSIGN_OR_RETURN(json root, ParseStrictJson(text, path, "key"));
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": must be a JSON object"));
  }
  LoraConfig config;
  // Absent fields take PEFT's defaults, as PEFT itself does.
  if (auto it = root.find("peft_type"); it != root.end()) {
    if (!it->is_string() || it->get_ref<const std::string&>() != "LORA") {
      return ConfigError("peft_type", "must be \"LORA\"");
    }
  }
  if (auto it = root.find("r"); it != root.end()) {
    if (!it->is_number_unsigned() || it->get<uint64_t>() == 0 ||
        it->get<uint64_t>() > (1u << 30)) {
      return ConfigError(
          "r", absl::StrCat("must be a positive integer, got ", it->dump()));
    }
    config.r = static_cast<int64_t>(it->get<uint64_t>());
  }
  if (auto it = root.find("lora_alpha"); it != root.end()) {
    if (!it->is_number() || !std::isfinite(it->get<double>())) {
      return ConfigError("lora_alpha",
                         absl::StrCat("must be a number, got ", it->dump()));
    }
    config.lora_alpha = it->get<double>();
  }
  for (auto [field, target] :
       {std::make_pair("use_rslora", &config.use_rslora),
        std::make_pair("fan_in_fan_out", &config.fan_in_fan_out)}) {
    auto it = root.find(field);
    if (it == root.end() || it->is_null()) continue;
    if (!it->is_boolean()) {
      return ConfigError(
          field, absl::StrCat("must be true or false, got ", it->dump()));
    }
    *target = it->get<bool>();
  }
  // These change dW per module or its formula; ignoring them would silently
  // produce a wrong task vector.
  for (const char* field : {"rank_pattern", "alpha_pattern"}) {
    auto it = root.find(field);
    if (it != root.end() && !it->is_null() &&
        !(it->is_object() && it->empty())) {
      return ConfigError(field, "is not supported (per-module rank/alpha)");
    }
  }
  if (auto it = root.find("use_dora");
      it != root.end() && it->is_boolean() && it->get<bool>()) {
    return ConfigError("use_dora", "is not supported (DoRA is not plain LoRA)");
  }
  return config;
}

// SplitFactorName recognises PEFT factor names
// "<prefix><path>.lora_{A,B}[.<adapter>].weight" and returns the model key
// "<path>.weight" and whether it is the A factor.
bool SplitFactorName(absl::string_view name, std::string* key, bool* is_a) {
  absl::string_view rest = name;
  absl::ConsumePrefix(&rest, kPeftPrefix);
  if (!absl::ConsumeSuffix(&rest, ".weight")) return false;
  for (const char* factor : {".lora_A", ".lora_B"}) {
    size_t at = rest.rfind(factor);
    if (at == rest.npos || at == 0) continue;
    absl::string_view tail = rest.substr(at + std::strlen(factor));
    // Either nothing, or one adapter name such as ".default".
    if (!tail.empty() && (tail[0] != '.' || tail.size() == 1 ||
                          tail.substr(1).find('.') != tail.npos)) {
      continue;
    }
    *key = absl::StrCat(rest.substr(0, at), ".weight");
    *is_a = factor[6] == 'A';
    return true;
  }
  return false;
}

absl::StatusOr<torch::Tensor> FactorAsFloat(const Checkpoint& weights,
                                            const std::string& name) {
  ASSIGN_OR_RETURN(TensorRef ref, weights.Get(name));
  // Typed reads need aligned data; a file whose header length is not a
  // multiple of 8 is valid but leaves its tensors unaligned.
  std::vector<uint64_t> aligned;
  const void* src = ref.bytes.data();
  if (reinterpret_cast<uintptr_t>(src) % DTypeSize(ref.entry->dtype) != 0) {
    aligned.resize((ref.bytes.size() + 7) / 8);
    std::memcpy(aligned.data(), ref.bytes.data(), ref.bytes.size());
    src = aligned.data();
  }
  return CallTorch(
      absl::StrCat("load LoRA factor \"", name, "\""),
      [&]() -> absl::StatusOr<torch::Tensor> {
        torch::Tensor t = torch::empty(ref.entry->shape, torch::kFloat32);
        ConvertToFloat(ref.entry->dtype, src, static_cast<size_t>(t.numel()),
                       t.data_ptr<float>());
        return t;
      });
}

}  // namespace

double LoraConfig::Scale() const {
  const double rank = static_cast<double>(r);
  return use_rslora ? lora_alpha / std::sqrt(rank) : lora_alpha / rank;
}

bool IsLoraAdapterDir(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode) &&
         FileExists(JoinPath(path, kAdapterConfigFileName));
}

absl::StatusOr<std::unique_ptr<LoraAdapter>> LoraAdapter::Open(
    const std::string& dir) {
  std::unique_ptr<LoraAdapter> adapter(new LoraAdapter());
  ASSIGN_OR_RETURN(adapter->config_,
                   ParseLoraConfig(JoinPath(dir, kAdapterConfigFileName)));
  const std::string weights_path = JoinPath(dir, kAdapterWeightsFileName);
  const std::string pickle_path = JoinPath(dir, "adapter_model.bin");
  if (!FileExists(weights_path) && FileExists(pickle_path)) {
    return CheckNotPickle(pickle_path);
  }
  ASSIGN_OR_RETURN(adapter->weights_, Checkpoint::Open(weights_path));
  const Checkpoint& weights = *adapter->weights_;

  for (const std::string& name : weights.Names()) {
    std::string key;
    bool is_a = false;
    if (!SplitFactorName(name, &key, &is_a)) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", name,
          "\" is not a LoRA factor (expected "
          "base_model.model.<path>.lora_A.weight or .lora_B.weight); "
          "modules_to_save, embedding LoRA and bias tensors are not "
          "supported"));
    }
    std::string& slot =
        is_a ? adapter->factors_[key].first : adapter->factors_[key].second;
    if (!slot.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensors \"", slot, "\" and \"", name,
          "\" are both lora_", is_a ? "A" : "B", " of \"", key, "\""));
    }
    slot = name;
  }

  const int64_t r = adapter->config_.r;
  for (const auto& [key, factors] : adapter->factors_) {
    const auto& [a_name, b_name] = factors;
    if (a_name.empty() || b_name.empty()) {
      const std::string& present = a_name.empty() ? b_name : a_name;
      return absl::InvalidArgumentError(absl::StrCat(
          weights_path, ": tensor \"", present, "\" has no matching lora_",
          a_name.empty() ? "A" : "B", " for \"", key, "\""));
    }
    const TensorEntry* a = weights.Find(a_name);
    const TensorEntry* b = weights.Find(b_name);
    for (const TensorEntry* factor : {a, b}) {
      if (!IsFloatingPoint(factor->dtype) || factor->shape.size() < 2) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path, ": tensor \"", factor->name,
            "\" must be a floating-point tensor of rank >= 2, got ",
            DTypeName(factor->dtype), " ", ShapeString(factor->shape)));
      }
    }
    if (a->shape[0] != r) {
      return absl::FailedPreconditionError(absl::StrCat(
          "tensor \"", a_name, "\" has rank ", a->shape[0], " (shape ",
          ShapeString(a->shape), ") but adapter_config.json says r = ", r));
    }
    if (b->shape[1] != r) {
      return absl::FailedPreconditionError(absl::StrCat(
          "tensor \"", b_name, "\" has rank ", b->shape[1], " (shape ",
          ShapeString(b->shape), ") but adapter_config.json says r = ", r,
          " and lora_A is ", ShapeString(a->shape)));
    }
    // Conv lora_B is a 1x1 convolution: [out, r, 1, 1].
    for (size_t d = 2; d < b->shape.size(); ++d) {
      if (b->shape[d] != 1) {
        return absl::FailedPreconditionError(absl::StrCat(
            "tensor \"", b_name, "\" has shape ", ShapeString(b->shape),
            "; a conv lora_B must have 1x1 kernels"));
      }
    }
    adapter->keys_.push_back(key);
  }
  return adapter;
}

absl::StatusOr<torch::Tensor> LoraAdapter::DeltaWeight(
    const std::string& key, const std::vector<int64_t>& shape) const {
  auto it = factors_.find(key);
  if (it == factors_.end()) {
    return absl::NotFoundError(
        absl::StrCat("LoRA adapter has no factors for \"", key, "\""));
  }
  const auto& [a_name, b_name] = it->second;
  const TensorEntry* a = weights_->Find(a_name);
  const TensorEntry* b = weights_->Find(b_name);
  const int64_t out = b->shape[0];
  int64_t in = 1;
  for (size_t d = 1; d < a->shape.size(); ++d) in *= a->shape[d];

  // dW is [out, in] before any transpose, or [in, out] after it.
  auto mismatch = [&]() {
    return absl::FailedPreconditionError(absl::StrCat(
        "LoRA factors of \"", key, "\" (lora_A ", ShapeString(a->shape),
        ", lora_B ", ShapeString(b->shape),
        config_.fan_in_fan_out ? ", fan_in_fan_out" : "",
        ") do not fit the base tensor shape ", ShapeString(shape)));
  };
  if (shape.size() < 2) return mismatch();
  if (config_.fan_in_fan_out) {
    if (shape.size() != 2 || shape[0] != in || shape[1] != out) {
      return mismatch();
    }
  } else {
    int64_t tail = 1;
    for (size_t d = 1; d < shape.size(); ++d) tail *= shape[d];
    if (shape[0] != out || tail != in) return mismatch();
    // A conv lora_A carries the kernel shape; it must be the base's.
    if (a->shape.size() == shape.size()) {
      for (size_t d = 1; d < shape.size(); ++d) {
        if (a->shape[d] != shape[d]) return mismatch();
      }
    } else if (a->shape.size() != 2) {
      return mismatch();
    }
  }

  ASSIGN_OR_RETURN(torch::Tensor a_full, FactorAsFloat(*weights_, a_name));
  ASSIGN_OR_RETURN(torch::Tensor b_full, FactorAsFloat(*weights_, b_name));
  const int64_t r = config_.r;
  const double scale = config_.Scale();
  const bool transpose = config_.fan_in_fan_out;
  return CallTorch(absl::StrCat("LoRA delta for \"", key, "\""),
                   [&]() -> absl::StatusOr<torch::Tensor> {
                     torch::Tensor delta =
                         torch::matmul(b_full.reshape({out, r}),
                                       a_full.reshape({r, in}))
                             .mul_(scale);
                     if (transpose) delta = delta.t();
                     return delta.contiguous().reshape(shape);
                   });
}

}  // namespace mergeguard
