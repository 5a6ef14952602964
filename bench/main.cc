// mergeguard-bench: builds backdoor benchmark scenarios, evaluates models on
// them, prints the merge table, and measures merge throughput. Flags are
// parsed here only and turned into the libraries' options structs.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "bench/dam_rows.h"
#include "nlohmann/json.hpp"
#ifdef MERGEGUARD_BENCH_HAS_SERVICE
#include "bench/load_test.h"
#include "bench/transfer_bench.h"
#endif
#include "bench/lfpm_rows.h"
#include "bench/merge_table.h"
#include "bench/merge_throughput.h"
#include "bench/run_stats.h"
#include "bench/scenario_builder.h"
#include "bench/scenario_eval.h"
#include "core/defense_params.h"
#include "core/evaluation.h"
#include "core/probe.h"
#include "core/safetensors.h"
#include "core/scenario.h"
#include "core/status_macros.h"

namespace mergeguard::bench {
namespace {

constexpr char kUsage[] = R"(usage: mergeguard-bench COMMAND [flags]

commands:
  build --preset default|tiny --attack badnets|blended|badmerging
        --arch cnn|vit --out DIR [--trigger-size N] [--target K]
        [--compromised A,B] [--seed S] [--pattern white|checkerboard|noise]
        [--location bottom_right|bottom_left|top_right|top_left|center]
        [--poison-rate P] [--blend-alpha A] [--threads N] [--cache-dir DIR]
        [--mnist-dir DIR] [--fashion-dir DIR] [--font-dir DIR] [--force]
        [--train-attacked-head] [--badmerging-interpolation features|weights]
        [--badmerging-weight W] [--badmerging-clean-weight C]
        [--badmerging-max-norm R] [--finetune-steps N] [--finetune-lr X]
        [--finetune-train-head] [--pretrain-steps N] [--pretrain-shards N]
      Builds a scenario directory (reused when DIR already holds the same
      configuration). --pretrain-shards (default 2) splits each pretraining
      batch into data-parallel shards; it shapes the base. --threads only
      says how many jobs run at once: it does not change what is built.
  eval --scenario DIR --model FILE [--json] [--threads N]
      Per-task accuracy, mean, normalized accuracy and ASR of a model.
  eval --scenario DIR --rows NAME=CLEAN:BACKDOORED[,NAME=..] [--json]
      The table (CA, BA, ASR) of merges made elsewhere, e.g. by the
      service: per method, its merge of the clean fine-tunes and its merge
      with the backdoored ones.
  table --scenario DIR [--json] [--threads N] [--work-dir DIR]
        [--methods ta,ties,adamerging,dam,lfpm-full,lfpm-peft | --defenses]
        [--adamerging K=V,..] [--dam K=V,..] [--lfpm K=V,..] [--known-trigger]
      Merges on clean-only and with-backdoor inputs: CA, BA and ASR side by
      side, then each method's cost (wall time, peak RSS). Default methods:
      ta,ties; --defenses runs all six in one run. K=V pairs are the job
      file's parameters (`mergeguard params METHOD` lists them), e.g.
      --dam steps=200,backdoor_loss=consistency. --known-trigger (an oracle
      diagnostic) gives DAM and LFPM the attack's own trigger for each
      compromised task instead of one they find; the DAM row is then named
      DAM-oracle.
  lfpm --scenario DIR [--modes full,peft] [--lfpm K=V,..] [--threads N]
       [--work-dir DIR] [--no-clean-repair] [--no-adaptive] [--json]
       [--known-trigger]
      TA and LFPM rows as in `table`, plus what only LFPM has: the path
      curve, the mined triggers, the anomaly index per task, seconds per
      outer step, and the adaptive check (BadMerging's patch re-optimized
      against the repaired model, and against TA for reference).
      --no-clean-repair skips repairing the clean merge: the LFPM rows' CA
      is then TA's, and the JSON marks them "clean_repaired": false.
      --known-trigger is an oracle diagnostic: LFPM is given the attack's
      own trigger and target for each compromised task instead of mining.
  probe --scenario DIR --out DIR [--examples N]
      Writes a probe set (core/probe.h) per compromised task: its held-out
      test inputs with the scenario's trigger and target, for jobs'
      before/after probe metrics. Prints TASK=FILE per line.
  merge [--work-dir DIR] [--models N] [--model-mb MB] [--method NAME]
        [--threads N] [--repetitions N]
      Data-free merge throughput against a plain copy, and peak RSS.
  service-transfer --target HOST:PORT --token T [--tls-ca FILE] [--mb MB]
        [--repetitions N] [--iperf3 PATH] [--iperf3-port P] [--scratch-dir D]
        [--upload-only]
      Upload and download throughput of a running server, next to iperf3's
      raw TCP loopback throughput measured in the same run.
  service-load --target HOST:PORT --token T [--tls-ca FILE] [--clients N]
        [--jobs-per-client N] [--model-parameters N]
      Concurrent clients each uploading, submitting a TA job and watching
      it: jobs per second, latency percentiles, errors.
)";

// Flags holds `--name value`, `--name=value` and bare boolean flags.
class Flags {
 public:
  static absl::StatusOr<Flags> Parse(int argc, char** argv,
                                     const std::set<std::string>& valued,
                                     const std::set<std::string>& booleans) {
    Flags flags;
    for (int i = 2; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg.rfind("--", 0) != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("unexpected argument \"", arg, "\""));
      }
      arg = arg.substr(2);
      std::string value;
      bool has_value = false;
      if (size_t eq = arg.find('='); eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
        has_value = true;
      }
      if (booleans.count(arg) > 0) {
        if (has_value) {
          return absl::InvalidArgumentError(
              absl::StrCat("--", arg, " takes no value"));
        }
        flags.values_[arg] = "true";
        continue;
      }
      if (valued.count(arg) == 0) {
        return absl::InvalidArgumentError(absl::StrCat("unknown flag --", arg));
      }
      if (!has_value) {
        if (i + 1 >= argc) {
          return absl::InvalidArgumentError(
              absl::StrCat("--", arg, " needs a value"));
        }
        value = argv[++i];
      }
      flags.values_[arg] = value;
    }
    return flags;
  }

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string Get(const std::string& name,
                  const std::string& fallback = "") const {
    auto it = values_.find(name);
    return it == values_.end() ? fallback : it->second;
  }
  absl::StatusOr<std::string> Required(const std::string& name) const {
    if (!Has(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " is required"));
    }
    return Get(name);
  }
  template <typename T>
  absl::Status Number(const std::string& name, T* out) const {
    if (!Has(name)) return absl::OkStatus();
    if constexpr (std::is_floating_point_v<T>) {
      double value;
      if (!absl::SimpleAtod(Get(name), &value)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " must be a number"));
      }
      *out = static_cast<T>(value);
    } else {
      int64_t value;
      if (!absl::SimpleAtoi(Get(name), &value) ||
          (std::is_unsigned_v<T> && value < 0)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, " must be an integer"));
      }
      *out = static_cast<T>(value);
    }
    return absl::OkStatus();
  }

 private:
  std::map<std::string, std::string> values_;
};

