// The demo page: load progress, a streaming chat, a stop button, speed, and the model cache.
// Model output is only ever put into the page as text (textContent), never as HTML.
import { createEngine, listCachedModels, deleteCachedModel } from "./web/pyengine.mjs";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const messages = [];
let engine = null;
let busy = false;

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(b) {
  busy = b;
  $("send").disabled = b || !engine;
  $("input").disabled = !engine;
  $("stop").disabled = !b;
  $("reset").disabled = b || !engine;
}

async function showCache() {
  const list = $("models");
  list.replaceChildren();
  for (const m of await listCachedModels()) {
    const li = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = `${m.name} — ${(m.storedBytes / 1e6).toFixed(1)} MB${m.complete ? "" : " (partial)"}`;
    const del = document.createElement("button");
    del.textContent = "Delete";
    del.onclick = async () => { await deleteCachedModel(m.id); showCache(); };
    li.append(label, del);
    list.appendChild(li);
  }
}

async function load() {
  const model = params.get("model") ||
    new URL((await (await fetch("models/index.json")).json()).default, new URL("models/index.json", location.href)).href;
  const t0 = performance.now();
  try {
    engine = await createEngine({
      model,
      onProgress: (p) => {
        $("progress").style.width = `${(100 * p.loadedBytes / p.totalBytes).toFixed(1)}%`;
        $("status").textContent = p.phase === "download"
          ? `Downloading ${p.shardsDone}/${p.shardsTotal} shards, ${(p.loadedBytes / 1e6).toFixed(1)} of ${(p.totalBytes / 1e6).toFixed(1)} MB`
          : `Moving weights to the GPU: ${(p.loadedBytes / 1e6).toFixed(1)} of ${(p.totalBytes / 1e6).toFixed(1)} MB`;
      },
    });
    $("progress").style.width = "100%";
    $("status").textContent = `Ready: ${engine.info.model} (loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s)`;
    document.body.dataset.ready = "1";
  } catch (e) {
    $("status").textContent = `Could not load the model: ${e.message}`;
    document.body.dataset.failed = e.message;
  }
  setBusy(false);
  showCache();
}

async function send(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  setBusy(true);
  let answer = "";
  try {
    const stream = await engine.chat.completions.create({
      messages, stream: true, stream_options: { include_usage: true },
      temperature: Number(params.get("temperature") ?? 0.7), max_tokens: Number(params.get("max_tokens") ?? 256),
    });
    for await (const chunk of stream) {
      const delta = chunk.choices[0]?.delta?.content;
      if (delta) { answer += delta; out.textContent = answer; }
      if (chunk.usage) {
        const x = chunk.usage.extra;
        $("speed").textContent = `${chunk.usage.completion_tokens} tokens · prefill ${x.prefill_tokens_per_s.toFixed(1)} tok/s · ` +
          `decode ${x.decode_tokens_per_s.toFixed(1)} tok/s · first token ${(x.time_to_first_token_s * 1000).toFixed(0)} ms`;
      }
    }
    messages.push({ role: "assistant", content: answer });
  } catch (e) {
    out.className = "msg error";
    out.textContent = `Error: ${e.message}`;
    messages.pop();
  }
  out.dataset.done = "1";
  setBusy(false);
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy || !engine) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").onclick = () => engine && engine.interruptGenerate();
$("reset").onclick = async () => { messages.length = 0; $("log").replaceChildren(); await engine.resetChat(); };

load();
