// Values of the chat-template interpreter: Python semantics as Jinja sees them (truth, str, repr, JSON, equality).
#include "engine/chat_template_internal.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"

namespace ferry::engine::jinja {

const char* KindName(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: return "undefined";
    case Value::kNone: return "NoneType";
    case Value::kBool: return "bool";
    case Value::kInt: return "int";
    case Value::kFloat: return "float";
    case Value::kString: return "str";
    case Value::kList: return "list";
    case Value::kDict: return "dict";
    case Value::kNamespace: return "Namespace";
    case Value::kCallable: return "function";
  }
  return "?";
}

Value FromJson(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null: return Value::None();
    case ojson::value_t::boolean: return Value::Bool(j.get<bool>());
    case ojson::value_t::number_integer: return Value::Int(j.get<int64_t>());
    case ojson::value_t::number_unsigned: {
      const uint64_t u = j.get<uint64_t>();
      return u > static_cast<uint64_t>(INT64_MAX) ? Value::Float(static_cast<double>(u)) : Value::Int(static_cast<int64_t>(u));
    }
    case ojson::value_t::number_float: return Value::Float(j.get<double>());
    case ojson::value_t::string: return Value::Str(j.get<std::string>());
    case ojson::value_t::array: {
      List items;
      for (const auto& e : j) items.push_back(FromJson(e));
      return Value::MakeList(std::move(items));
    }
    case ojson::value_t::object: {
      Dict items;
      for (auto it = j.begin(); it != j.end(); ++it) items.emplace_back(it.key(), FromJson(it.value()));
      return Value::MakeDict(std::move(items));
    }
    default: return Value::None();
  }
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
    case Value::kNone: return false;
    case Value::kBool: return v.b;
    case Value::kInt: return v.i != 0;
    case Value::kFloat: return v.f != 0.0;
    case Value::kString: return !v.s.empty();
    case Value::kList: return !v.list->empty();
    case Value::kDict: return !v.dict->empty();
    case Value::kNamespace:
    case Value::kCallable: return true;
  }
  return false;
}

// Python's repr of a float: the shortest string that reads back the same, with ".0" on integers
// and exponents from 1e16 and below 1e-4.
std::string FloatRepr(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[40];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof(buf), "%.*e", precision - 1, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  // buf is d.ddde[+-]XX; rebuild in Python's choice of notation.
  std::string s(buf);
  const size_t e = s.find('e');
  std::string mant = s.substr(0, e);
  const int exp = std::atoi(s.c_str() + e + 1);
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant) {
    if (c != '.') digits += c;
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= 16 || exp < -4) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) absl::StrAppend(&out, ".", digits.substr(1));
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  } else if (exp < 0) {
    out = absl::StrCat("0.", std::string(static_cast<size_t>(-exp - 1), '0'), digits);
  } else {
    const size_t point = static_cast<size_t>(exp) + 1;
    if (digits.size() <= point) {
      out = digits + std::string(point - digits.size(), '0') + ".0";
    } else {
      out = absl::StrCat(digits.substr(0, point), ".", digits.substr(point));
    }
  }
  return neg ? "-" + out : out;
}

std::string PyStrRepr(const std::string& s) {
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) {
    if (c == '\\') out += "\\\\";
    else if (c == q) out += std::string("\\") + static_cast<char>(q);
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else if (c < 0x20 || c == 0x7f) {
      char b[8];
      std::snprintf(b, sizeof(b), "\\x%02x", c);
      out += b;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + q;
}

std::string Repr(const Value& v);

// str(v) as Jinja prints it.
std::string ToStr(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined: return "";
    case Value::kNone: return "None";
    case Value::kBool: return v.b ? "True" : "False";
    case Value::kInt: return std::to_string(v.i);
    case Value::kFloat: return FloatRepr(v.f);
    case Value::kString: return v.s;
    default: return Repr(v);
  }
}

