// Where the download cache lives: model shards in IndexedDB (each a Blob), each verified by
// sha256 before it is stored and again before its bytes go to the GPU.

const DB_NAME = "pyengine";
const DB_VERSION = 2;      // 2: a "settings" store (kernel tuning per adapter) beside models and shards
const MANIFEST_FORMAT = "pyengine-shards";
const MANIFEST_VERSION = 1;

function req(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

function done(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error);
    tx.onabort = () => reject(tx.error || new Error("IndexedDB transaction aborted"));
  });
}

let dbPromise = null;
export function openDB() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const r = indexedDB.open(DB_NAME, DB_VERSION);
      r.onupgradeneeded = () => {
        const db = r.result;
        const have = new Set(db.objectStoreNames);
        if (!have.has("models")) db.createObjectStore("models", { keyPath: "id" });
        if (!have.has("shards")) db.createObjectStore("shards", { keyPath: ["model", "index"] });
        if (!have.has("settings")) db.createObjectStore("settings", { keyPath: "key" });
      };
      r.onsuccess = () => resolve(r.result);
      r.onerror = () => { dbPromise = null; reject(r.error); };
    });
  }
  return dbPromise;
}

export async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

const MAX_SHARD = 32 << 20;
const HEX64 = /^[0-9a-f]{64}$/;
const SHARD_FILE = /^[A-Za-z0-9_-][A-Za-z0-9._-]*$/;   // a plain name beside the manifest: no scheme, no path

// The same checks as pyengine/shards.py: a manifest that fails them is never used.
export function checkManifest(m) {
  const bad = (msg) => { throw new Error(`the model manifest is not usable: ${msg}`); };
  if (!m || typeof m !== "object" || m.format !== MANIFEST_FORMAT) throw new Error("not a pyengine shard manifest");
  if (m.version !== MANIFEST_VERSION) {
    throw new Error(`manifest version ${m.version} is not supported; this engine reads ${MANIFEST_VERSION}`);
  }
  if (!m.model || !Number.isSafeInteger(m.model.size) || typeof m.model.sha256 !== "string" || !HEX64.test(m.model.sha256)) {
    bad("its model entry needs an integer size and a sha256");
  }
  if (!Array.isArray(m.shards) || !m.shards.length) bad("it lists no shards");
  let pos = 0;
  m.shards.forEach((s, i) => {
    if (!s || typeof s !== "object") bad(`shard ${i} is not an object`);
    if (typeof s.file !== "string" || !SHARD_FILE.test(s.file)) {
      bad(`shard ${i} names a file outside the manifest's folder: ${JSON.stringify(s.file)}`);
    }
    if (typeof s.sha256 !== "string" || !HEX64.test(s.sha256)) bad(`shard ${i} needs a sha256`);
    if (s.offset !== pos || !Number.isSafeInteger(s.size) || s.size <= 0 || s.size > MAX_SHARD) {
      bad(`shard ${i} does not continue the byte ranges (offset ${s.offset}, size ${s.size})`);
    }
    pos += s.size;
  });
  if (pos !== m.model.size) bad(`the shards cover ${pos} bytes but the model has ${m.model.size}`);
  return m;
}

// One Web Lock per model: downloading and deleting take it alone, uploading to the GPU shares it,
// so two tabs never fetch the same shard twice and a delete never pulls shards from under a load.
function withLock(id, mode, fn) {
  if (typeof navigator !== "undefined" && navigator.locks) {
    return navigator.locks.request(`pyengine-model-${id}`, { mode }, fn);
  }
  return fn();
}

const STOPPED = "the download stopped because the load failed";
const MB = (n) => `${(n / 1e6).toFixed(1)} MB`;

// The buffers shard bytes are read into, used again and again: a download or a read from IndexedDB
// fills one, and it comes back once the upload has moved past its shard. A load then allocates a
// few buffers, not one per shard (plus the fetch's chunks) that V8 frees only when it next collects:
// garbage that kept the page several shards above its footprint while loading.
class BufferPool {
  constructor(size, keep) {
    this.size = size;
    this.keep = keep;
    this.free = [];
    this.made = 0;               // buffers allocated: a load of any number of shards needs keep of them
  }