absl::Status RunBuild(int argc, char** argv) {
  absl::StatusOr<Flags> parsed =
      Flags::Parse(argc, argv,
                   {"preset",
                    "attack",
                    "arch",
                    "trigger-size",
                    "target",
                    "compromised",
                    "seed",
                    "out",
                    "pattern",
                    "location",
                    "poison-rate",
                    "blend-alpha",
                    "threads",
                    "cache-dir",
                    "mnist-dir",
                    "fashion-dir",
                    "font-dir",
                    "badmerging-interpolation",
                    "badmerging-weight",
                    "badmerging-clean-weight",
                    "badmerging-max-norm",
                    "finetune-steps",
                    "finetune-lr",
                    "pretrain-steps",
                    "pretrain-shards"},
                   {"force", "train-attacked-head", "finetune-train-head"});
  if (!parsed.ok()) return parsed.status();
  const Flags& flags = *parsed;
  BuildOptions options;
  absl::StatusOr<std::string> out = flags.Required("out");
  if (!out.ok()) return out.status();
  options.out_dir = *out;
  absl::StatusOr<Preset> preset = ParsePreset(flags.Get("preset", "default"));
  if (!preset.ok()) return preset.status();
  options.preset = *preset;
  absl::StatusOr<Architecture> architecture =
      ParseArchitecture(flags.Get("arch", "cnn"));
  if (!architecture.ok()) return architecture.status();
  options.architecture = *architecture;
  absl::StatusOr<AttackKind> attack =
      ParseAttackKind(flags.Get("attack", "badmerging"));
  if (!attack.ok()) return attack.status();
  options.attack.kind = *attack;
  RETURN_IF_ERROR(flags.Number("trigger-size", &options.attack.trigger_size));
  RETURN_IF_ERROR(flags.Number("target", &options.attack.target_class));
  RETURN_IF_ERROR(flags.Number("seed", &options.seed));
  RETURN_IF_ERROR(flags.Number("poison-rate", &options.attack.poison_rate));
  RETURN_IF_ERROR(flags.Number("blend-alpha", &options.attack.blend_alpha));
  RETURN_IF_ERROR(
      flags.Number("badmerging-weight", &options.attack.badmerging_weight));
  RETURN_IF_ERROR(flags.Number("badmerging-clean-weight",
                               &options.attack.badmerging_clean_weight));
  RETURN_IF_ERROR(
      flags.Number("badmerging-max-norm", &options.attack.badmerging_max_norm));
  RETURN_IF_ERROR(flags.Number("finetune-steps", &options.finetune_steps));
  RETURN_IF_ERROR(flags.Number("finetune-lr", &options.finetune_learning_rate));
  RETURN_IF_ERROR(flags.Number("pretrain-steps", &options.pretrain_steps));
  RETURN_IF_ERROR(flags.Number("pretrain-shards", &options.pretrain_shards));
  options.finetune_train_head = flags.Has("finetune-train-head");
  if (options.attack.badmerging_clean_weight < 0.0 ||
      options.attack.badmerging_max_norm < 0.0 || options.finetune_steps < 0 ||
      options.finetune_learning_rate < 0.0 || options.pretrain_steps < 0) {
    return absl::InvalidArgumentError(
        "--badmerging-clean-weight, --badmerging-max-norm, --finetune-steps, "
        "--finetune-lr and --pretrain-steps must not be negative");
  }
  RETURN_IF_ERROR(flags.Number("threads", &options.threads));
  if (flags.Has("compromised")) {
    options.attack.compromised =
        absl::StrSplit(flags.Get("compromised"), ',', absl::SkipEmpty());
  }
  options.attack.pattern = flags.Get("pattern");
  if (flags.Has("location")) {
    absl::StatusOr<TriggerLocation> location =
        ParseTriggerLocation(flags.Get("location"));
    if (!location.ok()) return location.status();
    options.attack.location = *location;
  }
  if (!(options.attack.poison_rate > 0.0 &&
        options.attack.poison_rate <= 1.0)) {
    return absl::InvalidArgumentError("--poison-rate must be in (0, 1]");
  }
  if (flags.Has("mnist-dir"))
    options.sources.mnist_dir = flags.Get("mnist-dir");
  if (flags.Has("fashion-dir")) {
    options.sources.fashion_mnist_dir = flags.Get("fashion-dir");
  }
  if (flags.Has("font-dir"))
    options.sources.font_dirs = {flags.Get("font-dir")};
  const std::filesystem::path out_path =
      std::filesystem::absolute(options.out_dir);
  options.cache_dir =
      flags.Get("cache-dir",
                (out_path.parent_path() / ".mergeguard-bench-cache").string());
  options.force = flags.Has("force");
  options.attack.train_attacked_head = flags.Has("train-attacked-head");
  if (flags.Has("badmerging-interpolation")) {
    ASSIGN_OR_RETURN(
        options.attack.badmerging_interpolation,
        ParseBadMergingInterpolation(flags.Get("badmerging-interpolation")));
  }
  options.log = [](const std::string& line) { std::cerr << line << std::endl; };
  absl::StatusOr<BuildResult> result = BuildScenario(options);
  if (!result.ok()) return result.status();
  std::cout << (result->reused ? "reused " : "built ") << result->scenario.dir
            << " (" << result->scenario.name << ", configuration "
            << result->scenario.config_hash.substr(0, 12) << ")" << std::endl;
  return absl::OkStatus();
}

