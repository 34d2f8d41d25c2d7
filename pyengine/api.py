"""Where the chat API is checked: OpenAI-style requests in, ChatCompletion and chunk objects out.

The JavaScript API forwards requests here unchanged, so both APIs reject the same
bad input with the same message, which names the field.
"""

from __future__ import annotations

import os
import time

from .errors import RequestError
from .sampling import SamplingParams
from .tokenizer import clean_text as _clean

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 10_000
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty",
                   "frequency_penalty", "repetition_penalty", "truncation")
ACCEPTED = set(SAMPLING_FIELDS) | {"stream", "stream_options", "model", "n", "user", "logprobs",
                                   "max_completion_tokens", "ignore_eos"}


def parse_request(req, kind: str = "chat") -> tuple[list[dict] | str, SamplingParams, bool, bool]:
    """(messages, or the prompt of a text completion; sampling parameters; stream; include_usage)."""
    if not isinstance(req, dict):
        raise RequestError("request", f"must be an object, got {type(req).__name__}")
    unknown = sorted(set(req) - ACCEPTED - {"messages" if kind == "chat" else "prompt"})
    if unknown:
        raise RequestError(unknown[0], "is not a supported field")
    if kind == "chat":
        messages = _messages(req.get("messages"))
    else:
        messages = req.get("prompt")
        if not isinstance(messages, str) or not messages:
            raise RequestError("prompt", "must be a non-empty string")
        messages = _clean(messages)
    stream = req.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError("stream", f"must be true or false, got {stream!r}")
    include_usage = False
    opts = req.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise RequestError("stream_options", "must be an object with only include_usage")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("stream_options.include_usage", "must be true or false")
    if req.get("n", 1) not in (1, None):
        raise RequestError("n", "only one choice per request is supported")
    if req.get("logprobs"):
        raise RequestError("logprobs", "is not supported")
    fields = {k: req[k] for k in SAMPLING_FIELDS if req.get(k) is not None}
    if req.get("max_completion_tokens") is not None:
        fields.setdefault("max_tokens", req["max_completion_tokens"])
    if req.get("ignore_eos") is not None:
        if not isinstance(req["ignore_eos"], bool):
            raise RequestError("ignore_eos", "must be true or false")
        fields["ignore_eos"] = req["ignore_eos"]
    return messages, SamplingParams(**fields), stream, include_usage


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list):
        raise RequestError("messages", f"must be a list of messages, got {type(messages).__name__}")
    if not messages:
        raise RequestError("messages", "must hold at least one message")
    if len(messages) > MAX_MESSAGES:
        raise RequestError("messages", f"at most {MAX_MESSAGES} messages, got {len(messages)}")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(where, f"must be an object with role and content, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):    # OpenAI content parts: text only
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise RequestError(f"{where}.content[{j}]", "only text parts are supported")
                parts.append(p["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content", f"must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": _clean(content)})
    return out



def new_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


def usage_dict(gen) -> dict:
    u, t = gen.usage, gen.timings
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "extra": {
            "prefill_tokens_per_s": round(t.prefill_tok_s, 3),
            "decode_tokens_per_s": round(t.decode_tok_s, 3),
            "time_to_first_token_s": round(t.ttft_s, 4),
        },
    }


def completion(gen, cid: str, model: str) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                     "finish_reason": gen.finish_reason, "logprobs": None}],
        "usage": usage_dict(gen),
    }


def text_completion(gen, cid: str, model: str) -> dict:
    return {
        "id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": gen.text, "finish_reason": gen.finish_reason, "logprobs": None}],
        "usage": usage_dict(gen),
    }


def chunk(cid: str, model: str, delta: dict | None = None, finish_reason=None, usage=None,
          text: str | None = None) -> dict:
    """A streaming chunk: a chat delta, or with `text` a text-completion piece; with `usage`, the
    closing usage chunk (no choices)."""
    kind = "text_completion" if text is not None else "chat.completion.chunk"
    c = {"id": cid, "object": kind, "created": int(time.time()), "model": model, "choices": []}
    if usage is not None:
        c["usage"] = usage
        return c
    choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if text is not None:
        choice["text"] = text
    else:
        choice["delta"] = delta or {}
    c["choices"].append(choice)
    return c
