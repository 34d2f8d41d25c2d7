// The Web Worker that runs the engine: Pyodide, the pyengine wheel, the GPU replayer and
// the shard store. The page talks to it through pyengine.mjs; requests run one at a time
// in arrival order, and an interrupt reaches a running generation at its next token.

import { loadPyodide } from "../pyodide/pyodide.mjs";
import { openDevice, Replayer } from "./gpu.js";
import { ShardStore, getSetting, putSetting } from "./shards.js";

const base = new URL("../", import.meta.url);
let pyodide = null;
let session = null;
let replayer = null;
let queue = Promise.resolve();

async function boot() {
  if (pyodide) return;
  pyodide = await loadPyodide({ indexURL: new URL("pyodide/", base).href });
  const index = await (await fetch(new URL("wheels/index.json", base), { cache: "no-cache" })).json();
  for (const file of index.wheels) {
    const res = await fetch(new URL(`wheels/${file}`, base));
    if (!res.ok) throw new Error(`could not fetch ${file}: HTTP ${res.status}`);
    pyodide.unpackArchive(await res.arrayBuffer(), "wheel");
  }
  session = pyodide.runPython("from pyengine.browser import Session\nSession()");
}

async function load(id, { model, contextLength, chatTemplate, download, faults, gpuMemoryLimit }) {
  await boot();
  if (session) session.unload();
  if (replayer) replayer.destroyAll();
  replayer = null;
  const store = await ShardStore.open(model, download || {});
  const t0 = performance.now();
  const { device, info, features } = await openDevice();
  replayer = new Replayer(device, info, features);
  if (faults && Number.isInteger(faults.failBufferAfter)) injectAllocationFailure(replayer, faults.failBufferAfter);
  self.pyengineGPU = replayer;
  const total = store.manifest.model.size;
  const shardsTotal = store.manifest.shards.length;
  // Progress: "download" while shards are fetched (the upload runs beside it and its bytes come as
  // uploadedBytes), then "upload" for what is left to move to the GPU.
  let uploaded = 0;
  let fetching = null;
  let t1 = t0;
  const downloadProgress = (p) => {
    fetching = p.shardsDone < p.shardsTotal ? p : null;
    if (!fetching) t1 = performance.now();
    reply(id, "progress", { ...p, uploadedBytes: uploaded });
  };
  const sink = {
    writeTensor: (bufId, offset, n) => store.writeTensor(replayer, bufId, offset, n, (len) => {
      uploaded += len;
      reply(id, "progress", fetching ? { ...fetching, uploadedBytes: uploaded }
        : { phase: "upload", loadedBytes: uploaded, totalBytes: total, shardsDone: shardsTotal, shardsTotal });
    }),
  };
  // the GPU memory the model needs, stated before any weight is uploaded
  const plan = (p) => reply(id, "progress", { phase: "plan", gpuBytesNeeded: JSON.parse(p), loadedBytes: 0,
                                              totalBytes: total, shardsDone: shardsTotal, shardsTotal });
  const tuningCache = (await getSetting("tuning").catch(() => undefined)) || {};
  // allocation failures and invalid use are reported asynchronously by WebGPU: catch them
  // here, so that a model that did not fully reach the GPU is never used
  device.pushErrorScope("out-of-memory");
  device.pushErrorScope("validation");
  // Shards go to the GPU while the next ones download (a second visit reads them from IndexedDB).
  // The store holds the model's lock meanwhile: a tab deleting it waits until the weights are on the GPU.
  const { fetched, result: text } = await store.load(downloadProgress, async () => {
    const header = await store.header();
    const out = await session.load(JSON.stringify(store.manifest), header, sink,
      JSON.stringify({ contextLength: contextLength ?? null, chatTemplate: chatTemplate ?? null,
                       gpuMemoryLimit: gpuMemoryLimit ?? null, tuningCache }), plan);
    fail(out);          // a refused model stops the download too
    return out;
  }).catch(async (e) => {
    await device.popErrorScope().catch(() => {});
    await device.popErrorScope().catch(() => {});
    throw e;
  });
  store.release();
  const invalid = await device.popErrorScope();
  const oom = await device.popErrorScope();
  if (oom || invalid) {
    session.unload();
    replayer = null;
    throw new Error(oom ? `the GPU ran out of memory while loading the model: ${oom.message}`
                        : `the GPU rejected the model's setup: ${invalid.message}`);
  }
  const info2 = fail(text);
  if (info2.tuning && info2.tuning.source === "measured") {   // timed once per adapter, kept for next visits
    await putSetting("tuning", { ...tuningCache, [info2.tuning.key]: info2.tuning.choice }).catch(() => {});
  }
  info2.shardsFetched = fetched + (store.refetched || 0);
  info2.shardsRefetched = store.refetched || 0;
  info2.downloadSeconds = (t1 - t0) / 1000;
  info2.loadSeconds = (performance.now() - t0) / 1000;
  info2.modelId = store.id;
  return info2;
}

