"""Chat templates: the model's own jinja2 template from the GGUF, rendered in a sandbox."""

from __future__ import annotations

import datetime

from .errors import TemplateError


def _raise(message):
    raise TemplateError(f"the chat template refused the messages: {message}")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the chat template is broken: {e.message} (line {e.lineno})") from None

    @classmethod
    def from_gguf(cls, gguf, tokenizer=None, override: str | None = None) -> "ChatTemplate":
        source = override if override is not None else gguf.get("tokenizer.chat_template")
        if not source:
            raise TemplateError(
                "this model has no chat template in its GGUF; send plain text (--raw) "
                "or supply a template (--chat-template FILE)")
        bos = eos = ""
        if tokenizer is not None:
            if tokenizer.bos_id is not None:
                bos = tokenizer.tokens[tokenizer.bos_id]
            if tokenizer.eos_id is not None:
                eos = tokenizer.tokens[tokenizer.eos_id]
        return cls(source, bos, eos)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        import jinja2

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed to render: {e}") from None
        except Exception as e:  # a template is code from the model file: any failure is its own
            raise TemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from None


def _tojson(value, indent=None):
    import json

    return json.dumps(value, ensure_ascii=False, indent=indent)
