"""Helpers the browser tests share: pages with a request log, the model's manifest URL, native answers."""

from __future__ import annotations

import os
import re

from conftest import run
from pyengine.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD = re.compile(r"/shard-\d+\.bin$")
MODEL_DIR = "models/smollm2-135m-instruct-q4_1"

LOAD_JS = """async (model) => {
  const api = await import("/web/pyengine.mjs");
  window.api = api;
  window.engine = await api.createEngine({ model, contextLength: 512 });
  return window.engine.info;
}"""


def manifest_url(url):
    return url + MODEL_DIR + "/manifest.json"


def open_page(browser, url, context=None):
    ctx = context or browser.new_context()
    page = ctx.new_page()
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(url + "headless.html")
    return ctx, page


def native_greedy(engine, prompt, n):
    gen = engine.chat([{"role": "user", "content": prompt}], SamplingParams(temperature=0.0, max_tokens=n))

    async def go():
        async for _ in gen:
            pass
    run(go())
    return gen.text


def native_answer(path, prompt, n, context=128):
    """A fresh native engine's greedy answer of n tokens (EOS ignored) to one user message."""
    from pyengine.engine import Engine

    engine = run(Engine.open(path, "native", context_length=context))
    gen = engine.chat([{"role": "user", "content": prompt}],
                      SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))

    async def go():
        async for _ in gen:
            pass
    run(go())
    engine.close()
    return gen.text


def rejected(page, requests_js: str) -> list:
    """For each request of a JavaScript array literal (it may hold NaN, BigInt, ...), what
    chat.completions.create rejected it with: [field, message], or None where it was accepted."""
    return page.evaluate("""async () => {
      const bad = %s;
      const out = [];
      for (const r of bad) {
        try { await window.engine.chat.completions.create(r); out.push(null); }
        catch (e) { out.push([e.field, e.message]); }
      }
      return out;
    }""" % requests_js)
