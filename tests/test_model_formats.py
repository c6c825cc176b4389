"""Every model format tokenmill loads gives the model its source describes.

- tiny random Hugging Face checkpoints (llama with GQA and llama3 RoPE scaling, qwen2 with QKV
  bias and tied embeddings, mistral with an explicit head_dim) against transformers;
- tiny GGUFs with every tensor type gguf-py can write: the loaded weights are what the file
  decodes to, and the F32 file's model is transformers' model on the same numbers;
- the real model exported as a Hugging Face directory generates exactly what its GGUF does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.golden import NEAR_TIE, PROMPTS, compare_up_to_near_tie
from tests.tiny_models import (
    LLAMA3_SCALING,
    VOCAB,
    TinyConfig,
    gguf_name,
    hf_greedy,
    hf_llama,
    hf_logits,
    llama3_rope_factors,
    llama_cpp_permute,
    random_weights,
    randomize_,
    save_hf_tokenizer,
    tokenmill_logits,
    write_llama_gguf,
)
from tokenmill.llm import LLM
from tokenmill.loader.model_loader import load_model
from tokenmill.sampling_params import SamplingParams

NEW_TOKENS = 16
LOGPROB_TOL = 1e-4  # float32, same weights: measured deviations are ~1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are small: intra-op threads gain nothing, and on a shared 2-core machine a
    worker thread waiting for a busy core stretches each small matmul to milliseconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real model's tokenizer as Hugging Face files, written once."""
    d = tmp_path_factory.mktemp("tokenizer")
    save_hf_tokenizer(d)
    return d


def _tiny_llm(path: Path) -> LLM:
    return LLM(str(path), device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=256,
               show_progress=False)


def _assert_matches_transformers(llm: LLM, ref, prompts: list[list[int]]) -> None:
    """Prefill log-probs at every position within LOGPROB_TOL; greedy tokens equal up to the
    first near-tie of the reference, with their top-5 log-probs within LOGPROB_TOL."""
    ours = torch.log_softmax(tokenmill_logits(llm.engine.model, prompts[0]), -1)
    theirs = torch.log_softmax(hf_logits(ref, prompts[0]), -1)
    worst = float((ours - theirs).abs().max())
    assert worst < LOGPROB_TOL, f"prefill log-probs differ by {worst:.2e}"

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_progress=False)
    compared = 0
    for ids, out in zip(prompts, outs):
        ref_tokens, margins, ref_lp = hf_greedy(ref, ids, NEW_TOKENS)
        n = compare_up_to_near_tie(out.outputs[0].token_ids, ref_tokens, margins)
        compared += n
        for step in range(n):
            for token, lp in out.outputs[0].logprobs[step].items():
                expected = float(ref_lp[step][token])
                err = abs(lp - expected)
                worst = max(worst, err)
                assert err < LOGPROB_TOL, f"step {step} token {token}: {lp} vs {expected}"
    print(f"compared {compared} tokens; worst logprob error {worst:.2e} (near-tie {NEAR_TIE})")
    assert compared >= 0.5 * len(prompts) * NEW_TOKENS, "so many near-ties that little was compared"


# -- tiny Hugging Face checkpoints --------------------------------------------------------------