  take(n) {
    if (n <= this.size && this.free.length) return this.free.pop();
    this.made += 1;
    return new ArrayBuffer(Math.max(n, this.size));
  }

  // A buffer a stream has detached has no bytes left: it is dropped.
  give(buf) {
    if (buf && buf.byteLength === this.size && this.free.length < this.keep && !this.free.includes(buf)) this.free.push(buf);
  }

  clear() { this.free = []; }
}

// Reads a body of exactly `size` bytes into a buffer of `pool`: straight into it where the stream
// can (a byte stream's BYOB reader), chunk by chunk otherwise. Resolves to a view of the bytes;
// throws when the body is shorter or longer, or when no byte arrives for stallMs (a stalled stream
// never ends by itself).
async function readBody(body, size, pool, stallMs) {
  let byob = null;
  try { byob = body.getReader({ mode: "byob" }); } catch (e) { byob = null; }
  const reader = byob || body.getReader();
  const read = (view) => {
    let timer = null;
    const stalled = new Promise((_, bad) => {
      timer = setTimeout(() => {
        reader.cancel().catch(() => {});
        bad(new Error(`no data for ${stallMs / 1000} s`));
      }, stallMs);
    });
    return Promise.race([view ? reader.read(view) : reader.read(), stalled]).finally(() => clearTimeout(timer));
  };
  let buf = pool.take(size);
  let n = 0;
  const tooLong = () => new Error(`got more than ${size} bytes, expected ${size}`);
  if (byob) {
    while (n < size) {
      const { done, value } = await read(new Uint8Array(buf, n, size - n));
      if (value) buf = value.buffer;        // the same memory, handed back by the stream
      if (done) break;
      n += value.byteLength;
    }
    if (n === size) {
      const { done } = await read(new Uint8Array(1));
      if (!done) { reader.cancel().catch(() => {}); throw tooLong(); }
    }
  } else {
    const out = new Uint8Array(buf, 0, size);
    for (;;) {
      const { done, value } = await read(null);
      if (done) break;
      if (n + value.byteLength > size) { reader.cancel().catch(() => {}); throw tooLong(); }
      out.set(value, n);
      n += value.byteLength;
    }
  }
  if (n !== size) {
    pool.give(buf);
    throw new Error(`got ${n} bytes, expected ${size}`);
  }
  return new Uint8Array(buf, 0, size);
}

// The hand-over between a download and the upload that runs beside it: shards arrive in any order,
// the upload takes them in file order, and no more than `window` of them are downloading or waiting
// to be taken at once. A shard the upload has gone past is not kept (it is stored: a later read of
// it comes from IndexedDB).
class ShardPipe {
  constructor(window, recycle = () => {}) {
    this.window = Math.max(1, window);
    this.recycle = recycle;      // takes the bytes of a shard nobody will use
    this.slots = new Map();      // index -> {promise, resolve, reject, data, state}
    this.frontier = -1;          // the highest index the upload has asked for
    this.held = 0;               // shards downloading or waiting to be taken
    this.wakers = [];
    this.stopped = false;
    this.finished = false;
    this.error = null;
    this.ready = new Promise((ok, bad) => { this._opened = ok; this._refused = bad; });
    this.ready.catch(() => {});
  }

  // The shards to download: the upload waits for this list before it asks for any shard.
  open(indices) {
    for (const i of indices) {
      const slot = { state: "waiting", data: null };
      slot.promise = new Promise((ok, bad) => { slot.resolve = ok; slot.reject = bad; });
      slot.promise.catch(() => {});
      this.slots.set(i, slot);
    }
    this._opened();
  }

  // Waits until one more shard may be downloaded, then counts it.
  async room() {
    while (this.held >= this.window && !this.stopped && !this.error && !this.finished) {
      await new Promise((wake) => this.wakers.push(wake));
    }
    this.held += 1;
  }

  unroom() { this.held -= 1; this._wake(); }

