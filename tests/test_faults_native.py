"""Faults natively: interrupts at every stage, requests that arrive together, prompts longer than the
context, and a GPU that refuses an allocation half-way through a load."""

from __future__ import annotations

import asyncio

import pytest

from conftest import run
from pyengine.engine import Engine
from pyengine.errors import ContextOverflowError, EngineBusyError, GPUError, RequestError
from pyengine.sampling import SamplingParams

GREEDY = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
LONG = "Tell me about the sea, the wind and the stars. " * 2   # several 16-token prefill chunks


async def answer(engine, content, **kw):
    gen = engine.chat([{"role": "user", "content": content}], SamplingParams(**{**GREEDY, **kw}))
    async for _ in gen:
        pass
    return gen


@pytest.fixture
def fresh(tiny_llama, backend):
    """What a fresh engine answers, and an engine with small prefill chunks to interrupt."""
    clean = Engine.load(tiny_llama, backend, context_length=256, max_chunk=16)
    expected = {q: run(answer(clean, q)).tokens for q in (LONG, "hello")}
    clean.close()
    engine = Engine.load(tiny_llama, backend, context_length=256, max_chunk=16)
    yield engine, expected
    engine.close()


def test_interrupt_between_prefill_chunks_leaves_the_engine_consistent(fresh, monkeypatch):
    engine, expected = fresh
    be = engine.backend
    calls = {"n": 0}
    real_sync = be.sync

    async def sync_then_interrupt():
        await real_sync()
        calls["n"] += 1
        if calls["n"] == 2:          # a message from the page arrives after the second chunk
            engine.interrupt()

    monkeypatch.setattr(be, "sync", sync_then_interrupt)
    gen = run(answer(engine, LONG))
    monkeypatch.undo()
    assert gen.finish_reason == "abort" and gen.tokens == [] and gen.text == ""
    assert len(engine._cached) == 32          # exactly the two chunks that ran
    assert run(answer(engine, LONG)).tokens == expected[LONG]
    assert run(answer(engine, "hello")).tokens == expected["hello"]


def test_interrupt_before_the_first_token(fresh, monkeypatch):
    engine, expected = fresh
    be = engine.backend
    real = be.submit_and_read

    async def read_then_interrupt(*a):
        out = await real(*a)
        engine.interrupt()           # arrives while the last prefill chunk is read back
        return out

    monkeypatch.setattr(be, "submit_and_read", read_then_interrupt)
    gen = run(answer(engine, "hello"))
    monkeypatch.undo()
    assert gen.finish_reason == "abort" and gen.tokens == []
    assert run(answer(engine, "hello")).tokens == expected["hello"]


def test_interrupt_during_decode(fresh):
    engine, expected = fresh

    async def go():
        gen = engine.chat([{"role": "user", "content": LONG}], SamplingParams(**{**GREEDY, "max_tokens": 50}))
        async for _ in gen:
            if len(gen.tokens) == 3:
                engine.interrupt()
        return gen

    gen = run(go())
    assert gen.finish_reason == "abort" and len(gen.tokens) == 3
    assert run(answer(engine, "hello")).tokens == expected["hello"]
    assert run(answer(engine, LONG)).tokens == expected[LONG]


def test_a_stream_left_half_read_releases_the_engine(fresh):
    engine, expected = fresh

    async def go():
        gen = engine.chat([{"role": "user", "content": LONG}], SamplingParams(**{**GREEDY, "max_tokens": 40}))
        it = gen.__aiter__()
        await it.__anext__()
        await it.aclose()            # what `break` does once the generator is collected
        return (await answer(engine, "hello")).tokens

    assert run(go()) == expected["hello"]


def test_requests_arriving_together_run_in_order_never_interleaved(fresh):
    engine, expected = fresh
    order = []

    async def one(q, tag):
        gen = engine.chat([{"role": "user", "content": q}], SamplingParams(**GREEDY))
        async for _ in gen:
            order.append(tag)
            await asyncio.sleep(0)   # give the other request every chance to cut in
        return gen.tokens

    async def both():
        return await asyncio.gather(one(LONG, "a"), one("hello", "b"))

    a, b = run(both())
    assert a == expected[LONG] and b == expected["hello"]
    assert order == sorted(order)    # all of a's pieces, then all of b's


