#include "engine/chat_template.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "base/file.h"
#include "base/json.h"
#include "base/status.h"
#include "engine/gguf_model.h"
#include "io/gguf.h"

namespace ferry::engine {
namespace {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

// Errors inside the parser and the interpreter unwind as this exception, caught at the public
// functions and returned as a Status (it never leaves this file).
struct TemplateError {
  std::string message;
};
[[noreturn]] void Fail(std::string message) { throw TemplateError{std::move(message)}; }

// ---------------------------------------------------------------------------------------------
// Values: Python's, as Jinja sees them.

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion order, as Python's dict

struct Value {
  enum Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kNamespace, kCallable };  // kCallable: a global function, s its name
  Kind kind = kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<List> list;  // lists and tuples
  std::shared_ptr<Dict> dict;  // dicts and namespaces
  std::string undefined_name;  // what was undefined, for the error when it is used

  static Value Undefined(std::string name) {
    Value v;
    v.undefined_name = std::move(name);
    return v;
  }
  static Value None() { return Make(kNone); }
  static Value Bool(bool x) {
    Value v = Make(kBool);
    v.b = x;
    return v;
  }
  static Value Int(int64_t x) {
    Value v = Make(kInt);
    v.i = x;
    return v;
  }
  static Value Float(double x) {
    Value v = Make(kFloat);
    v.f = x;
    return v;
  }
  static Value Str(std::string x) {
    Value v = Make(kString);
    v.s = std::move(x);
    return v;
  }
  static Value MakeList(List items = {}) {
    Value v = Make(kList);
    v.list = std::make_shared<List>(std::move(items));
    return v;
  }
  static Value MakeDict(Dict items = {}, Kind kind = kDict) {
    Value v = Make(kind);
    v.dict = std::make_shared<Dict>(std::move(items));
    return v;
  }
  static Value Make(Kind k) {
    Value v;
    v.kind = k;
    return v;
  }
  bool defined() const { return kind != kUndefined; }
  bool numeric() const { return kind == kInt || kind == kFloat || kind == kBool; }
  double num() const { return kind == kFloat ? f : kind == kBool ? (b ? 1.0 : 0.0) : static_cast<double>(i); }
  const Value* Find(std::string_view key) const {
    if (!dict) return nullptr;
    for (const auto& [k, v] : *dict) {
      if (k == key) return &v;
    }
    return nullptr;
  }
};

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
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  } else if (exp < 0) {
    out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  } else {
    const size_t point = static_cast<size_t>(exp) + 1;
    if (digits.size() <= point) {
      out = digits + std::string(point - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, point) + "." + digits.substr(point);
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

// ---------------------------------------------------------------------------------------------
// Lexer: the template's text and tags, with Jinja's whitespace control.

struct Token {
  enum Kind { kName, kString, kInt, kFloat, kOp, kEnd } kind = kEnd;
  std::string text;  // name, operator, or the string's value
  int64_t i = 0;
  double f = 0;
};

struct Piece {
  enum Kind { kText, kExpr, kStmt, kComment } kind = kText;
  std::string text;
  std::vector<Token> tokens;
  int line = 1;
};

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

class Lexer {
 public:
  explicit Lexer(std::string_view src) : src_(src) {}

  std::vector<Piece> Run() {
    std::vector<Piece> pieces;
    bool line_starting = true;  // the next text begins a line (lstrip_blocks)
    bool strip_next = false;     // the last tag ended with '-'
    bool trim_next = false;      // the last tag was a block or comment ending without '-' or '+'
    size_t pos = 0;
    while (pos <= src_.size()) {
      size_t open = FindOpen(pos);
      std::string text(src_.substr(pos, (open == std::string_view::npos ? src_.size() : open) - pos));
      // The previous tag's right side.
      if (strip_next) {
        size_t k = 0;
        while (k < text.size() && IsSpace(text[k])) ++k;
        text.erase(0, k);
      } else if (trim_next && !text.empty() && text[0] == '\n') {
        text.erase(0, 1);
      }
      if (open == std::string_view::npos) {
        if (!text.empty()) pieces.push_back({Piece::kText, std::move(text), {}, line_});
        break;
      }
      const char kind = src_[open + 1];
      size_t p = open + 2;
      bool strip_before = false, plus = false;
      if (p < src_.size() && src_[p] == '-') strip_before = true, ++p;
      else if (p < src_.size() && src_[p] == '+') plus = true, ++p;
      // This tag's left side.
      if (strip_before) {
        while (!text.empty() && IsSpace(text.back())) text.pop_back();
      } else if (kind != '{' && !plus) {  // lstrip_blocks
        const size_t nl = text.rfind('\n');
        if (nl != std::string::npos || line_starting) {
          const size_t from = nl == std::string::npos ? 0 : nl + 1;
          if (text.find_first_not_of(" \t", from) == std::string::npos) text.erase(from);
        }
      }
      line_ += static_cast<int>(std::count(src_.begin() + static_cast<ptrdiff_t>(pos), src_.begin() + static_cast<ptrdiff_t>(open), '\n'));
      if (!text.empty()) pieces.push_back({Piece::kText, std::move(text), {}, line_});
      Piece tag;
      tag.line = line_;
      bool strip_after = false, plus_after = false;
      size_t end;
      if (kind == '#') {
        const size_t close = src_.find("#}", p);
        if (close == std::string_view::npos) Fail(absl::StrCat("line ", line_, ": comment without #}"));
        strip_after = close > p && src_[close - 1] == '-';
        tag.kind = Piece::kComment;
        end = close + 2;
      } else {
        tag.kind = kind == '{' ? Piece::kExpr : Piece::kStmt;
        end = LexTag(p, kind == '{' ? '}' : '%', &tag.tokens, &strip_after, &plus_after);
      }
      line_ += static_cast<int>(std::count(src_.begin() + static_cast<ptrdiff_t>(open), src_.begin() + static_cast<ptrdiff_t>(end), '\n'));
      pieces.push_back(std::move(tag));
      strip_next = strip_after;
      trim_next = kind != '{' && !strip_after && !plus_after;
      // Does the text after this tag begin a line? (What the tag consumed ends with a newline.)
      if (strip_after) {
        size_t k = end;
        while (k < src_.size() && IsSpace(src_[k])) ++k;
        line_starting = k > end && src_[k - 1] == '\n';
      } else {
        line_starting = trim_next && end < src_.size() && src_[end] == '\n';
      }
      pos = end;
    }
    return pieces;
  }

 private:
  size_t FindOpen(size_t from) const {
    for (size_t i = src_.find('{', from); i != std::string_view::npos; i = src_.find('{', i + 1)) {
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    }
    return std::string_view::npos;
  }

  // Tokens up to the tag's close ("}}" or "%}", maybe after '-' or '+'); returns the offset after it.
  size_t LexTag(size_t p, char close, std::vector<Token>* out, bool* strip_after, bool* plus_after) {
    int depth = 0;  // open brackets: "}}" inside a dict literal does not close the tag
    for (;;) {
      while (p < src_.size() && IsSpace(src_[p])) ++p;
      if (p >= src_.size()) Fail(absl::StrCat("line ", line_, ": tag without its closing ", std::string(1, close), "}"));
      const auto at = [&](std::string_view s) { return src_.substr(p, s.size()) == s; };
      if (depth == 0) {
        const std::string end = std::string(1, close) + "}";
        if (at("-" + end)) {
          *strip_after = true;
          return p + 3;
        }
        if (close == '%' && at("+" + end)) {
          *plus_after = true;
          return p + 3;
        }
        if (at(end)) return p + 2;
      }
      Token t;
      const char c = src_[p];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t q = p;
        while (q < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        t.kind = Token::kName;
        t.text = std::string(src_.substr(p, q - p));
        p = q;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t q = p;
        while (q < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        bool is_float = false;
        if (q + 1 < src_.size() && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
          is_float = true;
          ++q;
          while (q < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q]))) ++q;
        }
        if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
          size_t r = q + 1;
          if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
          if (r < src_.size() && std::isdigit(static_cast<unsigned char>(src_[r]))) {
            is_float = true;
            q = r;
            while (q < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q]))) ++q;
          }
        }
        std::string digits;
        for (char d : src_.substr(p, q - p)) {
          if (d != '_') digits += d;
        }
        if (is_float) {
          t.kind = Token::kFloat;
          t.f = std::strtod(digits.c_str(), nullptr);
        } else {
          t.kind = Token::kInt;
          errno = 0;
          t.i = std::strtoll(digits.c_str(), nullptr, 10);
          if (errno == ERANGE) Fail(absl::StrCat("line ", line_, ": integer ", digits, " out of range"));
        }
        p = q;
      } else if (c == '\'' || c == '"') {
        t.kind = Token::kString;
        p = LexString(p, &t.text);
      } else {
        static const char* kOps[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%", "~", "<", ">", "=",
                                     "(", ")", "[", "]", "{", "}", ",", ".", ":", "|"};
        bool found = false;
        for (const char* op : kOps) {
          if (at(op)) {
            t.kind = Token::kOp;
            t.text = op;
            p += t.text.size();
            found = true;
            break;
          }
        }
        if (!found) Fail(absl::StrCat("line ", line_, ": unexpected character '", std::string(1, c), "' in a tag"));
        if (t.text == "(" || t.text == "[" || t.text == "{") ++depth;
        if ((t.text == ")" || t.text == "]" || t.text == "}") && depth > 0) --depth;
      }
      out->push_back(std::move(t));
    }
  }

  static void AppendUtf8(uint32_t cp, std::string* out) {
    if (cp < 0x80) {
      *out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      *out += static_cast<char>(0xC0 | (cp >> 6));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      *out += static_cast<char>(0xE0 | (cp >> 12));
      *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      *out += static_cast<char>(0xF0 | (cp >> 18));
      *out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      *out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      *out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  // A string literal with Python's escapes (as Jinja reads them); returns the offset after it.
  size_t LexString(size_t p, std::string* out) {
    const char q = src_[p++];
    for (;;) {
      if (p >= src_.size()) Fail(absl::StrCat("line ", line_, ": unterminated string"));
      const char c = src_[p++];
      if (c == q) return p;
      if (c != '\\') {
        *out += c;
        continue;
      }
      if (p >= src_.size()) Fail(absl::StrCat("line ", line_, ": unterminated string"));
      const char e = src_[p++];
      const auto hex = [&](int n) {
        if (p + static_cast<size_t>(n) > src_.size()) Fail(absl::StrCat("line ", line_, ": truncated \\", std::string(1, e), " escape"));
        uint32_t v = 0;
        for (int k = 0; k < n; ++k) {
          const char h = src_[p++];
          if (!std::isxdigit(static_cast<unsigned char>(h))) Fail(absl::StrCat("line ", line_, ": bad \\", std::string(1, e), " escape"));
          v = v * 16 + static_cast<uint32_t>(std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
        }
        if (v > 0x10FFFF || (v >= 0xD800 && v < 0xE000)) Fail(absl::StrCat("line ", line_, ": escape outside Unicode"));
        AppendUtf8(v, out);
      };
      switch (e) {
        case 'n': *out += '\n'; break;
        case 't': *out += '\t'; break;
        case 'r': *out += '\r'; break;
        case '\\': *out += '\\'; break;
        case '\'': *out += '\''; break;
        case '"': *out += '"'; break;
        case 'a': *out += '\a'; break;
        case 'b': *out += '\b'; break;
        case 'f': *out += '\f'; break;
        case 'v': *out += '\v'; break;
        case '0': *out += '\0'; break;
        case '\n': break;
        case 'x': hex(2); break;
        case 'u': hex(4); break;
        case 'U': hex(8); break;
        default: *out += '\\', *out += e;  // Python keeps unknown escapes
      }
    }
  }

  std::string_view src_;
  int line_ = 1;
};

// ---------------------------------------------------------------------------------------------
// Syntax tree.

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Arg {
  std::string name;  // empty: positional
  ExprPtr value;
};

struct Expr {
  enum Kind { kLiteral, kName, kAttr, kItem, kSlice, kCall, kFilter, kTest, kNeg, kPos, kNot, kBinary, kCompare, kAnd, kOr,
              kCond, kList, kTuple, kDict };
  Kind kind = kLiteral;
  Value literal;
  std::string name;  // variable, attribute, filter, test, binary operator
  bool negated = false;  // `is not`
  ExprPtr a, b, c;       // operands; slice start/stop/step in a/b/c beside `base`
  ExprPtr base;
  std::vector<Arg> args;
  std::vector<std::string> ops;  // comparison chain
  std::vector<ExprPtr> items;    // list/tuple items, dict keys and values interleaved, compare operands
};

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum Kind { kText, kOutput, kIf, kFor, kSet, kBreak, kContinue } kind = kText;
  int line = 0;
  std::string text;
  ExprPtr expr;  // output, set value, for iterable
  std::vector<std::pair<ExprPtr, Body>> branches;  // if/elif (condition) and else (null)
  std::vector<std::string> targets;                // for targets; set: name (and attribute)
  ExprPtr filter;                                  // for ... if
  Body body, else_body;
};

const std::set<std::string>& KnownFilters() {
  static const std::set<std::string> k = {"trim", "length", "count", "tojson", "upper", "lower", "default", "d", "first", "last",
                                          "join", "replace", "string", "int", "float", "list", "items", "capitalize", "title",
                                          "select", "reject", "selectattr", "rejectattr", "map", "safe", "abs", "reverse",
                                          "unique", "indent", "dictsort", "sum", "min", "max", "wordcount", "batch", "e", "escape"};
  return k;
}
const std::set<std::string>& KnownTests() {
  static const std::set<std::string> k = {"defined", "undefined", "none", "string", "number", "integer", "float", "mapping",
                                          "iterable", "sequence", "boolean", "true", "false", "equalto", "eq", "==", "ne", "!=",
                                          "lt", "<", "gt", ">", "le", "<=", "ge", ">=", "odd", "even", "divisibleby", "in",
                                          "sameas", "lower", "upper", "callable"};
  return k;
}
const std::set<std::string>& KnownFunctions() {
  static const std::set<std::string> k = {"raise_exception", "namespace", "range", "strftime_now", "dict"};
  return k;
}

class Parser {
 public:
  explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  Body Run() {
    Body body = ParseBody({});
    if (piece_ < pieces_.size()) Fail(absl::StrCat("line ", pieces_[piece_].line, ": unexpected '", TagName(pieces_[piece_]), "'"));
    return body;
  }

 private:
  static std::string TagName(const Piece& p) { return p.tokens.empty() || p.tokens[0].kind != Token::kName ? "" : p.tokens[0].text; }

  // Nodes until a statement whose name is in `until` (left unconsumed) or the end.
  Body ParseBody(const std::set<std::string>& until) {
    Body body;
    for (; piece_ < pieces_.size();) {
      const Piece& p = pieces_[piece_];
      line_ = p.line;
      if (p.kind == Piece::kComment) {
        ++piece_;
        continue;
      }
      if (p.kind == Piece::kText) {
        auto n = std::make_unique<Node>();
        n->kind = Node::kText;
        n->text = p.text;
        body.push_back(std::move(n));
        ++piece_;
        continue;
      }
      Begin(p);
      if (p.kind == Piece::kExpr) {
        auto n = std::make_unique<Node>();
        n->kind = Node::kOutput;
        n->line = p.line;
        n->expr = ParseExpression();
        ExpectEnd();
        body.push_back(std::move(n));
        ++piece_;
        continue;
      }
      const std::string name = TagName(p);
      if (name.empty()) Fail(absl::StrCat("line ", p.line, ": a tag without a statement name"));
      if (until.count(name)) return body;
      body.push_back(ParseStatement(name));
    }
    if (!until.empty()) Fail(absl::StrCat("line ", line_, ": missing '", *until.rbegin(), "'"));
    return body;
  }

  std::unique_ptr<Node> ParseStatement(const std::string& name) {
    auto n = std::make_unique<Node>();
    n->line = line_;
    Next();  // the statement name
    if (name == "if") {
      n->kind = Node::kIf;
      ExprPtr cond = ParseExpression();
      ExpectEnd();
      ++piece_;
      for (;;) {
        Body body = ParseBody({"elif", "else", "endif"});
        n->branches.emplace_back(std::move(cond), std::move(body));
        const std::string tag = TagName(pieces_[piece_]);
        Begin(pieces_[piece_]);
        Next();
        if (tag == "endif") {
          ExpectEnd();
          ++piece_;
          return n;
        }
        if (tag == "elif") {
          cond = ParseExpression();
          ExpectEnd();
          ++piece_;
          continue;
        }
        ExpectEnd();  // else
        ++piece_;
        Body else_body = ParseBody({"endif"});
        n->branches.emplace_back(nullptr, std::move(else_body));
        Begin(pieces_[piece_]);
        Next();
        ExpectEnd();
        ++piece_;
        return n;
      }
    }
    if (name == "for") {
      n->kind = Node::kFor;
      do {
        n->targets.push_back(ExpectName());
      } while (Skip(","));
      if (!SkipName("in")) Fail(Where("expected 'in' in a for loop"));
      n->expr = ParseOr();  // `if` after it filters the items
      if (SkipName("if")) n->filter = ParseExpression(false);
      if (PeekName("recursive")) Fail(Where("the 'recursive' loop is not supported"));
      ExpectEnd();
      ++piece_;
      n->body = ParseBody({"else", "endfor"});
      if (TagName(pieces_[piece_]) == "else") {
        Begin(pieces_[piece_]);
        Next();
        ExpectEnd();
        ++piece_;
        n->else_body = ParseBody({"endfor"});
      }
      Begin(pieces_[piece_]);
      Next();
      ExpectEnd();
      ++piece_;
      return n;
    }
    if (name == "set") {
      n->kind = Node::kSet;
      n->targets.push_back(ExpectName());
      if (Skip(".")) n->targets.push_back(ExpectName());
      if (Peek(",")) Fail(Where("set with several targets is not supported"));
      if (!Skip("=")) Fail(Where("the block form of set ({% set x %}...{% endset %}) is not supported"));
      n->expr = ParseExpression();
      ExpectEnd();
      ++piece_;
      return n;
    }
    if (name == "break" || name == "continue") {
      n->kind = name == "break" ? Node::kBreak : Node::kContinue;
      ExpectEnd();
      ++piece_;
      return n;
    }
    Fail(Where(absl::StrCat("the tag '", name, "' is not supported")));
  }

  // Token stream of one tag.
  void Begin(const Piece& p) {
    tokens_ = &p.tokens;
    tok_ = 0;
    line_ = p.line;
  }
  const Token& Cur() const {
    static const Token end;
    return tok_ < tokens_->size() ? (*tokens_)[tok_] : end;
  }
  void Next() { ++tok_; }
  bool Peek(std::string_view op) const { return Cur().kind == Token::kOp && Cur().text == op; }
  bool PeekName(std::string_view name) const { return Cur().kind == Token::kName && Cur().text == name; }
  bool Skip(std::string_view op) {
    if (!Peek(op)) return false;
    Next();
    return true;
  }
  bool SkipName(std::string_view name) {
    if (!PeekName(name)) return false;
    Next();
    return true;
  }
  void Expect(std::string_view op) {
    if (!Skip(op)) Fail(Where(absl::StrCat("expected '", std::string(op), "'")));
  }
  std::string ExpectName() {
    if (Cur().kind != Token::kName) Fail(Where("expected a name"));
    std::string n = Cur().text;
    Next();
    return n;
  }
  void ExpectEnd() {
    if (tok_ < tokens_->size()) Fail(Where(absl::StrCat("unexpected '", Cur().text, "'")));
  }
  std::string Where(const std::string& what) const { return absl::StrCat("line ", line_, ": ", what); }

  ExprPtr New(Expr::Kind k) {
    auto e = std::make_unique<Expr>();
    e->kind = k;
    return e;
  }

  void Enter() {
    if (++depth_ > 200) Fail(Where("expression nested too deeply"));
  }
  struct Depth {
    Parser* p;
    ~Depth() { --p->depth_; }
  };

  ExprPtr ParseExpression(bool with_cond = true) {
    Enter();
    Depth d{this};
    if (!with_cond) return ParseOr();
    ExprPtr e = ParseOr();
    while (SkipName("if")) {
      auto c = New(Expr::kCond);
      c->a = ParseOr();                                      // condition
      if (SkipName("else")) c->c = ParseExpression();        // else value
      c->b = std::move(e);                                   // then value
      e = std::move(c);
    }
    return e;
  }
  ExprPtr ParseOr() {
    ExprPtr e = ParseAnd();
    while (SkipName("or")) {
      auto o = New(Expr::kOr);
      o->a = std::move(e);
      o->b = ParseAnd();
      e = std::move(o);
    }
    return e;
  }
  ExprPtr ParseAnd() {
    ExprPtr e = ParseNot();
    while (SkipName("and")) {
      auto o = New(Expr::kAnd);
      o->a = std::move(e);
      o->b = ParseNot();
      e = std::move(o);
    }
    return e;
  }
  ExprPtr ParseNot() {
    if (SkipName("not")) {
      Enter();
      Depth d{this};
      auto n = New(Expr::kNot);
      n->a = ParseNot();
      return n;
    }
    return ParseCompare();
  }
  ExprPtr ParseCompare() {
    ExprPtr e = ParseMath1();
    ExprPtr cmp;
    for (;;) {
      std::string op;
      if (Cur().kind == Token::kOp && (Cur().text == "==" || Cur().text == "!=" || Cur().text == "<" || Cur().text == ">" ||
                                       Cur().text == "<=" || Cur().text == ">=")) {
        op = Cur().text;
        Next();
      } else if (SkipName("in")) {
        op = "in";
      } else if (PeekName("not") && tok_ + 1 < tokens_->size() && (*tokens_)[tok_ + 1].kind == Token::kName &&
                 (*tokens_)[tok_ + 1].text == "in") {
        Next(), Next();
        op = "not in";
      } else {
        break;
      }
      if (!cmp) {
        cmp = New(Expr::kCompare);
        cmp->items.push_back(std::move(e));
      }
      cmp->ops.push_back(op);
      cmp->items.push_back(ParseMath1());
    }
    return cmp ? std::move(cmp) : std::move(e);
  }
  ExprPtr Binary(std::string op, ExprPtr a, ExprPtr b) {
    auto e = New(Expr::kBinary);
    e->name = std::move(op);
    e->a = std::move(a);
    e->b = std::move(b);
    return e;
  }
  ExprPtr ParseMath1() {
    ExprPtr e = ParseConcat();
    while (Peek("+") || Peek("-")) {
      std::string op = Cur().text;
      Next();
      e = Binary(op, std::move(e), ParseConcat());
    }
    return e;
  }
  ExprPtr ParseConcat() {
    ExprPtr e = ParseMath2();
    while (Skip("~")) e = Binary("~", std::move(e), ParseMath2());
    return e;
  }
  ExprPtr ParseMath2() {
    ExprPtr e = ParsePow();
    while (Peek("*") || Peek("/") || Peek("//") || Peek("%")) {
      std::string op = Cur().text;
      Next();
      e = Binary(op, std::move(e), ParsePow());
    }
    return e;
  }
  ExprPtr ParsePow() {
    ExprPtr e = ParseUnary(true);
    while (Skip("**")) e = Binary("**", std::move(e), ParseUnary(true));
    return e;
  }
  ExprPtr ParseUnary(bool with_filter) {
    Enter();
    Depth d{this};
    ExprPtr e;
    if (Skip("-")) {
      e = New(Expr::kNeg);
      e->a = ParseUnary(false);
    } else if (Skip("+")) {
      e = New(Expr::kPos);
      e->a = ParseUnary(false);
    } else {
      e = ParsePostfix(ParsePrimary());
    }
    if (with_filter) e = ParseFilters(std::move(e));
    return e;
  }
  ExprPtr ParsePrimary() {
    const Token t = Cur();
    switch (t.kind) {
      case Token::kName: {
        Next();
        if (t.text == "true" || t.text == "True") return Literal(Value::Bool(true));
        if (t.text == "false" || t.text == "False") return Literal(Value::Bool(false));
        if (t.text == "none" || t.text == "None") return Literal(Value::None());
        auto e = New(Expr::kName);
        e->name = t.text;
        return e;
      }
      case Token::kString: {
        std::string s;
        while (Cur().kind == Token::kString) {  // adjacent literals join
          s += Cur().text;
          Next();
        }
        return Literal(Value::Str(std::move(s)));
      }
      case Token::kInt: Next(); return Literal(Value::Int(t.i));
      case Token::kFloat: Next(); return Literal(Value::Float(t.f));
      case Token::kOp:
        if (Skip("(")) {
          if (Skip(")")) return New(Expr::kTuple);
          ExprPtr first = ParseExpression();
          if (!Peek(",")) {
            Expect(")");
            return first;
          }
          auto tuple = New(Expr::kTuple);
          tuple->items.push_back(std::move(first));
          while (Skip(",")) {
            if (Peek(")")) break;
            tuple->items.push_back(ParseExpression());
          }
          Expect(")");
          return tuple;
        }
        if (Skip("[")) {
          auto list = New(Expr::kList);
          while (!Peek("]")) {
            if (!list->items.empty()) Expect(",");
            if (Peek("]")) break;
            list->items.push_back(ParseExpression());
          }
          Expect("]");
          return list;
        }
        if (Skip("{")) {
          auto dict = New(Expr::kDict);
          while (!Peek("}")) {
            if (!dict->items.empty()) Expect(",");
            if (Peek("}")) break;
            dict->items.push_back(ParseExpression());
            Expect(":");
            dict->items.push_back(ParseExpression());
          }
          Expect("}");
          return dict;
        }
        [[fallthrough]];
      default:
        Fail(Where(t.kind == Token::kEnd ? std::string("unexpected end of the tag") : absl::StrCat("unexpected '", t.text, "'")));
    }
  }
  ExprPtr Literal(Value v) {
    auto e = New(Expr::kLiteral);
    e->literal = std::move(v);
    return e;
  }
  void ParseArgs(std::vector<Arg>* args) {  // after '('
    while (!Skip(")")) {
      if (!args->empty()) Expect(",");
      if (Skip(")")) break;
      if (Peek("*") || Peek("**")) Fail(Where("*args and **kwargs in calls are not supported"));
      Arg a;
      if (Cur().kind == Token::kName && tok_ + 1 < tokens_->size() && (*tokens_)[tok_ + 1].kind == Token::kOp &&
          (*tokens_)[tok_ + 1].text == "=") {
        a.name = Cur().text;
        Next(), Next();
      }
      a.value = ParseExpression();
      args->push_back(std::move(a));
    }
  }
  ExprPtr ParsePostfix(ExprPtr e) {
    for (int n = 0;; ++n) {
      if (n > 200) Fail(Where("expression nested too deeply"));
      if (Skip(".")) {
        auto a = New(Expr::kAttr);
        a->base = std::move(e);
        if (Cur().kind == Token::kInt) {  // x.0
          a->kind = Expr::kItem;
          a->a = Literal(Value::Int(Cur().i));
          Next();
        } else {
          a->name = ExpectName();
        }
        e = std::move(a);
      } else if (Skip("[")) {
        ExprPtr start, stop, step;
        bool slice = false;
        if (!Peek(":")) start = ParseExpression();
        if (Skip(":")) {
          slice = true;
          if (!Peek("]") && !Peek(":")) stop = ParseExpression();
          if (Skip(":") && !Peek("]")) step = ParseExpression();
        }
        Expect("]");
        auto s = New(slice ? Expr::kSlice : Expr::kItem);
        s->base = std::move(e);
        s->a = std::move(start);
        s->b = std::move(stop);
        s->c = std::move(step);
        e = std::move(s);
      } else if (Skip("(")) {
        if (e->kind == Expr::kName && !KnownFunctions().count(e->name)) {
          Fail(Where(absl::StrCat("the function '", e->name, "' is not supported")));
        }
        auto c = New(Expr::kCall);
        c->base = std::move(e);
        ParseArgs(&c->args);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }
  ExprPtr ParseFilters(ExprPtr e) {
    for (int n = 0;; ++n) {
      if (n > 200) Fail(Where("expression nested too deeply"));
      if (Skip("|")) {
        auto f = New(Expr::kFilter);
        f->name = ExpectName();
        if (!KnownFilters().count(f->name)) Fail(Where(absl::StrCat("the filter '", f->name, "' is not supported")));
        f->base = std::move(e);
        if (Skip("(")) ParseArgs(&f->args);
        e = ParsePostfix(std::move(f));
      } else if (SkipName("is")) {
        auto t = New(Expr::kTest);
        t->negated = SkipName("not");
        if (Cur().kind == Token::kName) {
          t->name = Cur().text;
        } else if (Cur().kind == Token::kOp) {
          t->name = Cur().text;
        }
        Next();
        if (!KnownTests().count(t->name)) Fail(Where(absl::StrCat("the test '", t->name, "' is not supported")));
        t->base = std::move(e);
        if (Skip("(")) {
          ParseArgs(&t->args);
        } else if ((Cur().kind == Token::kString || Cur().kind == Token::kInt || Cur().kind == Token::kFloat ||
                    (Cur().kind == Token::kName && Cur().text != "else" && Cur().text != "or" && Cur().text != "and") ||
                    Peek("[") || Peek("{")) &&
                   !PeekName("if")) {
          Arg a;
          a.value = ParsePostfix(ParsePrimary());
          t->args.push_back(std::move(a));
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }

  std::vector<Piece> pieces_;
  size_t piece_ = 0;
  const std::vector<Token>* tokens_ = nullptr;
  size_t tok_ = 0;
  int line_ = 1;
  int depth_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Interpreter.

struct LoopSignal {
  enum Kind { kNone, kBreak, kContinue } kind = kNone;
};

class Renderer {
 public:
  Renderer(const ChatTemplateLimits& limits, std::time_t now) : limits_(limits), now_(now) {}

  std::string Run(const Body& body, const ojson& context) {
    frames_.emplace_back();
    for (auto it = context.begin(); it != context.end(); ++it) frames_.back()[it.key()] = FromJson(it.value());
    frames_.emplace_back();  // the template's own top-level sets
    if (Exec(body).kind != LoopSignal::kNone) Fail("break or continue outside a loop");
    return std::move(out_);
  }

 private:
  using Frame = std::map<std::string, Value>;

  void Emit(const std::string& s) {
    if (out_.size() + s.size() > limits_.max_output_bytes) Fail(absl::StrCat("output exceeds ", limits_.max_output_bytes, " bytes"));
    out_ += s;
  }
  void Tick() {
    if (++iterations_ > limits_.max_loop_iterations) Fail(absl::StrCat("more than ", limits_.max_loop_iterations, " loop iterations"));
  }

  Value Lookup(const std::string& name) const {
    for (auto it = frames_.rbegin(); it != frames_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    if (KnownFunctions().count(name)) {
      Value fn = Value::Make(Value::kCallable);
      fn.s = name;
      return fn;
    }
    return Value::Undefined(name);
  }

  LoopSignal Exec(const Body& body) {
    for (const auto& n : body) {
      line_ = n->line ? n->line : line_;
      switch (n->kind) {
        case Node::kText: Emit(n->text); break;
        case Node::kOutput: Emit(ToStr(Eval(*n->expr))); break;
        case Node::kIf:
          for (const auto& [cond, branch] : n->branches) {
            if (cond == nullptr || Truthy(Eval(*cond))) {
              LoopSignal s = Exec(branch);
              if (s.kind != LoopSignal::kNone) return s;
              break;
            }
          }
          break;
        case Node::kSet: {
          Value v = Eval(*n->expr);
          if (n->targets.size() == 1) {
            frames_.back()[n->targets[0]] = std::move(v);
          } else {
            Value ns = Lookup(n->targets[0]);
            if (ns.kind != Value::kNamespace) Fail(absl::StrCat("cannot assign attribute on ", KindName(ns), " '", n->targets[0], "'"));
            bool found = false;
            for (auto& [k, old] : *ns.dict) {
              if (k == n->targets[1]) old = v, found = true;
            }
            if (!found) ns.dict->emplace_back(n->targets[1], std::move(v));
          }
          break;
        }
        case Node::kFor: ExecFor(*n); break;
        case Node::kBreak: return {LoopSignal::kBreak};
        case Node::kContinue: return {LoopSignal::kContinue};
      }
    }
    return {};
  }

  // The items a for loop (or a filter) walks: a list's items, a dict's keys, a string's characters.
  static List Iterate(const Value& v) {
    switch (v.kind) {
      case Value::kUndefined: return {};
      case Value::kList: return *v.list;
      case Value::kDict: {
        List keys;
        for (const auto& kv : *v.dict) keys.push_back(Value::Str(kv.first));
        return keys;
      }
      case Value::kString: {
        List chars;
        for (size_t i = 0; i < v.s.size();) {
          size_t j = i + 1;
          while (j < v.s.size() && (static_cast<unsigned char>(v.s[j]) & 0xC0) == 0x80) ++j;
          chars.push_back(Value::Str(v.s.substr(i, j - i)));
          i = j;
        }
        return chars;
      }
      default: Fail(absl::StrCat("'", KindName(v), "' object is not iterable"));
    }
  }

  void Bind(Frame& frame, const std::vector<std::string>& targets, const Value& item) {
    if (targets.size() == 1) {
      frame[targets[0]] = item;
      return;
    }
    if (item.kind != Value::kList && item.kind != Value::kString) Fail(absl::StrCat("cannot unpack a ", KindName(item)));
    List parts = Iterate(item);
    if (parts.size() != targets.size()) Fail(absl::StrCat("cannot unpack ", parts.size(), " values into ", targets.size()));
    for (size_t i = 0; i < targets.size(); ++i) frame[targets[i]] = parts[i];
  }

  void ExecFor(const Node& n) {
    List items = Iterate(Eval(*n.expr));
    if (n.filter) {
      List kept;
      for (const Value& item : items) {
        Tick();
        frames_.emplace_back();
        Bind(frames_.back(), n.targets, item);
        const bool keep = Truthy(Eval(*n.filter));
        frames_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      Exec(n.else_body);
      return;
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < len; ++i) {
      Tick();
      frames_.emplace_back();
      Frame& f = frames_.back();
      Bind(f, n.targets, items[static_cast<size_t>(i)]);
      Dict loop = {{"index", Value::Int(i + 1)},
                   {"index0", Value::Int(i)},
                   {"revindex", Value::Int(len - i)},
                   {"revindex0", Value::Int(len - i - 1)},
                   {"first", Value::Bool(i == 0)},
                   {"last", Value::Bool(i == len - 1)},
                   {"length", Value::Int(len)},
                   {"depth", Value::Int(1)},
                   {"depth0", Value::Int(0)},
                   {"previtem", i > 0 ? items[static_cast<size_t>(i - 1)] : Value::Undefined("loop.previtem")},
                   {"nextitem", i + 1 < len ? items[static_cast<size_t>(i + 1)] : Value::Undefined("loop.nextitem")}};
      f["loop"] = Value::MakeDict(std::move(loop));
      LoopSignal s = Exec(n.body);
      frames_.pop_back();
      if (s.kind == LoopSignal::kBreak) break;
    }
  }

  [[noreturn]] void UndefinedUse(const Value& v, const std::string& what) const {
    Fail(absl::StrCat("'", v.undefined_name.empty() ? std::string("value") : v.undefined_name, "' is undefined", what));
  }

  Value GetItem(const Value& base, const Value& key, const std::string& label) {
    if (base.kind == Value::kUndefined) UndefinedUse(base, absl::StrCat(" (reading ", label, ")"));
    if (base.kind == Value::kDict || base.kind == Value::kNamespace) {
      if (key.kind == Value::kString) {
        if (const Value* v = base.Find(key.s)) return *v;
      }
      return Value::Undefined(label);
    }
    if (base.kind == Value::kList || base.kind == Value::kString) {
      if (key.kind != Value::kInt && key.kind != Value::kBool) return Value::Undefined(label);
      const List items = base.kind == Value::kList ? List() : Iterate(base);
      const List& seq = base.kind == Value::kList ? *base.list : items;
      int64_t i = key.kind == Value::kBool ? key.b : key.i;
      const int64_t n = static_cast<int64_t>(seq.size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::Undefined(label);
      return seq[static_cast<size_t>(i)];
    }
    return Value::Undefined(label);
  }

  static std::string Label(const Expr& e) {
    switch (e.kind) {
      case Expr::kName: return e.name;
      case Expr::kAttr: return Label(*e.base) + "." + e.name;
      case Expr::kItem: return Label(*e.base) + "[...]";
      default: return "value";
    }
  }

  Value Slice(const Value& base, const Expr& e) {
    if (base.kind != Value::kList && base.kind != Value::kString) Fail(absl::StrCat("cannot slice a ", KindName(base)));
    const List seq = base.kind == Value::kList ? *base.list : Iterate(base);
    const int64_t n = static_cast<int64_t>(seq.size());
    const auto opt = [&](const ExprPtr& x) -> std::optional<int64_t> {
      if (!x) return std::nullopt;
      Value v = Eval(*x);
      if (v.kind == Value::kNone) return std::nullopt;
      if (v.kind != Value::kInt) Fail("slice indices must be integers");
      return v.i;
    };
    const std::optional<int64_t> start = opt(e.a), stop = opt(e.b), step_opt = opt(e.c);
    const int64_t step = step_opt.value_or(1);
    if (step == 0) Fail("slice step cannot be zero");
    // Python's slice.indices.
    const auto clamp = [&](std::optional<int64_t> x, int64_t def, int64_t lo, int64_t hi) {
      if (!x) return def;
      int64_t v = *x < 0 ? *x + n : *x;
      return std::clamp(v, lo, hi);
    };
    List out;
    if (step > 0) {
      const int64_t a = clamp(start, 0, 0, n), b = clamp(stop, n, 0, n);
      for (int64_t i = a; i < b; i += step) out.push_back(seq[static_cast<size_t>(i)]);
    } else {
      const int64_t a = clamp(start, n - 1, -1, n - 1), b = clamp(stop, -1, -1, n - 1);
      for (int64_t i = a; i > b; i += step) out.push_back(seq[static_cast<size_t>(i)]);
    }
    if (base.kind == Value::kList) return Value::MakeList(std::move(out));
    std::string s;
    for (const Value& c : out) s += c.s;
    return Value::Str(std::move(s));
  }

  struct Args {
    std::vector<Value> pos;
    std::map<std::string, Value> kw;
    const Value* Get(size_t i, const std::string& name) const {
      if (i < pos.size()) return &pos[i];
      auto it = kw.find(name);
      return it == kw.end() ? nullptr : &it->second;
    }
  };
  Args EvalArgs(const std::vector<Arg>& args) {
    Args a;
    for (const Arg& arg : args) {
      if (arg.name.empty()) a.pos.push_back(Eval(*arg.value));
      else a.kw[arg.name] = Eval(*arg.value);
    }
    return a;
  }

  static int64_t ToInt(const Value& v, const std::string& what) {
    if (v.kind == Value::kInt) return v.i;
    if (v.kind == Value::kBool) return v.b;
    Fail(absl::StrCat(what, " must be an integer, not ", KindName(v)));
  }

  static std::string StripChars(const std::string& s, const Value* chars, bool left, bool right) {
    const auto strip_set = [&](unsigned char c) {
      if (chars == nullptr || chars->kind == Value::kNone) return IsSpace(static_cast<char>(c)) || c == 0x1c || c == 0x1d || c == 0x1e || c == 0x1f;
      return chars->s.find(static_cast<char>(c)) != std::string::npos;
    };
    size_t a = 0, b = s.size();
    if (left) {
      while (a < b && strip_set(static_cast<unsigned char>(s[a]))) ++a;
    }
    if (right) {
      while (b > a && strip_set(static_cast<unsigned char>(s[b - 1]))) --b;
    }
    return s.substr(a, b - a);
  }

  static std::string Replace(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
    std::string out;
    size_t pos = 0;
    int64_t done = 0;
    if (from.empty()) {
      // Python inserts `to` around every character.
      for (size_t i = 0; i <= s.size(); ++i) {
        if (count >= 0 && done >= count) {
          out += s.substr(i);
          return out;
        }
        out += to;
        ++done;
        if (i < s.size()) out += s[i];
      }
      return out;
    }
    for (;;) {
      const size_t f = count >= 0 && done >= count ? std::string::npos : s.find(from, pos);
      if (f == std::string::npos) {
        out += s.substr(pos);
        return out;
      }
      out += s.substr(pos, f - pos) + to;
      pos = f + from.size();
      ++done;
    }
  }

  Value CallMethod(const Value& self, const std::string& name, const Args& a) {
    if (self.kind == Value::kString) {
      const std::string& s = self.s;
      const Value* a0 = a.Get(0, "");
      const auto str_arg = [&](size_t i, const std::string& kw) -> std::string {
        const Value* v = a.Get(i, kw);
        if (v == nullptr || v->kind != Value::kString) Fail(absl::StrCat("str.", name, "() needs a string argument"));
        return v->s;
      };
      if (name == "strip") return Value::Str(StripChars(s, a0, true, true));
      if (name == "lstrip") return Value::Str(StripChars(s, a0, true, false));
      if (name == "rstrip") return Value::Str(StripChars(s, a0, false, true));
      if (name == "upper" || name == "lower") {
        std::string r = s;
        for (char& c : r) c = static_cast<char>(name == "upper" ? std::toupper(static_cast<unsigned char>(c)) : std::tolower(static_cast<unsigned char>(c)));
        return Value::Str(r);
      }
      if (name == "startswith" || name == "endswith") {
        std::vector<std::string> options;
        if (a0 != nullptr && a0->kind == Value::kList) {
          for (const Value& v : *a0->list) options.push_back(v.kind == Value::kString ? v.s : "");
        } else {
          options.push_back(str_arg(0, ""));
        }
        for (const std::string& o : options) {
          if (name == "startswith" ? s.compare(0, o.size(), o) == 0 && s.size() >= o.size()
                                   : s.size() >= o.size() && s.compare(s.size() - o.size(), o.size(), o) == 0) {
            return Value::Bool(true);
          }
        }
        return Value::Bool(false);
      }
      if (name == "split" || name == "rsplit") {
        const Value* sep = a.Get(0, "sep");
        const Value* maxv = a.Get(1, "maxsplit");
        const int64_t maxsplit = maxv ? ToInt(*maxv, "maxsplit") : -1;
        List parts;
        if (sep == nullptr || sep->kind == Value::kNone) {
          if (name == "rsplit" && maxsplit >= 0) Fail("str.rsplit() with maxsplit and no separator is not supported");
          size_t i = 0;
          int64_t n = 0;
          while (i < s.size()) {
            while (i < s.size() && IsSpace(s[i])) ++i;
            if (i >= s.size()) break;
            if (maxsplit >= 0 && n >= maxsplit) {
              size_t e = s.size();
              while (e > i && IsSpace(s[e - 1])) --e;
              parts.push_back(Value::Str(s.substr(i, e - i)));
              break;
            }
            size_t j = i;
            while (j < s.size() && !IsSpace(s[j])) ++j;
            parts.push_back(Value::Str(s.substr(i, j - i)));
            ++n;
            i = j;
          }
          return Value::MakeList(std::move(parts));
        }
        if (sep->kind != Value::kString || sep->s.empty()) Fail("str.split(): empty or non-string separator");
        const std::string& d = sep->s;
        if (name == "split") {
          size_t pos = 0;
          int64_t n = 0;
          for (;;) {
            const size_t f = (maxsplit >= 0 && n >= maxsplit) ? std::string::npos : s.find(d, pos);
            if (f == std::string::npos) {
              parts.push_back(Value::Str(s.substr(pos)));
              break;
            }
            parts.push_back(Value::Str(s.substr(pos, f - pos)));
            pos = f + d.size();
            ++n;
          }
        } else {
          size_t end = s.size();
          int64_t n = 0;
          for (;;) {
            const size_t f = (maxsplit >= 0 && n >= maxsplit) || end < d.size() ? std::string::npos : s.rfind(d, end - d.size());
            if (f == std::string::npos) {
              parts.insert(parts.begin(), Value::Str(s.substr(0, end)));
              break;
            }
            parts.insert(parts.begin(), Value::Str(s.substr(f + d.size(), end - f - d.size())));
            end = f;
            ++n;
          }
        }
        return Value::MakeList(std::move(parts));
      }
      if (name == "replace") {
        const Value* c = a.Get(2, "count");
        return Value::Str(Replace(s, str_arg(0, "old"), str_arg(1, "new"), c ? ToInt(*c, "count") : -1));
      }
      if (name == "find" || name == "count") {
        const std::string sub = str_arg(0, "sub");
        if (name == "find") {
          const size_t f = s.find(sub);
          return Value::Int(f == std::string::npos ? -1 : static_cast<int64_t>(f));
        }
        int64_t n = 0;
        if (sub.empty()) return Value::Int(static_cast<int64_t>(Iterate(self).size()) + 1);
        for (size_t f = s.find(sub); f != std::string::npos; f = s.find(sub, f + sub.size())) ++n;
        return Value::Int(n);
      }
      if (name == "title" || name == "capitalize") return Value::Str(CaseWords(s, name == "title"));
      if (name == "join") {
        if (a0 == nullptr) Fail("str.join() needs an argument");
        std::string out;
        bool first = true;
        for (const Value& v : Iterate(*a0)) {
          if (v.kind != Value::kString) Fail("str.join(): items must be strings");
          out += (first ? "" : s) + v.s;
          first = false;
        }
        return Value::Str(out);
      }
      if (name == "isdigit" || name == "isspace" || name == "isalpha") {
        if (s.empty()) return Value::Bool(false);
        for (unsigned char c : s) {
          const bool ok = name == "isdigit" ? std::isdigit(c) != 0 : name == "isspace" ? IsSpace(static_cast<char>(c)) : std::isalpha(c) != 0;
          if (!ok) return Value::Bool(false);
        }
        return Value::Bool(true);
      }
    } else if (self.kind == Value::kDict) {
      if (name == "items") {
        List out;
        for (const auto& [k, v] : *self.dict) out.push_back(Value::MakeList({Value::Str(k), v}));
        return Value::MakeList(std::move(out));
      }
      if (name == "keys" || name == "values") {
        List out;
        for (const auto& [k, v] : *self.dict) out.push_back(name == "keys" ? Value::Str(k) : v);
        return Value::MakeList(std::move(out));
      }
      if (name == "get") {
        const Value* key = a.Get(0, "key");
        if (key == nullptr) Fail("dict.get() needs a key");
        if (key->kind == Value::kString) {
          if (const Value* v = self.Find(key->s)) return *v;
        }
        const Value* def = a.Get(1, "default");
        return def ? *def : Value::None();
      }
    } else if (self.kind == Value::kUndefined) {
      UndefinedUse(self, absl::StrCat(" (calling .", name, "())"));
    }
    Fail(absl::StrCat("the method ", KindName(self), ".", name, "() is not supported"));
  }

  static std::string CaseWords(const std::string& s, bool title) {
    std::string r = s;
    bool start = true;
    for (size_t i = 0; i < r.size(); ++i) {
      const unsigned char c = static_cast<unsigned char>(r[i]);
      if (title) {
        if (std::isalpha(c)) {
          r[i] = static_cast<char>(start ? std::toupper(c) : std::tolower(c));
          start = false;
        } else {
          start = c < 0x80;  // a letter after a non-letter starts a word (ASCII only)
        }
      } else {
        r[i] = static_cast<char>(i == 0 ? std::toupper(c) : std::tolower(c));
      }
    }
    return r;
  }

  Value CallGlobal(const std::string& name, const Args& a) {
    if (name == "raise_exception") {
      const Value* m = a.Get(0, "message");
      Fail(absl::StrCat("the template raised: ", m ? ToStr(*m) : std::string()));
    }
    if (name == "namespace" || name == "dict") {
      Dict items;
      if (!a.pos.empty()) {
        if (a.pos.size() != 1 || a.pos[0].kind != Value::kDict) Fail(name + "() takes keyword arguments or one dict");
        items = *a.pos[0].dict;
      }
      for (const auto& [k, v] : a.kw) items.emplace_back(k, v);
      return Value::MakeDict(std::move(items), name == "namespace" ? Value::kNamespace : Value::kDict);
    }
    if (name == "range") {
      int64_t start = 0, stop = 0, step = 1;
      if (a.pos.size() == 1) stop = ToInt(a.pos[0], "range()");
      else if (a.pos.size() >= 2) start = ToInt(a.pos[0], "range()"), stop = ToInt(a.pos[1], "range()");
      if (a.pos.size() == 3) step = ToInt(a.pos[2], "range()");
      if (a.pos.empty() || a.pos.size() > 3) Fail("range() takes 1 to 3 integers");
      if (step == 0) Fail("range() step must not be zero");
      List out;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        Tick();
        out.push_back(Value::Int(i));
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "strftime_now") {
      const Value* f = a.Get(0, "format");
      if (f == nullptr || f->kind != Value::kString) Fail("strftime_now() needs a format string");
      std::tm tm{};
      gmtime_r(&now_, &tm);
      char buf[256];
      const size_t n = f->s.size() < 128 ? std::strftime(buf, sizeof(buf), f->s.c_str(), &tm) : 0;
      if (n == 0 && !f->s.empty()) Fail("strftime_now(): format too long or empty result");
      return Value::Str(std::string(buf, n));
    }
    Fail(absl::StrCat("the function '", name, "' is not supported"));
  }

  bool RunTest(const std::string& name, const Value& v, const Args& a) {
    const Value* arg = a.Get(0, "");
    const auto need = [&]() -> const Value& {
      if (arg == nullptr) Fail(absl::StrCat("the test '", name, "' needs an argument"));
      return *arg;
    };
    if (name == "defined") return v.defined();
    if (name == "undefined") return !v.defined();
    if (name == "none") return v.kind == Value::kNone;
    if (name == "string") return v.kind == Value::kString;
    if (name == "number") return v.kind == Value::kInt || v.kind == Value::kFloat || v.kind == Value::kBool;
    if (name == "integer") return v.kind == Value::kInt;
    if (name == "float") return v.kind == Value::kFloat;
    if (name == "boolean") return v.kind == Value::kBool;
    if (name == "true") return v.kind == Value::kBool && v.b;
    if (name == "false") return v.kind == Value::kBool && !v.b;
    if (name == "mapping") return v.kind == Value::kDict;
    if (name == "iterable") return v.kind == Value::kList || v.kind == Value::kDict || v.kind == Value::kString;
    if (name == "sequence") return v.kind == Value::kList || v.kind == Value::kDict || v.kind == Value::kString;
    if (name == "callable") return v.kind == Value::kCallable;
    if (name == "equalto" || name == "eq" || name == "==") return Equal(v, need());
    if (name == "ne" || name == "!=") return !Equal(v, need());
    if (name == "sameas") return Equal(v, need()) && v.kind == need().kind;
    if (name == "lt" || name == "<") return Less(v, need());
    if (name == "gt" || name == ">") return Less(need(), v);
    if (name == "le" || name == "<=") return !Less(need(), v);
    if (name == "ge" || name == ">=") return !Less(v, need());
    if (name == "odd" || name == "even" || name == "divisibleby") {
      const int64_t x = ToInt(v, "the test's value");
      if (name == "odd") return x % 2 != 0;
      if (name == "even") return x % 2 == 0;
      const int64_t d = ToInt(need(), "divisibleby");
      if (d == 0) Fail("divisibleby 0");
      return x % d == 0;
    }
    if (name == "in") return Contains(need(), v);
    if (name == "lower" || name == "upper") {
      if (v.kind != Value::kString) return false;
      for (unsigned char c : v.s) {
        if (name == "lower" ? std::isupper(c) : std::islower(c)) return false;
      }
      return true;
    }
    Fail(absl::StrCat("the test '", name, "' is not supported"));
  }

  bool Less(const Value& a, const Value& b) {
    if (a.numeric() && b.numeric()) return a.num() < b.num();
    if (a.kind == Value::kString && b.kind == Value::kString) return a.s < b.s;
    Fail(absl::StrCat("'<' not supported between ", KindName(a), " and ", KindName(b)));
  }

  bool Contains(const Value& container, const Value& item) {
    switch (container.kind) {
      case Value::kString:
        if (item.kind != Value::kString) Fail("'in <string>' requires a string on the left");
        return container.s.find(item.s) != std::string::npos;
      case Value::kList:
        for (const Value& v : *container.list) {
          if (Equal(v, item)) return true;
        }
        return false;
      case Value::kDict:
      case Value::kNamespace: return item.kind == Value::kString && container.Find(item.s) != nullptr;
      case Value::kUndefined: UndefinedUse(container, " (an 'in' test)");
      default: Fail(absl::StrCat("argument of type '", KindName(container), "' is not iterable"));
    }
  }

  Value Attribute(const Value& v, const std::string& attr) {
    if (v.kind == Value::kUndefined) UndefinedUse(v, absl::StrCat(" (reading .", attr, ")"));
    if (v.kind == Value::kDict || v.kind == Value::kNamespace) {
      if (const Value* f = v.Find(attr)) return *f;
    }
    return Value::Undefined(attr);
  }

  Value Filter(const std::string& name, const Value& v, const Args& a) {
    const Value* a0 = a.Get(0, "");
    if (name == "trim") {
      if (v.kind == Value::kUndefined) return Value::Str("");
      const Value* chars = a.Get(0, "chars");
      return Value::Str(StripChars(ToStr(v), chars, true, true));
    }
    if (name == "length" || name == "count") {
      if (v.kind == Value::kString) return Value::Int(static_cast<int64_t>(Iterate(v).size()));
      if (v.kind == Value::kList) return Value::Int(static_cast<int64_t>(v.list->size()));
      if (v.kind == Value::kDict || v.kind == Value::kNamespace) return Value::Int(static_cast<int64_t>(v.dict->size()));
      if (v.kind == Value::kUndefined) return Value::Int(0);
      Fail(absl::StrCat("object of type '", KindName(v), "' has no len()"));
    }
    if (name == "tojson") {
      const Value* indent = a.Get(0, "indent");
      for (const auto& [k, _] : a.kw) {
        if (k != "indent") Fail(absl::StrCat("tojson(", k, "=...) is not supported"));
      }
      std::string out;
      ToJson(v, indent && indent->kind != Value::kNone ? static_cast<int>(std::clamp<int64_t>(ToInt(*indent, "indent"), 0, 64)) : -1, 0, &out);
      return Value::Str(std::move(out));
    }
    if (name == "upper" || name == "lower" || name == "capitalize" || name == "title") {
      const std::string s = ToStr(v);
      if (name == "capitalize" || name == "title") return Value::Str(CaseWords(s, name == "title"));
      return CallMethod(Value::Str(s), name, {});
    }
    if (name == "default" || name == "d") {
      const Value* boolean = a.Get(1, "boolean");
      const bool use = boolean && Truthy(*boolean) ? !Truthy(v) : !v.defined();
      return use ? (a0 ? *a0 : Value::Str("")) : v;
    }
    if (name == "first" || name == "last") {
      List items = Iterate(v);
      if (items.empty()) return Value::Undefined(name);
      return name == "first" ? items.front() : items.back();
    }
    if (name == "join") {
      const std::string sep = a0 ? ToStr(*a0) : "";
      const Value* attr = a.Get(1, "attribute");
      std::string out;
      bool first = true;
      for (const Value& item : Iterate(v)) {
        out += (first ? "" : sep) + ToStr(attr ? GetItem(item, *attr, "attribute") : item);
        first = false;
      }
      return Value::Str(out);
    }
    if (name == "replace") {
      if (a.pos.size() < 2) Fail("replace needs two arguments");
      const Value* c = a.Get(2, "count");
      return Value::Str(Replace(ToStr(v), ToStr(a.pos[0]), ToStr(a.pos[1]), c ? ToInt(*c, "count") : -1));
    }
    if (name == "string" || name == "safe" || name == "e" || name == "escape") {
      if (name == "e" || name == "escape") Fail("the filter 'escape' is not supported");
      return Value::Str(ToStr(v));
    }
    if (name == "int") {
      if (v.kind == Value::kInt) return v;
      if (v.kind == Value::kBool) return Value::Int(v.b);
      if (v.kind == Value::kFloat) return Value::Int(static_cast<int64_t>(std::trunc(std::clamp(v.f, -9e18, 9e18))));
      if (v.kind == Value::kString) {
        char* end = nullptr;
        const std::string t = StripChars(v.s, nullptr, true, true);
        errno = 0;
        const long long x = std::strtoll(t.c_str(), &end, 10);
        if (!t.empty() && end == t.c_str() + t.size() && errno == 0) return Value::Int(x);
      }
      return a0 ? *a0 : Value::Int(0);
    }
    if (name == "float") {
      if (v.numeric()) return Value::Float(v.num());
      return a0 ? *a0 : Value::Float(0.0);
    }
    if (name == "abs") {
      if (v.kind == Value::kInt) return Value::Int(v.i == INT64_MIN ? INT64_MAX : std::abs(v.i));
      if (v.kind == Value::kFloat) return Value::Float(std::fabs(v.f));
      Fail(absl::StrCat("bad operand type for abs(): ", KindName(v)));
    }
    if (name == "list") return Value::MakeList(Iterate(v));
    if (name == "reverse") {
      if (v.kind == Value::kString) {
        List chars = Iterate(v);
        std::string s;
        for (auto it = chars.rbegin(); it != chars.rend(); ++it) s += it->s;
        return Value::Str(s);
      }
      List items = Iterate(v);
      std::reverse(items.begin(), items.end());
      return Value::MakeList(std::move(items));
    }
    if (name == "items" || name == "dictsort") {
      if (v.kind == Value::kUndefined) return Value::MakeList();
      if (v.kind != Value::kDict) Fail(absl::StrCat("the filter '", name, "' needs a mapping, not ", KindName(v)));
      List out;
      for (const auto& [k, x] : *v.dict) out.push_back(Value::MakeList({Value::Str(k), x}));
      if (name == "dictsort") {
        if (!a.pos.empty() || !a.kw.empty()) Fail("dictsort with arguments is not supported");
        std::stable_sort(out.begin(), out.end(), [](const Value& x, const Value& y) {
          std::string kx = (*x.list)[0].s, ky = (*y.list)[0].s;
          for (char& c : kx) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
          for (char& c : ky) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
          return kx < ky;
        });
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "unique") {
      List out;
      for (const Value& x : Iterate(v)) {
        bool seen = false;
        for (const Value& y : out) seen = seen || Equal(x, y);
        if (!seen) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "sum" || name == "min" || name == "max") {
      List items = Iterate(v);
      if (name == "sum") {
        Value total = Value::Int(0);
        for (const Value& x : items) total = Arith("+", total, x);
        return total;
      }
      if (items.empty()) return Value::Undefined(name);
      Value best = items[0];
      for (const Value& x : items) {
        if (name == "min" ? Less(x, best) : Less(best, x)) best = x;
      }
      return best;
    }
    if (name == "wordcount") return Value::Int(static_cast<int64_t>(CallMethod(Value::Str(ToStr(v)), "split", {}).list->size()));
    if (name == "indent") {
      const Value* w = a.Get(0, "width");
      const Value* first = a.Get(1, "first");
      const Value* blank = a.Get(2, "blank");
      const std::string pad = w && w->kind == Value::kString ? w->s : std::string(static_cast<size_t>(std::clamp<int64_t>(w ? ToInt(*w, "width") : 4, 0, 256)), ' ');
      const std::string s = ToStr(v);
      std::string out;
      size_t pos = 0;
      bool line0 = true;
      for (;;) {
        const size_t nl = s.find('\n', pos);
        const std::string line = s.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
        const bool add = line0 ? (first && Truthy(*first)) : (!line.empty() || (blank && Truthy(*blank)));
        out += (add ? pad : "") + line;
        if (nl == std::string::npos) break;
        out += '\n';
        pos = nl + 1;
        line0 = false;
      }
      return Value::Str(out);
    }
    if (name == "select" || name == "reject") {
      List out;
      const std::string test = a0 ? ToStr(*a0) : "";
      if (a0 && !KnownTests().count(test)) Fail(absl::StrCat("the test '", test, "' is not supported"));
      Args rest;
      rest.pos.assign(a.pos.size() > 1 ? a.pos.begin() + 1 : a.pos.end(), a.pos.end());
      for (const Value& x : Iterate(v)) {
        const bool ok = a0 ? RunTest(test, x, rest) : Truthy(x);
        if (ok == (name == "select")) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "selectattr" || name == "rejectattr") {
      if (a0 == nullptr || a0->kind != Value::kString) Fail(absl::StrCat(name, " needs an attribute name"));
      List out;
      const Value* t = a.Get(1, "");
      const std::string test = t ? ToStr(*t) : "";
      if (t && !KnownTests().count(test)) Fail(absl::StrCat("the test '", test, "' is not supported"));
      Args rest;
      rest.pos.assign(a.pos.size() > 2 ? a.pos.begin() + 2 : a.pos.end(), a.pos.end());
      for (const Value& x : Iterate(v)) {
        const Value field = Attribute(x, a0->s);
        const bool ok = t ? RunTest(test, field, rest) : Truthy(field);
        if (ok == (name == "selectattr")) out.push_back(x);
      }
      return Value::MakeList(std::move(out));
    }
    if (name == "map") {
      List out;
      const Value* attr = a.Get(99, "attribute");
      if (attr) {
        const Value* def = a.Get(99, "default");
        for (const Value& x : Iterate(v)) {
          Value f = attr->kind == Value::kString ? Attribute(x, attr->s) : GetItem(x, *attr, "attribute");
          out.push_back(!f.defined() && def ? *def : f);
        }
        return Value::MakeList(std::move(out));
      }
      if (a0 == nullptr || a0->kind != Value::kString) Fail("map needs a filter name or attribute=");
      if (!KnownFilters().count(a0->s)) Fail(absl::StrCat("the filter '", a0->s, "' is not supported"));
      Args rest;
      rest.pos.assign(a.pos.begin() + 1, a.pos.end());
      for (const Value& x : Iterate(v)) out.push_back(Filter(a0->s, x, rest));
      return Value::MakeList(std::move(out));
    }
    if (name == "batch") Fail("the filter 'batch' is not supported");
    Fail(absl::StrCat("the filter '", name, "' is not supported"));
  }

  Value Arith(const std::string& op, const Value& x, const Value& y) {
    if (op == "~") return Value::Str(ToStr(x) + ToStr(y));
    if (x.kind == Value::kUndefined) UndefinedUse(x, absl::StrCat(" (an operand of ", op, ")"));
    if (y.kind == Value::kUndefined) UndefinedUse(y, absl::StrCat(" (an operand of ", op, ")"));
    if (op == "+") {
      if (x.kind == Value::kString && y.kind == Value::kString) {
        if (x.s.size() + y.s.size() > limits_.max_output_bytes) Fail("string too long");
        return Value::Str(x.s + y.s);
      }
      if (x.kind == Value::kList && y.kind == Value::kList) {
        List items = *x.list;
        items.insert(items.end(), y.list->begin(), y.list->end());
        return Value::MakeList(std::move(items));
      }
    }
    if (op == "*" && ((x.kind == Value::kString && (y.kind == Value::kInt || y.kind == Value::kBool)) ||
                      (y.kind == Value::kString && (x.kind == Value::kInt || x.kind == Value::kBool)))) {
      const Value& s = x.kind == Value::kString ? x : y;
      const int64_t n = ToInt(x.kind == Value::kString ? y : x, "repeat");
      if (n <= 0) return Value::Str("");
      if (s.s.size() * static_cast<uint64_t>(n) > limits_.max_output_bytes) Fail("string too long");
      std::string out;
      for (int64_t k = 0; k < n; ++k) out += s.s;
      return Value::Str(out);
    }
    if (!x.numeric() || !y.numeric()) {
      Fail(absl::StrCat("unsupported operand types for ", op, ": '", KindName(x), "' and '", KindName(y), "'"));
    }
    const bool ints = x.kind != Value::kFloat && y.kind != Value::kFloat;
    const int64_t xi = x.kind == Value::kBool ? x.b : x.i, yi = y.kind == Value::kBool ? y.b : y.i;
    if (op == "/") {
      if (y.num() == 0) Fail("division by zero");
      return Value::Float(x.num() / y.num());
    }
    if (ints) {
      int64_t r = 0;
      if (op == "+" && !__builtin_add_overflow(xi, yi, &r)) return Value::Int(r);
      if (op == "-" && !__builtin_sub_overflow(xi, yi, &r)) return Value::Int(r);
      if (op == "*" && !__builtin_mul_overflow(xi, yi, &r)) return Value::Int(r);
      if (op == "//" || op == "%") {
        if (yi == 0) Fail("integer division or modulo by zero");
        if (xi == INT64_MIN && yi == -1) Fail("integer overflow");
        int64_t q = xi / yi, m = xi % yi;
        if (m != 0 && ((m < 0) != (yi < 0))) --q, m += yi;  // Python floors
        return Value::Int(op == "//" ? q : m);
      }
      if (op == "**") {
        if (yi < 0) return Value::Float(std::pow(static_cast<double>(xi), static_cast<double>(yi)));
        int64_t acc = 1;
        for (int64_t k = 0; k < yi; ++k) {
          if (__builtin_mul_overflow(acc, xi, &acc)) Fail("integer overflow");
          if (acc == 0 || acc == 1) break;
        }
        return Value::Int(acc);
      }
      if (op == "+" || op == "-" || op == "*") Fail("integer overflow");
    }
    const double a = x.num(), b = y.num();
    if (op == "+") return Value::Float(a + b);
    if (op == "-") return Value::Float(a - b);
    if (op == "*") return Value::Float(a * b);
    if (op == "//" || op == "%") {
      if (b == 0) Fail("float division or modulo by zero");
      const double q = std::floor(a / b);
      return Value::Float(op == "//" ? q : a - q * b);
    }
    if (op == "**") return Value::Float(std::pow(a, b));
    Fail("unknown operator " + op);
  }

  Value Eval(const Expr& e) {
    if (++eval_depth_ > 400) Fail("expression evaluated too deeply");
    struct Guard {
      int* d;
      ~Guard() { --*d; }
    } guard{&eval_depth_};
    switch (e.kind) {
      case Expr::kLiteral: return e.literal;
      case Expr::kName: return Lookup(e.name);
      case Expr::kAttr: return Attribute(Eval(*e.base), e.name);
      case Expr::kItem: {
        Value base = Eval(*e.base);
        Value key = Eval(*e.a);
        return GetItem(base, key, Label(e.base ? *e.base : e) + "[" + (key.kind == Value::kString ? PyStrRepr(key.s) : ToStr(key)) + "]");
      }
      case Expr::kSlice: return Slice(Eval(*e.base), e);
      case Expr::kCall: {
        Args args = EvalArgs(e.args);
        if (e.base->kind == Expr::kName) return CallGlobal(e.base->name, args);
        if (e.base->kind == Expr::kAttr) return CallMethod(Eval(*e.base->base), e.base->name, args);
        Fail("only functions and methods can be called");
      }
      case Expr::kFilter: {
        Value v = Eval(*e.base);
        return Filter(e.name, v, EvalArgs(e.args));
      }
      case Expr::kTest: {
        Value v = Eval(*e.base);
        const bool r = RunTest(e.name, v, EvalArgs(e.args));
        return Value::Bool(e.negated ? !r : r);
      }
      case Expr::kNeg:
      case Expr::kPos: {
        Value v = Eval(*e.a);
        if (!v.numeric()) Fail(absl::StrCat("bad operand type for unary ", e.kind == Expr::kNeg ? "-" : "+", ": '", KindName(v), "'"));
        if (e.kind == Expr::kPos) return v.kind == Value::kBool ? Value::Int(v.b) : v;
        if (v.kind == Value::kFloat) return Value::Float(-v.f);
        const int64_t x = v.kind == Value::kBool ? v.b : v.i;
        if (x == INT64_MIN) Fail("integer overflow");
        return Value::Int(-x);
      }
      case Expr::kNot: return Value::Bool(!Truthy(Eval(*e.a)));
      case Expr::kAnd: {
        Value a = Eval(*e.a);
        return Truthy(a) ? Eval(*e.b) : a;
      }
      case Expr::kOr: {
        Value a = Eval(*e.a);
        return Truthy(a) ? a : Eval(*e.b);
      }
      case Expr::kBinary: return Arith(e.name, Eval(*e.a), Eval(*e.b));
      case Expr::kCompare: {
        Value left = Eval(*e.items[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = Eval(*e.items[i + 1]);
          const std::string& op = e.ops[i];
          bool r;
          if (op == "==") r = Equal(left, right);
          else if (op == "!=") r = !Equal(left, right);
          else if (op == "<") r = Less(left, right);
          else if (op == ">") r = Less(right, left);
          else if (op == "<=") r = !Less(right, left);
          else if (op == ">=") r = !Less(left, right);
          else if (op == "in") r = Contains(right, left);
          else r = !Contains(right, left);
          if (!r) return Value::Bool(false);
          left = std::move(right);
        }
        return Value::Bool(true);
      }
      case Expr::kCond:
        if (Truthy(Eval(*e.a))) return Eval(*e.b);
        return e.c ? Eval(*e.c) : Value::Undefined("the else branch");
      case Expr::kList:
      case Expr::kTuple: {
        List items;
        for (const auto& x : e.items) items.push_back(Eval(*x));
        return Value::MakeList(std::move(items));
      }
      case Expr::kDict: {
        Dict items;
        for (size_t i = 0; i + 1 < e.items.size(); i += 2) {
          Value k = Eval(*e.items[i]);
          if (k.kind != Value::kString) Fail("dict literal keys must be strings");
          Value v = Eval(*e.items[i + 1]);
          bool replaced = false;
          for (auto& [key, old] : items) {
            if (key == k.s) old = v, replaced = true;
          }
          if (!replaced) items.emplace_back(k.s, std::move(v));
        }
        return Value::MakeDict(std::move(items));
      }
    }
    Fail("bad expression");
  }

  const ChatTemplateLimits& limits_;
  std::time_t now_;
  std::vector<Frame> frames_;
  std::string out_;
  int64_t iterations_ = 0;
  int eval_depth_ = 0;
  int line_ = 0;
};

}  // namespace

struct ChatTemplate::Impl {
  Body body;
};

ChatTemplate::ChatTemplate(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<ChatTemplate> ChatTemplate::Parse(std::string_view source) {
  if (source.size() > (size_t{4} << 20)) return absl::InvalidArgumentError("chat template: longer than 4 MiB");
  // Jinja reads newlines as "\n" and drops one at the very end (keep_trailing_newline=False).
  std::string src;
  src.reserve(source.size());
  for (size_t i = 0; i < source.size(); ++i) {
    if (source[i] == '\r') {
      src += '\n';
      if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
    } else {
      src += source[i];
    }
  }
  if (!src.empty() && src.back() == '\n') src.pop_back();
  try {
    auto impl = std::make_unique<Impl>();
    impl->body = Parser(Lexer(src).Run()).Run();
    return ChatTemplate(std::move(impl));
  } catch (const TemplateError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.message));
  }
}

absl::StatusOr<std::string> ChatTemplate::Render(const ojson& context, std::time_t now, const ChatTemplateLimits& limits) const {
  if (!context.is_object()) return absl::InvalidArgumentError("chat template: the context must be a JSON object");
  if (JsonDepth(context.dump()) > 64) return absl::InvalidArgumentError("chat template: context nested deeper than 64 levels");
  try {
    return Renderer(limits, now).Run(impl_->body, context);
  } catch (const TemplateError& e) {
    return absl::InvalidArgumentError(absl::StrCat("chat template: ", e.message));
  }
}

namespace {

// A special token in tokenizer_config.json: a string, or {"content": "..."} (an AddedToken).
std::string TokenText(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

}  // namespace

absl::StatusOr<std::optional<ChatFormat>> LoadChatFormat(const std::string& model_path) {
  ChatFormat f;
  if (IsGgufFile(model_path)) {
    FERRY_ASSIGN_OR_RETURN(std::unique_ptr<io::GgufFile> file, io::GgufFile::Open(model_path));
    if (file->Find("tokenizer.chat_template") == nullptr) return std::optional<ChatFormat>();
    FERRY_ASSIGN_OR_RETURN(f.chat_template, file->String("tokenizer.chat_template"));
    const auto token = [&](const char* key) -> absl::StatusOr<std::string> {
      if (file->Find(key) == nullptr || file->Find("tokenizer.ggml.tokens") == nullptr) return std::string();
      FERRY_ASSIGN_OR_RETURN(const uint64_t id, file->Uint(key));
      FERRY_ASSIGN_OR_RETURN(const std::vector<std::string>* tokens, file->Strings("tokenizer.ggml.tokens"));
      if (id >= tokens->size()) {
        return absl::DataLossError(absl::StrCat(model_path, ": ", key, " ", id, " is outside the vocabulary"));
      }
      return (*tokens)[static_cast<size_t>(id)];
    };
    FERRY_ASSIGN_OR_RETURN(f.bos_token, token("tokenizer.ggml.bos_token_id"));
    FERRY_ASSIGN_OR_RETURN(f.eos_token, token("tokenizer.ggml.eos_token_id"));
    return std::optional<ChatFormat>(std::move(f));
  }
  const std::string config_path = model_path + "/tokenizer_config.json";
  json config = json::object();
  if (PathExists(config_path)) {
    FERRY_ASSIGN_OR_RETURN(const std::string text, ReadFileToString(config_path));
    if (JsonDepth(text) > 64) return absl::DataLossError(absl::StrCat(config_path, ": nested deeper than 64 levels"));
    config = json::parse(text, nullptr, false);
    if (config.is_discarded() || !config.is_object()) return absl::DataLossError(absl::StrCat(config_path, ": not a JSON object"));
  }
  if (config.contains("bos_token")) f.bos_token = TokenText(config["bos_token"]);
  if (config.contains("eos_token")) f.eos_token = TokenText(config["eos_token"]);
  if (config.contains("chat_template")) {
    const json& t = config["chat_template"];
    if (t.is_string()) {
      f.chat_template = t.get<std::string>();
    } else if (t.is_array()) {
      for (const json& e : t) {
        if (e.is_object() && e.value("name", json()) == "default" && e.contains("template") && e["template"].is_string()) {
          f.chat_template = e["template"].get<std::string>();
        }
      }
      if (f.chat_template.empty()) return absl::DataLossError(absl::StrCat(config_path, ": chat_template list has no \"default\" template"));
    } else if (!t.is_null()) {
      return absl::DataLossError(absl::StrCat(config_path, ": chat_template is neither a string nor a list"));
    }
  }
  if (f.chat_template.empty() && PathExists(model_path + "/chat_template.jinja")) {
    FERRY_ASSIGN_OR_RETURN(f.chat_template, ReadFileToString(model_path + "/chat_template.jinja"));
  }
  if (f.chat_template.empty()) return std::optional<ChatFormat>();
  return std::optional<ChatFormat>(std::move(f));
}

ojson ChatContext(const ojson& messages, const ChatFormat& format, bool add_generation_prompt) {
  return {{"messages", messages},
          {"tools", nullptr},
          {"documents", nullptr},
          {"add_generation_prompt", add_generation_prompt},
          {"bos_token", format.bos_token},
          {"eos_token", format.eos_token}};
}

}  // namespace ferry::engine
