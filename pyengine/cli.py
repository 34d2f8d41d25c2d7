"""The `pyengine` command: chat, generate, tokenize and bench on the native backend."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from .errors import PyEngineError


def _add_model_args(p, generation=True, backends=("native",)):
    p.add_argument("--model", help="path to a GGUF file, or a packaged model: smollm2-135m (the default), "
                                   "gemma3-270m; with --backend browser, a model of the built site or the "
                                   "URL of a shard manifest")
    p.add_argument("--backend", default="native", choices=list(backends),
                   help="where the model runs: natively on wgpu, or in headless Chromium through the web build")
    p.add_argument("--adapter", help="natively: part of the adapter's name (swiftshader, llvmpipe, a GPU's); "
                                     "default: the one wgpu prefers")
    if "browser" in backends:
        p.add_argument("--dist", help="the built site for --backend browser (default: ./dist)")
    if not generation:
        return
    p.add_argument("--context", type=int, default=None, help="context length in tokens (default 2048)")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=0, help="0 means no top-k")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--truncation", choices=["disabled", "auto"], default="disabled",
                   help="a prompt longer than the context: fail (disabled, the default) or drop the oldest "
                        "messages, then the start of the last one (auto)")
    p.add_argument("--chat-template", metavar="FILE", help="a jinja2 chat template to use instead of the model's")
    p.add_argument("--system", help="system message")
    p.add_argument("--kv-f16", action="store_true", help="keep the KV cache in f16 (needs shader-f16)")
    p.add_argument("--gpu-memory", type=float, metavar="MB", default=None,
                   help="refuse a model that needs more GPU memory than this, before loading it")
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")


def _params(a):
    from .sampling import SamplingParams

    return SamplingParams(
        max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
        repetition_penalty=a.repetition_penalty, presence_penalty=a.presence_penalty,
        frequency_penalty=a.frequency_penalty, stop=a.stop, truncation=a.truncation)


def _native_backend(a):
    """The backend to open: a name, or a native backend on the adapter --adapter names."""
    if a.backend == "native" and getattr(a, "adapter", None):
        from .gpu import open_backend

        return open_backend("native", adapter=a.adapter)
    return a.backend


def _model_path(a) -> str:
    from .default_model import default_model_path, resolve_model

    return resolve_model(a.model) if a.model else default_model_path()


async def _open_engine(a, **extra):
    from .engine import Engine

    template = None
    if getattr(a, "chat_template", None):
        try:
            with open(a.chat_template, encoding="utf-8") as f:
                template = f.read()
        except OSError as e:
            raise PyEngineError(f"cannot read chat template {a.chat_template}: {e.strerror}") from None
    limit = getattr(a, "gpu_memory", None)
    opts = dict(context_length=getattr(a, "context", None), chat_template=template,
                kv_f16=getattr(a, "kv_f16", False), gpu_memory_limit=int(limit * 1e6) if limit else None)
    opts.update(extra)
    return await Engine.open(_model_path(a), _native_backend(a), **opts)


def _print_stats(gen):
    u, t = gen.usage, gen.timings
    print(f"\n[{u.prompt_tokens} prompt tokens ({u.cached_tokens} cached), {u.completion_tokens} generated, "
          f"finish: {gen.finish_reason}; prefill {t.prefill_tok_s:.1f} tok/s, decode {t.decode_tok_s:.1f} tok/s, "
          f"first token {t.ttft_s * 1000:.0f} ms]", file=sys.stderr)


async def _stream(gen, out=sys.stdout):
    async for piece in gen:
        out.write(piece)
        out.flush()


async def cmd_generate(a):
    params = _params(a)      # a bad option fails before the model loads
    if a.backend == "browser":
        return await _generate_in_browser(a, params)
    engine = await _open_engine(a)
    if a.raw:
        gen = engine.generate(a.prompt, params)
    else:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + \
            [{"role": "user", "content": a.prompt}]
        gen = engine.chat(messages, params)
    await _stream(gen)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if a.stats:
        _print_stats(gen)


async def _generate_in_browser(a, params):
    from .headless import browser_generate

    request = {k: v for k, v in {
        "max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k, "seed": params.seed, "repetition_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        "stop": params.stop or None, "truncation": params.truncation}.items() if v is not None}

    def piece(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    usage = await browser_generate(a.prompt, request, piece, raw=a.raw, dist=a.dist, model=a.model,
                                   context=a.context, system=a.system)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if a.stats and usage:
        x = usage["extra"]
        print(f"[{usage['prompt_tokens']} prompt tokens, {usage['completion_tokens']} generated; prefill "
              f"{x['prefill_tokens_per_s']:.1f} tok/s, decode {x['decode_tokens_per_s']:.1f} tok/s, first token "
              f"{x['time_to_first_token_s'] * 1000:.0f} ms]", file=sys.stderr)


async def cmd_pack(a):
    from .shards import pack

    m = pack(a.model, a.outdir, name=a.name)
    print(json.dumps({"outdir": a.outdir, "shards": len(m["shards"]), "size": m["model"]["size"],
                      "sha256": m["model"]["sha256"]}))


async def cmd_serve(a):
    from .headless import dist_dir
    from .serve import make_server

    site = dist_dir(a.dist)
    httpd = make_server(site, port=a.port, isolate=a.isolate, log_requests=a.verbose)
    host, port = httpd.server_address[:2]
    print(f"serving {site} at http://{host}:{port}/", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, httpd.serve_forever)
    finally:
        httpd.server_close()


async def cmd_chat(a):
    params = _params(a)
    engine = await _open_engine(a)
    engine.template   # fail now, not after the first question, when the model has no template
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")   # bytes that are not UTF-8 become U+FFFD, not a crash
    interactive = sys.stdin.isatty()
    if interactive:
        print("pyengine chat: type a message; /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(system)
            engine.reset()
            continue
        messages.append({"role": "user", "content": line})
        gen = engine.chat(messages, params)
        await _stream(gen)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": gen.text})
        if a.stats:
            _print_stats(gen)


async def cmd_tokenize(a):
    from .gguf import read_gguf
    from .tokenizer import Tokenizer, clean_text

    tok = Tokenizer.from_gguf(read_gguf(_model_path(a)))
    print(json.dumps(tok.encode(clean_text(a.text), add_bos=False)))


async def cmd_info(a):
    """What a model is and what it needs, read from its header: nothing touches the GPU but the adapter's limits."""
    from collections import Counter

    from .engine import Engine
    from .gguf import read_gguf
    from .gpu import open_backend

    path = _model_path(a)
    g = read_gguf(path)
    backend = open_backend("native", adapter=a.adapter)
    engine = Engine(g, backend, context_length=a.context)
    plan = engine.memory_plan()
    engine.close()
    print(json.dumps({
        "model": g.get("general.name") or path,
        "architecture": engine.arch,
        "file_bytes": g.size,
        "parameters": sum(t.n_elements for t in g.tensors.values()),
        "tensor_types": dict(Counter(t.type_name for t in g.tensors.values())),
        "tokenizer": engine.tokenizer.model,
        "vocab_size": engine.args.vocab_size,
        "layers": engine.args.n_layers,
        "context": engine.context_length,
        "chat_template": bool(g.get("tokenizer.chat_template")),
        "gpu_memory_bytes": plan,
        "adapter": backend.adapter_info.get("device"),
        "adapter_max_binding_bytes": backend.max_storage_binding,
    }, indent=2))


