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

# per architecture: the tensors of a layer beyond Llama's, and how its fused ones are laid out
ARCH_EXTRAS = {
    "llama": dict(),
    "qwen2": dict(biases=True, neox=True),
    "qwen3": dict(qk_norm=True, neox=True),
    "gemma3": dict(qk_norm=True, post_norms=True, neox=True),
    "phi3": dict(fused=True, neox=True, rope_factors=True),
}


def write_tiny_llama(path, *, dim=96, n_heads=3, n_kv_heads=1, ffn=160, layers=2, vocab=300,
                     context=256, rope_base=10000.0, qtypes=None, tied=False, seed=0,
                     arch="llama", chat_template: str | None = CHATML, head_dim=None, sliding_window=8,
                     swa_pattern=2, rope_freqs=False):
    """A GGUF of `arch` with random weights, the real tensor names and layouts, and awkward sizes
    (nothing a multiple of 64 unless K-quants need 256)."""
    qt = dict(LLAMA_QTYPES)
    qt.update(qtypes or {})
    x = ARCH_EXTRAS.get(arch, {})
    rng = np.random.default_rng(seed)
    head_dim = head_dim or dim // n_heads

    def mat(rows, cols, scale=None):
        return (rng.standard_normal((rows, cols)) * (scale or 1.0 / np.sqrt(cols))).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

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
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_uint32(f"{arch}.vocab_size", vocab)
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.sliding_window", sliding_window)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    if x.get("rope_factors"):
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", context // 2)
        w.add_float32(f"{arch}.rope.scaling.attn_factor", 1.1)
    add_tokenizer(w, vocab, chat_template)

    def matrix(name, rows, cols, kind):
        add_matrix(w, name, mat(rows, cols, 1.0 if kind == "token_embd" else None), qt[kind], rng)

    matrix("token_embd.weight", vocab, dim, "token_embd")
    w.add_tensor("output_norm.weight", norm(dim))
    if not tied:
        matrix("output.weight", vocab, dim, "output")
    if rope_freqs:       # Llama 3's frequency factors
        w.add_tensor("rope_freqs.weight", rng.uniform(1.0, 8.0, head_dim // 2).astype(np.float32))
    if x.get("rope_factors"):
        w.add_tensor("rope_factors_short.weight", rng.uniform(1.0, 3.0, head_dim // 2).astype(np.float32))
        w.add_tensor("rope_factors_long.weight", rng.uniform(2.0, 9.0, head_dim // 2).astype(np.float32))
    q, kv = n_heads * head_dim, n_kv_heads * head_dim
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(dim))
        w.add_tensor(p + "ffn_norm.weight", norm(dim))
        if x.get("fused"):
            matrix(p + "attn_qkv.weight", q + 2 * kv, dim, "attn_q")
            matrix(p + "ffn_up.weight", 2 * ffn, dim, "ffn_up")
        else:
            matrix(p + "attn_q.weight", q, dim, "attn_q")
            matrix(p + "attn_k.weight", kv, dim, "attn_k")
            matrix(p + "attn_v.weight", kv, dim, "attn_v")
            matrix(p + "ffn_gate.weight", ffn, dim, "ffn_gate")
            matrix(p + "ffn_up.weight", ffn, dim, "ffn_up")
        matrix(p + "attn_output.weight", dim, q, "attn_output")
        matrix(p + "ffn_down.weight", dim, ffn, "ffn_down")
        if x.get("biases"):
            for n, rows in (("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)):
                w.add_tensor(p + n, (0.5 * rng.standard_normal(rows)).astype(np.float32))
        if x.get("qk_norm"):
            w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
        if x.get("post_norms"):
            w.add_tensor(p + "post_attention_norm.weight", norm(dim))
            w.add_tensor(p + "post_ffw_norm.weight", norm(dim))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
