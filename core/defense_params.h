#ifndef MERGEGUARD_CORE_DEFENSE_PARAMS_H_
#define MERGEGUARD_CORE_DEFENSE_PARAMS_H_

// The hyperparameters of the data-dependent methods (AdaMerging, DAM, LFPM)
// as flat name -> text pairs: what the YAML job file's `parameters:` block,
// the wire format's `defense_parameters` map and the job journal carry. One
// table per method maps each name onto its options field, so the three
// formats cannot drift apart. Names follow the options' field names; LFPM's
// trigger options are "trigger.<field>".

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "core/adamerging.h"
#include "core/dam.h"
#include "core/lfpm.h"

namespace mergeguard {

using DefenseParameters = std::map<std::string, std::string>;

// DefenseParameterInfo documents one parameter.
struct DefenseParameterInfo {
  std::string name;
  // "number", "integer", "boolean", or the accepted words "a|b|c".
  std::string type;
  // The default, as text.
  std::string default_value;
};

// The parameters each method accepts, in table order, with their defaults.
std::vector<DefenseParameterInfo> AdaMergingParameterInfo();
std::vector<DefenseParameterInfo> DamParameterInfo();
std::vector<DefenseParameterInfo> LfpmParameterInfo();

// Apply*Parameters sets the named fields of `options`. INVALID_ARGUMENT
// names the parameter (`parameters.steps: expected an integer, got "ten"`)
// and lists the known names for an unknown one. The options are validated
// afterwards (ranges, device).
absl::Status ApplyAdaMergingParameters(const DefenseParameters& parameters,
                                       AdaMergingOptions* options);
absl::Status ApplyDamParameters(const DefenseParameters& parameters,
                                DamOptions* options);
absl::Status ApplyLfpmParameters(const DefenseParameters& parameters,
                                 LfpmOptions* options);

// LFPM in a job first merges the tasks with task arithmetic; this parameter
// sets that merge's lambda (default 0.3) and is not an LfpmOptions field.
inline constexpr char kLfpmMergeLambdaParameter[] = "merge_lambda";
inline constexpr double kLfpmDefaultMergeLambda = 0.3;

// LfpmMergeLambda returns the merge_lambda parameter, or the default;
// INVALID_ARGUMENT naming it when it is not a finite number.
absl::StatusOr<double> LfpmMergeLambda(const DefenseParameters& parameters);

// LfpmProgressLosses names one LFPM step's losses as job progress reports
// them ("loss", "clean", "backdoor", "ctl").
std::map<std::string, double> LfpmProgressLosses(const LfpmProgress& progress);

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_DEFENSE_PARAMS_H_
