"""GGUF quantized tensors run packed: each type's module equals what gguf-py decodes the file to.

4-bit types keep their codes; only scale and zero are rounded to bf16, so the packed weight is
within 2^-8 x (8|scale| + |zero|) of the file's decoding. Types wider than 4 bits are
re-quantized to int8 per output row: within half a step (max|row| / 127) of the file's decoding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.quant.test_kernels import BATCHES, _check
from tests.tiny_models import TinyConfig, random_weights, write_llama_gguf
from tokenmill.eval.perplexity import prefill_hidden
from tokenmill.loader.model_loader import load_model
from tokenmill.quant import QuantEmbedding
from tokenmill.quant.gguf import GGUFWeight, gguf_linear, int4_fields
from tokenmill.quant.int4 import Int4Linear
from tokenmill.quant.int8 import Int8Linear


def _blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw blocks [rows, bytes per row]: gguf-py's quantizer where it has one, else random
    bytes with sane fp16 scales (gguf-py cannot write K-quants)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    rng = np.random.default_rng(seed)
    qtype = GGMLQuantizationType[type_name]
    if type_name not in ("Q4_K", "Q5_K", "Q6_K"):
        return quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.0, (rows, cols // block, 2)) * 1e-3).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":
        raw[..., size - 2:] = scales[..., :2]  # d is the last field
    else:
        raw[..., :4] = scales  # d, dmin lead the block
    return raw.reshape(rows, -1)


CASES = [("Q4_0", 37, 64), ("Q4_1", 37, 96), ("Q4_1", 128, 576), ("Q4_K", 37, 256), ("Q4_K", 64, 512),
         ("Q8_0", 37, 64), ("Q5_0", 20, 64), ("Q5_1", 20, 64), ("Q6_K", 37, 256), ("Q5_K", 16, 256)]


@pytest.mark.parametrize("type_name,rows,cols", CASES)
def test_packed_gguf_tensor_matches_the_file(type_name, rows, cols):
    w = GGUFWeight(_blocks(type_name, rows, cols), type_name, (rows, cols))
    decoded = torch.from_numpy(w.dequantize())
    module = gguf_linear(w, torch.device("cpu"))
    ours = module.dequantize()
    if type_name in ("Q4_0", "Q4_1", "Q4_K"):
        assert isinstance(module, Int4Linear) and module.group == 32
        _, scale, zero = (torch.from_numpy(a) for a in int4_fields(w))
        bound = 2**-8 * (8 * scale.abs() + zero.abs()).repeat_interleave(32, dim=1) + 1e-7
    else:
        assert isinstance(module, Int8Linear)
        bound = 0.5 * decoded.abs().amax(1, keepdim=True) / 127 * (1 + 2**-7) + 1e-7
    assert ((ours - decoded).abs() <= bound).all(), f"{type_name}: packed weight strays from the file"
    for m in BATCHES:
        _check(module, ours, m)


def test_int4_fields_decode_exactly_as_gguf():
    """Before bf16 rounding the (q, scale, zero) mapping is the file's decoding to float32 precision."""
    for type_name, rows, cols in CASES[:5]:
        w = GGUFWeight(_blocks(type_name, rows, cols), type_name, (rows, cols))
        q, scale, zero = int4_fields(w)
        ours = (q.reshape(rows, -1, 32) - 8.0) * scale[..., None] + zero[..., None]
        np.testing.assert_allclose(ours.reshape(rows, cols), w.dequantize(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("type_name,tie", [("Q4_1", False), ("Q4_0", True), ("Q8_0", False)])
def test_tiny_gguf_runs_packed_like_its_dequantized_self(type_name, tie, tmp_path):
    """A whole tiny GGUF (Q/K rows permuted by llama.cpp, tied or untied head) gives, packed,
    the logits of its dequantized float32 load within bf16 rounding."""
    cfg = TinyConfig(tie=tie)
    path = tmp_path / f"tiny-{type_name}.gguf"
    write_llama_gguf(path, cfg, random_weights(cfg, seed=4), type_name, with_tokenizer=False)
    cpu = torch.device("cpu")
    ref = load_model(path, torch.float32, cpu, show_progress=False).model
    packed = load_model(path, torch.bfloat16, cpu, show_progress=False, quantization="gguf").model
    assert isinstance(packed.model.embed_tokens, QuantEmbedding)
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    if tie:
        assert packed.model.embed_tokens.table is packed.lm_head
    ids = list(range(100, 140))
    a = ref.compute_logits(prefill_hidden(ref, ids))
    b = packed.compute_logits(prefill_hidden(packed, ids))
    rel = float((a - b).norm() / a.norm())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(f"{type_name} tie={tie}: relative logit error {rel:.2e}, top-1 agreement {agree:.2f}")
    assert rel < 0.03 and agree >= 0.9
