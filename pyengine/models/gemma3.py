"""Gemma 3: embeddings scaled by sqrt(dim), RMSNorm before and after attention and MLP, RMSNorm on
q and k per head, a GELU-gated MLP, and layers that attend within a sliding window (local RoPE
base) interleaved with global ones (every sixth), over a large vocabulary tied to the output.

GGUF files store Gemma's norm weights as (1 + w), so every norm here is a plain RMSNorm.
"""

from __future__ import annotations

import math

from .base import Decoder, Meta, ModelArgs, head_specs, layer_specs

LAYER = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
         "attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
         "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight")


class Attention:
    def __init__(self, args, w, i: int):
        self.args, self.layer = args, i
        p = f"blk.{i}."
        self.wq, self.wk, self.wv = w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"]
        self.wo = w[p + "attn_output.weight"]
        self.q_norm, self.k_norm = w[p + "attn_q_norm.weight"], w[p + "attn_k_norm.weight"]
        self.local = bool(args.sliding_window) and i % args.swa_pattern < args.swa_pattern - 1

    def __call__(self, g, x):
        a = self.args
        q, k, v = g.linears(x, [self.wq, self.wk, self.wv])
        q = g.rms_norm(q, self.q_norm, a.norm_eps, heads=a.n_heads)
        k = g.rms_norm(k, self.k_norm, a.norm_eps, heads=a.n_kv_heads)
        base, scale = (a.rope_base_local, 1.0) if self.local else (a.rope_base, a.rope_scale)
        out = g.rope_attention(q, k, v, self.layer, a.n_heads, a.n_kv_heads, a.head_dim, a.rope_dims, base,
                               "neox", pos_scale=scale, scale=a.attn_scale,
                               window=a.sliding_window if self.local else 0)
        return g.linear(out, self.wo)


class Block:
    def __init__(self, args, w, i: int):
        p = f"blk.{i}."
        self.eps = args.norm_eps
        self.attn_norm, self.post_attn_norm = w[p + "attn_norm.weight"], w[p + "post_attention_norm.weight"]
        self.ffn_norm, self.post_ffw_norm = w[p + "ffn_norm.weight"], w[p + "post_ffw_norm.weight"]
        self.attn = Attention(args, w, i)
        self.gate, self.up, self.down = w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"]

    def __call__(self, g, h):
        a = self.attn(g, g.normed(h, self.attn_norm, self.eps))
        g.rms_norm(a, self.post_attn_norm, self.eps, into=h)               # h += norm(attn(norm(h)))
        m = g.linear(g.gated_mlp(g.normed(h, self.ffn_norm, self.eps), self.gate, self.up, act="gelu"), self.down)
        g.rms_norm(m, self.post_ffw_norm, self.eps, into=h)                # h += norm(mlp(norm(h)))
        return h


class Gemma3(Decoder):
    Block = Block

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.args.dim)

    @classmethod
    def read_args(cls, gguf, arch: str, context: int | None = None) -> ModelArgs:
        m = Meta(gguf, arch)
        args = ModelArgs.read(gguf, arch, rope_mode="neox")
        args.norm_eps = m("attention.layer_norm_rms_epsilon", 1e-6)
        args.sliding_window = m("attention.sliding_window", 0)
        args.swa_pattern = m("attention.sliding_window_pattern", 6)    # every sixth layer is global
        args.rope_base_local = float(m("rope.local.freq_base", 10000.0))
        args.attn_scale = 1.0 / math.sqrt(args.head_dim)
        return args

    @classmethod
    def weight_specs(cls, args, present) -> dict:
        specs = head_specs(present)
        specs.update(layer_specs(args, present, LAYER))
        return specs