  _wake() { for (const w of this.wakers.splice(0)) w(); }

  _free(slot) {
    if (slot.data) this.recycle(slot.data);
    slot.data = null;
    if (slot.state === "arrived") { this.held -= 1; slot.state = "gone"; this._wake(); }
  }

  arrived(i, data) {
    const slot = this.slots.get(i);
    slot.state = "arrived";
    slot.data = data;
    slot.resolve();
    if (i < this.frontier || this.finished) this._free(slot);
  }

  // The bytes of shard i if it is (or is about to be) a fresh download, else null.
  async take(i) {
    await this.ready;
    this.frontier = Math.max(this.frontier, i);
    for (const [j, slot] of this.slots) if (j < i) this._free(slot);
    const slot = this.slots.get(i);
    if (!slot || slot.state === "gone") return null;
    await slot.promise;
    const data = slot.data;
    slot.data = null;
    this._free(slot);
    return data;
  }

  fail(e) {
    this.error = e;
    this._refused(e);
    for (const slot of this.slots.values()) if (slot.state === "waiting") slot.reject(e);
    this._wake();
  }

  stop() { this.stopped = true; this._wake(); }

  // The upload is done: what is left downloads (to be stored) without waiting for it.
  finish() {
    this.finished = true;
    for (const slot of this.slots.values()) this._free(slot);
    this._wake();
  }
}

export class ShardStore {
  // One shard downloads while the one before it goes to the GPU: two downloading at once held a
  // third shard's bytes in memory and loaded no faster (benchmarks/load_memory.py).
  constructor(manifestUrl, manifest, { concurrency = 1, fetchImpl, attempts = 4, backoffMs = 500,
                                       stallMs = 30000 } = {}) {
    this.url = manifestUrl;
    this.manifest = checkManifest(manifest);
    this.id = manifest.model.sha256;   // content hash: another model or version never mixes in
    this.concurrency = concurrency;
    this.attempts = attempts;
    this.backoffMs = backoffMs;
    this.stallMs = stallMs;
    this.fetch = fetchImpl || ((...a) => fetch(...a));
    this.current = null;               // the one shard held in memory while uploading
    this.requests = 0;
    // the shards downloading or waiting and the one being uploaded (or read from IndexedDB)
    this.buffers = new BufferPool(Math.max(...this.manifest.shards.map((s) => s.size)), concurrency + 1);
  }

  static async open(manifestUrl, opts) {
    const res = await fetch(manifestUrl, { cache: "no-cache" });
    if (!res.ok) throw new Error(`could not fetch the model manifest ${manifestUrl}: HTTP ${res.status}`);
    let m;
    try { m = await res.json(); } catch (e) { throw new Error(`the model manifest ${manifestUrl} is not JSON`); }
    return new ShardStore(manifestUrl, m, opts);
  }

  async storedIndices() {
    const db = await openDB();
    const tx = db.transaction("shards", "readonly");
    const keys = await req(tx.objectStore("shards").getAllKeys(IDBKeyRange.bound([this.id, 0], [this.id, Infinity])));
    return new Set(keys.map((k) => k[1]));
  }

  async _putModel(complete) {
    const db = await openDB();
    const tx = db.transaction("models", "readwrite");
    const m = this.manifest;
    tx.objectStore("models").put({
      id: this.id, name: m.model.name, size: m.model.size, shards: m.shards.length, manifestUrl: this.url,
      manifest: m, complete, storedAt: Date.now(),
    });
    await done(tx);
  }

  // Fetches, verifies and stores every shard not already stored, with nothing to upload: load() alone.
  ensure(onProgress = () => {}) { return this.load(onProgress, async () => undefined); }

  // Runs fn while holding this model's lock in shared mode (reading shards to upload them).
  reading(fn) { return withLock(this.id, "shared", fn); }

