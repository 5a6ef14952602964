#include "core/model.h"

#include <torch/script.h>
#include <torch/torch.h>

#include <cstdio>
#include <filesystem>
#include <map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "core/status_macros.h"
#include "core/torch_status.h"

namespace mergeguard {
namespace {

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

std::string ShapeString(const torch::Tensor& tensor) {
  return ShapeString(tensor.sizes().vec());
}

}  // namespace

bool IsHeadKey(const std::string& key) {
  return absl::StartsWith(key, kHeadPrefix) ||
         absl::StrContains(key, absl::StrCat("/", kHeadPrefix));
}

// Impl holds the TorchScript module and, per parameter, the submodule that
// owns its slot, so that a tensor can be installed with one setattr.
struct Model::Impl {
  torch::jit::Module module;
  struct Slot {
    torch::jit::Module owner;
    std::string attribute;
  };
  std::vector<Slot> slots;  // parallel to Model::parameters_
  std::map<std::string, size_t> index;
};

Model::Model() : impl_(std::make_unique<Impl>()) {}
Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& path) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    return absl::NotFoundError(
        absl::StrCat("architecture file not found: ", path));
  }
  std::unique_ptr<Model> model(new Model());
  try {
    model->impl_->module = torch::jit::load(path);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("not a TorchScript archive: ", path, ": ",
                     TorchErrorToStatus(e, "torch::jit::load").message()));
  }
  RETURN_IF_ERROR(model->Init());
  return model;
}

absl::StatusOr<std::unique_ptr<Model>> Model::FromModule(
    const torch::jit::Module& module) {
  std::unique_ptr<Model> model(new Model());
  model->impl_->module = module;
  RETURN_IF_ERROR(model->Init());
  return model;
}

absl::StatusOr<std::unique_ptr<Model>> Model::Clone() const {
  // Workers clone one shared model at once; deepcopy walks the shared class
  // type, so clones are serialized.
  static absl::Mutex* const clone_mu = new absl::Mutex();
  std::unique_ptr<Model> copy(new Model());
  RETURN_IF_ERROR(CallTorch("Model::Clone", [&]() -> absl::Status {
    absl::MutexLock lock(clone_mu);
    copy->impl_->module = impl_->module.deepcopy();
    return absl::OkStatus();
  }));
  copy->input_shape_ = input_shape_;
  RETURN_IF_ERROR(copy->Init());
  // deepcopy clones tensors that require grad through autograd; the copy's
  // parameters must be leaves of their own.
  RETURN_IF_ERROR(CallTorch("Model::Clone", [&]() -> absl::Status {
    for (Impl::Slot& slot : copy->impl_->slots) {
      torch::Tensor value = slot.owner.attr(slot.attribute).toTensor();
      slot.owner.setattr(slot.attribute,
                         value.detach().requires_grad_(value.requires_grad()));
    }
    return absl::OkStatus();
  }));
  return copy;
}

absl::Status Model::Init() {
  if (!impl_->module.find_method("forward")) {
    return absl::InvalidArgumentError("architecture has no forward() method");
  }
  return CallTorch("Model::Init", [&]() -> absl::Status {
    parameters_.clear();
    impl_->slots.clear();
    impl_->index.clear();
    for (const auto& named : impl_->module.named_parameters(true)) {
      std::vector<std::string> parts = absl::StrSplit(named.name, '.');
      torch::jit::Module owner = impl_->module;
      for (size_t i = 0; i + 1 < parts.size(); ++i) {
        owner = owner.attr(parts[i]).toModule();
      }
      impl_->index[named.name] = parameters_.size();
      parameters_.push_back({named.name, named.value.sizes().vec()});
      impl_->slots.push_back({owner, parts.back()});
    }
    if (parameters_.empty()) {
      return absl::InvalidArgumentError("architecture has no parameters");
    }
    torch::NoGradGuard no_grad;
    std::vector<int64_t> probe_shape = {2};
    probe_shape.insert(probe_shape.end(), input_shape_.begin(),
                       input_shape_.end());
    torch::Tensor features =
        impl_->module.forward({torch::zeros(probe_shape)}).toTensor();
    if (features.dim() != 2 || features.size(0) != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "architecture must map [B, ", absl::StrJoin(input_shape_, ", "),
          "] to [B, D] features; got ", ShapeString(features)));
    }
    feature_dim_ = features.size(1);
    return absl::OkStatus();
  });
}

int64_t Model::NumParameters() const {
  int64_t total = 0;
  for (const ParameterInfo& info : parameters_) {
    int64_t numel = 1;
    for (int64_t d : info.shape) numel *= d;
    total += numel;
  }
  return total;
}

