"""Shard manifests: a GGUF cut into byte-range shards of at most 32 MiB, each with its sha256.

Shard 0 is the GGUF header (metadata and tensor table); the others hold tensor data,
cut at tensor boundaries so that a tensor lies in one shard unless it is larger than
a shard. The manifest states the source file, its size and sha256 (the model's content
hash, which keys the browser cache), and a format version. Each shard also lists the sha256
of each of its pieces of `piece_size` bytes (the last one shorter): the browser checks a
download piece by piece as it streams (WebCrypto hashes whole buffers only), and a manifest
without them is checked shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import os

from .errors import PyEngineError
from .gguf import ByteSource, read_gguf

FORMAT = "pyengine-shards"
VERSION = 1
MAX_SHARD = 32 << 20
PIECE = 4 << 20          # bytes per hashed piece of a shard (the browser streams shards in these)


class ManifestError(PyEngineError):
    """A shard manifest that cannot be used."""


def plan_shards(gguf, max_shard: int = MAX_SHARD) -> list[tuple[int, int]]:
    """(offset, size) of each shard, covering the whole file."""
    cuts = [(0, gguf.data_offset)]
    start = end = gguf.data_offset
    for t in sorted(gguf.tensors.values(), key=lambda t: t.offset):
        t_end = max(end, t.offset + t.nbytes)
        if t_end - start > max_shard and end > start:
            cuts.append((start, end - start))
            start = end
        while t_end - start > max_shard:           # a tensor larger than a shard spans several
            cuts.append((start, max_shard))
            start += max_shard
        end = t_end
    end = max(end, gguf.size)
    while end - start > max_shard:
        cuts.append((start, max_shard))
        start += max_shard
    if end > start:
        cuts.append((start, end - start))
    return cuts


def pack(model_path, outdir, max_shard: int = MAX_SHARD, name: str | None = None, piece: int = PIECE) -> dict:
    """Writes OUTDIR/manifest.json and OUTDIR/shard-NNNNN.bin; returns the manifest."""
    if not 0 < max_shard <= MAX_SHARD:
        raise PyEngineError(f"shard size must be between 1 and {MAX_SHARD} bytes, got {max_shard}")
    if not 4 <= piece <= MAX_SHARD or piece % 4:
        raise PyEngineError(f"piece size must be a multiple of 4 between 4 and {MAX_SHARD} bytes, got {piece}")
    g = read_gguf(model_path)
    os.makedirs(outdir, exist_ok=True)
    whole = hashlib.sha256()
    shards = []
    with open(model_path, "rb") as f:
        for i, (off, size) in enumerate(plan_shards(g, max_shard)):
            f.seek(off)
            data = f.read(size)
            whole.update(data)
            fname = f"shard-{i:05d}.bin"
            tmp = os.path.join(outdir, fname + ".part")
            with open(tmp, "wb") as out:
                out.write(data)
            os.replace(tmp, os.path.join(outdir, fname))
            shards.append({"file": fname, "offset": off, "size": size, "sha256": hashlib.sha256(data).hexdigest(),
                           "pieces": [hashlib.sha256(data[at:at + piece]).hexdigest() for at in range(0, size, piece)]})
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": {
            "name": name or g.get("general.name") or os.path.basename(str(model_path)),
            "architecture": g.get("general.architecture"),
            "source": os.path.basename(str(model_path)),
            "size": g.size,
            "sha256": whole.hexdigest(),
            "tensors": len(g.tensors),
            "data_offset": g.data_offset,
        },
        "piece_size": piece,
        "shards": shards,
    }
    tmp = os.path.join(outdir, "manifest.json.part")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(outdir, "manifest.json"))
    return manifest


def check_manifest(m) -> dict:
    """Validates a parsed manifest; returns it or raises ManifestError naming the problem."""
    if not isinstance(m, dict):
        raise ManifestError("the manifest is not a JSON object")
    if m.get("format") != FORMAT:
        raise ManifestError(f"not a pyengine shard manifest (format is {m.get('format')!r})")
    if m.get("version") != VERSION:
        raise ManifestError(f"manifest version {m.get('version')!r} is not supported; this engine reads {VERSION}")
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("size"), int) or not _is_hex64(model.get("sha256")):
        raise ManifestError("the manifest's model entry needs an integer size and a sha256")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ManifestError("the manifest lists no shards")
    piece = m.get("piece_size")
    if piece is not None and (not isinstance(piece, int) or isinstance(piece, bool) or not 4 <= piece <= MAX_SHARD
                              or piece % 4):
        raise ManifestError(f"the manifest's piece_size must be a multiple of 4 up to {MAX_SHARD}, got {piece!r}")
    pos = 0
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise ManifestError(f"shard {i} is not an object")
        for key, kind in (("file", str), ("offset", int), ("size", int), ("sha256", str)):
            if not isinstance(s.get(key), kind) or isinstance(s.get(key), bool):
                raise ManifestError(f"shard {i} needs a {kind.__name__} '{key}'")
        if not _is_hex64(s["sha256"]):
            raise ManifestError(f"shard {i} needs a sha256 (64 lowercase hex digits)")
        if s["offset"] != pos or not 0 < s["size"] <= MAX_SHARD:
            raise ManifestError(f"shard {i} does not continue the byte ranges (offset {s['offset']}, "
                                f"size {s['size']}; expected offset {pos}, size up to {MAX_SHARD})")
        if piece is not None:
            hashes = s.get("pieces")
            want = -(-s["size"] // piece)
            if not isinstance(hashes, list) or len(hashes) != want or not all(_is_hex64(h) for h in hashes):
                raise ManifestError(f"shard {i} needs the sha256 of each of its {want} pieces")
        elif "pieces" in s:
            raise ManifestError(f"shard {i} lists pieces but the manifest has no piece_size")
        if "/" in s["file"] or "\\" in s["file"] or s["file"].startswith("."):
            raise ManifestError(f"shard {i} names a file outside the manifest's folder: {s['file']!r}")
        pos += s["size"]
    if pos != model["size"]:
        raise ManifestError(f"the shards cover {pos} bytes but the model has {model['size']}")
    return m


def _is_hex64(h) -> bool:
    return isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h)


class HeaderSource(ByteSource):
    """The GGUF header shard, standing for a file of the model's full size (the tensor data stays out)."""

    def __init__(self, header: bytes, total_size: int):
        self._data = memoryview(header)
        self.size = total_size

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset:offset + size])


def read_manifest_header(manifest: dict, header: bytes):
    check_manifest(manifest)
    return read_gguf(HeaderSource(header, manifest["model"]["size"]))
