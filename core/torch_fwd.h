#ifndef MERGEGUARD_CORE_TORCH_FWD_H_
#define MERGEGUARD_CORE_TORCH_FWD_H_

// The single place core headers get LibTorch's tensor type from. The heavy
// <torch/torch.h> lives in the precompiled header (core/torch_pch.h).
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

namespace torch {
using at::Tensor;
}  // namespace torch

#endif  // MERGEGUARD_CORE_TORCH_FWD_H_
