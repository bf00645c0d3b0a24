// The chat-template renderer: statements, expressions, scopes and limits.
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

std::string Renderer::Run(const Body& body, const ojson& context) {
  frames_.emplace_back();
  for (auto it = context.begin(); it != context.end(); ++it) frames_.back()[it.key()] = FromJson(it.value());
  frames_.emplace_back();  // the template's own top-level sets
  if (Exec(body).kind != LoopSignal::kNone) Fail("break or continue outside a loop");
  return std::move(out_);
}

void Renderer::Emit(const std::string& s) {
  if (out_.size() + s.size() > limits_.max_output_bytes) Fail(absl::StrCat("output exceeds ", limits_.max_output_bytes, " bytes"));
  out_ += s;
}

void Renderer::Tick() {
  if (++iterations_ > limits_.max_loop_iterations) Fail(absl::StrCat("more than ", limits_.max_loop_iterations, " loop iterations"));
}

Value Renderer::Lookup(const std::string& name) const {
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

LoopSignal Renderer::Exec(const Body& body) {
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
List Renderer::Iterate(const Value& v) {
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

void Renderer::Bind(Frame& frame, const std::vector<std::string>& targets, const Value& item) {
  if (targets.size() == 1) {
    frame[targets[0]] = item;
    return;
  }
  if (item.kind != Value::kList && item.kind != Value::kString) Fail(absl::StrCat("cannot unpack a ", KindName(item)));
  List parts = Iterate(item);
  if (parts.size() != targets.size()) Fail(absl::StrCat("cannot unpack ", parts.size(), " values into ", targets.size()));
  for (size_t i = 0; i < targets.size(); ++i) frame[targets[i]] = parts[i];
}

void Renderer::ExecFor(const Node& n) {
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

[[noreturn]] void Renderer::UndefinedUse(const Value& v, const std::string& what) const {
  Fail(absl::StrCat("'", v.undefined_name.empty() ? std::string("value") : v.undefined_name, "' is undefined", what));
}

Value Renderer::GetItem(const Value& base, const Value& key, const std::string& label) {
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

std::string Renderer::Label(const Expr& e) {
  switch (e.kind) {
    case Expr::kName: return e.name;
    case Expr::kAttr: return Label(*e.base) + "." + e.name;
    case Expr::kItem: return Label(*e.base) + "[...]";
    default: return "value";
  }
}

Value Renderer::Slice(const Value& base, const Expr& e) {
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

Renderer::Args Renderer::EvalArgs(const std::vector<Arg>& args) {
  Args a;
  for (const Arg& arg : args) {
    if (arg.name.empty()) a.pos.push_back(Eval(*arg.value));
    else a.kw[arg.name] = Eval(*arg.value);
  }
  return a;
}

bool Renderer::Less(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) return a.num() < b.num();
  if (a.kind == Value::kString && b.kind == Value::kString) return a.s < b.s;
  Fail(absl::StrCat("'<' not supported between ", KindName(a), " and ", KindName(b)));
}

bool Renderer::Contains(const Value& container, const Value& item) {
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

Value Renderer::Attribute(const Value& v, const std::string& attr) {
  if (v.kind == Value::kUndefined) UndefinedUse(v, absl::StrCat(" (reading .", attr, ")"));
  if (v.kind == Value::kDict || v.kind == Value::kNamespace) {
    if (const Value* f = v.Find(attr)) return *f;
  }
  return Value::Undefined(attr);
}

Value Renderer::Arith(const std::string& op, const Value& x, const Value& y) {
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

Value Renderer::Eval(const Expr& e) {
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

}  // namespace ferry::engine::jinja
