"""What every architecture shares: hyper-parameters read from GGUF metadata, and weight specs.

A weight spec names the GGUF tensor a model weight comes from, or a run of its rows: fused
tensors (Phi-3's attn_qkv and gate+up) are cut into ordinary weights as they are uploaded,
so a graph never deals with offsets into a fused buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GGUFError


@dataclass(frozen=True)
class WeightSpec:
    tensor: str
    row0: int = 0
    rows: int | None = None      # None: every row


class Meta:
    """`{arch}.key` lookups with clear errors for required keys."""

    def __init__(self, gguf, arch: str):
        self.g, self.arch = gguf, arch

    def __call__(self, key: str, default=None, required: bool = False):
        v = self.g.get(f"{self.arch}.{key}")
        if v is None:
            if required:
                raise GGUFError(f"GGUF metadata key '{self.arch}.{key}' is missing")
            return default
        return v


@dataclass
class ModelArgs:
    """The hyper-parameters of a decoder-only transformer, named once."""

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
    rope_mode: str = "norm"          # "norm": pairs (2i, 2i+1); "neox": pairs (i, i + d/2)
    rope_scale: float = 1.0          # linear RoPE scaling: positions are multiplied by this

    @classmethod
    def read(cls, g, arch: str, **extra) -> "ModelArgs":
        m = Meta(g, arch)
        dim = m("embedding_length", required=True)
        n_heads = m("attention.head_count", required=True)
        head_dim = m("attention.key_length") or dim // n_heads
        vocab = m("vocab_size") or len(g.get("tokenizer.ggml.tokens") or []) or \
            g.tensors["token_embd.weight"].shape[1]
        factor = m("rope.scaling.factor")
        scale = 1.0 / factor if m("rope.scaling.type") == "linear" and factor else 1.0
        return cls(
            n_layers=m("block_count", required=True),
            dim=dim,
            ffn_dim=m("feed_forward_length", required=True),
            n_heads=n_heads,
            n_kv_heads=m("attention.head_count_kv") or n_heads,
            head_dim=head_dim,
            vocab_size=vocab,
            norm_eps=m("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=m("rope.freq_base", 10000.0),
            rope_dims=m("rope.dimension_count") or head_dim,
            context_length=m("context_length", 2048),
            rope_scale=scale,
            **extra,
        )


def layer_specs(args, present, names: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """Specs for blk.{i}.{name}.weight of every layer (and the optional ones the file has)."""
    out = {}
    for i in range(args.n_layers):
        for n in names:
            key = f"blk.{i}.{n}"
            out[key] = WeightSpec(key)
        for n in optional:
            key = f"blk.{i}.{n}"
            if key in present:
                out[key] = WeightSpec(key)
    return out


def head_specs(present) -> dict:
    """The token embedding, the final norm, and the output head when it is not tied to the embedding."""
    out = {n: WeightSpec(n) for n in ("token_embd.weight", "output_norm.weight")}
    if "output.weight" in present:
        out["output.weight"] = WeightSpec("output.weight")
    return out


class Decoder:
    """token embedding -> N x Block -> RMSNorm -> output head (tied to the embedding if absent).
    An architecture names its Block and, if it scales its embeddings, embed_scale."""

    Block = None

    def __init__(self, args, w):
        self.args = args
        self.tok_embd = w["token_embd.weight"]
        self.layers = [self.Block(args, w, i) for i in range(args.n_layers)]
        self.norm = w["output_norm.weight"]
        self.output = w.get("output.weight") or self.tok_embd

    @property
    def embed_scale(self) -> float:
        return 1.0

    def __call__(self, g):
        h = g.embed(self.tok_embd, scale=self.embed_scale)
        for layer in self.layers:
            h = layer(g, h)
        g.logits(g.rms_norm(h, self.norm, self.args.norm_eps, last_row=True), self.output)
