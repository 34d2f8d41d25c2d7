"""Synthetic GGUF models for benchmarks: real shapes, random quantized weights, written in pure Python.

`pyengine bench --synthetic llama-1b` measures speed at a scale no packaged model has: Llama 3.2
1B's shapes (16 layers, 2048 wide, 8192 FFN, 32 query and 8 KV heads, 128256 tokens, tied
embedding), Q4_0 layers and a Q8_0 embedding as in common Q4_0 files. The weights are random
blocks with a few sane scales: the text is noise, the arithmetic and memory traffic are real.
"""

from __future__ import annotations

import os
import struct

from .errors import PyEngineError
from .gguf import GGML_TYPES, TYPE_IDS
from .tokenizer import BYTE_TO_UNICODE

SHAPES = {
    "llama-1b": dict(layers=16, dim=2048, ffn=8192, heads=32, kv_heads=8, head_dim=64, vocab=128256,
                     rope_base=500000.0, context=8192),
    "llama-3b": dict(layers=28, dim=3072, ffn=8192, heads=24, kv_heads=8, head_dim=128, vocab=128256,
                     rope_base=500000.0, context=8192),
}
# f16 scales cycled over the blocks: |values| about 1/sqrt(dim) times a few
_SCALES = {"Q4_0": (0x1C00, 0x1E00, 0x1A00), "Q8_0": (0x2000, 0x2200, 0x1E00)}


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, value) -> bytes:
    out = _gguf_string(key)
    if isinstance(value, bool):
        return out + struct.pack("<IB", 7, value)
    if isinstance(value, int):
        return out + struct.pack("<II", 4, value)
    if isinstance(value, float):
        return out + struct.pack("<If", 6, value)
    if isinstance(value, str):
        return out + struct.pack("<I", 8) + _gguf_string(value)
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return out + struct.pack("<IIQ", 9, 8, len(value)) + b"".join(_gguf_string(v) for v in value)
        return out + struct.pack("<IIQ", 9, 5, len(value)) + struct.pack(f"<{len(value)}i", *value)
    raise TypeError(f"no GGUF type for {key}={value!r}")


def _random_blocks(qtype: str, n_values: int) -> bytes:
    """Random quants, scale fields set to a few f16 values."""
    per, size = GGML_TYPES[TYPE_IDS[qtype]][1:]
    blocks = n_values // per
    data = bytearray(os.urandom(blocks * size))
    scales = _SCALES[qtype]
    for i, sc in enumerate(scales):       # every len(scales)-th block gets scale i
        lo, hi = sc & 255, sc >> 8
        count = len(range(i, blocks, len(scales)))
        data[i * size::len(scales) * size] = bytes([lo]) * count
        data[i * size + 1::len(scales) * size] = bytes([hi]) * count
    return bytes(data)


def synthetic_model(name: str) -> str:
    """The synthetic model `name` in the cache folder, written there on first use."""
    from .default_model import cache_dir

    return write_synthetic(os.path.join(cache_dir(), f"synthetic-{name}.gguf"), name)


def write_synthetic(path: str, name: str = "llama-1b", shape: dict | None = None) -> str:
    """Writes the synthetic model `name` (see SHAPES, or `shape`) to `path`, unless it is there already."""
    if shape is None and name not in SHAPES:
        raise PyEngineError(f"no synthetic model '{name}'; known: {', '.join(SHAPES)}")
    s = shape or SHAPES[name]
    if os.path.isfile(path) and os.path.isfile(path + ".done"):
        return path
    arch = "llama"
    hd = s["head_dim"]
    # GPT-2 byte symbols as the first 256 tokens, so any text tokenizes (one token per byte)
    tokens = [BYTE_TO_UNICODE[b] for b in range(256)] + ["<|begin_of_text|>", "<|end_of_text|>"]
    tokens += [f"<|reserved_{i}|>" for i in range(s["vocab"] - len(tokens))]
    types = [1] * 256 + [3, 3] + [5] * (s["vocab"] - 258)
    meta = {
        "general.architecture": arch, "general.name": f"synthetic {name}", "general.alignment": 32,
        f"{arch}.block_count": s["layers"], f"{arch}.context_length": s["context"],
        f"{arch}.embedding_length": s["dim"], f"{arch}.feed_forward_length": s["ffn"],
        f"{arch}.attention.head_count": s["heads"], f"{arch}.attention.head_count_kv": s["kv_heads"],
        f"{arch}.rope.freq_base": s["rope_base"], f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.rope.dimension_count": hd, f"{arch}.vocab_size": s["vocab"],
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": [],
        "tokenizer.ggml.bos_token_id": 256, "tokenizer.ggml.eos_token_id": 257,
    }
    dim, ffn = s["dim"], s["ffn"]
    tensors = [("token_embd.weight", "Q8_0", (dim, s["vocab"])), ("output_norm.weight", "F32", (dim,))]
    for i in range(s["layers"]):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", "F32", (dim,)), (p + "ffn_norm.weight", "F32", (dim,)),
                    (p + "attn_q.weight", "Q4_0", (dim, s["heads"] * hd)),
                    (p + "attn_k.weight", "Q4_0", (dim, s["kv_heads"] * hd)),
                    (p + "attn_v.weight", "Q4_0", (dim, s["kv_heads"] * hd)),
                    (p + "attn_output.weight", "Q4_0", (s["heads"] * hd, dim)),
                    (p + "ffn_gate.weight", "Q4_0", (dim, ffn)), (p + "ffn_up.weight", "Q4_0", (dim, ffn)),
                    (p + "ffn_down.weight", "Q4_0", (ffn, dim))]
    header = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(meta)) + b"".join(_kv(k, v) for k, v in meta.items())
    infos, offset, sizes = [], 0, []
    for tname, qtype, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        per, size = GGML_TYPES[TYPE_IDS[qtype]][1:]
        nbytes = n // per * size
        infos.append(_gguf_string(tname) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                     + struct.pack("<IQ", TYPE_IDS[qtype], offset))
        sizes.append((qtype, n, nbytes))
        offset += -(-nbytes // 32) * 32
    head = header + b"".join(infos)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        f.write(head + bytes(-len(head) % 32))
        for qtype, n, nbytes in sizes:
            if qtype == "F32":
                f.write(struct.pack("<f", 1.0) * n)
            else:
                f.write(_random_blocks(qtype, n))
            f.write(bytes(-nbytes % 32))
    os.replace(tmp, path)
    open(path + ".done", "w").close()
    return path
