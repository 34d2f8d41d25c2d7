"""Generation parameters, their validation, and sampling from the GPU's top candidates.

The GPU applies the penalties and the temperature and returns the TOPK best
processed logits with the maximum and the softmax normaliser of the whole
vocabulary, so top-k, top-p and plain sampling are exact from those alone in
almost every step; only when the nucleus reaches past the candidates does the
sampler read all logits back.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

from .errors import RequestError

MAX_STOP_STRINGS = 16
TRUNCATION = ("disabled", "auto")


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # what a prompt longer than the context does: "disabled" fails naming both lengths; "auto" drops
    # the oldest messages after the system prompt (then the start of the last one) until it fits
    truncation: str = "disabled"

    def __post_init__(self):
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        if self.max_tokens is not None:
            _int("max_tokens", self.max_tokens, 1, 1 << 20)
        _num("temperature", self.temperature, 0.0, 100.0)
        _num("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _int("top_k", self.top_k, 0, 1 << 24)
        if self.seed is not None:
            _int("seed", self.seed, -(1 << 63), (1 << 64) - 1)
        _num("repetition_penalty", self.repetition_penalty, 0.0, 100.0, low_open=True)
        _num("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _num("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is None:
            self.stop = []
        if not isinstance(self.stop, (list, tuple)):
            raise RequestError("stop", f"must be a string or a list of strings, got {type(self.stop).__name__}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise RequestError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise RequestError("stop", "every stop string must be a non-empty string")
        self.stop = list(self.stop)
        if self.truncation not in TRUNCATION:
            raise RequestError("truncation", f"must be one of {', '.join(TRUNCATION)}, got {self.truncation!r}")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")


def _int(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(name, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise RequestError(name, f"must be between {lo} and {hi}, got {v}")


def _num(name, v, lo, hi, low_open=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(name, f"must be a number, got {v!r}")
    if math.isnan(v) or math.isinf(v):
        raise RequestError(name, f"must be a finite number, got {v}")
    if v < lo or v > hi or (low_open and v == lo):
        lo_b = "(" if low_open else "["
        raise RequestError(name, f"must be in {lo_b}{lo}, {hi}], got {v}")


@dataclass
class Candidates:
    """The GPU's answer for one step: best (processed logit, token) pairs, best first, with the
    maximum and softmax normaliser over the vocabulary; every token not listed has a
    processed logit <= bound, so the listed ones above bound are the exact head."""

    top: list[tuple[float, int]]
    max: float
    z: float
    bound: float

    @property
    def exact(self) -> int:
        """How many leading candidates are certainly the best of the whole vocabulary."""
        n = 0
        for v, _ in self.top:
            if v <= self.bound:
                break
            n += 1
        return max(n, 1)   # the maximum is always kept


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.rng = random.Random(seed)

    async def pick(self, c: Candidates, read_all) -> int:
        """read_all: coroutine returning every processed logit, for the rare step that needs them."""
        p = self.p
        if p.greedy:
            return c.top[0][1]
        mx, z = c.max, c.z
        exact = c.top[:c.exact]
        k = p.top_k
        if 0 < k <= len(exact):
            kept = exact[:k]
            return self._nucleus(kept, mx, sum(math.exp(v - mx) for v, _ in kept))
        if k == 0:
            # the nucleus is a prefix of the sorted vocabulary: enough if it ends inside the exact head
            need = p.top_p * z
            acc = 0.0
            for n, (v, _) in enumerate(exact):
                acc += math.exp(v - mx)
                if acc >= need:
                    return self._nucleus(exact[:n + 1], mx, z)
        logits = await read_all()
        full = sorted(((v, t) for t, v in enumerate(logits)), key=lambda e: (-e[0], e[1]))
        if k > 0:
            full = full[:k]
            z = sum(math.exp(v - mx) for v, _ in full)
        return self._nucleus(full, mx, z)

    def _nucleus(self, sorted_cands, mx, total) -> int:
        need = self.p.top_p * total
        kept, acc = [], 0.0
        for v, t in sorted_cands:
            w = math.exp(v - mx)
            kept.append((w, t))
            acc += w
            if acc >= need:
                break
        u = self.rng.random() * acc
        for w, t in kept:
            u -= w
            if u < 0:
                return t
        return kept[-1][1]
