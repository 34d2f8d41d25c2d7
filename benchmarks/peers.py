"""pyengine against its peers, in one run, on one machine, the same GGUF file and the same prompt tokens.

    python benchmarks/peers.py [--model NAME_OR_PATH | --synthetic llama-1b] [--runs 3]

  pyengine native      `pyengine bench`: wgpu-py on the machine's WebGPU adapter (lavapipe without a GPU)
  pyengine browser     `pyengine bench --backend browser`: headless Chromium, WebGPU (SwiftShader without a GPU)
  llama.cpp native     llama-cpp-python, every core (`make peers` builds it)
  wllama               llama.cpp in WebAssembly (npm @wllama/wllama), in the same headless Chromium,
                       multi-threaded (the page is cross-origin isolated), every core; and its WebGPU mode

Prints each engine's figures (load, time to first token, prefill and decode tokens/s: medians of
--runs runs) as JSON, then a table with each pyengine figure as a ratio to each peer. Speeds are
measured by the engines' own clocks where they report them (llama.cpp's timings inside wllama),
otherwise by wall clock around the same calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", ".cache")
WLLAMA = "3.8.1"
sys.path.insert(0, ROOT)

from pyengine.bench import bench_prompt, run_bench, run_browser_bench  # noqa: E402
from pyengine.default_model import resolve_model  # noqa: E402
from pyengine.gguf import read_gguf  # noqa: E402
from pyengine.tokenizer import Tokenizer  # noqa: E402

med = statistics.median


# -- llama.cpp native -------------------------------------------------------------------------------

def llama_cpp_bench(path: str, prompt: list[int], gen: int, runs: int, threads: int) -> dict:
    try:
        import numpy as np
        from llama_cpp import Llama
    except ImportError:
        raise SystemExit("llama.cpp's Python binding is missing: run `make peers` (it builds llama-cpp-python)")
    t0 = time.perf_counter()
    llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load = time.perf_counter() - t0
    prefill, decode, ttft = [], [], []
    for i in range(runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        for _ in range(gen - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if i:        # the first run warms caches up
            prefill.append(len(prompt) / (t1 - t0))
            ttft.append(t1 - t0)
            decode.append((gen - 1) / (t2 - t1))
    return {"engine": "llama.cpp native (llama-cpp-python)", "threads": threads, "load_s": round(load, 3),
            "time_to_first_token_s": round(med(ttft), 3), "prefill_tok_s": round(med(prefill), 2),
            "decode_tok_s": round(med(decode), 2)}


# -- wllama in headless Chromium ----------------------------------------------------------------------

PAGE = """<!doctype html><meta charset="utf-8"><title>wllama bench</title>
<script type="module">
import { Wllama } from "./wllama/esm/index.js";
window.bench = async ({ model, prompt, gen, runs, gpu }) => {
  const w = new Wllama({ default: "./wllama/esm/wasm/wllama.wasm" });
  const t0 = performance.now();
  await w.loadModelFromUrl(model, { n_ctx: 2048, n_batch: 512, n_threads: navigator.hardwareConcurrency,
                                     n_gpu_layers: gpu ? 999 : 0, useCache: false });
  const load = (performance.now() - t0) / 1000;
  const out = [];
  for (let i = 0; i <= runs; i++) {
    const r = await w.createCompletion({ prompt, max_tokens: gen, temperature: 0, top_k: 1, ignore_eos: true,
                                         cache_prompt: false });
    out.push(r.timings);
  }
  const info = { multithread: w.isMultithread(), threads: w.getNumThreads(), crossOriginIsolated };
  await w.exit();
  return { load, timings: out, info };
};
window.ready = true;
</script>"""


def wllama_files() -> str:
    """@wllama/wllama from the npm registry, unpacked once into benchmarks/.cache."""
    dest = os.path.join(CACHE, f"wllama-{WLLAMA}")
    if not os.path.isdir(os.path.join(dest, "esm")):
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(["npm", "pack", f"@wllama/wllama@{WLLAMA}", "--silent", "--pack-destination", CACHE],
                       check=True, stdout=subprocess.DEVNULL)
        with tarfile.open(os.path.join(CACHE, f"wllama-wllama-{WLLAMA}.tgz")) as tar:
            tar.extractall(os.path.join(CACHE, "wllama-unpacked"), filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(os.path.join(CACHE, "wllama-unpacked", "package"), dest)
    return dest


async def wllama_bench(path: str, prompt_text: str, prompt_len: int, gen: int, runs: int, gpu: bool) -> dict:
    from playwright.async_api import async_playwright

    from pyengine.headless import launch
    from pyengine.serve import serve_in_thread

    site = os.path.join(CACHE, "wllama-site")
    shutil.rmtree(site, ignore_errors=True)
    os.makedirs(site)
    with open(os.path.join(site, "index.html"), "w") as f:
        f.write(PAGE)
    os.symlink(wllama_files(), os.path.join(site, "wllama"))
    os.symlink(os.path.abspath(path), os.path.join(site, "model.gguf"))
    httpd, url = serve_in_thread(site, isolate=True)     # COOP/COEP: SharedArrayBuffer, so threads
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            page = await browser.new_page()
            await page.goto(url + "index.html")
            await page.wait_for_function("() => window.ready")
            r = await page.evaluate("(a) => window.bench(a)", {"model": url + "model.gguf", "prompt": prompt_text,
                                                               "gen": gen, "runs": runs, "gpu": gpu})
            await browser.close()
    finally:
        httpd.shutdown()
    t = r["timings"][1:]
    return {"engine": f"wllama {WLLAMA} ({'WebGPU' if gpu else 'WebAssembly'})", **r["info"],
            "load_s": round(r["load"], 3),
            "prompt_tokens": t[0].get("prompt_n"), "expected_prompt_tokens": prompt_len,
            "time_to_first_token_s": round(med(x["prompt_ms"] for x in t) / 1000, 3),
            "prefill_tok_s": round(med(x["prompt_per_second"] for x in t), 2),
            "decode_tok_s": round(med(x["predicted_per_second"] for x in t), 2)}


# -- the table ----------------------------------------------------------------------------------------

FIGURES = [("load_s", "load (s)", False), ("time_to_first_token_s", "time to first token (s)", False),
           ("prefill_tok_s", "prefill (tok/s)", True), ("decode_tok_s", "decode (tok/s)", True)]


def table(ours: dict, peers: dict) -> str:
    names = list(ours) + list(peers)
    rows = ["| figure | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key, label, _ in FIGURES:
        cells = [str((ours | peers)[n].get(key, "")) for n in names]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append("")
    rows.append("pyengine / peer (above 1 means pyengine is better: faster, or less time)")
    rows.append("| figure | " + " | ".join(f"{o} / {p}" for o in ours for p in peers) + " |")
    rows.append("|---" * (len(ours) * len(peers) + 1) + "|")
    for key, label, higher_better in FIGURES:
        cells = []
        for o in ours.values():
            for pv in peers.values():
                a, b = o.get(key), pv.get(key)
                cells.append(f"{(a / b if higher_better else b / a):.2f}" if a and b else "")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a packaged model's name or a GGUF path")
    ap.add_argument("--synthetic", help="a synthetic model instead (llama-1b)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--skip", action="append", default=[],
                    choices=["native", "browser", "llama.cpp", "wllama", "wllama-webgpu"])
    a = ap.parse_args(argv)
    if a.synthetic:
        from pyengine.synthetic import synthetic_model
        path = synthetic_model(a.synthetic)
    else:
        path = resolve_model(a.model)
    tok = Tokenizer.from_gguf(read_gguf(path))
    prompt = bench_prompt(tok, a.prompt_tokens)
    text = tok.decode(prompt)
    threads = os.cpu_count() or 1
    ours, peers = {}, {}
    if "native" not in a.skip:
        ours["pyengine native"] = asyncio.run(run_bench(path, runs=a.runs, prompt_tokens=a.prompt_tokens,
                                                        gen_tokens=a.gen_tokens, profile=False))
        ours["pyengine native"]["load_s"] = ours["pyengine native"]["warm_load_s"]
    if "browser" not in a.skip:
        b = asyncio.run(run_browser_bench(path, runs=a.runs, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                                          dist=os.path.join(CACHE, "dist"), build=True))
        b["load_s"] = b["cold_load_s"]
        ours["pyengine browser"] = b
    if "llama.cpp" not in a.skip:
        peers["llama.cpp native"] = llama_cpp_bench(path, prompt, a.gen_tokens, a.runs, threads)
    if "wllama" not in a.skip:
        peers["wllama wasm"] = asyncio.run(wllama_bench(path, text, len(prompt), a.gen_tokens, a.runs, gpu=False))
    if "wllama-webgpu" not in a.skip:
        try:
            peers["wllama webgpu"] = asyncio.run(wllama_bench(path, text, len(prompt), a.gen_tokens, a.runs, gpu=True))
        except Exception as e:   # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            peers["wllama webgpu"] = {"engine": "wllama (WebGPU)", "error": str(e).splitlines()[0]}
    print(json.dumps({"model": path, "prompt_tokens": len(prompt), "gen_tokens": a.gen_tokens, "threads": threads,
                      "pyengine": ours, "peers": peers}, indent=2))
    print()
    print(table(ours, peers))


if __name__ == "__main__":
    main()
