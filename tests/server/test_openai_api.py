"""The OpenAI API through the official client: completions, chat, streaming, n, logprobs, stop,
seeds, usage equal to the tokenizer's counts, models, tokenize, health and metrics."""

from __future__ import annotations

import pytest

from tests.server.conftest import MAX_MODEL_LEN, MODEL

pytestmark = pytest.mark.slow
PROMPT = "Once upon a time, there was a little robot who"
CHAT = [{"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue?"}]


def _stream_text(stream) -> tuple[dict[int, str], dict[int, str], object]:
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, usage


def test_completion_usage_matches_the_tokenizer_and_streaming_matches(server, tokenizer):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and choice.text
    assert out.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.usage.prompt_tokens_details.cached_tokens >= 0

    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: choice.text} and reasons == {0: "length"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (out.usage.prompt_tokens, 12)


def test_chat_uses_the_model_template_and_streams(server, tokenizer):
    client = server.client()
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=16, temperature=0)
    msg = out.choices[0].message
    assert out.object == "chat.completion" and msg.role == "assistant" and msg.content
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(CHAT))
    tok = server.post("/tokenize", {"model": MODEL, "messages": CHAT}).json()
    assert tok["count"] == out.usage.prompt_tokens and tok["max_model_len"] == MAX_MODEL_LEN
    assert out.usage.completion_tokens <= 16

    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    texts, reasons, usage = _stream_text(stream)
    assert texts == {0: msg.content} and reasons == {0: out.choices[0].finish_reason}
    assert usage.completion_tokens == out.usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 16  # the template's prefix is cached by now


def test_n_choices_batched_prompts_and_seeds(server):
    client = server.client()
    kw = {"model": MODEL, "prompt": PROMPT, "max_tokens": 10, "temperature": 0.9, "top_p": 0.95, "seed": 1234,
              "extra_body": {"ignore_eos": True}}
    one = client.completions.create(**kw)
    assert one.choices[0].text == client.completions.create(**kw).choices[0].text  # reproducible
    other = client.completions.create(**(kw | {"seed": 99})).choices[0].text
    assert other != one.choices[0].text
    three = client.completions.create(n=3, **kw)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].text == one.choices[0].text  # choice k is seeded with seed + k
    assert len({c.text for c in three.choices}) > 1
    assert three.usage.completion_tokens == 30 and three.usage.prompt_tokens == one.usage.prompt_tokens

    prompts = ["The capital of France is", "Water boils at a temperature of"]
    stream = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    texts, reasons, _ = _stream_text(stream)
    assert sorted(texts) == [0, 1, 2, 3] and set(reasons.values()) == {"length"}
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: the n samples agree
    alone = client.completions.create(model=MODEL, prompt=prompts[1], max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert texts[2] == alone.choices[0].text


def test_logprobs_completions_and_chat(server):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == out.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and value <= 0
        assert value == pytest.approx(max(top.values()))  # greedy picks the top token
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token

    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1,
                                       stream=True, extra_body={"ignore_eos": True})
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert streamed == lp.tokens


def test_stop_strings_and_stop_reason(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    words = full.split()
    stop = words[len(words) // 2]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and stop not in out.text and full.startswith(out.text)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                       stream=True, extra_body={"ignore_eos": True})
    texts, reasons, _ = _stream_text(stream)
    assert texts == {0: out.text} and reasons == {0: "stop"}


def test_prefix_cache_hits_are_reported_as_cached_tokens(server):
    client = server.client()
    prompt = "A long shared preamble that spans several KV blocks. " * 6 + "Question: what is two plus two?"
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 16 <= cached < second.usage.prompt_tokens and cached % 16 == 0


def test_models_tokenize_detokenize_health_metrics(server, tokenizer):
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    tok = server.post("/tokenize", {"prompt": PROMPT}).json()
    assert tok["tokens"] == tokenizer.encode(PROMPT) and tok["count"] == len(tok["tokens"])
    assert server.post("/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": PROMPT}
    import httpx

    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = server.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "prompt_tokens_total", "generation_tokens_total", "num_preemptions_total",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count", "decode_bandwidth_gb_per_s", "decode_bytes_total"):
        assert f"tokenmill:{name}" in m, name
    assert m["tokenmill:time_to_first_token_seconds_count"] > 0
    assert m["tokenmill:generation_tokens_total"] > 0 and m["tokenmill:decode_bandwidth_gb_per_s"] > 0
    assert m['tokenmill:request_success_total{finished_reason="length"}'] > 0


def test_echo_and_chat_choices_stream_each_with_its_role(server):
    client = server.client()
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert out.choices[0].text == PROMPT + plain.choices[0].text
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "Be brief."},
                                                                   {"role": "user", "content": "Hi"}],
                                            n=2, max_tokens=4, temperature=0, stream=True)
    roles = {}
    texts, reasons = {}, {}
    for chunk in stream:
        for c in chunk.choices:
            if c.delta.role:
                roles[c.index] = c.delta.role
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    assert roles == {0: "assistant", 1: "assistant"} and texts[0] == texts[1] and set(reasons.values()) <= {
        "stop", "length"}
