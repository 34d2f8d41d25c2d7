"""`pyengine bench`: what a user waits for (load, time to first token, prefill and decode speed) and
where the time goes (the adapter's streaming read bandwidth, decode as a fraction of the limit it
sets, its arithmetic rate, prefill as a fraction of the limit that sets, GPU time per kernel family,
CPU time per token), as JSON; medians of several runs.

The measurements of the GPU itself (measure_bandwidth, measure_arithmetic, profile_decode) run the
same Python code natively and inside the page's worker, through whichever backend the engine has.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from .engine import Engine
from .errors import PyEngineError
from .gguf import read_gguf
from .gpu import Binding, Dispatch, split_workgroups
from .kernels import TEXTURE_ROW_BYTES
from .sampling import SamplingParams
from .tokenizer import Tokenizer
from .tuning import is_cpu

FILLER = ("The history of computing is a story of people who wanted machines to do arithmetic faster "
          "than any clerk could, and of the ideas, from punched cards to transistors, that let them. ")
med = statistics.median


def bench_prompt(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(FILLER, add_bos=False)
    return ids[:n]


async def _time_plan(backend, plan, reps: int, buf=None, before=None) -> float:
    """Median seconds of one replay of `plan` and a 16-byte read of `buf` (as a decode step reads
    its candidates back), after one replay to warm up; `before()` runs before each replay."""
    async def once():
        if before is not None:
            before()
        if buf is None:
            backend.submit(plan)
            await backend.sync()
        else:
            await backend.submit_and_read(plan, buf, 0, 16)
    await once()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        await once()
        times.append(time.perf_counter() - t0)
    return med(times)


def host_info() -> dict:
    """The machine the figures were taken on: on CPU adapters they hinge on its vector width (README.md,
    Benchmarks: lavapipe without AVX-512)."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = next((v for v in ("avx512f", "avx2", "avx", "sse4_2") if v in flags), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "vector": vector}


