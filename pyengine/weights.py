"""Weights onto the GPU: raw GGUF tensor bytes in, the packed layout the kernels read out.

Quantized blocks of 18 or 34 bytes are not 4-byte aligned; they are uploaded as-is
to a staging buffer and repacked there by a kernel (shaders/repack.wgsl.j2), so the
bytes never need to pass through Python (in the browser they come from IndexedDB).
"""

from __future__ import annotations

from .errors import UnsupportedModelError
from .gpu import Binding, Dispatch, split_workgroups
from .graph import Weight
from .kernels import GGUF_BLOCKS, REPACKED_QTYPES, TEXTURE_ROW_BYTES, packed_nbytes, texture_rows

STAGING_BYTES = 16 << 20    # raw bytes repacked per dispatch: the staging buffer's size at most


def split_rows(qtype: str, rows: int, cols: int, limit: int) -> list[tuple[int, int]]:
    """(first row, rows) of each part of a [rows, cols] weight, each part's packed bytes within `limit`
    (the largest storage binding): a tensor larger than one binding is split by rows."""
    whole = packed_nbytes(qtype, rows, cols)
    if whole <= limit:
        return [(0, rows)]
    per = max(1, rows * limit // whole)
    while per > 1 and packed_nbytes(qtype, per, cols) > limit:
        per -= 1
    if packed_nbytes(qtype, per, cols) > limit:
        raise UnsupportedModelError(
            f"one row of a {qtype} weight of {cols} columns needs {packed_nbytes(qtype, 1, cols)} bytes, "
            f"more than this GPU binds at once ({limit})")
    return [(r, min(per, rows - r)) for r in range(0, rows, per)]


async def upload_weight(backend, kernels, name: str, qtype: str, rows: int, cols: int, write_raw,
                        staging=None) -> Weight:
    """write_raw(buffer, offset, nbytes) puts bytes [offset, offset + nbytes) of the tensor's raw GGUF
    data at the start of `buffer` (it may be a coroutine: in the browser the bytes come from
    IndexedDB). Repacked types need `staging`, a buffer as large as the largest part's raw bytes."""
    row_bytes = _row_bytes(qtype, cols)
    texture = textured(kernels, rows)
    parts, buf, allocated = [], None, 0
    try:
        for row0, n in split_rows(qtype, rows, cols, part_limit(backend, texture)):
            label = name if row0 == 0 and n == rows else f"{name} rows {row0}-{row0 + n - 1}"
            nbytes = packed_nbytes(qtype, n, cols)
            if texture:     # packed in a buffer of whole texture rows, then copied into its texture
                nbytes = texture_rows(nbytes) * TEXTURE_ROW_BYTES
                buf = backend.create_buffer(nbytes, label)
                parts.append((row0, n, backend.create_texture(nbytes // TEXTURE_ROW_BYTES, label)))
                allocated += nbytes
            else:
                buf = backend.create_buffer(nbytes, label)
                parts.append((row0, n, buf))
                allocated += nbytes
            if qtype in REPACKED_QTYPES:               # through staging a run of whole rows at a time
                per_run = _run_rows(qtype, cols)
                bpr = cols // GGUF_BLOCKS[qtype][0]
                for r in range(0, n, per_run):
                    nr = min(per_run, n - r)
                    await _maybe_await(write_raw(staging, (row0 + r) * row_bytes, nr * row_bytes))
                    pipe = kernels.pipeline("repack", {"qtype": qtype}, {"NR": n, "BPR": bpr, "R0": r, "RUNR": nr})
                    pairs = (nr + 1) // 2 * bpr          # an invocation a block of two rows (or two blocks)
                    groups = split_workgroups(-(-pairs // 64), backend.max_workgroups_per_dim)
                    backend.submit(backend.create_plan(       # queued after the write, before the next one
                        [Dispatch(pipe, {0: Binding(staging), 1: Binding(buf)}, groups)]))
            else:
                await _maybe_await(write_raw(buf, row0 * row_bytes, n * row_bytes))
            if texture:
                backend.copy_to_texture(buf, parts[-1][2])
                backend.destroy_buffer(buf)     # freed once the copy has run
            buf = None
    except BaseException:
        for b in [b for _, _, b in parts] + ([buf] if texture and buf is not None else []):
            backend.destroy_buffer(b)
        raise
    return Weight(name, qtype, rows, cols, parts[0][2], packed_nbytes(qtype, rows, cols), parts, texture,
                  allocated)


def textured(kernels, rows: int) -> bool:
    """Whether a weight of `rows` rows goes into textures: matrices on backends that read them so
    (kernels.weight_textures); vectors (norms, biases) stay in buffers."""
    return kernels.weight_textures and rows > 1


def part_limit(backend, texture: bool) -> int:
    """The most packed bytes one part of a weight holds: a storage binding (the repack writes it as one),
    and for textures the largest texture too."""
    if texture:
        return min(backend.max_storage_binding, backend.max_texture_rows * TEXTURE_ROW_BYTES)
    return backend.max_storage_binding


def part_bytes(backend, kernels, qtype: str, rows: int, cols: int) -> list[int]:
    """GPU bytes each part of a weight takes once uploaded (Weight.allocated is their sum): its packed
    bytes, in whole texture rows where textured (then also the buffer it is packed in first)."""
    texture = textured(kernels, rows)
    sizes = [packed_nbytes(qtype, n, cols) for _, n in split_rows(qtype, rows, cols, part_limit(backend, texture))]
    return [texture_rows(b) * TEXTURE_ROW_BYTES for b in sizes] if texture else sizes


def _row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one row of a weight in the GGUF's own blocks."""
    return cols // GGUF_BLOCKS[qtype][0] * GGUF_BLOCKS[qtype][1]


def _run_rows(qtype: str, cols: int) -> int:
    """Rows repacked per dispatch: an even number (two neighbouring rows, or blocks, share a scale word)
    within STAGING_BYTES, two at least."""
    return max(2, STAGING_BYTES // _row_bytes(qtype, cols) // 2 * 2)


def staging_bytes(qtype: str, rows: int, cols: int, limit: int) -> int:
    """The staging a repacked weight needs: its largest part's raw bytes, up to one run of blocks."""
    if qtype not in REPACKED_QTYPES:
        return 0
    largest = max(n for _, n in split_rows(qtype, rows, cols, limit))
    return min(largest, _run_rows(qtype, cols)) * _row_bytes(qtype, cols)


async def _maybe_await(x):
    if x is not None and hasattr(x, "__await__"):
        await x
