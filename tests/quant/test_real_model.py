"""The real SmolLM2-135M (Q4_1 GGUF, Q8_0 tied head) packed and quantized, against its float32
dequantized run: tokens, logits, resident bytes and perplexity.

Packed execution rounds differently from the float32 path (bf16 activations, bf16 scales, the
Q8_0 head re-quantized to int8 per row), so greedy tokens may part where the reference's top-2
margin is small. Measured on this model (8 prompts x 32 tokens, teacher-forced on the float32
greedy tokens): top-1 agreement 0.97, mean |logit error| 0.15, max 1.8; the greedy tokens
first parted at a reference margin of 0.13. The bounds below leave room for other CPUs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.golden import PROMPTS
from tokenmill.bench.bytes import resident_weight_bytes, weight_bytes_per_step
from tokenmill.eval.perplexity import perplexity, prefill_hidden
from tokenmill.kernels import cpu as cpu_kernels
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

pytestmark = pytest.mark.slow
NEW_TOKENS = 32
TOP1_AGREEMENT = 0.95
MEAN_LOGIT_ERROR = 0.3
MAX_LOGIT_ERROR = 3.0
PACKED_NEAR_TIE = 0.5  # greedy tokens must agree until the reference margin first drops below this
TEXT = Path(__file__).parent / "data" / "declaration_of_independence.txt"
PPL_TOKENS = 1024  # of the text's ~1700: windows of 512 with stride 256 at 0, 256, 512


def _llm(**kw) -> LLM:
    return LLM("smollm2-135m", device="cpu", kv_cache_memory_gb=0.1, max_model_len=1024, show_progress=False, **kw)


@pytest.fixture(scope="module")
def packed():
    return _llm()  # the default: the file's Q4_1 / Q8_0 blocks run packed, bf16 activations


@pytest.fixture(scope="module")
def ppl_ids(llm) -> list[int]:
    return llm.get_tokenizer().encode(TEXT.read_text())[:PPL_TOKENS]


@pytest.fixture(scope="module")
def ppl_float(llm, ppl_ids) -> float:
    assert llm.engine.quantization == "none" and llm.engine.dtype == torch.float32
    return perplexity(llm.engine, ppl_ids).perplexity


def test_default_runs_the_gguf_packed(packed):
    engine = packed.engine
    assert engine.quantization == "gguf" and engine.dtype == torch.bfloat16


def test_packed_logits_and_tokens_follow_the_dequantized_path(llm, packed):
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2)
    ref = llm.generate(PROMPTS, params, use_progress=False)
    ours = packed.generate(PROMPTS, params, use_progress=False)
    agree = total = compared = 0
    errors, worst = [], 0.0
    for prompt, r, o in zip(PROMPTS, ref, ours):
        ids = tok.encode(prompt)
        seq = ids + r.outputs[0].token_ids  # teacher-forced on the reference's tokens
        a = llm.engine.model.compute_logits(prefill_hidden(llm.engine.model, seq))[len(ids) - 1 : -1]
        b = packed.engine.model.compute_logits(prefill_hidden(packed.engine.model, seq))[len(ids) - 1 : -1]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        errors.append(float((a - b).abs().mean()))
        worst = max(worst, float((a - b).abs().max()))
        for step, (x, y) in enumerate(zip(o.outputs[0].token_ids, r.outputs[0].token_ids)):
            top = sorted(r.outputs[0].logprobs[step].values(), reverse=True)
            if top[0] - top[1] < PACKED_NEAR_TIE:
                break
            assert x == y, f"{prompt!r} step {step}: {x} != {y} at reference margin {top[0] - top[1]:.3f}"
            compared += 1
    mean = sum(errors) / len(errors)
    print(f"top-1 agreement {agree / total:.3f}, mean |logit error| {mean:.3f}, max {worst:.2f}; "
          f"{compared} greedy tokens compared before a margin < {PACKED_NEAR_TIE}")
    assert agree / total >= TOP1_AGREEMENT
    assert mean <= MEAN_LOGIT_ERROR and worst <= MAX_LOGIT_ERROR
    assert compared >= len(PROMPTS) * 2


def test_packed_weights_are_the_file_size(llm, packed):
    ref, ours = llm.engine.model, packed.engine.model
    # the file: 98 MB (Q4_1 layers at 5 bits/weight, the Q8_0 table at 8.5); float32: 540 MB
    assert resident_weight_bytes(ours) <= 1.02 * packed.engine.weight_file_bytes
    assert resident_weight_bytes(ours) < 0.2 * resident_weight_bytes(ref)
    assert weight_bytes_per_step(ours) < 0.2 * weight_bytes_per_step(ref)


# bf16 activations alone move perplexity here by about +-0.5%: the dense bf16 model measured
# 18.68 and 18.78 (float32: 18.73) with ulp-level differences in its norm and RoPE kernels, and
# int8 18.84 and 18.97 with the same two; int8's budget allows for that noise
@pytest.mark.parametrize("scheme,budget", [("int8", 0.015), ("int4", 0.10)])
def test_perplexity_of_quantized_weights(scheme, budget, ppl_ids, ppl_float):
    llm = _llm(quantization=scheme, quant_group_size=32)
    got = perplexity(llm.engine, ppl_ids).perplexity
    print(f"{scheme}: perplexity {got:.3f} vs float32 {ppl_float:.3f} ({got / ppl_float - 1:+.2%})")
    assert got <= ppl_float * (1 + budget)


@pytest.mark.skipif(not cpu_kernels.load(), reason="int8 activations run tokenmill's C++ kernels (g++ and ninja)")
def test_perplexity_with_int8_activations(packed, ppl_ids, monkeypatch):
    """TOKENMILL_CPU_INT4_ACTIVATIONS=int8 against the same GGUF with bf16 activations: measured
    18.75 -> 19.08 (+1.8%) on two Zen 3 cores; the budget leaves room for other CPUs."""
    from tokenmill.quant import base
    from tokenmill.quant.int4 import Q8_LAYOUT

    monkeypatch.setenv("TOKENMILL_CPU_INT4_ACTIVATIONS", "int8")
    base.cpu_int4_activations.cache_clear()
    try:
        q8 = _llm()
    finally:
        monkeypatch.delenv("TOKENMILL_CPU_INT4_ACTIVATIONS")
        base.cpu_int4_activations.cache_clear()
    assert q8.engine.model.model.layers[0].self_attn.qkv_proj.cpu_tile == Q8_LAYOUT
    bf16 = perplexity(packed.engine, ppl_ids).perplexity
    got = perplexity(q8.engine, ppl_ids).perplexity
    print(f"int8 activations: perplexity {got:.3f} vs bf16 activations {bf16:.3f} ({got / bf16 - 1:+.2%})")
    assert got <= bf16 * 1.03


def test_perplexity_with_int8_kv_cache(llm, ppl_ids, ppl_float):
    got = perplexity(llm.engine, ppl_ids, kv_cache_dtype="int8").perplexity
    print(f"int8 KV: perplexity {got:.3f} vs {ppl_float:.3f} ({got / ppl_float - 1:+.2%})")
    assert got <= ppl_float * 1.01


def test_int8_kv_cache_generates_and_says_it_holds_twice_the_tokens(packed, caplog):
    logger = logging.getLogger("tokenmill")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="tokenmill"):
            quant = _llm(kv_cache_dtype="int8")  # packed weights, bf16, int8 KV in the same 0.1 GB
    finally:
        logger.removeHandler(caplog.handler)
    assert 1.9 < quant.engine.num_blocks / packed.engine.num_blocks < 2.0
    assert any("1.94x the tokens of bfloat16" in r.getMessage() for r in caplog.records)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = packed.generate(PROMPTS[:2], params, use_progress=False)
    b = quant.generate(PROMPTS[:2], params, use_progress=False)
    assert a[0].outputs[0].token_ids[:4] == b[0].outputs[0].token_ids[:4]
