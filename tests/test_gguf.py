"""The GGUF reader against the `gguf` package, and its refusals of broken files."""

from __future__ import annotations

import resource
import struct
import time

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from pyengine.errors import GGUFError
from pyengine.gguf import BytesSource, read_gguf


def _oracle(path):
    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        meta[k] = f.contents()
    tensors = {t.name: (tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
               for t in r.tensors}
    return meta, tensors


def _same(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_matches_oracle(path):
    ours = read_gguf(path)
    meta, tensors = _oracle(path)
    assert set(ours.metadata) == set(meta)
    for k, v in meta.items():
        if k == "t.nested":   # the oracle flattens nested arrays; checked directly below
            continue
        assert _same(ours.metadata[k], v), k
    assert set(ours.tensors) == set(tensors)
    for name, (shape, tid, off, nbytes) in tensors.items():
        t = ours.tensors[name]
        assert (t.shape, t.type_id, t.offset, t.nbytes) == (shape, tid, off, nbytes), name


def test_default_model_header_matches_gguf_package(model_path):
    assert_matches_oracle(model_path)
    g = read_gguf(model_path)
    assert g.metadata["general.architecture"] == "llama"
    assert len(g.tensors) == 272
    assert g.tensors["token_embd.weight"].type_name == "Q8_0"


def test_tiny_model_header_matches_gguf_package(tiny_llama):
    assert_matches_oracle(tiny_llama)


@pytest.fixture
def all_types_file(tmp_path):
    path = tmp_path / "types.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 3.25)
    w.add_uint64("t.u64", 2 ** 63 + 5)
    w.add_int64("t.i64", -(2 ** 62))
    w.add_float64("t.f64", 1e300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo wörld 😀 中文")
    w.add_string("t.empty", "")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_str", ["a", "", "ü"])
    w.add_array("t.arr_f32", [0.5, -1.5])
    w.add_array("t.arr_empty", [])
    w.add_key_value("t.nested", [[1, 2], [3]], GGUFValueType.ARRAY, sub_type=GGUFValueType.ARRAY)
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.zeros(7, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_value_type_matches_gguf_package(all_types_file):
    assert_matches_oracle(all_types_file)
    g = read_gguf(all_types_file)
    assert g.metadata["t.nested"] == [[1, 2], [3]]
    assert g.metadata["t.str"] == "héllo wörld 😀 中文"
    assert g.tensors["a"].shape == (32, 2)


def _expect_error(data: bytes, match: str):
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match=match):
        read_gguf(BytesSource(data))
    assert time.perf_counter() - t0 < 5


def test_not_a_gguf_file():
    _expect_error(b"PK\x03\x04" + bytes(100), "not a GGUF file")
    _expect_error(b"GG", "only 2 bytes")
    _expect_error(b"", "only 0 bytes")


def test_unsupported_versions():
    _expect_error(b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "unsupported GGUF version 1")
    _expect_error(b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "unsupported GGUF version 99")
    _expect_error(b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian")


def test_every_truncation_is_refused(all_types_file):
    data = all_types_file.read_bytes()
    g = read_gguf(BytesSource(data))
    end_of_data = max(t.offset + t.nbytes for t in g.tensors.values())
    for n in list(range(0, 200)) + list(range(200, end_of_data, 7)):
        with pytest.raises(GGUFError):
            read_gguf(BytesSource(data[:n]))


def _header(n_tensors=0, kvs=b"", n_kv=None):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv if n_kv is not None else 0) + kvs


def _kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return struct.pack("<Q", len(key)) + key + struct.pack("<I", vtype) + payload


def test_absurd_counts_fail_fast_without_allocating():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, hard))   # a huge allocation would die here
    try:
        # an array of 2^61 uint32
        _expect_error(_header(kvs=_kv(b"k", 9, struct.pack("<IQ", 4, 1 << 61)), n_kv=1), "2305843009213693952 elements")
        # a string of 2^60 bytes
        _expect_error(_header(kvs=_kv(b"k", 8, struct.pack("<Q", 1 << 60)), n_kv=1), "length of 1152921504606846976")
        # a key of 2^62 bytes
        _expect_error(_header(kvs=struct.pack("<Q", 1 << 62) + bytes(32), n_kv=1), "length of 4611686018427387904")
        # counts in the header
        _expect_error(_header(n_kv=1 << 62), "metadata entries")
        _expect_error(_header(n_tensors=1 << 62), "tensors")
        # nested arrays of 2^40 arrays
        _expect_error(_header(kvs=_kv(b"k", 9, struct.pack("<IQ", 9, 1 << 40)), n_kv=1), "elements")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _tensor_file(n_dims=2, dims=(32, 2), ttype=0, offset=0, tail=256):
    info = struct.pack("<Q", 1) + b"t" + struct.pack("<I", n_dims) + struct.pack(f"<{len(dims)}Q", *dims) \
        + struct.pack("<IQ", ttype, offset)
    head = _header(n_tensors=1) + info
    pad = -len(head) % 32
    return head + bytes(pad) + bytes(tail)


def test_bad_tensor_entries():
    _expect_error(_tensor_file(ttype=77), "unknown tensor type 77")
    _expect_error(_tensor_file(n_dims=5, dims=(1, 1, 1, 1, 1)), "5 dimensions")
    _expect_error(_tensor_file(n_dims=0, dims=()), "0 dimensions")
    _expect_error(_tensor_file(dims=(1 << 40, 1 << 20)), "truncated")
    _expect_error(_tensor_file(dims=(32, 0)), "non-positive")
    _expect_error(_tensor_file(ttype=2, dims=(33, 1)), "multiple of its block size")
    _expect_error(_tensor_file(offset=3), "not aligned")
    assert read_gguf(BytesSource(_tensor_file())).tensors["t"].nbytes == 256


def test_unknown_metadata_value_type():
    _expect_error(_header(kvs=_kv(b"k", 42, b""), n_kv=1), "unknown value type 42")


def test_bit_flips_end_in_gguf_errors_or_a_valid_parse(all_types_file):
    data = bytearray(all_types_file.read_bytes())
    rng = np.random.default_rng(1)
    header_end = read_gguf(BytesSource(bytes(data))).data_offset
    for _ in range(400):
        d = bytearray(data)
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(0, header_end))
            d[i] ^= 1 << int(rng.integers(0, 8))
        t0 = time.perf_counter()
        try:
            read_gguf(BytesSource(bytes(d)))
        except GGUFError:
            pass
        assert time.perf_counter() - t0 < 2


def test_missing_file_is_a_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="not found"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="directory"):
        read_gguf(tmp_path)
