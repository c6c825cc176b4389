"""The eager CPU decode plan (model/eager_plan.py) computes what the modules compute, bit for
bit: the same engine generates the same greedy tokens with the same log-probs with the plan and
without it, for every kind of layer and KV pool the plan resolves differently, and through the
one-call C++ loop (kernels/csrc/decode_layers.cpp) where the layers qualify for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import VOCAB, randomize_, save_hf_tokenizer
from tokenmill.attention.paged import AttentionMetadata
from tokenmill.llm import LLM
from tokenmill.model.eager_plan import EagerPlan
from tokenmill.sampling_params import SamplingParams

PROMPTS = [{"prompt_token_ids": [5, 17, 300, 4000, 12]}, {"prompt_token_ids": list(range(900, 940))}]


COMMON = {"vocab_size": VOCAB, "max_position_embeddings": 512, "tie_word_embeddings": False,
          "bos_token_id": 1, "eos_token_id": 2, "num_key_value_heads": 2}


def _checkpoint(tmp_path_factory, name: str, model, seed: int) -> Path:
    """A Hugging Face directory of `model` with random weights and the real tokenizer."""
    d = tmp_path_factory.mktemp(name)
    randomize_(model, seed=seed)
    model.float().save_pretrained(str(d))
    save_hf_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2-shaped checkpoint (q/k/v bias) whose merged qkv (96 + 2 x 32 rows), o_proj and
    down_proj (96 rows) are not whole 64-row int4 tiles: their packed outputs carry padding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                         rope_theta=1e6, **COMMON)
    return _checkpoint(tmp_path_factory, "qwen2-padded", Qwen2ForCausalLM(config), seed=3)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A llama checkpoint whose int4 projections are whole 64-row tiles (qkv 128 + 2 x 64 rows,
    o_proj and down_proj 128, gate/up 2 x 256), head dim 32: the C++ loop's case."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                         **COMMON)
    return _checkpoint(tmp_path_factory, "llama-tiles", LlamaForCausalLM(config), seed=4)


def _with_and_without_plan(llm: LLM) -> tuple[list, list]:
    runner = llm.engine.runner
    plan = runner.eager_plan
    assert plan is not None and isinstance(plan[0][0], EagerPlan)
    calls = []
    plan_fn = plan[0][0]

    def counted(*args):
        calls.append(1)
        return plan_fn(*args)

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    runner.eager_plan = [(counted, plan[0][1])]
    try:
        with_plan = llm.generate(PROMPTS, params, use_progress=False)
        runner.eager_plan = None
        modules = llm.generate(PROMPTS, params, use_progress=False)
    finally:
        runner.eager_plan = plan
    assert len(calls) >= 3, "the steps did not run the plan"
    return with_plan, modules


def _assert_same(with_plan, modules) -> None:
    for a, b in zip(with_plan, modules):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs  # exactly: same ops on the same tensors


@pytest.mark.parametrize("kw", [
    {"dtype": "bfloat16", "quantization": "none"},  # float nn.Linear with bias
    {"dtype": "float32", "quantization": "none"},  # a float32 model and KV pool
    {"quantization": "int4"},  # packed int4 with padding rows and bias
    {"quantization": "int8"},  # another packed kind: through its own forward
    {"quantization": "int4", "kv_cache_dtype": "int8"},  # quantized pools: the generic attention
    {"quantization": "int4", "kv_cache_dtype": "fp8"},
    {"quantization": "int4", "max_num_batched_tokens": 16},  # chunked prefill beside decodes: mixed steps
], ids=["bf16", "fp32", "int4", "int8", "int4-kv-int8", "int4-kv-fp8", "int4-mixed-steps"])
def test_plan_equals_modules_on_tiny_qwen2(qwen_dir, kw):
    llm = LLM(str(qwen_dir), device="cpu", num_kv_blocks=32, max_model_len=128, show_progress=False, **kw)
    assert llm.engine.runner.eager_plan[0][0].fused is None  # padding rows, bias: the Python closures
    _assert_same(*_with_and_without_plan(llm))


@pytest.mark.parametrize("kw, fused", [
    ({"quantization": "int4"}, True),
    ({"quantization": "int4", "quant_group_size": 64}, True),
    ({"quantization": "int4", "kv_cache_dtype": "int8"}, False),  # a quantized pool: the closures
    ({"quantization": "int8"}, False),
], ids=["int4", "int4-g64", "int4-kv-int8", "int8"])
def test_one_call_loop_equals_modules(llama_dir, kw, fused):
    llm = LLM(str(llama_dir), device="cpu", num_kv_blocks=32, max_model_len=128, show_progress=False, **kw)
    assert (llm.engine.runner.eager_plan[0][0].fused is not None) == fused
    _assert_same(*_with_and_without_plan(llm))


def test_plan_equals_modules_on_the_real_model():
    """SmolLM2's GGUF as it runs by default: int4 layers whose merged tiles carry no padding, a
    bf16 KV pool: the one-call C++ loop."""
    llm = LLM(kv_cache_memory_gb=0.05, show_progress=False)
    assert llm.engine.runner.eager_plan[0][0].fused is not None
    _assert_same(*_with_and_without_plan(llm))


@pytest.mark.parametrize("method", ["ngram", "self"])
def test_plan_equals_modules_under_speculative_decoding(method):
    """Verification steps (k + 1 tokens per request) take the closures with the generic
    attention; the draft model of method self has a plan of its own."""
    spec = {"method": method, "num_speculative_tokens": 3, "adaptive": False}
    target = {"quantization": "none", "dtype": "bfloat16"} if method == "self" else {}  # self: a float target
    llm = LLM(kv_cache_memory_gb=0.05, speculative=spec, show_progress=False, **target)
    if method == "self":  # the int4 draft of SmolLM2's float weights: whole tiles, the C++ loop
        assert llm.engine.proposer.runner.eager_plan[0][0].fused is not None
    _assert_same(*_with_and_without_plan(llm))


def test_plan_equals_modules_on_the_real_model_in_float32(llm):
    """The shared fixture: the real model dequantized to float32 (float nn.Linear closures)."""
    assert llm.engine.runner.eager_plan[0][0].fused is None
    _assert_same(*_with_and_without_plan(llm))


def test_no_plan_where_layers_stay_unmerged(llm):
    """A layer whose q/k/v did not merge (mixed GGUF types) keeps the model on the modules."""
    model = llm.engine.model
    attn = model.model.layers[1].self_attn
    qkv = attn.qkv_proj
    del attn.qkv_proj
    try:
        assert EagerPlan.build(model, llm.engine.runner.kv_caches) is None
    finally:
        attn.qkv_proj = qkv
    assert EagerPlan.build(model, llm.engine.runner.kv_caches) is not None


def test_other_activations_fall_back_to_the_modules(qwen_dir):
    """Called with activations of another dtype than it was resolved for, the plan runs the
    modules (which choose their kernels per call) rather than kernels resolved for bf16."""
    llm = LLM(str(qwen_dir), device="cpu", quantization="int4", num_kv_blocks=8, max_model_len=64,
              show_progress=False)
    plan = llm.engine.runner.eager_plan[0][0]
    ran = []
    layers = plan.modules
    originals = [layer.forward for layer in layers]
    for layer in layers:
        layer.forward = lambda x, *a, _f=layer.forward: ran.append(1) or _f(x, *a)
    try:
        meta = AttentionMetadata(torch.tensor([0]), torch.tensor([0]), torch.zeros(1, 1, dtype=torch.long),
                                 torch.tensor([1]), [], 1)
        cos_sin = llm.engine.model.rope.cos_sin(torch.tensor([0]))
        out = plan(torch.randn(1, plan.modules[0].input_layernorm.weight.shape[0]), cos_sin,
                   llm.engine.runner.kv_caches, meta)
    finally:
        for layer, f in zip(layers, originals):
            layer.forward = f
    assert out.dtype == torch.float32 and len(ran) == len(layers)
