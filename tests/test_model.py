"""Whole models against the numpy reference: logits, greedy continuations, and the generation contract."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from ggufs import write_tiny_llama
from pyengine.engine import Engine
from pyengine.errors import ContextOverflowError, UnsupportedModelError
from pyengine.sampling import SamplingParams
from reference import Reference

# Logits agree to 5e-5 on SmolLM2 (fp32 on both sides; only the order of summation
# differs, through 30 layers). The bound leaves 40x room for other adapters'
# reduction orders while staying 20x below the 0.08 gap between the top two
# logits of the closest case we know ("What is the capital of France?").
LOGIT_ATOL = 2e-3

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three fruits.",
    "Explain gravity to a child in two sentences.",
]


def collect(gen):
    async def go():
        return [piece async for piece in gen]
    return asyncio.run(go())


def greedy(engine, prompt_ids, n):
    gen = engine.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    collect(gen)
    return gen.tokens


def test_logits_match_reference_at_several_positions(engine, reference):
    ids = engine.chat_prompt([{"role": "user", "content": CHAT_PROMPTS[0]}])
    reference.reset()
    ref = [reference.forward(t) for t in ids]
    for n in (1, 2, 9, 20, len(ids)):
        got = np.array(asyncio.run(engine.logits(ids[:n])))
        assert np.abs(got - ref[n - 1]).max() < LOGIT_ATOL, n
        assert got.argmax() == ref[n - 1].argmax()


@pytest.mark.parametrize("prompt", CHAT_PROMPTS)
def test_greedy_continuation_matches_reference_for_32_tokens(engine, reference, prompt):
    ids = engine.chat_prompt([{"role": "user", "content": prompt}])
    engine.reset()
    assert greedy(engine, ids, 32) == reference.greedy(ids, 32)


def test_prefill_plans_keep_within_the_stated_working_memory(engine):
    """The scratch buffers of the prefill plans, up to the largest chunk, fit in the working memory that
    memory_plan states: a layer's activations reuse the buffers of the layer before."""
    for n in (16, 200, engine.max_chunk):
        asyncio.run(engine._prefill_plan(n))
    assert 0 < engine.state.pool.nbytes <= engine.memory["working"]


def test_capital_of_france(engine):
    gen = engine.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0.0)
    text = "".join(collect(gen))
    assert text == gen.text
    assert "Paris" in text
    assert gen.finish_reason == "stop"
    assert gen.usage.prompt_tokens == len(engine.chat_prompt([{"role": "user", "content":
                                                               "What is the capital of France?"}]))
    assert gen.usage.completion_tokens == len(gen.tokens)
    assert gen.timings.prefill_tok_s > 0 and gen.timings.decode_tok_s > 0


# -- tiny random models: every quant type through the whole graph ---------------------

TINY_VARIANTS = {
    "mixed": {},
    "all-q4_0": {k: "Q4_0" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                      "ffn_down", "token_embd", "output")},
    "all-f32": {k: "F32" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                    "ffn_down", "token_embd", "output")},
    "q8-f16-mix": {"ffn_gate": "F16", "ffn_up": "Q8_0", "token_embd": "Q8_0", "output": "Q4_1"},
}


@pytest.fixture(scope="module", params=sorted(TINY_VARIANTS))
def tiny(request, tmp_path_factory, backend):
    tied = request.param == "q8-f16-mix"
    path = write_tiny_llama(tmp_path_factory.mktemp("tiny") / f"{request.param}.gguf",
                            qtypes=TINY_VARIANTS[request.param], tied=tied, seed=len(request.param))
    return Engine.load(path, backend, context_length=96, max_chunk=32), Reference(str(path))


def test_tiny_model_logits_at_every_position(tiny):
    engine, ref = tiny
    ids = list(np.random.default_rng(0).integers(0, 300, 40))
    ref.reset()
    expect = [ref.forward(int(t)) for t in ids]
    got = np.array(asyncio.run(engine.logits([int(t) for t in ids])))   # 40 tokens: two chunks of 32
    assert np.abs(got - expect[-1]).max() < LOGIT_ATOL
    for n in (1, 7, 33):
        got = np.array(asyncio.run(engine.logits([int(t) for t in ids[:n]])))
        assert np.abs(got - expect[n - 1]).max() < LOGIT_ATOL


def test_tiny_model_greedy_matches_reference(tiny):
    engine, ref = tiny
    ids = [5, 17, 260, 42, 99, 3]
    engine.reset()
    assert greedy(engine, ids, 40) == ref.greedy(ids, 40)


