"""Client mistakes get OpenAI-shaped errors with the right status and the field named; none is a 500."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.server.conftest import KEYS, MAX_MODEL_LEN, MODEL

pytestmark = pytest.mark.slow


def _error(response: httpx.Response, status: int, param: str | None = "ANY") -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "ANY":
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, "model"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/v1/completions", {"prompt": ["a"] * 20, "n": 100}, "n"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}, "seed"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias"),
    ("/v1/completions", {"max_tokens": 5}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [-1, 5]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [10**9]]}, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**30}, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * (MAX_MODEL_LEN + 10)}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6},
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/detokenize", {"tokens": [10**9]}, "tokens"),
])
def test_invalid_values_are_400_naming_the_field(server, path, body, param):
    _error(server.post(path, body), 400, param)


@pytest.mark.parametrize("raw", [b'{"prompt": "hi",', b"[1, 2]", b'"text"', b"null", b"\xff\xfe",
                                 b'{"prompt": "hi", "temperature": NaN}', b"[" * 100_000 + b"]" * 100_000,
                                 b""])
def test_malformed_bodies_are_400(server, raw):
    response = httpx.post(server.base_url + "/completions", content=raw, timeout=60,
                          headers={"Authorization": f"Bearer {KEYS['alice']}", "Content-Type": "application/json"})
    _error(response, 400)


def test_missing_or_wrong_key_is_401_before_anything_else(server):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS["alice"]}):
        response = httpx.post(server.base_url + "/completions", content=b"{not json", headers=headers)
        assert _error(response, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client(key="sk-wrong").models.list()
    for path in ("/v1/models",):
        _error(httpx.get(server.url + path), 401)
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200


def test_unknown_route_and_method_in_openai_shape(server):
    _error(httpx.get(server.url + "/v1/nothing"), 404)
    _error(httpx.get(server.base_url + "/completions"), 405)


def test_openai_client_raises_bad_request_with_the_param(server):
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model=MODEL, prompt="hi", max_tokens=MAX_MODEL_LEN)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["param"] == "model"