  // Downloads what is missing and runs `use` (the upload to the GPU, which reads the shards in order
  // through shardBytes) at the same time: each shard goes to the GPU as soon as it is verified and
  // stored, while the next ones download. At most `concurrency` shards are in memory besides the
  // one being uploaded. Resolves to use's result once every shard is stored; a failed download fails
  // the upload that waits for it, and a failed upload starts no new download. onProgress gets bytes
  // and shards done. Then removes older versions of the model from the same manifest URL: an upgrade
  // replaces them.
  async load(onProgress, use) {
    const stored = (await this.storedIndices()).size === this.manifest.shards.length;
    const r = stored ? await this._loadStored(onProgress, use)
      : await withLock(this.id, "exclusive", () => this._loadDownloading(onProgress, use));
    r.removed = await this._dropStaleVersions();
    return r;
  }

  async _loadStored(onProgress, use) {
    const n = this.manifest.shards.length, size = this.manifest.model.size;
    onProgress({ phase: "download", loadedBytes: size, totalBytes: size, shardsDone: n, shardsTotal: n });
    return { fetched: 0, result: await this.reading(use) };
  }

  async _loadDownloading(onProgress, use) {
    const pipe = this.pipe = new ShardPipe(this.concurrency, (bytes) => this.buffers.give(bytes.buffer));
    const download = this._fetchMissing(onProgress, pipe).catch((e) => { pipe.fail(e); throw e; });
    download.catch(() => {});
    let result;
    try {
      result = await use();
    } catch (e) {
      pipe.stop();
      const d = await download.then(() => null, (err) => err);
      throw d && d.message !== STOPPED ? d : e;   // a download that failed is the cause to report
    } finally {
      this.pipe = null;
    }
    pipe.finish();
    const { fetched } = await download;
    return { fetched, result };
  }

  async _dropStaleVersions() {
    const db = await openDB();
    const models = await req(db.transaction("models", "readonly").objectStore("models").getAll());
    const stale = models.filter((m) => m.manifestUrl === this.url && m.id !== this.id).map((m) => m.id);
    for (const id of stale) await deleteCachedModel(id);
    return stale;
  }

  // Fetches, verifies and stores the shards not stored yet, handing each to `pipe`.
  async _fetchMissing(onProgress, pipe) {
    const shards = this.manifest.shards;
    const have = await this.storedIndices();
    const missing = shards.map((s, i) => i).filter((i) => !have.has(i));
    const total = shards.reduce((a, s) => a + s.size, 0);
    let loaded = shards.reduce((a, s, i) => a + (have.has(i) ? s.size : 0), 0);
    let count = have.size;
    const report = () => onProgress({ phase: "download", loadedBytes: loaded, totalBytes: total, shardsDone: count, shardsTotal: shards.length });
    report();
    pipe.open(missing);
    if (!missing.length) return { fetched: 0 };
    const need = missing.reduce((a, i) => a + shards[i].size, 0);
    if (navigator.storage && navigator.storage.estimate) {
      const { quota, usage } = await navigator.storage.estimate();
      if (quota !== undefined && usage !== undefined && quota - usage < need) {
        throw new Error(`not enough browser storage for this model: it needs ${MB(need)} more, ` +
          `and ${MB(Math.max(0, quota - usage))} is free`);
      }
    }
    await this._putModel(false);
    let next = 0;
    let failed = false;
    const worker = async () => {
      for (;;) {
        await pipe.room();      // no more shards in memory than the upload lets through
        if (next >= missing.length || failed || pipe.stopped) {
          pipe.unroom();
          return;
        }
        const i = missing[next++];
        const data = await this._fetchShard(i);
        await this._store(i, data);
        pipe.arrived(i, data);
        loaded += shards[i].size;
        count += 1;
        report();
      }
    };
    // on a failure no new shard starts, the ones in flight finish and stay stored for the next attempt
    const results = await Promise.allSettled(Array.from({ length: Math.min(this.concurrency, missing.length) },
      () => worker().catch((e) => {
        failed = true;
        pipe.fail(e);      // the upload waiting for a shard, and workers waiting for room, end now
        throw e;
      })));
    const bad = results.find((r) => r.status === "rejected");
    if (bad) throw bad.reason;
    if (pipe.stopped) throw new Error(STOPPED);
    await this._putModel(true);
    return { fetched: missing.length };
  }

