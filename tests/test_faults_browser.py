"""Faults injected into the browser build: corrupt, stalled and cut shards, storage refusals, two tabs,
a lost GPU, and model output that tries to become HTML."""

from __future__ import annotations

import json
import os
import re

import pytest

from browser_helpers import LOAD_JS, MODEL_DIR, SHARD, manifest_url, native_answer, native_greedy, open_page

ASK_JS = """async (q) => {
  const r = await window.engine.chat.completions.create({
    messages: [{ role: "user", content: q }], temperature: 0, max_tokens: 8 });
  return r.choices[0].message.content;
}"""
LOAD_WITH_JS = """async ([model, download]) => {
  const api = await import("/web/pyengine.mjs");
  window.engine = await api.createEngine({ model, contextLength: 256, download });
  return window.engine.info;
}"""
QUESTION = "What is the capital of France?"
# the tests' own sha256 (WebCrypto's over whole shards), against the manifest's
SHA256_JS = """
const sha256Hex = async (bytes) => Array.from(new Uint8Array(await crypto.subtle.digest("SHA-256", bytes)),
                                              (b) => b.toString(16).padStart(2, "0")).join("");
// a store's load that reads every shard in order, as the upload does: each shard's sha256
const loadHashes = async (store) => {
  const hashes = [];
  await store.load(() => {}, async () => {
    for (let i = 0; i < store.manifest.shards.length; i++) {
      hashes.push(await sha256Hex(await (await store.shardBlob(i)).arrayBuffer()));
    }
  });
  return hashes;
};
"""
# most faults are the same whatever the model: the tiny one loads in a moment
TINY_ASK_JS = """async (q) => {
  const r = await window.engine.chat.completions.create({
    messages: [{ role: "user", content: q }], temperature: 0, max_tokens: 8, ignore_eos: true });
  return r.choices[0].message.content;
}"""


def tiny_url(url):
    return url + "models/tiny/manifest.json"


def tiny_manifest(site):
    with open(f"{site[0]}/models/tiny/manifest.json") as f:
        return json.load(f)


def shard_requests(page):
    return [u for u in page.requests if SHARD.search(u)]


@pytest.fixture(scope="module")
def expected(engine):
    engine.reset()
    return native_greedy(engine, QUESTION, 8)


@pytest.fixture(scope="module")
def tiny_expected(tiny_llama):
    return native_answer(tiny_llama, QUESTION, 8)


def test_shard_corrupted_inside_indexeddb_is_fetched_again(browser, site, tiny_expected):
    _, url = site
    ctx, page = open_page(browser, url)
    page.evaluate(LOAD_JS, tiny_url(url))
    flipped = page.evaluate("""async () => {
      const db = await new Promise((ok, no) => { const r = indexedDB.open("pyengine"); r.onsuccess = () => ok(r.result); r.onerror = no; });
      const keys = await new Promise((ok) => { const r = db.transaction("shards").objectStore("shards").getAllKeys(); r.onsuccess = () => ok(r.result); });
      const key = keys[2];
      const rec = await new Promise((ok) => { const r = db.transaction("shards").objectStore("shards").get(key); r.onsuccess = () => ok(r.result); });
      if (!(rec.data instanceof Blob)) throw new Error("a shard is stored as a Blob");
      const bytes = new Uint8Array(await rec.data.arrayBuffer());
      bytes[bytes.length >> 1] ^= 0x40;
      rec.data = new Blob([bytes]);
      const tx = db.transaction("shards", "readwrite");
      tx.objectStore("shards").put(rec);
      await new Promise((ok) => { tx.oncomplete = ok; });
      return key[1];
    }""")
    page.reload()
    page.requests.clear()
    info = page.evaluate(LOAD_JS, tiny_url(url))
    again = shard_requests(page)
    assert info["shardsRefetched"] == 1 and len(again) == 1 and again[0].endswith(f"shard-{flipped:05d}.bin")
    assert page.evaluate(TINY_ASK_JS, QUESTION) == tiny_expected
    ctx.close()


