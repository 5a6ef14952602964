// A real Prometheus (Debian's /usr/bin/prometheus) scrapes a real
// mergeguard-server every second with deploy/prometheus/mergeguard-rules.yaml
// loaded. After a task-arithmetic job (client library) and tiny DAM and LFPM
// jobs (the CLI, on tests/client/defense_world.h), the job and security
// metrics are read back through Prometheus's HTTP API, every metric the rules
// and the Grafana dashboard name is shown to exist, every dashboard query
// evaluates, and killing the server raises MergeguardTargetDown.

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "core/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/client/cli_runner.h"
#include "tests/client/defense_world.h"
#include "tests/server/server_process.h"

namespace mergeguard {
namespace {

using ::mergeguard::testing::HttpGet;
using ::mergeguard::testing::kAcmeToken;
using ::mergeguard::testing::MakeTempDir;
using ::mergeguard::testing::ReadWholeFile;
using ::mergeguard::testing::RemoveTree;
using ::mergeguard::testing::ServerProcess;
using ::mergeguard::testing::WriteFile;
using ::mergeguard::testing::WriteTestTokens;
using ::testing::Contains;
using ::testing::IsEmpty;

// Generous: the CI machine has two cores and may be busy compiling.
constexpr absl::Duration kPatience = absl::Seconds(240);

// PickFreePort returns a loopback port that was free a moment ago.
int PickFreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof(address);
  int port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0 &&
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&address), &length) == 0) {
    port = ntohs(address.sin_port);
  }
  ::close(fd);
  return port;
}

std::string UrlEncode(const std::string& text) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : text) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out.push_back(static_cast<char>(c));
    } else {
      out += {'%', kHex[c >> 4], kHex[c & 15]};
    }
  }
  return out;
}

// PrometheusProcess runs /usr/bin/prometheus on a free port with `config`
// and a fresh TSDB under `dir`, and waits until it is ready.
class PrometheusProcess {
 public:
  ~PrometheusProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      int status = 0;
      ::waitpid(pid_, &status, 0);
    }
  }

  // Start returns an empty string when ready, or why it is not.
  std::string Start(const std::string& dir, const std::string& config) {
    log_path_ = dir + "/prometheus.log";
    // The port is picked before Prometheus binds it; retry if another
    // process took it in between.
    for (int attempt = 0; attempt < 3; ++attempt) {
      port_ = PickFreePort();
      std::vector<std::string> args = {
          "prometheus",
          "--config.file=" + config,
          absl::StrCat("--storage.tsdb.path=", dir, "/tsdb", attempt),
          absl::StrCat("--web.listen-address=127.0.0.1:", port_),
          "--log.level=warn",
      };
      pid_ = ::fork();
      if (pid_ == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        int log =
            ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (log >= 0) {
          ::dup2(log, STDOUT_FILENO);
          ::dup2(log, STDERR_FILENO);
        }
        std::vector<char*> argv;
        for (std::string& arg : args) argv.push_back(arg.data());
        argv.push_back(nullptr);
        ::execvp(argv[0], argv.data());
        ::_exit(127);
      }
      const absl::Time deadline = absl::Now() + kPatience;
      bool exited = false;
      while (absl::Now() < deadline) {
        int status = 0;
        if (::waitpid(pid_, &status, WNOHANG) == pid_) {
          exited = true;
          pid_ = -1;
          break;
        }
        if (HttpGet(port_, "/-/ready").ok()) return "";
        absl::SleepFor(absl::Milliseconds(200));
      }
      if (!exited) return "Prometheus was not ready in time:\n" + Log();
    }
    return "Prometheus exited during start:\n" + Log();
  }

  // Api GETs /api/v1/<path> and returns its `data`, or null on error.
  nlohmann::json Api(const std::string& path) {
    absl::StatusOr<std::string> body = HttpGet(port_, "/api/v1/" + path);
    if (!body.ok()) {
      last_error_ = body.status().ToString();
      return nullptr;
    }
    nlohmann::json parsed = nlohmann::json::parse(*body, nullptr, false);
    if (parsed.is_discarded() || parsed.value("status", "") != "success") {
      last_error_ = *body;
      return nullptr;
    }
    return parsed["data"];
  }

  // Query evaluates PromQL at the current time; null on error.
  nlohmann::json Query(const std::string& promql) {
    return Api("query?query=" + UrlEncode(promql));
  }

  // WaitFor polls `ready` (given a fresh query result) until it is true.
  bool WaitFor(const std::string& promql,
               const std::function<bool(const nlohmann::json&)>& ready) {
    const absl::Time deadline = absl::Now() + kPatience;
    while (absl::Now() < deadline) {
      nlohmann::json data = Query(promql);
      if (!data.is_null() && ready(data)) return true;
      absl::SleepFor(absl::Milliseconds(500));
    }
    return false;
  }

  std::string Log() const { return ReadWholeFile(log_path_); }
  const std::string& last_error() const { return last_error_; }

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string log_path_;
  std::string last_error_;
};