def test_a_rejecting_engine_refuses_a_second_request(tiny_llama, backend):
    engine = Engine.load(tiny_llama, backend, context_length=128, on_busy="reject")

    async def both():
        first = engine.chat([{"role": "user", "content": "hi"}], SamplingParams(**GREEDY))
        it = first.__aiter__()
        await it.__anext__()         # the first request holds the engine now
        with pytest.raises(EngineBusyError, match="another request is running"):
            await answer(engine, "hello")
        async for _ in it:
            pass
        return (await answer(engine, "hello")).finish_reason   # free again afterwards

    assert run(both()) == "length"
    engine.close()


def test_truncation_auto_drops_the_oldest_turns(tiny_llama, backend):
    engine = Engine.load(tiny_llama, backend, context_length=128)
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(12):
        msgs += [{"role": "user", "content": f"question {i} about the sea"},
                 {"role": "assistant", "content": f"answer {i} about the wind"}]
    msgs.append({"role": "user", "content": "the last question"})
    with pytest.raises(ContextOverflowError, match=r"the prompt has (\d+) tokens but the context holds 128"):
        run(_chat(engine, msgs, "disabled"))
    gen = run(_chat(engine, msgs, "auto"))
    assert gen.usage.prompt_tokens <= 128 - 6 and gen.usage.completion_tokens == 6
    text = engine.tokenizer.decode(gen.prompt_tokens)
    assert text.startswith("<|im_start|>system\nbe brief") and "the last question" in text
    assert "question 0 " not in text and "<|im_start|>user" in text.split("be brief")[1][:30]
    # a single message longer than the context keeps its end
    gen = run(_chat(engine, [{"role": "user", "content": "word " * 400 + "THE END"}], "auto"))
    assert gen.usage.prompt_tokens <= 122 and "THE END" in engine.tokenizer.decode(gen.prompt_tokens)
    # plain text keeps its last tokens
    g = engine.generate("one two three " * 100, SamplingParams(**GREEDY, truncation="auto"))
    assert len(g.prompt_tokens) == 122
    with pytest.raises(RequestError, match="truncation: must be one of disabled, auto"):
        SamplingParams(truncation="middle")
    engine.close()


async def _chat(engine, msgs, truncation):
    gen = engine.chat(msgs, SamplingParams(**GREEDY, truncation=truncation))
    async for _ in gen:
        pass
    return gen


def test_an_allocation_failure_mid_load_frees_everything_and_a_new_engine_works(tiny_llama, backend, monkeypatch):
    good = Engine.load(tiny_llama, backend, context_length=128)
    want = run(answer(good, "hello")).tokens
    good.close()
    nbytes = backend.bytes_allocated
    real = backend.create_buffer
    made = []                        # held here, so that no other buffer can take one's id

    def failing(size, label="", kind="storage"):
        if len(made) == 11:          # part-way through the weights
            raise GPUError(f"could not allocate {size} bytes of GPU memory for '{label}': out of memory")
        made.append(real(size, label, kind))
        return made[-1]

    monkeypatch.setattr(backend, "create_buffer", failing)
    with pytest.raises(GPUError, match="out of memory"):
        Engine.load(tiny_llama, backend, context_length=128)
    monkeypatch.undo()
    assert len(made) == 11
    assert [b.label for b in made if id(b) in backend._live] == []
    assert backend.bytes_allocated == nbytes
    again = Engine.load(tiny_llama, backend, context_length=128)
    assert run(answer(again, "hello")).tokens == want
    again.close()