def _hf_tiny(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1,
              "eos_token_id": 2}
    if kind == "llama":  # GQA, llama3 scaling that changes most frequencies, untied head
        config = LlamaConfig(**common, rope_theta=50000.0, rope_scaling=LLAMA3_SCALING,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    elif kind == "qwen2":  # QKV bias, tied embeddings, 3 layers
        model = Qwen2ForCausalLM(Qwen2Config(**(common | {"num_hidden_layers": 3}), rope_theta=1e6,
                                             tie_word_embeddings=True))
    else:  # mistral: head_dim 32 != hidden / heads, so q_proj is 64 -> 128
        model = MistralForCausalLM(MistralConfig(**common, head_dim=32, sliding_window=None,
                                                 tie_word_embeddings=False))
    randomize_(model, seed=1)
    return model.float().eval()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_tiny_hf_checkpoint_matches_transformers(kind, tmp_path, tokenizer_dir):
    ref = _hf_tiny(kind)
    ref.save_pretrained(str(tmp_path))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path)
    llm = _tiny_llm(tmp_path)
    cfg = llm.engine.model_config
    # (rope theta, rope type, head dim, tied, qkv bias) as config.json says
    expected = {"llama": (50000.0, "llama3", 16, False, False),
                "qwen2": (1e6, None, 16, True, True),
                "mistral": (10000.0, None, 32, False, False)}[kind]
    rope_type = cfg.rope_scaling and cfg.rope_scaling["rope_type"]
    got = (cfg.rope_theta, rope_type, cfg.head_dim, cfg.tie_word_embeddings, cfg.attention_bias)
    assert got == expected
    assert (cfg.num_heads, cfg.num_kv_heads) == (4, 2)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    _assert_matches_transformers(llm, ref, prompts)


# -- tiny GGUFs ---------------------------------------------------------------------------------

GGUF_CFG = TinyConfig(rope_theta=50000.0, llama3_scaling=LLAMA3_SCALING)

# Worst |decoded - source| per block of 32 as a fraction of the block's largest |value|, from each
# format's rounding (ggml-quants.c): F16 / BF16 round the mantissa to 11 / 8 bits; Q8_0 steps of
# amax/127; Q4_0 steps of amax/8, and the value opposite the extreme is clamped by one step;
# Q4_1 / Q5_1 steps of (max - min) / 15 or 31 with min offset; Q5_0 steps of amax/16, clamped.
# The f16 scales add about 2^-11 of amax; the bounds leave that room.
BLOCK_ERROR = {"F32": 0.0, "F16": 2**-11, "BF16": 2**-8, "Q8_0": 1 / 127, "Q4_0": 1 / 8 + 2**-9,
               "Q4_1": 1 / 15 + 2**-9, "Q5_0": 1 / 16 + 2**-9, "Q5_1": 1 / 31 + 2**-9}


def _block_error(decoded: np.ndarray, source: np.ndarray) -> float:
    """max over blocks of 32 of max|decoded - source| / max|source|."""
    err = np.abs(decoded - source).reshape(-1, 32).max(1)
    amax = np.abs(source).reshape(-1, 32).max(1)
    return float((err / amax).max())


@pytest.fixture(scope="module")
def gguf_weights() -> dict[str, np.ndarray]:
    return random_weights(GGUF_CFG, seed=2)


@pytest.mark.parametrize("tensor_type", list(BLOCK_ERROR))
def test_gguf_weights_load_as_the_file_decodes(tensor_type, tmp_path, gguf_weights):
    from gguf import quants

    path = tmp_path / f"tiny-{tensor_type}.gguf"
    written = write_llama_gguf(path, GGUF_CFG, gguf_weights, tensor_type, with_tokenizer=False)
    loaded = load_model(path, torch.float32, torch.device("cpu"), show_progress=False)
    cfg = loaded.config
    shape = (cfg.arch, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings)
    assert shape == ("llama", 64, 4, 2, False)
    factors = llama3_rope_factors(GGUF_CFG).tolist()
    assert cfg.rope_scaling == {"rope_type": "freq_factors", "factors": factors}
    params = dict(loaded.model.named_parameters())
    assert params.keys() == gguf_weights.keys()
    for hf, source in gguf_weights.items():
        name = gguf_name(hf)
        data, qtype = written[name]
        ours = params[hf].detach().numpy()
        # back to the file's row order: llama.cpp's permutation of Q and K
        if name.endswith("attn_q.weight"):
            ours = llama_cpp_permute(ours, GGUF_CFG.heads)
        elif name.endswith("attn_k.weight"):
            ours = llama_cpp_permute(ours, GGUF_CFG.kv_heads)
        decoded = quants.dequantize(data, qtype)
        np.testing.assert_array_equal(ours, decoded, err_msg=f"{name} ({qtype.name})")
        if source.ndim == 2:
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = GGUF_CFG.heads if "attn_q" in name else GGUF_CFG.kv_heads
                source = llama_cpp_permute(source, heads)
            bound = BLOCK_ERROR[tensor_type]
            err = _block_error(decoded, source)
            assert err <= bound, f"{name}: {tensor_type} error {err:.4f} > {bound:.4f}"
        else:
            np.testing.assert_array_equal(decoded, source)  # norms are stored as F32


