"""The browser build end to end: headless Chromium (Playwright), WebGPU on SwiftShader, the real page and worker."""

from __future__ import annotations

import os

import pytest

from browser_helpers import LOAD_JS, ROOT, SHARD, manifest_url, native_greedy, open_page, rejected

ARTIFACTS = os.path.join(ROOT, "test-artifacts")
PROMPTS = ["What is the capital of France?", "List three fruits."]


@pytest.fixture(scope="module")
def loaded(browser, site):
    """One page whose engine has loaded once from the network and once more from IndexedDB."""
    _, url = site
    ctx, page = open_page(browser, url)
    info = page.evaluate(LOAD_JS, manifest_url(url))
    cold = [u for u in page.requests if SHARD.search(u)]
    page.requests.clear()
    page.reload()
    info2 = page.evaluate(LOAD_JS, manifest_url(url))
    warm = [u for u in page.requests if SHARD.search(u)]
    yield page, {"cold": cold, "warm": warm, "info": info, "info2": info2}
    ctx.close()


def test_first_visit_downloads_each_shard_once(loaded):
    _, r = loaded
    assert len(r["cold"]) == len(set(r["cold"])) == r["info"]["shardsFetched"] > 1


def test_reload_loads_from_indexeddb_with_no_shard_requests(loaded):
    _, r = loaded
    assert r["warm"] == []
    assert r["info2"]["shardsFetched"] == 0


def test_kernel_tuning_is_measured_on_the_first_visit_and_kept_in_indexeddb(loaded):
    _, r = loaded
    first, again = r["info"]["tuning"], r["info2"]["tuning"]
    assert first["source"] == "measured" and again["source"] == "cached" and again["choice"] == first["choice"]


def test_browser_greedy_equals_native(loaded, engine):
    page, _ = loaded
    for prompt in PROMPTS:
        got = page.evaluate("""async (prompt) => {
          await window.engine.resetChat();
          const r = await window.engine.chat.completions.create({
            messages: [{ role: "user", content: prompt }], temperature: 0, max_tokens: 10 });
          return r.choices[0].message.content;
        }""", prompt)
        engine.reset()
        assert got == native_greedy(engine, prompt, 10)


def test_interrupt_stops_a_stream_and_the_next_request_is_correct(loaded, engine):
    page, _ = loaded
    r = page.evaluate("""async () => {
      const e = window.engine;
      const stream = await e.chat.completions.create({
        messages: [{ role: "user", content: "Write a long story about a dragon." }], stream: true,
        max_tokens: 200, temperature: 0 });
      let n = 0, finish = null;
      for await (const c of stream) {
        if (c.choices[0] && c.choices[0].delta.content) { n++; if (n === 2) await e.interruptGenerate(); }
        if (c.choices[0] && c.choices[0].finish_reason) finish = c.choices[0].finish_reason;
      }
      const next = await e.chat.completions.create({
        messages: [{ role: "user", content: "What is the capital of France?" }], temperature: 0, max_tokens: 10 });
      return { n, finish, next: next.choices[0].message.content };
    }""")
    assert r["finish"] == "abort" and r["n"] < 10
    engine.reset()
    assert r["next"] == native_greedy(engine, "What is the capital of France?", 10)


def test_bad_requests_reject_naming_the_field(loaded):
    page, _ = loaded
    errors = rejected(page, """[
        { messages: [] }, { messages: [{ role: "wizard", content: "x" }] },
        { messages: [{ role: "user", content: "x" }], temperature: -1 },
        { messages: [{ role: "user", content: "x" }], max_tokens: 0 },
        { messages: [{ role: "user", content: "x" }], top_p: 2, stream: true }]""")
    fields = [e and e[0] for e in errors]
    assert fields == ["messages", "messages[0].role", "temperature", "max_tokens", "top_p"]


def test_second_turn_reuses_the_kv_cache(loaded):
    page, _ = loaded
    r = page.evaluate("""async () => {
      const e = window.engine;
      await e.resetChat();
      const msgs = [{ role: "user", content: "Hi!" }];
      const a = await e.chat.completions.create({ messages: msgs, temperature: 0, max_tokens: 4 });
      msgs.push(a.choices[0].message, { role: "user", content: "And then?" });
      const b = await e.chat.completions.create({ messages: msgs, temperature: 0, max_tokens: 2 });
      return [a.usage, b.usage, await e.runtimeStats()];
    }""")
    first, second, stats = r
    assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"]
    assert stats["decodeTokensPerSecond"] > 0 and stats["jsCallsPerToken"] < 10