@pytest.mark.parametrize("fault", ["corrupt", "short", "long", "http500", "stall"])
def test_a_bad_shard_response_is_retried(browser, site, fault):
    _, url = site
    ctx, page = open_page(browser, url)
    hits = {"n": 0}

    def handler(route):
        if not route.request.url.endswith("shard-00000.bin"):   # the header shard: small, quick to tamper with
            return route.continue_()
        hits["n"] += 1
        if hits["n"] > 1:
            return route.continue_()
        resp = route.fetch()
        body = resp.body()
        if fault == "corrupt":
            route.fulfill(response=resp, body=body[:100] + bytes([body[100] ^ 1]) + body[101:])
        elif fault == "short":
            route.fulfill(response=resp, body=body[: len(body) // 2])
        elif fault == "long":
            route.fulfill(response=resp, body=body + b"\0")
        elif fault == "http500":
            route.fulfill(status=500, body="server trouble")
        # "stall": never answer; the store gives up after stallMs and tries again

    page.route(SHARD, handler)
    # the store as the engine's worker opens it (no fetches of its own: the browser downloads into Blobs)
    r = page.evaluate(SHA256_JS + """async ([model, stallMs]) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = await ShardStore.open(model, { stallMs, backoffMs: 100 });
      return { hashes: await loadHashes(store), viaXHR: store.viaXHR, stored: [...await store.storedIndices()] };
    }""", [tiny_url(url), 3000 if fault == "stall" else 60000])
    shards = tiny_manifest(site)["shards"]
    assert hits["n"] == 2 and r["viaXHR"] is True
    assert r["hashes"] == [s["sha256"] for s in shards] and sorted(r["stored"]) == list(range(len(shards)))
    ctx.close()


def test_a_shard_that_keeps_failing_ends_the_load_with_a_clear_error(browser, site):
    _, url = site
    ctx, page = open_page(browser, url)
    page.route(re.compile(r"shard-00002\.bin$"), lambda route: route.fulfill(status=503, body="down"))
    with pytest.raises(Exception, match=r"shard-00002.bin could not be downloaded after 3 attempts: HTTP 503"):
        page.evaluate(LOAD_WITH_JS, [tiny_url(url), {"attempts": 3, "backoffMs": 50}])
    cached = page.evaluate("async () => (await import('/web/pyengine.mjs')).listCachedModels()")
    stored = page.evaluate("""async (m) => {
      const { ShardStore } = await import("/web/shards.js");
      return [...(await (await ShardStore.open(m)).storedIndices())];
    }""", tiny_url(url))
    assert not cached[0]["complete"] and 2 not in stored and len(stored) >= 1   # what was verified is kept
    ctx.close()


def test_storage_refusal_is_a_clear_error_and_records_nothing(browser, site):
    _, url = site
    ctx, page = open_page(browser, url)
    r = page.evaluate("""async (manifest) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = await ShardStore.open(manifest);
      const put = IDBObjectStore.prototype.put;
      let puts = 0, refused = null;
      IDBObjectStore.prototype.put = function (value, key) {
        const r = put.call(this, value, key);
        if (this.name === "shards" && ++puts === 2) {     // what a full disk looks like to IndexedDB
          refused = value.index;
          Object.defineProperty(this.transaction, "error", { value: new DOMException("full", "QuotaExceededError") });
          this.transaction.abort();
        }
        return r;
      };
      let message = null;
      try { await store.ensure(); } catch (e) { message = e.message; }
      IDBObjectStore.prototype.put = put;
      return { message, refused, stored: [...(await store.storedIndices())] };
    }""", tiny_url(url))
    size = tiny_manifest(site)["model"]["size"]
    assert r["message"] and "QuotaExceededError" in r["message"] and f"{size / 1e6:.1f} MB" in r["message"]
    assert r["refused"] is not None and r["refused"] not in r["stored"]     # the refused shard was not recorded
    ctx.close()


def test_two_tabs_download_each_shard_once(browser, site):
    # two tabs of one origin load the model at once, as their engines' workers do: one downloads, the
    # other waits for its lock and reads what it stored (each shard's answer is held back a little, so
    # that the second tab starts while the first is still downloading)
    import time

    _, url = site
    ctx = browser.new_context()
    ctx.route(SHARD, lambda route: (time.sleep(0.1), route.continue_()))
    pages = []
    for _ in range(2):
        p = ctx.new_page()
        p.requests = []
        p.on("request", lambda r, p=p: p.requests.append(r.url))
        p.goto(url + "headless.html")
        pages.append(p)
    for p in pages:
        p.evaluate(SHA256_JS + """(m) => { window.loading = import("/web/shards.js").then(async ({ ShardStore }) => {
          const store = await ShardStore.open(m);
          return { hashes: await loadHashes(store), requests: store.requests };
        }); }""", tiny_url(url))
    got = [p.evaluate("() => window.loading") for p in pages]
    fetched = shard_requests(pages[0]) + shard_requests(pages[1])
    want = [s["sha256"] for s in tiny_manifest(site)["shards"]]
    assert len(want) > 3 and len(fetched) == len(want) and len(set(fetched)) == len(want)
    assert sorted(r["requests"] for r in got) == [0, len(want)]
    assert all(r["hashes"] == want for r in got)
    ctx.close()


def test_lost_gpu_is_a_clear_error_and_the_engine_can_be_created_again(browser, site, tiny_expected):
    _, url = site
    ctx, page = open_page(browser, url)
    page.evaluate(LOAD_JS, tiny_url(url))
    page.evaluate("() => window.engine._loseDeviceForTesting()")
    with pytest.raises(Exception, match="device was lost"):
        page.evaluate(TINY_ASK_JS, QUESTION)
    page.evaluate(LOAD_JS, tiny_url(url))
    assert page.evaluate(TINY_ASK_JS, QUESTION) == tiny_expected
    ctx.close()


HOSTILE = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
FAKE_ENGINE = """
export async function createEngine() {
  return {
    info: { model: "fake" },
    chat: { completions: { create: async () => ({
      async *[Symbol.asyncIterator]() {
        yield { choices: [{ delta: { content: %r } }] };
        yield { choices: [], usage: { completion_tokens: 1, extra: { prefill_tokens_per_s: 1,
                decode_tokens_per_s: 1, time_to_first_token_s: 0.1 } } };
      } }) } },
    interruptGenerate() {}, resetChat() {},
  };
}
export async function listCachedModels() { return [{ id: "x", name: %r, storedBytes: 1, complete: true }]; }
export async function deleteCachedModel() {}
""" % (HOSTILE, HOSTILE)


def test_model_output_is_shown_as_text_only(browser, site):
    out, url = site
    ctx = browser.new_context()
    page = ctx.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.route(re.compile(r"/web/pyengine\.mjs$"),
               lambda route: route.fulfill(status=200, content_type="text/javascript", body=FAKE_ENGINE))
    page.goto(url + "index.html")
    page.wait_for_function("() => document.body.dataset.ready")
    page.fill("#input", "hello")
    page.click("#send")
    answer = page.locator(".msg.assistant[data-done]")
    answer.wait_for()
    assert answer.text_content() == HOSTILE
    assert page.evaluate("() => window.pwned") is None
    assert page.locator("#log img, #log script, #log b, #models img").count() == 0
    assert HOSTILE in page.text_content("#models")
    # the embed widget too
    with open(f"{out}/embed-xss.html", "w") as f:
        f.write('<!doctype html><body><script src="/web/embed.js" data-model="/m.json"></script></body>')
    page.goto(url + "embed-xss.html")
    page.wait_for_function("() => document.querySelector('#pyengine-chat')?.dataset.ready")
    host = page.locator("#pyengine-chat")
    host.locator("input").fill("hello")
    host.locator("button").click()
    reply = host.locator(".m.a[data-done]")
    reply.wait_for()
    assert reply.text_content() == HOSTILE
    assert page.evaluate("() => window.pwned") is None
    assert page.evaluate("() => document.querySelector('#pyengine-chat').shadowRoot"
                         ".querySelectorAll('.log img, .log script, .log b').length") == 0
    assert dialogs == []
    ctx.close()


def test_200_requests_in_one_page_do_not_grow_memory(browser, site):
    _, url = site
    ctx, page = open_page(browser, url)
    r = page.evaluate("""async (model) => {
      const api = await import("/web/pyengine.mjs");
      const e = await api.createEngine({ model, contextLength: 128 });
      const ask = async (i) => {
        const stream = await e.chat.completions.create({ messages: [{ role: "user", content: `hello ${i}` }],
          stream: i % 2 === 0, max_tokens: 2, temperature: i % 3 ? 0 : 0.9, seed: i });
        if (i % 2 === 0) { for await (const c of stream) { /* drain */ } }
      };
      for (let i = 0; i < 20; i++) await ask(i);      // warm-up: plans and pipelines exist now
      const before = await e.memoryStats();
      const pageBefore = performance.memory ? performance.memory.usedJSHeapSize : null;
      for (let i = 20; i < 220; i++) await ask(i);
      const after = await e.memoryStats();
      const pageAfter = performance.memory ? performance.memory.usedJSHeapSize : null;
      return { before, after, pageBefore, pageAfter };
    }""", url + "models/tiny/manifest.json")
    b, a = r["before"], r["after"]
    assert a["gpuBuffers"] == b["gpuBuffers"] and a["gpuBytes"] == b["gpuBytes"]
    assert a["wasmHeapBytes"] - b["wasmHeapBytes"] <= 16 << 20
    assert a["pythonObjects"] - b["pythonObjects"] < 2000
    if r["pageBefore"] is not None:
        assert r["pageAfter"] - r["pageBefore"] < 8 << 20
    ctx.close()


def test_deleting_a_model_while_another_tab_loads_it_corrupts_neither(browser, site, expected):
    _, url = site
    ctx = browser.new_context()
    a, b = (open_page(browser, url, ctx)[1] for _ in range(2))
    a.evaluate("""(m) => {
      window.uploading = new Promise((ok) => { window.startedUpload = ok; });
      window.loading = import('/web/pyengine.mjs').then((api) => api.createEngine({ model: m, contextLength: 256,
        onProgress: (p) => { if (p.phase === "upload") window.startedUpload(); } })).then((e) => { window.engine = e; });
    }""", manifest_url(url))
    a.evaluate("() => window.uploading")
    model_id = json.load(open(f"{site[0]}/{MODEL_DIR}/manifest.json"))["model"]["sha256"]
    deleted = b.evaluate("""async (id) => {
      const api = await import('/web/pyengine.mjs');
      await api.deleteCachedModel(id);        // waits for tab A's upload to finish
      return (await api.listCachedModels()).map((m) => m.id);
    }""", model_id)
    a.evaluate("() => window.loading")
    assert deleted == []
    assert a.evaluate(ASK_JS, QUESTION) == expected        # A's weights were on the GPU before the delete
    b.requests.clear()
    b.evaluate(LOAD_JS.replace("contextLength: 512", "contextLength: 256"), manifest_url(url))
    with open(f"{site[0]}/{MODEL_DIR}/manifest.json") as f:
        assert len(shard_requests(b)) == len(json.load(f)["shards"])   # all fetched again, none mixed
    assert b.evaluate(ASK_JS, QUESTION) == expected
    ctx.close()


def test_an_upgraded_model_replaces_the_old_version(browser, site, tiny_llama, tiny_llama_v2):
    out, url = site
    ctx, page = open_page(browser, url)
    version = {"dir": "tiny"}

    def serve(route):     # one URL, whose content the server upgrades between two visits
        name = route.request.url.rsplit("/", 1)[1]
        with open(f"{out}/models/{version['dir']}/{name}", "rb") as f:
            route.fulfill(status=200, body=f.read(),
                          content_type="application/json" if name.endswith(".json") else "application/octet-stream")

    page.route(re.compile(r"/models/app/[^/]+$"), serve)
    ask = """async (m) => {
      const api = await import('/web/pyengine.mjs');
      const e = await api.createEngine({ model: m, contextLength: 128 });
      const r = await e.chat.completions.create({ messages: [{ role: "user", content: "hello" }], temperature: 0,
                                                  max_tokens: 6, ignore_eos: true });
      await e.unload();
      return { text: r.choices[0].message.content, models: await api.listCachedModels() };
    }"""
    first = page.evaluate(ask, url + "models/app/manifest.json")
    version["dir"] = "tiny-v2"
    page.reload()
    second = page.evaluate(ask, url + "models/app/manifest.json")
    ids = {v: json.load(open(f"{out}/models/{v}/manifest.json"))["model"]["sha256"] for v in ("tiny", "tiny-v2")}
    assert [m["id"] for m in first["models"]] == [ids["tiny"]]
    assert [m["id"] for m in second["models"]] == [ids["tiny-v2"]] and second["models"][0]["complete"]
    shard_models = page.evaluate("""async () => {
      const db = await new Promise((ok) => { const r = indexedDB.open("pyengine"); r.onsuccess = () => ok(r.result); });
      const keys = await new Promise((ok) => { const r = db.transaction("shards").objectStore("shards").getAllKeys(); r.onsuccess = () => ok(r.result); });
      return [...new Set(keys.map((k) => k[0]))];
    }""")
    assert shard_models == [ids["tiny-v2"]]       # no shard of the old version is left to mix in

    assert first["text"] == native_answer(tiny_llama, "hello", 6)
    assert second["text"] == native_answer(tiny_llama_v2, "hello", 6)
    assert first["text"] != second["text"]
    ctx.close()


def test_cleanup_removes_an_interrupted_download_only(browser, site):
    _, url = site
    ctx, page = open_page(browser, url)
    page.route(re.compile(r"/models/tiny-v2/shard-00003\.bin$"), lambda route: route.abort())
    r = page.evaluate("""async ([good, cut]) => {
      const api = await import('/web/pyengine.mjs');
      await (await api.createEngine({ model: good, contextLength: 128 })).unload();
      try { await api.createEngine({ model: cut, contextLength: 128, download: { attempts: 1 } }); } catch (e) {}
      const before = (await api.listCachedModels()).map((m) => m.complete);
      const removed = await api.cleanupCache();
      const after = (await api.listCachedModels()).map((m) => m.complete);
      return { before: before.sort(), removed: removed.length, after };
    }""", [url + "models/tiny/manifest.json", url + "models/tiny-v2/manifest.json"])
    assert r == {"before": [False, True], "removed": 1, "after": [True]}
    ctx.close()


def test_a_manifest_naming_files_elsewhere_is_refused_before_any_request(browser, site):
    out, url = site
    ctx, page = open_page(browser, url)
    m = json.load(open(f"{out}/models/tiny/manifest.json"))
    m["shards"][1]["file"] = "https://elsewhere.example/shard.bin"
    page.route(re.compile(r"/models/evil/manifest\.json$"),
               lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(m)))
    with pytest.raises(Exception, match="names a file outside the manifest's folder"):
        page.evaluate("async (u) => (await import('/web/pyengine.mjs')).createEngine({ model: u })",
                      url + "models/evil/manifest.json")
    assert not [u for u in page.requests if "elsewhere" in u or SHARD.search(u)]
    ctx.close()


def test_a_gpu_that_runs_out_of_memory_mid_load_is_a_clear_error_then_loads_again(browser, site, tiny_llama):
    _, url = site
    ctx, page = open_page(browser, url)
    r = page.evaluate("""async (model) => {
      const api = await import('/web/pyengine.mjs');
      let error = null;
      try { await api.createEngine({ model, contextLength: 128, _faults: { failBufferAfter: 20 } }); }
      catch (e) { error = e.message; }
      const e = await api.createEngine({ model, contextLength: 128 });
      const a = await e.chat.completions.create({ messages: [{ role: "user", content: "hello" }], temperature: 0,
                                                  max_tokens: 6, ignore_eos: true });
      return { error, text: a.choices[0].message.content };
    }""", url + "models/tiny/manifest.json")
    assert "could not allocate" in r["error"] and "out of memory" in r["error"]
    assert r["text"] == native_answer(tiny_llama, "hello", 6)
    ctx.close()


@pytest.fixture(scope="module")
def fine_model(site, tiny_llama):
    """The tiny model cut into many small shards of pieces of 1 KiB: a download long enough to watch
    the upload beside it."""
    from pyengine.shards import pack

    out, url = site
    pack(tiny_llama, f"{out}/models/tiny-fine", max_shard=6_000, piece=1024)
    with open(f"{out}/models/tiny-fine/manifest.json") as f:
        return url + "models/tiny-fine/manifest.json", json.load(f)


@pytest.fixture
def fine_page(browser, site, fine_model):
    """A fresh page (its own IndexedDB) and the finely cut model: (page, manifest URL, manifest)."""
    ctx, page = open_page(browser, site[1])
    yield (page, *fine_model)
    ctx.close()


def test_shards_reach_the_gpu_while_the_next_ones_download(fine_page, tiny_expected):
    page, model, manifest = fine_page
    events = page.evaluate("""async (model) => {
      const api = await import("/web/pyengine.mjs");
      const events = [];
      window.engine = await api.createEngine({ model, contextLength: 256, onProgress: (p) => events.push(p) });
      return events;
    }""", model)
    shards = manifest["shards"]
    assert len(shards) > 10 and len(shard_requests(page)) == len(shards)
    downloads = [e for e in events if e["phase"] == "download"]
    # the upload began before the last shard arrived
    assert any(0 < e["uploadedBytes"] and e["shardsDone"] < len(shards) for e in downloads)
    assert page.evaluate(TINY_ASK_JS, QUESTION) == tiny_expected



def test_a_slow_upload_holds_the_download_back(fine_page):
    page, model, manifest = fine_page
    r = page.evaluate(SHA256_JS + """async (model) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = await ShardStore.open(model);
      let arrived = 0, taken = 0, ahead = 0;
      const hashes = [];
      const { result } = await store.load((p) => { arrived = p.shardsDone; ahead = Math.max(ahead, arrived - taken); },
        async () => {
          for (let i = 0; i < store.manifest.shards.length; i++) {
            hashes.push(await sha256Hex(await (await store.shardBlob(i)).arrayBuffer()));
            taken = i + 1;
            await new Promise((ok) => setTimeout(ok, 25));       // a GPU slower than the network
          }
          return "used";
        });
      return { result, ahead, hashes, window: store.concurrency };
    }""", model)
    assert r["result"] == "used"
    assert r["hashes"] == [s["sha256"] for s in manifest["shards"]]
    # no more shards in memory than the window, besides the one being used
    assert r["ahead"] <= r["window"] + 1, r



def test_a_model_the_gpu_cannot_hold_stops_its_download(fine_page, tiny_expected):
    page, model, manifest = fine_page
    error = page.evaluate("""async (model) => {
      const api = await import("/web/pyengine.mjs");
      try { await api.createEngine({ model, contextLength: 256, gpuMemoryLimit: 100000 }); }
      catch (e) { return e.message; }
      return null;
    }""", model)
    assert error and "GPU memory" in error and "the limit is" in error
    first = len(shard_requests(page))
    assert first < len(manifest["shards"]) // 2        # refused after the header: the rest never came
    page.requests.clear()
    page.evaluate(LOAD_JS, model)                      # without the limit: only what is missing
    assert first + len(shard_requests(page)) == len(manifest["shards"])
    assert page.evaluate(TINY_ASK_JS, QUESTION) == tiny_expected



def test_an_upload_that_needs_few_shards_lets_the_rest_download(fine_page):
    page, model, manifest = fine_page
    r = page.evaluate("""async (model) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = await ShardStore.open(model);
      const load = store.load(() => {}, async () => (await store.shardBlob(0)).size);
      const late = new Promise((ok) => setTimeout(() => ok("still waiting after 20 s"), 20000));
      const result = await Promise.race([load.then((x) => x.result), late]);
      return { result, stored: (await store.storedIndices()).size };
    }""", model)
    assert r == {"result": manifest["shards"][0]["size"], "stored": len(manifest["shards"])}


# A stand-in for the GPU replayer: writeBytes as gpu.js's (n padded to 4 with zeros, the offset a
# multiple of 4 as WebGPU demands), into plain arrays.
FAKE_REPLAYER_JS = SHA256_JS + """
const fakeReplayer = (sizes) => ({
  bufs: sizes.map((n) => new Uint8Array((n + 3) & ~3)),
  writes: 0,
  writeBytes(id, dst, src, start, n) {
    if (dst % 4) throw new Error(`writeBuffer at offset ${dst}: not a multiple of 4`);
    this.bufs[id].set(new Uint8Array(src.buffer, src.byteOffset + start, n), dst);
    this.writes += 1;
  },
});
"""


@pytest.mark.parametrize("checking", ["pieces", "whole"])
@pytest.mark.parametrize("body", ["byte stream", "plain stream"])
def test_every_shard_streams_through_the_same_few_small_buffers(fine_page, body, checking):
    # a cold load then a warm one, through writeTensor as the engine uploads: tensors of every size
    # in file order, some across shard boundaries, in pieces far smaller than a shard. Every byte
    # lands where it belongs, and the buffers it went through are one for the download and two for
    # the upload (the shard's stream reads into one, the GPU writes go from the other), for a model
    # of many shards (straight from a byte stream, chunk by chunk from any other), checked piece by
    # piece (the buffers are the manifest's pieces) or shard by shard (they are not)
    page, model, manifest = fine_page
    piece_bytes = 1024 if checking == "pieces" else 1028
    r = page.evaluate(FAKE_REPLAYER_JS + """async ([model, plain, pieceBytes]) => {
      const { ShardStore } = await import("/web/shards.js");
      const fetchImpl = plain ? async (url, init) => {
        const res = await fetch(url, init);
        const reader = res.body.getReader();
        const body = new ReadableStream({ async pull(c) {
          const { done, value } = await reader.read();
          if (done) c.close(); else c.enqueue(value);
        } });
        return new Response(body, { status: res.status });
      } : undefined;
      const run = async (store) => {
        const size = store.manifest.model.size;
        // "tensors": the whole file in ranges of 4 to 36000 bytes one after the other, 4-aligned as GGUF's are
        const ranges = [];
        for (let at = 0, k = 1; at < size; k = (k * 7919) % 9001) {
          const n = Math.min(size - at, 4 * (k + 1));
          ranges.push([at, n]);
          at += n;
        }
        const replayer = fakeReplayer(ranges.map(([, n]) => n));
        let written = 0;
        await store.load(() => {}, async () => {
          for (let id = 0; id < ranges.length; id++) {
            await store.writeTensor(replayer, id, ranges[id][0], ranges[id][1], (n) => { written += n; });
          }
        });
        const file = new Uint8Array(size);
        ranges.forEach(([at, n], id) => file.set(replayer.bufs[id].subarray(0, n), at));
        const hashes = [];
        for (const s of store.manifest.shards) hashes.push(await sha256Hex(file.subarray(s.offset, s.offset + s.size)));
        return { hashes, made: store.buffers.made, fetched: store.requests, writes: replayer.writes,
                 tensors: ranges.length, written, covered: ranges.reduce((a, [, n]) => a + n, 0) };
      };
      const opts = { fetchImpl, pieceBytes };
      const cold = await run(await ShardStore.open(model, opts));
      const store = await ShardStore.open(model, opts);
      const warm = await run(store);
      return { cold, warm, checking: store.checking };
    }""", [model, body == "plain stream", piece_bytes])
    assert r["checking"] == checking and manifest["piece_size"] == 1024
    want = [s["sha256"] for s in manifest["shards"]]
    for run in (r["cold"], r["warm"]):
        assert run["hashes"] == want, run
        assert run["written"] == run["covered"]
        assert run["writes"] > run["tensors"]              # the larger tensors went in several pieces
        assert 1 <= run["made"] <= 3, run
    assert r["cold"]["fetched"] == len(want) > 10 and r["warm"]["fetched"] == 0


def test_a_shard_stored_as_an_array_buffer_is_still_read(browser, site):
    # earlier versions stored each shard's bytes as an ArrayBuffer: such a cache loads without a request
    _, url = site
    ctx, page = open_page(browser, url)
    r = page.evaluate(SHA256_JS + """async (model) => {
      const { ShardStore } = await import("/web/shards.js");
      await loadHashes(await ShardStore.open(model));
      const db = await new Promise((ok, no) => { const r = indexedDB.open("pyengine"); r.onsuccess = () => ok(r.result); r.onerror = no; });
      const recs = await new Promise((ok) => { const r = db.transaction("shards").objectStore("shards").getAll(); r.onsuccess = () => ok(r.result); });
      for (const rec of recs) rec.data = await rec.data.arrayBuffer();
      const tx = db.transaction("shards", "readwrite");
      for (const rec of recs) tx.objectStore("shards").put(rec);
      await new Promise((ok) => { tx.oncomplete = ok; });
      const again = await ShardStore.open(model);
      return { hashes: await loadHashes(again), requests: again.requests, refetched: again.refetched || 0,
               kinds: [...new Set(recs.map((rec) => rec.data.constructor.name))] };
    }""", tiny_url(url))
    want = [s["sha256"] for s in tiny_manifest(site)["shards"]]
    assert r["kinds"] == ["ArrayBuffer"]
    assert r["hashes"] == want and r["requests"] == 0 and r["refetched"] == 0
    ctx.close()


def test_a_body_that_stops_half_way_is_given_up_and_fetched_again(fine_page):
    # the response starts, then no byte comes: after stallMs the shard is fetched again
    page, model, manifest = fine_page
    r = page.evaluate(SHA256_JS + """async (model) => {
      const { ShardStore } = await import("/web/shards.js");
      const calls = {};
      const fetchImpl = async (url, init) => {
        const res = await fetch(url, init);
        calls[url] = (calls[url] || 0) + 1;
        if (!url.endsWith("shard-00003.bin") || calls[url] > 1) return res;
        const reader = res.body.getReader();
        let sent = false;
        const body = new ReadableStream({ async pull(c) {
          if (sent) return new Promise(() => {});          // never another byte
          const { value } = await reader.read();
          c.enqueue(value.subarray(0, 100));
          sent = true;
        } });
        return new Response(body, { status: 200 });
      };
      const store = await ShardStore.open(model, { fetchImpl, stallMs: 1000, backoffMs: 10 });
      const load = loadHashes(store);
      const late = new Promise((ok) => setTimeout(() => ok("still waiting after 20 s"), 20000));
      const hashes = await Promise.race([load, late]);
      if (hashes === "still waiting after 20 s") return { hashes: "stalled" };
      return { hashes, calls: Object.entries(calls).filter(([u, n]) => n > 1).map(([u, n]) => [u.split("/").pop(), n]) };
    }""", model)
    assert r["hashes"] == [s["sha256"] for s in manifest["shards"]]
    assert r["calls"] == [["shard-00003.bin", 2]]


@pytest.fixture(scope="module")
def slow_server(site):
    """A server of the tiny model whose first answer for shard-00001.bin misbehaves as the first part of
    the path says: /trickle/ sends it in 8 parts 0.4 s apart, /stall/ sends half of it and then nothing,
    /endless/ sends it without a length and goes on sending. Its log: [(path, the mode it was answered
    in, or "plain")]. CORS-enabled:
    the page that loads from it is on the site's origin."""
    import http.server
    import threading
    import time

    folder = os.path.join(site[0], "models", "tiny")
    log, seen = [], set()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            _, mode, name = self.path.split("/", 2)
            with open(os.path.join(folder, name), "rb") as f:
                body = f.read()
            first = name == "shard-00001.bin" and (mode, name) not in seen
            seen.add((mode, name))
            log.append((self.path, mode if first else "plain"))
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Cache-Control", "no-store")
            if first and mode == "endless":
                self.send_header("Connection", "close")
                self.end_headers()
                try:
                    for _ in range(10000):
                        self.wfile.write(body)
                        self.wfile.flush()
                        time.sleep(0.01)
                except OSError:            # the page gave up on it
                    pass
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                if first and mode == "trickle":
                    step = -(-len(body) // 8)
                    for at in range(0, len(body), step):
                        self.wfile.write(body[at:at + step])
                        self.wfile.flush()
                        time.sleep(0.4)
                elif first and mode == "stall":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    time.sleep(8)
                else:
                    self.wfile.write(body)
            except OSError:
                pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", log
    httpd.shutdown()


@pytest.mark.parametrize("mode", ["trickle", "stall", "endless"])
def test_the_browser_downloads_shards_into_blobs_and_tells_slow_from_stalled(browser, site, slow_server, mode):
    # Without fetches of its own the store has the browser download each shard into its Blob (no byte
    # passes through the page) and tells what goes wrong from progress events alone: a shard that
    # arrives slowly, each part well inside stallMs though the whole takes longer, is not given up;
    # one that stops half way, and one longer than the manifest says, are, and fetched again.
    base, log = slow_server
    ctx, page = open_page(browser, site[1])
    r = page.evaluate(SHA256_JS + """async (model) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = await ShardStore.open(model, { stallMs: 1500, backoffMs: 10 });
      const t0 = performance.now();
      const hashes = await loadHashes(store);
      return { hashes, viaXHR: store.viaXHR, requests: store.requests, seconds: (performance.now() - t0) / 1000 };
    }""", f"{base}{mode}/manifest.json")
    manifest = tiny_manifest(site)
    shards = len(manifest["shards"])
    assert r["viaXHR"] is True
    assert r["hashes"] == [s["sha256"] for s in manifest["shards"]]
    firsts = [p for p, how in log if how == mode]
    assert firsts == [f"/{mode}/shard-00001.bin"], log
    if mode == "trickle":
        assert r["requests"] == shards and r["seconds"] > 2.8         # it waited for the slow one
    else:
        assert r["requests"] == shards + 1 and r["seconds"] < 8        # given up on, not waited out
    ctx.close()


# shard 3 of the finely cut model with one byte changed in its third piece (of 1 KiB), on its first request
CORRUPT_FETCH_JS = """
const corruptOnce = () => {
  const calls = {};
  return async (url, init) => {
    const res = await fetch(url, init);
    calls[url] = (calls[url] || 0) + 1;
    if (!url.endsWith("shard-00003.bin") || calls[url] > 1) return res;
    const bytes = new Uint8Array(await res.arrayBuffer());
    bytes[2500] ^= 1;
    return new Response(bytes, { status: 200 });
  };
};
"""


@pytest.mark.parametrize("checking", ["pieces", "whole"])
def test_a_changed_byte_in_one_piece_is_caught_and_the_shard_fetched_again(fine_page, checking):
    page, model, manifest = fine_page
    r = page.evaluate(SHA256_JS + CORRUPT_FETCH_JS + """async ([model, pieceBytes]) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = await ShardStore.open(model, { fetchImpl: corruptOnce(), backoffMs: 10, pieceBytes });
      const hashes = await loadHashes(store);
      return { hashes, requests: store.requests, checking: store.checking };
    }""", [model, 1024 if checking == "pieces" else 4096])
    assert r["checking"] == checking
    assert r["hashes"] == [s["sha256"] for s in manifest["shards"]]
    assert r["requests"] == len(manifest["shards"]) + 1


def test_a_manifest_whose_piece_hash_is_wrong_ends_the_load_with_a_clear_error(fine_page):
    # the bytes are right but the manifest says otherwise of one piece: nothing of that shard is used
    page, model, manifest = fine_page
    r = page.evaluate("""async ([model, manifest]) => {
      const { ShardStore } = await import("/web/shards.js");
      manifest.shards[2].pieces[1] = "0".repeat(64);
      const store = new ShardStore(model, manifest, { attempts: 2, backoffMs: 10 });
      const used = [];
      try {
        await store.load(() => {}, async () => {
          for (let i = 0; i < store.manifest.shards.length; i++) { await store.shardBlob(i); used.push(i); }
        });
      } catch (e) { return { error: e.message, used, stored: await store.storedIndices(), checking: store.checking }; }
      return { error: null };
    }""", [model, manifest])
    assert r["checking"] == "pieces"
    assert "shard-00002.bin" in r["error"] and "sha256 does not match" in r["error"], r
    assert 2 not in r["used"] and 2 not in r["stored"]


def test_a_manifest_without_piece_hashes_is_checked_shard_by_shard(fine_page):
    # manifests written before pieces were hashed load as they did: a changed byte is still caught
    page, model, manifest = fine_page
    older = {k: v for k, v in manifest.items() if k != "piece_size"}
    older["shards"] = [{k: v for k, v in s.items() if k != "pieces"} for s in manifest["shards"]]
    r = page.evaluate(SHA256_JS + CORRUPT_FETCH_JS + """async ([model, older]) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = new ShardStore(model, older, { fetchImpl: corruptOnce(), backoffMs: 10 });
      const hashes = await loadHashes(store);
      return { hashes, requests: store.requests, checking: store.checking };
    }""", [model, older])
    assert r["checking"] == "whole"
    assert r["hashes"] == [s["sha256"] for s in manifest["shards"]]
    assert r["requests"] == len(manifest["shards"]) + 1
