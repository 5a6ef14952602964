#ifndef MERGEGUARD_CORE_DEFENSE_JSON_H_
#define MERGEGUARD_CORE_DEFENSE_JSON_H_

// Private to core/: JSON pieces shared by the AdaMerging and DAM reports and
// provenance. Include only from .cc files (nlohmann-json is a private
// dependency of core).

#include <nlohmann/json.hpp>
#include <vector>

#include "core/adamerging.h"
#include "core/torch_fwd.h"

namespace mergeguard {

// TensorToJson renders a float tensor of any rank as nested arrays (null
// when undefined).
nlohmann::json TensorToJson(const torch::Tensor& tensor);

// DataDependentInputsJson lists the tasks of a file-level job:
// [{"name","path","head_path","calibration","kind"}].
nlohmann::json DataDependentInputsJson(
    const std::vector<DataDependentTask>& tasks);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_DEFENSE_JSON_H_
