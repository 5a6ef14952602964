#include "core/scenario.h"

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/file_util.h"
#include "core/sha256.h"
#include "core/status_macros.h"
#include "core/strict_json.h"
#include "core/tensor_views.h"
#include "core/torch_status.h"
#include "nlohmann/json.hpp"

namespace mergeguard {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Field readers: each names the JSON path in its error, e.g.
// `scenario.json: tasks[1].classes: expected an array of strings`.
absl::Status FieldError(const std::string& where, absl::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat(kScenarioFileName, ": ", where, ": ", what));
}

absl::StatusOr<const json*> Field(const json& object, const std::string& key,
                                  const std::string& where) {
  auto it = object.find(key);
  if (it == object.end()) {
    return FieldError(where.empty() ? key : absl::StrCat(where, ".", key),
                      "missing");
  }
  return &*it;
}

std::string Join(const std::string& where, const std::string& key) {
  return where.empty() ? key : absl::StrCat(where, ".", key);
}

absl::StatusOr<std::string> GetString(const json& object,
                                      const std::string& key,
                                      const std::string& where) {
  ASSIGN_OR_RETURN(const json* value, Field(object, key, where));
  if (!value->is_string()) {
    return FieldError(Join(where, key), absl::StrCat("expected a string, got ",
                                                     JsonTypeName(*value)));
  }
  return value->get<std::string>();
}

absl::StatusOr<int64_t> GetInt(const json& object, const std::string& key,
                               const std::string& where) {
  ASSIGN_OR_RETURN(const json* value, Field(object, key, where));
  if (!value->is_number_integer()) {
    return FieldError(
        Join(where, key),
        absl::StrCat("expected an integer, got ", JsonTypeName(*value)));
  }
  return value->get<int64_t>();
}

absl::StatusOr<double> GetNumber(const json& object, const std::string& key,
                                 const std::string& where) {
  ASSIGN_OR_RETURN(const json* value, Field(object, key, where));
  if (!value->is_number()) {
    return FieldError(Join(where, key), absl::StrCat("expected a number, got ",
                                                     JsonTypeName(*value)));
  }
  return value->get<double>();
}

absl::StatusOr<bool> GetBool(const json& object, const std::string& key,
                             const std::string& where) {
  ASSIGN_OR_RETURN(const json* value, Field(object, key, where));
  if (!value->is_boolean()) {
    return FieldError(Join(where, key), "expected true or false");
  }
  return value->get<bool>();
}

absl::StatusOr<std::vector<std::string>> GetStrings(const json& object,
                                                    const std::string& key,
                                                    const std::string& where) {
  ASSIGN_OR_RETURN(const json* value, Field(object, key, where));
  std::vector<std::string> result;
  if (value->is_array()) {
    for (const json& item : *value) {
      if (!item.is_string()) break;
      result.push_back(item.get<std::string>());
    }
    if (result.size() == value->size()) return result;
  }
  return FieldError(Join(where, key), "expected an array of strings");
}

absl::StatusOr<std::vector<int64_t>> GetInts(const json& object,
                                             const std::string& key,
                                             const std::string& where) {
  ASSIGN_OR_RETURN(const json* value, Field(object, key, where));
  std::vector<int64_t> result;
  if (value->is_array()) {
    for (const json& item : *value) {
      if (!item.is_number_integer()) break;
      result.push_back(item.get<int64_t>());
    }
    if (result.size() == value->size()) return result;
  }
  return FieldError(Join(where, key), "expected an array of integers");
}

