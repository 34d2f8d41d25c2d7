"""Native GPU backend on wgpu-py (wgpu-native over Vulkan, Metal or D3D12; lavapipe on a CPU)."""

from __future__ import annotations

from ..errors import GPUError
from . import TEXEL_BYTES, Backend, Pending, Plan


def _quiet_vulkan_loader():
    """Mesa's window-system code complains on every start when XDG_RUNTIME_DIR is unset (CI, ssh)."""
    import os
    import tempfile

    if not os.environ.get("XDG_RUNTIME_DIR"):
        d = os.path.join(tempfile.gettempdir(), f"pyengine-runtime-{os.getuid()}")
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = d


# Chromium's SwiftShader Vulkan driver: the browser's CPU adapter, also usable natively
SWIFTSHADER_ICDS = ("/usr/lib/chromium/vk_swiftshader_icd.json", "/usr/lib/chromium-browser/vk_swiftshader_icd.json")


def _make_visible(name: str) -> None:
    """SwiftShader's driver is not among the system's Vulkan drivers: list it beside them (this works
    only before the process first uses wgpu)."""
    import glob
    import os

    if "swiftshader" not in name.lower() or os.environ.get("VK_ICD_FILENAMES"):
        return
    extra = [p for p in SWIFTSHADER_ICDS if os.path.isfile(p)][:1]
    if extra:
        system = sorted(glob.glob("/usr/share/vulkan/icd.d/*.json") + glob.glob("/etc/vulkan/icd.d/*.json"))
        os.environ["VK_ICD_FILENAMES"] = ":".join(system + extra)


