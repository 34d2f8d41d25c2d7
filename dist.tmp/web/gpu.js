// The JavaScript half of the browser GPU backend (pyengine/gpu/browser.py): it owns the
// WebGPU objects and replays whole plans, so Python makes a few calls per token, not one
// per dispatch.

const WRITE_CHUNK = 1 << 20;     // bytes per queue.writeBuffer of weights (a multiple of 4)

const BUFFER_USAGE = () =>
  GPUBufferUsage.STORAGE | GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC;

export async function openDevice() {
  if (!("gpu" in navigator)) throw new Error("WebGPU is not available in this browser (navigator.gpu is missing)");
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) throw new Error("no WebGPU adapter was found");
  const features = [];
  if (adapter.features.has("shader-f16")) features.push("shader-f16");
  if (adapter.features.has("subgroups")) features.push("subgroups");
  const l = adapter.limits;
  const device = await adapter.requestDevice({
    requiredFeatures: features,
    requiredLimits: {
      maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
      maxBufferSize: l.maxBufferSize,
      maxComputeWorkgroupStorageSize: l.maxComputeWorkgroupStorageSize,
      maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
      maxTextureDimension2D: l.maxTextureDimension2D,
    },
  });
  let info = {};
  try {
    const i = adapter.info || {};
    info = { vendor: i.vendor, architecture: i.architecture, device: i.device, description: i.description };
  } catch (e) { /* older browsers */ }
  return { device, info, features };
}

export class Replayer {
  constructor(device, adapterInfo = {}, features = []) {
    this.device = device;
    this.adapterInfo = adapterInfo;
    this.features = features;
    this.objects = new Map();
    this.next = 1;
    this.stagingFree = [];      // staging buffers no read holds
    this.error = "";
    this.lostReason = null;
    device.lost.then((info) => { this.lostReason = info.message || info.reason || "device lost"; });
    device.addEventListener?.("uncapturederror", (e) => { this.error = e.error.message; });
  }

  _put(obj) { const id = this.next++; this.objects.set(id, obj); return id; }
  _get(id) {
    const o = this.objects.get(id);
    if (o === undefined) throw new Error(`unknown GPU object ${id}`);
    return o;
  }
  _check() { if (this.lostReason) throw new Error(`the GPU device was lost: ${this.lostReason}`); }
  // the id of the object make() returns; -1 where WebGPU refuses it (why: lastError)
  _make(make) {
    this._check();
    try {
      return this._put(make());
    } catch (e) {
      this.error = String(e);
      return -1;
    }
  }

  describe() {
    const l = this.device.limits;
    return JSON.stringify({
      adapter: this.adapterInfo,
      features: this.features.map((f) => (f === "subgroups" ? "subgroups" : f)),
      limits: {
        maxStorageBufferBindingSize: l.maxStorageBufferBindingSize,
        maxBufferSize: l.maxBufferSize,
        maxComputeWorkgroupsPerDimension: l.maxComputeWorkgroupsPerDimension,
        maxTextureDimension2D: l.maxTextureDimension2D,
        maxStorageBuffersPerShaderStage: l.maxStorageBuffersPerShaderStage,
      },
    });
  }

  lastError() { return this.error; }

  createBuffer(size, label) {
    return this._make(() => this.device.createBuffer({ size, usage: BUFFER_USAGE(), label }));
  }

  // a texture (pyengine/gpu/__init__.py: create_texture): `format` (texels of `texelBytes`), `width` texels
  // by `rows`, which kernels may also write where `storage`; its bindings use one view, made here
  createTexture(width, rows, label, format, texelBytes, storage) {
    return this._make(() => {
      const texture = this.device.createTexture({
        size: [width, rows], format, label,
        usage: GPUTextureUsage.TEXTURE_BINDING | GPUTextureUsage.COPY_DST | GPUTextureUsage.COPY_SRC
          | (storage ? GPUTextureUsage.STORAGE_BINDING : 0),
      });
      texture.view = texture.createView();
      texture.texelBytes = texelBytes;
      return texture;
    });
  }

  copyToTexture(bufId, texId) {
    this._check();
    const texture = this._get(texId);
    const enc = this.device.createCommandEncoder();
    enc.copyBufferToTexture({ buffer: this._get(bufId), bytesPerRow: texture.width * texture.texelBytes, rowsPerImage: texture.height },
      { texture }, [texture.width, texture.height]);
    this.device.queue.submit([enc.finish()]);
  }