// For fault tests: the GPU refuses every buffer after the first n, as a device out of memory does.
function injectAllocationFailure(r, n) {
  const real = r.createBuffer.bind(r);
  let made = 0;
  r.createBuffer = (size, label) => {
    if (++made > n) { r.error = `out of memory (${size} bytes)`; return -1; }
    return real(size, label);
  };
}

function reply(id, type, data) { self.postMessage({ id, type, data }); }

function fail(text) {
  const parsed = JSON.parse(text);
  if (parsed && parsed.error) {
    const e = new Error(parsed.error.message);
    e.field = parsed.error.field;
    e.type = parsed.error.type;
    throw e;
  }
  return parsed;
}

const ops = {
  async load(id, args) {
    try {
      return await load(id, args);
    } catch (e) {
      // nothing of a failed load stays: no half-built model is ever used, and the GPU memory is freed
      if (session) session.unload();
      if (replayer) replayer.destroyAll();
      replayer = null;
      throw e;
    }
  },

  async complete(id, { request, kind }) {
    if (!session || !replayer) throw new Error("no model is loaded");
    if (replayer.lostReason) throw new Error(`the GPU device was lost (${replayer.lostReason}); create the engine again`);
    const device = replayer.device;
    device.pushErrorScope("out-of-memory");
    device.pushErrorScope("validation");
    const text = await session.complete(request, (chunk) => reply(id, "chunk", chunk), kind || "chat", id);
    const invalid = await device.popErrorScope();
    const oom = await device.popErrorScope();
    if (oom || invalid) throw new Error(`the GPU failed during the request: ${(oom || invalid).message}`);
    return fail(text);
  },

  // what the engine holds: for soak tests and the benchmark
  async memory() {
    const buffers = replayer ? [...replayer.objects.values()].filter((o) => o instanceof GPUBuffer) : [];
    let pyObjects = null;
    if (pyodide) pyObjects = pyodide.runPython("import gc\ngc.collect()\nlen(gc.get_objects())");
    return {
      gpuBuffers: buffers.length,
      gpuBytes: buffers.reduce((a, b) => a + b.size, 0),
      wasmHeapBytes: pyodide ? pyodide._module.HEAP8.length : 0,
      pythonObjects: pyObjects,
      workerJsHeapBytes: (self.performance && performance.memory) ? performance.memory.usedJSHeapSize : null,
    };
  },

  // for fault tests: what a driver reset does to the page
  async loseDevice() { if (replayer) replayer.device.destroy(); },

  // for the benchmark: bandwidth, arithmetic rate and a per-kernel profile, measured by the engine's
  // Python in this worker
  async profile(id, { decodeTokS, prefillTokS, promptTokens }) {
    if (!session) throw new Error("no model is loaded");
    return fail(await session.profile(decodeTokS || 0, prefillTokS || 0, promptTokens || 128));
  },

  async reset() { if (session) session.reset(); },
  async stats() { return session ? JSON.parse(session.runtime_stats()) : {}; },
  async unload() { if (session) session.unload(); replayer = null; },
};

let active = null;   // the id of the request running now

self.onmessage = (e) => {
  const { id, op, args } = e.data;
  if (op === "interrupt") {            // never queued: it must reach the running request
    if (session && active !== null) session.interrupt(active);
    reply(id, "result", null);
    return;
  }
  const run = async () => {
    if (op === "complete") active = id;
    try {
      if (!ops[op]) throw new Error(`unknown operation ${op}`);
      reply(id, "result", await ops[op](id, args || {}));
    } catch (err) {
      reply(id, "error", { message: err && err.message ? err.message : String(err), field: err && err.field,
                           type: err && err.type });
    } finally {
      if (active === id) active = null;
    }
  };
  queue = queue.then(run, run);
};
