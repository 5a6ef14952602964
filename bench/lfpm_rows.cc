#include "bench/lfpm_rows.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/run_stats.h"
#include "core/evaluation.h"
#include "core/model.h"
#include "core/status_macros.h"
#include "core/tensor_views.h"
#include "core/torch_status.h"
#include "nlohmann/json.hpp"

namespace mergeguard::bench {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

absl::Status TaMerge(const Scenario& scenario,
                     const std::vector<MergeInput>& inputs,
                     const std::string& output_path) {
  MergeOptions options;
  options.method = MergeMethod::kTaskArithmetic;
  options.metadata["mergeguard.scenario"] = scenario.name;
  return Merge(scenario.Path(scenario.base), inputs, output_path, options)
      .status();
}

// AdaptiveAttacks re-optimizes the scenario's patch against the model at
// `model_path` on each compromised task's calibration set (the attacker's
// data) and measures both patches' ASR on the test split. Empty for blend
// triggers, which have no patch to re-optimize.
absl::StatusOr<std::vector<AdaptiveAttack>> AdaptiveAttacks(
    const Scenario& scenario, const std::string& model_path,
    const LfpmRowOptions& options) {
  std::vector<AdaptiveAttack> attacks;
  if (!scenario.attack.has_value()) return attacks;
  ASSIGN_OR_RETURN(Trigger trigger, LoadScenarioTrigger(scenario));
  if (trigger.kind != TriggerKind::kPatch) return attacks;
  ASSIGN_OR_RETURN(std::unique_ptr<Model> model,
                   Model::Load(scenario.Path(scenario.architecture.file)));
  ASSIGN_OR_RETURN(NamedTensors tensors, LoadTensorsFromPath(model_path));
  RETURN_IF_ERROR(model->LoadBackbone(tensors));
  EvalOptions eval;
  eval.batch_size = options.eval.batch_size;
  for (const std::string& name : scenario.attack->tasks) {
    const ScenarioTask* task = scenario.FindTask(name);
    if (task == nullptr) {
      return absl::NotFoundError(absl::StrCat("no task ", name));
    }
    ASSIGN_OR_RETURN(Head head,
                     HeadFromTensors(tensors, absl::StrCat(name, "/head.")));
    ASSIGN_OR_RETURN(LabeledImages calibration,
                     LoadLabeledImages(scenario.Path(task->calibration)));
    ASSIGN_OR_RETURN(LabeledImages test,
                     LoadLabeledImages(scenario.Path(task->test)));
    ASSIGN_OR_RETURN(
        ImageSet attacker_data,
        CallTorch("AdaptiveAttacks", [&]() -> absl::StatusOr<ImageSet> {
          return ImageSet{calibration.inputs.mul(255.0)
                              .round()
                              .clamp(0, 255)
                              .to(torch::kUInt8)
                              .squeeze(1),
                          calibration.labels};
        }));
    const int64_t target = scenario.attack->target_class;
    AdaptiveAttack attack;
    attack.task = name;
    attack.target = target;
    ASSIGN_OR_RETURN(AttackResult original,
                     EvaluateAttack(*model, head, test, trigger, target, eval));
    attack.original_asr = original.asr;
    // Two starts: the scenario's patch, and mid-grey. The learned patch is
    // saturated (every pixel 0 or 1), so projected Adam started there can
    // stay on that vertex even when another patch does better; the stronger
    // of the two is the attacker's result.
    Trigger grey = trigger;
    grey.pattern = torch::full_like(trigger.pattern, 0.5);
    for (const Trigger* start : {&trigger, &grey}) {
      ASSIGN_OR_RETURN(Trigger adapted,
                       OptimizeUniversalPatch(
                           *model, head, attacker_data, *start, target,
                           options.adaptive_patch, options.adaptive_seed));
      ASSIGN_OR_RETURN(
          AttackResult adaptive,
          EvaluateAttack(*model, head, test, adapted, target, eval));
      attack.adaptive_asr = std::max(attack.adaptive_asr, adaptive.asr);
    }
    attacks.push_back(attack);
  }
  return attacks;
}

// KnownTriggers is LFPM's form of the scenario's attack triggers: each
// compromised task's trigger with the attack's target.
absl::StatusOr<std::map<std::string, LfpmKnownTrigger>> KnownTriggers(
    const Scenario& scenario) {
  ASSIGN_OR_RETURN(auto triggers, AttackTriggers(scenario));
  std::map<std::string, LfpmKnownTrigger> known;
  for (const auto& [task, trigger] : triggers) {
    known[task] = {trigger, scenario.attack->target_class};
  }
  return known;
}

json PatchOverlapJson(const std::vector<TriggerPatchOverlap>& overlaps) {
  json out = json::array();
  for (const TriggerPatchOverlap& o : overlaps) {
    out.push_back({{"task", o.task},
                   {"mass_on_patch", o.mass_on_patch},
                   {"patch_covered", o.patch_covered},
                   {"pattern_gap", o.pattern_gap},
                   {"pattern_correlation", o.pattern_correlation}});
  }
  return out;
}

struct PatternAgreement {
  double gap = 0.0;
  double correlation = 0.0;
};

// ComparePatterns weighs mined [C, H, W] against planted [C, H, W] with
// weights [1, H, W] (see TriggerPatchOverlap); both 0 when the weights are.
PatternAgreement ComparePatterns(const torch::Tensor& mined,
                                 const torch::Tensor& planted,
                                 const torch::Tensor& weights) {
  torch::Tensor w = weights.expand_as(mined);
  const double total = w.sum().item<double>();
  PatternAgreement agreement;
  if (total <= 1e-12) return agreement;
  agreement.gap = (w * (mined - planted).abs()).sum().item<double>() / total;
  torch::Tensor mined_centred = mined - (w * mined).sum() / total;
  torch::Tensor planted_centred = planted - (w * planted).sum() / total;
  const double covariance =
      (w * mined_centred * planted_centred).sum().item<double>();
  const double spread =
      std::sqrt((w * mined_centred.square()).sum().item<double>() *
                (w * planted_centred.square()).sum().item<double>());
  // A pattern constant where the weights are has no correlation to report.
  if (spread > 1e-12) agreement.correlation = covariance / spread;
  return agreement;
}

json AdaptiveJson(const std::vector<AdaptiveAttack>& attacks) {
  json out = json::array();
  for (const AdaptiveAttack& a : attacks) {
    out.push_back({{"task", a.task},
                   {"target", a.target},
                   {"original_asr", a.original_asr},
                   {"adaptive_asr", a.adaptive_asr}});
  }
  return out;
}

}  // namespace

