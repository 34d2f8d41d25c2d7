"""The pure-Python BPE tokenizer against HF `tokenizers` built from the same vocabulary and merges."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from hard_strings import HARD_STRINGS
from pyengine.gguf import read_gguf
from pyengine.tokenizer import TOKEN_CONTROL, Tokenizer


@pytest.fixture(scope="module")
def gguf(model_path):
    return read_gguf(model_path)


@pytest.fixture(scope="module")
def tok(gguf):
    return Tokenizer.from_gguf(gguf)


@pytest.fixture(scope="module")
def hf(gguf):
    """SmolLM2's original tokenizer.json pipeline: digits split one by one, then GPT-2 byte-level BPE."""
    tokens = gguf.metadata["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in gguf.metadata["tokenizer.ggml.merges"]]
    t = HFTokenizer(models.BPE(vocab={s: i for i, s in enumerate(tokens)}, merges=merges))
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    t.decoder = decoders.ByteLevel()
    types = gguf.metadata["tokenizer.ggml.token_type"]
    t.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                          for i, ty in enumerate(types) if ty == TOKEN_CONTROL])
    return t


@pytest.mark.parametrize("text", HARD_STRINGS, ids=[f"s{i}" for i in range(len(HARD_STRINGS))])
def test_hard_strings_match_reference(tok, hf, text):
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_long_mixed_document_matches_reference(tok, hf):
    text = "\n".join(HARD_STRINGS) * 3
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


ALPHABET = st.sampled_from(list(
    " \t\n\r\x0b\x0c\x85\xa0\u2000\u3000\u1680\u202f\u205f\x1c\x1d\x00'sStdmlrev0123456789½²٣aZéßü中文😀👍"
    "\u200d\u0301!?.,-_<|>#/\\\"") + ["<|im_start|>", "<|im_end|>", "'ll", "'re", "  ", "\r\n"])


@settings(max_examples=400, deadline=None)
@given(st.lists(ALPHABET, max_size=30).map("".join))
def test_fuzzed_strings_match_reference(tok, hf, text):
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_arbitrary_unicode_matches_reference(tok, hf, text):
    text = text.encode("utf-8", "replace").decode("utf-8")   # no lone surrogates: HF cannot take them
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", HARD_STRINGS, ids=[f"s{i}" for i in range(len(HARD_STRINGS))])
def test_decode_round_trips(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids_only_when_exact(tok):
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert 1 not in tok.encode("<|im_start")
    assert 1 not in tok.encode("< |im_start|>")
    assert tok.encode("<|im_start|>", parse_special=False) != [1]


def test_incremental_detokenizer_never_splits_a_character(tok):
    text = "héllo 😀👍🏽 👩‍👩‍👧‍👦 中文 ok"
    ids = tok.encode(text)
    # the emoji need several byte-level tokens each: make sure the test exercises that
    assert any(not tok.token_bytes(i).decode("utf-8", "ignore") for i in ids)
    d = tok.detokenizer()
    pieces = [d.add(i) for i in ids] + [d.flush()]
    for p in pieces:
        p.encode("utf-8")   # no lone surrogates or halves
        assert "\ufffd" not in p
    assert "".join(pieces) == text


def test_detokenizer_skips_control_tokens_and_replaces_invalid_bytes(tok):
    d = tok.detokenizer()
    assert d.add(1) == ""
    # a lone continuation byte can never complete: it becomes U+FFFD at the latest on flush
    bad = [tok.vocab[ch] for ch in ("\u0100",)]   # byte 0x00 in byte-level form
    assert d.add(bad[0]) == "\x00"
    lone = tok.vocab.get("Ģ")                        # byte 0x80 alone
    out = d.add(lone) + d.flush()
    assert out == "\ufffd"


def test_cli_tokenize_prints_json(model_path, tok):
    text = "Hello world 123, <|im_end|>!"
    out = subprocess.run([sys.executable, "-m", "pyengine", "tokenize", "--model", model_path, text],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == tok.encode(text)


def test_unsupported_tokenizer_is_named(tiny_llama):
    from pyengine.errors import UnsupportedModelError

    g = read_gguf(tiny_llama)
    g.metadata["tokenizer.ggml.model"] = "bert"
    with pytest.raises(UnsupportedModelError, match="tokenizer model 'bert'"):
        Tokenizer.from_gguf(g)
    g.metadata["tokenizer.ggml.model"] = "gpt2"
    g.metadata["tokenizer.ggml.pre"] = "mystery"
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer 'mystery'"):
        Tokenizer.from_gguf(g)


# -- SentencePiece vocabularies (tokenizer.ggml.model = llama): Gemma 3 ------------------------------

@pytest.fixture(scope="module")
def gemma_tok(gemma_path):
    return Tokenizer.from_gguf(read_gguf(gemma_path))


@pytest.fixture(scope="module")
def gemma_hf(gemma_path):
    """An independent SentencePiece-BPE: HF `tokenizers` BPE whose merges are the vocabulary's pieces
    ordered by score (the standard conversion), byte fallback, spaces as U+2581, and the user-defined
    and control tokens as added tokens. It agrees with llama.cpp on this corpus."""
    from tokenizers import normalizers

    g = read_gguf(gemma_path)
    tokens, scores = g.get("tokenizer.ggml.tokens"), g.get("tokenizer.ggml.scores")
    types = g.get("tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for piece, pid in vocab.items():
        if types[pid] == 1:
            for k in range(1, len(piece)):
                left, right = piece[:k], piece[k:]
                if left in vocab and right in vocab:
                    merges.append((-scores[pid], vocab[left], vocab[right], left, right))
    merges.sort()
    t = HFTokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], byte_fallback=True,
                               unk_token="<unk>", fuse_unk=True))
    t.normalizer = normalizers.Replace(" ", "\u2581")
    t.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i, ty in enumerate(types) if ty == 4])
    t.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                          for i, ty in enumerate(types) if ty == TOKEN_CONTROL])
    return t


