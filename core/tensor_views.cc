#include "core/tensor_views.h"

#include <torch/torch.h>

#include <cstdint>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "core/torch_status.h"

namespace mergeguard {
namespace {

struct DTypePair {
  DType dtype;
  c10::ScalarType torch_type;
};

constexpr DTypePair kDTypePairs[] = {
    {DType::kF64, c10::ScalarType::Double},
    {DType::kF32, c10::ScalarType::Float},
    {DType::kF16, c10::ScalarType::Half},
    {DType::kBF16, c10::ScalarType::BFloat16},
    {DType::kI64, c10::ScalarType::Long},
    {DType::kI32, c10::ScalarType::Int},
    {DType::kI16, c10::ScalarType::Short},
    {DType::kI8, c10::ScalarType::Char},
    {DType::kU8, c10::ScalarType::Byte},
    {DType::kBool, c10::ScalarType::Bool},
};

// A torch bool must hold 0 or 1; anything else is undefined behaviour in
// kernels, so such bytes are refused rather than viewed.
absl::Status CheckBoolBytes(const TensorEntry& entry,
                            absl::Span<const uint8_t> bytes) {
  if (entry.dtype != DType::kBool) return absl::OkStatus();
  for (uint8_t b : bytes) {
    if (b > 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", entry.name, "\": BOOL data holds byte ",
                       static_cast<int>(b), " (only 0 and 1 are valid)"));
    }
  }
  return absl::OkStatus();
}

// CopyTensor returns an owned tensor holding `bytes`.
absl::StatusOr<torch::Tensor> CopyTensor(const TensorEntry& entry,
                                         absl::Span<const uint8_t> bytes) {
  RETURN_IF_ERROR(CheckBoolBytes(entry, bytes));
  ASSIGN_OR_RETURN(c10::ScalarType type, ToTorchDType(entry.dtype));
  return CallTorch(absl::StrCat("copy tensor \"", entry.name, "\""),
                   [&]() -> absl::StatusOr<torch::Tensor> {
                     torch::Tensor t = torch::empty(
                         entry.shape, torch::TensorOptions().dtype(type));
                     if (!bytes.empty()) {
                       std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
                     }
                     return t;
                   });
}

}  // namespace

absl::StatusOr<c10::ScalarType> ToTorchDType(DType dtype) {
  for (const DTypePair& pair : kDTypePairs) {
    if (pair.dtype == dtype) return pair.torch_type;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("no torch type for dtype ", DTypeName(dtype)));
}

absl::StatusOr<DType> FromTorchDType(c10::ScalarType type) {
  for (const DTypePair& pair : kDTypePairs) {
    if (pair.torch_type == type) return pair.dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("torch type ", c10::toString(type),
                   " cannot be stored in safetensors here (use F64, F32, F16, "
                   "BF16, I64, I32, I16, I8, U8 or BOOL)"));
}

absl::StatusOr<torch::Tensor> TensorView(
    std::shared_ptr<const SafetensorsFile> file, const std::string& name) {
  const TensorEntry* entry = file->layout().Find(name);
  if (entry == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("tensor \"", name, "\" not found in ", file->path()));
  }
  absl::Span<const uint8_t> bytes = file->Bytes(*entry);
  const size_t element_size = DTypeSize(entry->dtype);
  if (reinterpret_cast<uintptr_t>(bytes.data()) % element_size != 0) {
    return CopyTensor(*entry, bytes);
  }
  RETURN_IF_ERROR(CheckBoolBytes(*entry, bytes));
  ASSIGN_OR_RETURN(c10::ScalarType type, ToTorchDType(entry->dtype));
  return CallTorch(absl::StrCat("view tensor \"", name, "\""),
                   [&]() -> absl::StatusOr<torch::Tensor> {
                     // The deleter owns a reference to the file, so the mapping
                     // outlives every view of it. from_blob wants a mutable
                     // pointer; views are read-only by contract (and the pages
                     // are mapped PROT_READ).
                     return torch::from_blob(
                         const_cast<uint8_t*>(bytes.data()), entry->shape,
                         [file](void*) {}, torch::TensorOptions().dtype(type));
                   });
}

absl::StatusOr<NamedTensors> LoadTensors(const Checkpoint& checkpoint) {
  NamedTensors tensors;
  tensors.reserve(checkpoint.Names().size());
  for (const std::string& name : checkpoint.Names()) {
    ASSIGN_OR_RETURN(TensorRef ref, checkpoint.Get(name));
    ASSIGN_OR_RETURN(torch::Tensor tensor, CopyTensor(*ref.entry, ref.bytes));
    tensors.emplace_back(name, std::move(tensor));
  }
  return tensors;
}

absl::StatusOr<NamedTensors> LoadTensorsFromPath(const std::string& path) {
  ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint,
                   Checkpoint::Open(path));
  return LoadTensors(*checkpoint);
}

absl::Status SaveTensors(const std::string& path, const NamedTensors& tensors,
                         const std::map<std::string, std::string>& metadata,
                         const CheckpointWriterOptions& options) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    if (!tensor.defined()) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor \"", name, "\" is undefined"));
    }
    TensorSpec spec;
    spec.name = name;
    ASSIGN_OR_RETURN(spec.dtype, FromTorchDType(tensor.scalar_type()));
    spec.shape.assign(tensor.sizes().begin(), tensor.sizes().end());
    specs.push_back(std::move(spec));
  }
  ASSIGN_OR_RETURN(
      std::unique_ptr<CheckpointWriter> writer,
      CheckpointWriter::Create(path, std::move(specs), metadata, options));
  // One tensor at a time, so at most one CPU copy is alive.
  for (const auto& [name, tensor] : tensors) {
    ASSIGN_OR_RETURN(
        torch::Tensor cpu,
        CallTorch(absl::StrCat("move tensor \"", name, "\" to CPU"),
                  [&]() -> absl::StatusOr<torch::Tensor> {
                    return tensor.detach().to(torch::kCPU).contiguous();
                  }));
    absl::Span<const uint8_t> bytes(static_cast<const uint8_t*>(cpu.data_ptr()),
                                    cpu.nbytes());
    RETURN_IF_ERROR(writer->WriteTensor(name, bytes));
  }
  return writer->Commit();
}

}  // namespace mergeguard