  // A stored shard is recorded in one transaction with its bytes: a refused write records nothing.
  async _store(i, data) {
    const db = await openDB();
    const tx = db.transaction("shards", "readwrite");
    tx.objectStore("shards").put({ model: this.id, index: i, sha256: this.manifest.shards[i].sha256, data: new Blob([data]) });
    try {
      await done(tx);
    } catch (e) {
      if (e && e.name === "QuotaExceededError") {
        throw new Error(`the browser refused to store the model (QuotaExceededError): it needs ` +
          `${MB(this.manifest.model.size)} of storage in all; free some space or delete cached models`);
      }
      throw e;
    }
  }

  async _fetchShard(i) {
    const s = this.manifest.shards[i];
    const url = new URL(s.file, this.url).href;
    let last = null;
    for (let attempt = 0; attempt < this.attempts; attempt++) {
      if (attempt) await new Promise((r) => setTimeout(r, this.backoffMs * 2 ** (attempt - 1)));
      try {
        this.requests++;
        const data = await this._download(url, s.size);
        if ((await sha256Hex(data)) !== s.sha256) {
          this.buffers.give(data.buffer);
          throw new Error("its sha256 does not match the manifest");
        }
        return data;
      } catch (e) {
        last = e;
      }
    }
    throw new Error(`shard ${s.file} could not be downloaded after ${this.attempts} attempts: ${last && last.message}`);
  }

  // The body, `size` bytes read into a buffer of the pool (a view of them), failing when no byte
  // arrives for stallMs (a stalled connection never ends by itself) or when the body is not `size`
  // bytes long.
  async _download(url, size) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), this.stallMs);    // until the response starts
    try {
      const res = await this.fetch(url, { signal: ctl.signal });
      clearTimeout(timer);
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      if (!res.body) {
        const data = await res.arrayBuffer();
        if (data.byteLength !== size) throw new Error(`got ${data.byteLength} bytes, expected ${size}`);
        return new Uint8Array(data);
      }
      return await readBody(res.body, size, this.buffers, this.stallMs);
    } catch (e) {
      if (ctl.signal.aborted) throw new Error(`no data for ${this.stallMs / 1000} s`);
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  // A stored shard's bytes in a buffer of the pool: a Blob (or an ArrayBuffer, as earlier versions
  // stored them), or null where there is none.
  async _readStored(data) {
    if (data instanceof ArrayBuffer) return new Uint8Array(data);
    if (!(data instanceof Blob)) return null;
    try {
      return await readBody(data.stream(), data.size, this.buffers, this.stallMs);
    } catch (e) {
      return null;        // unreadable: fetched again
    }
  }

  _drop() {
    if (this.current) this.buffers.give(this.current.bytes.buffer);
    this.current = null;
  }

  async shardBytes(i) {
    if (this.current && this.current.index === i) return this.current.bytes;
    this._drop();
    const fresh = this.pipe && await this.pipe.take(i);    // just downloaded and verified
    if (fresh) {
      this.current = { index: i, bytes: fresh };
      return fresh;
    }
    const db = await openDB();
    const tx = db.transaction("shards", "readonly");
    const rec = await req(tx.objectStore("shards").get([this.id, i]));
    let bytes = rec ? await this._readStored(rec.data) : null;
    if (!bytes || (await sha256Hex(bytes)) !== this.manifest.shards[i].sha256) {
      // missing or changed inside IndexedDB since it was stored: never upload it; fetch it again
      if (bytes) this.buffers.give(bytes.buffer);
      this.refetched = (this.refetched || 0) + 1;
      await this._deleteShard(i);
      bytes = await this._fetchShard(i);
      await this._store(i, bytes);
    }
    this.current = { index: i, bytes };
    return bytes;
  }

  async _deleteShard(i) {
    const db = await openDB();
    const tx = db.transaction("shards", "readwrite");
    tx.objectStore("shards").delete([this.id, i]);
    await done(tx);
  }

  header() { return this.shardBytes(0); }

  // Copies file bytes [offset, offset + n) into GPU buffer `bufId` through the replayer;
  // onWritten(bytes) after each shard's part.
  async writeTensor(replayer, bufId, offset, n, onWritten = () => {}) {
    const shards = this.manifest.shards;
    let dst = 0;
    for (let i = 0; i < shards.length && n > 0; i++) {
      const s = shards[i];
      if (offset >= s.offset + s.size || offset + n <= s.offset) continue;
      const bytes = await this.shardBytes(i);
      const start = offset - s.offset;
      const len = Math.min(n, s.size - start);
      replayer.writeBytes(bufId, dst, bytes, start, len);
      onWritten(len);
      dst += len;
      offset += len;
      n -= len;
    }
    if (n > 0) throw new Error("a tensor reaches past the end of the model's shards");
  }

  // The upload is done with the shards: what the pool holds goes too.
  release() {
    this.current = null;
    this.buffers.clear();
  }
}

