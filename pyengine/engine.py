"""One model's pipeline: load a GGUF onto the GPU, build the plans, prefill, decode, sample, stream.

The same code runs natively and in Pyodide; only the GPU backend and the source
of the weight bytes differ.
"""

from __future__ import annotations

import asyncio
import collections
import struct
import time
from dataclasses import dataclass, field

from .chat_template import ChatTemplate
from .errors import (ContextOverflowError, EngineBusyError, GGUFError, GPUError, PyEngineError,
                     UnsupportedModelError)
from .gguf import GGUFFile, read_gguf
from .gpu import TEXEL_BYTES, Binding, Pending, open_backend
from .graph import GraphBuilder, ScratchPool, result_index
from .kernels import (BLOCK_VALUES, KERNEL_QTYPES, RESULT_WORDS, TEXTURE_ROW_BYTES, TEXTURE_WIDTH, TOPK, TOPK_CHUNK,
                      UNIFORM_BYTES, Kernels, activation_texture_rows, kv_texture_rows)
from .models import ARCHITECTURES
from .sampling import Candidates, Sampler, SamplingParams
from . import tuning as autotune
from .tokenizer import Tokenizer, clean_text
from .weights import part_bytes, staging_bytes, textured, upload_weight

MAX_CHUNK = 512          # tokens per prefill plan replay
MIN_BUCKET = 16
DEFAULT_CONTEXT = 2048
ANSWER_ROOM = 256        # tokens truncation="auto" leaves for the answer when max_tokens is not given


class FileWeights:
    """Native source of weight bytes: the GGUF file itself."""

    def __init__(self, path):
        self.path = str(path)
        self._f = open(self.path, "rb")

    def write_tensor(self, backend, buffer, info, offset: int = 0, nbytes: int | None = None) -> None:
        """Bytes [offset, offset + nbytes) of the tensor's data to the start of `buffer`."""
        n = info.nbytes - offset if nbytes is None else nbytes
        self._f.seek(info.offset + offset)
        data = self._f.read(n)
        if len(data) != n:
            raise GGUFError(f"GGUF file is truncated: tensor '{info.name}' is cut short")
        pad = -len(data) % 4
        backend.write_buffer(buffer, 0, data + b"\0" * pad if pad else data)

    def close(self):
        self._f.close()


# a texel of a KV-cache texture: a vec4 of f32s, or (f16 cache) of f16s (shaders/_common.wgsl.j2: kv_binding)
KV_FORMATS = {False: "rgba32uint", True: "rg32uint"}


class KVCache:
    """Each layer's k and v cache: storage buffers, or on adapters that read textures faster
    (textures=True, kernels.Kernels.kv_textures) textures, which the RoPE kernel or the q/k/v mat-vec
    (graph.GraphBuilder._fold_rope) write as storage textures and attention fetches texels from
    (shaders/_common.wgsl.j2: kv_binding)."""

    def __init__(self, backend, n_layers, context, n_kv_heads, head_dim, f16=False, textures=False):
        self.context = context
        self.f16 = f16
        self.textures, per = kv_layout(backend, context, n_kv_heads, head_dim, f16, textures)
        if not self.textures and per > backend.max_storage_binding:
            raise PyEngineError(
                f"a context of {context} tokens needs {per} bytes of KV cache per layer, more than "
                f"this GPU binds at once ({backend.max_storage_binding}); use a smaller context")
        rows = kv_texture_rows(context, n_kv_heads, head_dim)

        def make(label):
            if self.textures:
                return backend.create_texture(rows, label, KV_FORMATS[f16], storage=True)
            return backend.create_buffer(per, label)

        self.k, self.v = [], []
        try:
            for i in range(n_layers):
                self.k.append(make(f"k cache {i}"))
                self.v.append(make(f"v cache {i}"))
        except BaseException:
            for b in self.k + self.v:
                backend.destroy_buffer(b)
            raise
        self.nbytes = 2 * n_layers * per

    async def read(self, backend, which: str, layer: int, nbytes: int) -> bytes:
        """The first `nbytes` of layer `layer`'s k or v cache (`which`), as the kernels laid them out."""
        store = (self.k if which == "k" else self.v)[layer]
        if self.textures:
            return await backend.read_texture(store, nbytes)
        return await backend.read_buffer(store, 0, nbytes)