absl::StatusOr<std::vector<TriggerPatchOverlap>> PatchOverlaps(
    const Scenario& scenario, const LfpmReport& report) {
  std::vector<TriggerPatchOverlap> overlaps;
  if (!scenario.attack.has_value()) return overlaps;
  ASSIGN_OR_RETURN(auto triggers, AttackTriggers(scenario));
  for (const LfpmTriggerReport& t : report.triggers) {
    auto it = triggers.find(t.task);
    if (it == triggers.end() || it->second.kind != TriggerKind::kPatch ||
        !t.masks.defined()) {
      continue;
    }
    const std::vector<int64_t> shape = {it->second.pattern.size(0),
                                        t.masks.size(2), t.masks.size(3)};
    ASSIGN_OR_RETURN(MaskAndPattern planted,
                     TriggerMaskAndPattern(it->second, shape));
    RETURN_IF_ERROR(CallTorch("PatchOverlaps", [&]() -> absl::Status {
      TriggerPatchOverlap overlap;
      overlap.task = t.task;
      torch::Tensor patch = planted.mask.to(torch::kFloat32);
      const double patch_area = patch.sum().item<double>();
      for (int64_t j = 0; j < t.masks.size(0); ++j) {
        torch::Tensor mask = t.masks[j].to(torch::kFloat32);
        const double shared = (mask * patch).sum().item<double>();
        overlap.mass_on_patch.push_back(
            shared / std::max(mask.sum().item<double>(), 1e-12));
        overlap.patch_covered.push_back(shared / std::max(patch_area, 1e-12));
        if (t.patterns.defined()) {
          const PatternAgreement agreement = ComparePatterns(
              t.patterns[j].to(torch::kFloat32), planted.pattern, mask * patch);
          overlap.pattern_gap.push_back(agreement.gap);
          overlap.pattern_correlation.push_back(agreement.correlation);
        }
      }
      overlaps.push_back(std::move(overlap));
      return absl::OkStatus();
    }));
  }
  return overlaps;
}

