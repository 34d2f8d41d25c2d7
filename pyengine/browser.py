"""The engine's side of the Web Worker: one Session per worker, driven by web/worker.js.

Python sees the manifest and the GGUF header only; tensor bytes go from IndexedDB to
GPU buffers inside JavaScript (DESIGN.md rule 2). Every method returns JSON text, and
errors come back as {"error": {...}} with the field a bad request got wrong.
"""

from __future__ import annotations

import json
import time

from . import api
from .engine import Engine
from .errors import PyEngineError, RequestError
from .shards import read_manifest_header


class ShardWeights:
    """Weights whose bytes the JavaScript shard store writes straight into GPU buffers."""

    def __init__(self, store):
        self.store = store

    async def write_tensor(self, backend, buffer, info, offset: int = 0, nbytes: int | None = None):
        n = info.nbytes - offset if nbytes is None else nbytes
        await self.store.writeTensor(buffer.id, info.offset + offset, n)


def _error(e: Exception) -> str:
    err = {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, RequestError):
        err["field"] = e.field
    return json.dumps({"error": err})


class Session:
    def __init__(self):
        self.engine: Engine | None = None
        self.model_name = ""
        self.stats = {}
        self._gens: dict = {}             # request id -> its Generation while it runs
        self._interrupted: set = set()    # request ids interrupted before their generation existed

    async def load(self, manifest_json: str, header, store, options_json: str, on_plan=None) -> str:
        from .gpu.browser import BrowserBackend

        try:
            manifest = json.loads(manifest_json)
            opts = json.loads(options_json)
            gguf = read_manifest_header(manifest, bytes(header.to_py()) if hasattr(header, "to_py") else header)
            ctx = opts.get("contextLength")
            if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1):
                raise RequestError("contextLength", f"must be a positive integer, got {ctx!r}")
            t0 = time.perf_counter()
            limit = opts.get("gpuMemoryLimit")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
                raise RequestError("gpuMemoryLimit", f"must be a positive number of bytes, got {limit!r}")
            backend = BrowserBackend()
            self.engine = await Engine.create(
                gguf, ShardWeights(store), backend, context_length=ctx,
                chat_template=opts.get("chatTemplate"), gpu_memory_limit=limit,
                tuning_cache=opts.get("tuningCache") if isinstance(opts.get("tuningCache"), dict) else None,
                on_plan=(lambda plan: on_plan(json.dumps(plan))) if on_plan is not None else None)
            self.model_name = manifest["model"]["name"]
            return json.dumps({
                "model": self.model_name,
                "contextLength": self.engine.context_length,
                "gpuBytes": self.engine.backend.bytes_allocated,
                "gpuBytesNeeded": self.engine.memory,
                "tuning": {"key": self.engine.tuning_key, "choice": self.engine.tuning,
                           "source": self.engine.tuning_source},
                "uploadSeconds": time.perf_counter() - t0,
                "loadTimes": {k: round(v, 3) for k, v in self.engine.load_times.items()},
                "adapter": self.engine.backend.adapter_info,
            })
        except Exception as e:   # noqa: BLE001 - every failure goes back to the page as a message
            self.engine = None
            return _error(e)

    async def complete(self, request_json: str, emit, kind: str = "chat", rid: int = 0) -> str:
        """Runs one chat.completions (kind "chat") or completions ("text") request;
        emit(json) gets each chunk when streaming; `rid` names it for interrupt()."""
        try:
            if self.engine is None:
                raise PyEngineError("no model is loaded")
            inputs, params, stream, include_usage = api.parse_request(json.loads(request_json), kind)
            gen = self.engine.chat(inputs, params) if kind == "chat" else self.engine.generate(inputs, params)
            self._gens[rid] = gen
            if rid in self._interrupted:
                gen.interrupt()
            cid, name = api.new_id(), self.model_name

            def piece_chunk(text, finish=None):
                if kind == "chat":
                    return api.chunk(cid, name, {"content": text} if text else {}, finish)
                return api.chunk(cid, name, finish_reason=finish, text=text)

            if stream and kind == "chat":
                emit(json.dumps(api.chunk(cid, name, {"role": "assistant", "content": ""})))
            calls0 = self.engine.backend.calls
            async for piece in gen:
                if stream:
                    emit(json.dumps(piece_chunk(piece)))
            self._record(gen, calls0)
            if stream:
                emit(json.dumps(piece_chunk("", gen.finish_reason)))
                if include_usage:
                    usage = api.usage_dict(gen)
                    emit(json.dumps(api.chunk(cid, name, usage=usage,
                                              text=None if kind == "chat" else "")))
            done = api.completion if kind == "chat" else api.text_completion
            return json.dumps(done(gen, cid, name))
        except Exception as e:   # noqa: BLE001
            return _error(e)
        finally:
            self._gens.pop(rid, None)
            self._interrupted.discard(rid)

    def _record(self, gen, calls0):
        t = gen.timings
        self.stats = {
            "prefillTokensPerSecond": t.prefill_tok_s,
            "decodeTokensPerSecond": t.decode_tok_s,
            "timeToFirstTokenSeconds": t.ttft_s,
            "promptTokens": gen.usage.prompt_tokens,
            "cachedTokens": gen.usage.cached_tokens,
            "completionTokens": gen.usage.completion_tokens,
            "jsCallsPerToken": (self.engine.backend.calls - calls0) / max(1, gen.usage.completion_tokens),
        }

    async def profile(self, decode_tok_s: float, prefill_tok_s: float = 0.0, prompt_tokens: int = 128) -> str:
        """The adapter's streaming bandwidth and arithmetic rate, the limits they set, and the decode
        step's GPU time per kernel, measured here in the worker by the same code as natively
        (pyengine.bench)."""
        from .bench import limits_and_profile

        try:
            if self.engine is None:
                raise PyEngineError("no model is loaded")
            return json.dumps(await limits_and_profile(self.engine, decode_tok_s, prefill_tok_s=prefill_tok_s,
                                                       prompt_tokens=prompt_tokens))
        except Exception as e:   # noqa: BLE001
            return _error(e)

    def interrupt(self, rid: int) -> None:
        """Stops request `rid`, which has started in the worker (its generation may not exist yet)."""
        gen = self._gens.get(rid)
        if gen is not None:
            gen.interrupt()
        else:
            self._interrupted.add(rid)

    def reset(self) -> None:
        if self.engine is not None:
            self.engine.reset()

    def runtime_stats(self) -> str:
        return json.dumps(self.stats)

    def unload(self) -> None:
        if self.engine is not None:
            self.engine.backend.destroy()
            self.engine = None