// ValueOf returns the sample value of a vector result's element.
double ValueOf(const nlohmann::json& sample) {
  return std::stod(sample["value"][1].get<std::string>());
}

// MetricNames returns every mergeguard_* series name in `text` (histograms
// appear as their _bucket, _count and _sum series, as Prometheus stores them).
std::set<std::string> MetricNames(const std::string& text) {
  std::set<std::string> names;
  static const std::regex kName("mergeguard_[a-z0-9_]*[a-z0-9]");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), kName);
       it != std::sregex_iterator(); ++it) {
    names.insert(it->str());
  }
  return names;
}

void WriteModel(const std::string& path, float offset, bool with_head) {
  std::vector<TensorSpec> specs = {{"layer.weight", DType::kF32, {4, 8}}};
  if (with_head) specs.push_back({"head.weight", DType::kF32, {2, 8}});
  auto writer = SafetensorsWriter::Create(path, specs);
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (const TensorSpec& spec : specs) {
    std::vector<float> values(static_cast<size_t>(spec.NumElements()));
    for (size_t i = 0; i < values.size(); ++i) {
      values[i] = offset + 0.01f * static_cast<float>(i % 7);
    }
    ASSERT_TRUE(
        (*writer)
            ->WriteTensor(spec.name,
                          absl::Span<const uint8_t>(
                              reinterpret_cast<const uint8_t*>(values.data()),
                              values.size() * sizeof(float)))
            .ok());
  }
  ASSERT_TRUE((*writer)->Commit().ok());
}

class DeployPrometheusScrapeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_EQ(std::system("command -v prometheus > /dev/null 2>&1"), 0)
        << "prometheus is not installed: install the Debian package "
           "prometheus (scripts/setup does)";
    dir_ = MakeTempDir("mergeguard_prometheus");
    ASSERT_FALSE(dir_.empty());
    // The defense world's architecture, registered by the operator.
    ASSERT_NO_FATAL_FAILURE(testing::WriteDefenseWorld(dir_));
    std::filesystem::create_directories(dir_ + "/architectures");
    std::filesystem::copy_file(dir_ + "/tiny.pt",
                               dir_ + "/architectures/tiny.pt");
    absl::StatusOr<std::unique_ptr<ServerProcess>> server =
        ServerProcess::Start(
            dir_ + "/store", WriteTestTokens(dir_),
            {"--architectures_dir=" + dir_ + "/architectures"});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);

    rules_path_ = std::string(MERGEGUARD_SOURCE_DIR) +
                  "/deploy/prometheus/mergeguard-rules.yaml";
    const std::string config = dir_ + "/prometheus.yml";
    WriteFile(config, absl::StrCat("global:\n"
                                   "  scrape_interval: 1s\n"
                                   "  scrape_timeout: 1s\n"
                                   "  evaluation_interval: 1s\n"
                                   "rule_files:\n"
                                   "  - ",
                                   rules_path_,
                                   "\n"
                                   "scrape_configs:\n"
                                   "  - job_name: mergeguard\n"
                                   "    static_configs:\n"
                                   "      - targets: ['127.0.0.1:",
                                   server_->metrics_port(), "']\n"));
    std::string error = prometheus_.Start(dir_, config);
    ASSERT_TRUE(error.empty()) << error;
    // One scrape before any job, so every counter's increase is visible.
    ASSERT_TRUE(prometheus_.WaitFor(
        "up{job=\"mergeguard\"} == 1",
        [](const nlohmann::json& data) { return data["result"].size() == 1; }))
        << "Prometheus never scraped the server; last error: "
        << prometheus_.last_error() << "\n"
        << prometheus_.Log();
  }

  void TearDown() override {
    server_.reset();
    RemoveTree(dir_);
  }

  // RunTaskArithmeticJob uploads a base and two task models and runs a
  // data-free task-arithmetic merge to completion.
  void RunTaskArithmeticJob() {
    std::unique_ptr<SanitizerClient> client = server_->Client(kAcmeToken);
    v1::JobSpec spec;
    spec.set_method(v1::METHOD_TASK_ARITHMETIC);
    spec.set_lambda(0.5);
    for (const char* name : {"base", "a", "b"}) {
      const std::string path = absl::StrCat(dir_, "/ta_", name, ".safetensors");
      const bool base = std::string(name) == "base";
      ASSERT_NO_FATAL_FAILURE(WriteModel(path, base ? 0.0f : 0.1f, !base));
      auto artifact = client->UploadFile(path, v1::ARTIFACT_KIND_MODEL);
      ASSERT_TRUE(artifact.ok()) << artifact.status();
      if (base) {
        spec.set_base_sha256(artifact->sha256());
      } else {
        v1::JobInput* input = spec.add_inputs();
        input->set_name(name);
        input->set_model_sha256(artifact->sha256());
        input->set_weight(1.0);
      }
    }
    auto job = client->SubmitJob(spec);
    ASSERT_TRUE(job.ok()) << job.status();
    auto done = client->WatchJob(job->id());
    ASSERT_TRUE(done.ok()) << done.status();
    ASSERT_EQ(done->state(), v1::JOB_STATE_SUCCEEDED) << done->error_message();
    // One refused call, so the auth-failure family exists too.
    EXPECT_FALSE(server_->Client("wrong-token")->ListJobs().ok());
  }

  // RunDefenseJob runs a tiny `method` job (dam, lfpm) with `parameters`
  // through `mergeguard run` against the server; returns its exit code and
  // output.
  std::pair<int, std::string> RunDefenseJob(const std::string& method,
                                            const std::string& parameters) {
    const std::string job = absl::StrCat(dir_, "/", method, ".yaml");
    std::ofstream(job) << testing::DefenseJobYaml(method, "tiny", parameters);
    const std::string command = absl::StrCat(
        MERGEGUARD_BINARY_DIR, "/bin/mergeguard run --config ", job, " --out ",
        dir_, "/", method, "_out --server ", server_->target(), " --token ",
        kAcmeToken, " 2>&1 </dev/null");
    ::mergeguard::testing::CommandResult result =
        ::mergeguard::testing::RunShell(command);
    return {result.exit_code, result.output};
  }

  std::string dir_;
  std::string rules_path_;
  std::unique_ptr<ServerProcess> server_;
  PrometheusProcess prometheus_;
};

