"""The GPU behind one small interface, with a native (wgpu-py) and a browser (Pyodide) implementation.

Model code never sees which one runs. The unit of work is a Plan: a list of
dispatches (pipeline, bound buffers, workgroup counts) built once and replayed
per step, so the browser can encode a whole step in one call into JavaScript.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import GPUError


@dataclass(frozen=True)
class Binding:
    buffer: object
    offset: int = 0
    size: int | None = None


@dataclass
class Dispatch:
    pipeline: object
    bindings: dict[int, Binding]
    workgroups: tuple[int, int, int]
    label: str = ""
    family: str = ""        # the kernel family (shaders/<family>.wgsl.j2): profiles group by it


@dataclass
class Plan:
    """Dispatches that run in order in one compute pass; the backend keeps what it needs to replay them."""

    dispatches: list[Dispatch]
    handle: object = field(default=None, repr=False)
    label: str = ""


TEXEL_BYTES = {"rgba32uint": 16, "rg32uint": 8}     # the texture formats kernels read


class Pending:
    """What the GPU will have made: bytes a submitted plan produced (submit_and_read_later) or kernels
    started compiling (start_pipelines); `await` it for them. One that is never awaited costs no wait:
    natively a read starts only when awaited (its staging buffer goes with it), in the browser it is
    the page's own."""

    __slots__ = ("_finish",)

    def __init__(self, finish):
        self._finish = finish       # an async function of no arguments returning what was made

    def __await__(self):
        return self._finish().__await__()


class Backend:
    """What the engine needs from a GPU. Buffer handles are opaque to callers."""

    name = "abstract"
    adapter_info: dict
    features: frozenset          # of "shader-f16", "subgroups", "timestamp-query"
    max_storage_binding: int
    max_buffer_size: int
    max_workgroups_per_dim: int
    max_texture_rows: int = 0    # rows of the largest 2D texture (0: no weight textures)
    max_storage_buffers: int = 8     # storage buffers one kernel may bind (WebGPU's default limit)

    def create_buffer(self, size: int, label: str = "", kind: str = "storage"):
        raise NotImplementedError

    def destroy_buffer(self, buf) -> None:
        raise NotImplementedError

    def write_buffer(self, buf, offset: int, data) -> None:
        raise NotImplementedError

    def create_texture(self, rows: int, label: str = "", fmt: str = "rgba32uint", storage: bool = False):
        """A 2D texture of kernels.TEXTURE_WIDTH texels by `rows` that kernels read with textureLoad,
        bound like a buffer (Binding(texture)); destroy_buffer frees it. `fmt`: one of TEXEL_BYTES
        (rgba32uint: weights and the f32 KV cache; rg32uint: the f16 one). `storage`: kernels may
        also write it (bound as a write-only storage texture, in dispatches that do not read it)."""
        raise NotImplementedError

    def copy_to_texture(self, buf, tex) -> None:
        """The first bytes of `buf` (as many as `tex` holds; queued after earlier writes) into `tex`."""
        raise NotImplementedError

    async def read_texture(self, tex, size: int) -> bytes:
        """The first `size` bytes of `tex`, texel after texel, row after row (as copy_to_texture
        wrote them)."""
        raise NotImplementedError

    def _texture_bytes(self, rows: int, label: str, fmt: str = "rgba32uint") -> int:
        """The bytes a texture of `rows` rows takes, or why this adapter cannot make it."""
        from ..kernels import TEXTURE_WIDTH

        if fmt not in TEXEL_BYTES:
            raise GPUError(f"texture '{label}': format {fmt} is not one of {', '.join(TEXEL_BYTES)}")
        if rows > self.max_texture_rows:
            raise GPUError(f"texture '{label}' needs {rows} rows, more than this adapter's largest "
                           f"({self.max_texture_rows})")
        return rows * TEXTURE_WIDTH * TEXEL_BYTES[fmt]

    async def read_buffer(self, buf, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def create_pipeline(self, code: str, constants: dict, label: str = ""):
        raise NotImplementedError

    def create_pipelines(self, sources: list[tuple[str, dict, str]]) -> list:
        """Compiles several kernels ((code, constants, label) each) before it returns."""
        return [self.create_pipeline(*s) for s in sources]

    def start_pipelines(self, sources: list[tuple[str, dict, str]]) -> Pending:
        """Starts compiling several kernels ((code, constants, label) each); awaiting the answer gives their
        pipelines, or raises GPUError for one that failed. A browser's GPU process compiles them while the
        page goes on; here they compile before this returns."""
        made, error = [], None
        try:
            made = self.create_pipelines(sources)
        except GPUError as e:       # raised when awaited, as the browser's is
            error = e

        async def finish():
            if error is not None:
                raise error
            return made
        return Pending(finish)

    def create_plan(self, dispatches: list[Dispatch], label: str = "") -> Plan:
        raise NotImplementedError

    def submit(self, plan: Plan) -> None:
        """Run the plan's dispatches in order."""
        raise NotImplementedError

    async def submit_and_read(self, plan: Plan, buf, offset: int, size: int) -> bytes:
        """Run the plan, then read back `size` bytes of `buf`: one round trip per step."""
        return await self.submit_and_read_later(plan, buf, offset, size)

    def submit_and_read_later(self, plan: Plan, buf, offset: int, size: int) -> Pending:
        """Submit the plan now, with a copy of `size` bytes of `buf` as it leaves them; awaiting the
        answer gives them. Later submissions may go in before that, and may change `buf`: this is how
        a step is queued before the host has read the one before it."""
        raise NotImplementedError

    async def sync(self) -> None:
        """Wait until all submitted work is done."""
        raise NotImplementedError

    def destroy(self) -> None:
        pass


def open_backend(kind: str = "native", **options) -> Backend:
    if kind == "native":
        from .native import NativeBackend

        return NativeBackend(**options)
    if kind == "browser":
        from .browser import BrowserBackend

        return BrowserBackend(**options)
    raise ValueError(f"unknown GPU backend '{kind}'; use native or browser")


def split_workgroups(count: int, limit: int = 65535) -> tuple[int, int, int]:
    """Workgroup counts for `count` groups laid out in x then y, within the per-dimension limit."""
    count = max(1, count)
    if count <= limit:
        return (count, 1, 1)
    y = -(-count // limit)
    x = -(-count // y)
    return (x, y, 1)
