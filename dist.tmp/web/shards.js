// Where the download cache lives: model shards in IndexedDB (each a Blob), each verified by
// sha256 before it is stored and again before its bytes go to the GPU. The browser downloads each
// shard into a Blob itself; the page reads shard bytes through a few small buffers, hashed a piece
// at a time: a shard is whole only inside its Blob. Where the
// manifest lists each piece's sha256, WebCrypto checks the pieces (beside the page's thread, 3.6x
// faster than WebAssembly here); otherwise hash-wasm's SHA-256 takes the shard's pieces one after
// the other (WebCrypto hashes whole buffers only).

import { createSHA256 } from "./vendor/sha256.mjs";

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

const MAX_SHARD = 32 << 20;
const PIECE = 4 << 20;       // bytes a shard streams through at a time
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
  const piece = m.piece_size;
  if (piece !== undefined && (!Number.isSafeInteger(piece) || piece < 4 || piece > MAX_SHARD || piece % 4)) {
    bad(`its piece_size must be a multiple of 4 up to ${MAX_SHARD}, got ${JSON.stringify(piece)}`);
  }
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
    if (piece !== undefined) {
      const want = Math.ceil(s.size / piece);
      if (!Array.isArray(s.pieces) || s.pieces.length !== want || !s.pieces.every((h) => typeof h === "string" && HEX64.test(h))) {
        bad(`shard ${i} needs the sha256 of each of its ${want} pieces`);
      }
    } else if (s.pieces !== undefined) bad(`shard ${i} lists pieces but the manifest has no piece_size`);
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

// The buffers shard bytes pass through, a piece at a time, used again and again: a download or a
// read of a stored shard fills one, hands it on (to the hash, to a Blob, to the GPU) and fills it
// again. A load allocates one per shard downloading plus two for the upload, whatever the model's
// size: no shard is ever whole in the page's memory (whole-shard buffers, and the copies that
// hashing and storing them made, kept the page 3.3-3.7 shards above its footprint while loading).
class BufferPool {
  constructor(size) {
    this.size = size;
    this.free = [];
    this.made = 0;               // buffers allocated
  }

  take() {
    if (this.free.length) return this.free.pop();
    this.made += 1;
    return new ArrayBuffer(this.size);
  }

  // A buffer a stream has detached has no bytes left: it is dropped.
  give(buf) {
    if (buf && buf.byteLength === this.size && !this.free.includes(buf)) this.free.push(buf);
  }

  clear() { this.free = []; }
}

// reader.read(view) (a BYOB reader) or reader.read(), failing (and cancelling the stream) when
// nothing comes for stallMs.
function readWithin(reader, view, stallMs) {
  let timer = null;
  const stalled = new Promise((_, bad) => {
    timer = setTimeout(() => {
      reader.cancel().catch(() => {});
      bad(new Error(`no data for ${stallMs / 1000} s`));
    }, stallMs);
  });
  return Promise.race([view ? reader.read(view) : reader.read(), stalled]).finally(() => clearTimeout(timer));
}

// Gathers bytes into one buffer of `pool`, handing each full buffer (and the rest, at end()) to
// onPiece(view), which may be async; the view is valid until it returns.
class Gather {
  constructor(pool, onPiece) {
    this.pool = pool;
    this.onPiece = onPiece;
    this.buf = pool.take();
    this.fill = 0;
  }

  // Where the next bytes go, at most n: a BYOB read fills it, then added().
  space(n) { return new Uint8Array(this.buf, this.fill, Math.min(this.pool.size - this.fill, n)); }

  // k bytes were read into space().
  async added(k) {
    this.fill += k;
    if (this.fill === this.pool.size) await this.end();
  }

  async push(view) {
    for (let off = 0; off < view.byteLength;) {
      const k = Math.min(this.pool.size - this.fill, view.byteLength - off);
      new Uint8Array(this.buf, this.fill, k).set(view.subarray(off, off + k));
      off += k;
      await this.added(k);
    }
  }

  async end() {
    const n = this.fill;
    this.fill = 0;
    if (n) await this.onPiece(new Uint8Array(this.buf, 0, n));
  }

  // A buffer a stream detached (a read that failed) has no bytes left: the pool drops it.
  release() { this.pool.give(this.buf); }
}

