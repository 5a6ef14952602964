// The `mergeguard` command-line tool. Flags are parsed here and nowhere else.

#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/exit_codes.h"
#include "client/local_merge.h"
#include "client/merge_config.h"

namespace {

using mergeguard::ExitCodeFor;

constexpr char kUsage[] = R"(mergeguard: sanitize model merges against backdoors

Usage: mergeguard <command> [flags]

Commands:
  merge     Run a merge job in-process (no server) from a YAML config.
  help      Show this help, or `mergeguard help <command>`.

Exit codes: 0 ok, 1 failure, 2 usage, 3 invalid input, 4 resource exhausted,
5 authentication, 6 server unavailable or deadline, 7 cancelled.
)";

constexpr char kMergeUsage[] = R"(mergeguard merge: run a merge in-process

Usage: mergeguard merge --config FILE --out DIR [--local]

Flags:
  --config FILE   YAML job file (method, base, models, parameters).
  --out DIR       Output directory; gets model.safetensors and report.json.
  --local         Run in this process (the default for `merge`).

Example merge.yaml:
  method: ties
  base: base.safetensors
  models:
    - {name: mnist, path: mnist.safetensors}
    - {name: fashion, path: fashion/, weight: 0.5}   # dir or LoRA adapter
  parameters: {lambda: 1.0, top_k: 20, trim_scope: global, disjoint: mean}

Example:
  mergeguard merge --config merge.yaml --out merged/
)";

// ParsedFlags holds --name value pairs and bare --switches of one command.
struct ParsedFlags {
  std::map<std::string, std::string> values;
  std::vector<std::string> positional;
};

// ParseFlags accepts `--name value`, `--name=value` and the switches listed
// in `switches`. Unknown flags are usage errors.
std::optional<ParsedFlags> ParseFlags(int argc, char** argv, int first,
                                      const std::vector<std::string>& valued,
                                      const std::vector<std::string>& switches,
                                      std::string* error) {
  ParsedFlags flags;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      flags.positional.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    auto is = [&](const std::vector<std::string>& list) {
      for (const std::string& s : list) {
        if (s == name) return true;
      }
      return false;
    };
    if (is(switches)) {
      flags.values[name] = value.value_or("true");
    } else if (is(valued)) {
      if (!value) {
        if (i + 1 >= argc) {
          *error = absl::StrCat("flag --", name, " needs a value");
          return std::nullopt;
        }
        value = argv[++i];
      }
      flags.values[name] = *value;
    } else {
      *error = absl::StrCat("unknown flag --", name);
      return std::nullopt;
    }
  }
  return flags;
}

int UsageError(const std::string& message, const char* usage) {
  std::cerr << "mergeguard: " << message << "\n\n" << usage;
  return mergeguard::kExitUsage;
}

int Fail(const absl::Status& status) {
  std::cerr << "mergeguard: error [" << absl::StatusCodeToString(status.code())
            << "]: " << status.message() << "\n";
  return ExitCodeFor(status);
}

int RunMerge(int argc, char** argv) {
  std::string error;
  std::optional<ParsedFlags> flags =
      ParseFlags(argc, argv, 2, {"config", "out"}, {"local", "help"}, &error);
  if (!flags) return UsageError(error, kMergeUsage);
  if (flags->values.count("help")) {
    std::cout << kMergeUsage;
    return mergeguard::kExitOk;
  }
  if (!flags->positional.empty()) {
    return UsageError(
        absl::StrCat("unexpected argument \"", flags->positional[0], "\""),
        kMergeUsage);
  }
  if (!flags->values.count("config")) {
    return UsageError("merge needs --config FILE", kMergeUsage);
  }
  if (!flags->values.count("out")) {
    return UsageError("merge needs --out DIR", kMergeUsage);
  }
  absl::StatusOr<mergeguard::MergeConfig> config =
      mergeguard::LoadMergeConfig(flags->values["config"]);
  if (!config.ok()) return Fail(config.status());
  absl::StatusOr<mergeguard::LocalMergeResult> result =
      mergeguard::RunLocalMerge(*config, flags->values["out"]);
  if (!result.ok()) return Fail(result.status());
  std::cout << absl::StrFormat(
      "merged %d tensors (+%d head tensors) with %s in %.2fs\nmodel:  %s\n"
      "report: %s\n",
      result->report.merged_tensors, result->report.head_tensors,
      mergeguard::MergeMethodName(config->options.method),
      result->report.seconds, result->model_path, result->report_path);
  return mergeguard::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return UsageError("no command given", kUsage);
  std::string command = argv[1];
  if (command == "help" || command == "--help" || command == "-h") {
    if (argc > 2 && std::strcmp(argv[2], "merge") == 0) {
      std::cout << kMergeUsage;
    } else {
      std::cout << kUsage;
    }
    return mergeguard::kExitOk;
  }
  if (command == "merge") return RunMerge(argc, argv);
  return UsageError(absl::StrCat("unknown command \"", command, "\""), kUsage);
}
