"""Qwen3: the Llama graph with an RMSNorm on q and on k per head before RoPE (neox), no biases."""

from __future__ import annotations

from .base import layer_specs
from .llama import Llama


class Qwen3(Llama):
    rope_mode = "neox"

    @classmethod
    def weight_specs(cls, args, present) -> dict:
        specs = super().weight_specs(args, present)
        specs.update(layer_specs(args, present, ("attn_q_norm.weight", "attn_k_norm.weight")))
        return specs
