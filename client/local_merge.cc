#include "client/local_merge.h"

#include <sys/stat.h>

#include <cerrno>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/status_macros.h"

namespace mergeguard {
namespace {

absl::Status MakeDirectories(const std::string& path) {
  std::string partial;
  for (size_t i = 0; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      partial = path.substr(0, i);
      if (partial.empty()) continue;
      if (::mkdir(partial.c_str(), 0755) != 0 && errno != EEXIST) {
        return ErrnoToStatus(errno, absl::StrCat("create directory ", partial));
      }
    }
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--out ", path, " exists and is not a directory"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LocalMergeResult> RunLocalMerge(const MergeConfig& config,
                                               const std::string& out_dir) {
  if (!IsDataFreeMerge(config.method)) {
    return absl::UnimplementedError(
        absl::StrCat("method ", JobMethodName(config.method),
                     " cannot run locally in this build yet"));
  }
  RETURN_IF_ERROR(MakeDirectories(out_dir));
  LocalMergeResult result;
  const bool sharded = config.options.writer.max_shard_bytes > 0;
  result.model_path =
      sharded ? out_dir : absl::StrCat(out_dir, "/", kSingleFileName);
  result.report_path = absl::StrCat(out_dir, "/report.json");
  ASSIGN_OR_RETURN(result.report, Merge(config.base, config.models,
                                        result.model_path, config.options));
  nlohmann::json report = {
      {"method", std::string(JobMethodName(config.method))},
      {"model", result.model_path},
      {"merged_tensors", result.report.merged_tensors},
      {"head_tensors", result.report.head_tensors},
      {"bytes_read", result.report.bytes_read},
      {"bytes_written", result.report.bytes_written},
      {"seconds", result.report.seconds},
  };
  if (config.options.method == MergeMethod::kModelStock) {
    report["model_stock_ratio"] = result.report.model_stock_ratio;
  }
  nlohmann::json inputs = nlohmann::json::array();
  for (const MergeInput& input : config.models) {
    inputs.push_back(
        {{"name", input.name}, {"path", input.path}, {"weight", input.weight}});
  }
  report["inputs"] = inputs;
  report["base"] = config.base;
  RETURN_IF_ERROR(WriteFileAtomically(result.report_path, report.dump(2)));
  return result;
}

}  // namespace mergeguard