absl::StatusOr<std::vector<LfpmCalibrationFile>> ScenarioLfpmCalibration(
    const Scenario& scenario, const std::vector<MergeInput>& inputs) {
  std::vector<LfpmCalibrationFile> files;
  for (const MergeInput& input : inputs) {
    const ScenarioTask* task = scenario.FindTask(input.name);
    if (task == nullptr) {
      return absl::NotFoundError(absl::StrCat("input \"", input.name,
                                              "\" is not a task of scenario ",
                                              scenario.name));
    }
    files.push_back({input.name, scenario.Path(task->calibration)});
  }
  return files;
}

RowProducer LfpmProducer(const LfpmOptions& options, const std::string& name,
                         bool known_trigger) {
  return {name,
          [options, known_trigger](
              const Scenario& scenario, const std::vector<MergeInput>& inputs,
              const std::string& output_path) -> absl::Status {
            LfpmJob job;
            job.architecture_path = scenario.Path(scenario.architecture.file);
            job.base_path = scenario.Path(scenario.base);
            job.task_models = inputs;
            ASSIGN_OR_RETURN(job.calibration,
                             ScenarioLfpmCalibration(scenario, inputs));
            job.output_path = output_path;
            if (known_trigger) {
              ASSIGN_OR_RETURN(job.known_triggers, KnownTriggers(scenario));
            }
            LfpmOptions with_scenario = options;
            with_scenario.metadata["mergeguard.scenario"] = scenario.name;
            return RunLfpmJob(job, with_scenario).status();
          }};
}

double MeanAsr(const ModelEvaluation& evaluation) {
  if (evaluation.asr.empty()) return 0.0;
  double sum = 0.0;
  for (const TaskAttack& attack : evaluation.asr) sum += attack.asr;
  return sum / static_cast<double>(evaluation.asr.size());
}

absl::StatusOr<LfpmRows> RunLfpmRows(const Scenario& scenario,
                                     const LfpmRowOptions& options) {
  fs::path work_dir = options.work_dir;
  const bool temporary = work_dir.empty();
  if (temporary) {
    std::random_device random;
    work_dir = fs::temp_directory_path() /
               absl::StrCat("mergeguard-lfpm-", random(), random());
  }
  std::error_code error;
  fs::create_directories(work_dir, error);
  if (error) {
    return absl::InternalError(absl::StrCat("cannot create ", work_dir.string(),
                                            ": ", error.message()));
  }
  auto path = [&](const std::string& method, bool backdoored) {
    return (work_dir / absl::StrCat(method,
                                    backdoored ? ".backdoored" : ".clean",
                                    ".safetensors"))
        .string();
  };

  auto run = [&]() -> absl::StatusOr<LfpmRows> {
    std::map<std::string, LfpmKnownTrigger> known_triggers;
    if (options.known_trigger) {
      ASSIGN_OR_RETURN(known_triggers, KnownTriggers(scenario));
    }
    LfpmRows rows;
    rows.ta.method = "TA";
    for (bool backdoored : {false, true}) {
      const std::string ta_path = path("TA", backdoored);
      RETURN_IF_ERROR(
          TaMerge(scenario, ScenarioInputs(scenario, backdoored), ta_path));
      ASSIGN_OR_RETURN(ModelEvaluation evaluation,
                       EvaluateModelFile(scenario, ta_path, options.eval));
      (backdoored ? rows.ta.backdoored : rows.ta.clean) = std::move(evaluation);
    }
    if (options.adaptive_check) {
      ASSIGN_OR_RETURN(rows.ta_adaptive,
                       AdaptiveAttacks(scenario, path("TA", true), options));
      ASSIGN_OR_RETURN(rows.clean_ta_adaptive,
                       AdaptiveAttacks(scenario, path("TA", false), options));
    }
    for (LfpmMode mode : options.modes) {
      LfpmRow row;
      row.mode = mode;
      row.row.method = absl::StrCat("LFPM-", LfpmModeName(mode));
      for (bool backdoored : {false, true}) {
        const std::string out = path(row.row.method, backdoored);
        if (!backdoored && !options.repair_clean_merge) {
          row.row.clean = rows.ta.clean;
          continue;
        }
        LfpmJob job;
        job.architecture_path = scenario.Path(scenario.architecture.file);
        if (options.lfpm.triggers.scan_own_model) {
          // The job merges base and tasks itself (the TA row's merge, same
          // lambda) and so has each task's own model to scan.
          job.base_path = scenario.Path(scenario.base);
          job.task_models = ScenarioInputs(scenario, backdoored);
        } else {
          job.merged_model_path = path("TA", backdoored);
        }
        ASSIGN_OR_RETURN(job.calibration,
                         ScenarioLfpmCalibration(
                             scenario, ScenarioInputs(scenario, backdoored)));
        job.output_path = out;
        job.known_triggers = known_triggers;
        LfpmOptions lfpm = options.lfpm;
        lfpm.mode = mode;
        lfpm.metadata["mergeguard.scenario"] = scenario.name;
        if (backdoored) row.peak_rss_is_process_peak = !ResetPeakRss();
        ASSIGN_OR_RETURN(LfpmReport report, RunLfpmJob(job, lfpm));
        if (backdoored) {
          row.peak_rss_bytes = PeakRssBytes();
          row.seconds = report.seconds;
          row.seconds_per_step = report.seconds_per_step;
          ASSIGN_OR_RETURN(row.patch_overlap, PatchOverlaps(scenario, report));
          row.report = std::move(report);
        } else {
          row.clean_repaired = true;
          row.clean_report = std::move(report);
        }
        ASSIGN_OR_RETURN(ModelEvaluation evaluation,
                         EvaluateModelFile(scenario, out, options.eval));
        (backdoored ? row.row.backdoored : row.row.clean) =
            std::move(evaluation);
      }
      if (options.adaptive_check) {
        ASSIGN_OR_RETURN(
            row.adaptive,
            AdaptiveAttacks(scenario, path(row.row.method, true), options));
        if (row.clean_repaired) {
          ASSIGN_OR_RETURN(
              row.clean_adaptive,
              AdaptiveAttacks(scenario, path(row.row.method, false), options));
        }
      }
      rows.rows.push_back(std::move(row));
    }
    return rows;
  };
  absl::StatusOr<LfpmRows> rows = run();
  if (temporary) fs::remove_all(work_dir, error);
  return rows;
}