// EvalRows evaluates `--rows NAME=CLEAN:BACKDOORED,...` into table rows.
absl::Status EvalRows(const Scenario& scenario, const Flags& flags,
                      const ScenarioEvalOptions& options) {
  std::vector<TableRow> rows;
  for (absl::string_view entry :
       absl::StrSplit(flags.Get("rows"), ',', absl::SkipEmpty())) {
    std::vector<std::string> parts =
        absl::StrSplit(entry, absl::ByAnyChar("=:"));
    if (parts.size() != 3 || parts[0].empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--rows: expected NAME=CLEAN_MODEL:BACKDOORED_MODEL, got \"", entry,
          "\""));
    }
    TableRow row;
    row.method = parts[0];
    ASSIGN_OR_RETURN(row.clean, EvaluateModelFile(scenario, parts[1], options));
    ASSIGN_OR_RETURN(row.backdoored,
                     EvaluateModelFile(scenario, parts[2], options));
    rows.push_back(std::move(row));
  }
  std::cout << (flags.Has("json") ? TableToJson(scenario, rows)
                                  : TableToText(scenario, rows));
  return absl::OkStatus();
}

absl::Status RunEval(int argc, char** argv) {
  absl::StatusOr<Flags> parsed = Flags::Parse(
      argc, argv, {"scenario", "model", "rows", "threads"}, {"json"});
  if (!parsed.ok()) return parsed.status();
  const Flags& flags = *parsed;
  absl::StatusOr<std::string> dir = flags.Required("scenario");
  if (!dir.ok()) return dir.status();
  ScenarioEvalOptions options;
  RETURN_IF_ERROR(flags.Number("threads", &options.threads));
  absl::StatusOr<Scenario> scenario = LoadScenario(*dir);
  if (!scenario.ok()) return scenario.status();
  if (flags.Has("rows")) return EvalRows(*scenario, flags, options);
  absl::StatusOr<std::string> model = flags.Required("model");
  if (!model.ok()) return model.status();
  absl::StatusOr<ModelEvaluation> evaluation =
      EvaluateModelFile(*scenario, *model, options);
  if (!evaluation.ok()) return evaluation.status();
  std::cout << (flags.Has("json")
                    ? EvaluationToJson(*scenario, *model, *evaluation)
                    : EvaluationToText(*evaluation));
  return absl::OkStatus();
}

