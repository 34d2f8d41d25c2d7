// Where the download cache lives: model shards in IndexedDB, each verified by sha256
// before it is stored and again before its bytes go to the GPU.

const DB_NAME = "pyengine";
const DB_VERSION = 1;
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
        db.createObjectStore("models", { keyPath: "id" });
        db.createObjectStore("shards", { keyPath: ["model", "index"] });
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

export function checkManifest(m) {
  if (!m || m.format !== MANIFEST_FORMAT) throw new Error("not a pyengine shard manifest");
  if (m.version !== MANIFEST_VERSION) {
    throw new Error(`manifest version ${m.version} is not supported; this engine reads ${MANIFEST_VERSION}`);
  }
  if (!m.model || typeof m.model.sha256 !== "string" || !Array.isArray(m.shards) || !m.shards.length) {
    throw new Error("the manifest has no model hash or no shards");
  }
  return m;
}

const MB = (n) => `${(n / 1e6).toFixed(1)} MB`;

export class ShardStore {
  constructor(manifestUrl, manifest, { concurrency = 3, fetchImpl } = {}) {
    this.url = manifestUrl;
    this.manifest = checkManifest(manifest);
    this.id = manifest.model.sha256;   // content hash: another model or version never mixes in
    this.concurrency = concurrency;
    this.fetch = fetchImpl || ((...a) => fetch(...a));
    this.current = null;               // the one shard held in memory while uploading
    this.requests = 0;
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

  // Fetches, verifies and stores every shard not already stored; onProgress gets bytes and shards done.
  async ensure(onProgress = () => {}) {
    const shards = this.manifest.shards;
    const have = await this.storedIndices();
    const missing = shards.map((s, i) => i).filter((i) => !have.has(i));
    const total = shards.reduce((a, s) => a + s.size, 0);
    let loaded = shards.reduce((a, s, i) => a + (have.has(i) ? s.size : 0), 0);
    let count = have.size;
    const report = (phase) => onProgress({ phase, loadedBytes: loaded, totalBytes: total, shardsDone: count, shardsTotal: shards.length });
    report("download");
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
    const worker = async () => {
      while (next < missing.length) {
        const i = missing[next++];
        const data = await this._fetchShard(i);
        const db = await openDB();
        const tx = db.transaction("shards", "readwrite");
        tx.objectStore("shards").put({ model: this.id, index: i, sha256: shards[i].sha256, data });
        await done(tx);
        loaded += shards[i].size;
        count += 1;
        report("download");
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.concurrency, missing.length) }, worker));
    await this._putModel(true);
    return { fetched: missing.length };
  }

  async _fetchShard(i) {
    const s = this.manifest.shards[i];
    const url = new URL(s.file, this.url).href;
    let last = null;
    for (let attempt = 0; attempt < 4; attempt++) {
      if (attempt) await new Promise((r) => setTimeout(r, 250 * 2 ** attempt));
      try {
        this.requests++;
        const res = await this.fetch(url);
        if (!res.ok) throw new Error(`HTTP ${res.status}`);
        const data = await res.arrayBuffer();
        if (data.byteLength !== s.size) throw new Error(`got ${data.byteLength} bytes, expected ${s.size}`);
        if ((await sha256Hex(data)) !== s.sha256) throw new Error("its sha256 does not match the manifest");
        return data;
      } catch (e) {
        last = e;
      }
    }
    throw new Error(`shard ${s.file} could not be downloaded: ${last && last.message}`);
  }

  async shardBytes(i) {
    if (this.current && this.current.index === i) return this.current.bytes;
    this.current = null;
    const db = await openDB();
    const tx = db.transaction("shards", "readonly");
    const rec = await req(tx.objectStore("shards").get([this.id, i]));
    if (!rec) throw new Error(`shard ${i} of the model is missing from the browser cache`);
    if ((await sha256Hex(rec.data)) !== this.manifest.shards[i].sha256) {
      await this._deleteShard(i);
      throw new Error(`shard ${i} of the model was corrupt in the browser cache and was removed; load again`);
    }
    this.current = { index: i, bytes: new Uint8Array(rec.data) };
    return this.current.bytes;
  }

  async _deleteShard(i) {
    const db = await openDB();
    const tx = db.transaction(["shards", "models"], "readwrite");
    tx.objectStore("shards").delete([this.id, i]);
    await done(tx);
  }

  header() { return this.shardBytes(0); }

  // Copies file bytes [offset, offset + n) into GPU buffer `bufId` through the replayer.
  async writeTensor(replayer, bufId, offset, n) {
    const shards = this.manifest.shards;
    let dst = 0;
    for (let i = 0; i < shards.length && n > 0; i++) {
      const s = shards[i];
      if (offset >= s.offset + s.size || offset + n <= s.offset) continue;
      const bytes = await this.shardBytes(i);
      const start = offset - s.offset;
      const len = Math.min(n, s.size - start);
      replayer.writeBytes(bufId, dst, bytes, start, len);
      dst += len;
      offset += len;
      n -= len;
    }
    if (n > 0) throw new Error("a tensor reaches past the end of the model's shards");
  }

  release() { this.current = null; }
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

export async function deleteCachedModel(id) {
  const db = await openDB();
  const tx = db.transaction(["models", "shards"], "readwrite");
  tx.objectStore("models").delete(id);
  tx.objectStore("shards").delete(IDBKeyRange.bound([id, 0], [id, Infinity]));
  await done(tx);
}
