"""Browser GPU backend: Pyodide's `js` module drives WebGPU through the replayer in web/gpu.js.

Each method is one call into JavaScript. Plans are registered with the replayer once,
so a decode step costs one submit-and-read call, and a write of its step header where the
host chooses the token (sampling; greedy steps take theirs on the GPU) (DESIGN.md rule 1).
"""

from __future__ import annotations

import json

from ..errors import GPUError
from . import TEXEL_BYTES, Backend, Pending, Plan


class JSBuffer:
    __slots__ = ("id", "size", "label")

    def __init__(self, id_: int, size: int, label: str):
        self.id, self.size, self.label = id_, size, label


class BrowserBackend(Backend):
    name = "browser"

    def __init__(self, replayer=None):
        import js  # noqa: F401  (only inside Pyodide)

        self.r = replayer if replayer is not None else js.pyengineGPU
        info = json.loads(self.r.describe())
        self.adapter_info = info["adapter"]
        self.features = frozenset(info["features"])
        lim = info["limits"]
        self.max_storage_binding = lim["maxStorageBufferBindingSize"]
        self.max_buffer_size = lim["maxBufferSize"]
        self.max_workgroups_per_dim = lim["maxComputeWorkgroupsPerDimension"]
        self.max_texture_rows = lim.get("maxTextureDimension2D", 0)
        self.max_storage_buffers = lim.get("maxStorageBuffersPerShaderStage", 8)
        self.bytes_allocated = 0
        self.calls = 0   # calls into JavaScript, for the benchmark

    def create_buffer(self, size: int, label: str = "", kind: str = "storage"):
        size = max(16, -(-size // 16) * 16)
        if size > self.max_buffer_size:
            raise GPUError(f"buffer '{label}' needs {size} bytes, more than this adapter's largest buffer "
                           f"({self.max_buffer_size} bytes)")
        self.calls += 1
        bid = self.r.createBuffer(size, label)
        if bid < 0:
            raise GPUError(f"could not allocate {size} bytes of GPU memory for '{label}': {self.r.lastError()}")
        self.bytes_allocated += size
        return JSBuffer(bid, size, label)

    def create_texture(self, rows: int, label: str = "", fmt: str = "rgba32uint", storage: bool = False):
        from ..kernels import TEXTURE_WIDTH

        size = self._texture_bytes(rows, label, fmt)
        self.calls += 1
        tid = self.r.createTexture(TEXTURE_WIDTH, rows, label, fmt, TEXEL_BYTES[fmt], storage)
        if tid < 0:
            raise GPUError(f"could not allocate a texture of {rows} rows for '{label}': {self.r.lastError()}")
        self.bytes_allocated += size
        return JSBuffer(tid, size, label)

    def copy_to_texture(self, buf, tex) -> None:
        self.calls += 1
        self.r.copyToTexture(buf.id, tex.id)

    async def read_texture(self, tex, size: int) -> bytes:
        self.calls += 1
        out = await self.r.readTexture(tex.id, min(size, tex.size))
        return bytes(out.to_py())

    def destroy_buffer(self, buf) -> None:
        self.calls += 1
        self.r.destroyBuffer(buf.id)
        self.bytes_allocated -= buf.size

    def write_buffer(self, buf, offset: int, data) -> None:
        from pyodide.ffi import to_js

        self.calls += 1
        self.r.writeBuffer(buf.id, offset, to_js(memoryview(data).cast("B")))

    async def read_buffer(self, buf, offset: int, size: int) -> bytes:
        self.calls += 1
        out = await self.r.read(buf.id, offset, size)
        return bytes(out.to_py())

    def create_pipeline(self, code: str, constants: dict, label: str = ""):
        self.calls += 1
        pid = self.r.createPipeline(code, json.dumps(constants), label)
        if pid < 0:
            raise GPUError(f"kernel '{label}' failed to compile: {self.r.lastError()}")
        return pid

    def start_pipelines(self, sources) -> Pending:
        self.calls += 1
        promise = self.r.createPipelines(json.dumps([[c, k, label] for c, k, label in sources]))

        async def finish():
            made = (await promise).to_py()
            for got, (_, _, label) in zip(made, sources):
                if isinstance(got, str):
                    raise GPUError(f"kernel '{label}' failed to compile: {got}")
            return made
        return Pending(finish)

    def create_plan(self, dispatches, label: str = "") -> Plan:
        spec = []
        for d in dispatches:
            binds = [[i, b.buffer.id, b.offset, -1 if b.size is None else b.size]
                     for i, b in sorted(d.bindings.items())]
            spec.append([d.pipeline, binds, *d.workgroups])
        self.calls += 1
        pid = self.r.createPlan(json.dumps(spec), label)
        if pid < 0:
            raise GPUError(f"plan '{label}' could not be built: {self.r.lastError()}")
        return Plan(list(dispatches), handle=pid, label=label)

    def submit(self, plan: Plan) -> None:
        self.calls += 1
        self.r.submit(plan.handle)

    def submit_and_read_later(self, plan: Plan, buf, offset: int, size: int) -> Pending:
        self.calls += 1
        promise = self.r.submitAndRead(plan.handle, buf.id, offset, size)   # submitted before it returns

        async def finish():
            return bytes((await promise).to_py())
        return Pending(finish)

    async def sync(self) -> None:
        self.calls += 1
        await self.r.sync()

    def destroy(self) -> None:
        self.r.destroyAll()
