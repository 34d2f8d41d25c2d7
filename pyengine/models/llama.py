"""The Llama family: the graph, read off the model.

Llama 2 and 3 (with Llama 3's RoPE frequency factors), SmolLM2, TinyLlama; Qwen2 and Qwen3
(qwen2.py, qwen3.py) are this graph with biases on q, k and v, or RMSNorms on q and k per head.
"""

from __future__ import annotations

from .base import Decoder, ModelArgs, WeightSpec, head_specs, layer_specs

LAYER = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
         "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")


class Attention:
    def __init__(self, args: ModelArgs, w, i: int):
        self.args, self.layer = args, i
        p = f"blk.{i}."
        self.wq, self.wk, self.wv = w[p + "attn_q.weight"], w[p + "attn_k.weight"], w[p + "attn_v.weight"]
        self.wo = w[p + "attn_output.weight"]
        self.bq, self.bk, self.bv = (w.get(p + n) for n in ("attn_q.bias", "attn_k.bias", "attn_v.bias"))
        self.q_norm, self.k_norm = w.get(p + "attn_q_norm.weight"), w.get(p + "attn_k_norm.weight")
        self.freqs = w.get("rope_freqs.weight")

    def __call__(self, g, x, residual):
        a = self.args
        q, k, v = g.linears(x, [self.wq, self.wk, self.wv], [self.bq, self.bk, self.bv])
        if self.q_norm is not None:
            q = g.rms_norm(q, self.q_norm, a.norm_eps, heads=a.n_heads)
            k = g.rms_norm(k, self.k_norm, a.norm_eps, heads=a.n_kv_heads)
        out = g.rope_attention(q, k, v, self.layer, a.n_heads, a.n_kv_heads, a.head_dim, a.rope_dims,
                               a.rope_base, a.rope_mode, freq_factors=self.freqs, pos_scale=a.rope_scale)
        g.linear(out, self.wo, accumulate=residual)


class MLP:
    def __init__(self, w, i: int):
        p = f"blk.{i}."
        self.gate, self.up, self.down = w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"]

    def __call__(self, g, x, residual):
        g.linear(g.gated_mlp(x, self.gate, self.up), self.down, accumulate=residual)


class Block:
    def __init__(self, args: ModelArgs, w, i: int):
        self.eps = args.norm_eps
        self.attn_norm, self.ffn_norm = w[f"blk.{i}.attn_norm.weight"], w[f"blk.{i}.ffn_norm.weight"]
        self.attn, self.mlp = Attention(args, w, i), MLP(w, i)

    def __call__(self, g, h):
        # h += attn(norm(h)); h += mlp(norm(h)): the norms folded into the mat-mats where they can be
        self.attn(g, g.normed(h, self.attn_norm, self.eps), residual=h)
        self.mlp(g, g.normed(h, self.ffn_norm, self.eps), residual=h)
        return h


class Llama(Decoder):
    """token embedding -> N x Block -> RMSNorm -> output head (tied to the embedding if absent)."""

    Block = Block
    rope_mode = "norm"
    optional = ()          # per-layer tensors used when the file has them

    @classmethod
    def read_args(cls, gguf, arch: str, context: int | None = None) -> ModelArgs:
        return ModelArgs.read(gguf, arch, rope_mode=cls.rope_mode)

    @classmethod
    def weight_specs(cls, args: ModelArgs, present) -> dict:
        specs = head_specs(present)
        if "rope_freqs.weight" in present:
            specs["rope_freqs.weight"] = WeightSpec("rope_freqs.weight")
        specs.update(layer_specs(args, present, LAYER, cls.optional))
        return specs
