"""Kernel variants per adapter: measured once, the fastest kept and cached, and all of them exact."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from pyengine import tuning
from pyengine.engine import Engine
from pyengine.kernels import Kernels


def lanes(backend) -> int:
    return asyncio.run(tuning.subgroup_size(backend, Kernels(backend)))


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
    assert first.tuning == {"matvec": fast, **asyncio.run(tuning.rule_choice(first))}
    assert first.tuning_source == "measured"
    assert first.tuning_key.startswith(tuning.adapter_key(backend) + ":")      # and the weight's shape
    timed = tuning.space(lanes(backend), gpu=not tuning.is_cpu(backend))
    assert built == timed
    assert calls == timed * 5          # the variants take turns, round after round
    assert any('"rows": 2' in key[1] for key in first.kernels._pipelines if key[0] == "matvec")
    assert json.loads(cache.read_text())[first.tuning_key] == first.tuning
    first.close()

    async def never(*a, **k):
        raise AssertionError("a cached choice is not measured again")

    monkeypatch.setattr(tuning, "matvec_timer", never)
    second = Engine.load(tiny_llama, backend, context_length=64)
    assert second.tuning == first.tuning and second.tuning_source == "cached"
    second.close()


def test_a_driver_update_is_measured_again():
    """The same device under another driver release compiles kernels differently (lavapipe from Mesa 22.3
    and 25 choose different mat-vecs): its measurements are its own."""
    class Fake:
        name = "native"

        def __init__(self, **info):
            self.adapter_info = info

    old = Fake(vendor="llvmpipe", device="llvmpipe (LLVM 15.0.6, 256 bits)", description="Mesa 22.3.6")
    new = Fake(vendor="llvmpipe", device="llvmpipe (LLVM 15.0.6, 256 bits)", description="Mesa 25.0.7")
    assert tuning.adapter_key(old) != tuning.adapter_key(new)
    assert "Mesa 25.0.7" in tuning.adapter_key(new) and "256 bits" in tuning.adapter_key(new)
    # an adapter that names only one of the two (browsers often give no description) still has a key
    assert tuning.adapter_key(Fake(vendor="google", device="", description="SwiftShader")) != \
        tuning.adapter_key(Fake(vendor="google", device="", description=""))


def test_a_model_of_another_shape_is_measured_for_itself(tiny_llama, backend, cache, monkeypatch):
    weight = type("W", (), {"qtype": "Q4_1", "rows": 1536, "cols": 576})
    other = tuning.choice_key(backend, weight)
    cache.write_text(json.dumps({other: {"matvec": {"rows": 1, "wg": 64}}}))
    e = Engine.load(tiny_llama, backend, context_length=64)
    assert e.tuning_source == "measured" and e.tuning_key != other
    assert set(json.loads(cache.read_text())) == {other, e.tuning_key}     # both kept
    e.close()


def test_a_choice_is_measured_for_each_place_weights_and_activations_lie(tiny_llama, backend, cache, monkeypatch):
    """A variant measured with activations read from storage says nothing of one reading textures (the
    shared mat-vecs gain most there), nor with weights in buffers of textures: each has its own key."""
    keys = set()
    for acts in ("textures", "buffers"):
        for weights in ("textures", "buffers"):
            monkeypatch.setenv("PYENGINE_ACTIVATIONS", acts)
            monkeypatch.setenv("PYENGINE_WEIGHTS", weights)
            e = Engine.load(tiny_llama, backend, context_length=64)
            assert e.tuning_source == "measured"      # not the choice of another placement
            keys.add(e.tuning_key)
            e.close()
    assert len(keys) == 4 and set(json.loads(cache.read_text())) == keys


def test_a_variant_timer_measures_the_real_kernel(tiny_llama, backend):
    e = Engine.load(tiny_llama, backend, context_length=64, tune=False)
    w = max((w for w in e.weights.values() if w.rows > 1 and w.qtype != "F32"), key=lambda w: w.nbytes)
    variants = tuning.every_variant(lanes(backend))
    times = asyncio.run(tuning.measure_variants(e, w, variants, rounds=2))
    assert len(times) == len(variants) and all(0 < t < 1 for t in times)
    e.close()


def test_the_choice_counts_the_norms_a_variant_leaves_to_dispatches_of_their_own(tiny_llama, backend):
    e = Engine.load(tiny_llama, backend, context_length=64, tune=False)
    w = tuning.tuning_weight(e)
    norm = next(w for w in e.weights.values() if w.rows == 1 and w.cols == e.args.dim)
    plain, shared = {"rows": 4, "wg": 32}, {"rows": 4, "wg": 32, "xshare": True, "xl": 8}
    times = asyncio.run(tuning.measure_variants(e, w, [plain], rounds=2, norm=norm))
    assert len(times) == 2 and all(0 < t < 1 for t in times)        # the mat-vec's, then the RMSNorm's
    # per mat-vec the shared variant is 5% slower; the other leaves 2 norms a layer and the last one
    costs = tuning.step_costs(e, w, [plain, shared], [1.0e-4, 1.05e-4, 2e-5])
    scale = sum(x.nbytes for x in e.weights.values() if x.rows > 1) / w.nbytes
    assert costs[0] == pytest.approx(1.0e-4 * scale + (2 * e.args.n_layers + 1) * 2e-5)
    assert costs[1] == pytest.approx(1.05e-4 * scale)
    assert tuning.step_costs(e, w, [plain, shared], [1.0e-4, 1.05e-4, 1e-9])[0] < 1.05e-4 * scale
    split = tuning.GPU_SPACE["matvec"][0]      # folds the norms in too
    assert tuning.step_costs(e, w, [plain, split], [1.0e-4, 1.05e-4, 2e-5])[1] == pytest.approx(1.05e-4 * scale)
    e.close()


def test_every_variant_gives_the_same_logits(tiny_llama, backend):
    """The variants that keep a row in one invocation add its blocks in the same order: the same logits,
    bit for bit. The split ones add each invocation's blocks, then the invocations' sums: the same up to
    rounding."""
    ids = list(range(3, 40))
    outs = []
    for variant in tuning.every_variant(lanes(backend)):
        e = Engine.load(tiny_llama, backend, context_length=64, tuning={"matvec": variant}, tune=False)
        outs.append((variant, np.array(asyncio.run(e.logits(ids)))))
        e.close()
    assert any(v.get("split") for v, _ in outs)
    first = outs[0][1]
    for variant, o in outs[1:]:
        if variant.get("split"):
            np.testing.assert_allclose(o, first, rtol=1e-5, atol=1e-5 * np.abs(first).max())
        else:
            np.testing.assert_array_equal(o, first)


def test_defaults_tell_cpu_adapters_from_gpus(backend):
    class Fake:
        name = "browser"

    cpu, gpu = Fake(), Fake()
    cpu.adapter_info = {"vendor": "google", "architecture": "swiftshader", "device": "", "description": ""}
    gpu.adapter_info = {"vendor": "nvidia", "architecture": "hopper", "device": "H100", "description": ""}
    assert tuning.defaults(cpu)["matvec"]["rows"] > 1 and tuning.defaults(gpu)["matvec"]["rows"] == 1
    assert (tuning.defaults(backend)["matvec"]["rows"] > 1) == tuning.is_cpu(backend)     # lavapipe: a CPU


def test_gpus_take_the_shared_mat_mat_by_rule_and_keep_their_attention():
    """Prefill on a GPU: the mat-mat that shares activations by broadcasts where subgroups allow (8 lanes or
    more in the GPU's own shape, or 4), else the tiled one; the attention keeps the GPU defaults (32 invocations a head's keys)."""
    class GPU:
        name = "native"
        adapter_info = {"vendor": "nvidia", "architecture": "", "device": "H100", "description": "",
                        "adapter_type": "DiscreteGPU"}

    for lanes, want in ((32, tuning.MATMUL_GPU), (8, tuning.MATMUL_GPU), (4, tuning.MATMUL_XSHARE4),
                        (0, {"xshare": False})):
        be = GPU()
        be.features, be.subgroup_size = ({"subgroups"} if lanes else set()), lanes
        engine = type("E", (), {"backend": be, "kernels": None})
        assert asyncio.run(tuning.rule_choice(engine)) == {"matmul": want}


def test_variants_are_timed_on_a_layer_weight_of_the_main_quant_type():
    def w(qtype, rows, cols, nbytes):
        return type("W", (), {"qtype": qtype, "rows": rows, "cols": cols, "nbytes": nbytes, "parts": [0]})

    head = w("Q8_0", 49152, 576, 30_000_000)          # the largest, but one mat-vec a token
    layers = {f"blk.{i}.{n}": w("Q4_1", r, c, r * c * 5 // 8) for i in range(30)
              for n, r, c in [("ffn_down", 576, 1536), ("ffn_up", 1536, 576), ("attn_q", 576, 576)]}
    odd = w("Q6_K", 2048, 2048, 3_400_000)            # the widest single weight, of a minor type
    engine = type("E", (), {"weights": {"token_embd.weight": head, "x": odd, **layers},
                            "args": type("A", (), {"vocab_size": 49152})})
    chosen = tuning.tuning_weight(engine)
    assert chosen.qtype == "Q4_1" and chosen.rows * chosen.cols == 576 * 1536


def test_a_cached_choice_keeps_its_mat_vec_and_takes_the_prefill_kernels_by_todays_rule(tiny_llama, backend, cache):
    e = Engine.load(tiny_llama, backend, context_length=64, tune=False)
    key = tuning.choice_key(backend, tuning.tuning_weight(e), e.kernels.activation_textures)
    rule = asyncio.run(tuning.rule_choice(e))
    e.close()
    saved = {"matvec": {"rows": 2, "wg": 32}, "matmul": {"xshare": False, "rows": 1}, "attention": {"share": False}}
    cache.write_text(json.dumps({key: saved}))
    e = Engine.load(tiny_llama, backend, context_length=64)
    assert e.tuning_source == "cached"
    assert e.tuning == {"matvec": saved["matvec"], **rule}
    assert rule != {k: saved[k] for k in rule}       # on lavapipe the rule picks the shared kernels
    e.close()


def test_the_variants_timed_follow_the_subgroup_size():
    """4-lane subgroups (SwiftShader) time the shared mat-vecs whose activations 4 lanes load, 8 lanes or
    more (lavapipe, GPUs) the ones 8 lanes load, and no subgroups none that share."""
    def shared(lanes):
        return [v for v in tuning.space(lanes) if v.get("xshare")]

    assert shared(0) == [] and shared(2) == []
    assert shared(4) and all(v.get("xl", 4) == 4 for v in shared(4))
    assert shared(8) and shared(32) == shared(8) and all(v["xl"] == 8 for v in shared(8))
    assert all(v in tuning.every_variant(8) for v in shared(4) + shared(8))
    assert not any(v in tuning.every_variant(4) for v in shared(8))     # those load with 8 lanes


def test_gpus_also_time_the_mat_vecs_that_split_rows_over_invocations():
    """The split mat-vecs (matvec.wgsl.j2: split) are timed on GPUs, whatever their subgroups, and not on CPU
    adapters, where one invocation is a SIMD lane; the kernel tests run them everywhere (every_variant)."""
    for lanes in (0, 4, 8, 32):
        split = [v for v in tuning.space(lanes, gpu=True) if v.get("split")]
        assert split and all(v["rows"] == 4 and v["wg"] % v["split"] == 0 for v in split)
        assert not any(v.get("split") for v in tuning.space(lanes))
        assert all(v in tuning.every_variant(lanes) for v in split)
