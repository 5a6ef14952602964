#include "proto/job_spec_convert.h"

#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"

namespace mergeguard {
namespace {

struct MethodPair {
  v1::Method proto;
  JobMethod method;
};
constexpr MethodPair kMethods[] = {
    {v1::METHOD_TASK_ARITHMETIC, JobMethod::kTaskArithmetic},
    {v1::METHOD_TIES, JobMethod::kTies},
    {v1::METHOD_DARE, JobMethod::kDare},
    {v1::METHOD_BREADCRUMBS, JobMethod::kBreadcrumbs},
    {v1::METHOD_CONSENSUS, JobMethod::kConsensus},
    {v1::METHOD_MODEL_STOCK, JobMethod::kModelStock},
    {v1::METHOD_WEIGHTED_AVERAGE, JobMethod::kWeightedAverage},
    {v1::METHOD_DAM, JobMethod::kDam},
    {v1::METHOD_LFPM, JobMethod::kLfpm},
    {v1::METHOD_ADAMERGING, JobMethod::kAdaMerging},
};

absl::Status NotApplicable(const char* field, JobMethod method) {
  return absl::InvalidArgumentError(absl::StrCat(
      field, ": does not apply to method ", JobMethodName(method)));
}

absl::Status UnknownEnum(const char* field, int value) {
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": unknown value ", value,
                   " (is the client newer than the server?)"));
}

}  // namespace

