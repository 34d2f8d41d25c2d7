"""Kernel variants per adapter: measured once, the fastest kept and cached, and all of them exact."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from pyengine import tuning
from pyengine.engine import Engine


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PYENGINE_CACHE", str(tmp_path))
    return tmp_path / "tuning.json"


def test_the_fastest_variant_is_chosen_then_read_from_the_cache(tiny_llama, backend, cache, monkeypatch):
    built, calls = [], []
    fast = {"rows": 2, "wg": 32}

    async def fake(engine, weight, variant, repeat=8):
        built.append(variant)
        # the fastest variant meets a burst of other work on its first turn: one slow time in five
        times = iter([5.0, 0.5, 0.5, 0.5, 0.5] if variant == fast else [1.0] * 5)

        async def once():
            calls.append(variant)
            return next(times)
        return once

    monkeypatch.setattr(tuning, "matvec_timer", fake)
    first = Engine.load(tiny_llama, backend, context_length=64)
    assert first.tuning == {"matvec": fast} and first.tuning_source == "measured"
    assert built == tuning.space(backend)
    assert calls == tuning.space(backend) * 5          # the variants take turns, round after round
    assert any('"rows": 2' in key[1] for key in first.kernels._pipelines if key[0] == "matvec")
    assert json.loads(cache.read_text())[tuning.adapter_key(backend)] == first.tuning
    first.close()

    async def never(*a, **k):
        raise AssertionError("a cached choice is not measured again")

    monkeypatch.setattr(tuning, "matvec_timer", never)
    second = Engine.load(tiny_llama, backend, context_length=64)
    assert second.tuning == first.tuning and second.tuning_source == "cached"
    second.close()


def test_a_variant_timer_measures_the_real_kernel(tiny_llama, backend):
    e = Engine.load(tiny_llama, backend, context_length=64, tune=False)
    w = max((w for w in e.weights.values() if w.rows > 1 and w.qtype != "F32"), key=lambda w: w.nbytes)
    times = asyncio.run(tuning.measure_variants(e, w, tuning.space(backend), rounds=2))
    assert len(times) == len(tuning.space(backend)) and all(0 < t < 1 for t in times)
    e.close()


def test_every_variant_gives_the_same_logits(tiny_llama, backend):
    ids = list(range(3, 40))
    outs = []
    for variant in tuning.space(backend):
        e = Engine.load(tiny_llama, backend, context_length=64, tuning={"matvec": variant}, tune=False)
        outs.append(np.array(asyncio.run(e.logits(ids))))
        e.close()
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


def test_defaults_tell_cpu_adapters_from_gpus(backend):
    class Fake:
        name = "browser"

    cpu, gpu = Fake(), Fake()
    cpu.adapter_info = {"vendor": "google", "architecture": "swiftshader", "device": "", "description": ""}
    gpu.adapter_info = {"vendor": "nvidia", "architecture": "hopper", "device": "H100", "description": ""}
    assert tuning.defaults(cpu)["matvec"]["rows"] > 1 and tuning.defaults(gpu)["matvec"]["rows"] == 1
    assert tuning.defaults(backend)["matvec"]["rows"] > 1          # lavapipe
