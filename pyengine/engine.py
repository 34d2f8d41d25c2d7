"""One model's pipeline: load a GGUF onto the GPU, build the plans, prefill, decode, sample, stream.

The same code runs natively and in Pyodide; only the GPU backend and the source
of the weight bytes differ.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

from .chat_template import ChatTemplate
from .errors import ContextOverflowError, GGUFError, PyEngineError, UnsupportedModelError
from .gguf import GGUFFile, read_gguf
from .gpu import Binding, open_backend
from .graph import GraphBuilder, ScratchPool
from .kernels import KERNEL_QTYPES, REPACKED_QTYPES, TOPK, Kernels, packed_nbytes
from .models import ARCHITECTURES
from .sampling import Candidates, Sampler, SamplingParams
from .tokenizer import Tokenizer
from .weights import upload_weight

MAX_CHUNK = 512          # tokens per prefill plan replay
MIN_BUCKET = 16
DEFAULT_CONTEXT = 2048
RESULT_WORDS = 4 + 2 * TOPK


class FileWeights:
    """Native source of weight bytes: the GGUF file itself."""

    def __init__(self, path):
        self.path = str(path)
        self._f = open(self.path, "rb")

    def write_tensor(self, backend, buffer, info) -> None:
        self._f.seek(info.offset)
        data = self._f.read(info.nbytes)
        if len(data) != info.nbytes:
            raise GGUFError(f"GGUF file is truncated: tensor '{info.name}' is cut short")
        pad = -len(data) % 4
        backend.write_buffer(buffer, 0, data + b"\0" * pad if pad else data)

    def close(self):
        self._f.close()


class KVCache:
    def __init__(self, backend, n_layers, context, n_kv_heads, head_dim, f16=False):
        self.context = context
        self.f16 = f16
        per = context * n_kv_heads * head_dim * (2 if f16 else 4)
        if per > backend.max_storage_binding:
            raise PyEngineError(
                f"a context of {context} tokens needs {per} bytes of KV cache per layer, more than "
                f"this GPU binds at once ({backend.max_storage_binding}); use a smaller context")
        self.k = [backend.create_buffer(per, f"k cache {i}") for i in range(n_layers)]
        self.v = [backend.create_buffer(per, f"v cache {i}") for i in range(n_layers)]
        self.nbytes = 2 * n_layers * per


class State:
    """The persistent buffers every plan shares."""

    def __init__(self, backend, vocab, max_chunk):
        self.pool = ScratchPool(backend)
        self.step = backend.create_buffer(16 + 4 * max_chunk, "step")
        self.logits = backend.create_buffer(4 * vocab, "logits")
        self.processed = backend.create_buffer(4 * vocab, "processed logits")
        self.counts = backend.create_buffer(4 * vocab, "token counts")
        self.sparams = backend.create_buffer(16, "sampling params")
        n_lists = -(-vocab // 1024)
        self.topk = [backend.create_buffer(4 * RESULT_WORDS * n_lists, f"top-k {i}") for i in range(2)]
        self.result_index = 0
        self.kv: KVCache | None = None
        self.max_chunk = max_chunk
        self._backend = backend
        self._tiles: dict[int, object] = {}

    def tile_index(self, t: int, i: int):
        """A binding whose first word is the first token of tile i (tiles of t tokens)."""
        buf = self._tiles.get(t)
        if buf is None:
            n = -(-self.max_chunk // t)
            data = b"".join(struct.pack("<I", j * t) + bytes(252) for j in range(n))
            buf = self._tiles[t] = self._backend.create_buffer(len(data), f"tiles of {t}")
            self._backend.write_buffer(buf, 0, data)
        return Binding(buf, 256 * i, 4)


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

    def __aiter__(self):
        return self.engine._run(self)


class Engine:
    def __init__(self, gguf: GGUFFile, backend, context_length: int | None = None,
                 kv_f16: bool = False, chat_template: str | None = None, max_chunk: int = MAX_CHUNK):
        self.gguf = gguf
        arch = gguf.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture '{arch}' is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
        self.arch = arch
        cls = ARCHITECTURES[arch]
        self.args = cls.Args.from_gguf(gguf, arch)
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
        self._check_tensors(cls)
        self.state = State(backend, self.args.vocab_size, self.max_chunk)
        self.state.kv = KVCache(backend, self.args.n_layers, ctx, self.args.n_kv_heads, self.args.head_dim,
                                f16=kv_f16)
        self._cls = cls
        self.weights: dict = {}
        self.model = None
        self._prefill_plans: dict[int, object] = {}
        self.decode_plan = None
        self.load_s = 0.0
        self._cached: list[int] = []     # tokens whose keys and values sit in the cache
        self._interrupt = False
        self._sparams_written = None
        self._staging = None

    @classmethod
    async def create(cls, gguf: GGUFFile, weights_source, backend, **options) -> "Engine":
        """An engine for a parsed GGUF whose tensor bytes `weights_source` writes into GPU buffers."""
        engine = cls(gguf, backend, **options)
        await engine._load(weights_source)
        return engine

    async def _load(self, source):
        t0 = time.perf_counter()
        self.weights = await self._upload(source)
        self.model = self._cls(self.args, self.weights)
        self.decode_plan = self._build(1, decode=True)
        await self._release_staging()
        self.load_s = time.perf_counter() - t0

    # -- loading ----------------------------------------------------------------

    @classmethod
    async def open(cls, path, backend: str | object = "native", **options) -> "Engine":
        """Reads the GGUF at `path` and puts the model on the GPU."""
        gguf = read_gguf(path)
        be = open_backend(backend) if isinstance(backend, str) else backend
        src = FileWeights(path)
        try:
            return await cls.create(gguf, src, be, **options)
        finally:
            src.close()

    @classmethod
    def load(cls, path, backend: str | object = "native", **options) -> "Engine":
        """`open` for synchronous callers (native only)."""
        import asyncio

        return asyncio.run(cls.open(path, backend, **options))

    def _check_tensors(self, cls):
        present = self.gguf.tensors
        self._names = cls.weight_names(self.args, present)
        for name in self._names:
            info = present.get(name)
            if info is None:
                raise GGUFError(f"tensor '{name}' is missing from the GGUF")
            if info.type_name not in KERNEL_QTYPES:
                raise UnsupportedModelError(
                    f"tensor '{name}' has quant type {info.type_name}, which is not supported; "
                    f"supported: {', '.join(KERNEL_QTYPES)}")
            if len(info.shape) > 1 and info.shape[0] % 8:
                raise UnsupportedModelError(f"tensor '{name}' has rows of {info.shape[0]} values, "
                                            f"not a multiple of 8")

    def gpu_bytes_needed(self) -> int:
        t = self.gguf.tensors
        total = 0
        for name in self._names:
            info = t[name]
            cols = info.shape[0]
            rows = info.n_elements // cols
            total += packed_nbytes(info.type_name, rows, cols)
        return total

    async def _upload(self, src) -> dict:
        """Every weight onto the GPU, in file order (a browser source then reads each shard once)."""
        be = self.backend
        infos = sorted((self.gguf.tensors[n] for n in self._names), key=lambda t: t.offset)
        raw_max = max((i.nbytes for i in infos if i.type_name in REPACKED_QTYPES), default=0)
        self._staging = be.create_buffer(raw_max + 4, "upload staging") if raw_max else None
        weights = {}
        try:
            for info in infos:
                cols = info.shape[0]
                weights[info.name] = await upload_weight(
                    be, self.kernels, info.name, info.type_name, info.n_elements // cols, cols,
                    lambda buf, info=info: src.write_tensor(be, buf, info), self._staging)
        except BaseException:
            for w in weights.values():
                be.destroy_buffer(w.buffer)
            raise
        return weights

    async def _release_staging(self):
        if self._staging is not None:
            await self.backend.sync()       # the repacks read it until they finish
            self.backend.destroy_buffer(self._staging)
            self._staging = None

    # -- plans --------------------------------------------------------------------

    def _build(self, m_cap: int, decode: bool):
        g = GraphBuilder(self.kernels, self.state, m_cap)
        if decode:
            g.count_token(self.args.vocab_size)
        else:
            g.clear_counts(self.args.vocab_size)
        self.model(g)
        plan = self.backend.create_plan(g.dispatches, "decode" if decode else f"prefill {m_cap}")
        del g
        return plan

    def _prefill_plan(self, n: int):
        bucket = MIN_BUCKET
        while bucket < n:
            bucket *= 2
        bucket = min(bucket, self.max_chunk)
        plan = self._prefill_plans.get(bucket)
        if plan is None:
            plan = self._prefill_plans[bucket] = self._build(bucket, decode=False)
        return plan

    # -- running ------------------------------------------------------------------

    def _write_step(self, pos0: int, tokens: list[int], count: bool):
        data = struct.pack(f"<4I{len(tokens)}I", pos0, len(tokens), 1 if count else 0, 0, *tokens)
        self.backend.write_buffer(self.state.step, 0, data)

    def _result_buffer(self):
        return self.state.topk[self.state.result_index]

    @staticmethod
    def _parse_result(raw: bytes, vocab: int):
        mx, z, bound = struct.unpack_from("<3f", raw, 0)
        pairs = struct.unpack_from(f"<{2 * TOPK}I", raw, 16)
        values = struct.unpack_from(f"<{2 * TOPK}f", raw, 16)
        cands = [(values[2 * i], pairs[2 * i + 1]) for i in range(TOPK) if pairs[2 * i + 1] < vocab]
        return Candidates(cands, mx, z, bound)

    async def _prefill(self, tokens: list[int], pos0: int):
        """Runs tokens through the model from position pos0; returns the candidates for the next token."""
        raw = None
        for start in range(0, len(tokens), self.max_chunk):
            chunk = tokens[start:start + self.max_chunk]
            plan = self._prefill_plan(len(chunk))
            self._write_step(pos0 + start, chunk, count=False)
            if start + self.max_chunk >= len(tokens):
                raw = await self.backend.submit_and_read(plan, self._result_buffer(), 0, 4 * RESULT_WORDS)
            else:
                self.backend.submit(plan)
        return self._parse_result(raw, self.args.vocab_size)

    async def _decode(self, token: int, pos: int):
        self._write_step(pos, [token], count=True)
        raw = await self.backend.submit_and_read(self.decode_plan, self._result_buffer(), 0, 4 * RESULT_WORDS)
        return self._parse_result(raw, self.args.vocab_size)

    async def _read_processed(self):
        raw = await self.backend.read_buffer(self.state.processed, 0, 4 * self.args.vocab_size)
        return struct.unpack(f"<{self.args.vocab_size}f", raw)

    async def logits(self, tokens: list[int]) -> list[float]:
        """Raw logits after `tokens` (a fresh sequence): for tests and tools."""
        self._cached = []
        self._write_sparams(SamplingParams(temperature=0.0))
        await self._prefill(tokens, 0)
        self._cached = list(tokens)
        raw = await self.backend.read_buffer(self.state.logits, 0, 4 * self.args.vocab_size)
        return list(struct.unpack(f"<{self.args.vocab_size}f", raw))

    def _write_sparams(self, p: SamplingParams):
        inv_t = 1.0 if p.greedy else 1.0 / p.temperature
        vals = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, inv_t)
        if vals != self._sparams_written:
            self.backend.write_buffer(self.state.sparams, 0, struct.pack("<4f", *vals))
            self._sparams_written = vals

    # -- public API ---------------------------------------------------------------

    @property
    def template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate.from_gguf(self.gguf, self.tokenizer, self._template_override)
        return self._template

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        text = self.template.render(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, parse_special=True)

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None, **kw) -> Generation:
        """Plain completion of a prompt (text or token ids); iterate the result for text."""
        params = params or SamplingParams(**kw)
        tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(self, tokens, params)

    def chat(self, messages: list[dict], params: SamplingParams | None = None, **kw) -> Generation:
        params = params or SamplingParams(**kw)
        return Generation(self, self.chat_prompt(messages), params)

    def interrupt(self) -> None:
        self._interrupt = True

    def reset(self) -> None:
        self._cached = []

    async def _run(self, gen: Generation):
        p = gen.params
        prompt = gen.prompt_tokens
        ctx = self.context_length
        if not prompt:
            raise PyEngineError("the prompt is empty: give at least one token")
        if len(prompt) >= ctx:
            raise ContextOverflowError(
                f"the prompt has {len(prompt)} tokens but the context holds {ctx}; "
                f"shorten the prompt or use a larger context")
        self._interrupt = False
        sampler = Sampler(p)
        self._write_sparams(p)
        reuse = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            reuse += 1
        reuse = min(reuse, len(prompt) - 1)
        self._cached = self._cached[:reuse]
        t0 = time.perf_counter()
        cands = await self._prefill(prompt[reuse:], reuse)
        self._cached = list(prompt)
        t1 = time.perf_counter()
        gen.usage.prompt_tokens = len(prompt)
        gen.usage.cached_tokens = reuse
        gen.timings.prefill_s = t1 - t0
        gen.timings.prefill_tokens = len(prompt) - reuse
        detok = self.tokenizer.detokenizer()
        stops = p.stop
        hold = max((len(s) for s in stops), default=1) - 1   # text that may still begin a stop string
        pending = ""
        stopped_by_string = False
        max_new = p.max_tokens if p.max_tokens is not None else ctx
        t_first = None
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
            if self._interrupt:
                gen.finish_reason = "abort"
                break
            if gen.usage.completion_tokens >= max_new or len(self._cached) >= ctx:
                gen.finish_reason = "length"
                break
            cands = await self._decode(tok, len(self._cached))
            self._cached.append(tok)
        gen.timings.decode_s = time.perf_counter() - t_first
        gen.timings.decode_tokens = gen.usage.completion_tokens - 1
        tail = pending if stopped_by_string else pending + detok.flush()
        if tail:
            gen.text += tail
            yield tail
