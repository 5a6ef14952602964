// Precompiled header for translation units that use LibTorch.
#include <torch/script.h>
#include <torch/torch.h>
