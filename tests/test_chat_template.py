"""Chat templates come from the GGUF and render in a sandbox; missing or broken ones are named."""

from __future__ import annotations

import pytest

from pyengine.chat_template import ChatTemplate
from pyengine.errors import TemplateError
from pyengine.gguf import read_gguf
from pyengine.tokenizer import Tokenizer


def test_smollm2_template_renders_chatml_with_generation_prompt(model_path):
    g = read_gguf(model_path)
    t = ChatTemplate.from_gguf(g, Tokenizer.from_gguf(g))
    text = t.render([{"role": "user", "content": "Hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = t.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                     {"role": "assistant", "content": "A"}, {"role": "user", "content": "V"}])
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n")
    assert text.endswith("<|im_start|>user\nV<|im_end|>\n<|im_start|>assistant\n")


def test_template_tokens_use_special_ids(model_path):
    g = read_gguf(model_path)
    tok = Tokenizer.from_gguf(g)
    ids = tok.encode(ChatTemplate.from_gguf(g, tok).render([{"role": "user", "content": "Hi"}]))
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2


def test_model_without_template_is_a_clear_error(model_path):
    g = read_gguf(model_path)
    del g.metadata["tokenizer.chat_template"]
    with pytest.raises(TemplateError, match="no chat template"):
        ChatTemplate.from_gguf(g)


def test_template_can_be_supplied(model_path):
    g = read_gguf(model_path)
    del g.metadata["tokenizer.chat_template"]
    t = ChatTemplate.from_gguf(g, override="{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert t.render([{"role": "user", "content": "x"}]) == "[user]x"


def test_broken_template_is_a_clear_error():
    with pytest.raises(TemplateError, match="broken"):
        ChatTemplate("{% for m in messages %}{{ m.content }")


def test_template_failures_at_render_are_template_errors():
    t = ChatTemplate("{{ raise_exception('only user and assistant roles') }}")
    with pytest.raises(TemplateError, match="only user and assistant roles"):
        t.render([])
    t = ChatTemplate("{{ messages[5]['content'] }}")
    with pytest.raises(TemplateError, match="failed to render"):
        t.render([{"role": "user", "content": "x"}])


def test_template_is_sandboxed():
    t = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        t.render([])
