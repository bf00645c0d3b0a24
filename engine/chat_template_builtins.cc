// The chat-template builtins: filters, tests, str/dict/list methods and global functions, as Jinja and Python define them.
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

int64_t Renderer::ToInt(const Value& v, const std::string& what) {
  if (v.kind == Value::kInt) return v.i;
  if (v.kind == Value::kBool) return v.b;
  Fail(absl::StrCat(what, " must be an integer, not ", KindName(v)));
}

std::string Renderer::StripChars(const std::string& s, const Value* chars, bool left, bool right) {
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

std::string Renderer::Replace(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
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

Value Renderer::CallMethod(const Value& self, const std::string& name, const Args& a) {
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

std::string Renderer::CaseWords(const std::string& s, bool title) {
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

Value Renderer::CallGlobal(const std::string& name, const Args& a) {
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

bool Renderer::RunTest(const std::string& name, const Value& v, const Args& a) {
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

Value Renderer::Filter(const std::string& name, const Value& v, const Args& a) {
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

}  // namespace ferry::engine::jinja