def test_penalties_match_reference(tiny):
    """Greedy with repetition, presence and frequency penalties over the completion's tokens."""
    engine, ref = tiny
    rep, pres, freq = 1.5, 0.5, 0.3
    ids = [5, 17, 260, 42]
    ref.reset()
    for t in ids:
        logits = ref.forward(t)
    counts: dict[int, int] = {}
    expect = []
    for _ in range(24):
        l = logits.astype(np.float32).copy()
        for t, c in counts.items():
            l[t] = l[t] / rep if l[t] > 0 else l[t] * rep
            l[t] -= pres + freq * c
        t = int(np.argmax(l))
        expect.append(t)
        counts[t] = counts.get(t, 0) + 1
        logits = ref.forward(t)
    engine.reset()
    gen = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                              repetition_penalty=rep, presence_penalty=pres,
                                              frequency_penalty=freq))
    collect(gen)
    assert gen.tokens == expect


def test_chunked_prefill_equals_one_plan(tiny_llama, backend):
    ids = list(range(3, 83))
    a = Engine.load(tiny_llama, backend, context_length=128, max_chunk=16)
    b = Engine.load(tiny_llama, backend, context_length=128, max_chunk=128)
    np.testing.assert_allclose(asyncio.run(a.logits(ids)), asyncio.run(b.logits(ids)), atol=1e-4)


def test_a_load_compiles_every_kernel_a_prompt_of_any_length_runs(tiny_llama, backend, monkeypatch):
    """The load starts compiling the prefill's kernels with the decode's (they compile while the caller goes
    on: Engine.compiled waits for them), so no first request compiles for itself (seconds on a browser's
    CPU adapter), and prompts of other lengths, whose plans hold more tokens, run the same kernels: the
    first compile after those the load started fails this test."""
    engine = Engine.load(tiny_llama, backend, context_length=256, max_chunk=64)
    asyncio.run(engine.compiled())

    def refuse(*a, **kw):
        raise AssertionError(f"a kernel compiled after the load: {a[-1] if a else kw}")

    monkeypatch.setattr(engine.backend, "create_pipeline", refuse)
    for n in (3, 17, 40, 150):          # plans of 16, 32 and 64 tokens, the last one twice over
        engine.reset()
        assert len(asyncio.run(engine.logits(list(range(3, 3 + n))))) == engine.args.vocab_size
    assert sorted(engine._prefill_plans) == [16, 32, 64]


# -- the generation contract ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_engine(tiny_llama, backend):
    return Engine.load(tiny_llama, backend, context_length=64)


def test_same_seed_same_output_and_seeds_differ(tiny_engine):
    def sample(seed):
        gen = tiny_engine.generate([5, 6, 7], SamplingParams(temperature=1.0, top_p=1.0, seed=seed,
                                                             max_tokens=30, ignore_eos=True))
        collect(gen)
        return gen.tokens

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_top_k_one_is_greedy(tiny_engine):
    gen = tiny_engine.generate([5, 6, 7], SamplingParams(temperature=0.9, top_k=1, seed=3, max_tokens=20,
                                                         ignore_eos=True))
    collect(gen)
    assert gen.tokens == greedy(tiny_engine, [5, 6, 7], 20)


class StepSpy:
    """Counts the host's writes of the step header and the decode steps queued on `engine`."""

    def __init__(self, engine, monkeypatch):
        be, step, plan = engine.backend, engine.state.step, engine.decode_plan
        self.writes = self.decodes = 0
        real_write, real_later = be.write_buffer, be.submit_and_read_later

        def write_buffer(buf, offset, data):
            self.writes += buf is step
            return real_write(buf, offset, data)

        def submit_and_read_later(p, *a):
            self.decodes += p is plan
            return real_later(p, *a)
        monkeypatch.setattr(be, "write_buffer", write_buffer)
        monkeypatch.setattr(be, "submit_and_read_later", submit_and_read_later)


def test_greedy_decode_steps_chain_on_the_gpu(tiny_engine, monkeypatch):
    """Greedy decoding writes the step header once, for the first token: each later step takes the
    best candidate of the one before on the GPU, queued before the host reads that one; none is
    queued past max_tokens, and the tokens are those of sampling with top_k=1 (a step the host writes)."""
    want = collect_tokens(tiny_engine, [5, 6, 7], SamplingParams(temperature=0.9, top_k=1, seed=1, max_tokens=20,
                                                                 ignore_eos=True))
    spy = StepSpy(tiny_engine, monkeypatch)
    tiny_engine.reset()
    assert greedy(tiny_engine, [5, 6, 7], 20) == want
    assert (spy.writes, spy.decodes) == (2, 19)        # the prompt's, the first decode step's; 19 steps