std::string Repr(const Value& v) {
  switch (v.kind) {
    case Value::kString: return PyStrRepr(v.s);
    case Value::kList: {
      std::string out = "[";
      for (size_t i = 0; i < v.list->size(); ++i) out += (i ? ", " : "") + Repr((*v.list)[i]);
      return out + "]";
    }
    case Value::kDict: {
      std::string out = "{";
      for (size_t i = 0; i < v.dict->size(); ++i) out += (i ? ", " : "") + PyStrRepr((*v.dict)[i].first) + ": " + Repr((*v.dict)[i].second);
      return out + "}";
    }
    case Value::kCallable: return "<function " + v.s + ">";
    case Value::kNamespace: {
      std::string out = "<Namespace {";
      for (size_t i = 0; i < v.dict->size(); ++i) out += (i ? ", " : "") + PyStrRepr((*v.dict)[i].first) + ": " + Repr((*v.dict)[i].second);
      return out + "}>";
    }
    default: return ToStr(v);
  }
}

void JsonString(const std::string& s, std::string* out) {
  *out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      case '\b': *out += "\\b"; break;
      case '\f': *out += "\\f"; break;
      default:
        if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof(b), "\\u%04x", c);
          *out += b;
        } else {
          *out += static_cast<char>(c);
        }
    }
  }
  *out += '"';
}

// Python's json.dumps(v, ensure_ascii=False, indent=indent) (transformers' tojson filter).
void ToJson(const Value& v, int indent, int depth, std::string* out) {
  if (depth > 64) Fail("tojson: value nested deeper than 64 levels");
  const auto newline = [&](int d) {
    if (indent >= 0) {
      *out += '\n';
      out->append(static_cast<size_t>(indent) * static_cast<size_t>(d), ' ');
    }
  };
  const char* item_sep = indent >= 0 ? "," : ", ";
  switch (v.kind) {
    case Value::kUndefined: Fail("tojson: " + (v.undefined_name.empty() ? std::string("a value") : "'" + v.undefined_name + "'") + " is undefined");
    case Value::kNone: *out += "null"; return;
    case Value::kBool: *out += v.b ? "true" : "false"; return;
    case Value::kInt: *out += std::to_string(v.i); return;
    case Value::kFloat:
      if (std::isnan(v.f)) *out += "NaN";
      else if (std::isinf(v.f)) *out += v.f > 0 ? "Infinity" : "-Infinity";
      else *out += FloatRepr(v.f);
      return;
    case Value::kString: JsonString(v.s, out); return;
    case Value::kList:
      if (v.list->empty()) {
        *out += "[]";
        return;
      }
      *out += '[';
      for (size_t i = 0; i < v.list->size(); ++i) {
        if (i) *out += item_sep;
        newline(depth + 1);
        ToJson((*v.list)[i], indent, depth + 1, out);
      }
      newline(depth);
      *out += ']';
      return;
    case Value::kDict:
      if (v.dict->empty()) {
        *out += "{}";
        return;
      }
      *out += '{';
      for (size_t i = 0; i < v.dict->size(); ++i) {
        if (i) *out += item_sep;
        newline(depth + 1);
        JsonString((*v.dict)[i].first, out);
        *out += ": ";
        ToJson((*v.dict)[i].second, indent, depth + 1, out);
      }
      newline(depth);
      *out += '}';
      return;
    case Value::kNamespace:
    case Value::kCallable: Fail(absl::StrCat("tojson: a ", KindName(v), " is not JSON serializable"));
  }
}

bool Equal(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) return a.num() == b.num();
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::kUndefined:
    case Value::kNone: return true;
    case Value::kString: return a.s == b.s;
    case Value::kList:
      if (a.list->size() != b.list->size()) return false;
      for (size_t i = 0; i < a.list->size(); ++i) {
        if (!Equal((*a.list)[i], (*b.list)[i])) return false;
      }
      return true;
    case Value::kDict:
      if (a.dict->size() != b.dict->size()) return false;
      for (const auto& [k, v] : *a.dict) {
        const Value* o = b.Find(k);
        if (o == nullptr || !Equal(v, *o)) return false;
      }
      return true;
    case Value::kNamespace: return a.dict == b.dict;
    case Value::kCallable: return a.s == b.s;
    default: return false;
  }
}

}  // namespace ferry::engine::jinja
