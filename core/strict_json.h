#ifndef MERGEGUARD_CORE_STRICT_JSON_H_
#define MERGEGUARD_CORE_STRICT_JSON_H_

// Private to core/: JSON parsing that never throws and rejects duplicate
// keys, which nlohmann::json would otherwise resolve silently (last one
// wins), letting two readers of one file disagree on its contents.

#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "nlohmann/json.hpp"

namespace mergeguard {

// ParseStrictJson parses `text` as one JSON value. INVALID_ARGUMENT, prefixed
// with `what`, when it is not valid JSON or an object repeats a key. A
// repeated top-level key is reported as `duplicate <noun> "k"`; a repeated
// nested key as `<noun> "top": duplicate key "k"`.
inline absl::StatusOr<nlohmann::json> ParseStrictJson(absl::string_view text,
                                                      absl::string_view what,
                                                      absl::string_view noun) {
  using nlohmann::json;
  // One key set per open object; arrays need no entry since they hold no
  // keys, and object_start/object_end always pair up.
  std::vector<std::set<std::string>> open_objects;
  std::string top_key;
  std::string duplicate_error;
  json::parser_callback_t callback =
      [&](int /*depth*/, json::parse_event_t event, json& parsed) {
        switch (event) {
          case json::parse_event_t::object_start:
            open_objects.emplace_back();
            break;
          case json::parse_event_t::object_end:
            if (!open_objects.empty()) open_objects.pop_back();
            break;
          case json::parse_event_t::key: {
            if (open_objects.empty() || !parsed.is_string()) break;
            const std::string& key = parsed.get_ref<const std::string&>();
            if (open_objects.size() == 1) top_key = key;
            if (!open_objects.back().insert(key).second &&
                duplicate_error.empty()) {
              duplicate_error =
                  open_objects.size() == 1
                      ? absl::StrCat("duplicate ", noun, " \"", key, "\"")
                      : absl::StrCat(noun, " \"", top_key,
                                     "\": duplicate key \"", key, "\"");
            }
            break;
          }
          default:
            break;
        }
        return true;
      };
  json parsed = json::parse(text.begin(), text.end(), callback,
                            /*allow_exceptions=*/false);
  if (parsed.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": not valid JSON (or not valid UTF-8)"));
  }
  if (!duplicate_error.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", duplicate_error));
  }
  return parsed;
}

// JsonTypeName returns a short name of `value`'s JSON type for messages.
inline std::string JsonTypeName(const nlohmann::json& value) {
  if (value.is_number_unsigned()) return "non-negative integer";
  if (value.is_number_integer()) return "negative integer";
  if (value.is_number_float()) return "floating-point number";
  return value.type_name();
}

}  // namespace mergeguard

#endif  // MERGEGUARD_CORE_STRICT_JSON_H_
