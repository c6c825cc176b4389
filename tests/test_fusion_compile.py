"""Merged projections compute what the separate layers did; the compiled decode step gives the
eager step's greedy tokens on the real model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.golden import compare_up_to_near_tie, margins
from tokenmill.model.fusion import merge_linears
from tokenmill.quant.int4 import Int4Linear
from tokenmill.quant.int8 import Int8Linear
from tokenmill.sampling_params import SamplingParams


def _linears(kind: str, outs: list[int], k: int, bias: bool) -> list[nn.Module]:
    g = torch.Generator().manual_seed(len(outs) * 7 + k)
    mods = []
    for n in outs:
        w = torch.randn(n, k, generator=g) * 0.05
        b = torch.randn(n, generator=g) if bias else None
        if kind == "float":
            m = nn.Linear(k, n, bias=bias)
            m.weight.data, m.bias = w, (nn.Parameter(b) if bias else None)
        elif kind == "int4":
            m = Int4Linear.from_float(w, 32, b)
        else:
            m = Int8Linear.from_float(w, b)
        mods.append(m)
    return mods


@pytest.mark.parametrize("kind", ["float", "int4", "int8"])
@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.parametrize("outs", [[576, 192, 100], [100, 576]], ids=["whole-tiles-first", "padded-first"])
def test_merged_equals_concatenated_outputs(kind, m, outs):
    """int4: layers of whole 64-row tiles (but the last) merge by concatenating their packed
    tiles; otherwise through their codes."""
    mods = _linears(kind, outs, 576, bias=kind != "int8")
    merged = merge_linears(mods)
    assert type(merged) is type(mods[0]) and merged.out_features == sum(outs)
    if kind == "int4":
        assert Int4Linear.can_concat_packed(mods) == (outs[0] % 64 == 0)
    x = torch.randn(m, 576, generator=torch.Generator().manual_seed(m))
    want = torch.cat([mod(x) for mod in mods], dim=-1)
    got = merged(x)
    # packed kernels compute each output row from its own codes: equal up to bf16 rounding
    tol = 1e-5 if kind == "float" else 1e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if kind == "int4":
        assert torch.equal(merged.codes(), torch.cat([mod.codes() for mod in mods]))


def test_layers_with_and_without_bias_merge():
    """q with a bias beside k/v without (or the other way round): zeros stand in, in the bias's
    dtype and on its device."""
    for first in (False, True):
        mods = _linears("float", [64, 32], 64, bias=first) + _linears("float", [32], 64, bias=not first)
        merged = merge_linears(mods)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(merged(x), torch.cat([mod(x) for mod in mods], dim=-1))


def test_unlike_layers_stay_separate():
    a = _linears("int4", [64], 64, bias=False)[0]
    b = _linears("int8", [64], 64, bias=False)[0]
    assert merge_linears([a, b]) is None
    assert merge_linears(_linears("float", [64], 64, False) + _linears("float", [64], 128, False)) is None


def test_loaded_model_runs_merged(llm):
    layer = llm.engine.model.model.layers[0]
    assert hasattr(layer.self_attn, "qkv_proj") and not hasattr(layer.self_attn, "q_proj")
    assert hasattr(layer.mlp, "gate_up_proj") and not hasattr(layer.mlp, "gate_proj")


def test_compiled_decode_matches_eager(llm):
    """The same engine's runner with compiled decode layers: greedy tokens equal eager ones
    (near-tie rule of tests/golden.py) for a batch of three decoding together."""
    from tokenmill.llm import LLM

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)
    eager = llm.generate(prompts, params, use_progress=False)
    compiled_llm = LLM(quantization="none", dtype="float32", compile=True, kv_cache_memory_gb=0.05,
                       show_progress=False)
    assert compiled_llm.engine.runner.compiled_groups is not None
    compiled = compiled_llm.generate(prompts, params, use_progress=False)
    compared = [compare_up_to_near_tie(c.outputs[0].token_ids, e.outputs[0].token_ids, margins(e))
                for e, c in zip(eager, compiled)]
    assert sum(compared) >= 24, f"steps compared per prompt: {compared}"


def test_dummy_weights_from_the_catalog_and_with_two_ranks():
    """--load-format dummy: the planner catalog's shape with random weights, alone and split."""
    from tokenmill.llm import LLM
    from tokenmill.plan import catalog

    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    spec = catalog.model("smollm2-135m")
    for tp in (1, 2):
        llm = LLM("smollm2-135m", load_format="dummy", quantization="none", dtype="float32",
                  tensor_parallel_size=tp, kv_cache_memory_gb=0.05, show_progress=False)
        cfg = llm.engine.model_config
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads, cfg.vocab_size) == (
            spec.layers, spec.hidden, spec.kv_heads, spec.vocab)
        out = llm.generate(["Hello"], params, use_progress=False)[0].outputs[0]
        assert len(out.token_ids) == 8
        llm.engine.shutdown()


