#!/usr/bin/env python3
"""Writes a golden Hugging Face checkpoint as GGUF the way llama.cpp's convert_hf_to_gguf.py does
(llama architecture: the Q and K rows of each head permuted for llama.cpp's interleaved rope;
tensors in float32, so nothing is rounded), for the test that ferry reads the GGUF form and the HF
form of the same model to the same logits. The tokenizer metadata is the checkpoint's GPT-2 BPE
(tokenizer.ggml.model gpt2, pre gpt-2). Also writes a copy whose Q/K rows were NOT permuted, which
ferry must read to different logits (the permutation is really undone, not ignored).

    pip install gguf==0.19.0 numpy safetensors torch
    python3 scripts/make_gguf_from_hf.py     (writes models/goldens/gguf/*.gguf)
"""
import json
import os

import numpy as np
import gguf
from safetensors.torch import load_file


def permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(src, out, permuted, arch="llama"):
    cfg = json.load(open(os.path.join(src, "config.json")))
    tensors = {}
    for f in sorted(os.listdir(src)):
        if f.startswith("model") and f.endswith(".safetensors"):
            tensors.update({k: v.float().numpy() for k, v in load_file(os.path.join(src, f)).items()})
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // heads)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rs = cfg.get("rope_scaling")
    if rs:
        kind = rs.get("rope_type", rs.get("type"))
        w.add_rope_scaling_type({"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}[kind])
        w.add_rope_scaling_factor(rs["factor"])
        if kind == "yarn":
            w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = json.load(open(os.path.join(src, "vocab.json")))
    merges = [l for l in open(os.path.join(src, "merges.txt"), encoding="utf-8").read().split("\n") if l and not l.startswith("#version")]
    specials = set(json.load(open(os.path.join(src, "special_tokens_map.json"))).values()) if os.path.exists(
        os.path.join(src, "special_tokens_map.json")) else {"<s>", "<pad>", "</s>", "<unk>"}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([t for t, _ in by_id])
    w.add_token_types([3 if t in specials else 1 for t, _ in by_id])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(True)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
                 "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
                 "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    for proj, g in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                    ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")]:
        per_layer[proj + ".bias"] = g + ".bias"
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if name in names:
            gname = names[name]
        else:
            parts = name.split(".")
            assert parts[0] == "model" and parts[1] == "layers", name
            gname = f"blk.{parts[2]}." + per_layer[".".join(parts[3:])]
        if permuted and gname.endswith(("attn_q.weight", "attn_q.bias")):
            t = permute(t, heads)
        if permuted and gname.endswith(("attn_k.weight", "attn_k.bias")):
            t = permute(t, kv)
        w.add_tensor(gname, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    goldens = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "goldens")
    out = os.path.join(goldens, "gguf")
    os.makedirs(out, exist_ok=True)
    write(os.path.join(goldens, "llama-gqa"), os.path.join(out, "llama-gqa.gguf"), True)
    write(os.path.join(goldens, "llama-gqa"), os.path.join(out, "llama-gqa-unpermuted.gguf"), False)
    # q/k/v/o and MLP biases (the Q/K biases permuted too, as the converter does), linear rope
    write(os.path.join(goldens, "llama-bias"), os.path.join(out, "llama-bias.gguf"), True)
    # the qwen3 architecture: no permutation, q/k norms, head_dim 32 != 64 / 4 (key_length), yarn
    write(os.path.join(goldens, "qwen3-yarn"), os.path.join(out, "qwen3-yarn.gguf"), False, arch="qwen3")


if __name__ == "__main__":
    main()
