"""Bad quantization input fails at once with one line naming the value and what is accepted."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import TinyConfig, random_weights, write_llama_gguf
from tokenmill.config import ConfigError, EngineConfig
from tokenmill.loader.model_loader import load_model
from tokenmill.quant import check_device
from tokenmill.quant.int4 import Int4Linear


@pytest.mark.parametrize("kwargs,match", [
    ({"quantization": "int3"}, r"quantization='int3': accepted auto, none, int8, int4, fp8"),
    ({"kv_cache_dtype": "int4"}, r"kv_cache_dtype='int4': accepted auto, int8, fp8"),
    ({"quant_group_size": 48}, r"quant_group_size=48: accepted 32, 64, 128"),
])
def test_unknown_values_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


def test_unknown_scheme_through_llm_fails_before_loading():
    from tokenmill.llm import LLM

    with pytest.raises(ConfigError, match="accepted auto, none, int8, int4, fp8"):
        LLM("no-such-model", quantization="gptq")


@pytest.mark.parametrize("scheme", ["int4", "gguf"])
def test_int4_on_a_gpu_without_tensor_core_int4(scheme):
    with pytest.raises(ConfigError, match=r"compute capability >= 8.0\); this device is 7.5"):
        check_device(scheme, torch.device("cuda"), capability=(7, 5))
    check_device("int8", torch.device("cuda"), capability=(7, 5))  # int8 and fp8 (emulated) still run
    check_device("fp8", torch.device("cuda"), capability=(7, 5))


def test_scheme_on_an_unsupported_device_type():
    with pytest.raises(ConfigError, match="runs on cpu or cuda, not mps"):
        check_device("int8", torch.device("mps"))
    check_device("none", torch.device("mps"))


def test_group_that_does_not_divide():
    with pytest.raises(ConfigError, match="in_features=96 is not a multiple of the group size 64"):
        Int4Linear.from_float(torch.randn(16, 96), 64)


def test_group_that_does_not_divide_names_the_layer(tmp_path):
    path = tmp_path / "tiny.gguf"
    cfg = TinyConfig()  # hidden 64
    write_llama_gguf(path, cfg, random_weights(cfg), "F32", with_tokenizer=False)
    with pytest.raises(ConfigError, match=r"^model\.layers\.0\.self_attn\.q_proj: .*in_features=64 is not a "
                                          r"multiple of the group size 128$"):
        load_model(path, torch.bfloat16, torch.device("cpu"), show_progress=False, quantization="int4",
                   group_size=128)


def test_cli_reports_a_bad_scheme_in_one_line():
    from typer.testing import CliRunner

    from tokenmill.cli import app

    result = CliRunner().invoke(app, ["generate", "hi", "--quantization", "int3"])
    assert result.exit_code == 1
    assert "quantization='int3': accepted auto, none, int8, int4, fp8" in result.output