export async function listCachedModels() {
  const db = await openDB();
  const models = await req(db.transaction("models", "readonly").objectStore("models").getAll());
  const out = [];
  for (const m of models) {
    const tx = db.transaction("shards", "readonly");
    const keys = await req(tx.objectStore("shards").getAllKeys(IDBKeyRange.bound([m.id, 0], [m.id, Infinity])));
    const stored = keys.reduce((a, k) => a + (m.manifest.shards[k[1]] ? m.manifest.shards[k[1]].size : 0), 0);
    out.push({ id: m.id, name: m.name, size: m.size, storedBytes: stored, complete: m.complete && keys.length === m.shards,
      shards: m.shards, storedShards: keys.length, manifestUrl: m.manifestUrl });
  }
  return out;
}

// Removes what no complete model uses: incomplete models other than those named in `keep` (checked
// again under the model's lock, so a download that completes meanwhile is kept) and shards of no model.
export async function cleanupCache({ keep = [] } = {}) {
  const db = await openDB();
  const models = await req(db.transaction("models", "readonly").objectStore("models").getAll());
  const removed = [];
  for (const m of models) {
    if (m.complete || keep.includes(m.id)) continue;
    await withLock(m.id, "exclusive", async () => {
      const now = await req(db.transaction("models", "readonly").objectStore("models").get(m.id));
      if (now && !now.complete) { await removeModel(db, m.id); removed.push(m.id); }
    });
  }
  const known = new Set((await req(db.transaction("models", "readonly").objectStore("models").getAllKeys())));
  const keys = await req(db.transaction("shards", "readonly").objectStore("shards").getAllKeys());
  const orphans = [...new Set(keys.map((k) => k[0]).filter((id) => !known.has(id)))];
  for (const id of orphans) {
    await withLock(id, "exclusive", async () => {
      const now = await req(db.transaction("models", "readonly").objectStore("models").get(id));
      if (!now) { await removeModel(db, id); removed.push(id); }
    });
  }
  return removed;
}

async function removeModel(db, id) {
  const tx = db.transaction(["models", "shards"], "readwrite");
  tx.objectStore("models").delete(id);
  tx.objectStore("shards").delete(IDBKeyRange.bound([id, 0], [id, Infinity]));
  await done(tx);
}

// Small records the engine keeps between visits (the kernel variants measured best on this adapter).
export async function getSetting(key) {
  const db = await openDB();
  const rec = await req(db.transaction("settings", "readonly").objectStore("settings").get(key));
  return rec ? rec.value : undefined;
}

export async function putSetting(key, value) {
  const db = await openDB();
  const tx = db.transaction("settings", "readwrite");
  tx.objectStore("settings").put({ key, value });
  await done(tx);
}

// Waits for any tab downloading or uploading this model, then removes it in one transaction.
export async function deleteCachedModel(id) {
  if (typeof id !== "string" || !id) throw new Error("deleteCachedModel: give the id of a cached model");
  await withLock(id, "exclusive", async () => removeModel(await openDB(), id));
}