GEMMA_EXTRA = ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "a    b\t\t\tc\n\n\nd",
               "<table><tr><td>x</td></tr></table>", "\u2581already escaped", "x" * 1000 + " y"]


@pytest.mark.parametrize("text", HARD_STRINGS + GEMMA_EXTRA,
                         ids=[f"s{i}" for i in range(len(HARD_STRINGS) + len(GEMMA_EXTRA))])
def test_sentencepiece_hard_strings_match_reference(gemma_tok, gemma_hf, text):
    assert gemma_tok.encode(text, add_bos=False) == gemma_hf.encode(text, add_special_tokens=False).ids


GEMMA_ALPHABET = st.one_of(ALPHABET, st.sampled_from(["<start_of_turn>", "<eos>", "<td>", "\n\n", "   ", "\t\t",
                                                      "\u2581", "<0x41>"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(GEMMA_ALPHABET, max_size=30).map("".join))
def test_sentencepiece_fuzzed_strings_match_reference(gemma_tok, gemma_hf, text):
    assert gemma_tok.encode(text, add_bos=False) == gemma_hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_sentencepiece_arbitrary_unicode_matches_reference(gemma_tok, gemma_hf, text):
    text = text.encode("utf-8", "replace").decode("utf-8")
    assert gemma_tok.encode(text, add_bos=False) == gemma_hf.encode(text, add_special_tokens=False).ids


def test_sentencepiece_decodes_bytes_and_spaces_and_adds_bos(gemma_tok):
    text = "Hello  world 😀 \x07 ünï"
    ids = gemma_tok.encode(text)
    assert ids[0] == gemma_tok.bos_id and gemma_tok.decode(ids[1:]) == text
    assert gemma_tok.encode("<start_of_turn>", add_bos=False, parse_special=False) != \
        gemma_tok.encode("<start_of_turn>", add_bos=False)          # control tokens only when asked for
    assert gemma_tok.encode("<table>", add_bos=False, parse_special=False) == [gemma_tok.vocab["<table>"]]
