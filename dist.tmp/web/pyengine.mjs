// pyengine's JavaScript API, shaped like OpenAI's chat.completions (and WebLLM's engine),
// over a Web Worker that runs the Python engine on WebGPU.
//
//   import { createEngine } from "./web/pyengine.mjs";
//   const engine = await createEngine({ model: "models/smollm2/manifest.json", onProgress: console.log });
//   const reply = await engine.chat.completions.create({ messages: [{ role: "user", content: "Hi" }] });
//   for await (const chunk of await engine.chat.completions.create({ messages, stream: true })) { ... }

export { listCachedModels, deleteCachedModel, cleanupCache } from "./shards.js";

class Channel {
  constructor(worker) {
    this.worker = worker;
    this.next = 1;
    this.pending = new Map();
    worker.onmessage = (e) => {
      const { id, type, data } = e.data;
      const p = this.pending.get(id);
      if (!p) return;
      if (type === "progress") p.onProgress?.(data);
      else if (type === "chunk") p.onChunk?.(JSON.parse(data));
      else {
        this.pending.delete(id);
        if (type === "error") {
          const err = new Error(data.message);
          if (data.field) err.field = data.field;
          if (data.type) err.name = data.type;
          p.reject(err);
        } else p.resolve(data);
      }
    };
    worker.onerror = (e) => {
      const err = new Error(`the engine's worker failed: ${e.message || "unknown error"}`);
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
  }

  call(op, args, handlers = {}) {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, ...handlers });
      try {
        this.worker.postMessage({ id, op, args });
      } catch (e) {
        this.pending.delete(id);
        reject(new Error(`request: it could not be sent to the engine (${e.message})`));
      }
    });
  }
}

class ChunkStream {
  constructor() { this.items = []; this.waiters = []; this.closed = false; this.error = null; }
  push(x) { const w = this.waiters.shift(); if (w) w.resolve({ value: x, done: false }); else this.items.push(x); }
  close(err) {
    this.closed = true; this.error = err || null;
    for (const w of this.waiters.splice(0)) err ? w.reject(err) : w.resolve({ value: undefined, done: true });
  }
  [Symbol.asyncIterator]() {
    return {
      next: () => {
        if (this.items.length) return Promise.resolve({ value: this.items.shift(), done: false });
        if (this.closed) return this.error ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
      },
    };
  }
}

// JSON would turn NaN and Infinity into null (the default); they reach the checks as text instead,
// so the error names the field.
function requestJson(request) {
  return JSON.stringify(request, (k, v) => {
    if (typeof v === "number" && !Number.isFinite(v)) return String(v);
    if (typeof v === "bigint") return v.toString();
    return v;
  });
}

function badRequest(field, message) {
  return Object.assign(new Error(`${field}: ${message}`), { field, name: "RequestError" });
}

export class Engine {
  constructor(channel, worker, info, onBusy = "queue") {
    this._ch = channel;
    this._worker = worker;
    this.info = info;
    this._onBusy = onBusy;
    this._running = 0;
    this.chat = { completions: { create: (request) => this._create(request, "chat") } };
    this.completions = { create: (request) => this._create(request, "text") };   // plain text, no template
  }

  _create(request, kind) {
    if (request === null || typeof request !== "object" || Array.isArray(request)) {
      return Promise.reject(badRequest("request", "must be an object"));
    }
    let text;
    try { text = requestJson(request); } catch (e) { return Promise.reject(badRequest("request", e.message)); }
    if (this._onBusy === "reject" && this._running > 0) {
      return Promise.reject(Object.assign(new Error("another request is running on this engine; wait for it " +
        "to finish or interrupt it (this engine rejects requests instead of queueing them)"), { name: "EngineBusyError" }));
    }
    this._running++;
    const finished = () => { this._running--; };
    if (!request.stream) {
      const p = this._ch.call("complete", { request: text, kind });
      p.then(finished, finished);
      return p;
    }
    const stream = new ChunkStream();
    const started = this._ch.call("complete", { request: text, kind }, { onChunk: (c) => stream.push(c) });
    started.then(finished, finished);
    // a bad streaming request rejects create() itself, like a non-streaming one
    return new Promise((resolve, reject) => {
      let settled = false;
      started.then(() => { stream.close(); if (!settled) { settled = true; resolve(stream); } },
                   (err) => { stream.close(err); if (!settled) { settled = true; reject(err); } });
      const first = stream.push.bind(stream);
      stream.push = (c) => { first(c); if (!settled) { settled = true; resolve(stream); } };
    });
  }

  interruptGenerate() { return this._ch.call("interrupt"); }
  resetChat() { return this._ch.call("reset"); }
  runtimeStats() { return this._ch.call("stats"); }
  memoryStats() { return this._ch.call("memory"); }
  _profileForBenchmark({ decodeTokS, prefillTokS, promptTokens }) {
    return this._ch.call("profile", { decodeTokS, prefillTokS, promptTokens });
  }
  _loseDeviceForTesting() { return this._ch.call("loseDevice"); }
  async unload() {
    await this._ch.call("unload");
    this._worker.terminate();
  }
}

// download: { concurrency, attempts, backoffMs, stallMs } tunes how shards are fetched.
// onBusy: "queue" (default) runs requests that arrive together one after another, in order;
// "reject" fails a request made while another runs.
// gpuMemoryLimit: bytes of GPU memory the model may use; one needing more fails before any weight reaches the
// GPU, and its download stops there.
export async function createEngine({ model, onProgress, contextLength, chatTemplate, download, onBusy = "queue",
                                     gpuMemoryLimit, _faults } = {}) {
  if (typeof model !== "string" || !model) {
    throw badRequest("model", "give the URL of a model's manifest.json");
  }
  if (contextLength != null && (!Number.isInteger(contextLength) || contextLength < 1)) {
    throw badRequest("contextLength", `must be a positive integer, got ${contextLength}`);
  }
  if (onBusy !== "queue" && onBusy !== "reject") {
    throw badRequest("onBusy", `must be "queue" or "reject", got ${JSON.stringify(onBusy)}`);
  }
  const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
  const ch = new Channel(worker);
  try {
    const info = await ch.call("load", { model: new URL(model, location.href).href, contextLength, chatTemplate,
                                         download, gpuMemoryLimit, faults: _faults }, { onProgress });
    return new Engine(ch, worker, info, onBusy);
  } catch (e) {
    worker.terminate();
    throw e;
  }
}