@pytest.mark.parametrize("tensor_type", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_tensor_decodes_as_gguf_does(tensor_type, tmp_path):
    """gguf-py cannot quantize to K-quants, so no model is built; a tensor of random bytes of
    the right size must still decode, shape included, as gguf-py decodes it."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter, quants

    from tokenmill.loader.gguf_loader import dequantize

    qtype = GGMLQuantizationType[tensor_type]
    block, type_size = GGML_QUANT_SIZES[qtype]
    # 3 rows of 2 blocks; a random f16 scale is now and then inf or nan, which must match too
    raw = np.random.default_rng(3).integers(0, 256, (3, 2 * type_size), dtype=np.uint8)
    path = tmp_path / "k.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = GGUFReader(str(path)).tensors
    with np.errstate(invalid="ignore", over="ignore"):
        ours, reference = dequantize(tensor), quants.dequantize(raw, qtype)
    assert ours.shape == (3, 2 * block)
    np.testing.assert_array_equal(ours, reference)


def test_f32_gguf_matches_transformers(tmp_path, gguf_weights):
    """The F32 GGUF (llama3 scaling as a rope_freqs tensor, permuted Q/K, the real tokenizer's
    keys) is transformers' LlamaForCausalLM on the same numbers."""
    path = tmp_path / "tiny-F32.gguf"
    write_llama_gguf(path, GGUF_CFG, gguf_weights, "F32")
    llm = _tiny_llm(path)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS[3:6]]
    _assert_matches_transformers(llm, hf_llama(GGUF_CFG, gguf_weights), prompts)


# -- the real model as a Hugging Face directory -------------------------------------------------

def _export_hf_dir(llm: LLM, dst: Path, tokenizer_dir: Path) -> None:
    """The weights tokenmill loaded from the GGUF, as a float32 Hugging Face llama checkpoint."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = llm.engine.model_config
    from tokenmill.model.fusion import unfused_state_dict

    state = {k: v.detach().float().contiguous() for k, v in unfused_state_dict(llm.engine.model).items()}
    if cfg.tie_word_embeddings:
        del state["lm_head.weight"]  # HF leaves the tied head out of the checkpoint
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=1, eos_token_id=2,
    ).save_pretrained(str(dst))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dst)


def _float_llm(path: Path) -> LLM:
    """float32 weights whatever the file stores: GGUF quantized tensors dequantized at load."""
    return LLM(str(path), device="cpu", dtype="float32", quantization="none", kv_cache_memory_gb=0.1,
               max_model_len=256, show_progress=False)


@pytest.mark.slow
def test_real_model_as_hf_directory_generates_as_its_gguf(model_path, tmp_path, tokenizer_dir):
    gguf = _float_llm(model_path)
    _export_hf_dir(gguf, tmp_path, tokenizer_dir)
    hf = _float_llm(tmp_path)
    assert hf.engine.model_config == gguf.engine.model_config
    prompts = PROMPTS[:3]
    for p in prompts:
        assert hf.get_tokenizer().encode(p) == gguf.get_tokenizer().encode(p)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ours = hf.generate(prompts, params, use_progress=False)
    ref = gguf.generate(prompts, params, use_progress=False)
    (tmp_path / "model.safetensors").unlink()  # 540 MB that pytest would otherwise keep around
    for a, b in zip(ours, ref):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
