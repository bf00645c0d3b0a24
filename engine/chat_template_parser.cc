// The chat-template parser: pieces into the syntax tree, refusing what the interpreter does not implement.
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

namespace {

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

}  // namespace

Body ParseTemplate(std::vector<Piece> pieces) { return Parser(std::move(pieces)).Run(); }

}  // namespace ferry::engine::jinja
