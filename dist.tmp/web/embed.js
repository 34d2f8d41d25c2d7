// One <script> tag puts a small chat on any page:
//   <script src="https://host/web/embed.js" data-model="https://host/models/x/manifest.json"></script>
// The widget lives in a shadow DOM, so the page's styles and the widget's never meet.
(() => {
  const script = document.currentScript;
  const base = new URL(".", script.src);
  const model = new URL(script.dataset.model || "../models/index.json", location.href).href;
  const title = script.dataset.title || "Chat";

  const host = document.createElement("div");
  host.id = "pyengine-chat";
  const root = host.attachShadow({ mode: "open" });
  root.innerHTML = `
<style>
  :host { all: initial; position: fixed; right: 16px; bottom: 16px; z-index: 2147483000; }
  .box { width: 320px; max-height: 460px; display: flex; flex-direction: column; font: 14px/1.45 system-ui, sans-serif;
         color: #1d2330; background: #fff; border: 1px solid #cfd5df; border-radius: 12px; box-shadow: 0 6px 24px rgba(0,0,0,.18); overflow: hidden; }
  .head { padding: 8px 12px; background: #3b6fd8; color: #fff; font-weight: 600; }
  .status { padding: 4px 12px; font-size: 12px; color: #5b6473; }
  .log { flex: 1; overflow-y: auto; padding: 8px 12px; display: flex; flex-direction: column; gap: 6px; min-height: 80px; }
  .m { padding: 6px 10px; border-radius: 8px; white-space: pre-wrap; overflow-wrap: anywhere; }
  .u { background: #3b6fd8; color: #fff; align-self: flex-end; }
  .a { background: #eef1f6; align-self: flex-start; }
  form { display: flex; gap: 6px; padding: 8px; border-top: 1px solid #e4e7ec; }
  input { flex: 1; font: inherit; padding: 6px 8px; border: 1px solid #cfd5df; border-radius: 6px; }
  button { font: inherit; padding: 6px 10px; border: 0; border-radius: 6px; background: #3b6fd8; color: #fff; }
  button:disabled { background: #a9b4c6; }
</style>
<div class="box" part="box">
  <div class="head"></div>
  <div class="status">Loading…</div>
  <div class="log"></div>
  <form><input placeholder="Ask something…" disabled><button disabled>Send</button></form>
</div>`;
  root.querySelector(".head").textContent = title;
  const status = root.querySelector(".status");
  const log = root.querySelector(".log");
  const input = root.querySelector("input");
  const button = root.querySelector("button");
  const messages = [];
  let engine = null;

  function add(cls, text) {
    const d = document.createElement("div");
    d.className = `m ${cls}`;
    d.textContent = text;
    log.appendChild(d);
    log.scrollTop = log.scrollHeight;
    return d;
  }

  async function manifestUrl() {
    if (!model.endsWith("index.json")) return model;
    const idx = await (await fetch(model)).json();
    return new URL(idx.default, model).href;
  }

  root.querySelector("form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || !engine) return;
    input.value = "";
    input.disabled = button.disabled = true;
    messages.push({ role: "user", content: text });
    add("u", text);
    const out = add("a", "");
    let answer = "";
    try {
      const stream = await engine.chat.completions.create({ messages, stream: true,
        temperature: Number(script.dataset.temperature ?? 0.7), max_tokens: Number(script.dataset.maxTokens ?? 200) });
      for await (const c of stream) {
        const d = c.choices[0]?.delta?.content;
        if (d) { answer += d; out.textContent = answer; log.scrollTop = log.scrollHeight; }
      }
      messages.push({ role: "assistant", content: answer });
    } catch (err) {
      out.textContent = `Error: ${err.message}`;
      messages.pop();
    }
    out.dataset.done = "1";
    input.disabled = button.disabled = false;
    input.focus();
  });

  const mount = () => document.body.appendChild(host);
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);

  (async () => {
    try {
      const { createEngine } = await import(new URL("pyengine.mjs", base).href);
      engine = await createEngine({
        model: await manifestUrl(),
        onProgress: (p) => { status.textContent = `Loading ${(100 * p.loadedBytes / p.totalBytes).toFixed(0)}%`; },
      });
      status.textContent = "Ready";
      host.dataset.ready = "1";
      input.disabled = button.disabled = false;
    } catch (err) {
      status.textContent = `Could not load: ${err.message}`;
      host.dataset.failed = err.message;
    }
  })();
})();