def test_dummy_weights_from_a_config_json_quantized_at_load(tmp_path):
    """A directory holding only config.json (no weights, no tokenizer: the default one is used),
    quantized to int4 at load, as benchmarks/gpu_bench.py builds its 1B model."""
    import json

    from tokenmill.llm import LLM

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 1024, "tie_word_embeddings": True}))
    llm = LLM(str(tmp_path), load_format="dummy", quantization="int4", kv_cache_memory_gb=0.05, show_progress=False)
    assert llm.engine.model_config.hidden_size == 256
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True), use_progress=False)[0]
    assert len(out.outputs[0].token_ids) == 4


def test_cuda_graphs_without_cuda_is_a_clear_error():
    from tokenmill.config import ConfigError
    from tokenmill.llm import LLM

    with pytest.raises(ConfigError, match=r"^cuda_graphs needs one CUDA device .* got device cpu"):
        LLM(device="cpu", cuda_graphs=True, quantization="none", dtype="float32", show_progress=False)


def test_two_compiled_engines_in_one_process(llm):
    """Compiled groups skip the guards on their modules, so each engine's groups run a forward of
    their own: a packed and a float32 engine (other module types and shapes) compiled in one
    process, used in turn, each give its own eager tokens."""
    from tokenmill.llm import LLM

    prompts = ["The capital of France is", "def fibonacci(n):"]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    kw = {"kv_cache_memory_gb": 0.05, "show_progress": False}
    packed_eager = LLM(**kw).generate(prompts, params, use_progress=False)
    dense_eager = llm.generate(prompts, params, use_progress=False)
    packed = LLM(compile=True, **kw)
    dense = LLM(quantization="none", dtype="float32", compile=True, **kw)
    forwards = {type(g._orig_mod).forward.__code__ for engine in (packed, dense)
                for g, _ in engine.engine.runner.compiled_groups}
    assert len(forwards) == 2
    compared = 0  # steps agreeing before the reference's first near-tie (bf16 has exact ties)
    for i, prompt in enumerate(prompts):
        for engine, eager in ((packed, packed_eager), (dense, dense_eager)):
            got = engine.generate([prompt], params, use_progress=False)[0]
            compared += compare_up_to_near_tie(got.outputs[0].token_ids, eager[i].outputs[0].token_ids,
                                               margins(eager[i]))
    assert compared >= 24, compared


def test_a_graph_break_falls_back_to_guarded_groups(monkeypatch, llm):
    """Guard-free groups must compile as whole graphs; a layer that breaks the graph gets the
    guarded, breakable compile instead of failing to start, and the same tokens."""
    from tokenmill.llm import LLM
    from tokenmill.model import llama

    forward = llama.DecoderLayer.forward

    def breaking(self, *args):
        torch._dynamo.graph_break()
        return forward(self, *args)

    monkeypatch.setattr(llama.DecoderLayer, "forward", breaking)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    compiled = LLM(quantization="none", dtype="float32", compile=True, kv_cache_memory_gb=0.05, show_progress=False)
    assert all(type(g._orig_mod) is llama.LayerGroup for g, _ in compiled.engine.runner.compiled_groups)
    got = compiled.generate(["The capital of France is"], params, use_progress=False)[0]
    ref = llm.generate(["The capital of France is"], params, use_progress=False)[0]
    assert compare_up_to_near_tie(got.outputs[0].token_ids, ref.outputs[0].token_ids, margins(ref)) >= 8