def test_cut_download_resumes_with_only_the_missing_shards(browser, site):
    _, url = site
    ctx, page = open_page(browser, url)
    served = []

    def cut(route):
        if len(served) >= 2:
            route.abort()
        else:
            served.append(route.request.url)
            route.continue_()

    page.route(SHARD, cut)
    with pytest.raises(Exception, match="could not be downloaded"):
        page.evaluate(LOAD_JS, manifest_url(url))
    page.unroute(SHARD)
    cached = page.evaluate("async () => (await import('/web/pyengine.mjs')).listCachedModels()")
    assert len(cached) == 1 and not cached[0]["complete"] and cached[0]["storedShards"] == 2
    page.reload()
    page.requests.clear()
    page.evaluate(LOAD_JS, manifest_url(url))
    again = [u for u in page.requests if SHARD.search(u)]
    total = cached[0]["shards"]
    assert len(again) == total - 2 and not set(again) & set(served)
    cached = page.evaluate("async () => (await import('/web/pyengine.mjs')).listCachedModels()")
    assert cached[0]["complete"] and cached[0]["storedBytes"] == cached[0]["size"]
    page.evaluate("async (id) => (await import('/web/pyengine.mjs')).deleteCachedModel(id)", cached[0]["id"])
    assert page.evaluate("async () => (await import('/web/pyengine.mjs')).listCachedModels()") == []
    ctx.close()


EMBED_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>host page</title>
<style>* { color: rgb(255, 0, 0) !important; font-family: serif !important; } input { display: none !important; }
p { font-size: 31px; }</style></head>
<body><p id="own">The host page's own text.</p>
<script src="/web/embed.js" data-model="/models/index.json" data-temperature="0" data-max-tokens="8"></script>
</body></html>"""


def test_embed_widget_answers_on_a_page_with_its_own_styles(browser, site):
    out, url = site
    with open(os.path.join(out, "embed-test.html"), "w") as f:
        f.write(EMBED_PAGE)
    ctx = browser.new_context()
    page = ctx.new_page()
    page.goto(url + "embed-test.html")
    host = page.locator("#pyengine-chat")
    page.wait_for_function("() => { const h = document.querySelector('#pyengine-chat');"
                           " return h && (h.dataset.ready || h.dataset.failed); }", timeout=240_000)
    assert host.get_attribute("data-failed") is None
    inp = host.locator("input")
    assert inp.is_visible()                         # the page's `input { display: none }` does not reach in
    inp.fill("What is the capital of France?")
    host.locator("button").click()
    answer = host.locator(".m.a[data-done]")
    answer.wait_for(timeout=240_000)
    assert "Paris" in answer.text_content()
    assert answer.evaluate("e => getComputedStyle(e).color") != "rgb(255, 0, 0)"
    own = page.locator("#own")                      # and the widget's styles do not reach out
    assert own.evaluate("e => getComputedStyle(e).fontSize") == "31px"
    ctx.close()


def test_demo_page_answers_and_is_screenshotted(browser, site):
    _, url = site
    ctx = browser.new_context(viewport={"width": 900, "height": 700})
    page = ctx.new_page()
    page.goto(url + "index.html?temperature=0&max_tokens=12")
    page.wait_for_function("() => document.body.dataset.ready || document.body.dataset.failed", timeout=240_000)
    assert page.evaluate("document.body.dataset.failed") is None
    page.fill("#input", "What is the capital of France?")
    page.click("#send")
    answer = page.locator(".msg.assistant[data-done]")
    answer.wait_for(timeout=240_000)
    assert "Paris" in answer.text_content()
    assert "tok/s" in page.text_content("#speed")
    assert "MB" in page.text_content("#models")
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, "demo-page.png")
    page.screenshot(path=path, full_page=True)
    assert os.path.getsize(path) > 10_000
    ctx.close()


def test_a_model_that_will_not_fit_fails_before_downloading(browser, site):
    _, url = site
    ctx, page = open_page(browser, url)
    err = page.evaluate("""async (manifest) => {
      const { ShardStore } = await import("/web/shards.js");
      const store = await ShardStore.open(manifest);
      navigator.storage.estimate = async () => ({ quota: 50e6, usage: 10e6 });
      try { await store.ensure(); return null; } catch (e) { return [e.message, store.requests]; }
    }""", manifest_url(url))
    assert err is not None
    message, requests = err
    assert "not enough browser storage" in message and "98.4 MB more" in message and "40.0 MB is free" in message
    assert requests == 0
    assert not [u for u in page.requests if SHARD.search(u)]
    ctx.close()


def test_browser_benchmark_reports_loads_speed_memory_and_calls_per_token(site):
    from conftest import run
    from pyengine.bench import run_browser_bench

    out, _ = site
    r = run(run_browser_bench(runs=1, prompt_tokens=16, gen_tokens=4, dist=out))
    assert r["cold_load_s"] > 0 and r["warm_load_s"] > 0 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
    assert r["first_request_time_to_first_token_s"] > 0
    assert r["js_calls_per_token"] <= 5            # DESIGN.md rule 1: a handful of calls per token
    assert r["page_memory_peak_while_loading_mb"] >= r["page_memory_after_load_mb"] > 0
    assert r["bandwidth"]["gb_s"] > 0 and "matvec" in r["profile"]["kernels"]
    assert r["arithmetic"]["gflop_s"] > 0 and r["prefill_fraction_of_limit"] > 0


COMPILE_JS = """async (codes) => {
  const adapter = await navigator.gpu.requestAdapter();
  const features = ["shader-f16", "subgroups"].filter((f) => adapter.features.has(f));
  const device = await adapter.requestDevice({ requiredFeatures: features });
  const errors = [];
  for (const [name, code] of codes) {
    const info = await device.createShaderModule({ code }).getCompilationInfo();
    for (const m of info.messages) if (m.type === "error") errors.push(`${name}: ${m.lineNum}: ${m.message}`);
  }
  return { features, errors };
}"""


def test_the_kernels_a_gpu_may_choose_compile_in_chromium(browser, site):
    """Chromium's WGSL compiler (Tint) checks what the native one (naga) lets through, such as barriers in
    non-uniform control flow. The mat-vecs GPUs choose (split ones: workgroup barriers) and their prefill
    mat-mats (broadcasts from 8 lanes) run in no browser test here, where the adapter is a CPU with 4-lane
    subgroups: each, in the shapes decode and prefill give it (norm folded in, gate and up, q, k and v
    with RoPE, the residual), must compile in Chromium as pyengine's browser backend renders it."""
    from pyengine import tuning
    from pyengine.kernels import Kernels

    _, url = site
    ctx, page = open_page(browser, url)
    try:
        probe = page.evaluate(COMPILE_JS, [])
        assert probe["errors"] == []

        class GPU:          # the browser backend on a GPU with the page's features (buffers, no textures)
            name = "browser"
            features = set(probe["features"])
            adapter_info = {"vendor": "nvidia", "architecture": "hopper", "device": "", "description": ""}
            max_texture_rows = 8192

        k = Kernels(GPU())
        lanes = 32 if "subgroups" in GPU.features else 0
        shapes = [dict(qtype="Q4_1", epilogue="store", bias=True),
                  dict(qtype="Q4_0", epilogue="glu", bias=False, act="silu", norm=True),
                  dict(qtype="Q6_K", epilogue="accumulate", bias=False),
                  dict(qtype="Q8_0", epilogue="store", bias=False, multi=3, rope=True, freq_factors=True,
                       kv_f16=False, kvtex=False, norm=True)]
        codes = []
        for v in tuning.every_variant(lanes):
            for s in shapes:
                if s.get("norm") and not (v.get("xshare") or v.get("split")):
                    continue
                if s.get("rope") and v["rows"] % 4:
                    continue
                params = k.variant("matvec", x_uniform=not v.get("xshare") and not v.get("split"), **v, **s)
                codes.append((f"{v} {s['qtype']} {s['epilogue']}", k.render("matvec", **params)))
        assert sum("'split'" in name for name, _ in codes) >= 3 * len(shapes)
        # the prefill mat-mats GPUs with subgroups take (tuning.rule_choice), in the shapes prefill gives them
        mm_shapes = [dict(qtype="Q4_1", epilogue="store", bias=True),
                     dict(qtype="Q4_0", epilogue="glu", bias=False, act="silu", norm=True),
                     dict(qtype="Q6_K", epilogue="accumulate", bias=False),
                     dict(qtype="Q8_0", epilogue="store", bias=False, rope="k", freq_factors=True, kv_f16=False,
                          kvtex=False, norm=True)]
        for v in (tuning.MATMUL_GPU, tuning.MATMUL_XSHARE4) if lanes else ():
            for s in mm_shapes:
                if s.get("rope") and v["rows"] % 4:     # RoPE keeps its own kernel there (graph._fold_rope_tokens)
                    continue
                params = k.variant("matmul", **{**v, **s})
                if s["epilogue"] == "glu":
                    params["rows"] = params["glu_rows"]
                codes.append((f"matmul {v} {s['qtype']} {s['epilogue']}", k.render("matmul", **params)))
        assert sum(name.startswith("matmul") for name, _ in codes) == (2 * len(mm_shapes) - 1 if lanes else 0)
        assert page.evaluate(COMPILE_JS, codes)["errors"] == []
    finally:
        ctx.close()


