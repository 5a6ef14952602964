#ifndef MERGEGUARD_TESTS_CLIENT_CLI_RUNNER_H_
#define MERGEGUARD_TESTS_CLIENT_CLI_RUNNER_H_

// Runs shell commands, and the real `mergeguard` binary of this build, for
// the tests that drive the CLI as a user would. Needs MERGEGUARD_BINARY_DIR.

#include <sys/wait.h>

#include <cstdio>
#include <string>

namespace mergeguard::testing {

struct CommandResult {
  int exit_code = -1;
  // What the command wrote to stdout (and stderr where it redirects it).
  std::string output;
};

// RunShell runs `command` with /bin/sh and collects its stdout.
inline CommandResult RunShell(const std::string& command) {
  CommandResult result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) {
    result.output.append(buffer, n);
  }
  const int status = ::pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// RunCli runs `mergeguard ARGS` with stdout and stderr together and no
// stdin; `env` prefixes the command (e.g. "MERGEGUARD_TOKEN=x").
inline CommandResult RunCli(const std::string& args,
                            const std::string& env = "") {
  return RunShell(env + " " + std::string(MERGEGUARD_BINARY_DIR) +
                  "/bin/mergeguard " + args + " 2>&1 </dev/null");
}

}  // namespace mergeguard::testing

#endif  // MERGEGUARD_TESTS_CLIENT_CLI_RUNNER_H_
