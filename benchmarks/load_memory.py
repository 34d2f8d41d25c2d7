"""The page's memory over a cold load in headless Chromium: where it rises, how high, and what is
left once the model is on the GPU.

    python benchmarks/load_memory.py [--dist dist] [--model NAME] [--runs 3] [--timeline]

`pyengine bench --backend browser` prints one figure, the peak of the renderer processes' resident
memory while loading. This splits it by phase, sampling every 20 ms in a fresh browser profile for
each run: `runtime` is the rise while Pyodide and the engine start (up to the first shard's
progress event), `shards` the highest point while shards download and go to the GPU, `end` what is
left two seconds after the load, and `footprint` what is left once the page and its worker have
collected their garbage (the engine's own memory: Pyodide, its heap, the engine's objects), all in
MB over the page before the load, medians of --runs. The target "about two shards over the
engine's own footprint" speaks of the shard phase's peak less `footprint`, in shards of the
model's largest size. --timeline prints every run's samples. The browser runs with V8's gc()
exposed, which the benchmark alone calls.
Build a site for another model first (`python build/build.py --model FILE --out DIR`).

--breakdown adds one more cold load traced by Chromium's memory-infra (an allocator dump of every
process every 100 ms) and prints, for the renderer the page and its worker live in, each allocator's
highest value during the shard phase and its value at the end of the load: `partition_alloc/buffer`
holds the bytes of Blobs built in the page until the browser process has taken them (no shard's:
the browser downloads those into Blobs itself), `partition_alloc/array_buffer` the ArrayBuffers (the loader's
piece buffers), `shared_memory` what the page shares with other processes (WebGPU's command and
upload staging among it), `v8` and `blink_gc` the JavaScript heaps. WebAssembly memory (Pyodide's
heap) is none of them: it is part of the footprint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyengine.bench import _RendererMemory  # noqa: E402
from pyengine.headless import dist_dir, launch  # noqa: E402
from pyengine.serve import serve_in_thread  # noqa: E402

LOAD_JS = """async (model) => {
  const { createEngine } = await import("/web/pyengine.mjs");
  const t0 = performance.now();
  const shards = [];
  window.engine = await createEngine({ model, onProgress: (p) => {
    if (p.phase === "download" || p.phase === "upload") shards.push((performance.now() - t0) / 1000);
  } });
  return { seconds: (performance.now() - t0) / 1000, shards: [shards[0], shards[shards.length - 1]] };
}"""


async def one_run(browser, url: str, manifest: str) -> dict:
    page = await (await browser.new_context()).new_page()
    await page.goto(url + "headless.html")
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    base = _RendererMemory.now()
    t0 = time.perf_counter()

    def sample():
        while not stop.wait(0.02):
            samples.append((time.perf_counter() - t0, _RendererMemory.now() - base))

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        r = await page.evaluate(LOAD_JS, manifest)
        await asyncio.sleep(2.0)
        end = len(samples)
        # what the engine itself keeps: memory once the page and its worker have collected garbage
        for w in page.workers:
            await w.evaluate("gc()")
        await page.evaluate("gc()")
        await asyncio.sleep(1.5)
    finally:
        stop.set()
        th.join()
    await page.context.close()
    first, last = r["shards"]
    runtime = max((m for t, m in samples if t <= first), default=0)
    shards = max((m for t, m in samples if first <= t <= last + 0.1), default=0)
    return {"load_s": r["seconds"], "runtime": runtime, "shards": shards, "end": samples[end - 1][1],
            "footprint": samples[-1][1], "samples": samples}


BREAKDOWN = {"Blob bytes (partition_alloc/buffer)": "partition_alloc/partitions/buffer",
             "ArrayBuffers (partition_alloc/array_buffer)": "partition_alloc/partitions/array_buffer",
             "shared memory": "shared_memory", "malloc": "malloc", "V8 heaps": "v8", "Blink GC heap": "blink_gc"}


async def breakdown(browser, url: str, manifest: str) -> dict:
    """One cold load under memory-infra tracing: the renderer's allocators, MB, highest in the shard
    phase and at the end."""
    cdp = await browser.new_browser_cdp_session()
    events, complete = [], asyncio.Event()
    cdp.on("Tracing.dataCollected", lambda e: events.extend(e["value"]))
    cdp.on("Tracing.tracingComplete", lambda e: complete.set())
    page = await (await browser.new_context()).new_page()
    await page.goto(url + "headless.html")
    await cdp.send("Tracing.start", {"transferMode": "ReportEvents", "traceConfig": {
        "includedCategories": ["disabled-by-default-memory-infra"],
        "memoryDumpConfig": {"triggers": [{"mode": "light", "periodic_interval_ms": 100}]}}})
    r = await page.evaluate(LOAD_JS, manifest)
    await cdp.send("Tracing.end")
    await complete.wait()
    await page.context.close()
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    dumps = [e for e in events if e.get("ph") == "v" and "allocators" in e["args"].get("dumps", {})]
    if not dumps:
        raise SystemExit("the trace holds no allocator dumps: this Chromium does not trace memory-infra")

    def size(dump, key):
        a = dump["args"]["dumps"]["allocators"].get(key)
        return int(a["attrs"]["size"]["value"], 16) / 1e6 if a and "size" in a.get("attrs", {}) else 0.0
    # the page's renderer: the one whose ArrayBuffers and Blob bytes reach the highest
    renderers = {e["pid"] for e in dumps if names.get(e["pid"]) == "Renderer"}
    pid = max(renderers, key=lambda p: max(size(e, "partition_alloc/partitions/buffer")
                                           + size(e, "partition_alloc/partitions/array_buffer")
                                           for e in dumps if e["pid"] == p))
    mine = sorted((e for e in dumps if e["pid"] == pid), key=lambda e: e["ts"])
    t0 = mine[0]["ts"]
    first, last = r["shards"]
    # trace time is microseconds on the same clock for every process; the load starts near the first dump
    phase = [e for e in mine if first - 0.2 <= (e["ts"] - t0) / 1e6 <= last + 0.2] or mine
    return {name: {"shard_phase_max_mb": round(max(size(e, key) for e in phase), 1),
                   "end_mb": round(size(mine[-1], key), 1)} for name, key in BREAKDOWN.items()}


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dist", help="the built site (default: ./dist)")
    ap.add_argument("--model", help="a model of the site's index (default: its default)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--timeline", action="store_true", help="print each run's samples")
    ap.add_argument("--breakdown", action="store_true",
                    help="one more cold load, traced: the renderer's memory by allocator (see above)")
    a = ap.parse_args()
    from playwright.async_api import async_playwright

    site = dist_dir(a.dist)
    with open(os.path.join(site, "models", "index.json")) as f:
        index = json.load(f)
    rel = index["models"][a.model] if a.model else index["default"]
    with open(os.path.join(site, "models", rel)) as f:
        m = json.load(f)
    shard = max(s["size"] for s in m["shards"])
    httpd, url = serve_in_thread(site)
    runs = []
    try:
        async with async_playwright() as p:
            browser = await launch(p, extra_args=["--js-flags=--expose-gc"])
            for _ in range(a.runs):
                runs.append(await one_run(browser, url, url + "models/" + rel))
            parts = await breakdown(browser, url, url + "models/" + rel) if a.breakdown else None
            await browser.close()
    finally:
        httpd.shutdown()
    if a.timeline:
        for i, r in enumerate(runs):
            print(f"run {i + 1}: " + " ".join(f"{t:.2f}s:{v / 1e6:.0f}" for t, v in r["samples"][::5]))
    med = {k: statistics.median(r[k] for r in runs) for k in ("load_s", "runtime", "shards", "end", "footprint")}
    print(json.dumps({
        "model": m["model"]["name"], "model_mb": round(m["model"]["size"] / 1e6, 1),
        "shards": len(m["shards"]), "largest_shard_mb": round(shard / 1e6, 1), "runs": a.runs,
        "cold_load_s": round(med["load_s"], 2),
        "runtime_peak_mb": round(med["runtime"] / 1e6, 1),
        "shard_phase_peak_mb": round(med["shards"] / 1e6, 1),
        "after_load_mb": round(med["end"] / 1e6, 1),
        "footprint_mb": round(med["footprint"] / 1e6, 1),
        "shard_phase_over_footprint_in_shards": round(statistics.median(
            (r["shards"] - r["footprint"]) / shard for r in runs), 2),
        **({"renderer_allocators": parts} if parts is not None else {}),
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