// ParseKeyValues reads `--flag k=v,k=v`; a piece without '=' continues the
// previous value, so list values keep their commas (layer_prefixes=a.,b.).
absl::StatusOr<DefenseParameters> ParseKeyValues(const Flags& flags,
                                                 const std::string& flag) {
  DefenseParameters parameters;
  std::string last;
  for (absl::string_view piece :
       absl::StrSplit(flags.Get(flag), ',', absl::SkipEmpty())) {
    size_t eq = piece.find('=');
    if (eq == absl::string_view::npos) {
      if (last.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--", flag, ": expected KEY=VALUE pairs, got \"", piece, "\""));
      }
      absl::StrAppend(&parameters[last], ",", piece);
      continue;
    }
    last = std::string(piece.substr(0, eq));
    parameters[last] = std::string(piece.substr(eq + 1));
  }
  return parameters;
}

// Cost is what one table method's merges cost, both runs together.
struct Cost {
  double seconds = 0.0;
  int64_t peak_rss_bytes = 0;
  int runs = 0;
  // DAM's report summary (mergeguard.dam_summary in the merged file's
  // metadata) of each run (the clean merge, then the backdoored one), so a
  // table keeps what DAM scanned.
  std::vector<nlohmann::json> dam_summaries;
};

// DamSummaryOf reads the DAM report summary a merge wrote into its file's
// metadata; null for other methods' files.
nlohmann::json DamSummaryOf(const std::string& path) {
  absl::StatusOr<std::shared_ptr<const SafetensorsFile>> file =
      SafetensorsFile::Open(path);
  if (!file.ok()) return nullptr;
  const auto& metadata = (*file)->layout().metadata;
  auto found = metadata.find("mergeguard.dam_summary");
  if (found == metadata.end()) return nullptr;
  return nlohmann::json::parse(found->second, nullptr, false);
}