absl::StatusOr<JobSpec> JobSpecFromProto(const v1::JobSpec& proto) {
  JobSpec spec;
  bool found = false;
  for (const MethodPair& pair : kMethods) {
    if (pair.proto == proto.method()) {
      spec.method = pair.method;
      found = true;
    }
  }
  if (!found) {
    if (proto.method() == v1::METHOD_UNSPECIFIED) {
      return absl::InvalidArgumentError(
          "method: is required (e.g. METHOD_TASK_ARITHMETIC, METHOD_TIES)");
    }
    return UnknownEnum("method", proto.method());
  }
  const JobMethod method = spec.method;
  spec.base_digest = proto.base_sha256();
  for (const v1::JobInput& input : proto.inputs()) {
    JobInputSpec converted;
    converted.name = input.name();
    converted.weight = input.has_weight() ? input.weight() : 1.0;
    switch (input.source_case()) {
      case v1::JobInput::kModelSha256:
        converted.model_digest = input.model_sha256();
        if (converted.model_digest.empty()) {
          return absl::InvalidArgumentError(absl::StrCat(
              "inputs[", spec.inputs.size(), "].model_sha256: is empty"));
        }
        break;
      case v1::JobInput::kLora:
        converted.lora_weights_digest = input.lora().weights_sha256();
        converted.lora_config_digest = input.lora().config_sha256();
        break;
      case v1::JobInput::SOURCE_NOT_SET:
        return absl::InvalidArgumentError(absl::StrCat(
            "inputs[", spec.inputs.size(), "]: set model_sha256 or lora"));
    }
    spec.inputs.push_back(std::move(converted));
  }

  MergeOptions& o = spec.merge;
  const bool uses_lambda =
      method == JobMethod::kTaskArithmetic || method == JobMethod::kTies ||
      method == JobMethod::kDare || method == JobMethod::kBreadcrumbs;
  if (proto.has_lambda()) {
    if (!uses_lambda) return NotApplicable("lambda", method);
    o.lambda = proto.lambda();
    if (!std::isfinite(o.lambda)) {
      return absl::InvalidArgumentError("lambda: must be finite");
    }
  }
  const bool uses_ties =
      method == JobMethod::kTies ||
      (method == JobMethod::kDare &&
       proto.dare().combine() == v1::DareParameters::COMBINE_TIES);
  if (proto.has_ties()) {
    if (!uses_ties) return NotApplicable("ties", method);
    const v1::TiesParameters& ties = proto.ties();
    if (ties.has_top_k_percent()) o.ties.top_k_percent = ties.top_k_percent();
    switch (ties.trim_scope()) {
      case v1::TiesParameters::TRIM_SCOPE_UNSPECIFIED:
      case v1::TiesParameters::TRIM_SCOPE_GLOBAL:
        o.ties.trim_scope = TrimScope::kGlobal;
        break;
      case v1::TiesParameters::TRIM_SCOPE_TENSOR:
        o.ties.trim_scope = TrimScope::kTensor;
        break;
      default:
        return UnknownEnum("ties.trim_scope", ties.trim_scope());
    }
    switch (ties.disjoint()) {
      case v1::TiesParameters::DISJOINT_UNSPECIFIED:
      case v1::TiesParameters::DISJOINT_MEAN:
        o.ties.disjoint = DisjointMode::kMean;
        break;
      case v1::TiesParameters::DISJOINT_SUM:
        o.ties.disjoint = DisjointMode::kSum;
        break;
      default:
        return UnknownEnum("ties.disjoint", ties.disjoint());
    }
  }
  if (proto.has_dare()) {
    if (method != JobMethod::kDare) return NotApplicable("dare", method);
    const v1::DareParameters& dare = proto.dare();
    if (dare.has_drop_rate()) o.dare.drop_rate = dare.drop_rate();
    switch (dare.combine()) {
      case v1::DareParameters::COMBINE_UNSPECIFIED:
      case v1::DareParameters::COMBINE_TASK_ARITHMETIC:
        o.dare.combine = DareCombine::kTaskArithmetic;
        break;
      case v1::DareParameters::COMBINE_TIES:
        o.dare.combine = DareCombine::kTies;
        break;
      default:
        return UnknownEnum("dare.combine", dare.combine());
    }
    o.dare.seed = dare.seed();
  }
  if (proto.has_breadcrumbs()) {
    if (method != JobMethod::kBreadcrumbs) {
      return NotApplicable("breadcrumbs", method);
    }
    const v1::BreadcrumbsParameters& b = proto.breadcrumbs();
    if (b.has_gamma()) o.breadcrumbs.gamma = b.gamma();
    if (b.has_density()) o.breadcrumbs.density = b.density();
  }
  if (proto.has_consensus()) {
    if (method != JobMethod::kConsensus) {
      return NotApplicable("consensus", method);
    }
    const v1::ConsensusParameters& c = proto.consensus();
    if (c.has_tall_lambda()) o.consensus.tall_lambda = c.tall_lambda();
    if (c.has_min_agreeing()) o.consensus.min_agreeing = c.min_agreeing();
    if (c.has_alpha()) o.consensus.alpha = c.alpha();
  }
  if (proto.has_model_stock()) {
    if (method != JobMethod::kModelStock) {
      return NotApplicable("model_stock", method);
    }
    switch (proto.model_stock().cosine_scope()) {
      case v1::ModelStockParameters::COSINE_SCOPE_UNSPECIFIED:
      case v1::ModelStockParameters::COSINE_SCOPE_GLOBAL:
        o.model_stock.cosine_scope = CosineScope::kGlobal;
        break;
      case v1::ModelStockParameters::COSINE_SCOPE_TENSOR:
        o.model_stock.cosine_scope = CosineScope::kTensor;
        break;
      default:
        return UnknownEnum("model_stock.cosine_scope",
                           proto.model_stock().cosine_scope());
    }
  }
  if (proto.has_head_prefix()) o.head_prefix = proto.head_prefix();
  switch (proto.output_dtype()) {
    case v1::OUTPUT_DTYPE_UNSPECIFIED:
      break;
    case v1::OUTPUT_DTYPE_F32:
      o.output_dtype = DType::kF32;
      break;
    case v1::OUTPUT_DTYPE_F16:
      o.output_dtype = DType::kF16;
      break;
    case v1::OUTPUT_DTYPE_BF16:
      o.output_dtype = DType::kBF16;
      break;
    case v1::OUTPUT_DTYPE_F64:
      o.output_dtype = DType::kF64;
      break;
    default:
      return UnknownEnum("output_dtype", proto.output_dtype());
  }
  o.compute_in_double = proto.compute_in_double();
  spec.architecture = proto.architecture();
  for (const v1::CalibrationData& data : proto.calibration()) {
    spec.calibration.push_back({data.task(), data.sha256()});
  }
  spec.defense_parameters.insert(proto.defense_parameters().begin(),
                                 proto.defense_parameters().end());
  for (const v1::CalibrationData& data : proto.probes()) {
    spec.probes.push_back({data.task(), data.sha256()});
  }
  return spec;
}

