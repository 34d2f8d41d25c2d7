"""Runs the browser build in headless Chromium (Playwright), for `--backend browser` and the tests.

WebGPU runs on SwiftShader there when the machine has no GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

from .errors import PyEngineError

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a built site is made from in a checkout; build/build.py records their digest in the site
SOURCES = ("pyengine", "shaders", "web", "static")
SOURCES_RECORD = "sources.json"

CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic", "--enable-unsafe-webgpu", "--enable-unsafe-swiftshader",
    "--enable-features=Vulkan", "--use-angle=swiftshader", "--use-webgpu-adapter=swiftshader",
]


def chromium_path() -> str:
    for cand in (os.environ.get("PYENGINE_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and os.path.exists(cand):
            return cand
    raise PyEngineError("no Chromium found: install it (Debian: apt-get install chromium) or set PYENGINE_CHROMIUM")


def sources_digest(root: str = CHECKOUT) -> str | None:
    """sha256 over the files of SOURCES under root (a checkout), names and contents; None where root
    is no checkout (an installed package has no web/ beside it)."""
    if not os.path.isdir(os.path.join(root, "web")):
        return None
    h = hashlib.sha256()
    for top in SOURCES:
        for folder, subs, files in os.walk(os.path.join(root, top)):
            subs[:] = sorted(d for d in subs if d != "__pycache__")
            for name in sorted(files):
                if name.endswith(".pyc"):
                    continue
                p = os.path.join(folder, name)
                with open(p, "rb") as f:
                    h.update(os.path.relpath(p, root).replace(os.sep, "/").encode() + b"\0"
                             + hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def stale_reason(site: str, root: str = CHECKOUT) -> str | None:
    """Why the built site may not run the checkout's current code (None where it does, or where there is
    no checkout to compare with): it records no sources, or other ones."""
    now = sources_digest(root)
    if now is None:
        return None
    try:
        with open(os.path.join(site, SOURCES_RECORD)) as f:
            built = json.load(f).get("sha256")
    except (OSError, ValueError, AttributeError):
        return f"{site} records no digest of the sources it was built from"
    if built != now:
        return f"{site} was built from other sources than {root} holds now ({', '.join(SOURCES)})"
    return None


def dist_dir(path: str | None = None) -> str:
    """The built site to use; says on stderr when it may be older than the checkout's code (a benchmark
    would measure, and a page would run, that older code)."""
    d = path or os.environ.get("PYENGINE_DIST") or os.path.join(os.getcwd(), "dist")
    if not os.path.isfile(os.path.join(d, "index.html")):
        raise PyEngineError(f"no built site in {d}: run `python build/build.py` first (or pass --dist)")
    why = stale_reason(d)
    if why:
        print(f"pyengine: warning: {why}: rebuild it (`python build/build.py`, or --build for `pyengine bench`) "
              "to run the current code", file=sys.stderr, flush=True)
    return d


async def launch(playwright, extra_args=(), **kw):
    return await playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS + list(extra_args),
                                            headless=True, **kw)


GENERATE_JS = """
async ({ prompt, raw, request, model, contextLength, system }) => {
  const { createEngine } = await import("/web/pyengine.mjs");
  const engine = await createEngine({ model, contextLength });
  const req = { ...request, stream: true, stream_options: { include_usage: true } };
  const messages = (system ? [{ role: "system", content: system }] : []).concat([{ role: "user", content: prompt }]);
  const stream = raw ? await engine.completions.create({ ...req, prompt })
                     : await engine.chat.completions.create({ ...req, messages });
  let usage = null;
  for await (const c of stream) {
    const d = c.choices[0] && (raw ? c.choices[0].text : c.choices[0].delta && c.choices[0].delta.content);
    if (d) await window.pyenginePiece(d);
    if (c.usage) usage = c.usage;
  }
  await engine.unload();
  return usage;
}
"""


RESOLVE_JS = """async ({ index, model }) => {
  // a model of the built site by name (or its default), else a manifest URL as given
  const r = await fetch(index);
  const idx = r.ok ? await r.json() : {};
  const rel = model ? (idx.models || {})[model] : idx.default;
  if (rel) return new URL(rel, index).href;
  if (!model) throw new Error("the built site lists no default model (models/index.json)");
  return new URL(model, location.href).href;
}"""


async def browser_generate(prompt: str, request: dict, on_piece, raw: bool = False, dist: str | None = None,
                           model: str | None = None, context: int | None = None, system: str | None = None):
    """Streams one answer from the real page and worker; returns the usage object."""
    try:
        from playwright.async_api import Error as PlaywrightError
        from playwright.async_api import async_playwright
    except ImportError:
        raise PyEngineError("the browser backend needs Playwright: pip install playwright") from None
    from .serve import serve_in_thread

    httpd, url = serve_in_thread(dist_dir(dist))
    try:
        async with async_playwright() as p:
            browser = await launch(p)
            try:
                page = await browser.new_page()
                await page.expose_function("pyenginePiece", on_piece)
                await page.goto(url + "headless.html")
                manifest = await page.evaluate(RESOLVE_JS, {"index": url + "models/index.json", "model": model})
                return await page.evaluate(GENERATE_JS, {"prompt": prompt, "raw": raw, "request": request,
                                                         "model": manifest, "contextLength": context,
                                                         "system": system})
            except PlaywrightError as e:
                msg = str(e).splitlines()[0]
                for prefix in ("Page.evaluate: Error: ", "Error: "):
                    if msg.startswith(prefix):
                        msg = msg[len(prefix):]
                raise PyEngineError(msg) from None
            finally:
                await browser.close()
    finally:
        httpd.shutdown()
