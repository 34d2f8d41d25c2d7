"""The chat API's request checks (shared by the Python and JavaScript APIs) and response shapes."""

from __future__ import annotations

import pytest

from pyengine import api
from pyengine.errors import RequestError

OK = {"messages": [{"role": "user", "content": "hi"}]}


def test_a_plain_request():
    messages, params, stream, usage = api.parse_request(
        {**OK, "temperature": 0, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True},
         "stop": "x", "seed": 3, "model": "anything"})
    assert messages == [{"role": "user", "content": "hi"}]
    assert params.greedy and params.max_tokens == 5 and params.stop == ["x"] and params.seed == 3
    assert stream and usage


@pytest.mark.parametrize("req,field", [
    ([], "request"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({**OK, "temperature": float("nan")}, "temperature"),
    ({**OK, "temperature": -1}, "temperature"),
    ({**OK, "top_p": 0}, "top_p"),
    ({**OK, "max_tokens": -3}, "max_tokens"),
    ({**OK, "max_tokens": 10**9}, "max_tokens"),
    ({**OK, "seed": 1.5}, "seed"),
    ({**OK, "stop": ["a"] * 20}, "stop"),
    ({**OK, "stream": "yes"}, "stream"),
    ({**OK, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({**OK, "n": 2}, "n"),
    ({**OK, "tools": []}, "tools"),
])
def test_bad_requests_name_the_field(req, field):
    with pytest.raises(RequestError) as e:
        api.parse_request(req)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_text_parts_and_lone_surrogates():
    messages, *_ = api.parse_request({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b\ud800c"}]}]})
    assert messages[0]["content"] == "ab\ufffdc"


def test_text_completions_need_a_prompt():
    prompt, *_ = api.parse_request({"prompt": "Once"}, kind="text")
    assert prompt == "Once"
    with pytest.raises(RequestError, match="prompt"):
        api.parse_request({"prompt": ""}, kind="text")
    with pytest.raises(RequestError, match="messages"):
        api.parse_request(OK, kind="text")


def test_chunk_shapes():
    c = api.chunk("id", "m", {"content": "x"})
    assert c["object"] == "chat.completion.chunk" and c["choices"][0]["delta"] == {"content": "x"}
    t = api.chunk("id", "m", text="y", finish_reason="stop")
    assert t["object"] == "text_completion" and t["choices"][0] == {"index": 0, "finish_reason": "stop",
                                                                     "logprobs": None, "text": "y"}
    u = api.chunk("id", "m", usage={"total_tokens": 1})
    assert u["choices"] == [] and u["usage"] == {"total_tokens": 1}
