"""Small GGUF files the tests write with the `gguf` package: tiny models with real tensor names and layouts."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from pyengine.tokenizer import BYTE_TO_UNICODE

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "a n", "e r", "Ġ a", "o n"]


def tiny_vocab(size: int):
    tokens = list(SPECIALS) + [BYTE_TO_UNICODE[b] for b in range(256)]
    types = [3] * len(SPECIALS) + [1] * 256
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
        types.append(1)
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(5)
    return tokens, types


def add_tokenizer(w: GGUFWriter, vocab: int, chat_template: str | None = CHATML):
    tokens, types = tiny_vocab(vocab)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "smollm")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_array("tokenizer.ggml.merges", MERGES)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    if chat_template is not None:
        w.add_string("tokenizer.chat_template", chat_template)


# K-quant blocks: (bytes, [(byte offset of an f16 scale, its size relative to `scale`)])
K_BLOCKS = {
    "Q4_K": (144, [(0, 1 / 400), (2, 1 / 400)]),     # d, dmin; then scales[12], qs[128]
    "Q5_K": (176, [(0, 1 / 800), (2, 1 / 800)]),     # d, dmin; then scales[12], qh[32], qs[128]
    "Q6_K": (210, [(208, 1 / 2000)]),                # ql[128], qh[64], scales[16]; then d
}


def random_kquant(rows: int, cols: int, qtype: str, rng, scale: float = 1.0) -> np.ndarray:
    """Raw K-quant blocks with random quants and sub-block scales (every bit pattern) and f16 super-block
    scales chosen so that values have about `scale` magnitude; [rows, bytes per row] uint8.
    (The gguf package dequantizes these types but cannot quantize them.)"""
    nbytes, fields = K_BLOCKS[qtype]
    blocks = rows * cols // 256
    raw = rng.integers(0, 256, (blocks, nbytes), dtype=np.uint8)
    for off, rel in fields:
        d = (rng.uniform(0.5, 1.5, blocks) * scale * rel).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(blocks, 2)
    return raw.reshape(rows, cols // 256 * nbytes)


def add_matrix(w: GGUFWriter, name: str, x: np.ndarray, qtype: str, rng=None):
    """x: [rows, cols] float32, stored as qtype (K-quants: random blocks of x's shape and scale)."""
    q = Q[qtype]
    if qtype in K_BLOCKS:
        scale = float(np.abs(x).mean()) * 1.25
        w.add_tensor(name, random_kquant(x.shape[0], x.shape[1], qtype, rng or np.random.default_rng(0), scale),
                     raw_dtype=q)
    elif q == Q.F32:
        w.add_tensor(name, x.astype(np.float32))
    elif q == Q.F16:
        w.add_tensor(name, x.astype(np.float16))
    elif q == Q.BF16:
        w.add_tensor(name, quantize(x.astype(np.float32), q), raw_dtype=q)
    else:
        w.add_tensor(name, quantize(x.astype(np.float32), q), raw_dtype=q)


LLAMA_QTYPES = {
    "token_embd": "Q4_1", "output": "F16",
    "attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "F16",
    "ffn_gate": "Q4_0", "ffn_up": "Q4_0", "ffn_down": "Q8_0",
}


def write_tiny_llama(path, *, dim=96, n_heads=3, n_kv_heads=1, ffn=160, layers=2, vocab=300,
                     context=256, rope_base=10000.0, qtypes=None, tied=False, seed=0,
                     arch="llama", chat_template: str | None = CHATML):
    """A Llama-graph GGUF with random weights and awkward sizes (nothing a multiple of 64)."""
    qt = dict(LLAMA_QTYPES)
    qt.update(qtypes or {})
    rng = np.random.default_rng(seed)
    head_dim = dim // n_heads

    def mat(rows, cols, scale=None):
        return (rng.standard_normal((rows, cols)) * (scale or 1.0 / np.sqrt(cols))).astype(np.float32)

    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.context_length", context)
    w.add_uint32(f"{arch}.embedding_length", dim)
    w.add_uint32(f"{arch}.feed_forward_length", ffn)
    w.add_uint32(f"{arch}.attention.head_count", n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", n_kv_heads)
    w.add_float32(f"{arch}.rope.freq_base", rope_base)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_uint32(f"{arch}.vocab_size", vocab)
    add_tokenizer(w, vocab, chat_template)
    add_matrix(w, "token_embd.weight", mat(vocab, dim, 1.0), qt["token_embd"])
    w.add_tensor("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
    if not tied:
        add_matrix(w, "output.weight", mat(vocab, dim), qt["output"])
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        w.add_tensor(p + "ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(dim)).astype(np.float32))
        add_matrix(w, p + "attn_q.weight", mat(n_heads * head_dim, dim), qt["attn_q"])
        add_matrix(w, p + "attn_k.weight", mat(n_kv_heads * head_dim, dim), qt["attn_k"])
        add_matrix(w, p + "attn_v.weight", mat(n_kv_heads * head_dim, dim), qt["attn_v"])
        add_matrix(w, p + "attn_output.weight", mat(dim, n_heads * head_dim), qt["attn_output"])
        add_matrix(w, p + "ffn_gate.weight", mat(ffn, dim), qt["ffn_gate"])
        add_matrix(w, p + "ffn_up.weight", mat(ffn, dim), qt["ffn_up"])
        add_matrix(w, p + "ffn_down.weight", mat(dim, ffn), qt["ffn_down"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