// Reads a body of exactly `size` bytes through one buffer of `pool`, calling onPiece(view) with
// each full buffer's worth and with the rest at the end: straight into the buffer where the stream
// can (a byte stream's BYOB reader), chunk by chunk otherwise. Throws when the body is shorter or
// longer, or when no byte arrives for stallMs (a stalled stream never ends by itself).
async function streamPieces(body, size, pool, stallMs, onPiece) {
  let byob = null;
  try { byob = body.getReader({ mode: "byob" }); } catch (e) { byob = null; }
  const reader = byob || body.getReader();
  const read = (view) => readWithin(reader, view, stallMs);
  const tooLong = () => {
    reader.cancel().catch(() => {});
    return new Error(`got more than ${size} bytes, expected ${size}`);
  };
  const gather = new Gather(pool, onPiece);
  let n = 0;           // bytes of the body so far
  try {
    if (byob) {
      while (n < size) {
        const { done, value } = await read(gather.space(size - n));
        if (value) gather.buf = value.buffer;      // the same memory, handed back by the stream
        if (done) break;
        n += value.byteLength;
        await gather.added(value.byteLength);
      }
      if (n === size) {
        const { done } = await read(new Uint8Array(1));
        if (!done) throw tooLong();
      }
    } else {
      for (;;) {
        const { done, value } = await read(null);
        if (done) break;
        if (n + value.byteLength > size) throw tooLong();
        n += value.byteLength;
        await gather.push(value);
      }
    }
    if (n !== size) throw new Error(`got ${n} bytes, expected ${size}`);
    await gather.end();
  } finally {
    gather.release();
  }
}

// Reads ranges of a Blob in increasing order through one stream, straight into one buffer of a
// pool (a stream per range cost a round trip to the browser's blob store each, for every tensor,
// and a Blob's default reader hands over 2 MB chunks that stay until V8 next collects); a range
// behind the last one opens another stream where it starts.
class SequentialReader {
  constructor(blob, pool, stallMs) {
    this.blob = blob;
    this.pool = pool;
    this.stallMs = stallMs;
    this.reader = null;
    this.byob = false;
    this.buf = null;
    this.data = null;    // data[lo, hi) holds the blob's bytes [pos, pos + hi - lo)
    this.lo = 0;
    this.hi = 0;
    this.pos = 0;
  }

  // onBytes(view) with consecutive views of bytes [start, start + len); a view is valid until it returns.
  async read(start, len, onBytes) {
    if (!this.reader || start < this.pos) {
      this.close();
      const stream = this.blob.slice(start).stream();
      try { this.reader = stream.getReader({ mode: "byob" }); this.byob = true; } catch (e) {
        this.reader = stream.getReader();       // where a Blob's stream is no byte stream
        this.byob = false;
      }
      if (this.byob) this.buf = this.pool.take();
      this.pos = start;
    }
    while (len > 0) {
      if (this.lo === this.hi) {
        const { done, value } = await readWithin(this.reader, this.byob ? new Uint8Array(this.buf) : null, this.stallMs);
        if (value && this.byob) this.buf = value.buffer;
        if (done) throw new Error(`a shard ended at byte ${this.pos}, before byte ${start + len}`);
        this.data = value;
        this.lo = 0;
        this.hi = value.byteLength;
      }
      const skip = Math.min(start - this.pos, this.hi - this.lo);
      const k = Math.min(len, this.hi - this.lo - skip);
      this.lo += skip;
      this.pos += skip;
      if (k > 0) {
        await onBytes(this.data.subarray(this.lo, this.lo + k));
        this.lo += k;
        this.pos += k;
        start += k;
        len -= k;
      }
    }
  }

  close() {
    if (this.reader) this.reader.cancel().catch(() => {});
    if (this.buf) this.pool.give(this.buf);
    this.reader = null;
    this.buf = this.data = null;
    this.lo = this.hi = 0;
  }
}

