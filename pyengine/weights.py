"""Weights onto the GPU: raw GGUF tensor bytes in, the packed layout the kernels read out.

Quantized blocks of 18 or 34 bytes are not 4-byte aligned; they are uploaded as-is
to a staging buffer and repacked there by a kernel (shaders/repack.wgsl.j2), so the
bytes never need to pass through Python (in the browser they come from IndexedDB).
"""

from __future__ import annotations

from .errors import UnsupportedModelError
from .gpu import Binding, Dispatch, split_workgroups
from .graph import Weight
from .kernels import REPACKED_QTYPES, packed_nbytes


async def upload_weight(backend, kernels, name: str, qtype: str, rows: int, cols: int, write_raw,
                        staging=None) -> Weight:
    """write_raw(buffer) puts the tensor's raw GGUF bytes at the start of `buffer` (it may be a
    coroutine: in the browser the bytes come from IndexedDB). Repacked types need `staging`,
    a buffer at least as large as the raw bytes."""
    nbytes = packed_nbytes(qtype, rows, cols)
    if nbytes > backend.max_storage_binding:
        raise UnsupportedModelError(
            f"tensor '{name}' needs {nbytes} bytes in one binding, more than this GPU allows "
            f"({backend.max_storage_binding})")
    buf = backend.create_buffer(nbytes, name)
    if qtype in REPACKED_QTYPES:
        await _maybe_await(write_raw(staging))   # the repack must be queued after the write
        blocks = rows * cols // 32
        pipe = kernels.pipeline("repack", {"qtype": qtype}, {"NB": blocks})
        groups = split_workgroups(-(-blocks // 128), backend.max_workgroups_per_dim)
        backend.submit(backend.create_plan([Dispatch(pipe, {0: Binding(staging), 1: Binding(buf)}, groups)]))
    else:
        await _maybe_await(write_raw(buf))
    return Weight(name, qtype, rows, cols, buf, nbytes)


async def _maybe_await(x):
    if x is not None and hasattr(x, "__await__"):
        await x
