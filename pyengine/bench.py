"""`pyengine bench`: load time, prefill and decode speed, time to first token; medians of several runs."""

from __future__ import annotations

import statistics
import time

from .engine import Engine
from .sampling import SamplingParams

FILLER = ("The history of computing is a story of people who wanted machines to do arithmetic faster "
          "than any clerk could, and of the ideas, from punched cards to transistors, that let them. ")


def bench_prompt(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(FILLER, add_bos=False)
    return ids[:n]


async def run_bench(model_path, backend="native", runs=3, prompt_tokens=128, gen_tokens=128, context=None):
    loads, prefill, decode, ttft = [], [], [], []
    engine = None
    for _ in range(runs):
        if engine is not None:
            engine.backend.destroy()
            engine = None
        t0 = time.perf_counter()
        engine = await Engine.open(model_path, backend, context_length=context)
        loads.append(time.perf_counter() - t0)
    prompt = bench_prompt(engine.tokenizer, prompt_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    for i in range(runs + 1):           # the first run compiles the prefill plan: not counted
        engine.reset()
        gen = engine.generate(prompt, params)
        async for _ in gen:
            pass
        if i == 0:
            continue
        prefill.append(gen.timings.prefill_tok_s)
        decode.append(gen.timings.decode_tok_s)
        ttft.append(gen.timings.ttft_s)
    decode_plan = engine.decode_plan
    return {
        "model": str(model_path),
        "backend": backend,
        "adapter": engine.backend.adapter_info,
        "runs": runs,
        "load_s": round(statistics.median(loads), 3),
        "prompt_tokens": len(prompt),
        "prefill_tok_s": round(statistics.median(prefill), 2),
        "time_to_first_token_s": round(statistics.median(ttft), 3),
        "gen_tokens": gen_tokens,
        "decode_tok_s": round(statistics.median(decode), 2),
        "dispatches_per_token": len(decode_plan.dispatches),
        "gpu_bytes": getattr(engine.backend, "bytes_allocated", None),
        "weights_bytes": sum(w.nbytes for w in engine.weights.values()),
        "context": engine.context_length,
    }


LOAD_JS = """async (model) => {
  const { createEngine } = await import("/web/pyengine.mjs");
  const t0 = performance.now();
  window.engine = await createEngine({ model });
  return { seconds: (performance.now() - t0) / 1000, info: window.engine.info };
}"""

RUN_JS = """async ({ prompt, gen }) => {
  await window.engine.resetChat();
  const r = await window.engine.completions.create({ prompt, max_tokens: gen, temperature: 0, ignore_eos: true });
  return { usage: r.usage, stats: await window.engine.runtimeStats() };
}"""


async def run_browser_bench(model_path=None, runs=3, prompt_tokens=128, gen_tokens=128, dist=None):
    """Cold load (network to GPU) and warm load (IndexedDB to GPU) in fresh headless Chromium
    profiles, then prefill, decode and time to first token through the JavaScript API."""
    from playwright.async_api import async_playwright

    from .gguf import read_gguf
    from .headless import dist_dir, launch
    from .serve import serve_in_thread
    from .tokenizer import Tokenizer

    site = dist_dir(dist)
    httpd, url = serve_in_thread(site)
    cold, warm, prefill, decode, ttft, calls = [], [], [], [], [], []
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            import json as _json
            import os as _os

            with open(_os.path.join(site, "models", "index.json")) as f:
                manifest = url + "models/" + _json.load(f)["default"]
            page = None
            for _ in range(runs):
                if page is not None:
                    await page.context.close()
                ctx = await browser.new_context()
                page = await ctx.new_page()
                await page.goto(url + "headless.html")
                cold.append((await page.evaluate(LOAD_JS, manifest))["seconds"])
                await page.reload()
                r = await page.evaluate(LOAD_JS, manifest)
                warm.append(r["seconds"])
                info = r["info"]
            tok = Tokenizer.from_gguf(read_gguf(model_path)) if model_path else None
            prompt = tok.decode(bench_prompt(tok, prompt_tokens)) if tok else FILLER * (prompt_tokens // 20)
            used = 0
            for i in range(runs + 1):
                r = await page.evaluate(RUN_JS, {"prompt": prompt, "gen": gen_tokens})
                if i == 0:
                    continue
                x = r["usage"]["extra"]
                used = r["usage"]["prompt_tokens"]
                prefill.append(x["prefill_tokens_per_s"])
                decode.append(x["decode_tokens_per_s"])
                ttft.append(x["time_to_first_token_s"])
                calls.append(r["stats"]["jsCallsPerToken"])
            await browser.close()
    finally:
        httpd.shutdown()
    med = statistics.median
    return {
        "backend": "browser",
        "browser": "headless Chromium",
        "adapter": info.get("adapter"),
        "runs": runs,
        "cold_load_s": round(med(cold), 3),
        "warm_load_s": round(med(warm), 3),
        "prompt_tokens": used,
        "prefill_tok_s": round(med(prefill), 2),
        "time_to_first_token_s": round(med(ttft), 3),
        "gen_tokens": gen_tokens,
        "decode_tok_s": round(med(decode), 2),
        "js_calls_per_token": round(med(calls), 2),
        "gpu_bytes": info.get("gpuBytes"),
        "context": info.get("contextLength"),
    }