// Measured wraps `producer` so each merge's wall time and peak RSS land in
// `cost`.
RowProducer Measured(RowProducer producer, Cost* cost) {
  auto merge = producer.merge;
  producer.merge = [merge, cost](const Scenario& scenario,
                                 const std::vector<MergeInput>& inputs,
                                 const std::string& output_path) {
    ResetPeakRss();
    const auto start = std::chrono::steady_clock::now();
    absl::Status status = merge(scenario, inputs, output_path);
    cost->seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start)
            .count();
    cost->peak_rss_bytes = std::max(cost->peak_rss_bytes, PeakRssBytes());
    ++cost->runs;
    if (status.ok()) {
      nlohmann::json summary = DamSummaryOf(output_path);
      if (!summary.is_null()) cost->dam_summaries.push_back(std::move(summary));
    }
    return status;
  };
  return producer;
}

// LfpmOptionsFromFlags applies `--lfpm K=V,..` to LFPM's defaults. LFPM
// always repairs the TA row's merge, so merge_lambda is refused.
absl::StatusOr<LfpmOptions> LfpmOptionsFromFlags(const Flags& flags,
                                                 int threads) {
  ASSIGN_OR_RETURN(DefenseParameters params, ParseKeyValues(flags, "lfpm"));
  if (params.count(kLfpmMergeLambdaParameter)) {
    return absl::InvalidArgumentError(
        "--lfpm merge_lambda: LFPM repairs the TA row's merge (lambda 0.3)");
  }
  LfpmOptions lfpm;
  lfpm.threads = threads;
  RETURN_IF_ERROR(ApplyLfpmParameters(params, &lfpm));
  return lfpm;
}

absl::StatusOr<std::vector<RowProducer>> TableProducers(const Flags& flags,
                                                        int threads) {
  std::string methods = flags.Get("methods", "ta,ties");
  if (flags.Has("defenses")) {
    methods = "ta,ties,adamerging,dam,lfpm-full,lfpm-peft";
  }
  ASSIGN_OR_RETURN(DefenseParameters ada_params,
                   ParseKeyValues(flags, "adamerging"));
  ASSIGN_OR_RETURN(DefenseParameters dam_params, ParseKeyValues(flags, "dam"));
  AdaMergingOptions adamerging;
  adamerging.threads = threads;
  RETURN_IF_ERROR(ApplyAdaMergingParameters(ada_params, &adamerging));
  DamOptions dam;
  dam.threads = threads;
  RETURN_IF_ERROR(ApplyDamParameters(dam_params, &dam));
  ASSIGN_OR_RETURN(LfpmOptions lfpm, LfpmOptionsFromFlags(flags, threads));

  std::vector<RowProducer> producers;
  const std::vector<RowProducer> undefended = UndefendedProducers();
  for (absl::string_view method :
       absl::StrSplit(methods, ',', absl::SkipEmpty())) {
    if (method == "ta") {
      producers.push_back(undefended[0]);
    } else if (method == "ties") {
      producers.push_back(undefended[1]);
    } else if (method == "adamerging") {
      producers.push_back(AdaMergingProducer(adamerging));
    } else if (method == "dam") {
      producers.push_back(
          DamProducer(dam, flags.Has("known-trigger") ? "DAM-oracle" : "DAM",
                      flags.Has("known-trigger")));
    } else if (method == "lfpm-full" || method == "lfpm-peft") {
      LfpmOptions options = lfpm;
      options.mode = method == "lfpm-full" ? LfpmMode::kFull : LfpmMode::kPeft;
      producers.push_back(LfpmProducer(
          options, method == "lfpm-full" ? "LFPM-full" : "LFPM-peft",
          flags.Has("known-trigger")));
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "--methods: unknown method \"", method,
          "\" (expected ta, ties, adamerging, dam, lfpm-full, lfpm-peft)"));
    }
  }
  return producers;
}