def test_a_chained_step_the_host_disagrees_with_is_replaced(tiny_engine, monkeypatch):
    """Where the GPU's pick (the record's first pair) is not the host's, the queued step is dropped
    and the host's token goes in a step it writes: the tokens do not change."""
    want = greedy(tiny_engine, [9, 4, 2], 12)
    monkeypatch.setattr(Engine, "_best_index", staticmethod(lambda raw: 1 << 30))
    spy = StepSpy(tiny_engine, monkeypatch)
    tiny_engine.reset()
    assert greedy(tiny_engine, [9, 4, 2], 12) == want
    assert spy.writes == 12                             # the prompt's and each of the 11 decode steps'
    assert spy.decodes == 11 + 10                       # and the 10 chained ones, dropped


def test_a_step_queued_past_a_stop_changes_no_later_answer(tiny_engine, monkeypatch):
    """A greedy answer that stops on an end token leaves one step queued past it (cache, counts and
    step header written): the next answer, reusing the cached prefix, with penalties, is the one a
    fresh start gives."""
    prompt = [5, 17, 60, 42]
    pen = dict(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.4)
    tiny_engine.reset()
    full = greedy(tiny_engine, prompt, 10)
    tiny_engine.reset()
    want = collect_tokens(tiny_engine, prompt + full[:3], SamplingParams(**pen))
    tiny_engine.reset()
    monkeypatch.setattr(tiny_engine.tokenizer, "stop_ids", frozenset([full[5]]))
    gen = tiny_engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10))
    collect(gen)
    monkeypatch.undo()
    assert gen.finish_reason == "stop" and gen.tokens == full[:full.index(full[5]) + 1]
    assert collect_tokens(tiny_engine, prompt + full[:3], SamplingParams(**pen)) == want


def collect_tokens(engine, ids, params):
    gen = engine.generate(ids, params)
    collect(gen)
    return gen.tokens


def test_sampling_follows_the_model_distribution(tiny_engine, tiny_llama):
    """First-token frequencies over many seeds match softmax(logits / T) restricted by top-k."""
    ids = [9, 8, 7]
    logits = np.array(asyncio.run(tiny_engine.logits(ids)), np.float64)
    t, k = 0.8, 5
    top = np.argsort(-logits, kind="stable")[:k]
    p = np.exp((logits[top] - logits[top].max()) / t)
    p /= p.sum()
    hits = dict.fromkeys(top.tolist(), 0)
    n = 300
    for seed in range(n):
        gen = tiny_engine.generate(ids, SamplingParams(temperature=t, top_k=k, seed=seed, max_tokens=1))
        collect(gen)
        assert gen.tokens[0] in hits
        hits[gen.tokens[0]] += 1
    freq = np.array([hits[i] for i in top.tolist()]) / n
    assert np.abs(freq - p).max() < 0.1


def test_max_tokens_and_streaming(tiny_engine):
    gen = tiny_engine.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    pieces = collect(gen)
    assert gen.finish_reason == "length"
    assert gen.usage.completion_tokens == 12 and len(gen.tokens) == 12
    assert "".join(pieces) == gen.text == tiny_engine.tokenizer.decode(gen.tokens, skip_special=True)


def test_stop_string_ends_the_answer_before_it(engine):
    gen = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, stop=["Paris"]))
    text = "".join(collect(gen))
    assert gen.finish_reason == "stop"
    assert text == "The capital of France is "


def test_prompt_longer_than_context_is_refused_with_both_lengths(tiny_engine):
    with pytest.raises(ContextOverflowError, match="100 tokens.*holds 64"):
        collect(tiny_engine.generate(list(range(100)), SamplingParams(temperature=0.0)))


def test_generation_stops_when_the_context_is_full(tiny_engine):
    gen = tiny_engine.generate(list(range(3, 60)), SamplingParams(temperature=0.0, ignore_eos=True))
    collect(gen)
    assert gen.finish_reason == "length"
    assert gen.usage.prompt_tokens + gen.usage.completion_tokens == 65   # the last token is never fed


def test_next_turn_reuses_the_cached_prefix(tiny_llama, backend):
    e = Engine.load(tiny_llama, backend, context_length=128)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    turn1 = [{"role": "user", "content": "the cat"}]
    g1 = e.chat(turn1, params)
    collect(g1)
    turn2 = turn1 + [{"role": "assistant", "content": g1.text}, {"role": "user", "content": "and the dog"}]
    g2 = e.chat(turn2, params)
    collect(g2)
    assert g2.usage.cached_tokens >= len(e.chat_prompt(turn1))
    fresh = Engine.load(tiny_llama, backend, context_length=128)
    g3 = fresh.chat(turn2, params)
    collect(g3)
    assert g2.tokens == g3.tokens


