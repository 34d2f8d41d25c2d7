"""Tokenizers built from GGUF metadata, in pure Python, with llama.cpp's semantics.

Special tokens come out first, as llama.cpp partitions text: each special token in
turn, longest first, splits every piece of text still raw at its occurrences;
user-defined tokens always, control tokens only when the text may name them (chat
templates). What remains is encoded by the vocabulary's model:
  - `gpt2`: byte-level BPE. Text is split into pre-tokens (the model's
    `tokenizer.ggml.pre` rule, written out by hand because Pyodide has no `regex`
    module offline), each pre-token is mapped to byte-level symbols and merged by rank.
  - `llama`: SentencePiece BPE (Gemma, Llama 2, Phi-3). Spaces become U+2581, then
    adjacent pieces merge, the highest-scoring merge first (the leftmost on ties),
    and a piece missing from the vocabulary falls back to byte tokens <0xXX>.
"""

from __future__ import annotations

import codecs
import heapq
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


TOKENIZER_MODELS = ("gpt2", "llama")

PRE_TOKENIZERS = {
    "default": split_gpt2,
    "gpt2": split_gpt2,
    "smollm": split_smollm,
}


ASCII_SPACE = " \t\n\x0b\x0c\r"   # C isspace(), what llama.cpp strips around special tokens
SPIECE_SPACE = "\u2581"


