#!/usr/bin/env python3
"""Makes the model-family goldens: tiny random-weight checkpoints of each family ferry runs, and
transformers' float32 outputs on them (eager attention), written to models/goldens/<name>/:
goldens.json (prompts, greedy tokens, top-2 margins) and reference.safetensors (the logits, F32).

Each checkpoint is saved in its own dtype (f32, f16 or bf16; one of them sharded) and reloaded in
float32 for the reference, so ferry and transformers read the same values. goldens.json holds, per
prompt (token ids, BOS first): the last-position logits (last_logits [prompts, vocab]), 16 greedy
tokens (min_new_tokens=16, so EOS cannot stop them early), and for the third prompt (33 tokens)
the logits of every position (all_logits [33, vocab]). Models with
dynamic-NTK rope are reloaded for each prompt (transformers' dynamic rope keeps state across calls).

Run with torch and transformers installed (pip install torch==2.9.1 transformers==4.57.3):
    python3 scripts/make_family_goldens.py [--out models/goldens]
The tokenizer files are tiny-opt's (a vocabulary of 8192; BOS = EOS = 2).
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZER_FILES = ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]
VOCAB = 8192

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=2, eos_token_id=2, pad_token_id=1, initializer_range=0.25,
            hidden_act="silu")

# name -> (config class, config overrides, dtype, shards)
VARIANTS = {
    # GQA 4 query heads over 2 KV heads, untied head, default rope, f32, two shards.
    "llama-gqa": ("llama", dict(num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False), torch.float32, 2),
    # Llama 3.x: rope_scaling llama3 (all three frequency bands occur), tied head, head_dim 32 != 64 / 4, bf16.
    "llama3-tied": ("llama", dict(num_key_value_heads=4, head_dim=32, rope_theta=500000.0, tie_word_embeddings=True,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                    torch.bfloat16, 1),
    # Attention and MLP biases (attention_bias, mlp_bias), MHA, linear rope scaling, f16.
    "llama-bias": ("llama", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}), torch.float16, 1),
    # SmolLM2-style: 3 heads over 1 KV head, hidden 48, tied, theta 1e5, eps 1e-5, its extra config keys.
    "smollm2-style": ("llama", dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1, rope_theta=100000.0,
                                    rms_norm_eps=1e-5, tie_word_embeddings=True, is_llama_config=True,
                                    rope_interleaved=False, pretraining_tp=1), torch.bfloat16, 1),
    # Mistral: multi-query (1 KV head), no sliding window, untied, f16.
    "mistral": ("mistral", dict(num_key_value_heads=1, sliding_window=None, tie_word_embeddings=False, rope_theta=10000.0),
                torch.float16, 1),
    # Qwen2: q/k/v biases, GQA, tied, dynamic-NTK rope past 64 positions (the prompts go past it), f32.
    "qwen2-dynamic": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64,
                                    rope_scaling={"rope_type": "dynamic", "factor": 2.0}), torch.float32, 1),
    # Qwen3: q/k norms, head_dim 32, GQA, yarn rope (original context 32), untied, bf16.
    "qwen3-yarn": ("qwen3", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
                   torch.bfloat16, 1),
}


def make_config(kind, overrides):
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[kind]
    args = dict(BASE)
    args.update(overrides)
    return cls(**args)


def prompts(seed):
    g = torch.Generator().manual_seed(seed)
    lengths = [90, 7, 33]  # the first goes past 64 (dynamic NTK) and 32 (yarn's original context)
    return [[2] + torch.randint(4, VOCAB, (n - 1,), generator=g).tolist() for n in lengths]


def reference(path, ps, fresh_each):
    def load():
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
        return m.eval()
    model = load()
    out = {"prompts": []}
    last, all_logits = [], None
    with torch.no_grad():
        for i, p in enumerate(ps):
            if fresh_each:
                model = load()
            ids = torch.tensor([p])
            logits = model(ids).logits[0]
            rec = {"ids": p}
            last.append(logits[-1].clone())
            top2 = torch.topk(logits[-1], 2).values
            rec["top2_margin"] = float(top2[0] - top2[1])
            if i == 2:
                all_logits = logits.clone()
            if fresh_each:
                model = load()
            gen = model.generate(ids, do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=1)
            rec["greedy"] = gen[0, len(p):].tolist()
            out["prompts"].append(rec)
    return out, {"last_logits": torch.stack(last).contiguous(), "all_logits": all_logits.contiguous()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "models", "goldens"))
    args = ap.parse_args()
    torch.manual_seed(0)
    for idx, (name, (kind, overrides, dtype, shards)) in enumerate(VARIANTS.items()):
        d = os.path.join(args.out, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        config = make_config(kind, overrides)
        torch.manual_seed(1000 + idx)
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, attn_implementation="eager")
        # Norm weights away from 1 so that a missing or misplaced norm shows.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
                elif n.endswith("bias"):
                    p.uniform_(-0.2, 0.2)
        model = model.to(dtype)
        shard_size = None
        if shards > 1:
            total = sum(p.numel() * p.element_size() for p in model.parameters())
            shard_size = f"{total // shards // 1000 + 1}KB"
        model.save_pretrained(d, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
        for f in TOKENIZER_FILES:
            src = os.path.join(ROOT, "models", "tiny-opt", f)
            if os.path.exists(src):
                shutil.copy(src, d)
        for f in ("generation_config.json",):
            p = os.path.join(d, f)
            if os.path.exists(p):
                os.remove(p)
        fresh = (overrides.get("rope_scaling") or {}).get("rope_type") == "dynamic"
        ref, tensors = reference(d, prompts(idx), fresh)
        ref["all_logits_prompt"] = 2
        save_file(tensors, os.path.join(d, "reference.safetensors"))
        ref.update({"name": name, "model_type": kind, "saved_dtype": str(dtype).replace("torch.", ""),
                    "torch": torch.__version__, "transformers": transformers.__version__})
        with open(os.path.join(d, "goldens.json"), "w") as f:
            json.dump(ref, f)
        margins = [p["top2_margin"] for p in ref["prompts"]]
        print(f"{name}: {kind} {ref['saved_dtype']}, top-2 logit margins {['%.3g' % m for m in margins]}")


if __name__ == "__main__":
    main()