absl::Status Model::LoadBackbone(const NamedTensors& tensors) {
  std::map<std::string, const torch::Tensor*> by_name;
  for (const auto& [name, tensor] : tensors) {
    if (IsHeadKey(name)) continue;
    if (impl_->index.count(name) == 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor \"", name, "\" is not a parameter of the architecture"));
    }
    by_name[name] = &tensor;
  }
  return CallTorch("Model::LoadBackbone", [&]() -> absl::Status {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < parameters_.size(); ++i) {
      const ParameterInfo& info = parameters_[i];
      auto it = by_name.find(info.name);
      if (it == by_name.end()) {
        return absl::FailedPreconditionError(
            absl::StrCat("checkpoint lacks parameter \"", info.name, "\""));
      }
      const torch::Tensor& source = *it->second;
      if (source.sizes().vec() != info.shape) {
        return absl::FailedPreconditionError(absl::StrCat(
            "parameter \"", info.name, "\" has shape ", ShapeString(source),
            ", the architecture expects ", ShapeString(info.shape)));
      }
      torch::Tensor value =
          source.to(torch::kFloat32).contiguous().clone().detach();
      impl_->slots[i].owner.setattr(impl_->slots[i].attribute, value);
    }
    return absl::OkStatus();
  });
}

absl::Status Model::LoadBackboneFromPath(const std::string& path) {
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(path));
  return LoadBackbone(tensors);
}

absl::Status Model::InstallTensor(const std::string& name,
                                  const torch::Tensor& value) {
  auto it = impl_->index.find(name);
  if (it == impl_->index.end()) {
    return absl::NotFoundError(
        absl::StrCat("architecture has no parameter \"", name, "\""));
  }
  const ParameterInfo& info = parameters_[it->second];
  if (value.sizes().vec() != info.shape) {
    return absl::FailedPreconditionError(absl::StrCat(
        "parameter \"", name, "\" has shape ", ShapeString(info.shape),
        "; cannot install ", ShapeString(value)));
  }
  return CallTorch("Model::InstallTensor", [&]() -> absl::Status {
    Impl::Slot& slot = impl_->slots[it->second];
    slot.owner.setattr(slot.attribute, value);
    return absl::OkStatus();
  });
}

std::vector<torch::Tensor> Model::ParameterTensors() const {
  std::vector<torch::Tensor> result;
  result.reserve(impl_->slots.size());
  for (const Impl::Slot& slot : impl_->slots) {
    result.push_back(slot.owner.attr(slot.attribute).toTensor());
  }
  return result;
}

NamedTensors Model::Backbone() const {
  torch::NoGradGuard no_grad;
  NamedTensors result;
  std::vector<torch::Tensor> tensors = ParameterTensors();
  for (size_t i = 0; i < tensors.size(); ++i) {
    result.emplace_back(parameters_[i].name,
                        tensors[i].detach().clone().contiguous());
  }
  return result;
}

absl::StatusOr<torch::Tensor> Model::Features(const torch::Tensor& inputs) {
  if (inputs.dim() != 4 ||
      std::vector<int64_t>(inputs.sizes().begin() + 1, inputs.sizes().end()) !=
          input_shape_) {
    return absl::InvalidArgumentError(
        absl::StrCat("inputs must be [B, ", absl::StrJoin(input_shape_, ", "),
                     "]; got ", ShapeString(inputs)));
  }
  return CallTorch("Model::Features", [&]() -> absl::StatusOr<torch::Tensor> {
    return impl_->module.forward({inputs.to(torch::kFloat32)}).toTensor();
  });
}

absl::Status Model::Save(const std::string& path) const {
  std::string temp_path = absl::StrCat(path, ".tmp");
  RETURN_IF_ERROR(CallTorch("Model::Save", [&]() -> absl::Status {
    impl_->module.save(temp_path);
    return absl::OkStatus();
  }));
  if (std::rename(temp_path.c_str(), path.c_str()) != 0) {
    std::remove(temp_path.c_str());
    return absl::InternalError(absl::StrCat("cannot rename to ", path));
  }
  return absl::OkStatus();
}

int64_t Head::NumClasses() const { return weight.size(0); }

torch::Tensor Head::Logits(const torch::Tensor& features) const {
  return torch::linear(features, weight, bias);
}

absl::StatusOr<Head> HeadFromTensors(const NamedTensors& tensors,
                                     const std::string& prefix) {
  const torch::Tensor* weight = nullptr;
  const torch::Tensor* bias = nullptr;
  for (const auto& [name, tensor] : tensors) {
    if (name == prefix + "weight") weight = &tensor;
    if (name == prefix + "bias") bias = &tensor;
  }
  if (weight == nullptr || bias == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("no head \"", prefix, "weight\" / \"", prefix, "bias\""));
  }
  if (weight->dim() != 2 || bias->dim() != 1 ||
      bias->size(0) != weight->size(0)) {
    return absl::FailedPreconditionError(
        absl::StrCat("head \"", prefix,
                     "\" must be weight [C, D] and bias [C];"
                     " got ",
                     ShapeString(*weight), " and ", ShapeString(*bias)));
  }
  return CallTorch("HeadFromTensors", [&]() -> absl::StatusOr<Head> {
    Head head;
    head.weight = weight->to(torch::kFloat32).contiguous();
    head.bias = bias->to(torch::kFloat32).contiguous();
    return head;
  });
}

}  // namespace mergeguard
