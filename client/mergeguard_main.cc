// The `mergeguard` command-line tool. Flags are parsed here and nowhere else.

#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/exit_codes.h"
#include "client/local_merge.h"
#include "client/merge_config.h"
#include "client/progress_format.h"
#include "client/remote_commands.h"

namespace {

using mergeguard::ExitCodeFor;

constexpr char kUsage[] = R"(mergeguard: sanitize model merges against backdoors

Usage: mergeguard <command> [flags]     (mergeguard <command> --help)

Commands:
  merge     Run a job in-process (no server) from a YAML job file.
  run       Upload, submit, watch and download in one (or --local).
  upload    Upload files to the server's store.
  submit    Upload a job file's inputs and submit the job.
  watch     Follow a job's progress until it ends.
  download  Fetch a finished job's model and report (resumable).
  jobs      List your jobs.
  cancel    Cancel a job.
  health    Check the server's health.
  params    List the parameters of adamerging, dam or lfpm.

Methods (`method:` in the job file): task_arithmetic, ties, dare,
breadcrumbs, consensus, model_stock, weighted_average (data-free), and
adamerging, dam, lfpm (need an architecture and calibration data).

Server flags (all server commands):
  --server HOST:PORT  default $MERGEGUARD_SERVER or localhost:50051
  --token TOKEN       bearer token; default $MERGEGUARD_TOKEN
  --tls-ca FILE       verify the server with this CA (turns TLS on)
  --timeout SECONDS   deadline of each call (default 30; transfers 7200)

Exit codes: 0 ok, 1 failure, 2 usage, 3 invalid input, 4 resource exhausted,
5 authentication, 6 server unavailable or deadline, 7 cancelled.
)";

struct CommandHelp {
  const char* usage;
  const char* text;
};

