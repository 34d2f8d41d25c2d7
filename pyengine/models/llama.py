"""Llama (SmolLM2, TinyLlama, Llama 2 and 3 style GGUFs): the graph, read off the model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LlamaArgs:
    n_layers: int
    dim: int
    ffn_dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    norm_eps: float
    rope_base: float
    rope_dims: int
    context_length: int

    @classmethod
    def from_gguf(cls, g, arch: str = "llama") -> "LlamaArgs":
        def key(name, default=None):
            v = g.get(f"{arch}.{name}", default)
            if v is None:
                from ..errors import GGUFError
                raise GGUFError(f"GGUF metadata key '{arch}.{name}' is missing")
            return v

        dim = key("embedding_length")
        n_heads = key("attention.head_count")
        head_dim = g.get(f"{arch}.attention.key_length") or dim // n_heads
        vocab = g.get(f"{arch}.vocab_size") or len(g.get("tokenizer.ggml.tokens") or []) or \
            g.tensors["token_embd.weight"].shape[1]
        return cls(
            n_layers=key("block_count"),
            dim=dim,
            ffn_dim=key("feed_forward_length"),
            n_heads=n_heads,
            n_kv_heads=g.get(f"{arch}.attention.head_count_kv") or n_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=key("rope.freq_base", 10000.0),
            rope_dims=g.get(f"{arch}.rope.dimension_count") or head_dim,
            context_length=key("context_length", 2048),
        )


class Attention:
    def __init__(self, args: LlamaArgs, w, i: int):
        self.args, self.layer = args, i
        self.wq, self.wk = w[f"blk.{i}.attn_q.weight"], w[f"blk.{i}.attn_k.weight"]
        self.wv, self.wo = w[f"blk.{i}.attn_v.weight"], w[f"blk.{i}.attn_output.weight"]

    def __call__(self, g, x, residual):
        a = self.args
        q, k, v = g.linear(x, self.wq), g.linear(x, self.wk), g.linear(x, self.wv)
        g.rope_kv(q, k, v, self.layer, a.n_heads, a.n_kv_heads, a.head_dim, a.rope_dims, a.rope_base)
        out = g.attention(q, self.layer, a.n_heads, a.n_kv_heads, a.head_dim)
        g.linear(out, self.wo, accumulate=residual)


class MLP:
    def __init__(self, w, i: int):
        self.gate, self.up = w[f"blk.{i}.ffn_gate.weight"], w[f"blk.{i}.ffn_up.weight"]
        self.down = w[f"blk.{i}.ffn_down.weight"]

    def __call__(self, g, x, residual):
        g.linear(g.swiglu(x, self.gate, self.up), self.down, accumulate=residual)


class Block:
    def __init__(self, args: LlamaArgs, w, i: int):
        self.eps = args.norm_eps
        self.attn_norm, self.ffn_norm = w[f"blk.{i}.attn_norm.weight"], w[f"blk.{i}.ffn_norm.weight"]
        self.attn, self.mlp = Attention(args, w, i), MLP(w, i)

    def __call__(self, g, h):
        self.attn(g, g.rms_norm(h, self.attn_norm, self.eps), residual=h)   # h += attn(norm(h))
        self.mlp(g, g.rms_norm(h, self.ffn_norm, self.eps), residual=h)     # h += mlp(norm(h))
        return h


class Llama:
    """token embedding -> N x Block -> RMSNorm -> output head (tied to the embedding if absent)."""

    Args = LlamaArgs

    def __init__(self, args: LlamaArgs, w):
        self.args = args
        self.tok_embd = w["token_embd.weight"]
        self.layers = [Block(args, w, i) for i in range(args.n_layers)]
        self.norm = w["output_norm.weight"]
        self.output = w.get("output.weight") or self.tok_embd

    def __call__(self, g):
        h = g.embed(self.tok_embd)
        for layer in self.layers:
            h = layer(g, h)
        g.logits(g.rms_norm(h, self.norm, self.args.norm_eps, last_row=True), self.output)

    @staticmethod
    def weight_names(args: LlamaArgs, present) -> list[str]:
        names = ["token_embd.weight", "output_norm.weight"]
        if "output.weight" in present:
            names.append("output.weight")
        for i in range(args.n_layers):
            names += [f"blk.{i}.{n}.weight" for n in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
        return names