def test_invalid_utf8_on_the_command_line_is_replaced_not_fatal(tiny_llama):
    import os
    import subprocess
    import sys

    arg = b"caf\xe9 \xff\xfe ok"      # Latin-1 bytes: not UTF-8
    r = subprocess.run([sys.executable, "-m", "pyengine", "generate", "--model", tiny_llama, "--temperature", "0",
                        "--max-tokens", "3", "--raw", os.fsdecode(arg)], capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    r = subprocess.run([sys.executable, "-m", "pyengine", "tokenize", "--model", tiny_llama, os.fsdecode(arg)],
                       capture_output=True)
    assert r.returncode == 0 and r.stdout.startswith(b"[")


def test_kernels_compiled_side_by_side_come_back_in_order_and_a_broken_one_is_named(backend):
    """Natively the load compiles its kernels on a thread a core (NativeBackend.create_pipelines): each
    pipeline must land in its own place, and a kernel that does not compile must fail the compile with
    its own name, not another's."""
    def kernel(value: int, broken: bool = False) -> str:
        body = "out[0] = undefined_name;" if broken else f"out[0] = {value}u;"
        return ("@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n"
                f"@compute @workgroup_size(1) fn main() {{ {body} }}\n")

    from pyengine.gpu import Binding, Dispatch

    sources = [(kernel(v), {}, f"k{v}") for v in range(8)]
    async def wait(pending):
        return await pending

    pipes = run(wait(backend.start_pipelines(sources)))
    buf = backend.create_buffer(16, "out")
    try:
        for v, pipe in enumerate(pipes):
            plan = backend.create_plan([Dispatch(pipe, {0: Binding(buf)}, (1, 1, 1), "k")])
            assert int.from_bytes(run(backend.submit_and_read(plan, buf, 0, 4)), "little") == v
    finally:
        backend.destroy_buffer(buf)
    broken = sources[:3] + [(kernel(0, broken=True), {}, "the-broken-one")] + sources[3:]
    pending = backend.start_pipelines(broken)
    with pytest.raises(GPUError, match="the-broken-one"):
        run(wait(pending))


def test_a_native_load_returns_while_the_prefill_compiles_and_the_first_prefill_waits_for_it(tiny_llama, backend):
    """Natively the prefill's kernels compile on a thread of their own once the load has started them
    (NativeBackend.start_pipelines): the load returns without waiting for them, the first prefill waits
    and gives the logits a load that waited gives; a kernel of theirs that does not compile fails that
    prefill with its name; a backend destroyed while they compile lets them end first."""
    import threading

    import numpy as np

    from pyengine.gpu import open_backend

    def held(be, broken=False):
        """`be` with the prefill's compile (its mat-mats) held until the gate opens."""
        gate, entered, done = threading.Event(), threading.Event(), threading.Event()
        compile_all = be.create_pipelines

        def create_pipelines(sources):
            if not any(label.startswith("matmul") for _, _, label in sources):
                return compile_all(sources)
            entered.set()
            assert gate.wait(20), "the test never opened the gate: the load waited for the prefill's kernels"
            if broken:
                code, consts, _ = next(s for s in sources if s[2].startswith("matmul"))
                sources = [s for s in sources if s[0] is not code] + [
                    (code.replace("fn main(", "fn main(undefined_name: u32, ", 1), consts, "matmul-broken-on-purpose")]
            try:
                return compile_all(sources)
            finally:
                done.set()
        be.create_pipelines = create_pipelines
        return gate, entered, done

    prompt = list(range(3, 40))
    reference = Engine.load(tiny_llama, backend, context_length=64)
    want = run(reference.logits(prompt))

    be = open_backend("native")
    try:
        gate, entered, done = held(be)
        engine = Engine.load(tiny_llama, be, context_length=64)
        assert entered.wait(30) and not done.is_set(), "the load waited for the prefill's kernels"
        gate.set()
        np.testing.assert_array_equal(run(engine.logits(prompt)), want)
        assert done.is_set()
    finally:
        be.destroy()

    be = open_backend("native")
    try:
        gate, entered, done = held(be, broken=True)
        engine = Engine.load(tiny_llama, be, context_length=64)
        gate.set()
        with pytest.raises(GPUError, match="matmul-broken-on-purpose"):
            run(engine.logits(prompt))
    finally:
        be.destroy()

    be = open_backend("native")
    gate, entered, done = held(be)
    Engine.load(tiny_llama, be, context_length=64)
    assert entered.wait(30)
    threading.Timer(0.5, gate.set).start()
    be.destroy()
    assert done.is_set(), "the device went while its kernels compiled"
