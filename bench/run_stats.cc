#include "bench/run_stats.h"

#include <fstream>
#include <sstream>
#include <string>

namespace mergeguard::bench {

bool ResetPeakRss() {
  std::ofstream clear_refs("/proc/self/clear_refs");
  clear_refs << "5";
  clear_refs.flush();
  return clear_refs.good();
}

int64_t PeakRssBytes() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) {
      std::istringstream fields(line.substr(6));
      int64_t kib = 0;
      fields >> kib;
      return kib * 1024;
    }
  }
  return 0;
}

std::vector<MergeInput> ScenarioInputs(const Scenario& scenario,
                                       bool backdoored) {
  std::vector<MergeInput> inputs;
  for (const ScenarioTask& task : scenario.tasks) {
    inputs.push_back(
        {task.name,
         scenario.Path(backdoored ? task.checkpoint : task.clean_checkpoint),
         1.0});
  }
  return inputs;
}

}  // namespace mergeguard::bench
