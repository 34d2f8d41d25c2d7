"""Long use natively: 500 requests on one engine leave GPU buffers and Python memory where they were."""

from __future__ import annotations

import gc
import tracemalloc

from conftest import run
from pyengine.engine import Engine
from pyengine.errors import ContextOverflowError
from pyengine.sampling import SamplingParams

import pytest


def test_500_requests_do_not_grow_gpu_or_python_memory(tiny_llama, backend):
    engine = Engine.load(tiny_llama, backend, context_length=128)

    async def many(n, start):
        for i in range(start, start + n):
            msgs = [{"role": "user", "content": f"request {i} " + "word " * (i % 7)}]
            params = SamplingParams(temperature=0.0 if i % 2 else 0.8, seed=i, max_tokens=1 + i % 5,
                                    ignore_eos=True)
            gen = engine.chat(msgs, params)
            async for _ in gen:
                pass
            assert gen.usage.completion_tokens == 1 + i % 5

    run(many(20, 0))             # warm-up: every prefill bucket and pipeline exists now
    gc.collect()
    live, nbytes = len(backend._live), backend.bytes_allocated
    tracemalloc.start()
    run(many(480, 20))
    gc.collect()
    grown, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(backend._live) == live and backend.bytes_allocated == nbytes
    assert grown < 2 << 20, f"Python memory grew by {grown} bytes over 480 requests"


def test_hostile_text_natively(tiny_llama, backend):
    engine = Engine.load(tiny_llama, backend, context_length=128)

    async def ask(content, **kw):
        gen = engine.chat([{"role": "user", "content": content}], SamplingParams(temperature=0.0, max_tokens=3, **kw))
        async for _ in gen:
            pass
        return gen

    assert run(ask("nul \x00 bytes \x00\x00 and \ud800 a lone surrogate")).usage.completion_tokens >= 1
    with pytest.raises(ContextOverflowError, match=r"the prompt has \d+ tokens but the context holds 128"):
        run(ask("x" * 100_000))
    # and the engine still answers correctly afterwards
    assert run(ask("hello")).tokens == run(ask("hello")).tokens