absl::Status RunTableCommand(int argc, char** argv) {
  absl::StatusOr<Flags> parsed =
      Flags::Parse(argc, argv,
                   {"scenario", "threads", "work-dir", "methods", "adamerging",
                    "dam", "lfpm"},
                   {"json", "defenses", "known-trigger"});
  if (!parsed.ok()) return parsed.status();
  const Flags& flags = *parsed;
  absl::StatusOr<std::string> dir = flags.Required("scenario");
  if (!dir.ok()) return dir.status();
  TableOptions options;
  RETURN_IF_ERROR(flags.Number("threads", &options.eval.threads));
  options.work_dir = flags.Get("work-dir");
  absl::StatusOr<Scenario> scenario = LoadScenario(*dir);
  if (!scenario.ok()) return scenario.status();
  ASSIGN_OR_RETURN(std::vector<RowProducer> producers,
                   TableProducers(flags, options.eval.threads));
  std::vector<Cost> costs(producers.size());
  for (size_t i = 0; i < producers.size(); ++i) {
    producers[i] = Measured(producers[i], &costs[i]);
  }
  absl::StatusOr<std::vector<TableRow>> rows =
      RunTable(*scenario, producers, options);
  if (!rows.ok()) return rows.status();
  if (flags.Has("json")) {
    nlohmann::json table = nlohmann::json::parse(TableToJson(*scenario, *rows));
    for (size_t i = 0; i < producers.size(); ++i) {
      table["costs"].push_back({{"method", producers[i].name},
                                {"seconds", costs[i].seconds},
                                {"runs", costs[i].runs},
                                {"peak_rss_bytes", costs[i].peak_rss_bytes}});
      if (!costs[i].dam_summaries.empty()) {
        table["costs"].back()["dam_summaries"] = costs[i].dam_summaries;
      }
    }
    std::cout << table.dump(2) << std::endl;
    return absl::OkStatus();
  }
  std::cout << TableToText(*scenario, *rows) << "\ncost (clean-only and "
            << "with-backdoor merges together; peak RSS of the process "
               "during the method)\n";
  for (size_t i = 0; i < producers.size(); ++i) {
    std::cout << absl::StrFormat("  %-10s %8.1f s  %7.1f MB peak RSS\n",
                                 producers[i].name, costs[i].seconds,
                                 costs[i].peak_rss_bytes / 1048576.0);
  }
  return absl::OkStatus();
}

absl::Status RunLfpmCommand(int argc, char** argv) {
  ASSIGN_OR_RETURN(
      Flags flags,
      Flags::Parse(
          argc, argv, {"scenario", "threads", "work-dir", "modes", "lfpm"},
          {"json", "no-clean-repair", "no-adaptive", "known-trigger"}));
  ASSIGN_OR_RETURN(std::string dir, flags.Required("scenario"));
  ASSIGN_OR_RETURN(Scenario scenario, LoadScenario(dir));
  LfpmRowOptions options;
  RETURN_IF_ERROR(flags.Number("threads", &options.eval.threads));
  ASSIGN_OR_RETURN(options.lfpm,
                   LfpmOptionsFromFlags(flags, options.eval.threads));
  options.modes.clear();
  for (absl::string_view mode : absl::StrSplit(flags.Get("modes", "full,peft"),
                                               ',', absl::SkipEmpty())) {
    ASSIGN_OR_RETURN(LfpmMode parsed, ParseLfpmMode(mode));
    options.modes.push_back(parsed);
  }
  options.repair_clean_merge = !flags.Has("no-clean-repair");
  options.adaptive_check = !flags.Has("no-adaptive");
  options.known_trigger = flags.Has("known-trigger");
  options.work_dir = flags.Get("work-dir");
  ASSIGN_OR_RETURN(LfpmRows rows, RunLfpmRows(scenario, options));
  std::cout << (flags.Has("json") ? LfpmRowsToJson(scenario, rows)
                                  : LfpmRowsToText(scenario, rows))
            << std::endl;
  return absl::OkStatus();
}

