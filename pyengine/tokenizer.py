"""Byte-level BPE tokenizer built from GGUF metadata, in pure Python.

`tokenizer.ggml.model = gpt2` vocabularies: text is split into pre-tokens (the
model's `tokenizer.ggml.pre` rule, written out by hand because Pyodide has no
`regex` module offline), each pre-token is mapped to byte-level symbols and
merged by rank. Special (control and user-defined) tokens found in the text are
kept whole.
"""

from __future__ import annotations

import codecs
import re
import unicodedata

from .errors import UnsupportedModelError

# llama.cpp token types
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Unicode White_Space: what \s matches in the reference regex engines.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Lone surrogates (JavaScript strings and undecodable command-line bytes can hold them;
    they are not text) become U+FFFD; everything else, NUL included, is kept."""
    return _SURROGATE.sub("\ufffd", text)


BYTE_TO_UNICODE = _bytes_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}

_class_cache: dict[str, str] = {}


def _cls(c: str) -> str:
    """L (letter), N (number), S (whitespace) or O (anything else)."""
    k = _class_cache.get(c)
    if k is None:
        if c in _WHITESPACE:
            k = "S"
        else:
            cat = unicodedata.category(c)
            k = "L" if cat[0] == "L" else "N" if cat[0] == "N" else "O"
        _class_cache[c] = k
    return k


def split_gpt2(s: str, out: list[str]) -> None:
    r"""The GPT-2 pattern, by hand:
    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    """
    n = len(s)
    i = 0
    while i < n:
        c = s[i]
        if c == "'" and i + 1 < n:
            if s[i + 1] in "stmd":
                out.append(s[i:i + 2])
                i += 2
                continue
            if s[i + 1:i + 3] in ("re", "ve", "ll"):
                out.append(s[i:i + 3])
                i += 3
                continue
        start = i
        k = _cls(c)
        if c == " " and i + 1 < n and _cls(s[i + 1]) != "S":
            start = i + 1
            k = _cls(s[i + 1])
        if k != "S":
            j = start + 1
            while j < n and _cls(s[j]) == k:
                j += 1
            out.append(s[i:j])
            i = j
            continue
        j = i + 1
        while j < n and _cls(s[j]) == "S":
            j += 1
        if j < n and j - i >= 2:
            j -= 1  # \s+(?!\S): leave the last space to the word that follows
        out.append(s[i:j])
        i = j


def split_smollm(s: str, out: list[str]) -> None:
    """Every digit on its own, then the GPT-2 pattern on what lies between."""
    seg = 0
    for i, c in enumerate(s):
        if _cls(c) == "N":
            if seg < i:
                split_gpt2(s[seg:i], out)
            out.append(c)
            seg = i + 1
    if seg < len(s):
        split_gpt2(s[seg:], out)


PRE_TOKENIZERS = {
    "default": split_gpt2,
    "gpt2": split_gpt2,
    "smollm": split_smollm,
}


class Tokenizer:
    def __init__(self, tokens: list[str], token_types: list[int] | None, merges: list[str],
                 pre: str = "default", bos_id: int | None = None, eos_id: int | None = None,
                 eot_ids: tuple[int, ...] = (), add_bos: bool = False, unk_id: int | None = None):
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"pre-tokenizer '{pre}' is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        self._split = PRE_TOKENIZERS[pre]
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        types = token_types or [TOKEN_NORMAL] * len(tokens)
        self.token_types = types
        self.ranks = {}
        for rank, m in enumerate(merges):
            a, sep, b = m.partition(" ")
            if sep:
                self.ranks[(a, b)] = rank
        self.special = {t: i for i, t in enumerate(tokens)
                        if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and t}
        # longest first, so '<|im_start|>' wins over a shorter special that prefixes it
        self._special_sorted = sorted(self.special, key=len, reverse=True)
        self._special_first = {t[0] for t in self.special}
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.unk_id = unk_id
        self.stop_ids = frozenset(i for i in (eos_id, *eot_ids) if i is not None)
        self._cache: dict[str, list[int]] = {}
        # bytes each token decodes to (control tokens decode to their text)
        self._bytes = [self._token_bytes(i) for i in range(len(tokens))]

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        model = gguf.get("tokenizer.ggml.model")
        if model is None:
            raise UnsupportedModelError("the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
        if model != "gpt2":
            raise UnsupportedModelError(
                f"tokenizer model '{model}' is not supported; supported: gpt2 (byte-level BPE)")
        tokens = gguf.require("tokenizer.ggml.tokens")
        eot = []
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if gguf.get(key) is not None:
                eot.append(gguf.get(key))
        # ChatML models end a turn with <|im_end|> even when the GGUF names another EOS
        for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            tid = tokens.index(name) if name in tokens else None
            if tid is not None:
                eot.append(tid)
        return cls(
            tokens=tokens,
            token_types=gguf.get("tokenizer.ggml.token_type"),
            merges=gguf.get("tokenizer.ggml.merges") or [],
            pre=gguf.get("tokenizer.ggml.pre", "default"),
            bos_id=gguf.get("tokenizer.ggml.bos_token_id"),
            eos_id=gguf.get("tokenizer.ggml.eos_token_id"),
            eot_ids=tuple(eot),
            add_bos=bool(gguf.get("tokenizer.ggml.add_bos_token", False)),
            unk_id=gguf.get("tokenizer.ggml.unknown_token_id"),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _token_bytes(self, i: int) -> bytes:
        t = self.tokens[i]
        if self.token_types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            return t.encode("utf-8", "surrogateescape")
        try:
            return bytes(UNICODE_TO_BYTE[c] for c in t)
        except KeyError:
            return t.encode("utf-8", "surrogateescape")

    # -- encoding --------------------------------------------------------------

    def _bpe(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        # bytes without a symbol in the vocabulary are dropped before merging, as the
        # reference BPE does when the model has no unknown token
        vocab = self.vocab
        syms = [c for c in (BYTE_TO_UNICODE[b] for b in word.encode("utf-8", "surrogatepass"))
                if c in vocab]
        ranks = self.ranks
        while len(syms) > 1:
            best = None
            best_rank = None
            for j in range(len(syms) - 1):
                r = ranks.get((syms[j], syms[j + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best_rank, best = r, j
            if best is None:
                break
            a, b = syms[best], syms[best + 1]
            merged = []
            j = 0
            while j < len(syms):
                if j < len(syms) - 1 and syms[j] == a and syms[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(syms[j])
                    j += 1
            syms = merged
        ids = [vocab[s] for s in syms if s in vocab]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def _encode_plain(self, text: str, out: list[int]) -> None:
        words: list[str] = []
        self._split(text, words)
        for w in words:
            out.extend(self._bpe(w))

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are kept whole
        when `parse_special` (as chat templates need); a BOS is added when the model
        asks for one, or as `add_bos` says."""
        out: list[int] = []
        if add_bos if add_bos is not None else self.add_bos:
            if self.bos_id is not None:
                out.append(self.bos_id)
        if not parse_special or not self.special:
            self._encode_plain(text, out)
            return out
        i = seg = 0
        n = len(text)
        while i < n:
            if text[i] in self._special_first:
                hit = next((t for t in self._special_sorted if text.startswith(t, i)), None)
                if hit is not None:
                    if seg < i:
                        self._encode_plain(text[seg:i], out)
                    out.append(self.special[hit])
                    i += len(hit)
                    seg = i
                    continue
            i += 1
        if seg < n:
            self._encode_plain(text[seg:], out)
        return out

    # -- decoding --------------------------------------------------------------

    def token_bytes(self, tid: int) -> bytes:
        return self._bytes[tid]

    def decode(self, ids, skip_special: bool = False) -> str:
        data = b"".join(self._bytes[i] for i in ids
                        if not (skip_special and self.token_types[i] == TOKEN_CONTROL))
        return data.decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = True) -> "Detokenizer":
        return Detokenizer(self, skip_special)


class Detokenizer:
    """Turns a stream of token ids into text pieces that never end inside a UTF-8 character."""

    def __init__(self, tok: Tokenizer, skip_special: bool = True):
        self.tok = tok
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, tid: int) -> str:
        if self.skip_special and self.tok.token_types[tid] == TOKEN_CONTROL:
            return ""
        return self._dec.decode(self.tok.token_bytes(tid))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
