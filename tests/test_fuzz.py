"""Hostile model files and manifests: every mutation ends in the project's own error, fast and small."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pyengine.errors import GGUFError
from pyengine.gguf import BytesSource, read_gguf
from pyengine.shards import ManifestError, check_manifest

MAX_BYTES = 64 << 20     # what one parse may allocate, whatever the header claims


@pytest.fixture(scope="module")
def seed_file(tiny_llama):
    data = open(tiny_llama, "rb").read()
    return data[:read_gguf(tiny_llama).data_offset + 64]


def parse_bounded(data: bytes):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        read_gguf(BytesSource(data))
    except GGUFError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < MAX_BYTES


mutation = st.tuples(st.sampled_from(["flip", "cut", "set64", "insert"]), st.integers(0, 1 << 30),
                     st.integers(0, 255), st.integers(0, (1 << 64) - 1))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutation, min_size=1, max_size=4))
# regression cases: counts that once asked for absurd allocations
@example([("set64", 16, 0, 1 << 61)])
@example([("set64", 8, 0, 1 << 62)])
@example([("set64", 24, 0, (1 << 64) - 1)])
@example([("cut", 0, 0, 0), ("flip", 0, 0, 0)])       # nothing left to flip
def test_mutated_headers_fail_cleanly(seed_file, mutations):
    d = bytearray(seed_file)
    for kind, pos, byte, big in mutations:
        pos %= max(1, len(d))
        if kind == "flip":
            if d:
                d[pos] ^= 1 << (byte % 8)
        elif kind == "cut":
            del d[pos:]
        elif kind == "set64":
            d[pos:pos + 8] = big.to_bytes(8, "little")
        else:
            d[pos:pos] = bytes([byte]) * (byte % 9)
    parse_bounded(bytes(d))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_after_the_magic_fail_cleanly(tail):
    parse_bounded(b"GGUF" + tail)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json_is_not_a_manifest(value):
    with pytest.raises(ManifestError):
        check_manifest(value)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["format", "version", "model", "shards"]), json_values)
def test_a_manifest_with_one_bad_field_is_named(field, value):
    good = {"format": "pyengine-shards", "version": 1,
            "model": {"size": 10, "sha256": "a" * 64},
            "shards": [{"file": "shard-00000.bin", "offset": 0, "size": 10, "sha256": "b" * 64}]}
    check_manifest(json.loads(json.dumps(good)))
    bad = dict(good)
    bad[field] = value
    try:
        check_manifest(bad)
    except ManifestError:
        pass