const std::map<std::string, CommandHelp>& Helps() {
  static const auto* helps = new std::map<std::string, CommandHelp>{
      {"merge",
       {"mergeguard merge --config FILE --out DIR [--local]",
        R"(Runs the job in this process with no server. Writes DIR/model.safetensors
and DIR/report.json; nothing under those names on failure.

Example merge.yaml:
  method: ties
  base: base.safetensors
  models:
    - {name: mnist, path: mnist.safetensors}
    - {name: fashion, path: fashion/, weight: 0.5}   # dir or LoRA adapter
  parameters: {lambda: 1.0, top_k: 20, trim_scope: global, disjoint: mean}

AdaMerging, DAM and LFPM also need the model's TorchScript architecture
(a .pt file here) and a calibration set per model (safetensors with
`inputs` [N,C,H,W] in [0,1], optionally `labels`). Example dam.yaml:
  method: dam            # or adamerging, lfpm
  architecture: tiny.pt
  base: base.safetensors
  models:
    - {name: mnist, path: mnist.safetensors, calibration: mnist_cal.safetensors}
    - {name: svhn, path: svhn.safetensors, calibration: svhn_cal.safetensors}
  parameters: {steps: 200, adamerging_steps: 100, device: cuda}

LFPM nests its trigger options (`trigger: {scan_steps: 20}`) and takes
`merge_lambda` for the task-arithmetic merge it repairs. `mergeguard params
METHOD` lists every parameter with its default. Progress goes to stderr;
Ctrl-C stops after the current step.

Examples:
  mergeguard merge --config merge.yaml --out merged/
  mergeguard merge --config dam.yaml --out defended/
)"}},
      {"run",
       {"mergeguard run --config FILE --out DIR [--local] [server flags]",
        R"(Uploads the job file's inputs, submits the job, follows it and downloads
the result into DIR. With --local, runs it in-process like `merge`. Any
method works, adamerging, dam and lfpm included; on a server their
`architecture:` is the name of an architecture the operator registered.

Example:
  mergeguard run --config merge.yaml --out merged/ --server mg:50051
)"}},
      {"upload",
       {"mergeguard upload [--kind KIND] FILE... [server flags]",
        R"(Uploads files and prints their sha256 digests. KIND is model (default),
calibration, lora_weights, lora_config or architecture.

Example:
  mergeguard upload --kind calibration mnist_calib.safetensors
)"}},
      {"submit",
       {"mergeguard submit --config FILE [server flags]",
        R"(Uploads the job file's inputs (skipping bytes already stored) and
submits the job; prints its id. Data-free merges, adamerging, dam and lfpm
(`architecture:` names one registered on the server; `mergeguard merge
--help` shows their job file). The job file is checked before anything is
uploaded.

Example:
  mergeguard submit --config merge.yaml
)"}},
      {"watch",
       {"mergeguard watch JOB [server flags]",
        R"(Follows JOB until it ends: a live progress bar (step, losses, ETA) on
a terminal, plain lines otherwise. Exits non-zero if the job fails.

Example:
  mergeguard watch 3f2a...
)"}},
      {"download",
       {"mergeguard download JOB|SHA256 --out DIR [server flags]",
        R"(Writes a finished job's model.safetensors and report.json into DIR, or
one artifact by digest. Interrupted downloads resume from DIR/*.part; the
digest is verified before the file appears.

Example:
  mergeguard download 3f2a... --out merged/
)"}},
      {"jobs",
       {"mergeguard jobs [server flags]",
        "Lists your jobs: id, state, method and progress.\n\n"
        "Example:\n  mergeguard jobs --server mergeguard.internal:50051\n"}},
      {"cancel",
       {"mergeguard cancel JOB [server flags]",
        "Cancels JOB; a running job stops within one step and leaves no "
        "result.\n\nExample:\n  mergeguard cancel j-host-0123456789abcdef\n"}},
      {"health",
       {"mergeguard health [server flags]",
        "Prints the server's grpc.health.v1 status; exit 6 unless SERVING.\n"
        "\nExample:\n  mergeguard health --server localhost:50051 && echo "
        "up\n"}},
      {"params",
       {"mergeguard params [METHOD] [--markdown]",
        R"(Lists the `parameters:` that adamerging, dam or lfpm accept (all three
without METHOD), with type and default. LFPM's trigger.NAME entries nest in
YAML as `trigger: {NAME: value}`. --markdown prints the tables of
docs/cli.md.

Example:
  mergeguard params dam
)"}},
  };
  return *helps;
}

std::string HelpFor(const std::string& command) {
  const CommandHelp& help = Helps().at(command);
  return absl::StrCat("Usage: ", help.usage, "\n\n", help.text);
}

// ParsedFlags holds --name value pairs and positional arguments.
struct ParsedFlags {
  std::map<std::string, std::string> values;
  std::vector<std::string> positional;
};

const std::vector<std::string> kServerFlags = {"server", "token", "tls-ca",
                                               "timeout"};

// ParseFlags accepts `--name value`, `--name=value` and the listed switches.
std::optional<ParsedFlags> ParseFlags(int argc, char** argv,
                                      std::vector<std::string> valued,
                                      const std::vector<std::string>& switches,
                                      bool server, std::string* error) {
  if (server)
    valued.insert(valued.end(), kServerFlags.begin(), kServerFlags.end());
  ParsedFlags flags;
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h") arg = "--help";
    if (arg.rfind("--", 0) != 0 || arg == "--") {
      flags.positional.push_back(arg);
      continue;
    }
    std::string name = arg.substr(2);
    std::optional<std::string> value;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
    }
    auto listed = [&](const std::vector<std::string>& list) {
      return std::find(list.begin(), list.end(), name) != list.end();
    };
    if (name == "help" || listed(switches)) {
      flags.values[name] = value.value_or("true");
    } else if (listed(valued)) {
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

// Set by the first Ctrl-C; local runs poll it between steps.
std::atomic<bool> interrupted{false};
static_assert(std::atomic<bool>::is_always_lock_free,
              "the SIGINT handler may only touch lock-free atomics");

void OnInterrupt(int) {
  if (interrupted.exchange(true)) {
    // A second Ctrl-C: stop now.
    std::signal(SIGINT, SIG_DFL);
    std::raise(SIGINT);
    return;
  }
  constexpr char kMessage[] =
      "\nmergeguard: stopping after the current step (Ctrl-C again to "
      "abort)\n";
  // write(2) is async-signal-safe; its result cannot be acted on here.
  [[maybe_unused]] ssize_t n =
      ::write(STDERR_FILENO, kMessage, sizeof(kMessage) - 1);
}

int UsageError(const std::string& message, const std::string& usage) {
  std::cerr << "mergeguard: " << message << "\n\n" << usage;
  return mergeguard::kExitUsage;
}

int Fail(const absl::Status& status) {
  std::cerr << "mergeguard: error [" << absl::StatusCodeToString(status.code())
            << "]: " << status.message() << "\n";
  return ExitCodeFor(status);
}

std::string FlagOrEnv(const ParsedFlags& flags, const std::string& name,
                      const char* env, const std::string& fallback) {
  auto it = flags.values.find(name);
  if (it != flags.values.end()) return it->second;
  const char* value = std::getenv(env);
  return value != nullptr && *value != '\0' ? value : fallback;
}

// Connect builds a client from the server flags.
absl::StatusOr<std::unique_ptr<mergeguard::SanitizerClient>> Connect(
    const ParsedFlags& flags) {
  mergeguard::SanitizerClientOptions options;
  options.target =
      FlagOrEnv(flags, "server", "MERGEGUARD_SERVER", "localhost:50051");
  options.token = FlagOrEnv(flags, "token", "MERGEGUARD_TOKEN", "");
  if (auto it = flags.values.find("tls-ca"); it != flags.values.end()) {
    options.use_tls = true;
    options.tls_ca_file = it->second;
  }
  if (auto it = flags.values.find("timeout"); it != flags.values.end()) {
    double seconds;
    if (!absl::SimpleAtod(it->second, &seconds) || !(seconds > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--timeout: expected a positive number of seconds, got \"",
          it->second, "\""));
    }
    options.rpc_timeout = absl::Seconds(seconds);
  }
  return mergeguard::SanitizerClient::Create(options);
}

int RunCommand(const std::string& command, int argc, char** argv) {
  const std::string help = HelpFor(command);
  const bool server_command = command != "merge" && command != "params";
  std::vector<std::string> valued;
  std::vector<std::string> switches;
  size_t max_positional = 0;
  if (command == "merge" || command == "run") {
    valued = {"config", "out"};
    switches = {"local"};
  } else if (command == "submit") {
    valued = {"config"};
  } else if (command == "upload") {
    valued = {"kind"};
    max_positional = 1000;
  } else if (command == "download") {
    valued = {"out"};
    max_positional = 1;
  } else if (command == "watch" || command == "cancel") {
    max_positional = 1;
  } else if (command == "params") {
    switches = {"markdown"};
    max_positional = 1;
  }
  std::string error;
  std::optional<ParsedFlags> flags =
      ParseFlags(argc, argv, valued, switches, server_command, &error);
  if (!flags) return UsageError(error, help);
  if (flags->values.count("help")) {
    std::cout << help;
    return mergeguard::kExitOk;
  }
  if (flags->positional.size() > max_positional) {
    return UsageError(absl::StrCat("unexpected argument \"",
                                   flags->positional[max_positional], "\""),
                      help);
  }
  for (const std::string& name : valued) {
    bool required = name == "config" || name == "out";
    if (required && !flags->values.count(name)) {
      return UsageError(absl::StrCat(command, " needs --", name,
                                     name == "out" ? " DIR" : " FILE"),
                        help);
    }
  }
  if ((command == "watch" || command == "cancel" || command == "download") &&
      flags->positional.empty()) {
    return UsageError(absl::StrCat(command, " needs a JOB id"), help);
  }

  if (command == "params") {
    std::vector<mergeguard::JobMethod> methods = {
        mergeguard::JobMethod::kAdaMerging, mergeguard::JobMethod::kDam,
        mergeguard::JobMethod::kLfpm};
    if (!flags->positional.empty()) {
      absl::StatusOr<mergeguard::JobMethod> method =
          mergeguard::ParseJobMethod(flags->positional[0]);
      if (!method.ok()) {
        return UsageError(std::string(method.status().message()), help);
      }
      if (mergeguard::IsDataFreeMerge(*method)) {
        return UsageError(
            absl::StrCat("method ", flags->positional[0],
                         " is data-free; docs/merges.md lists its parameters"),
            help);
      }
      methods = {*method};
    }
    const bool markdown = flags->values.count("markdown") > 0;
    for (size_t i = 0; i < methods.size(); ++i) {
      absl::StatusOr<std::string> table =
          mergeguard::DefenseParameterTable(methods[i], markdown);
      if (!table.ok()) return Fail(table.status());
      if (methods.size() > 1) {
        std::cout << (i > 0 ? "\n" : "") << (markdown ? "#### " : "")
                  << mergeguard::JobMethodName(methods[i]) << "\n\n";
      }
      std::cout << *table;
    }
    return mergeguard::kExitOk;
  }

  std::optional<mergeguard::MergeConfig> config;
  if (flags->values.count("config")) {
    absl::StatusOr<mergeguard::MergeConfig> loaded =
        mergeguard::LoadMergeConfig(flags->values["config"]);
    if (!loaded.ok()) return Fail(loaded.status());
    config = std::move(*loaded);
  }
  if (command == "merge" ||
      (command == "run" && flags->values.count("local"))) {
    std::signal(SIGINT, OnInterrupt);
    mergeguard::LocalMergeOptions local;
    local.is_cancelled = [] { return interrupted.load(); };
    const absl::Time start = absl::Now();
    // Progress goes to stderr so that stdout stays the summary.
    local.on_progress = [start](const mergeguard::JobProgress& progress) {
      std::cerr << mergeguard::FormatProgressLine(
          absl::ToDoubleSeconds(absl::Now() - start), "RUNNING", progress);
    };
    absl::StatusOr<mergeguard::LocalMergeResult> result =
        mergeguard::RunLocalMerge(*config, flags->values["out"], local);
    if (!result.ok()) return Fail(result.status());
    std::cout << result->summary << "\nmodel:  " << result->model_path
              << "\nreport: " << result->report_path << "\n";
    return mergeguard::kExitOk;
  }

  absl::StatusOr<std::unique_ptr<mergeguard::SanitizerClient>> client =
      Connect(*flags);
  if (!client.ok()) return Fail(client.status());
  mergeguard::SanitizerClient& c = **client;
  absl::Status status;
  if (command == "health") {
    status = mergeguard::HealthCommand(c, std::cout);
  } else if (command == "jobs") {
    status = mergeguard::JobsCommand(c, std::cout);
  } else if (command == "cancel") {
    status = mergeguard::CancelCommand(c, flags->positional[0], std::cout);
  } else if (command == "upload") {
    std::string kind_name = flags->values.count("kind") ? flags->values["kind"]
                                                        : std::string("model");
    mergeguard::v1::ArtifactKind kind;
    std::string upper;
    for (char ch : kind_name) upper.push_back(std::toupper(ch));
    if (!mergeguard::v1::ArtifactKind_Parse("ARTIFACT_KIND_" + upper, &kind) ||
        kind == mergeguard::v1::ARTIFACT_KIND_UNSPECIFIED ||
        kind == mergeguard::v1::ARTIFACT_KIND_RESULT ||
        kind == mergeguard::v1::ARTIFACT_KIND_REPORT) {
      return UsageError(
          absl::StrCat("--kind: unknown kind \"", kind_name, "\""), help);
    }
    status = mergeguard::UploadCommand(c, flags->positional, kind, std::cout);
  } else if (command == "submit") {
    status = mergeguard::SubmitCommand(c, *config, std::cout).status();
  } else if (command == "watch") {
    mergeguard::WatchOptions watch;
    watch.progress_bar = ::isatty(STDOUT_FILENO);
    status = mergeguard::WatchCommand(c, flags->positional[0], watch, std::cout)
                 .status();
  } else if (command == "download") {
    status = mergeguard::DownloadCommand(c, flags->positional[0],
                                         flags->values["out"], std::cout);
  } else if (command == "run") {
    absl::StatusOr<mergeguard::v1::Job> job =
        mergeguard::SubmitCommand(c, *config, std::cout);
    if (job.ok()) {
      mergeguard::WatchOptions watch;
      watch.progress_bar = ::isatty(STDOUT_FILENO);
      job = mergeguard::WatchCommand(c, job->id(), watch, std::cout);
    }
    status = job.ok() ? mergeguard::DownloadCommand(
                            c, job->id(), flags->values["out"], std::cout)
                      : job.status();
  }
  if (!status.ok()) return Fail(status);
  return mergeguard::kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return UsageError("no command given", kUsage);
  std::string command = argv[1];
  if (command == "help" || command == "--help" || command == "-h") {
    if (argc > 2 && Helps().count(argv[2])) {
      std::cout << HelpFor(argv[2]);
    } else {
      std::cout << kUsage;
    }
    return mergeguard::kExitOk;
  }
  if (!Helps().count(command)) {
    return UsageError(absl::StrCat("unknown command \"", command, "\""),
                      kUsage);
  }
  return RunCommand(command, argc, argv);
}