def kv_layout(backend, context, n_kv_heads, head_dim, f16, textures) -> tuple[bool, int]:
    """Whether a KV cache asked for in textures gets them (its layers fit the adapter's largest
    texture), and the bytes a layer's k or v then takes."""
    rows = kv_texture_rows(context, n_kv_heads, head_dim)
    if textures and rows <= backend.max_texture_rows:
        return True, rows * TEXTURE_WIDTH * TEXEL_BYTES[KV_FORMATS[f16]]
    return False, context * n_kv_heads * head_dim * (2 if f16 else 4)


class State:
    """The persistent buffers every plan shares."""

    def __init__(self, backend, vocab, max_chunk):
        self.pool = ScratchPool(backend)
        made = []

        def buf(size, label):
            made.append(backend.create_buffer(size, label))
            return made[-1]

        try:
            self.step = buf(16 + 4 * max_chunk, "step")
            self.logits = buf(4 * vocab, "logits")
            self.processed = buf(4 * vocab, "processed logits")
            self.counts = buf(4 * vocab, "token counts")
            self.sparams = buf(32, "sampling params")
            n_lists = -(-vocab // TOPK_CHUNK)
            self.topk = [buf(4 * RESULT_WORDS * n_lists, f"top-k {i}") for i in range(2)]
        except BaseException:
            for b in made:
                backend.destroy_buffer(b)
            raise
        self.result = self.topk[result_index(vocab)]     # where a step's final top-k record lies
        self.kv: KVCache | None = None
        self.max_chunk = max_chunk
        self._backend = backend
        self._tiles: dict[int, object] = {}
        self._act_textures: dict[tuple, object] = {}

    def buffers(self) -> list:
        out = [self.step, self.logits, self.processed, self.counts, self.sparams, *self.topk,
               *self._tiles.values(), *self._act_textures.values(), *(b for _, b in self.pool.buffers)]
        if self.kv is not None:
            out += self.kv.k + self.kv.v
        return out

    def activation_texture(self, cols: int, index: int):
        """A texture the mat-mats and mat-vecs read activations of `cols` values a token from, for up to
        max_chunk tokens (graph.GraphBuilder._x_texture): two for each width (copies and attention write
        the first, mat-vecs and mat-mats their outputs the second: one that reads the first can write
        the second),
        shared by every plan (each is read by the dispatches right after the one that wrote it)."""
        tex = self._act_textures.get((cols, index))
        if tex is None:
            tex = self._act_textures[cols, index] = self._backend.create_texture(
                activation_texture_rows(self.max_chunk, cols), f"activations of {cols} ({index})", storage=True)
        return tex

    def tile_index(self, t: int, i: int):
        """A binding whose first word is the first token of tile i (tiles of t tokens)."""
        buf = self._tiles.get(t)
        if buf is None:
            n = -(-self.max_chunk // t)
            data = b"".join(struct.pack("<I", j * t) + bytes(252) for j in range(n))
            buf = self._tiles[t] = self._backend.create_buffer(len(data), f"tiles of {t}")
            self._backend.write_buffer(buf, 0, data)
        return Binding(buf, 256 * i, 4)


class Turns:
    """Requests on one engine run one at a time, in arrival order; with reject, a request that
    finds another running fails at once instead of waiting."""

    def __init__(self):
        self.busy = False
        self._waiters: collections.deque = collections.deque()

    async def acquire(self, reject: bool) -> None:
        if not self.busy:
            self.busy = True
            return
        if reject:
            raise EngineBusyError("another request is running on this engine; wait for it to finish or "
                                  "interrupt it (this engine rejects requests instead of queueing them)")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except BaseException:
            if fut in self._waiters:
                self._waiters.remove(fut)
            elif fut.done() and not fut.cancelled():
                self.release()          # the turn was handed over as this waiter gave up: pass it on
            raise

    def release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)    # handed over: busy stays set
                return
        self.busy = False


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    ttft_s: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


@dataclass
class Generation:
    """An answer being generated: iterate it for text pieces; the fields fill in as it runs."""

    engine: "Engine"
    prompt_tokens: list[int]
    params: SamplingParams
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    interrupted: bool = False

    def __aiter__(self):
        return self.engine._run(self)

    def interrupt(self) -> None:
        """Stops this generation at its next check: between prefill chunks or after a token.
        Before it starts, it then ends at once with finish_reason "abort"."""
        self.interrupted = True


class Engine:
    def __init__(self, gguf: GGUFFile, backend, context_length: int | None = None,
                 kv_f16: bool = False, chat_template: str | None = None, max_chunk: int = MAX_CHUNK,
                 on_busy: str = "queue", gpu_memory_limit: int | None = None, tuning: dict | None = None,
                 tuning_cache: dict | None = None, tune: bool = True):
        if on_busy not in ("queue", "reject"):
            raise PyEngineError(f"on_busy must be 'queue' or 'reject', got {on_busy!r}")
        self.on_busy = on_busy
        self._turns = Turns()
        self.gguf = gguf
        arch = gguf.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture '{arch}' is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
        self.arch = arch
        cls = ARCHITECTURES[arch]
        self.args = cls.read_args(gguf, arch, context_length)
        self.tokenizer = Tokenizer.from_gguf(gguf)
        self._template_override = chat_template
        self._template = None
        ctx = context_length or min(DEFAULT_CONTEXT, self.args.context_length)
        if not isinstance(ctx, int) or ctx < 1:
            raise PyEngineError(f"context length must be a positive integer, got {ctx!r}")
        self.context_length = ctx
        self.max_chunk = min(max_chunk, ctx)
        self.backend = backend
        self.kernels = Kernels(backend)
        self.kv_f16 = kv_f16
        # tuning: kernel variants to use as they are; tuning_cache: earlier measurements by key
        self._tuning_given, self._tuning_cache, self._tune = tuning, tuning_cache or {}, tune
        self.tuning, self.tuning_source, self.tuning_key = {}, "default", None
        self._check_tensors(cls)
        self.memory = self._check_memory(gpu_memory_limit)
        self.weights: dict = {}
        self._staging = None
        self.model = None
        self.decode_plan = None
        self._prefill_plans: dict[int, object] = {}
        self._prefill_compiled = None       # the prefill's kernels compiling since the load (_load)
        self.state: State | None = None       # the GPU buffers every plan shares: allocated by create()
        self._cls = cls
        self.load_s = 0.0
        self.load_times = {}
        self._cached: list[int] = []     # tokens whose keys and values sit in the cache
        self._current: Generation | None = None
        self._sparams_written = None

    @classmethod
    async def create(cls, gguf: GGUFFile, weights_source, backend, on_plan=None, **options) -> "Engine":
        """An engine for a parsed GGUF whose tensor bytes `weights_source` writes into GPU buffers.
        on_plan(memory_plan) hears what the model needs before any weight is uploaded."""
        engine = cls(gguf, backend, **options)
        if on_plan is not None:
            on_plan(engine.memory)
        try:
            engine._allocate()
            await engine._load(weights_source)
        except BaseException:
            engine.close()      # no half-built model stays on the GPU, nor is ever used
            raise
        return engine

    def _allocate(self) -> None:
        a = self.args
        self.state = State(self.backend, a.vocab_size, self.max_chunk)
        self.state.kv = KVCache(self.backend, a.n_layers, self.context_length, a.n_kv_heads, a.head_dim,
                                f16=self.kv_f16, textures=self.kernels.kv_textures)

    def close(self) -> None:
        """Frees every GPU buffer this engine allocated; the engine cannot run afterwards."""
        be = self.backend
        bufs = [b for w in self.weights.values() for b in w.buffers]
        if self.state is not None:
            bufs += self.state.buffers()
            self.state.pool.buffers, self.state._tiles, self.state.kv = [], {}, None
        if self._staging is not None:
            bufs.append(self._staging)
        self.weights, self._staging, self.model, self.decode_plan = {}, None, None, None
        self._prefill_plans, self._prefill_compiled = {}, None
        for b in bufs:
            try:
                be.destroy_buffer(b)
            except Exception:   # noqa: BLE001 - a lost device has destroyed them already
                pass

    async def _load(self, source):
        t0 = time.perf_counter()
        self.weights = await self._upload(source)
        t1 = time.perf_counter()
        if self._tuning_given:
            self.tuning, self.tuning_source = self._tuning_given, "given"
        else:
            if self._tune:
                matvec, self.tuning_source, self.tuning_key = await autotune.tune(self, self._tuning_cache)
            else:
                matvec = autotune.defaults(self.backend)
            self.tuning = {**matvec, **await autotune.rule_choice(self)}
        t2 = time.perf_counter()
        self.kernels.tuning = self.tuning
        self.model = self._cls(self.args, self.weights)
        decode = self._graph(1, decode=True)
        await self.kernels.start_compile(decode.kernels)
        self.decode_plan = self.backend.create_plan(decode.dispatches, "decode")
        del decode
        # the prefill's kernels (one set for prompts of every length) start compiling now and the load ends: they
        # compile natively on a thread of their own, in a browser in its GPU process (SwiftShader takes seconds,
        # lavapipe under one, which the first request would otherwise wait for in full); the first prefill
        # waits for what is left
        self._prefill_compiled = self.kernels.start_compile(self._graph(MIN_BUCKET, decode=False).kernels)
        t3 = time.perf_counter()
        await self._release_staging()
        self.load_s = time.perf_counter() - t0
        # where a load's time goes: weights to the GPU, kernel tuning, the plans (compiling their kernels, which
        # a browser's GPU process does after the uploads queued before them), then the wait for the GPU to
        # finish what was queued (in a browser, whose GPU process works apart from the page: the uploads
        # and the repacks)
        self.load_times = {"upload_s": t1 - t0, "tune_s": t2 - t1, "plan_s": t3 - t2, "gpu_wait_s": self.load_s - (t3 - t0)}

    # -- loading ----------------------------------------------------------------

    @classmethod
    async def open(cls, path, backend: str | object = "native", **options) -> "Engine":
        """Reads the GGUF at `path` and puts the model on the GPU."""
        gguf = read_gguf(path)
        owned = isinstance(backend, str)
        be = open_backend(backend) if owned else backend
        src = FileWeights(path)
        options.setdefault("tuning_cache", autotune.load_native())
        try:
            engine = await cls.create(gguf, src, be, **options)
            if engine.tuning_source == "measured":
                autotune.save_native(engine.tuning_key, engine.tuning)
            return engine
        except BaseException:
            if owned:
                be.destroy()
            raise
        finally:
            src.close()

    @classmethod
    def load(cls, path, backend: str | object = "native", **options) -> "Engine":
        """`open` for synchronous callers (native only)."""
        import asyncio

        return asyncio.run(cls.open(path, backend, **options))

    def _check_tensors(self, cls):
        present = self.gguf.tensors
        self._specs = cls.weight_specs(self.args, present)
        for key, spec in self._specs.items():
            info = present.get(spec.tensor)
            if info is None:
                raise GGUFError(f"tensor '{spec.tensor}' is missing from the GGUF")
            if info.type_name not in KERNEL_QTYPES:
                raise UnsupportedModelError(
                    f"tensor '{spec.tensor}' has quant type {info.type_name}, which is not supported; "
                    f"supported: {', '.join(KERNEL_QTYPES)}")
            if len(info.shape) > 1 and info.shape[0] % BLOCK_VALUES[info.type_name]:
                raise UnsupportedModelError(f"tensor '{spec.tensor}' has rows of {info.shape[0]} values, not a "
                                            f"multiple of {BLOCK_VALUES[info.type_name]} as {info.type_name} needs")
            rows = info.n_elements // info.shape[0]
            if spec.row0 + (spec.rows or 0) > rows:
                raise GGUFError(f"tensor '{spec.tensor}' has {rows} rows, fewer than the model's shape needs "
                                f"({spec.row0 + spec.rows})")

    def _tensor_shapes(self):
        """(key, GGUF tensor info, first row, rows, cols) of every weight the model uses."""
        for key, spec in self._specs.items():
            info = self.gguf.tensors[spec.tensor]
            cols = info.shape[0]
            rows = spec.rows if spec.rows is not None else info.n_elements // cols - spec.row0
            yield key, info, spec.row0, rows, cols

    def memory_plan(self) -> dict:
        """The GPU memory this model needs, in bytes, known before any weight is loaded."""
        a = self.args
        be, k, limit = self.backend, self.kernels, self.backend.max_storage_binding
        parts = {key: part_bytes(be, k, i.type_name, r, c) for key, i, _, r, c in self._tensor_shapes()}
        weights = sum(sum(p) for p in parts.values())
        staging = max((staging_bytes(i.type_name, r, c, limit) for _, i, _, r, c in self._tensor_shapes()),
                      default=0)
        # a textured weight is packed in a buffer first, one part at a time
        staging += max((max(parts[key]) for key, _, _, r, _ in self._tensor_shapes() if textured(k, r)), default=0)
        kv = 2 * a.n_layers * self._kv_layout()[1]
        # activations of the largest prefill chunk: the widest tensors a layer keeps alive at once
        q_width = a.n_heads * a.head_dim + 2 * a.n_kv_heads * a.head_dim
        working = (self.max_chunk * 4 * (3 * a.dim + q_width + 2 * a.ffn_dim) + 12 * UNIFORM_BYTES
                   + 3 * 4 * a.vocab_size + 64 * 1024)
        if k.activation_textures:       # activations in textures, two a width (State.activation_texture)
            working += 2 * sum(activation_texture_rows(self.max_chunk, c) * TEXTURE_ROW_BYTES
                               for c in {a.dim, a.n_heads * a.head_dim, a.ffn_dim})
        return {"weights": weights, "kv_cache": kv, "working": working, "upload_staging": staging,
                "total": weights + kv + working + staging}

    def _kv_layout(self) -> tuple[bool, int]:
        a = self.args
        return kv_layout(self.backend, self.context_length, a.n_kv_heads, a.head_dim, self.kv_f16,
                         self.kernels.kv_textures)

    def _check_memory(self, limit: int | None):
        a = self.args
        textures, per_layer = self._kv_layout()
        if not textures and per_layer > self.backend.max_storage_binding:
            raise PyEngineError(
                f"a context of {self.context_length} tokens needs {per_layer} bytes of KV cache per layer, more "
                f"than this GPU binds at once ({self.backend.max_storage_binding}); use a smaller context")
        plan = self.memory_plan()
        if limit is not None and plan["total"] > limit:
            raise GPUError(
                f"this model needs {plan['total'] / 1e6:.0f} MB of GPU memory (weights "
                f"{plan['weights'] / 1e6:.0f} MB, KV cache {plan['kv_cache'] / 1e6:.0f} MB for a context of "
                f"{self.context_length}, working memory {(plan['working'] + plan['upload_staging']) / 1e6:.0f} MB) "
                f"but the limit is {limit / 1e6:.0f} MB; use a smaller context or a smaller model")
        return plan

    async def _upload(self, src) -> dict:
        """Every weight onto the GPU, in file order (a browser source then reads each shard once)."""
        be = self.backend
        shapes = sorted(self._tensor_shapes(), key=lambda t: (t[1].offset, t[2]))
        raw_max = max((staging_bytes(i.type_name, r, c, be.max_storage_binding) for _, i, _, r, c in shapes),
                      default=0)
        self._staging = be.create_buffer(raw_max + 4, "upload staging") if raw_max else None
        weights = {}
        try:
            for key, info, row0, rows, cols in shapes:
                start = row0 * (info.nbytes // (info.n_elements // cols))     # byte offset of the first row
                weights[key] = await upload_weight(
                    be, self.kernels, key, info.type_name, rows, cols,
                    lambda buf, off, n, info=info, start=start: src.write_tensor(be, buf, info, start + off, n),
                    self._staging)
        except BaseException:
            for w in weights.values():
                for b in w.buffers:
                    be.destroy_buffer(b)
            raise
        return weights

    async def _release_staging(self):
        if self._staging is not None:
            await self.backend.sync()       # the repacks read it until they finish
            self.backend.destroy_buffer(self._staging)
            self._staging = None

    # -- plans --------------------------------------------------------------------

    def _graph(self, m_cap: int, decode: bool) -> GraphBuilder:
        g = GraphBuilder(self.kernels, self.state, m_cap)
        if decode:
            g.count_token(self.args.vocab_size)
        else:
            g.clear_counts(self.args.vocab_size)
        self.model(g)
        return g

    def _bucket(self, n: int) -> int:
        """The tokens of the prefill plan that runs a chunk of n."""
        bucket = MIN_BUCKET
        while bucket < n:
            bucket *= 2
        return min(bucket, self.max_chunk)

    async def compiled(self) -> None:
        """Waits for the kernels the load left compiling (the prefill's), as the first prefill does; raises
        GPUError where one failed."""
        if self._prefill_compiled is not None:
            compiled, self._prefill_compiled = self._prefill_compiled, None
            await compiled

    async def _prefill_plan(self, n: int):
        await self.compiled()
        bucket = self._bucket(n)
        plan = self._prefill_plans.get(bucket)
        if plan is None:
            g = self._graph(bucket, decode=False)
            plan = self._prefill_plans[bucket] = self.backend.create_plan(g.dispatches, f"prefill {bucket}")
        return plan

    # -- running ------------------------------------------------------------------

    def _write_step(self, pos0: int, tokens: list[int], count: bool):
        data = struct.pack(f"<4I{len(tokens)}I", pos0, len(tokens), 1 if count else 0, 0, *tokens)
        self.backend.write_buffer(self.state.step, 0, data)

    @staticmethod
    def _parse_result(raw: bytes, vocab: int):
        mx, z, bound = struct.unpack_from("<3f", raw, 0)
        n = min(struct.unpack_from("<I", raw, 12)[0], TOPK)       # the candidates the record holds
        pairs = struct.unpack_from(f"<{2 * n}I", raw, 16)
        values = struct.unpack_from(f"<{2 * n}f", raw, 16)
        cands = [(values[2 * i], pairs[2 * i + 1]) for i in range(n) if pairs[2 * i + 1] < vocab]
        return Candidates(cands, mx, z, bound)

    @staticmethod
    def _best_index(raw: bytes) -> int:
        """The token of a record's first pair: what a chained decode step takes (counts.wgsl.j2)."""
        return struct.unpack_from("<I", raw, 20)[0]

    async def _prefill(self, tokens: list[int], gen: Generation | None = None):
        """Runs tokens through the model after the cached ones; returns the candidates for the next
        token, or None when interrupted between chunks. The cache record grows chunk by chunk, so
        it always names exactly the tokens whose keys and values are in the cache."""
        raw = None
        for start in range(0, len(tokens), self.max_chunk):
            chunk = tokens[start:start + self.max_chunk]
            plan = await self._prefill_plan(len(chunk))
            self._write_step(len(self._cached), chunk, count=False)
            if start + self.max_chunk >= len(tokens):
                raw = await self.backend.submit_and_read(plan, self.state.result, 0, 4 * RESULT_WORDS)
                self._cached.extend(chunk)
            else:
                self.backend.submit(plan)
                await self.backend.sync()    # in the browser, this is where an interrupt message gets in
                self._cached.extend(chunk)
                if gen is not None and gen.interrupted:
                    return None
        return self._parse_result(raw, self.args.vocab_size)

    def _queue_decode(self, token: int | None = None, pos: int = 0) -> Pending:
        """Queues the decode step of `token` at position `pos`. With no token, the step takes the best
        candidate of the step queued before it, a position further on (shaders/counts.wgsl.j2):
        greedy decoding then queues a step before the host has read the one before it."""
        if token is not None:
            self._write_step(pos, [token], count=True)
        return self.backend.submit_and_read_later(self.decode_plan, self.state.result, 0, 4 * RESULT_WORDS)

    async def _read_processed(self):
        raw = await self.backend.read_buffer(self.state.processed, 0, 4 * self.args.vocab_size)
        return struct.unpack(f"<{self.args.vocab_size}f", raw)

    async def logits(self, tokens: list[int]) -> list[float]:
        """Raw logits after `tokens` (a fresh sequence): for tests and tools."""
        async with self._turn():
            self._cached = []
            self._write_sparams(SamplingParams(temperature=0.0))
            await self._prefill(list(tokens))
        raw = await self.backend.read_buffer(self.state.logits, 0, 4 * self.args.vocab_size)
        return list(struct.unpack(f"<{self.args.vocab_size}f", raw))

    def _write_sparams(self, p: SamplingParams):
        inv_t = 1.0 if p.greedy else 1.0 / p.temperature
        # greedy decoding takes the best candidate alone: the top-k kernels then merge one a list
        want = 1 if p.greedy else TOPK
        vals = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, inv_t, float(want))
        if vals != self._sparams_written:
            self.backend.write_buffer(self.state.sparams, 0, struct.pack("<5f", *vals))
            self._sparams_written = vals

    # -- public API ---------------------------------------------------------------

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate.from_gguf(self.gguf, self.tokenizer, self._template_override)
        return self._template

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        messages = [{**m, "content": clean_text(m["content"])} if isinstance(m.get("content"), str) else m
                    for m in messages]
        text = self.template.render(messages, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_bos=False, parse_special=True)
        tok = self.tokenizer
        if tok.add_bos and tok.bos_id is not None and ids[:1] != [tok.bos_id]:
            ids.insert(0, tok.bos_id)      # templates normally write the BOS themselves; never twice
        return ids

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> Generation:
        """Plain completion of a prompt (text or token ids); iterate the result for text."""
        params = params or SamplingParams(**kw)
        tokens = self.tokenizer.encode(clean_text(prompt)) if isinstance(prompt, str) else list(prompt)
        if params.truncation == "auto" and len(tokens) > self._prompt_limit(params):
            keep = self._prompt_limit(params)
            head = tokens[:1] if self.tokenizer.add_bos and tokens[:1] == [self.tokenizer.bos_id] else []
            tokens = head + tokens[len(tokens) - keep + len(head):]
        return Generation(self, tokens, params)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **kw) -> Generation:
        params = params or SamplingParams(**kw)
        ids = self.chat_prompt(messages)
        if params.truncation == "auto" and len(ids) > self._prompt_limit(params):
            ids = self._truncate_chat(list(messages), self._prompt_limit(params))
        return Generation(self, ids, params)

    def _prompt_limit(self, params: SamplingParams) -> int:
        """The longest prompt truncation="auto" keeps: the context less room for the answer."""
        room = params.max_tokens if params.max_tokens is not None else ANSWER_ROOM
        return self.context_length - max(1, min(room, self.context_length // 2))

    def _truncate_chat(self, msgs: list[dict], limit: int) -> list[int]:
        """Drops the oldest turns after the leading system messages, then the start of the last message."""
        first = next((i for i, m in enumerate(msgs) if m.get("role") != "system"), len(msgs))
        ids = self.chat_prompt(msgs)
        while len(ids) > limit and len(msgs) - first > 1:
            del msgs[first]
            while len(msgs) - first > 1 and msgs[first].get("role") != "user":
                del msgs[first]      # a conversation still opens with a user turn, as templates expect
            ids = self.chat_prompt(msgs)
        last = dict(msgs[-1])
        content = self.tokenizer.encode(clean_text(str(last.get("content", ""))), parse_special=False)
        while len(ids) > limit and content:
            content = content[len(ids) - limit:]
            last["content"] = self.tokenizer.decode(content)
            ids = self.chat_prompt(msgs[:-1] + [last])
        if len(ids) > limit:
            raise ContextOverflowError(
                f"the prompt has {len(ids)} tokens even without its older messages, but the context "
                f"holds {self.context_length} (less {self.context_length - limit} kept for the answer); "
                f"shorten the system message or use a larger context")
        return ids

    def interrupt(self) -> None:
        """Stops the running generation, if any (see Generation.interrupt)."""
        if self._current is not None:
            self._current.interrupt()

    def reset(self) -> None:
        self._cached = []

    def _turn(self):
        return _Turn(self._turns, self.on_busy == "reject")

    async def _run(self, gen: Generation):
        p = gen.params
        prompt = gen.prompt_tokens
        ctx = self.context_length
        if not prompt:
            raise PyEngineError("the prompt is empty: give at least one token")
        if len(prompt) >= ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens but the context holds {ctx}; "
                f"shorten the prompt, use a larger context, or ask for truncation=\"auto\"")
        async with self._turn():
            self._current = gen
            try:
                async for piece in self._generate(gen):
                    yield piece
            finally:
                self._current = None

    async def _generate(self, gen: Generation):
        p = gen.params
        prompt = gen.prompt_tokens
        ctx = self.context_length
        sampler = Sampler(p)
        self._write_sparams(p)
        reuse = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(prompt) - 1)
        self._cached = self._cached[:reuse]
        gen.usage.prompt_tokens = len(prompt)
        gen.usage.cached_tokens = reuse
        t0 = time.perf_counter()
        cands = None if gen.interrupted else await self._prefill(prompt[reuse:], gen)
        t1 = time.perf_counter()
        gen.timings.prefill_s = t1 - t0
        gen.timings.prefill_tokens = len(self._cached) - reuse
        if cands is None or gen.interrupted:     # interrupted before the first token
            gen.finish_reason = "abort"
            return
        detok = self.tokenizer.detokenizer()
        stops = p.stop
        hold = max((len(s) for s in stops), default=1) - 1   # text that may still begin a stop string
        pending = ""
        stopped_by_string = False
        max_new = p.max_tokens if p.max_tokens is not None else ctx
        t_first = None
        # Each token's decode step is queued as soon as the token is known, before its text is
        # worked out and handed on; greedy decoding also queues the step after it, which the GPU
        # feeds its own best candidate: the GPU never waits for the host, the host rarely for the GPU.
        ahead, ahead_token = None, None
        while True:
            tok = await sampler.pick(cands, self._read_processed)
            if t_first is None:
                t_first = time.perf_counter()
                gen.timings.ttft_s = t_first - t0
            gen.tokens.append(tok)
            gen.usage.completion_tokens += 1
            if tok in self.tokenizer.stop_ids and not p.ignore_eos:
                gen.finish_reason = "stop"
                break
            pos = len(self._cached)
            more = gen.usage.completion_tokens < max_new and pos < ctx      # whether tok is decoded
            if more:
                step = ahead if ahead is not None and ahead_token == tok else self._queue_decode(tok, pos)
                ahead = None
                if p.greedy and gen.usage.completion_tokens + 1 < max_new and pos + 1 < ctx:
                    ahead = self._queue_decode()      # tok's successor, at pos + 1
            pending += detok.add(tok)
            if stops:
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    pending = pending[:cut]
                    gen.finish_reason = "stop"
                    stopped_by_string = True
                    break
            out = pending[:len(pending) - hold] if hold else pending
            if out:
                pending = pending[len(out):]
                gen.text += out
                yield out
            if gen.interrupted:
                gen.finish_reason = "abort"
                break
            if not more:
                gen.finish_reason = "length"
                break
            raw = await step
            self._cached.append(tok)
            cands = self._parse_result(raw, self.args.vocab_size)
            ahead_token = self._best_index(raw)
        gen.timings.decode_s = time.perf_counter() - t_first
        gen.timings.decode_tokens = gen.usage.completion_tokens - 1
        tail = pending if stopped_by_string else pending + detok.flush()
        if tail:
            gen.text += tail
            yield tail


class _Turn:
    """`async with engine._turn():` holds the engine for one request."""

    def __init__(self, turns: Turns, reject: bool):
        self.turns, self.reject = turns, reject

    async def __aenter__(self):
        await self.turns.acquire(self.reject)

    async def __aexit__(self, *exc):
        self.turns.release()
