#!/usr/bin/env python3
"""Makes tests/data/tokenizer-vectors/<name>.json: the Hugging Face `tokenizers` package's ids for
1500 strings per tokenizer.json ferry reads, for a C++ test that compares ferry's ids with them.

Tokenizers: tiny-opt's tokenizer.json (GPT-2/OPT), a copy with lstrip/rstrip added tokens; and the tokenizer.json ferry writes for GGUF
tokenizers (`ferry tokenize --model X.gguf --export-json`): the real model SmolLM2-135M-Instruct
and llama.cpp's vocab files for GPT-2, Llama 3 (llama-bpe), Qwen2, StarCoder, Falcon and the
SentencePiece ones of Llama 2 (llama-spm) and Phi-3 (fetched by scripts/fetch-models). Loading those into `tokenizers` also checks that what ferry writes is a
tokenizer.json that the reference implementation reads the same way.

Strings (seeded): random code points from many scripts, code, whitespace runs, digit runs, CJK,
emoji and ZWJ sequences, contractions, and the tokenizer's added tokens inside text. Encoded with
add_special_tokens=True (the post-processor's BOS, when it has one); the first 300 also decoded
(the ids without the post-processor's tokens, special tokens kept).

    pip install tokenizers==0.22.2
    python3 scripts/make_tokenizer_vectors.py --ferry build/ferry
"""
import argparse
import json
import os
import random
import subprocess
import tempfile

from tokenizers import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.environ.get("FERRY_CACHE", os.path.expanduser("~/.cache/ferry"))
GGUFS = {
    "smollm2": f"{CACHE}/models/smollm2-135m-instruct-q4_1.gguf",
    "gpt-2": f"{CACHE}/models/llama-cpp-vocab/ggml-vocab-gpt-2.gguf",
    "llama3": f"{CACHE}/models/llama-cpp-vocab/ggml-vocab-llama-bpe.gguf",
    "qwen2": f"{CACHE}/models/llama-cpp-vocab/ggml-vocab-qwen2.gguf",
    "starcoder": f"{CACHE}/models/llama-cpp-vocab/ggml-vocab-starcoder.gguf",
    "falcon": f"{CACHE}/models/llama-cpp-vocab/ggml-vocab-falcon.gguf",
    "llama2-spm": f"{CACHE}/models/llama-cpp-vocab/ggml-vocab-llama-spm.gguf",
    "phi-3": f"{CACHE}/models/llama-cpp-vocab/ggml-vocab-phi-3.gguf",
    "gemma3": f"{CACHE}/models/gemma-3-270m-q4_k_m.gguf",
}
N = 1500

RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F),
          (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x2000, 0x206F), (0xFF00, 0xFFEF),
          (0x300, 0x36F), (0x1100, 0x11FF), (0xFB00, 0xFB4F), (0x2460, 0x24FF)]  # combining marks, jamo, ligatures, enclosed
SNIPPETS = ["def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "  if x == 3.14159:",
            "SELECT * FROM t WHERE id=42;", "<div class=\"a\">Hi</div>", "I'm sure they'll've done it, didn't they?",
            "HELLO World's END", "1234567890 12 345 6789", "naïve café résumé Ångström", "中文字符和English混合",
            "👨‍👩‍👧‍👦 family 🏳️‍🌈 flag", "\r\n\r\n", "\t\t  \n \n", "x" * 40, "e=mc²; ½ ⅓ ¼", "..., !!! ??? ---"]


