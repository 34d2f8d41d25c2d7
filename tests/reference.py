"""The numpy reference: a plain fp32 forward pass over dequantized weights, in the style of llama2.c.

This is the oracle a kernel is checked against when it disagrees. It shares no code
with the engine: weights come from the `gguf` package's reader and dequantizer, and each
architecture's differences are spelled out where they happen in `forward`.
  llama  (SmolLM2, TinyLlama, Llama 2/3)  RoPE on adjacent pairs; Llama 3's rope_freqs
  qwen2  biases on q, k, v; RoPE on halves
  qwen3  RMSNorm on q and k per head; RoPE on halves
  gemma3 embeddings times sqrt(dim); q/k norms; norms after attention and MLP too; GELU gate;
         sliding-window layers (local RoPE base 10000) with every sixth layer global
  phi3   q, k, v in one tensor, gate and up in one; RoPE frequency factors and attention factor
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


@dataclass
class Config:
    arch: str
    n_layers: int
    dim: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope_base: float
    n_rot: int
    neox: bool = False
    window: int = 0
    swa_pattern: int = 6
    attn_factor: float = 1.0


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def load_weights(path):
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    weights = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]   # numpy order: rows first
        weights[t.name] = w.reshape(shape)

    def key(k, default=None):
        return _field(reader, f"{arch}.{k}", default)

    dim, n_heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length") or dim // n_heads
    cfg = Config(
        arch=arch,
        n_layers=key("block_count"),
        dim=dim,
        ffn=key("feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv") or n_heads,
        head_dim=head_dim,
        eps=float(key("attention.layer_norm_rms_epsilon", 1e-6 if arch == "gemma3" else 1e-5)),
        rope_base=float(key("rope.freq_base", 10000.0)),
        n_rot=key("rope.dimension_count") or head_dim,
        neox=arch in ("qwen2", "qwen3", "gemma3", "phi3"),
        window=key("attention.sliding_window", 0) if arch == "gemma3" else 0,
        swa_pattern=key("attention.sliding_window_pattern", 6),
        attn_factor=float(key("rope.scaling.attn_factor", 1.0)) if "rope_factors_long.weight" in weights else 1.0,
    )
    return cfg, weights


def rmsnorm(x, w, eps):
    """Over the last axis: a vector, or each row of [heads, head_dim]."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, base, n_rot, neox=False, factors=None, attn_factor=1.0):
    """Rotates x [tokens, heads, head_dim] at positions pos [tokens]: pairs (2i, 2i+1) of the first n_rot
    dims, or with neox pairs (i, i + n_rot/2); frequencies divided by `factors`, cos and sin times
    attn_factor."""
    x = x.copy()
    i = np.arange(n_rot // 2)
    theta = np.asarray(pos, np.float64)[:, None] * base ** (-2.0 * i / n_rot)     # [tokens, n_rot/2]
    if factors is not None:
        theta = theta / factors
    c = (np.cos(theta) * attn_factor).astype(np.float32)[:, None, :]
    s = (np.sin(theta) * attn_factor).astype(np.float32)[:, None, :]
    if neox:
        a, b = x[..., : n_rot // 2].copy(), x[..., n_rot // 2: n_rot].copy()
        x[..., : n_rot // 2], x[..., n_rot // 2: n_rot] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2], x[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    return x


def silu(x):
    return x / (1.0 + np.exp(-x))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))  # a float64 scalar would promote


class Reference:
    def __init__(self, path):
        self.cfg, self.w = load_weights(path)
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])
        self.reset()

    def reset(self):
        c = self.cfg
        self.k_cache = [np.zeros((0, c.n_kv_heads, c.head_dim), np.float32) for _ in range(c.n_layers)]
        self.v_cache = [np.zeros((0, c.n_kv_heads, c.head_dim), np.float32) for _ in range(c.n_layers)]

    def forward(self, token: int, logits: bool = True):
        """One token at the next position; returns its logits (or None when not asked for)."""
        out = self.forward_block([token], logits)
        return None if out is None else out[-1]

    def forward_block(self, tokens: list[int], logits: bool = True):
        """The next len(tokens) positions at once (rows of matrices, a causal mask): the same math as one
        token at a time; returns the last token's logits in a [1, vocab] array, or None."""
        c, w = self.cfg, self.w
        n, pos0 = len(tokens), self.k_cache[0].shape[0]
        pos = np.arange(pos0, pos0 + n)
        gemma, phi3 = c.arch == "gemma3", c.arch == "phi3"
        x = w["token_embd.weight"][tokens].copy()                        # [n, dim]
        if gemma:
            x = x * np.float32(np.sqrt(c.dim))
        group = c.n_heads // c.n_kv_heads
        nq, nkv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        for layer in range(c.n_layers):
            p = f"blk.{layer}."
            h = rmsnorm(x, w[p + "attn_norm.weight"], c.eps)
            if phi3:
                qkv = h @ w[p + "attn_qkv.weight"].T
                q, k, v = qkv[:, :nq], qkv[:, nq:nq + nkv], qkv[:, nq + nkv:]
            else:
                q, k, v = (h @ w[p + f"attn_{t}.weight"].T for t in "qkv")
            if c.arch == "qwen2":
                q, k, v = q + w[p + "attn_q.bias"], k + w[p + "attn_k.bias"], v + w[p + "attn_v.bias"]
            q, k, v = q.reshape(n, c.n_heads, c.head_dim), k.reshape(n, c.n_kv_heads, c.head_dim), \
                v.reshape(n, c.n_kv_heads, c.head_dim)
            if c.arch in ("qwen3", "gemma3"):
                q = rmsnorm(q, w[p + "attn_q_norm.weight"], c.eps)
                k = rmsnorm(k, w[p + "attn_k_norm.weight"], c.eps)
            local = gemma and c.window > 0 and layer % c.swa_pattern < c.swa_pattern - 1
            base = 10000.0 if local else c.rope_base
            factors = w.get("rope_factors_short.weight") if phi3 else w.get("rope_freqs.weight")
            q = rope(q, pos, base, c.n_rot, c.neox, factors, c.attn_factor)
            k = rope(k, pos, base, c.n_rot, c.neox, factors, c.attn_factor)
            self.k_cache[layer] = np.concatenate([self.k_cache[layer], k])
            self.v_cache[layer] = np.concatenate([self.v_cache[layer], v])
            keys_pos = np.arange(pos0 + n)
            visible = keys_pos[None, :] <= pos[:, None]                   # causal
            if local:                                                    # a sliding window: the last keys only
                visible &= keys_pos[None, :] > pos[:, None] - c.window
            att = np.zeros((n, c.n_heads, c.head_dim), np.float32)
            for hd in range(c.n_heads):
                keys = self.k_cache[layer][:, hd // group]                 # [keys, head_dim]
                vals = self.v_cache[layer][:, hd // group]
                scores = q[:, hd] @ keys.T / np.sqrt(c.head_dim)           # [n, keys]
                scores = np.where(visible, scores, -np.inf)
                scores = np.exp(scores - scores.max(axis=1, keepdims=True))
                att[:, hd] = (scores / scores.sum(axis=1, keepdims=True)) @ vals
            o = att.reshape(n, -1) @ w[p + "attn_output.weight"].T
            x = x + (rmsnorm(o, w[p + "post_attention_norm.weight"], c.eps) if gemma else o)
            h = rmsnorm(x, w[p + "ffn_norm.weight"], c.eps)
            if phi3:
                gu = h @ w[p + "ffn_up.weight"].T
                gate, up = gu[:, :c.ffn], gu[:, c.ffn:]
            else:
                gate, up = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
            m = ((gelu_tanh(gate) if gemma else silu(gate)) * up) @ w[p + "ffn_down.weight"].T
            x = x + (rmsnorm(m, w[p + "post_ffw_norm.weight"], c.eps) if gemma else m)
        if not logits:
            return None
        x = rmsnorm(x[-1], w["output_norm.weight"], c.eps)
        return (self.out @ x)[None]

    def greedy(self, prompt: list[int], n: int, stop_ids=()) -> list[int]:
        self.reset()
        logits = self.forward_block(prompt)[-1]
        out = []
        for _ in range(n):
            t = int(np.argmax(logits))
            out.append(t)
            if t in stop_ids:
                break
            logits = self.forward(t)
        return out