class NativeBackend(Backend):
    name = "native"

    def __init__(self, power_preference: str = "high-performance", max_storage_binding: int | None = None,
                 disable_features: tuple = (), adapter: str | None = None):
        """adapter: part of the name of the adapter to use (`swiftshader`, `llvmpipe`, a GPU's name);
        by default the one wgpu prefers."""
        _quiet_vulkan_loader()
        if adapter:
            _make_visible(adapter)
        try:
            import wgpu
        except ImportError as e:  # pragma: no cover - depends on the install
            raise GPUError(f"the native backend needs wgpu-py: pip install wgpu ({e})") from None
        self._wgpu = wgpu
        try:
            if adapter:
                found = [a for a in wgpu.gpu.enumerate_adapters_sync() if a.info.get("backend_type") != "OpenGL"]
                names = [f"{a.info.get('device')} ({a.info.get('vendor')})" for a in found]
                found = [a for a, n in zip(found, names) if adapter.lower() in n.lower()]
                if not found:
                    raise GPUError(f"no WebGPU adapter matches '{adapter}'; found: {', '.join(names) or 'none'}")
                adapter = found[0]
            else:
                adapter = wgpu.gpu.request_adapter_sync(power_preference=power_preference)
        except GPUError:
            raise
        except Exception as e:
            raise GPUError(f"no WebGPU adapter found (install a Vulkan driver such as "
                           f"mesa-vulkan-drivers): {e}") from None
        if adapter is None:
            raise GPUError("no WebGPU adapter found (install a Vulkan driver such as mesa-vulkan-drivers)")
        info = adapter.info
        self.adapter_info = {k: info.get(k) for k in
                             ("vendor", "architecture", "device", "description", "adapter_type", "backend_type")}
        feats = set(adapter.features)
        want = [f for f in ("shader-f16", "subgroup", "timestamp-query") if f in feats and f not in disable_features]
        lim = adapter.limits
        limits = {
            "max-storage-buffer-binding-size": lim["max-storage-buffer-binding-size"],
            "max-buffer-size": lim["max-buffer-size"],
            "max-compute-workgroup-storage-size": lim["max-compute-workgroup-storage-size"],
            "max-compute-invocations-per-workgroup": lim["max-compute-invocations-per-workgroup"],
            "max-storage-buffers-per-shader-stage": lim["max-storage-buffers-per-shader-stage"],
            "max-texture-dimension-2d": lim["max-texture-dimension-2d"],
        }
        self.device = adapter.request_device_sync(required_features=want, required_limits=limits)
        self.queue = self.device.queue
        self.features = frozenset("subgroups" if f == "subgroup" else f for f in want)
        self.max_storage_binding = limits["max-storage-buffer-binding-size"]
        if max_storage_binding is not None:
            self.max_storage_binding = min(self.max_storage_binding, max_storage_binding)
        self.max_buffer_size = limits["max-buffer-size"]
        self.max_workgroups_per_dim = lim["max-compute-workgroups-per-dimension"]
        self.max_texture_rows = limits["max-texture-dimension-2d"]
        self.max_storage_buffers = limits["max-storage-buffers-per-shader-stage"]
        self._staging: list = []     # read-back buffers free for the next submit_and_read_later
        self.bytes_allocated = 0
        self._live: dict[int, int] = {}
        self._views: dict[int, tuple] = {}     # id of a texture -> (it, the view its bindings use)
        self._compiler = None       # the thread start_pipelines compiles on, made on first use

    # -- buffers ---------------------------------------------------------------

    def create_buffer(self, size: int, label: str = "", kind: str = "storage"):
        u = self._wgpu.BufferUsage
        size = max(16, -(-size // 16) * 16)
        if size > self.max_buffer_size:
            raise GPUError(f"buffer '{label}' needs {size} bytes, more than this adapter's "
                           f"largest buffer ({self.max_buffer_size} bytes)")
        usage = u.STORAGE | u.UNIFORM | u.COPY_DST | u.COPY_SRC
        try:
            buf = self.device.create_buffer(size=size, usage=usage, label=label)
        except Exception as e:
            raise GPUError(f"could not allocate {size} bytes of GPU memory for '{label}': {e}") from None
        self.bytes_allocated += size
        self._live[id(buf)] = size
        return buf

    def destroy_buffer(self, buf) -> None:
        size = self._live.pop(id(buf), 0)
        self.bytes_allocated -= size
        self._views.pop(id(buf), None)
        buf.destroy()

    def create_texture(self, rows: int, label: str = "", fmt: str = "rgba32uint", storage: bool = False):
        from ..kernels import TEXTURE_WIDTH

        size = self._texture_bytes(rows, label, fmt)
        t = self._wgpu.TextureUsage
        usage = t.TEXTURE_BINDING | t.COPY_DST | t.COPY_SRC | (t.STORAGE_BINDING if storage else 0)
        try:
            tex = self.device.create_texture(size=(TEXTURE_WIDTH, rows, 1), format=fmt, usage=usage, label=label)
        except Exception as e:
            raise GPUError(f"could not allocate a texture of {rows} rows for '{label}': {e}") from None
        self.bytes_allocated += size
        self._live[id(tex)] = size
        self._views[id(tex)] = (tex, tex.create_view())
        return tex

    @staticmethod
    def _texel_layout(tex, rows: int) -> tuple[dict, tuple]:
        """A buffer layout of the first `rows` rows of `tex`'s texels, row after row, and their extent."""
        w = tex.size[0]
        return {"offset": 0, "bytes_per_row": w * TEXEL_BYTES[tex.format], "rows_per_image": rows}, (w, rows, 1)

    def copy_to_texture(self, buf, tex) -> None:
        layout, extent = self._texel_layout(tex, tex.size[1])
        enc = self.device.create_command_encoder()
        enc.copy_buffer_to_texture({"buffer": buf, **layout}, {"texture": tex}, extent)
        self.queue.submit([enc.finish()])

    async def read_texture(self, tex, size: int) -> bytes:
        row = tex.size[0] * TEXEL_BYTES[tex.format]
        layout, extent = self._texel_layout(tex, min(tex.size[1], -(-size // row)))
        u = self._wgpu.BufferUsage
        buf = self.device.create_buffer(size=row * extent[1], usage=u.COPY_DST | u.COPY_SRC)
        try:
            enc = self.device.create_command_encoder()
            enc.copy_texture_to_buffer({"texture": tex}, {"buffer": buf, **layout}, extent)
            self.queue.submit([enc.finish()])
            return bytes(self.queue.read_buffer(buf, 0, min(size, row * extent[1])))
        finally:
            buf.destroy()

    def write_buffer(self, buf, offset: int, data) -> None:
        self.queue.write_buffer(buf, offset, data)

    async def read_buffer(self, buf, offset: int, size: int) -> bytes:
        return bytes(self.queue.read_buffer(buf, offset, size))

    # -- pipelines and plans ---------------------------------------------------

    def create_pipeline(self, code: str, constants: dict, label: str = ""):
        try:
            module = self.device.create_shader_module(code=code, label=label)
            return self.device.create_compute_pipeline(
                layout="auto", label=label,
                compute={"module": module, "entry_point": "main", "constants": dict(constants)})
        except Exception as e:
            raise GPUError(f"kernel '{label}' failed to compile: {e}") from None

    def create_pipelines(self, sources: list[tuple[str, dict, str]]) -> list:
        """Compiles the kernels side by side, a thread a core: wgpu-py lets go of the GIL while the driver
        compiles, and catches a call's errors on the thread that made it. lavapipe's LLVM compiles
        SmolLM2's 20 kernels in 0.40 s instead of 0.68 on 2 cores; an H100's driver the 1B shapes'
        plans in 0.7 s instead of 2.2-2.8 on 16 (benchmarks/compile_times.py: kernel by kernel)."""
        import os
        from concurrent.futures import ThreadPoolExecutor

        workers = min(len(sources), os.cpu_count() or 1)
        if workers < 2:
            return super().create_pipelines(sources)
        with ThreadPoolExecutor(workers, thread_name_prefix="pyengine-compile") as pool:
            return list(pool.map(lambda s: self.create_pipeline(*s), sources))

    def start_pipelines(self, sources) -> Pending:
        """Compiles the kernels on a thread of its own (create_pipelines: a thread a core) while the caller
        goes on, as a browser's GPU process does: a load returns once the decode step's kernels are
        compiled, and the first prefill waits for what is left of the prefill's (lavapipe: SmolLM2's
        prefill kernels take about 0.7 s of its 2 cores)."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        if self._compiler is None:
            self._compiler = ThreadPoolExecutor(1, thread_name_prefix="pyengine-compiles")
        future = self._compiler.submit(self.create_pipelines, sources)

        async def finish():
            return await asyncio.wrap_future(future)
        return Pending(finish)

    def create_plan(self, dispatches, label: str = "") -> Plan:
        steps = []
        for d in dispatches:
            layout = d.pipeline.get_bind_group_layout(0)
            entries = []
            for binding, b in sorted(d.bindings.items()):
                tex, res = self._views.get(id(b.buffer), (None, None))
                if tex is not b.buffer:
                    res = {"buffer": b.buffer, "offset": b.offset}
                    if b.size is not None:
                        res["size"] = b.size
                entries.append({"binding": binding, "resource": res})
            bg = self.device.create_bind_group(layout=layout, entries=entries, label=d.label)
            steps.append((d.pipeline, bg, d.workgroups))
        return Plan(list(dispatches), handle=steps, label=label)

    def _encode(self, plan: Plan):
        enc = self.device.create_command_encoder()
        cp = enc.begin_compute_pass()
        for pipeline, bg, (x, y, z) in plan.handle:
            cp.set_pipeline(pipeline)
            cp.set_bind_group(0, bg)
            cp.dispatch_workgroups(x, y, z)
        cp.end()
        return enc

    def submit(self, plan: Plan) -> None:
        self.queue.submit([self._encode(plan).finish()])

    def submit_and_read_later(self, plan: Plan, buf, offset: int, size: int) -> Pending:
        u = self._wgpu.BufferUsage
        staging = self._staging.pop() if self._staging else None
        if staging is None or staging.size < size:
            staging = self.device.create_buffer(size=max(size, 4096), usage=u.MAP_READ | u.COPY_DST)
        enc = self._encode(plan)
        enc.copy_buffer_to_buffer(buf, offset, staging, 0, size)
        self.queue.submit([enc.finish()])

        async def finish():
            staging.map_sync(self._wgpu.MapMode.READ, 0, size)
            try:
                return bytes(staging.read_mapped(0, size))
            finally:
                staging.unmap()
                self._staging.append(staging)
        return Pending(finish)

    async def sync(self) -> None:
        self.queue.read_buffer(self._sync_buffer(), 0, 4)

    def _sync_buffer(self):
        if getattr(self, "_syncbuf", None) is None:
            self._syncbuf = self.create_buffer(16, "sync")
        return self._syncbuf

    def destroy(self) -> None:
        if self._compiler is not None:      # a compile under way ends before its device does
            self._compiler.shutdown(wait=True, cancel_futures=True)
            self._compiler = None
        try:
            self.device.destroy()
        except Exception:
            pass