PIPELINES_JS = """async (codes) => {
  const { openDevice, Replayer } = await import("/web/gpu.js");
  const { device, info, features } = await openDevice();
  const r = new Replayer(device, info, features);
  const made = await r.createPipelines(JSON.stringify(codes.map(([code, label]) => [code, {}, label])));
  return made.map((m) => (typeof m === "number" ? { id: m, kind: r._get(m).constructor.name } : { error: m }));
}"""


def test_kernels_compiled_side_by_side_give_pipelines_and_say_why_one_fails(browser, site):
    """The replayer's createPipelines (what a load compiles while the page goes on): a pipeline for each
    kernel that compiles, and for one that does not WebGPU's reason, not a pipeline that fails later."""
    _, url = site
    ctx, page = open_page(browser, url)
    try:
        good = "@group(0) @binding(0) var<storage, read_write> y: array<f32>;\n" \
               "@compute @workgroup_size(1) fn main() { y[0] = 1.0; }"
        bad = good.replace("y[0] = 1.0;", "y[0] = undefined_name;")
        made = page.evaluate(PIPELINES_JS, [[good, "good"], [bad, "bad"], [good, "good again"]])
        assert [m.get("kind") for m in made] == ["GPUComputePipeline", None, "GPUComputePipeline"]
        assert made[0]["id"] != made[2]["id"]
        assert "undefined_name" in made[1]["error"]
    finally:
        ctx.close()