  // the first `size` bytes of texture `texId`, texel after texel, row after row
  async readTexture(texId, size) {
    this._check();
    const texture = this._get(texId);
    const bytesPerRow = texture.width * texture.texelBytes;
    const rows = Math.min(texture.height, Math.ceil(size / bytesPerRow));
    const buffer = this.device.createBuffer({ size: bytesPerRow * rows, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
    try {
      const enc = this.device.createCommandEncoder();
      enc.copyTextureToBuffer({ texture }, { buffer, bytesPerRow, rowsPerImage: rows }, [texture.width, rows]);
      this.device.queue.submit([enc.finish()]);
      await buffer.mapAsync(GPUMapMode.READ);
      this._check();
      return new Uint8Array(buffer.getMappedRange(0, size).slice(0));
    } finally {
      buffer.destroy();
    }
  }

  destroyBuffer(id) {
    const b = this.objects.get(id);
    if (b) { b.destroy(); this.objects.delete(id); }
  }

  writeBuffer(id, offset, data) {
    this._check();
    this.device.queue.writeBuffer(this._get(id), offset, data);
  }

  // bytes [start, start + n) of `src` (a Uint8Array) into buffer `id` at `dst`, n padded to 4, in
  // writes of at most WRITE_CHUNK: the browser stages each write in shared memory with the GPU
  // process, and a shard's worth at once held ~20 MB more of it while loading (benchmarks/load_memory.py)
  writeBytes(id, dst, src, start, n) {
    const whole = n & ~3;
    const buffer = this._get(id);
    for (let done = 0; done < whole; done += WRITE_CHUNK) {
      this.device.queue.writeBuffer(buffer, dst + done, src.buffer, src.byteOffset + start + done, Math.min(WRITE_CHUNK, whole - done));
    }
    if (n > whole) {
      const tail = new Uint8Array(4);
      tail.set(src.subarray(start + whole, start + n));
      this.device.queue.writeBuffer(this._get(id), dst + whole, tail);
    }
  }

  // what createComputePipeline(Async) takes for a kernel of `module`
  static _pipelineDesc(module, constants, label) {
    return { layout: "auto", label, compute: { module, entryPoint: "main", constants } };
  }

  createPipeline(code, constantsJson, label) {
    return this._make(() => this.device.createComputePipeline(Replayer._pipelineDesc(
      this.device.createShaderModule({ code, label }), JSON.parse(constantsJson), label)));
  }

  // the kernels of specJson ([[code, constants, label], ...]) compiled while the page goes on
  // (createComputePipelineAsync: a browser may also spread them over threads, which SwiftShader in
  // Chromium does not): an id for each, or why WebGPU refused it
  async createPipelines(specJson) {
    this._check();
    const specs = JSON.parse(specJson);
    const modules = specs.map(([code, , label]) => this.device.createShaderModule({ code, label }));
    const made = await Promise.allSettled(specs.map(([, constants, label], i) =>
      this.device.createComputePipelineAsync(Replayer._pipelineDesc(modules[i], constants, label))));
    this._check();
    return Promise.all(made.map(async (m, i) => {
      if (m.status === "fulfilled") return this._put(m.value);
      // the compiler's own messages say more than the rejection ("invalid due to a previous error")
      const info = await modules[i].getCompilationInfo().catch(() => ({ messages: [] }));   // a device lost meanwhile
      const why = info.messages.filter((x) => x.type === "error").map((x) => `${x.lineNum}:${x.linePos}: ${x.message}`);
      return [String(m.reason?.message ?? m.reason), ...why].join("\n");
    }));
  }

  createPlan(specJson, label) {
    return this._make(() => {
      const steps = JSON.parse(specJson).map(([pid, binds, x, y, z]) => {
        const pipeline = this._get(pid);
        const entries = binds.map(([binding, bid, offset, size]) => {
          const o = this._get(bid);
          if (o.view) return { binding, resource: o.view };     // a texture
          const resource = { buffer: o, offset };
          if (size >= 0) resource.size = size;
          return { binding, resource };
        });
        const bindGroup = this.device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries, label });
        return [pipeline, bindGroup, x, y, z];
      });
      return { steps, label };
    });
  }

  _encode(planId) {
    const enc = this.device.createCommandEncoder();
    if (planId) {
      const pass = enc.beginComputePass();
      for (const [pipeline, bindGroup, x, y, z] of this._get(planId).steps) {
        pass.setPipeline(pipeline);
        pass.setBindGroup(0, bindGroup);
        pass.dispatchWorkgroups(x, y, z);
      }
      pass.end();
    }
    return enc;
  }

  submit(planId) {
    this._check();
    this.device.queue.submit([this._encode(planId).finish()]);
  }

  // submits the plan (before it returns) with a copy of `size` bytes of buffer `bufId` as the plan
  // leaves them, and resolves to those bytes: a caller may submit the next step before awaiting
  // this one, so each read has its own staging buffer, from a pool
  submitAndRead(planId, bufId, offset, size) {
    this._check();
    const staging = this._staging(size);
    const enc = this._encode(planId);
    enc.copyBufferToBuffer(this._get(bufId), offset, staging, 0, size);
    this.device.queue.submit([enc.finish()]);
    const read = this._mapped(staging, size);
    read.catch(() => {});      // a read nobody awaits (a step queued past the end) must not be reported
    return read;
  }

  _staging(size) {
    const i = this.stagingFree.findIndex((b) => b.size >= size);
    if (i >= 0) return this.stagingFree.splice(i, 1)[0];
    return this.device.createBuffer({ size: Math.max(size, 4096), usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  }

  async _mapped(staging, size) {
    await staging.mapAsync(GPUMapMode.READ, 0, size);
    this._check();
    const out = new Uint8Array(staging.getMappedRange(0, size).slice(0));
    staging.unmap();
    this.stagingFree.push(staging);
    return out;
  }

  read(bufId, offset, size) { return this.submitAndRead(0, bufId, offset, size); }

  async sync() {
    await this.device.queue.onSubmittedWorkDone();
    this._check();
  }

  destroyAll() {
    for (const o of this.objects.values()) if (o && o.destroy) o.destroy();
    this.objects.clear();
    for (const b of this.stagingFree) b.destroy();
    this.stagingFree = [];
    this.device.destroy();
  }
}
