"""The offline API on the real model: sampling controls, stops, streaming, n, bad requests."""

from __future__ import annotations

import pytest

from tokenmill.config import ConfigError, EngineConfig
from tokenmill.sampling_params import InvalidRequestError, SamplingParams

pytestmark = pytest.mark.slow
PROMPT = "Once upon a time, there was a little robot who"


def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=1234, ignore_eos=True)
    alone = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    again = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=7, max_tokens=16, ignore_eos=True)]
    batch = llm.generate(["Hello there", "1, 2, 3,", PROMPT, "The sky"], [others[0], others[1], params, others[2]])
    assert alone == again == batch[2].outputs[0].token_ids
    different = llm.generate(PROMPT, SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=99,
                                                    ignore_eos=True))[0].outputs[0].token_ids
    assert different != alone


def test_top_k_1_equals_greedy(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    top1 = llm.generate(PROMPT, SamplingParams(temperature=1.3, top_k=1, max_tokens=16))[0].outputs[0]
    assert top1.token_ids == greedy.token_ids and top1.text == greedy.text


def test_stop_string_is_honoured_and_never_emitted(llm):
    full = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))[0].outputs[0].text
    words = full.split()
    stop = words[len(words) // 2]  # a word from the middle of the greedy continuation
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert stop not in out.text and full.startswith(out.text)
    kept = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop],
                                               include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == out.text + stop
    streamed = "".join(o.outputs[0].delta for o in llm.stream(PROMPT, SamplingParams(
        temperature=0, max_tokens=40, ignore_eos=True, stop=[stop])))
    assert streamed == out.text


def test_stop_token_ids_and_max_tokens(llm):
    greedy = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert len(greedy.token_ids) == 12 and greedy.finish_reason == "length"
    target = greedy.token_ids[5]
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                              stop_token_ids=[target]))[0].outputs[0]
    assert out.token_ids == greedy.token_ids[: greedy.token_ids.index(target) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_chat_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0, max_tokens=64))[0]
    o = out.outputs[0]
    assert o.finish_reason == "stop" and o.text.strip() and "<|im_end|>" not in o.text