async def measure_bandwidth(backend, kernels, mb: int = 256, reps: int = 5) -> dict:
    """The read bandwidth a streaming kernel reaches on this adapter: the ceiling for decode, which
    reads every weight once per token."""
    size = min(mb << 20, backend.max_storage_binding, backend.max_buffer_size) // 256 * 256
    threads = base = 16384
    shapes = [(1, "interleaved", False, base), (4, "interleaved", False, base), (4, "chunked", False, base)]
    row = TEXTURE_ROW_BYTES
    if kernels.weight_textures:     # weights lie in textures: the same bytes read from one too (as mat-vecs do)
        size = min(size, backend.max_texture_rows * row) // row * row
        shapes.append((4, "interleaved", True, base))
    if not is_cpu(backend):
        # a GPU hides a load's latency behind other invocations' loads: 16384 of them leave an H100's
        # memory mostly idle (0.4-0.5 TB/s), so also 16x as many, each reading 16x less
        threads = 16 * base
        shapes += [(4, "interleaved", False, threads), (1, "interleaved", False, threads)]
    src = backend.create_buffer(size, "bandwidth source")
    dst = backend.create_buffer(threads * 4, "bandwidth sink")
    variants, tex = {}, None
    try:
        for vec, layout, texture, n in shapes:
            if texture:
                tex = backend.create_texture(size // row, "bandwidth texture")
                backend.copy_to_texture(src, tex)
            pipe = kernels.pipeline("bandwidth", {"vec": vec, "layout": layout, "wtex": texture},
                                    {"N": size // (4 * vec), "THREADS": n})
            plan = backend.create_plan([Dispatch(pipe, {0: Binding(tex if texture else src), 1: Binding(dst)},
                                                 split_workgroups(n // 64), "bandwidth", "bandwidth")])
            name = "texture" if texture else f"{layout} {'vec4' if vec == 4 else 'u32'}"
            if n != base:
                name += f", {n} invocations"
            variants[name] = round(size / await _time_plan(backend, plan, reps) / 1e9, 3)
    finally:
        for b in (src, dst, tex):
            if b is not None:
                backend.destroy_buffer(b)
    return {"gb_s": max(variants.values()), "variants_gb_s": variants, "buffer_bytes": size}


async def measure_arithmetic(backend, kernels, reps: int = 3) -> dict:
    """The rate of f32 multiply-adds a kernel of nothing else reaches on this adapter (independent
    chains, no loads): the ceiling for prefill, whose mat-mats are multiply-adds, as the streaming
    bandwidth is decode's. Counted as 2 FLOPs a multiply-add, the best of a few shapes."""
    n = 16384 if is_cpu(backend) else 16 * 16384      # a GPU needs many more invocations in flight
    iters = 4096        # about 0.1 s a replay on lavapipe: long beside the submission's cost
    dst = backend.create_buffer(n * 4, "arithmetic sink")
    variants = {}
    try:
        for chains, unroll in ((8, 4), (16, 4)):
            pipe = kernels.pipeline("arithmetic", {"chains": chains, "unroll": unroll}, {"ITERS": iters})
            plan = backend.create_plan([Dispatch(pipe, {0: Binding(dst)}, split_workgroups(n // 64),
                                                 "arithmetic", "arithmetic")])
            flops = 2 * 4 * chains * unroll * iters * n
            variants[f"{chains} chains"] = round(flops / await _time_plan(backend, plan, reps) / 1e9, 2)
    finally:
        backend.destroy_buffer(dst)
    return {"gflop_s": max(variants.values()), "variants_gflop_s": variants}


def prefill_flops(engine, n: int) -> int:
    """The FLOPs (2 a multiply-add) of a prefill of n tokens: every layer weight for each token, the
    attention of each token over the keys it sees (q.k and p.v), the output head for the last token."""
    a = engine.args
    mats = sum(w.rows * w.cols for name, w in engine.weights.items() if name.startswith("blk.") and w.rows > 1)
    attention = a.n_layers * a.n_heads * a.head_dim * n * (n + 1)
    head = engine.model.output.rows * engine.model.output.cols
    return 2 * (mats * n + attention + head)


async def profile_decode(engine, position: int = 192, reps: int = 8) -> dict:
    """GPU time of one decode step and of each kernel family in it, replayed on their own."""
    be = engine.backend
    plan = engine.decode_plan
    def step():      # every replay at `position` (a decode step left alone chains on a position further)
        engine._write_step(min(position, engine.context_length - 1), [0], count=False)
    total = await _time_plan(be, plan, reps, engine.state.step, step)
    families: dict[str, list] = {}
    for d in plan.dispatches:
        families.setdefault(d.family or d.label.split(" ")[0], []).append(d)
    parts = {}
    for fam, ds in families.items():
        parts[fam] = {"ms": round(await _time_plan(be, be.create_plan(ds, f"profile {fam}"), reps,
                                                   engine.state.step, step) * 1e3, 3),
                      "dispatches": len(ds)}
    return {"gpu_ms_per_token": round(total * 1e3, 3), "dispatches_per_token": len(plan.dispatches),
            "kernels": dict(sorted(parts.items(), key=lambda kv: -kv[1]["ms"]))}


async def _generate(engine, prompt, gen_tokens):
    engine.reset()
    gen = engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True))
    async for _ in gen:
        pass
    return gen


def weight_bytes_per_token(engine) -> int:
    """What one decode step must read: every weight (the embedding only one row of, unless tied)."""
    total = sum(w.nbytes for w in engine.weights.values())
    emb = engine.weights["token_embd.weight"]
    if engine.model.output is not emb:
        total -= emb.nbytes - emb.nbytes // emb.rows
    return total


async def run_bench(model_path, backend="native", runs=3, prompt_tokens=128, gen_tokens=128, context=None,
                    profile=True):
    """Natively: cold load (the first in this process: pipelines compile), warm loads, then prefill,
    decode and time to first token over `runs` generations, after a first one right after the last load
    (its time to first token apart: it builds the prefill plan)."""
    loads = []
    engine = None
    for _ in range(runs + 1):
        if engine is not None:
            engine.close()
            if isinstance(backend, str):      # Engine.open made this device for it
                engine.backend.destroy()
        t0 = time.perf_counter()
        engine = await Engine.open(model_path, backend, context_length=context)
        loads.append(time.perf_counter() - t0)
        if len(loads) == 1:
            cold_parts = engine.load_times
    prompt = bench_prompt(engine.tokenizer, prompt_tokens)
    prefill, decode, ttft, bandwidths, rates = [], [], [], [], []
    for i in range(runs + 1):
        gen = await _generate(engine, prompt, gen_tokens)
        if i == 0:
            first_ttft = gen.timings.ttft_s
        else:
            prefill.append(gen.timings.prefill_tok_s)
            decode.append(gen.timings.decode_tok_s)
            ttft.append(gen.timings.ttft_s)
            if profile:     # right after the run they bound: this machine's speed drifts by the minute
                bandwidths.append(await measure_bandwidth(engine.backend, engine.kernels))
                rates.append(await measure_arithmetic(engine.backend, engine.kernels))
    out = {
        "model": str(model_path),
        "backend": "native",
        "host": host_info(),
        "adapter": engine.backend.adapter_info,
        "kernel_variants": engine.tuning,
        "runs": runs,
        "cold_load_s": round(loads[0], 3),
        "warm_load_s": round(med(loads[1:]), 3),
        "cold_load_parts_s": {k: round(v, 3) for k, v in cold_parts.items()},
        "prompt_tokens": len(prompt),
        "prefill_tok_s": round(med(prefill), 2),
        "time_to_first_token_s": round(med(ttft), 3),
        "first_request_time_to_first_token_s": round(first_ttft, 3),
        "gen_tokens": gen_tokens,
        "decode_tok_s": round(med(decode), 2),
        "dispatches_per_token": len(engine.decode_plan.dispatches),
        "gpu_bytes": engine.backend.bytes_allocated,
        "weight_bytes_per_token": weight_bytes_per_token(engine),
        "context": engine.context_length,
    }
    if profile:
        out.update(await limits_and_profile(engine, out["decode_tok_s"], list(zip(decode, bandwidths)),
                                            prompt_tokens=len(prompt), prefill_paired=list(zip(prefill, rates))))
    return out


async def limits_and_profile(engine, decode_tok_s: float, paired: list | None = None, prefill_tok_s: float = 0.0,
                             prompt_tokens: int = 128, prefill_paired: list | None = None) -> dict:
    """The decode limit the adapter's read bandwidth sets and the prefill limit its arithmetic rate sets,
    each speed as a fraction of its limit, and the kernel profile. `paired`: (decode tok/s, bandwidth)
    of each run, the bandwidth measured right after that run; `prefill_paired` likewise (prefill tok/s,
    arithmetic rate). Then the limit and the fraction are the medians over the runs, each run held
    against its own measurement (on a shared machine both move together from minute to minute);
    without them, one measurement now against `decode_tok_s` and `prefill_tok_s`."""
    per_token = weight_bytes_per_token(engine)
    bw, fraction = await _against_limit(paired, decode_tok_s, per_token, "gb_s",
                                        lambda: measure_bandwidth(engine.backend, engine.kernels))
    flops = prefill_flops(engine, prompt_tokens) / prompt_tokens
    rate, prefill_fraction = await _against_limit(prefill_paired, prefill_tok_s, flops, "gflop_s",
                                                  lambda: measure_arithmetic(engine.backend, engine.kernels))
    prof = await profile_decode(engine)
    return {
        "bandwidth": bw,
        "decode_limit_tok_s": round(bw["gb_s"] * 1e9 / per_token, 2),
        "decode_fraction_of_limit": round(fraction, 4),
        "arithmetic": rate,
        "prefill_flops_per_token": round(flops),
        "prefill_limit_tok_s": round(rate["gflop_s"] / (flops / 1e9), 2),
        "prefill_fraction_of_limit": round(prefill_fraction, 4),
        "profile": {**prof, "cpu_and_wait_ms_per_token": round(1e3 / decode_tok_s - prof["gpu_ms_per_token"], 3)
                    if decode_tok_s else None},
    }


async def _against_limit(paired: list | None, speed: float, cost: float, key: str, measure) -> tuple:
    """(the measurement that sets a limit, `speed` as a fraction of that limit): the limit in tokens/s is
    the measurement's `key` (GB/s or GFLOP/s) over `cost`, a token's bytes or FLOPs. With `paired`
    ((speed, measurement) of each run), the median measurement and the median of each run's fraction."""
    if paired:
        m = sorted((x for _, x in paired), key=lambda x: x[key])[(len(paired) - 1) // 2]
        m = {**m, "runs_" + key: [x[key] for _, x in paired]}
        return m, med([v / (x[key] * 1e9 / cost) for v, x in paired])
    m = await measure()
    return m, speed / (m[key] * 1e9 / cost)


# -- in the browser ----------------------------------------------------------------------------------

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


class _RendererMemory:
    """Samples the resident memory of the browser's renderer processes (where the page, its worker,
    Pyodide and the shard bytes live; GPU buffers live in the GPU process) every 20 ms."""

    def __init__(self):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        total = 0
        for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                if b"--type=renderer" not in cmd or b"--extension-process" in cmd:
                    continue
                with open(f"/proc/{pid}/statm") as f:
                    total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, ValueError, IndexError):
                continue
        return total

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _build_site(model_path: str, out: str) -> str:
    """A site holding `model_path` as its default model (build/build.py; cached by its manifest)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "build", "build.py")
    if not os.path.isfile(script):
        raise PyEngineError("building a site for a benchmark needs a source checkout (build/build.py)")
    subprocess.run([sys.executable, script, "--model", model_path, "--out", out], check=True,
                   stdout=subprocess.DEVNULL)
    return out


async def run_browser_bench(model=None, runs=3, prompt_tokens=128, gen_tokens=128, dist=None, build=False,
                            profile=True):
    """In headless Chromium through the real page and worker: cold load (network to GPU, in a fresh
    profile) and warm load (IndexedDB to GPU, after a reload), the renderer's peak memory during the
    cold load, then prefill, decode, time to first token and JavaScript calls per token, and the
    bandwidth and kernel profile measured inside the worker."""
    from playwright.async_api import async_playwright

    from .default_model import default_model_path, resolve_model
    from .headless import dist_dir, launch
    from .serve import serve_in_thread

    path = resolve_model(model) if model else default_model_path()
    site = _build_site(path, dist or "dist") if build else dist_dir(dist)
    with open(os.path.join(site, "models", "index.json")) as f:
        index = json.load(f)
    rel = index.get("models", {}).get(model) if model else None
    httpd, url = serve_in_thread(site)
    manifest = url + "models/" + (rel or index["default"])
    with open(os.path.join(site, "models", rel or index["default"])) as f:
        shard_max = max(s["size"] for s in json.load(f)["shards"])
    cold, warm, peaks, after, prefill, decode, ttft, calls = [], [], [], [], [], [], [], []
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            page = None
            for _ in range(runs):
                if page is not None:
                    await page.context.close()
                ctx = await browser.new_context()
                page = await ctx.new_page()
                await page.goto(url + "headless.html")
                with _RendererMemory() as mem:
                    before = mem.now()
                    r = await page.evaluate(LOAD_JS, manifest)
                    cold.append(r["seconds"])
                    cold_parts = {"download_s": round(r["info"]["downloadSeconds"], 3), **r["info"]["loadTimes"]}
                peaks.append(mem.peak - before)
                after.append(mem.now() - before)
                await page.reload()
                r = await page.evaluate(LOAD_JS, manifest)
                warm.append(r["seconds"])
                info = r["info"]
            tok = Tokenizer.from_gguf(read_gguf(path))
            prompt = tok.decode(bench_prompt(tok, prompt_tokens))
            used = 0
            for i in range(runs + 1):
                r = await page.evaluate(RUN_JS, {"prompt": prompt, "gen": gen_tokens})
                x = r["usage"]["extra"]
                if i == 0:      # right after the last load: what is left of the prefill's compile it waits for
                    first_ttft = x["time_to_first_token_s"]
                    continue
                used = r["usage"]["prompt_tokens"]
                prefill.append(x["prefill_tokens_per_s"])
                decode.append(x["decode_tokens_per_s"])
                ttft.append(x["time_to_first_token_s"])
                calls.append(r["stats"]["jsCallsPerToken"])
            out = {
                "model": path,
                "backend": "browser",
                "browser": "headless Chromium",
                "host": host_info(),
                "adapter": info.get("adapter"),
                "runs": runs,
                "cold_load_s": round(med(cold), 3),
                "warm_load_s": round(med(warm), 3),
                "cold_load_parts_s": cold_parts,
                "prompt_tokens": used,
                "prefill_tok_s": round(med(prefill), 2),
                "time_to_first_token_s": round(med(ttft), 3),
                "first_request_time_to_first_token_s": round(first_ttft, 3),
                "gen_tokens": gen_tokens,
                "decode_tok_s": round(med(decode), 2),
                "js_calls_per_token": round(med(calls), 2),
                "gpu_bytes": info.get("gpuBytes"),
                "context": info.get("contextLength"),
                "page_memory_peak_while_loading_mb": round(med(peaks) / 1e6, 1),
                "page_memory_after_load_mb": round(med(after) / 1e6, 1),
                "largest_shard_mb": round(shard_max / 1e6, 1),
            }
            if profile:
                out.update(await page.evaluate("(r) => window.engine._profileForBenchmark(r)",
                                               {"decodeTokS": out["decode_tok_s"], "prefillTokS": out["prefill_tok_s"],
                                                "promptTokens": used}))
            await browser.close()
    finally:
        httpd.shutdown()
    return out