def random_string(rng, added):
    kind = rng.randrange(6)
    if kind == 0:  # random code points from a few scripts
        out = []
        for _ in range(rng.randrange(1, 40)):
            lo, hi = rng.choice(RANGES)
            out.append(chr(rng.randint(lo, hi)))
        return "".join(out)
    if kind == 1:  # whitespace runs between words
        return "".join(rng.choice(["a", "word", " ", "  ", "\n", "\t", "\n\n", "   ", "\r\n", "x1"]) for _ in range(rng.randrange(1, 20)))
    if kind == 2:  # digits
        return " ".join(str(rng.randrange(10 ** rng.randrange(1, 12))) for _ in range(rng.randrange(1, 6)))
    if kind == 3 and added:  # added tokens inside text
        parts = []
        for _ in range(rng.randrange(1, 6)):
            parts.append(rng.choice(SNIPPETS)[: rng.randrange(1, 20)])
            parts.append(rng.choice(added))
        return "".join(parts)
    s = rng.choice(SNIPPETS)
    return s[rng.randrange(len(s)) :] + rng.choice(SNIPPETS)[: rng.randrange(1, 30)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ferry", default=os.path.join(ROOT, "build", "ferry"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "tokenizer-vectors"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sources = {"tiny-opt": ("dir", "models/tiny-opt", os.path.join(ROOT, "models", "tiny-opt", "tokenizer.json"))}
    # tiny-opt with added tokens that strip the whitespace on their left / right (lstrip, rstrip)
    strip = json.load(open(os.path.join(ROOT, "models", "tiny-opt", "tokenizer.json"), encoding="utf-8"))
    for i, (content, l, r) in enumerate([("<mask>", True, False), ("[R]", False, True), ("<both>", True, True)]):
        strip["added_tokens"].append({"id": 8192 + i, "content": content, "single_word": False, "lstrip": l, "rstrip": r,
                                      "normalized": False, "special": True})
    strip_path = os.path.join(args.out, "tiny-opt-strip.tokenizer.json")
    with open(strip_path, "w", encoding="utf-8") as fh:
        json.dump(strip, fh, ensure_ascii=False)
    sources["tiny-opt-strip"] = ("json", "tokenizer-vectors/tiny-opt-strip.tokenizer.json", strip_path)
    tmp = tempfile.mkdtemp()
    for name, gguf in GGUFS.items():
        path = os.path.join(tmp, name + ".json")
        subprocess.run([args.ferry, "tokenize", "--model", gguf, "--export-json", path], check=True)
        sources[name] = ("gguf", os.path.relpath(gguf, CACHE), path)
    # Unicode normalizers: Qwen2's own tokenizer.json has NFC (llama.cpp's GGUF does not); tiny-opt
    # with NFKC then Lowercase; and post-processors that append (RoBERTa's cls/sep, an EOS
    # template). The vectors record the override, the test sets it the same way.
    eos_template = {"type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                               {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]},
                                       "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}
    overrides = {"qwen2-nfc": ("qwen2", {"normalizer": {"type": "NFC"}}),
                 "tiny-opt-nfkc-lower": ("tiny-opt", {"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}}),
                 "tiny-opt-roberta": ("tiny-opt", {"post_processor": {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0],
                                                                       "trim_offsets": True, "add_prefix_space": True}}),
                 "tiny-opt-eos": ("tiny-opt", {"post_processor": eos_template})}
    for name, (base, over) in overrides.items():
        j = json.load(open(sources[base][2], encoding="utf-8"))
        j.update(over)
        path = os.path.join(tmp, name + ".json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(j, fh, ensure_ascii=False)
        sources[name] = (sources[base][0], sources[base][1], path, over)
    for seed, (name, (kind, where, path, *norm)) in enumerate(sources.items()):
        tok = Tokenizer.from_file(path)
        added = [t.content for t in tok.get_added_tokens_decoder().values()][:50]
        rng = random.Random(1000 + seed)
        strings = [random_string(rng, added) for _ in range(N)]
        ids = [tok.encode(s, add_special_tokens=True).ids for s in strings]
        plain = [tok.encode(s, add_special_tokens=False).ids for s in strings[:300]]
        decoded = [tok.decode(i, skip_special_tokens=False) for i in plain]  # the ids without BOS/EOS
        with open(os.path.join(args.out, name + ".json"), "w", encoding="utf-8") as fh:
            rec = {"source": kind, "path": where, "strings": strings, "ids": ids, "decoded": decoded}
            if norm:
                rec["override"] = norm[0]
            json.dump(rec, fh,
                      ensure_ascii=False)
        print(name, len(strings), "strings", sum(map(len, ids)), "ids")


if __name__ == "__main__":
    main()
