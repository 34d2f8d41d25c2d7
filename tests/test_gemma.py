"""Gemma 3 270M Q4_K_M, a real base model: greedy parity with the numpy reference past its sliding
window, and what a model without a chat template does."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run
from pyengine.chat_template import ChatTemplate
from pyengine.engine import Engine
from pyengine.sampling import SamplingParams
from reference import Reference

FILLER = ("Painters mix colors on a palette before they touch the canvas. Some pigments come from minerals, "
          "others from plants, and a few from insects. Over the centuries, artists argued about which colors "
          "could not be made from any others. ")
QUESTION = "The three primary colors are"


@pytest.fixture(scope="module")
def gemma(gemma_path, backend):
    engine = run(Engine.open(gemma_path, backend, context_length=1024))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def gemma_ref(gemma_path):
    return Reference(gemma_path)


def greedy(engine, ids, n):
    engine.reset()
    gen = engine.generate(ids, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))

    async def go():
        async for _ in gen:
            pass
    run(go())
    return gen


def test_gemma_completes_the_primary_colors_as_the_reference_does(gemma, gemma_ref):
    ids = gemma.tokenizer.encode(QUESTION)
    gen = greedy(gemma, ids, 16)
    assert gen.tokens == gemma_ref.greedy(ids, 16)
    assert "red" in gen.text and "blue" in gen.text


def test_gemma_greedy_matches_the_reference_for_32_tokens_past_the_sliding_window(gemma, gemma_ref):
    ids = gemma.tokenizer.encode(FILLER * 13 + QUESTION)
    assert 560 < len(ids) < 1024 - 32       # longer than the 512-token window, across two prefill chunks
    assert greedy(gemma, ids, 32).tokens == gemma_ref.greedy(ids, 32)


def pyengine(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "pyengine", *args], capture_output=True, text=True, input=stdin)


def test_gemma_has_no_chat_template_so_chat_fails_clearly_and_a_supplied_one_works(tmp_path):
    r = pyengine("generate", "--model", "gemma3-270m", "--max-tokens", "2", "Hi")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "this model has no chat template in its GGUF" in r.stderr and "--chat-template FILE" in r.stderr
    tpl = tmp_path / "gemma.jinja"
    tpl.write_text("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
                   "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                   "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    r = pyengine("generate", "--model", "gemma3-270m", "--chat-template", str(tpl), "--temperature", "0",
                 "--max-tokens", "4", "--stats", "Name a color.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "4 generated" in r.stderr or "finish: stop" in r.stderr
    r = pyengine("generate", "--model", "gemma3-270m", "--raw", "--temperature", "0", "--max-tokens", "8", QUESTION)
    assert r.returncode == 0 and "red" in r.stdout


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
            "m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_gemma_in_the_browser_answers_as_natively_and_takes_a_template(gemma, browser, site, gemma_path):
    import os

    from browser_helpers import open_page
    from pyengine.shards import pack

    out, url = site
    if not os.path.exists(f"{out}/models/gemma/manifest.json"):
        pack(gemma_path, f"{out}/models/gemma")
    want = greedy(gemma, gemma.tokenizer.encode(QUESTION), 8).text
    ctx, page = open_page(browser, url)
    r = page.evaluate("""async ([model, prompt, template]) => {
      const api = await import("/web/pyengine.mjs");
      const out = {};
      let e = await api.createEngine({ model, contextLength: 256 });
      const a = await e.completions.create({ prompt, max_tokens: 8, temperature: 0, ignore_eos: true });
      out.raw = a.choices[0].text;
      try { await e.chat.completions.create({ messages: [{ role: "user", content: "Hi" }] }); }
      catch (err) { out.noTemplate = [err.name, err.message]; }
      await e.unload();
      e = await api.createEngine({ model, contextLength: 256, chatTemplate: template });
      const c = await e.chat.completions.create({ messages: [{ role: "user", content: "Name a color." }],
                                                  max_tokens: 3, temperature: 0 });
      out.chat = [c.usage.prompt_tokens, c.usage.completion_tokens];
      await e.unload();
      return out;
    }""", [url + "models/gemma/manifest.json", QUESTION, TEMPLATE])
    ctx.close()
    assert r["raw"] == want
    assert r["noTemplate"][0] == "TemplateError" and "no chat template" in r["noTemplate"][1]
    text = ChatTemplate.from_gguf(gemma.gguf, gemma.tokenizer, TEMPLATE).render(
        [{"role": "user", "content": "Name a color."}])
    assert r["chat"][0] == len(gemma.tokenizer.encode(text, add_bos=False)) and 1 <= r["chat"][1] <= 3


def test_a_chat_prompt_has_one_bos_whether_or_not_the_template_writes_it(gemma):
    msgs = [{"role": "user", "content": "Hi"}]
    try:
        for template in (TEMPLATE, TEMPLATE.replace("{{ bos_token }}", "")):
            gemma._template = ChatTemplate.from_gguf(gemma.gguf, gemma.tokenizer, template)
            ids = gemma.chat_prompt(msgs)
            assert ids[0] == gemma.tokenizer.bos_id and ids.count(gemma.tokenizer.bos_id) == 1
    finally:
        gemma._template = None