// Shard bytes downloaded by the browser itself into a Blob: an XMLHttpRequest whose responseType is
// "blob" has Chromium write the body into its blob storage as it arrives, so no byte of it passes
// through the page's memory (pieces streamed through the page and turned into Blobs there held up to
// 2.6 shards of Blob bytes in the page while loading a 1B model, until the browser took them).
// Progress events tell a stall (no byte for stallMs) and a body longer than the manifest says.
function downloadBlob(url, size, stallMs) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    let timer = null;
    let over = false;
    const end = (e) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      if (e) { xhr.abort(); reject(e); } else resolve(xhr.response);
    };
    const wait = () => {
      clearTimeout(timer);
      timer = setTimeout(() => end(new Error(`no data for ${stallMs / 1000} s`)), stallMs);
    };
    const tooLong = () => new Error(`got more than ${size} bytes, expected ${size}`);
    xhr.open("GET", url);
    xhr.responseType = "blob";
    xhr.onprogress = (e) => (e.loaded > size ? end(tooLong()) : wait());
    xhr.onerror = () => end(new Error("the request failed (network error or connection lost)"));
    xhr.onabort = () => end(new Error("the request was aborted"));
    xhr.onload = () => {
      if (xhr.status < 200 || xhr.status > 299) return end(new Error(`HTTP ${xhr.status}`));
      const n = xhr.response.size;
      end(n > size ? tooLong() : n < size ? new Error(`got ${n} bytes, expected ${size}`) : null);
    };
    wait();
    xhr.send();
  });
}

const hex = (digest) => Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");

// The check of one shard's bytes as they stream, piece after piece: update(piece) with each (the
// view may be reused once it returns), then matches() says whether they are what the manifest says.
// sha256s: the manifest's, one per piece, checked by WebCrypto (which copies each piece when called
// and hashes it beside the page's thread); else whole: the shard's, hashed by hash-wasm.
async function shardCheck(sha256s, whole) {
  if (sha256s) {
    const digests = [];
    return {
      update: (piece) => {
        const d = crypto.subtle.digest("SHA-256", piece);
        d.catch(() => {});       // a stream that fails later never asks for the rest
        digests.push(d);
      },
      matches: async () => {
        const got = await Promise.all(digests);
        return got.length === sha256s.length && got.every((d, k) => hex(d) === sha256s[k]);
      },
    };
  }
  const h = await createSHA256();
  h.init();
  return { update: (piece) => { h.update(piece); }, matches: async () => h.digest("hex") === whole };
}

