#ifndef MERGEGUARD_BENCH_MODEL_ZOO_H_
#define MERGEGUARD_BENCH_MODEL_ZOO_H_

// The project's architectures, built in C++ as TorchScript modules
// (register_parameter + define), so their `.pt` files load anywhere
// TorchScript does, Python's torch.jit.load included. Both map inputs
// [B, 1, 28, 28] in [0, 1] to features [B, 128].

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/model.h"

namespace mergeguard::bench {

enum class Architecture {
  // conv(1->32)-pool-conv(32->64)-pool-conv(64->128)-pool-fc(1152->128):
  // about 0.24M parameters.
  kCnn,
  // A 3x3 conv stem (1->32, GELU), then 7x7 patches (16 tokens), width 128,
  // 4 pre-LayerNorm blocks with 4 heads and MLP width 256, mean-pooled and
  // normalized: about 0.74M parameters.
  kVit,
};

// ArchitectureRevision changes whenever an architecture's definition does;
// it keys the scenario cache, so a base built from an older definition is
// never reused. Revision 1 of the ViT had no stem.
int ArchitectureRevision(Architecture architecture);

absl::StatusOr<Architecture> ParseArchitecture(absl::string_view name);
absl::string_view ArchitectureName(Architecture architecture);

// BuildArchitecture returns a freshly initialized model (seeded: the same
// seed gives the same tensors).
absl::StatusOr<std::unique_ptr<Model>> BuildArchitecture(
    Architecture architecture, uint64_t seed);

}  // namespace mergeguard::bench

#endif  // MERGEGUARD_BENCH_MODEL_ZOO_H_
