"""Requests in the browser that arrive together, are interrupted at once, or carry hostile values;
on the tiny model, so each costs milliseconds."""

from __future__ import annotations

import pytest

from browser_helpers import open_page, rejected
from conftest import run
from pyengine.engine import Engine
from pyengine.sampling import SamplingParams

LONG = "Tell me about the sea, the wind and the stars. " * 4
QUESTIONS = ["hello", LONG, "the sea"]


@pytest.fixture(scope="module")
def native(tiny_llama, backend):
    """Greedy answers of a fresh native engine to each question (8 tokens, EOS ignored)."""
    engine = run(Engine.open(tiny_llama, backend, context_length=256))
    out = {}
    for q in QUESTIONS:
        engine.reset()
        gen = engine.chat([{"role": "user", "content": q}], SamplingParams(temperature=0.0, max_tokens=8,
                                                                           ignore_eos=True))

        async def go():
            async for _ in gen:
                pass
        run(go())
        out[q] = gen.text
    engine.close()
    return out


@pytest.fixture(scope="module")
def page(browser, site):
    _, url = site
    ctx, page = open_page(browser, url)
    page.evaluate("""async (model) => {
      window.api = await import("/web/pyengine.mjs");
      window.engine = await window.api.createEngine({ model, contextLength: 256 });
      window.ask = (content, extra = {}) => window.engine.chat.completions.create({
        messages: [{ role: "user", content }], temperature: 0, max_tokens: 8, ignore_eos: true, ...extra });
    }""", url + "models/tiny/manifest.json")
    yield page
    ctx.close()


def test_interrupt_right_after_create_ends_before_the_first_token(page, native):
    r = page.evaluate("""async ([long, next]) => {
      const out = {};
      const p = window.ask(long);
      await window.engine.interruptGenerate();
      const a = await p;
      out.plain = [a.choices[0].finish_reason, a.usage.completion_tokens, a.choices[0].message.content];
      const s = await window.ask(long, { stream: true });
      await window.engine.interruptGenerate();
      let text = "", finish = null;
      for await (const c of s) {
        if (c.choices[0]) { text += c.choices[0].delta.content || ""; finish = c.choices[0].finish_reason || finish; }
      }
      out.stream = [finish, text];
      out.next = (await window.ask(next)).choices[0].message.content;
      out.again = (await window.ask(long)).choices[0].message.content;
      return out;
    }""", [LONG, "hello"])
    assert r["plain"] == ["abort", 0, ""]
    assert r["stream"] == ["abort", ""]
    assert r["next"] == native["hello"] and r["again"] == native[LONG]


def test_requests_made_together_are_answered_in_order(page, native):
    r = page.evaluate("""async (qs) => {
      const done = [];
      const runs = qs.map((q, i) => (async () => {
        const s = await window.ask(q, { stream: i % 2 === 0 });
        let text = "";
        if (i % 2 === 0) { for await (const c of s) text += (c.choices[0] && c.choices[0].delta.content) || ""; }
        else text = s.choices[0].message.content;
        done.push(i);
        return text;
      })());
      return { texts: await Promise.all(runs), done };
    }""", QUESTIONS)
    assert r["done"] == [0, 1, 2]
    assert r["texts"] == [native[q] for q in QUESTIONS]


def test_a_rejecting_engine_refuses_a_request_while_one_runs(page, site, native):
    _, url = site
    r = page.evaluate("""async (model) => {
      const e = await window.api.createEngine({ model, contextLength: 256, onBusy: "reject" });
      const first = e.chat.completions.create({ messages: [{ role: "user", content: "hello" }], temperature: 0,
                                                max_tokens: 8, ignore_eos: true });
      let error = null;
      try { await e.chat.completions.create({ messages: [{ role: "user", content: "x" }] }); }
      catch (err) { error = [err.name, err.message]; }
      const a = (await first).choices[0].message.content;
      const b = (await e.chat.completions.create({ messages: [{ role: "user", content: "hello" }], temperature: 0,
                                                   max_tokens: 8, ignore_eos: true })).choices[0].message.content;
      await e.unload();
      return { error, a, b };
    }""", url + "models/tiny/manifest.json")
    assert r["error"][0] == "EngineBusyError" and "another request is running" in r["error"][1]
    assert r["a"] == r["b"] == native["hello"]


def test_values_json_cannot_carry_are_named_not_defaulted(page):
    errors = rejected(page, """[
        { messages: [{ role: "user", content: "x" }], temperature: NaN },
        { messages: [{ role: "user", content: "x" }], top_p: Infinity },
        { messages: [{ role: "user", content: "x" }], max_tokens: -Infinity },
        { messages: [{ role: "user", content: "x" }], seed: 1.5 },
        { messages: [{ role: "user", content: "x" }], seed: 10n ** 30n },
        { messages: [{ role: "user", content: "x" }], stop: Array(20).fill("a") },
        { messages: [{ role: "user", content: "x" }], max_tokens: 1e9 }, { messages: [{ role: "user", content: 42 }] },
        { messages: [{ role: "user", content: "x" }], truncation: "middle" }, "not an object"]""")
    fields = [e and e[0] for e in errors]
    assert fields == ["temperature", "top_p", "max_tokens", "seed", "seed", "stop", "max_tokens",
                      "messages[0].content", "truncation", "request"]
    assert "NaN" in errors[0][1]


def test_hostile_text_and_long_messages(page):
    r = page.evaluate("""async () => {
      const huge = "x".repeat(100000);
      const out = {};
      const odd = await window.ask("nul \\u0000 bytes, a lone \\ud800 surrogate, and \\udfff another");
      out.odd = odd.usage.completion_tokens;
      try { await window.ask(huge); out.huge = null; } catch (e) { out.huge = [e.name, e.message]; }
      const cut = await window.ask(huge + " THE END", { truncation: "auto" });
      out.cut = [cut.usage.prompt_tokens, cut.usage.completion_tokens];
      return out;
    }""")
    assert r["odd"] == 8
    assert r["huge"][0] == "ContextOverflowError" and "but the context holds 256" in r["huge"][1]
    assert r["cut"][0] <= 256 - 8 and r["cut"][1] == 8
