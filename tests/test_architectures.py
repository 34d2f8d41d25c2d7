"""Every architecture and quant type on tiny GGUFs with random weights, against the numpy reference."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ggufs import write_tiny_llama
from pyengine import tuning
from pyengine.engine import Engine
from pyengine.sampling import SamplingParams
from reference import Reference

K_TYPES = {"token_embd": "Q8_0", "output": "Q6_K", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K",
           "attn_output": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q5_K", "ffn_down": "Q6_K"}
SMALL_TYPES = {"token_embd": "BF16", "output": "Q5_1", "attn_q": "Q5_0", "attn_k": "Q5_1", "attn_v": "BF16",
               "attn_output": "Q5_0", "ffn_gate": "Q5_1", "ffn_up": "Q5_0", "ffn_down": "F32"}

MODELS = {
    # Llama 3 style: frequency factors, the K-quants of a Q4_K_M file
    "llama3": dict(arch="llama", dim=256, n_heads=4, n_kv_heads=2, ffn=512, rope_freqs=True, qtypes=K_TYPES,
                   rope_base=500000.0),
    # q, k and v of one type: one fused mat-vec in decode, which takes RoPE in where the cache lies in textures
    "llama3-q4": dict(arch="llama", dim=256, n_heads=4, n_kv_heads=2, ffn=512, rope_freqs=True, rope_base=500000.0,
                      qtypes={"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1"}),
    "qwen2": dict(arch="qwen2", qtypes=SMALL_TYPES, tied=True),
    "qwen3": dict(arch="qwen3", dim=256, n_heads=4, n_kv_heads=2, head_dim=64, ffn=512, qtypes=K_TYPES,
                  rope_base=1e6),
    # global layer 1 and sliding-window layer 0 (8 keys), query width 512 != dim
    "gemma3": dict(arch="gemma3", dim=256, n_heads=4, n_kv_heads=1, head_dim=128, ffn=512, tied=True,
                   qtypes={**K_TYPES, "attn_q": "Q5_0", "ffn_up": "Q5_0"}, rope_base=1e6),
    "phi3": dict(arch="phi3", qtypes={"attn_q": "Q8_0", "ffn_up": "F16"}),
}
PROMPT = "the sea and the wind and the stars over the hills"    # 30 tokens or so: past the window
ATOL = 2e-3


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory, backend):
    path = str(write_tiny_llama(tmp_path_factory.mktemp(request.param) / "m.gguf", **MODELS[request.param]))
    engine = Engine.load(path, backend, context_length=128)
    engine.gguf_path = path
    yield request.param, engine, Reference(path)
    engine.close()


def test_logits_match_the_reference_at_every_position(model):
    name, engine, ref = model
    ids = engine.tokenizer.encode(PROMPT)
    assert len(ids) > 20
    ref.reset()
    want = [ref.forward(t) for t in ids]
    for n in (1, 5, 9, len(ids)):
        got = np.array(asyncio.run(engine.logits(ids[:n])))
        assert np.abs(got - want[n - 1]).max() < ATOL * max(1.0, np.abs(want[n - 1]).max()), (name, n)


def test_greedy_continuation_matches_the_reference(model):
    name, engine, ref = model
    ids = engine.tokenizer.encode(PROMPT)
    gen = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))

    async def go():
        async for _ in gen:
            pass
    engine.reset()
    asyncio.run(go())
    assert gen.tokens == ref.greedy(ids, 16), name


def test_decode_folds_rope_into_another_dispatch_where_it_can(model):
    """Decode RoPE and the cache write, without a dispatch of their own where they can:
    - a cache in buffers: in the attention, on CPU adapters, whose decode attention workgroup takes up to
      4 query heads of one kv head (within 8 KB of partial outputs) where that is all of them (Gemma 3
      here has 4 heads of 128 dimensions on its one kv head, 2 a workgroup, so RoPE keeps its dispatch);
    - a cache in textures (CPU adapters unless PYENGINE_KV=buffers), which a dispatch cannot write and
      read: in the mat-vec of q, k and v where one makes all three (one quant type, no bias, no q and
      k norms) and RoPE rotates "norm" pairs (the Llama family's)."""
    name, engine, _ = model
    dispatches = engine.decode_plan.dispatches
    families = [d.family for d in dispatches]
    layers = engine.args.n_layers
    assert families.count("attention") == layers
    textures = engine.state.kv.textures
    if textures:
        folded = name == "llama3-q4"
        assert sum(d.label.endswith(" rope") for d in dispatches if d.family == "matvec") == (layers if folded else 0)
    else:
        folded = name != "gemma3" and tuning.is_cpu(engine.backend)
    assert families.count("rope") == (0 if folded else layers), (name, families)


def test_prefill_in_chunks_equals_one_plan(model, backend):
    name, engine, _ = model
    ids = engine.tokenizer.encode(PROMPT)
    whole = np.array(asyncio.run(engine.logits(ids)))
    chunked = Engine.load(engine.gguf_path, backend, context_length=128, max_chunk=7)   # chunks straddle the window
    got = np.array(asyncio.run(chunked.logits(ids)))
    chunked.close()
    np.testing.assert_allclose(got, whole, atol=1e-4)
