"""Qwen2 and Qwen2.5: the Llama graph with biases on q, k and v, and RoPE on halves (neox)."""

from __future__ import annotations

from .llama import Llama


class Qwen2(Llama):
    rope_mode = "neox"
    optional = ("attn_q.bias", "attn_k.bias", "attn_v.bias")