#ifdef MERGEGUARD_BENCH_HAS_SERVICE
absl::Status RunServiceTransfer(int argc, char** argv) {
  ASSIGN_OR_RETURN(Flags flags, Flags::Parse(argc, argv,
                                             {"target", "token", "tls-ca", "mb",
                                              "repetitions", "iperf3",
                                              "iperf3-port", "scratch-dir"},
                                             {"upload-only"}));
  TransferBenchOptions options;
  ASSIGN_OR_RETURN(options.target, flags.Required("target"));
  ASSIGN_OR_RETURN(options.token, flags.Required("token"));
  options.tls_ca_file = flags.Get("tls-ca");
  uint64_t mb = options.bytes >> 20;
  RETURN_IF_ERROR(flags.Number("mb", &mb));
  options.bytes = mb << 20;
  RETURN_IF_ERROR(flags.Number("repetitions", &options.repetitions));
  options.iperf3 = flags.Get("iperf3", options.iperf3);
  RETURN_IF_ERROR(flags.Number("iperf3-port", &options.iperf3_port));
  options.scratch_dir = flags.Get("scratch-dir", options.scratch_dir);
  options.upload_only = flags.Has("upload-only");
  ASSIGN_OR_RETURN(TransferBenchReport report, RunTransferBench(options));
  std::cout << FormatTransferBenchReport(report);
  return absl::OkStatus();
}

absl::Status RunServiceLoad(int argc, char** argv) {
  ASSIGN_OR_RETURN(Flags flags,
                   Flags::Parse(argc, argv,
                                {"target", "token", "tls-ca", "clients",
                                 "jobs-per-client", "model-parameters"},
                                {}));
  LoadTestOptions options;
  ASSIGN_OR_RETURN(options.target, flags.Required("target"));
  ASSIGN_OR_RETURN(options.token, flags.Required("token"));
  options.tls_ca_file = flags.Get("tls-ca");
  RETURN_IF_ERROR(flags.Number("clients", &options.clients));
  RETURN_IF_ERROR(flags.Number("jobs-per-client", &options.jobs_per_client));
  RETURN_IF_ERROR(flags.Number("model-parameters", &options.model_parameters));
  ASSIGN_OR_RETURN(LoadTestReport report, RunLoadTest(options));
  std::cout << FormatLoadTestReport(report);
  return absl::OkStatus();
}
#endif

absl::Status RunProbeExport(int argc, char** argv) {
  ASSIGN_OR_RETURN(
      Flags flags,
      Flags::Parse(argc, argv, {"scenario", "out", "examples"}, {}));
  ASSIGN_OR_RETURN(std::string dir, flags.Required("scenario"));
  ASSIGN_OR_RETURN(std::string out, flags.Required("out"));
  int64_t examples = 1000;
  RETURN_IF_ERROR(flags.Number("examples", &examples));
  ASSIGN_OR_RETURN(Scenario scenario, LoadScenario(dir));
  if (!scenario.attack) {
    return absl::FailedPreconditionError(
        absl::StrCat("scenario ", dir, " has no attack to probe"));
  }
  ASSIGN_OR_RETURN(Trigger trigger, LoadScenarioTrigger(scenario));
  std::error_code error;
  std::filesystem::create_directories(out, error);
  for (const ScenarioTask& task : scenario.tasks) {
    if (!task.compromised) continue;
    ASSIGN_OR_RETURN(LabeledImages test,
                     LoadLabeledImages(scenario.Path(task.test)));
    ProbeSet probe;
    probe.task = task.name;
    const int64_t n = std::min<int64_t>(examples, test.size());
    probe.images.inputs = test.inputs.slice(0, 0, n).to(at::kFloat);
    probe.images.labels = test.labels.slice(0, 0, n);
    probe.trigger = trigger;
    probe.target = scenario.attack->target_class;
    const std::string path =
        absl::StrCat(out, "/", task.name, "_probe.safetensors");
    RETURN_IF_ERROR(SaveProbeSet(path, probe));
    std::cout << task.name << "=" << path << std::endl;
  }
  return absl::OkStatus();
}