std::string LfpmRowsToText(const Scenario& scenario, const LfpmRows& rows) {
  std::vector<TableRow> table = {rows.ta};
  for (const LfpmRow& row : rows.rows) table.push_back(row.row);
  std::string out = TableToText(scenario, table);
  for (const LfpmRow& row : rows.rows) {
    if (!row.clean_repaired) {
      absl::StrAppendFormat(
          &out, "%s: CA is TA's (the clean merge was not repaired)\n",
          row.row.method);
    }
  }
  absl::StrAppendFormat(&out, "%-10s %8s %10s %10s %12s %10s %10s\n", "method",
                        "steps", "s/step", "total s", "peak RSS MiB", "|tau|",
                        "|tau|/|m|");
  for (const LfpmRow& row : rows.rows) {
    absl::StrAppendFormat(
        &out, "%-10s %8d %10.4f %10.1f %11.1f%s %10.4f %10.4f\n",
        row.row.method, row.report.steps, row.seconds_per_step, row.seconds,
        static_cast<double>(row.peak_rss_bytes) / (1024.0 * 1024.0),
        row.peak_rss_is_process_peak ? "*" : " ", row.report.tau_norm,
        row.report.merged_norm > 0
            ? row.report.tau_norm / row.report.merged_norm
            : 0.0);
  }
  out +=
      "path curve (backdoored run; mined-trigger ASR, loss) at alpha = "
      "0, .25, .5, .75, 1\n";
  for (const LfpmRow& row : rows.rows) {
    absl::StrAppendFormat(&out, "%-10s", row.row.method);
    for (const LfpmPathPoint& p : row.report.path) {
      absl::StrAppendFormat(&out, "  %5.1f%% %.3f", 100.0 * p.asr, p.loss);
    }
    out += "\n";
  }
  out +=
      "anomaly index (Neural Cleanse, MAD; > 2 is suspicious): merged -> "
      "repaired\n";
  for (const LfpmRow& row : rows.rows) {
    absl::StrAppendFormat(&out, "%-10s", row.row.method);
    for (size_t i = 0; i < row.report.anomaly_merged.size(); ++i) {
      const LfpmAnomaly& before = row.report.anomaly_merged[i];
      absl::StrAppendFormat(&out, "  %s %.2f (class %d)", before.task,
                            before.anomaly_index, before.smallest_class);
      if (i < row.report.anomaly_repaired.size()) {
        absl::StrAppendFormat(&out, " -> %.2f",
                              row.report.anomaly_repaired[i].anomaly_index);
      }
    }
    out += "\n";
  }
  bool any_overlap = false;
  for (const LfpmRow& row : rows.rows) {
    any_overlap = any_overlap || !row.patch_overlap.empty();
  }
  if (any_overlap) {
    out +=
        "mined triggers on the attack's patch (backdoored run): share of "
        "each mask on the patch / share of the patch covered [pattern gap, "
        "correlation with the patch's pattern where they meet]\n";
    for (const LfpmRow& row : rows.rows) {
      absl::StrAppendFormat(&out, "%-10s", row.row.method);
      for (const TriggerPatchOverlap& o : row.patch_overlap) {
        absl::StrAppendFormat(&out, "  %s", o.task);
        for (size_t j = 0; j < o.mass_on_patch.size(); ++j) {
          absl::StrAppendFormat(&out, " %.2f/%.2f", o.mass_on_patch[j],
                                o.patch_covered[j]);
          if (j < o.pattern_gap.size()) {
            absl::StrAppendFormat(&out, " [%.2f, %+.2f]", o.pattern_gap[j],
                                  o.pattern_correlation[j]);
          }
        }
      }
      out += "\n";
    }
  }
  if (!rows.ta_adaptive.empty()) {
    out +=
        "adaptive check (patch re-optimized against each model): "
        "original -> adaptive ASR\n";
    auto print = [&](const std::string& method,
                     const std::vector<AdaptiveAttack>& attacks) {
      absl::StrAppendFormat(&out, "%-10s", method);
      for (const AdaptiveAttack& a : attacks) {
        absl::StrAppendFormat(&out, "  %s %.2f%% -> %.2f%%", a.task,
                              100.0 * a.original_asr, 100.0 * a.adaptive_asr);
      }
      out += "\n";
    };
    print("TA", rows.ta_adaptive);
    for (const LfpmRow& row : rows.rows) print(row.row.method, row.adaptive);
    out += "the same attack on the clean fine-tunes' merge (no backdoor):\n";
    print("TA", rows.clean_ta_adaptive);
    for (const LfpmRow& row : rows.rows) {
      if (row.clean_repaired) print(row.row.method, row.clean_adaptive);
    }
  }
  return out;
}

