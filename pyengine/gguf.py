"""Pure-Python GGUF reader: header, metadata and tensor table from any byte source.

No numpy, no whole-file reads: it runs unchanged in Pyodide, where the bytes come
from an HTTP range reader or IndexedDB. Every count and length read from the file
is checked against the bytes that remain before anything is allocated, so a
hostile or truncated header ends in a GGUFError, never in a huge allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4

# ggml_type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}
TYPE_IDS = {name: tid for tid, (name, _, _) in GGML_TYPES.items()}

# metadata value types: id -> (name, struct format or None, size)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12
_SCALARS = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i",
    _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d",
}
_VALUE_TYPE_NAMES = {
    _UINT8: "uint8", _INT8: "int8", _UINT16: "uint16", _INT16: "int16", _UINT32: "uint32",
    _INT32: "int32", _FLOAT32: "float32", _BOOL: "bool", _STRING: "string", _ARRAY: "array",
    _UINT64: "uint64", _INT64: "int64", _FLOAT64: "float64",
}


class ByteSource:
    """Random access to bytes: a file natively, a range-fetching reader in the browser."""

    size: int

    def read(self, offset: int, size: int) -> bytes:  # pragma: no cover - interface
        raise NotImplementedError


class FileSource(ByteSource):
    def __init__(self, path):
        self.path = str(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise GGUFError(f"model file not found: {self.path}") from None
        except IsADirectoryError:
            raise GGUFError(f"model path is a directory, not a GGUF file: {self.path}") from None
        except OSError as e:
            raise GGUFError(f"cannot open model file {self.path}: {e.strerror}") from None
        self._f.seek(0, 2)
        self.size = self._f.tell()

    def read(self, offset: int, size: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(size)

    def close(self):
        self._f.close()


class BytesSource(ByteSource):
    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self.size = len(data)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset:offset + size])


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the contiguous (row) dimension
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id][0]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFFile:
    version: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data_offset: int
    alignment: int
    size: int
    metadata_types: dict = field(default_factory=dict, repr=False)

    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key):
        if key not in self.metadata:
            raise GGUFError(f"GGUF metadata key '{key}' is missing")
        return self.metadata[key]


class _Reader:
    """Sequential little-endian reader over a ByteSource, fetching large chunks."""

    CHUNK = 1 << 22

    def __init__(self, src: ByteSource):
        self.src = src
        self.size = src.size
        self.pos = 0
        self._buf = b""
        self._buf_start = 0

    def remaining(self) -> int:
        return self.size - self.pos

    def _need(self, n: int, what: str):
        if n > self.size - self.pos:
            raise GGUFError(
                f"GGUF file is truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes")
        end = self.pos + n
        if self.pos < self._buf_start or end > self._buf_start + len(self._buf):
            want = max(n, self.CHUNK)
            self._buf = self.src.read(self.pos, min(want, self.size - self.pos))
            self._buf_start = self.pos
            if len(self._buf) < n:
                raise GGUFError(f"GGUF file is truncated: short read of {what} at offset {self.pos}")

    def take(self, n: int, what: str) -> tuple[bytes, int]:
        self._need(n, what)
        off = self.pos - self._buf_start
        self.pos += n
        return self._buf, off

    def scalar(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        buf, off = self.take(size, what)
        return struct.unpack_from("<" + fmt, buf, off)[0]

    def many(self, fmt: str, count: int, what: str):
        size = struct.calcsize("<" + fmt) * count
        buf, off = self.take(size, what)
        return list(struct.unpack_from(f"<{count}{fmt}", buf, off))

    def string(self, what: str) -> str:
        n = self.scalar("Q", f"length of {what}")
        if n > self.remaining():
            raise GGUFError(
                f"GGUF file is truncated or corrupt: {what} declares a length of {n} bytes at offset {self.pos - 8}, "
                f"more than the {self.remaining()} bytes left in the file")
        buf, off = self.take(n, what)
        raw = bytes(buf[off:off + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            # Some vocabularies carry byte strings that are not valid UTF-8.
            return raw.decode("utf-8", errors="surrogateescape")


def _min_size(vtype: int) -> int:
    if vtype in _SCALARS:
        return struct.calcsize("<" + _SCALARS[vtype])
    if vtype == _STRING:
        return 8
    return 12  # array: element type + count


def _read_value(r: _Reader, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALARS:
        return r.scalar(_SCALARS[vtype], f"value of '{key}'")
    if vtype == _STRING:
        return r.string(f"string value of '{key}'")
    if vtype == _ARRAY:
        if depth >= MAX_NESTING:
            raise GGUFError(f"GGUF metadata '{key}' nests arrays more than {MAX_NESTING} deep")
        etype = r.scalar("I", f"array type of '{key}'")
        if etype not in _VALUE_TYPE_NAMES:
            raise GGUFError(f"GGUF metadata '{key}' has an unknown array element type {etype}")
        count = r.scalar("Q", f"array length of '{key}'")
        if count * _min_size(etype) > r.remaining():
            raise GGUFError(
                f"GGUF file is truncated or corrupt: metadata '{key}' declares an array of {count} elements, "
                f"more than the {r.remaining()} bytes left in the file can hold")
        if etype in _SCALARS:
            return r.many(_SCALARS[etype], count, f"array '{key}'")
        return [_read_value(r, etype, key, depth + 1) for _ in range(count)]
    raise GGUFError(f"GGUF metadata '{key}' has an unknown value type {vtype}")


def read_gguf(src) -> GGUFFile:
    """Parse the header, metadata and tensor table. `src` is a path or a ByteSource."""
    if not isinstance(src, ByteSource):
        src = FileSource(src)
    r = _Reader(src)
    if r.size < 4:
        raise GGUFError(f"not a GGUF file: it is only {r.size} bytes long")
    buf, off = r.take(4, "magic")
    magic = bytes(buf[off:off + 4])
    if magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: it starts with {magic!r}, expected b'GGUF'")
    version = r.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        if swapped in (1, 2, 3):
            raise GGUFError("big-endian GGUF files are not supported")
        raise GGUFError(
            f"unsupported GGUF version {version}; supported versions are "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    n_tensors = r.scalar("Q", "tensor count")
    n_kv = r.scalar("Q", "metadata count")
    # a key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes
    if n_kv * 13 > r.remaining():
        raise GGUFError(f"GGUF file is truncated or corrupt: its header declares {n_kv} metadata "
                        f"entries, more than the file can hold")
    # a tensor entry takes at least 8 + 4 + 8 + 4 + 8 bytes
    if n_tensors * 32 > r.remaining():
        raise GGUFError(f"GGUF file is truncated or corrupt: its header declares {n_tensors} tensors, "
                        f"more than the file can hold")

    metadata: dict = {}
    types: dict = {}
    for _ in range(n_kv):
        key = r.string("metadata key")
        vtype = r.scalar("I", f"type of '{key}'")
        if vtype not in _VALUE_TYPE_NAMES:
            raise GGUFError(f"GGUF metadata '{key}' has an unknown value type {vtype}")
        if key in metadata:
            raise GGUFError(f"GGUF metadata key '{key}' appears twice")
        metadata[key] = _read_value(r, vtype, key)
        types[key] = vtype

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"GGUF general.alignment must be a power of two, got {alignment!r}")

    infos = []
    for i in range(n_tensors):
        name = r.string(f"name of tensor {i}")
        n_dims = r.scalar("I", f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor '{name}' has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}")
        shape = tuple(r.many("Q", n_dims, f"shape of tensor '{name}'"))
        type_id = r.scalar("I", f"type of tensor '{name}'")
        rel = r.scalar("Q", f"offset of tensor '{name}'")
        if type_id not in GGML_TYPES:
            raise GGUFError(f"tensor '{name}' has an unknown tensor type {type_id}")
        infos.append((name, shape, type_id, rel))

    data_offset = -(-r.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, type_id, rel in infos:
        tname, block, bsize = GGML_TYPES[type_id]
        n = 1
        for d in shape:
            if d <= 0:
                raise GGUFError(f"tensor '{name}' has a non-positive dimension in shape {list(shape)}")
            n *= d
        if shape[0] % block:
            raise GGUFError(
                f"tensor '{name}' of type {tname} has a row of {shape[0]} elements, "
                f"not a multiple of its block size {block}")
        nbytes = n // block * bsize
        start = data_offset + rel
        if rel % alignment:
            raise GGUFError(f"tensor '{name}' data offset {rel} is not aligned to {alignment} bytes")
        if start + nbytes > r.size:
            raise GGUFError(
                f"GGUF file is truncated: tensor '{name}' needs bytes {start}..{start + nbytes}, "
                f"but the file has {r.size} bytes")
        if name in tensors:
            raise GGUFError(f"tensor '{name}' appears twice in the tensor table")
        tensors[name] = TensorInfo(name, shape, type_id, start, nbytes)
    return GGUFFile(version, metadata, tensors, data_offset, alignment, r.size, types)