// The hand-over between a download and the upload that runs beside it: shards arrive in any order,
// the upload takes them in file order, and no more than `window` of them are downloading or waiting
// to be taken at once. A shard the upload has gone past is not kept (it is stored: a later read of
// it comes from IndexedDB). What passes through is each shard's verified Blob.
class ShardPipe {
  constructor(window) {
    this.window = Math.max(1, window);
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

  // The Blob of shard i if it is (or is about to be) a fresh download, else null.
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
  // One shard downloads while the one before it goes to the GPU (two at once loaded no faster).
  // pieceBytes: the size of the buffers shard bytes stream through (a multiple of 4), by default the
  // manifest's piece_size, whose pieces are then checked one by one.
  constructor(manifestUrl, manifest, { concurrency = 1, fetchImpl, attempts = 4, backoffMs = 500,
                                       stallMs = 30000, pieceBytes } = {}) {
    this.manifest = checkManifest(manifest);
    pieceBytes ??= manifest.piece_size ?? PIECE;
    if (!Number.isSafeInteger(pieceBytes) || pieceBytes < 4 || pieceBytes % 4) {
      throw new Error(`pieceBytes must be a positive multiple of 4, got ${pieceBytes}`);
    }
    // "pieces": WebCrypto checks each piece against the manifest (the buffers cut shards where it
    // does); "whole": hash-wasm hashes each shard (no piece hashes, other buffers, or no WebCrypto:
    // a page served over plain http from another host)
    this.checking = pieceBytes === manifest.piece_size && globalThis.crypto?.subtle ? "pieces" : "whole";
    this.url = manifestUrl;
    this.id = manifest.model.sha256;   // content hash: another model or version never mixes in
    this.concurrency = concurrency;
    this.attempts = attempts;
    this.backoffMs = backoffMs;
    this.stallMs = stallMs;
    this.fetch = fetchImpl || ((...a) => fetch(...a));
    // the browser downloads each shard into its Blob (see downloadBlob) unless fetches are given (tests
    // that shape responses) or there is no XMLHttpRequest (a service worker): then the pieces stream
    // through the page into the check and into Blob parts
    this.viaXHR = !fetchImpl && typeof XMLHttpRequest === "function";
    this.current = null;               // {index, blob}: the verified shard the upload reads
    this.ahead = null;                 // {index, blob: a promise}: the next stored shard, being checked
    this.requests = 0;
    // a piece buffer for each shard downloading, two for the upload (its shard's stream reads into
    // one, the GPU writes go from the other) and one for a stored shard's check
    const largest = Math.max(...this.manifest.shards.map((s) => s.size));
    this.buffers = new BufferPool(Math.min(pieceBytes, (largest + 3) & ~3));
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
  // through writeTensor or shardBlob) at the same time: each shard goes to the GPU as soon as it
  // is verified and stored, while the next ones download. At most `concurrency` shards are ahead of the one being
  // uploaded. Resolves to use's result once every shard is stored; a failed download fails
  // the upload that waits for it, and a failed upload starts no new download. onProgress gets bytes
  // and shards done. Then removes older versions of the model from the same manifest URL: an upgrade
  // replaces them.
  async load(onProgress, use) {
    const stored = (await this.storedIndices()).size === this.manifest.shards.length;
    let r;
    try {
      r = stored ? await this._loadStored(onProgress, use)
        : await withLock(this.id, "exclusive", () => this._loadDownloading(onProgress, use));
    } finally {
      this.ahead = null;
    }
    r.removed = await this._dropStaleVersions();
    return r;
  }

  async _loadStored(onProgress, use) {
    const n = this.manifest.shards.length, size = this.manifest.model.size;
    onProgress({ phase: "download", loadedBytes: size, totalBytes: size, shardsDone: n, shardsTotal: n });
    return { fetched: 0, result: await this.reading(use) };
  }

  async _loadDownloading(onProgress, use) {
    const pipe = this.pipe = new ShardPipe(this.concurrency);
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
        await pipe.room();      // no more shards ahead of the upload than the window
        if (next >= missing.length || failed || pipe.stopped) {
          pipe.unroom();
          return;
        }
        const i = missing[next++];
        const blob = await this._fetchShard(i);
        await this._store(i, blob);
        pipe.arrived(i, blob);
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
  async _store(i, blob) {
    const db = await openDB();
    const tx = db.transaction("shards", "readwrite");
    tx.objectStore("shards").put({ model: this.id, index: i, sha256: this.manifest.shards[i].sha256, data: blob });
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

  // Shard i's bytes from the network as a Blob, verified against the manifest's sha256.
  async _fetchShard(i) {
    const s = this.manifest.shards[i];
    const url = new URL(s.file, this.url).href;
    let last = null;
    for (let attempt = 0; attempt < this.attempts; attempt++) {
      if (attempt) await new Promise((r) => setTimeout(r, this.backoffMs * 2 ** (attempt - 1)));
      try {
        this.requests++;
        const { blob, matches } = await this._download(url, i);
        if (!matches) throw new Error("its sha256 does not match the manifest");
        return blob;
      } catch (e) {
        last = e;
      }
    }
    throw new Error(`shard ${s.file} could not be downloaded after ${this.attempts} attempts: ${last && last.message}`);
  }

  // Shard i's body ({blob, matches}: whether it matches the manifest), exactly its size in bytes,
  // failing when no byte arrives for stallMs (a stalled connection never ends by itself) or when the
  // body is not that long: downloaded into a Blob by the browser, or streamed a piece at a time
  // into the check and into Blob parts.
  async _download(url, i) {
    const s = this.manifest.shards[i];
    if (this.viaXHR) {
      const blob = await downloadBlob(url, s.size, this.stallMs);
      return { blob, matches: await this._matches(i, blob) };     // its bytes read back for the check
    }
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), this.stallMs);    // until the response starts
    try {
      const res = await this.fetch(url, { signal: ctl.signal });
      clearTimeout(timer);
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const body = res.body || new Blob([await res.arrayBuffer()]).stream();
      // each piece is hashed and goes into a Blob part while the next one downloads
      const parts = [];
      const check = await this._check(i);
      await streamPieces(body, s.size, this.buffers, this.stallMs, (piece) => {
        check.update(piece);
        parts.push(new Blob([piece]));
      });
      return { blob: new Blob(parts), matches: await check.matches() };
    } catch (e) {
      if (ctl.signal.aborted) throw new Error(`no data for ${this.stallMs / 1000} s`);
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  _check(i) {
    const s = this.manifest.shards[i];
    return shardCheck(this.checking === "pieces" ? s.pieces : null, s.sha256);
  }

  // A stored shard (a Blob, or an ArrayBuffer as earlier versions stored them) if its bytes still
  // match the manifest, else null.
  async _verifyStored(i, data) {
    const s = this.manifest.shards[i];
    const blob = data instanceof Blob ? data : data instanceof ArrayBuffer ? new Blob([data]) : null;
    if (!blob || blob.size !== s.size) return null;
    try {
      return await this._matches(i, blob) ? blob : null;
    } catch (e) {
      return null;        // unreadable: fetched again
    }
  }

  // Whether the bytes of Blob `blob` are shard i's, read through the piece buffers.
  async _matches(i, blob) {
    const check = await this._check(i);
    await streamPieces(blob.stream(), this.manifest.shards[i].size, this.buffers, this.stallMs, (piece) => { check.update(piece); });
    return check.matches();
  }

  // Shard i as a Blob whose bytes match the manifest: the one just downloaded, else the stored one
  // checked again (one that is missing or changed inside IndexedDB is never used: it is fetched
  // again). While the upload reads it, the next shard's check starts where that one is stored.
  async shardBlob(i) {
    if (this.current && this.current.index === i) return this.current.blob;
    this._dropCurrent();
    let blob = this.pipe && await this.pipe.take(i);
    if (!blob) {
      const ahead = this.ahead && this.ahead.index === i ? this.ahead.blob : this._stored(i);
      this.ahead = null;
      blob = await ahead;
      if (!blob) {
        this.refetched = (this.refetched || 0) + 1;
        await this._deleteShard(i);
        blob = await this._fetchShard(i);
        await this._store(i, blob);
      }
    }
    this.current = { index: i, blob };
    const next = i + 1;
    if (next < this.manifest.shards.length && !(this.pipe && this.pipe.slots.has(next))) {
      this.ahead = { index: next, blob: this._stored(next) };
      this.ahead.blob.catch(() => {});
    }
    return blob;
  }

  _dropCurrent() {
    if (this.current && this.current.reader) this.current.reader.close();
    this.current = null;
  }

  // Stored shard i if its bytes still match the manifest, else null.
  async _stored(i) {
    const db = await openDB();
    const tx = db.transaction("shards", "readonly");
    const rec = await req(tx.objectStore("shards").get([this.id, i]));
    return rec ? this._verifyStored(i, rec.data) : null;
  }

  async _deleteShard(i) {
    const db = await openDB();
    const tx = db.transaction("shards", "readwrite");
    tx.objectStore("shards").delete([this.id, i]);
    await done(tx);
  }

  // The GGUF header: shard 0's bytes.
  async header() { return new Uint8Array(await (await this.shardBlob(0)).arrayBuffer()); }

  // Copies file bytes [offset, offset + n) into GPU buffer `bufId` through the replayer, a piece
  // at a time; onWritten(bytes) after each piece. Tensors come in file order: each shard is read
  // through one stream.
  async writeTensor(replayer, bufId, offset, n, onWritten = () => {}) {
    const shards = this.manifest.shards;
    const pool = this.buffers;
    let dst = 0;
    for (let i = 0; i < shards.length && n > 0; i++) {
      const s = shards[i];
      if (offset >= s.offset + s.size || offset + n <= s.offset) continue;
      await this.shardBlob(i);
      const cur = this.current;
      cur.reader = cur.reader || new SequentialReader(cur.blob, pool, this.stallMs);
      const start = offset - s.offset;
      const len = Math.min(n, s.size - start);
      const gather = new Gather(pool, (piece) => {
        replayer.writeBytes(bufId, dst, piece, 0, piece.byteLength);
        dst += piece.byteLength;
        onWritten(piece.byteLength);
      });
      try {
        await cur.reader.read(start, len, (view) => gather.push(view));
        await gather.end();
      } finally {
        gather.release();
      }
      offset += len;
      n -= len;
    }
    if (n > 0) throw new Error("a tensor reaches past the end of the model's shards");
  }

  // The upload is done with the shards: what the pool holds goes too.
  release() {
    this._dropCurrent();
    this.ahead = null;
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
