"""The numpy reference: a plain fp32 forward pass over dequantized weights, in the style of llama2.c.

This is the oracle a kernel is checked against when it disagrees. It shares no code
with the engine: weights come from the `gguf` package's reader and dequantizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


@dataclass
class Config:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope_base: float
    n_rot: int


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def load_weights(path):
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]   # numpy order: rows first
        weights[t.name] = w.reshape(shape)
    dim = _field(reader, f"{arch}.embedding_length")
    n_heads = _field(reader, f"{arch}.attention.head_count")
    head_dim = _field(reader, f"{arch}.attention.key_length") or dim // n_heads
    cfg = Config(
        n_layers=_field(reader, f"{arch}.block_count"),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=_field(reader, f"{arch}.attention.head_count_kv") or n_heads,
        head_dim=head_dim,
        eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_base=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        n_rot=_field(reader, f"{arch}.rope.dimension_count") or head_dim,
    )
    return cfg, weights


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, base, n_rot):
    """Rotates pairs (2i, 2i+1) of the first n_rot dims of x [heads, head_dim] at position pos."""
    x = x.copy()
    i = np.arange(n_rot // 2)
    theta = pos * base ** (-2.0 * i / n_rot)
    c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    a, b = x[:, 0:n_rot:2].copy(), x[:, 1:n_rot:2].copy()
    x[:, 0:n_rot:2] = a * c - b * s
    x[:, 1:n_rot:2] = a * s + b * c
    return x


def silu(x):
    return x / (1.0 + np.exp(-x))


class Reference:
    def __init__(self, path):
        self.cfg, self.w = load_weights(path)
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])
        self.reset()

    def reset(self):
        c = self.cfg
        self.k_cache = [np.zeros((0, c.n_kv_heads, c.head_dim), np.float32) for _ in range(c.n_layers)]
        self.v_cache = [np.zeros((0, c.n_kv_heads, c.head_dim), np.float32) for _ in range(c.n_layers)]

    def forward(self, token: int) -> np.ndarray:
        """One token at the next position; returns the logits."""
        c, w = self.cfg, self.w
        pos = self.k_cache[0].shape[0]
        x = w["token_embd.weight"][token].copy()
        group = c.n_heads // c.n_kv_heads
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            h = rmsnorm(x, w[p + "attn_norm.weight"], c.eps)
            q = (w[p + "attn_q.weight"] @ h).reshape(c.n_heads, c.head_dim)
            k = (w[p + "attn_k.weight"] @ h).reshape(c.n_kv_heads, c.head_dim)
            v = (w[p + "attn_v.weight"] @ h).reshape(c.n_kv_heads, c.head_dim)
            q = rope(q, pos, c.rope_base, c.n_rot)
            k = rope(k, pos, c.rope_base, c.n_rot)
            self.k_cache[layer] = np.concatenate([self.k_cache[layer], k[None]])
            self.v_cache[layer] = np.concatenate([self.v_cache[layer], v[None]])
            att = np.zeros((c.n_heads, c.head_dim), np.float32)
            for hd in range(c.n_heads):
                keys = self.k_cache[layer][:, hd // group]          # [pos + 1, head_dim]
                vals = self.v_cache[layer][:, hd // group]
                scores = keys @ q[hd] / np.sqrt(c.head_dim)
                scores = np.exp(scores - scores.max())
                att[hd] = (scores / scores.sum()) @ vals
            x = x + w[p + "attn_output.weight"] @ att.reshape(-1)
            h = rmsnorm(x, w[p + "ffn_norm.weight"], c.eps)
            x = x + w[p + "ffn_down.weight"] @ (silu(w[p + "ffn_gate.weight"] @ h) * (w[p + "ffn_up.weight"] @ h))
        x = rmsnorm(x, w["output_norm.weight"], c.eps)
        return self.out @ x

    def greedy(self, prompt: list[int], n: int, stop_ids=()) -> list[int]:
        self.reset()
        for t in prompt:
            logits = self.forward(t)
        out = []
        for _ in range(n):
            t = int(np.argmax(logits))
            out.append(t)
            if t in stop_ids:
                break
            logits = self.forward(t)
        return out
