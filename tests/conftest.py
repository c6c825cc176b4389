"""Shared fixtures: the real default model, loaded once per session."""

from __future__ import annotations

import pytest

from tokenmill.loader.resolve import default_model_path


@pytest.fixture(scope="session")
def model_path():
    return default_model_path()


@pytest.fixture(scope="session")
def llm():
    """The real SmolLM2-135M dequantized to float32 on CPU, with a pool large enough to avoid preemption."""
    from tokenmill.llm import LLM

    return LLM("smollm2-135m", device="cpu", dtype="float32", quantization="none",
               kv_cache_memory_gb=0.25, max_num_batched_tokens=256, max_model_len=1024, show_progress=False)


@pytest.fixture(scope="session")
def hf_model(model_path):
    """Hugging Face transformers' float32 model read from the same GGUF: the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                                 dtype=torch.float32)
    return model.eval()