def test_unsupported_architecture_and_quant_type_are_named(tmp_path, backend):
    path = write_tiny_llama(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(UnsupportedModelError,
                       match="architecture .mamba.*supported: gemma3, llama, phi3, qwen2, qwen3"):
        Engine.load(path, backend)
    path = write_tiny_llama(tmp_path / "mx.gguf", qtypes={"attn_q": "MXFP4"})
    with pytest.raises(UnsupportedModelError,
                       match="blk.0.attn_q.weight.*MXFP4.*supported: F32, F16, BF16, Q4_0"):
        Engine.load(path, backend)


def kv_layer_bytes(context, textures, kv_heads=1, head_dim=32):
    """A layer's k (or v) cache in f32: whole texture rows of 1024 vec4 texels, or a buffer of the values."""
    if textures:
        return -(-context * kv_heads * head_dim // 4 // 1024) * 1024 * 16
    return context * kv_heads * head_dim * 4


def test_kv_cache_is_sized_from_the_context_option(tiny_llama, backend):
    e = Engine.load(tiny_llama, backend, context_length=50)
    assert e.state.kv.context == 50
    # textures where this adapter reads them faster (CPU adapters, unless PYENGINE_KV says otherwise)
    assert e.state.kv.textures == e.kernels.kv_textures
    assert e.state.kv.nbytes == 2 * 2 * kv_layer_bytes(50, e.state.kv.textures)   # k and v, 2 layers, 1 kv head of 32
    e.close()


def test_a_cache_too_big_for_one_texture_lies_in_buffers_and_changes_no_token(tiny_llama, backend, monkeypatch):
    monkeypatch.setenv("PYENGINE_KV", "textures")
    e = Engine.load(tiny_llama, backend, context_length=300)      # 300 positions of 8 texels: 3 rows
    ids = e.tokenizer.encode("the cat sat on the mat")
    want = np.array(asyncio.run(e.logits(ids)))
    want_tokens = greedy(e, ids, 8)
    assert e.state.kv.textures
    e.close()
    monkeypatch.setattr(backend, "max_texture_rows", 2)
    small = Engine.load(tiny_llama, backend, context_length=300)
    assert not small.state.kv.textures and small.state.kv.nbytes == 2 * 2 * kv_layer_bytes(300, False)
    np.testing.assert_allclose(np.array(asyncio.run(small.logits(ids))), want, atol=1e-5)
    assert greedy(small, ids, 8) == want_tokens
    small.close()


def test_a_small_binding_limit_splits_big_tensors_and_changes_no_logit(tiny_llama, backend, monkeypatch):
    whole = Engine.load(tiny_llama, backend, context_length=64)
    ids = whole.tokenizer.encode("the cat sat on the mat")
    want = np.array(asyncio.run(whole.logits(ids)))
    want_tokens = greedy(whole, ids, 8)
    whole.close()
    monkeypatch.setattr(backend, "max_storage_binding", 16384)   # a phone-sized limit, scaled to the model
    split = Engine.load(tiny_llama, backend, context_length=64)
    assert len(split.weights["token_embd.weight"].parts) == 2 and len(split.weights["output.weight"].parts) == 4
    np.testing.assert_allclose(np.array(asyncio.run(split.logits(ids))), want, atol=1e-5)
    assert greedy(split, ids, 8) == want_tokens
    split.close()


def test_the_memory_a_model_needs_is_stated_before_loading_and_a_limit_refuses_it(tiny_llama, backend):
    from pyengine.errors import GPUError
    from pyengine.gguf import read_gguf

    g = read_gguf(tiny_llama)
    unloaded = Engine(g, backend, context_length=64)               # nothing uploaded yet
    plan = unloaded.memory_plan()
    unloaded.close()
    assert plan["weights"] > 0 and plan["kv_cache"] == 2 * 2 * kv_layer_bytes(64, unloaded.kernels.kv_textures)
    assert plan["total"] == plan["weights"] + plan["kv_cache"] + plan["working"] + plan["upload_staging"]
    with pytest.raises(GPUError, match=r"this model needs \d+ MB of GPU memory .* but the limit is 0 MB"):
        Engine(g, backend, context_length=64, gpu_memory_limit=100_000)
    loaded = Engine.load(tiny_llama, backend, context_length=64)
    assert loaded.memory["weights"] == sum(w.allocated for w in loaded.weights.values())
    assert loaded.memory["kv_cache"] == loaded.state.kv.nbytes
    loaded.close()