class Tokenizer:
    """The vocabulary, its special tokens and decoding; `from_gguf` picks the model (BPE or SentencePiece)."""

    model = "abstract"

    def __init__(self, tokens: list[str], token_types: list[int] | None, bos_id: int | None = None,
                 eos_id: int | None = None, eot_ids: tuple[int, ...] = (), add_bos: bool = False,
                 unk_id: int | None = None, rstrip_special: bool = False):
        self.tokens = tokens
        self.vocab = {t: i for i, t in enumerate(tokens)}
        types = token_types or [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise UnsupportedModelError(f"the GGUF lists {len(tokens)} tokens but {len(types)} token types")
        self.token_types = types
        # llama.cpp's special tokens: control, user-defined and unknown, longest first
        self._special_order = sorted((i for i, t in enumerate(types)
                                      if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN) and tokens[i]),
                                     key=lambda i: -len(tokens[i]))
        self.special = {tokens[i]: i for i in self._special_order}
        self._rstrip = rstrip_special
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.unk_id = unk_id
        self.stop_ids = frozenset(i for i in (eos_id, *eot_ids) if i is not None)
        # bytes each token decodes to (control tokens decode to their text)
        self._bytes = [self._token_bytes(i) for i in range(len(tokens))]

    @classmethod
    def from_gguf(cls, gguf) -> "Tokenizer":
        model = gguf.get("tokenizer.ggml.model")
        if model is None:
            raise UnsupportedModelError("the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
        if model not in TOKENIZER_MODELS:
            raise UnsupportedModelError(
                f"tokenizer model '{model}' is not supported; supported: gpt2 (byte-level BPE), "
                f"llama (SentencePiece BPE)")
        tokens = gguf.require("tokenizer.ggml.tokens")
        index = {}
        for name in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
            for i, t in enumerate(tokens):
                if t == name:
                    index[name] = i
                    break
        eot = []
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
            if gguf.get(key) is not None:
                eot.append(gguf.get(key))
        # chat models end a turn with their end-of-turn token even when the GGUF names another EOS
        eot += index.values()
        name = str(gguf.get("general.name") or "").lower()
        common = dict(
            tokens=tokens,
            token_types=gguf.get("tokenizer.ggml.token_type"),
            bos_id=gguf.get("tokenizer.ggml.bos_token_id"),
            eos_id=gguf.get("tokenizer.ggml.eos_token_id"),
            eot_ids=tuple(eot),
            unk_id=gguf.get("tokenizer.ggml.unknown_token_id"),
            # as llama.cpp does for Phi-3: whitespace after a special token is not text
            rstrip_special="phi-3" in name or "phi3" in name,
        )
        if model == "gpt2":
            return BPETokenizer(merges=gguf.get("tokenizer.ggml.merges") or [],
                                pre=gguf.get("tokenizer.ggml.pre", "default"),
                                add_bos=bool(gguf.get("tokenizer.ggml.add_bos_token", False)), **common)
        return SPMTokenizer(scores=gguf.get("tokenizer.ggml.scores"),
                            add_bos=bool(gguf.get("tokenizer.ggml.add_bos_token", True)),
                            add_space_prefix=bool(gguf.get("tokenizer.ggml.add_space_prefix", True)), **common)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _token_bytes(self, i: int) -> bytes:
        raise NotImplementedError

    # -- encoding --------------------------------------------------------------

    def _partition(self, text: str, parse_special: bool) -> list:
        """Text pieces (str) and special token ids (int), as llama.cpp's tokenizer_st_partition."""
        frags: list = [text]
        for tid in self._special_order:
            if not parse_special and self.token_types[tid] != TOKEN_USER_DEFINED:
                continue
            t = self.tokens[tid]
            if t not in text:
                continue
            rstrip = self._rstrip and self.token_types[tid] == TOKEN_CONTROL
            out = []
            for f in frags:
                if isinstance(f, int) or t not in f:
                    out.append(f)
                    continue
                start = 0
                while True:
                    i = f.find(t, start)
                    if i < 0:
                        break
                    if i > start:
                        out.append(f[start:i])
                    out.append(tid)
                    start = i + len(t)
                    if rstrip:
                        while start < len(f) and f[start] in ASCII_SPACE:
                            start += 1
                if start < len(f):
                    out.append(f[start:])
            frags = out
        return frags

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`. Control tokens written in the text are kept whole when
        `parse_special` (as chat templates need); user-defined ones always; a BOS is added
        when the model asks for one, or as `add_bos` says."""
        out: list[int] = []
        if add_bos if add_bos is not None else self.add_bos:
            if self.bos_id is not None:
                out.append(self.bos_id)
        prev_special = True
        for f in self._partition(text, parse_special) if self._special_order else [text]:
            if isinstance(f, int):
                out.append(f)
                prev_special = True
            else:
                self._encode_text(f, out, prev_special)
                prev_special = False
        return out

    def _encode_text(self, text: str, out: list[int], after_special: bool) -> None:
        raise NotImplementedError

    # -- decoding --------------------------------------------------------------

    def token_bytes(self, tid: int) -> bytes:
        return self._bytes[tid]

    def decode(self, ids, skip_special: bool = False) -> str:
        data = b"".join(self._bytes[i] for i in ids
                        if not (skip_special and self.token_types[i] == TOKEN_CONTROL))
        return data.decode("utf-8", errors="replace")

    def detokenizer(self, skip_special: bool = True) -> "Detokenizer":
        return Detokenizer(self, skip_special)


class BPETokenizer(Tokenizer):
    """Byte-level BPE (`tokenizer.ggml.model = gpt2`)."""

    model = "gpt2"

    def __init__(self, tokens: list[str], token_types: list[int] | None, merges: list[str],
                 pre: str = "default", **kw):
        if pre not in PRE_TOKENIZERS:
            raise UnsupportedModelError(
                f"pre-tokenizer '{pre}' is not supported; supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        self._split = PRE_TOKENIZERS[pre]
        self.ranks = {}
        for rank, m in enumerate(merges):
            a, sep, b = m.partition(" ")
            if sep:
                self.ranks[(a, b)] = rank
        self._cache: dict[str, list[int]] = {}
        super().__init__(tokens, token_types, **kw)

    def _token_bytes(self, i: int) -> bytes:
        t = self.tokens[i]
        if self.token_types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            return t.encode("utf-8", "surrogateescape")
        try:
            return bytes(UNICODE_TO_BYTE[c] for c in t)
        except KeyError:
            return t.encode("utf-8", "surrogateescape")

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

    def _encode_text(self, text: str, out: list[int], after_special: bool) -> None:
        words: list[str] = []
        self._split(text, words)
        for w in words:
            out.extend(self._bpe(w))


class SPMTokenizer(Tokenizer):
    """SentencePiece BPE (`tokenizer.ggml.model = llama`), as llama.cpp's llm_tokenizer_spm."""

    model = "llama"

    def __init__(self, tokens: list[str], token_types: list[int] | None, scores: list[float] | None,
                 add_space_prefix: bool = True, **kw):
        if scores is None or len(scores) != len(tokens):
            raise UnsupportedModelError("a SentencePiece vocabulary needs a score per token "
                                        "(tokenizer.ggml.scores is missing or of the wrong length)")
        self.scores = scores
        self.add_space_prefix = add_space_prefix
        super().__init__(tokens, token_types, **kw)
        self._byte_ids = [self.vocab.get(f"<0x{b:02X}>", self.vocab.get(chr(b), unk))
                          for b, unk in ((b, self.unk_id) for b in range(256))]

    def _token_bytes(self, i: int) -> bytes:
        t, ty = self.tokens[i], self.token_types[i]
        if ty == TOKEN_BYTE and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            return bytes([int(t[3:5], 16)])
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            return t.encode("utf-8", "surrogateescape")
        if ty == TOKEN_UNKNOWN:
            return "\u2585".encode()     # what llama.cpp prints for an unknown piece
        return t.replace(SPIECE_SPACE, " ").encode("utf-8", "surrogateescape")

    def _encode_text(self, text: str, out: list[int], after_special: bool) -> None:
        if self.add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", SPIECE_SPACE)
        n = len(text)
        if not n:
            return
        vocab, scores = self.vocab, self.scores
        # symbols: one per character, a linked list in arrays; merged ones have length 0
        length = [1] * n
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        heap: list = []

        def bigram(left: int, right: int):
            if left < 0 or right < 0:
                return
            piece = text[left:left + length[left] + length[right]]
            tid = vocab.get(piece)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, len(piece)))

        for i in range(1, n):
            bigram(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if not length[left] or not length[right] or length[left] + length[right] != size:
                continue      # one side merged elsewhere since this pair was seen
            length[left] += length[right]
            length[right] = 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            bigram(prev[left], left)
            bigram(left, nxt[left])
        i = 0
        while i != -1:
            piece = text[i:i + length[i]]
            tid = vocab.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._byte_ids[b] for b in piece.encode("utf-8", "surrogatepass"))
            i = nxt[i]


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