TEST_F(DeployPrometheusScrapeTest,
       JobAndSecurityMetricsRulesDashboardAndAlerts) {
  ASSERT_NO_FATAL_FAILURE(RunTaskArithmeticJob());
  // The tiny DAM and LFPM jobs of tests/client/cli_server_test.cc.
  auto [dam_exit, dam_output] = RunDefenseJob(
      "dam", "  steps: 2\n  adamerging_steps: 2\n  batch_size: 4\n");
  ASSERT_EQ(dam_exit, 0) << dam_output;
  auto [lfpm_exit, lfpm_output] = RunDefenseJob(
      "lfpm",
      "  steps: 2\n  batch_size: 4\n  path_nodes: 2\n  report_examples: 8\n"
      "  trigger: {scan_steps: 2, scan_batch_size: 4, update_every: 2, "
      "steps_per_update: 1, rescan_after: false}\n");
  ASSERT_EQ(lfpm_exit, 0) << lfpm_output;

  // The job counters, scraped and queryable. LFPM finished last, so once it
  // is counted every job is; rates then need a few more samples.
  const std::string lfpm_jobs =
      "mergeguard_jobs_total{job=\"mergeguard\",method=\"lfpm\","
      "outcome=\"succeeded\"}";
  ASSERT_TRUE(prometheus_.WaitFor("count_over_time(" + lfpm_jobs + "[1m])",
                                  [](const nlohmann::json& data) {
                                    return data["result"].size() == 1 &&
                                           ValueOf(data["result"][0]) >= 3;
                                  }))
      << "no 3 scrapes of " << lfpm_jobs
      << " in Prometheus; last error: " << prometheus_.last_error() << "\n"
      << prometheus_.Log();
  for (const char* method : {"task_arithmetic", "dam", "lfpm"}) {
    nlohmann::json data = prometheus_.Query(
        absl::StrCat("mergeguard_jobs_total{job=\"mergeguard\",method=\"",
                     method, "\",outcome=\"succeeded\"}"));
    ASSERT_FALSE(data.is_null()) << prometheus_.last_error();
    ASSERT_EQ(data["result"].size(), 1u) << method;
    EXPECT_EQ(ValueOf(data["result"][0]), 1) << method;
  }
  nlohmann::json uploaded =
      prometheus_.Query("mergeguard_uploaded_bytes_total{job=\"mergeguard\"}");
  ASSERT_FALSE(uploaded.is_null()) << prometheus_.last_error();
  ASSERT_EQ(uploaded["result"].size(), 1u);
  EXPECT_GT(ValueOf(uploaded["result"][0]), 0);

  // Security metrics of the defense jobs, one observation each: DAM's M2
  // fraction, LFPM's tau_ab norm, trigger anomaly index and mined-trigger
  // ASR before and after.
  for (const char* series :
       {"mergeguard_m2_flagged_ratio_count{method=\"dam\"}",
        "mergeguard_tau_ab_norm_count{method=\"lfpm\"}",
        "mergeguard_trigger_anomaly_index_count{method=\"lfpm\"}",
        "mergeguard_mined_trigger_attack_success_ratio_count{method=\"lfpm\","
        "stage=\"before\"}",
        "mergeguard_mined_trigger_attack_success_ratio_count{method=\"lfpm\","
        "stage=\"after\"}"}) {
    nlohmann::json data = prometheus_.Query(series);
    ASSERT_FALSE(data.is_null()) << prometheus_.last_error();
    ASSERT_EQ(data["result"].size(), 1u) << series;
    EXPECT_EQ(ValueOf(data["result"][0]), 1) << series;
  }
  nlohmann::json m2 =
      prometheus_.Query("mergeguard_m2_flagged_ratio_sum{method=\"dam\"}");
  ASSERT_FALSE(m2.is_null());
  ASSERT_EQ(m2["result"].size(), 1u);
  EXPECT_GE(ValueOf(m2["result"][0]), 0);
  EXPECT_LE(ValueOf(m2["result"][0]), 1);
  // The LFPM job counts as suspicious exactly when its anomaly index is over
  // the default threshold 2, i.e. outside the le="2" bucket.
  nlohmann::json suspicious = prometheus_.Query(
      "mergeguard_suspicious_inputs_total{method=\"lfpm\"}"
      " + on (method) "
      "mergeguard_trigger_anomaly_index_bucket{method=\"lfpm\",le=\"2\"}");
  ASSERT_FALSE(suspicious.is_null()) << prometheus_.last_error();
  ASSERT_EQ(suspicious["result"].size(), 1u);
  EXPECT_EQ(ValueOf(suspicious["result"][0]), 1);
  // Series of the defenses that did not run stay at zero.
  nlohmann::json dam_suspicious = prometheus_.Query(
      "mergeguard_suspicious_inputs_total{job=\"mergeguard\",method=\"dam\"}");
  ASSERT_FALSE(dam_suspicious.is_null());
  ASSERT_EQ(dam_suspicious["result"].size(), 1u);
  EXPECT_EQ(ValueOf(dam_suspicious["result"][0]), 0);

  // Every metric the rules and the dashboard use is one Prometheus scraped.
  nlohmann::json names_data =
      prometheus_.Query("group by (__name__) ({__name__=~\"mergeguard_.+\"})");
  ASSERT_FALSE(names_data.is_null()) << prometheus_.last_error();
  std::set<std::string> scraped;
  for (const nlohmann::json& sample : names_data["result"]) {
    scraped.insert(sample["metric"]["__name__"].get<std::string>());
  }
  const std::string dashboard_text =
      ReadWholeFile(std::string(MERGEGUARD_SOURCE_DIR) +
                    "/deploy/grafana/mergeguard-dashboard.json");
  ASSERT_FALSE(dashboard_text.empty());
  std::set<std::string> used = MetricNames(ReadWholeFile(rules_path_));
  const std::set<std::string> dashboard_names = MetricNames(dashboard_text);
  used.insert(dashboard_names.begin(), dashboard_names.end());
  EXPECT_GE(used.size(), 20u);
  for (const std::string& name : used) {
    EXPECT_THAT(scraped, Contains(name)) << name << " is not exported";
  }

  // Every dashboard query evaluates, with Grafana's variables filled in;
  // those over the job and operations families return series.
  nlohmann::json dashboard = nlohmann::json::parse(dashboard_text);
  int queries = 0;
  for (const nlohmann::json& panel : dashboard["panels"]) {
    if (!panel.contains("targets")) continue;
    for (const nlohmann::json& target : panel["targets"]) {
      const std::string expr = absl::StrReplaceAll(
          target["expr"].get<std::string>(), {{"$__rate_interval", "30s"},
                                              {"$__range", "5m"},
                                              {"$job", "mergeguard"},
                                              {"$instance", ".*"}});
      nlohmann::json result = prometheus_.Query(expr);
      ++queries;
      EXPECT_FALSE(result.is_null()) << panel["title"] << ": " << expr << "\n"
                                     << prometheus_.last_error();
      if (!result.is_null() &&
          expr.find("outcome=\"failed\"") == std::string::npos) {
        EXPECT_THAT(result["result"], ::testing::Not(IsEmpty()))
            << panel["title"] << ": " << expr;
      }
    }
  }
  EXPECT_GE(queries, 20);

  // The rules loaded and evaluate against this data without error. Exactly
  // the alerts the data calls for are active: the LFPM job's (suspicious
  // inputs when its anomaly index is over 2; mined-trigger ASR when above
  // 0.2 after the defense) and, on a nearly full disk, the free-space alert.
  auto scalar = [&](const std::string& promql) {
    nlohmann::json data = prometheus_.Query(promql);
    EXPECT_TRUE(!data.is_null() && data["result"].size() == 1u) << promql;
    return !data.is_null() && data["result"].size() == 1u
               ? ValueOf(data["result"][0])
               : -1.0;
  };
  std::map<std::string, bool> expect_active = {
      {"MergeguardStoreLowOnSpace",
       scalar("mergeguard_store_free_bytes{job=\"mergeguard\"}") <
           10.0 * (1 << 30)},
      {"MergeguardSuspiciousInputs",
       scalar("mergeguard_suspicious_inputs_total{method=\"lfpm\"}") == 1},
      {"MergeguardMinedTriggerASRAfterSanitizationHigh",
       scalar("mergeguard_mined_trigger_attack_success_ratio_bucket{method="
              "\"lfpm\",stage=\"after\",le=\"0.2\"}") == 0},
  };
  std::vector<std::string> problems = {"no rule evaluated yet"};
  size_t rules = 0;
  const absl::Time deadline = absl::Now() + kPatience;
  while (!problems.empty() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(500));
    nlohmann::json data = prometheus_.Api("rules");
    if (data.is_null()) continue;
    problems.clear();
    rules = 0;
    for (const nlohmann::json& group : data["groups"]) {
      for (const nlohmann::json& rule : group["rules"]) {
        ++rules;
        const std::string name = rule.value("name", "");
        const std::string state = rule.value("state", "");
        if (rule.value("lastEvaluation", "").rfind("0001-", 0) == 0) {
          problems.push_back(name + " not evaluated");
        }
        if (rule.value("health", "") != "ok") {
          problems.push_back(name + ": " + rule.value("lastError", ""));
        }
        if ((state != "inactive") != expect_active[name]) {
          problems.push_back(name + " is " + state);
        }
      }
    }
    if (rules == 0) problems.push_back("no rules loaded");
  }
  EXPECT_THAT(problems, IsEmpty()) << prometheus_.Log();
  const std::string rules_text = ReadWholeFile(rules_path_);
  size_t in_file = 0;
  for (size_t at = rules_text.find("- alert:"); at != std::string::npos;
       at = rules_text.find("- alert:", at + 1)) {
    ++in_file;
  }
  EXPECT_EQ(rules, in_file);
  EXPECT_GE(rules, 5u);

  // The server goes away: up drops to 0 and MergeguardTargetDown becomes
  // pending (it fires after its `for` of 5 minutes).
  server_.reset();
  EXPECT_TRUE(prometheus_.WaitFor(
      "ALERTS{alertname=\"MergeguardTargetDown\"}",
      [](const nlohmann::json& data) { return data["result"].size() == 1; }))
      << "MergeguardTargetDown never became pending; last error: "
      << prometheus_.last_error();
  nlohmann::json up = prometheus_.Query("up{job=\"mergeguard\"}");
  ASSERT_FALSE(up.is_null());
  ASSERT_EQ(up["result"].size(), 1u);
  EXPECT_EQ(ValueOf(up["result"][0]), 0);
}

}  // namespace
}  // namespace mergeguard