std::string LfpmRowsToJson(const Scenario& scenario, const LfpmRows& rows) {
  std::vector<TableRow> table = {rows.ta};
  for (const LfpmRow& row : rows.rows) table.push_back(row.row);
  json lfpm = json::array();
  for (const LfpmRow& row : rows.rows) {
    json entry = {{"method", row.row.method},
                  {"seconds", row.seconds},
                  {"seconds_per_step", row.seconds_per_step},
                  {"peak_rss_bytes", row.peak_rss_bytes},
                  {"peak_rss_is_process_peak", row.peak_rss_is_process_peak},
                  {"adaptive", AdaptiveJson(row.adaptive)},
                  {"patch_overlap", PatchOverlapJson(row.patch_overlap)},
                  // False: the table's CA for this row is TA's, copied.
                  {"clean_repaired", row.clean_repaired},
                  {"report", json::parse(LfpmReportToJson(row.report))}};
    if (row.clean_repaired) {
      entry["clean_report"] = json::parse(LfpmReportToJson(row.clean_report));
      entry["clean_adaptive"] = AdaptiveJson(row.clean_adaptive);
    }
    lfpm.push_back(std::move(entry));
  }
  json root = {{"table", json::parse(TableToJson(scenario, table))},
               {"ta_adaptive", AdaptiveJson(rows.ta_adaptive)},
               {"clean_ta_adaptive", AdaptiveJson(rows.clean_ta_adaptive)},
               {"lfpm", lfpm}};
  return root.dump(2) + "\n";
}

}  // namespace mergeguard::bench
