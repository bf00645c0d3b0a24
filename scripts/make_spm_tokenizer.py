#!/usr/bin/env python3
"""Makes a SentencePiece tokenizer of the Llama 2 / Mistral / TinyLlama kind and its reference ids:
  models/goldens/spm/tokenizer.model       SentencePiece BPE (byte fallback, 3000 pieces) trained
                                           here on tests/data/kjv-train-400k.txt
  models/goldens/spm/tokenizer.json        the same converted by transformers (LlamaTokenizerFast,
                                           legacy: normalizer Prepend + Replace, byte_fallback BPE,
                                           decoder Replace/ByteFallback/Fuse/Strip)
  models/goldens/spm-metaspace/tokenizer.json  the non-legacy conversion (Metaspace pre-tokenizer)
  tests/data/tokenizer-vectors/spm*.json   ids of 1500 strings (the same generator as
                                           make_tokenizer_vectors.py) by `tokenizers` on each
                                           tokenizer.json, and by sentencepiece on tokenizer.model

    pip install sentencepiece==0.1.99 protobuf==3.20.3 tokenizers==0.22.2 transformers==4.57.3
    python3 scripts/make_spm_tokenizer.py
"""
import json
import os
import random
import shutil
import sys

import sentencepiece as spm
from tokenizers import Tokenizer
from transformers import LlamaTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from make_tokenizer_vectors import N, random_string  # noqa: E402


def main():
    out = os.path.join(ROOT, "models", "goldens", "spm")
    os.makedirs(out, exist_ok=True)
    text = open(os.path.join(ROOT, "tests", "data", "kjv-train-400k.txt"), encoding="utf-8").read()[:600000]
    tmp = os.path.join(out, "train.txt")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    spm.SentencePieceTrainer.train(input=tmp, model_prefix=os.path.join(out, "tokenizer"), vocab_size=3000, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                                   normalization_rule_name="identity", num_threads=1, minloglevel=2)
    os.remove(tmp)
    os.remove(os.path.join(out, "tokenizer.vocab"))
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
    legacy = LlamaTokenizerFast(vocab_file=os.path.join(out, "tokenizer.model"), legacy=True, from_slow=True, add_prefix_space=True)
    legacy.backend_tokenizer.save(os.path.join(out, "tokenizer.json"))
    meta_dir = os.path.join(ROOT, "models", "goldens", "spm-metaspace")
    os.makedirs(meta_dir, exist_ok=True)
    nonlegacy = LlamaTokenizerFast(vocab_file=os.path.join(out, "tokenizer.model"), legacy=False, from_slow=True, add_prefix_space=True)
    nonlegacy.backend_tokenizer.save(os.path.join(meta_dir, "tokenizer.json"))
    vec = os.path.join(ROOT, "tests", "data", "tokenizer-vectors")
    cases = {"spm": ("json", "../../models/goldens/spm/tokenizer.json"),
             "spm-metaspace": ("json", "../../models/goldens/spm-metaspace/tokenizer.json"),
             "spm-model": ("sentencepiece", "../../models/goldens/spm-model-only")}
    only = os.path.join(ROOT, "models", "goldens", "spm-model-only")
    os.makedirs(only, exist_ok=True)
    shutil.copy(os.path.join(out, "tokenizer.model"), os.path.join(only, "tokenizer.model"))
    for seed, (name, (kind, path)) in enumerate(cases.items()):
        rng = random.Random(2000 + seed)
        added = ["<s>", "</s>", "<unk>"]
        strings = [random_string(rng, added) for _ in range(N)]
        if kind == "sentencepiece":
            ids = [[sp.bos_id()] + sp.encode(s) for s in strings]
        else:
            tok = Tokenizer.from_file(os.path.normpath(os.path.join(ROOT, "tests", "data", path)))
            ids = [tok.encode(s, add_special_tokens=True).ids for s in strings]
        decoded = [sp.decode(i[1:]) if kind == "sentencepiece" else Tokenizer.from_file(os.path.normpath(os.path.join(ROOT, "tests", "data", path))).decode(i[1:], skip_special_tokens=False) for i in ids[:300]]
        with open(os.path.join(vec, name + ".json"), "w", encoding="utf-8") as fh:
            json.dump({"source": kind, "path": path, "strings": strings, "ids": ids, "decoded": decoded}, fh, ensure_ascii=False)
        print(name, sum(map(len, ids)), "ids")


if __name__ == "__main__":
    main()
