// The Jinja interpreter behind engine/chat_template.h, in parts: values (chat_template_value.cc),
// the lexer (chat_template_lexer.cc), the parser (chat_template_parser.cc), the renderer's core
// (chat_template_render.cc) and its filters, tests, methods and global functions
// (chat_template_builtins.cc). Internal to the engine: nothing outside these files includes it.
#pragma once

#include <cstdint>
#include <ctime>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/chat_template.h"
#include "nlohmann/json.hpp"

namespace ferry::engine::jinja {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

// Errors inside the parser and the interpreter unwind as this exception, caught at the public
// functions and returned as a Status (it never leaves these files).
struct TemplateError {
  std::string message;
};
[[noreturn]] inline void Fail(std::string message) { throw TemplateError{std::move(message)}; }

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

const char* KindName(const Value& v);
Value FromJson(const ojson& j);
bool Truthy(const Value& v);
std::string FloatRepr(double x);
std::string PyStrRepr(const std::string& s);
std::string ToStr(const Value& v);
std::string Repr(const Value& v);
void JsonString(const std::string& s, std::string* out);
void ToJson(const Value& v, int indent, int depth, std::string* out);
bool Equal(const Value& a, const Value& b);

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

// Python's str.isspace for one byte (the ASCII whitespace).
inline bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }

// The template's text cut into pieces (text, {{ }}, {% %}), tokenized, with whitespace control.
std::vector<Piece> Lex(std::string_view src);

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

const std::set<std::string>& KnownFilters();
const std::set<std::string>& KnownTests();
const std::set<std::string>& KnownFunctions();

// The syntax tree of the pieces; unknown filters, tests, functions and unsupported blocks fail here.
Body ParseTemplate(std::vector<Piece> pieces);

// ---------------------------------------------------------------------------------------------
// Interpreter.

struct LoopSignal {
  enum Kind { kNone, kBreak, kContinue } kind = kNone;
};

// Runs a parsed template over a context: one per render (it holds the scopes and the output).
class Renderer {
 public:
  Renderer(const ChatTemplateLimits& limits, std::time_t now) : limits_(limits), now_(now) {}

  std::string Run(const Body& body, const ojson& context);

 private:
  using Frame = std::map<std::string, Value>;

  void Emit(const std::string& s);
  void Tick();

  Value Lookup(const std::string& name) const;

  LoopSignal Exec(const Body& body);

  // The items a for loop (or a filter) walks: a list's items, a dict's keys, a string's characters.
  static List Iterate(const Value& v);

  void Bind(Frame& frame, const std::vector<std::string>& targets, const Value& item);

  void ExecFor(const Node& n);

  [[noreturn]] void UndefinedUse(const Value& v, const std::string& what) const;

  Value GetItem(const Value& base, const Value& key, const std::string& label);

  static std::string Label(const Expr& e);

  Value Slice(const Value& base, const Expr& e);

  struct Args {
    std::vector<Value> pos;
    std::map<std::string, Value> kw;
    const Value* Get(size_t i, const std::string& name) const {
      if (i < pos.size()) return &pos[i];
      auto it = kw.find(name);
      return it == kw.end() ? nullptr : &it->second;
    }
  };
  Args EvalArgs(const std::vector<Arg>& args);

  static int64_t ToInt(const Value& v, const std::string& what);

  static std::string StripChars(const std::string& s, const Value* chars, bool left, bool right);

  static std::string Replace(const std::string& s, const std::string& from, const std::string& to, int64_t count);

  Value CallMethod(const Value& self, const std::string& name, const Args& a);

  static std::string CaseWords(const std::string& s, bool title);

  Value CallGlobal(const std::string& name, const Args& a);

  bool RunTest(const std::string& name, const Value& v, const Args& a);

  bool Less(const Value& a, const Value& b);

  bool Contains(const Value& container, const Value& item);

  Value Attribute(const Value& v, const std::string& attr);

  Value Filter(const std::string& name, const Value& v, const Args& a);

  Value Arith(const std::string& op, const Value& x, const Value& y);

  Value Eval(const Expr& e);

  const ChatTemplateLimits& limits_;
  std::time_t now_;
  std::vector<Frame> frames_;
  std::string out_;
  int64_t iterations_ = 0;
  int eval_depth_ = 0;
  int line_ = 0;
};

}  // namespace ferry::engine::jinja
