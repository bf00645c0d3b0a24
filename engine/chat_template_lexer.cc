// The chat-template lexer: text and tags, with Jinja's whitespace control (trim_blocks, lstrip_blocks, -).
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

namespace {



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

}  // namespace

std::vector<Piece> Lex(std::string_view src) { return Lexer(src).Run(); }

}  // namespace ferry::engine::jinja