absl::Status RunMergeThroughput(int argc, char** argv) {
  absl::StatusOr<Flags> parsed = Flags::Parse(
      argc, argv,
      {"work-dir", "models", "model-mb", "method", "threads", "repetitions"},
      {});
  if (!parsed.ok()) return parsed.status();
  const Flags& flags = *parsed;
  MergeThroughputOptions options;
  if (flags.Has("work-dir")) options.work_dir = flags.Get("work-dir");
  RETURN_IF_ERROR(flags.Number("models", &options.num_models));
  uint64_t model_mb = options.model_bytes >> 20;
  RETURN_IF_ERROR(flags.Number("model-mb", &model_mb));
  options.model_bytes = model_mb << 20;
  RETURN_IF_ERROR(flags.Number("threads", &options.threads));
  RETURN_IF_ERROR(flags.Number("repetitions", &options.repetitions));
  if (flags.Has("method")) {
    absl::StatusOr<MergeMethod> method = ParseMergeMethod(flags.Get("method"));
    if (!method.ok()) return method.status();
    options.method = *method;
  }
  absl::StatusOr<MergeThroughputResult> result =
      RunMergeThroughputBenchmark(options);
  if (!result.ok()) return result.status();
  std::cout << absl::StrFormat(
      "model %.0f MiB x %d inputs, %s\n"
      "merge %.2f s (%.1f MiB/s read+write)\n"
      "copy  %.2f s (%.1f MiB/s)\n"
      "throughput ratio %.2f (target >= 0.7)\n"
      "peak RSS merge %.0f MiB, copy %.0f MiB, merge/model %.2f (target < 2)\n",
      result->model_bytes / 1048576.0, options.num_models,
      MergeMethodName(options.method), result->merge_seconds,
      result->merge_bytes_per_second / 1048576.0, result->copy_seconds,
      result->copy_bytes_per_second / 1048576.0, result->throughput_ratio,
      result->merge_peak_rss_bytes / 1048576.0,
      result->copy_peak_rss_bytes / 1048576.0, result->rss_to_model_ratio);
  return absl::OkStatus();
}

int Main(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" ||
      std::string(argv[1]) == "help") {
    std::cout << kUsage;
    return argc < 2 ? 2 : 0;
  }
  const std::string command = argv[1];
  absl::Status status;
  if (command == "build") {
    status = RunBuild(argc, argv);
  } else if (command == "eval") {
    status = RunEval(argc, argv);
  } else if (command == "table") {
    status = RunTableCommand(argc, argv);
  } else if (command == "lfpm") {
    status = RunLfpmCommand(argc, argv);
  } else if (command == "probe") {
    status = RunProbeExport(argc, argv);
#ifdef MERGEGUARD_BENCH_HAS_SERVICE
  } else if (command == "service-transfer") {
    status = RunServiceTransfer(argc, argv);
  } else if (command == "service-load") {
    status = RunServiceLoad(argc, argv);
#endif
  } else if (command == "merge") {
    status = RunMergeThroughput(argc, argv);
  } else {
    std::cerr << "unknown command \"" << command << "\"\n" << kUsage;
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "mergeguard-bench " << command << ": " << status << std::endl;
    return absl::IsInvalidArgument(status) ? 2 : 1;
  }
  return 0;
}

}  // namespace
}  // namespace mergeguard::bench

int main(int argc, char** argv) { return mergeguard::bench::Main(argc, argv); }
