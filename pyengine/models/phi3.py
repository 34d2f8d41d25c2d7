"""Phi-3 and Phi-3.5: the Llama graph (neox RoPE), its q, k, v and gate, up weights fused in the file.

The fused tensors are cut by rows as they are uploaded (q | k | v of attn_qkv, gate | up of
ffn_up), so the graph is Llama's. Long-context files carry RoPE frequency factors: the short
ones below the original training context, the long ones past it, with their attention factor.
"""

from __future__ import annotations

from .base import Meta, ModelArgs, WeightSpec, head_specs
from .llama import Attention, Llama


class Phi3Attention(Attention):
    def __init__(self, args, w, i):
        super().__init__(args, w, i)
        self.freqs = w.get("rope_factors.weight")

    def __call__(self, g, x, residual):
        a = self.args
        q, k, v = g.linears(x, [self.wq, self.wk, self.wv])
        out = g.rope_attention(q, k, v, self.layer, a.n_heads, a.n_kv_heads, a.head_dim, a.rope_dims,
                               a.rope_base, a.rope_mode, freq_factors=self.freqs, attn_factor=a.rope_attn_factor)
        g.linear(out, self.wo, accumulate=residual)


class Phi3(Llama):
    rope_mode = "neox"

    def __init__(self, args, w):
        super().__init__(args, w)
        for i, layer in enumerate(self.layers):
            layer.attn = Phi3Attention(args, w, i)

    @classmethod
    def read_args(cls, gguf, arch, context=None):
        args = ModelArgs.read(gguf, arch, rope_mode="neox")
        m = Meta(gguf, arch)
        original = m("rope.scaling.original_context_length") or args.context_length
        args.rope_long = context is not None and context > original
        args.rope_attn_factor = float(m("rope.scaling.attn_factor", 1.0)) if "rope_factors_long.weight" in \
            gguf.tensors else 1.0
        return args

    @classmethod
    def weight_specs(cls, args, present) -> dict:
        specs = head_specs(present)
        factors = "rope_factors_long.weight" if getattr(args, "rope_long", False) else "rope_factors_short.weight"
        if factors in present:
            specs["rope_factors.weight"] = WeightSpec(factors)
        q, kv, ffn = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_dim
        for i in range(args.n_layers):
            p = f"blk.{i}."
            for n in ("attn_norm.weight", "attn_output.weight", "ffn_norm.weight", "ffn_down.weight"):
                specs[p + n] = WeightSpec(p + n)
            if p + "attn_qkv.weight" in present:
                qkv = p + "attn_qkv.weight"
                specs[p + "attn_q.weight"] = WeightSpec(qkv, 0, q)
                specs[p + "attn_k.weight"] = WeightSpec(qkv, q, kv)
                specs[p + "attn_v.weight"] = WeightSpec(qkv, q + kv, kv)
            else:
                for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight"):
                    specs[p + n] = WeightSpec(p + n)
            if p + "ffn_gate.weight" in present:
                specs[p + "ffn_gate.weight"] = WeightSpec(p + "ffn_gate.weight")
                specs[p + "ffn_up.weight"] = WeightSpec(p + "ffn_up.weight")
            else:
                specs[p + "ffn_gate.weight"] = WeightSpec(p + "ffn_up.weight", 0, ffn)
                specs[p + "ffn_up.weight"] = WeightSpec(p + "ffn_up.weight", ffn, ffn)
        return specs