void JobSpecToProto(const JobSpec& spec, v1::JobSpec* proto) {
  for (const MethodPair& pair : kMethods) {
    if (pair.method == spec.method) proto->set_method(pair.proto);
  }
  proto->set_base_sha256(spec.base_digest);
  for (const JobInputSpec& input : spec.inputs) {
    v1::JobInput* out = proto->add_inputs();
    out->set_name(input.name);
    out->set_weight(input.weight);
    if (input.is_lora()) {
      out->mutable_lora()->set_weights_sha256(input.lora_weights_digest);
      out->mutable_lora()->set_config_sha256(input.lora_config_digest);
    } else {
      out->set_model_sha256(input.model_digest);
    }
  }
  const MergeOptions& o = spec.merge;
  const JobMethod m = spec.method;
  if (!std::isnan(o.lambda)) proto->set_lambda(o.lambda);
  const bool uses_ties =
      m == JobMethod::kTies ||
      (m == JobMethod::kDare && o.dare.combine == DareCombine::kTies);
  if (uses_ties) {
    v1::TiesParameters* ties = proto->mutable_ties();
    ties->set_top_k_percent(o.ties.top_k_percent);
    ties->set_trim_scope(o.ties.trim_scope == TrimScope::kGlobal
                             ? v1::TiesParameters::TRIM_SCOPE_GLOBAL
                             : v1::TiesParameters::TRIM_SCOPE_TENSOR);
    ties->set_disjoint(o.ties.disjoint == DisjointMode::kMean
                           ? v1::TiesParameters::DISJOINT_MEAN
                           : v1::TiesParameters::DISJOINT_SUM);
  }
  if (m == JobMethod::kDare) {
    v1::DareParameters* dare = proto->mutable_dare();
    dare->set_drop_rate(o.dare.drop_rate);
    dare->set_combine(o.dare.combine == DareCombine::kTies
                          ? v1::DareParameters::COMBINE_TIES
                          : v1::DareParameters::COMBINE_TASK_ARITHMETIC);
    dare->set_seed(o.dare.seed);
  }
  if (m == JobMethod::kBreadcrumbs) {
    proto->mutable_breadcrumbs()->set_gamma(o.breadcrumbs.gamma);
    proto->mutable_breadcrumbs()->set_density(o.breadcrumbs.density);
  }
  if (m == JobMethod::kConsensus) {
    proto->mutable_consensus()->set_tall_lambda(o.consensus.tall_lambda);
    proto->mutable_consensus()->set_min_agreeing(o.consensus.min_agreeing);
    proto->mutable_consensus()->set_alpha(o.consensus.alpha);
  }
  if (m == JobMethod::kModelStock) {
    proto->mutable_model_stock()->set_cosine_scope(
        o.model_stock.cosine_scope == CosineScope::kGlobal
            ? v1::ModelStockParameters::COSINE_SCOPE_GLOBAL
            : v1::ModelStockParameters::COSINE_SCOPE_TENSOR);
  }
  proto->set_head_prefix(o.head_prefix);
  if (o.output_dtype.has_value()) {
    switch (*o.output_dtype) {
      case DType::kF16:
        proto->set_output_dtype(v1::OUTPUT_DTYPE_F16);
        break;
      case DType::kBF16:
        proto->set_output_dtype(v1::OUTPUT_DTYPE_BF16);
        break;
      case DType::kF64:
        proto->set_output_dtype(v1::OUTPUT_DTYPE_F64);
        break;
      default:
        proto->set_output_dtype(v1::OUTPUT_DTYPE_F32);
    }
  }
  proto->set_compute_in_double(o.compute_in_double);
  proto->set_architecture(spec.architecture);
  for (const CalibrationRef& ref : spec.calibration) {
    v1::CalibrationData* data = proto->add_calibration();
    data->set_task(ref.task);
    data->set_sha256(ref.digest);
  }
  proto->mutable_defense_parameters()->insert(spec.defense_parameters.begin(),
                                              spec.defense_parameters.end());
  for (const CalibrationRef& ref : spec.probes) {
    v1::CalibrationData* data = proto->add_probes();
    data->set_task(ref.task);
    data->set_sha256(ref.digest);
  }
}

}  // namespace mergeguard