def test_n_samples_and_streaming_matches_generate(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    params = SamplingParams(temperature=0, max_tokens=20)
    text = llm.generate(PROMPT, params)[0].outputs[0].text
    assert "".join(o.outputs[0].delta for o in llm.stream(PROMPT, params)) == text


@pytest.mark.parametrize("stop", [None, [". "]], ids=["deferred-text", "stop-string"])
def test_final_only_gives_one_output_equal_to_the_cumulative_last(llm, stop):
    """A final_only request yields one output, when it finishes, equal to the last of its
    cumulative twin (text decoded once at the end where no stop string needs it per step)."""
    engine = llm.engine
    outs: dict[str, list] = {"cum": [], "fin": []}
    for kind, rid in (("cumulative", "cum"), ("final_only", "fin")):
        params = SamplingParams(temperature=0, max_tokens=24, logprobs=2, stop=stop, ignore_eos=True,
                                output_kind=kind)
        engine.add_request(rid, PROMPT, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
    assert len(outs["cum"]) > 1 and len(outs["fin"]) == 1 and outs["fin"][0].finished
    a, b = outs["cum"][-1].outputs[0], outs["fin"][0].outputs[0]
    assert (b.text, b.token_ids, b.finish_reason, b.stop_reason, b.logprobs) == \
        (a.text, a.token_ids, a.finish_reason, a.stop_reason, a.logprobs)
    assert b.text and (b.delta, b.delta_token_ids) == (b.text, b.token_ids)  # all of it in the one output


@pytest.mark.parametrize("stop", [None, [". "]], ids=["no-stop", "stop-string"])
def test_delta_outputs_add_up_to_the_cumulative_ones(llm, stop):
    """A "delta" request yields, step for step, what its cumulative twin adds: the concatenation
    of its texts, token ids and logprobs up to any step is that step's cumulative output, and
    num_output_tokens counts the tokens so far in both kinds."""
    engine = llm.engine
    outs: dict[str, list] = {"cumulative": [], "delta": []}
    for kind in outs:
        engine.add_request(kind, PROMPT, SamplingParams(temperature=0, max_tokens=24, logprobs=2, stop=stop,
                                                        ignore_eos=True, output_kind=kind))
    seen = []  # a cumulative output's logprobs list grows with the request: keep each step's
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
            if out.request_id == "cumulative":
                seen.append(list(out.outputs[0].logprobs))
    assert len(outs["delta"]) == len(outs["cumulative"]) > 1
    text, ids, logprobs = "", [], []
    for cum, part, cum_logprobs in zip(outs["cumulative"], outs["delta"], seen):
        a, d = cum.outputs[0], part.outputs[0]
        assert (d.text, d.token_ids) == (d.delta, d.delta_token_ids) == (a.delta, a.delta_token_ids)
        text, ids, logprobs = text + d.text, ids + d.token_ids, logprobs + d.logprobs
        assert (text, ids, logprobs) == (a.text, a.token_ids, cum_logprobs)
        assert d.num_output_tokens == a.num_output_tokens == len(a.token_ids)
        assert (d.finish_reason, d.stop_reason, d.cumulative_logprob, part.finished) == \
            (a.finish_reason, a.stop_reason, a.cumulative_logprob, cum.finished)
    assert part.finished and text


def test_logprobs_are_consistent(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token] == max(entry.values())  # greedy picks the top token
        assert all(lp <= 0 for lp in entry.values())


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
     ({"max_tokens": 0}, "max_tokens"), ({"logprobs": 99}, "logprobs"), ({"stop": [""]}, "stop"),
     ({"presence_penalty": 3}, "presence_penalty"), ({"n": 0}, "n"), ({"min_p": 2}, "min_p"),
     ({"temperature": float("nan")}, "temperature"), ({"repetition_penalty": float("nan")}, "repetition_penalty"),
     ({"top_p": float("inf")}, "top_p"), ({"output_kind": "deltas"}, "output_kind")],
)
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=f"invalid {field}="):
        SamplingParams(**kwargs)


def test_bad_request_fails_alone(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    engine.add_request("good", PROMPT, params)
    engine.step()
    with pytest.raises(InvalidRequestError, match="context window"):
        engine.add_request("too-long", list(range(100, 100 + engine.max_model_len)), params)
    with pytest.raises(InvalidRequestError, match="prompt_token_ids must be integers"):
        engine.add_request("bad-ids", [1, 2, 10**9], params)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], params)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request("good", PROMPT, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final.request_id == "good" and final.outputs[0].token_ids == expected
    assert engine.kv.pool.num_used == 0 or engine.scheduler.num_unfinished == 0


def test_generate_rejects_a_bad_prompt_and_leaves_nothing_behind(llm):
    with pytest.raises(InvalidRequestError, match="prompt 1: .*context window"):
        llm.generate([PROMPT, {"prompt_token_ids": [5] * 5000}], SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(llm):
    engine = llm.engine
    engine.add_request("to-abort", PROMPT * 20, SamplingParams(max_tokens=50))
    engine.step()
    assert engine.kv.pool.num_used > 0
    engine.abort_request("to-abort")
    assert not engine.has_unfinished_requests() and engine.kv.pool.num_used == 0


def test_bad_engine_config():
    with pytest.raises(ConfigError, match="dtype"):
        EngineConfig(dtype="float8")
    with pytest.raises(ConfigError, match="device"):
        EngineConfig(device="tpu")
    with pytest.raises(ConfigError, match=r"^device='cuda:1' with tensor_parallel_size 2: .*CUDA_VISIBLE_DEVICES$"):
        EngineConfig(device="cuda:1", tensor_parallel_size=2)