async def cmd_bench(a):
    from .bench import run_bench, run_browser_bench

    model = a.model
    if a.synthetic:
        from .synthetic import synthetic_model

        model = synthetic_model(a.synthetic)
    if a.backend == "browser":
        result = await run_browser_bench(model, runs=a.runs, prompt_tokens=a.prompt_tokens,
                                         gen_tokens=a.gen_tokens, dist=a.dist, build=a.build or bool(a.synthetic),
                                         profile=not a.no_profile)
    else:
        path = model if a.synthetic else _model_path(a)
        result = await run_bench(path, _native_backend(a), runs=a.runs, prompt_tokens=a.prompt_tokens,
                                 gen_tokens=a.gen_tokens, context=a.context, profile=not a.no_profile)
    print(json.dumps(result, indent=2))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyengine", description="LLM inference on WebGPU, from a GGUF file.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="answer one prompt, streamed to stdout")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    _add_model_args(g, backends=("native", "browser"))
    c = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    _add_model_args(c)
    t = sub.add_parser("tokenize", help="print the token ids of TEXT as JSON")
    t.add_argument("text")
    _add_model_args(t, generation=False)
    i = sub.add_parser("info", help="print what a model is and the GPU memory it needs, as JSON")
    i.add_argument("--context", type=int, default=None, help="context length in tokens (default 2048)")
    _add_model_args(i, generation=False)
    b = sub.add_parser("bench", help="measure load, prefill and decode speed; prints JSON")
    _add_model_args(b, generation=False, backends=("native", "browser"))
    b.add_argument("--runs", type=int, default=3)
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--gen-tokens", type=int, default=128)
    b.add_argument("--context", type=int, default=None)
    b.add_argument("--synthetic", choices=["llama-1b", "llama-3b"],
                   help="a model with these shapes and random Q4_0 weights, written once to the cache folder")
    b.add_argument("--build", action="store_true",
                   help="with --backend browser: build the site for --model first (into --dist)")
    b.add_argument("--no-profile", action="store_true", help="skip the bandwidth and per-kernel measurements")
    k = sub.add_parser("pack", help="cut a GGUF into verified shards and a manifest for the browser")
    k.add_argument("model", help="the GGUF file")
    k.add_argument("outdir")
    k.add_argument("--name", help="model name shown to users (default: general.name)")
    s = sub.add_parser("serve", help="serve the built site (dist/) on 127.0.0.1")
    s.add_argument("--dist", help="the built site (default: ./dist)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--isolate", action="store_true", help="send COOP/COEP headers (cross-origin isolation)")
    s.add_argument("--verbose", action="store_true", help="log each request")
    return ap


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "tokenize": cmd_tokenize, "info": cmd_info, "bench": cmd_bench,
            "pack": cmd_pack, "serve": cmd_serve}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        asyncio.run(COMMANDS[args.command](args))
    except PyEngineError as e:
        print(f"pyengine: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