// CheckRelativePath refuses absolute paths and `..`, so a scenario can only
// name files inside its own directory.
absl::Status CheckRelativePath(const std::string& path,
                               const std::string& where) {
  if (path.empty() || path.front() == '/') {
    return FieldError(where,
                      absl::StrCat("\"", path, "\" must be a relative path"));
  }
  for (const auto& part : fs::path(path)) {
    if (part == "..") {
      return FieldError(where,
                        absl::StrCat("\"", path, "\" must not contain \"..\""));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<TriggerSpec> ParseTrigger(const json& object,
                                         const std::string& where) {
  TriggerSpec trigger;
  ASSIGN_OR_RETURN(std::string kind, GetString(object, "kind", where));
  absl::StatusOr<TriggerKind> parsed_kind = ParseTriggerKind(kind);
  if (!parsed_kind.ok()) {
    return FieldError(Join(where, "kind"), parsed_kind.status().message());
  }
  trigger.kind = *parsed_kind;
  ASSIGN_OR_RETURN(trigger.file, GetString(object, "file", where));
  RETURN_IF_ERROR(CheckRelativePath(trigger.file, Join(where, "file")));
  ASSIGN_OR_RETURN(trigger.pattern, GetString(object, "pattern", where));
  if (trigger.kind == TriggerKind::kPatch) {
    ASSIGN_OR_RETURN(trigger.size, GetInt(object, "size", where));
    ASSIGN_OR_RETURN(trigger.location, GetString(object, "location", where));
    ASSIGN_OR_RETURN(trigger.row, GetInt(object, "row", where));
    ASSIGN_OR_RETURN(trigger.col, GetInt(object, "col", where));
    if (trigger.size <= 0) {
      return FieldError(Join(where, "size"), "must be positive");
    }
  } else {
    ASSIGN_OR_RETURN(trigger.blend_alpha,
                     GetNumber(object, "blend_alpha", where));
  }
  return trigger;
}

json TriggerToJson(const TriggerSpec& trigger) {
  json out = {{"kind", std::string(TriggerKindName(trigger.kind))},
              {"file", trigger.file},
              {"pattern", trigger.pattern}};
  if (trigger.kind == TriggerKind::kPatch) {
    out["size"] = trigger.size;
    out["location"] = trigger.location;
    out["row"] = trigger.row;
    out["col"] = trigger.col;
  } else {
    out["blend_alpha"] = trigger.blend_alpha;
  }
  return out;
}

// ReferencedFiles returns every relative path the description names.
std::vector<std::pair<std::string, std::string>> ReferencedFiles(
    const Scenario& scenario) {
  std::vector<std::pair<std::string, std::string>> files = {
      {"architecture.file", scenario.architecture.file},
      {"base", scenario.base}};
  for (size_t i = 0; i < scenario.tasks.size(); ++i) {
    const ScenarioTask& task = scenario.tasks[i];
    const std::string where = absl::StrCat("tasks[", i, "]");
    files.push_back({where + ".checkpoint", task.checkpoint});
    files.push_back({where + ".clean_checkpoint", task.clean_checkpoint});
    files.push_back({where + ".calibration", task.calibration});
    files.push_back({where + ".test", task.test});
  }
  if (scenario.attack) {
    files.push_back({"attack.trigger.file", scenario.attack->trigger.file});
  }
  return files;
}

// ValidateDescription checks what does not need the files' contents.
absl::Status ValidateDescription(const Scenario& scenario) {
  if (scenario.tasks.empty()) return FieldError("tasks", "no tasks");
  std::set<std::string> names;
  for (size_t i = 0; i < scenario.tasks.size(); ++i) {
    const ScenarioTask& task = scenario.tasks[i];
    const std::string where = absl::StrCat("tasks[", i, "]");
    if (task.name.empty() || absl::StrContains(task.name, "/")) {
      return FieldError(where + ".name",
                        absl::StrCat("\"", task.name,
                                     "\" must be non-empty and without '/'"));
    }
    if (!names.insert(task.name).second) {
      return FieldError(where + ".name",
                        absl::StrCat("duplicate task \"", task.name, "\""));
    }
    if (task.classes.size() < 2) {
      return FieldError(where + ".classes", "needs at least two classes");
    }
  }
  if (scenario.architecture.input_shape.size() != 3) {
    return FieldError("architecture.input_shape", "must be [C, H, W]");
  }
  for (const auto& [where, path] : ReferencedFiles(scenario)) {
    RETURN_IF_ERROR(CheckRelativePath(path, where));
  }
  if (scenario.attack) {
    const ScenarioAttack& attack = *scenario.attack;
    if (attack.tasks.empty()) {
      return FieldError("attack.tasks", "names no compromised task");
    }
    for (const std::string& name : attack.tasks) {
      const ScenarioTask* task = scenario.FindTask(name);
      if (task == nullptr) {
        return FieldError("attack.tasks",
                          absl::StrCat("unknown task \"", name, "\""));
      }
      if (attack.target_class < 0 ||
          attack.target_class >= static_cast<int64_t>(task->classes.size())) {
        return FieldError(
            "attack.target_class",
            absl::StrCat(attack.target_class, " is not a class of task \"",
                         name, "\" (", task->classes.size(), " classes)"));
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<Scenario> ParseScenario(const json& root,
                                       const std::string& dir) {
  if (!root.is_object()) return FieldError("(root)", "expected an object");
  Scenario scenario;
  scenario.dir = dir;
  ASSIGN_OR_RETURN(std::string format, GetString(root, "format", ""));
  if (format != kScenarioFormat) {
    return FieldError("format",
                      absl::StrCat("unsupported \"", format, "\"; expected \"",
                                   kScenarioFormat, "\""));
  }
  ASSIGN_OR_RETURN(scenario.name, GetString(root, "name", ""));
  ASSIGN_OR_RETURN(scenario.config_hash, GetString(root, "config_hash", ""));
  if (auto it = root.find("config"); it != root.end()) {
    scenario.config_json = it->dump();
  }
  ASSIGN_OR_RETURN(const json* architecture, Field(root, "architecture", ""));
  if (!architecture->is_object()) {
    return FieldError("architecture", "expected an object");
  }
  ScenarioArchitecture& arch = scenario.architecture;
  ASSIGN_OR_RETURN(arch.name, GetString(*architecture, "name", "architecture"));
  ASSIGN_OR_RETURN(arch.file, GetString(*architecture, "file", "architecture"));
  ASSIGN_OR_RETURN(arch.input_shape,
                   GetInts(*architecture, "input_shape", "architecture"));
  ASSIGN_OR_RETURN(arch.feature_dim,
                   GetInt(*architecture, "feature_dim", "architecture"));
  ASSIGN_OR_RETURN(arch.num_parameters,
                   GetInt(*architecture, "num_parameters", "architecture"));
  ASSIGN_OR_RETURN(scenario.base, GetString(root, "base", ""));

  ASSIGN_OR_RETURN(const json* tasks, Field(root, "tasks", ""));
  if (!tasks->is_array()) return FieldError("tasks", "expected an array");
  for (size_t i = 0; i < tasks->size(); ++i) {
    const json& item = (*tasks)[i];
    const std::string where = absl::StrCat("tasks[", i, "]");
    if (!item.is_object()) return FieldError(where, "expected an object");
    ScenarioTask task;
    ASSIGN_OR_RETURN(task.name, GetString(item, "name", where));
    ASSIGN_OR_RETURN(task.description, GetString(item, "description", where));
    ASSIGN_OR_RETURN(task.derived, GetBool(item, "derived", where));
    ASSIGN_OR_RETURN(task.classes, GetStrings(item, "classes", where));
    ASSIGN_OR_RETURN(task.checkpoint, GetString(item, "checkpoint", where));
    ASSIGN_OR_RETURN(task.clean_checkpoint,
                     GetString(item, "clean_checkpoint", where));
    ASSIGN_OR_RETURN(task.calibration, GetString(item, "calibration", where));
    ASSIGN_OR_RETURN(task.test, GetString(item, "test", where));
    ASSIGN_OR_RETURN(task.compromised, GetBool(item, "compromised", where));
    ASSIGN_OR_RETURN(task.finetuned_accuracy,
                     GetNumber(item, "finetuned_accuracy", where));
    ASSIGN_OR_RETURN(task.clean_finetuned_accuracy,
                     GetNumber(item, "clean_finetuned_accuracy", where));
    if (item.contains("finetuned_asr")) {
      ASSIGN_OR_RETURN(task.finetuned_asr,
                       GetNumber(item, "finetuned_asr", where));
    }
    scenario.tasks.push_back(std::move(task));
  }

  if (auto it = root.find("attack"); it != root.end() && !it->is_null()) {
    if (!it->is_object()) return FieldError("attack", "expected an object");
    ScenarioAttack attack;
    ASSIGN_OR_RETURN(attack.kind, GetString(*it, "kind", "attack"));
    ASSIGN_OR_RETURN(attack.tasks, GetStrings(*it, "tasks", "attack"));
    ASSIGN_OR_RETURN(attack.target_class,
                     GetInt(*it, "target_class", "attack"));
    ASSIGN_OR_RETURN(attack.poison_rate,
                     GetNumber(*it, "poison_rate", "attack"));
    ASSIGN_OR_RETURN(const json* trigger, Field(*it, "trigger", "attack"));
    if (!trigger->is_object()) {
      return FieldError("attack.trigger", "expected an object");
    }
    ASSIGN_OR_RETURN(attack.trigger, ParseTrigger(*trigger, "attack.trigger"));
    for (const std::string& name : attack.tasks) {
      for (ScenarioTask& task : scenario.tasks) {
        if (task.name == name && !task.compromised) {
          return FieldError(
              "attack.tasks",
              absl::StrCat("task \"", name, "\" is not marked compromised"));
        }
      }
    }
    scenario.attack = std::move(attack);
  }

  ASSIGN_OR_RETURN(const json* files, Field(root, "files", ""));
  if (!files->is_array()) return FieldError("files", "expected an array");
  for (size_t i = 0; i < files->size(); ++i) {
    const json& item = (*files)[i];
    const std::string where = absl::StrCat("files[", i, "]");
    if (!item.is_object()) return FieldError(where, "expected an object");
    ScenarioFile file;
    ASSIGN_OR_RETURN(file.path, GetString(item, "path", where));
    RETURN_IF_ERROR(CheckRelativePath(file.path, where + ".path"));
    ASSIGN_OR_RETURN(file.sha256, GetString(item, "sha256", where));
    if (!IsSha256Hex(file.sha256)) {
      return FieldError(where + ".sha256", "expected 64 lowercase hex digits");
    }
    ASSIGN_OR_RETURN(int64_t bytes, GetInt(item, "bytes", where));
    if (bytes < 0) return FieldError(where + ".bytes", "must be >= 0");
    file.bytes = static_cast<uint64_t>(bytes);
    scenario.files.push_back(std::move(file));
  }
  RETURN_IF_ERROR(ValidateDescription(scenario));
  return scenario;
}

json ScenarioToJson(const Scenario& scenario) {
  json tasks = json::array();
  for (const ScenarioTask& task : scenario.tasks) {
    json item = {{"name", task.name},
                 {"description", task.description},
                 {"derived", task.derived},
                 {"classes", task.classes},
                 {"checkpoint", task.checkpoint},
                 {"clean_checkpoint", task.clean_checkpoint},
                 {"calibration", task.calibration},
                 {"test", task.test},
                 {"compromised", task.compromised},
                 {"finetuned_accuracy", task.finetuned_accuracy},
                 {"clean_finetuned_accuracy", task.clean_finetuned_accuracy}};
    if (task.finetuned_asr) item["finetuned_asr"] = *task.finetuned_asr;
    tasks.push_back(std::move(item));
  }
  json files = json::array();
  for (const ScenarioFile& file : scenario.files) {
    files.push_back(
        {{"path", file.path}, {"sha256", file.sha256}, {"bytes", file.bytes}});
  }
  json root = {{"format", kScenarioFormat},
               {"name", scenario.name},
               {"config_hash", scenario.config_hash},
               {"config", json::parse(scenario.config_json, nullptr, false)},
               {"architecture",
                {{"name", scenario.architecture.name},
                 {"file", scenario.architecture.file},
                 {"input_shape", scenario.architecture.input_shape},
                 {"feature_dim", scenario.architecture.feature_dim},
                 {"num_parameters", scenario.architecture.num_parameters}}},
               {"base", scenario.base},
               {"tasks", std::move(tasks)},
               {"attack", nullptr},
               {"files", std::move(files)}};
  if (scenario.attack) {
    const ScenarioAttack& attack = *scenario.attack;
    root["attack"] = {{"kind", attack.kind},
                      {"tasks", attack.tasks},
                      {"target_class", attack.target_class},
                      {"poison_rate", attack.poison_rate},
                      {"trigger", TriggerToJson(attack.trigger)}};
  }
  return root;
}

}  // namespace

std::string Scenario::Path(const std::string& relative) const {
  return (fs::path(dir) / relative).string();
}

const ScenarioTask* Scenario::FindTask(const std::string& task_name) const {
  for (const ScenarioTask& task : tasks) {
    if (task.name == task_name) return &task;
  }
  return nullptr;
}

absl::StatusOr<Scenario> LoadScenario(const std::string& dir,
                                      const ScenarioLoadOptions& options) {
  const std::string path = (fs::path(dir) / kScenarioFileName).string();
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return absl::NotFoundError(absl::StrCat("not a scenario directory (no ",
                                              kScenarioFileName, "): ", dir));
    }
    return text.status();
  }
  ASSIGN_OR_RETURN(json root, ParseStrictJson(*text, path, "key"));
  ASSIGN_OR_RETURN(Scenario scenario, ParseScenario(root, dir));

  std::map<std::string, const ScenarioFile*> listed;
  for (const ScenarioFile& file : scenario.files) {
    if (!listed.emplace(file.path, &file).second) {
      return FieldError("files",
                        absl::StrCat("\"", file.path, "\" is listed twice"));
    }
  }
  for (const auto& [where, relative] : ReferencedFiles(scenario)) {
    if (listed.count(relative) == 0) {
      return FieldError(
          where, absl::StrCat("\"", relative, "\" is not listed in files"));
    }
  }
  for (const ScenarioFile& file : scenario.files) {
    const std::string file_path = scenario.Path(file.path);
    std::error_code error;
    const uintmax_t size = fs::file_size(file_path, error);
    if (error) {
      return absl::NotFoundError(absl::StrCat(
          "scenario file missing: ", file_path, " (", error.message(), ")"));
    }
    if (size != file.bytes) {
      return absl::DataLossError(
          absl::StrCat("scenario file ", file.path, " has ", size, " bytes; ",
                       kScenarioFileName, " lists ", file.bytes));
    }
    if (!options.verify_digests) continue;
    ASSIGN_OR_RETURN(std::string digest, Sha256File(file_path));
    if (digest != file.sha256) {
      return absl::DataLossError(
          absl::StrCat("sha256 mismatch for scenario file ", file.path,
                       ": expected ", file.sha256, ", got ", digest));
    }
  }
  return scenario;
}

absl::Status WriteScenario(Scenario* scenario,
                           const std::vector<std::string>& extra_files) {
  RETURN_IF_ERROR(ValidateDescription(*scenario));
  std::vector<std::string> paths;
  std::set<std::string> seen;
  for (const auto& [where, relative] : ReferencedFiles(*scenario)) {
    if (seen.insert(relative).second) paths.push_back(relative);
  }
  for (const std::string& relative : extra_files) {
    RETURN_IF_ERROR(CheckRelativePath(relative, "extra file"));
    if (seen.insert(relative).second) paths.push_back(relative);
  }
  scenario->files.clear();
  for (const std::string& relative : paths) {
    const std::string file_path = scenario->Path(relative);
    std::error_code error;
    const uintmax_t size = fs::file_size(file_path, error);
    if (error) {
      return absl::NotFoundError(
          absl::StrCat("scenario file missing: ", file_path));
    }
    ASSIGN_OR_RETURN(std::string digest, Sha256File(file_path));
    scenario->files.push_back({relative, digest, size});
  }
  return WriteFileAtomically(scenario->Path(kScenarioFileName),
                             ScenarioToJson(*scenario).dump(2) + "\n");
}

absl::StatusOr<Trigger> LoadScenarioTrigger(const Scenario& scenario) {
  if (!scenario.attack) {
    return absl::FailedPreconditionError(
        absl::StrCat("scenario \"", scenario.name, "\" has no attack"));
  }
  const TriggerSpec& spec = scenario.attack->trigger;
  ASSIGN_OR_RETURN(NamedTensors tensors,
                   LoadTensorsFromPath(scenario.Path(spec.file)));
  Trigger trigger;
  for (const auto& [name, tensor] : tensors) {
    if (name == "pattern") trigger.pattern = tensor.to(torch::kFloat32);
  }
  if (!trigger.pattern.defined()) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.file, ": no \"pattern\" tensor"));
  }
  trigger.kind = spec.kind;
  trigger.row = spec.row;
  trigger.col = spec.col;
  trigger.blend_alpha = spec.blend_alpha;
  absl::Status valid =
      ValidateTrigger(trigger, scenario.architecture.input_shape);
  if (!valid.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(spec.file, ": ", valid.message()));
  }
  return trigger;
}

absl::Status SaveTriggerPattern(const std::string& path,
                                const Trigger& trigger) {
  return SaveTensors(
      path,
      {{"pattern", trigger.pattern.detach().to(torch::kFloat32).contiguous()}});
}

}  // namespace mergeguard
