"""A model that cannot be loaded gives one line naming the problem and what is supported.

Each case is checked twice: `LLM(...)` raises ModelLoadError with that line, and
`tokenmill generate` exits with status 1 printing `error: <the line>` and no traceback (in
process for every case; as a real process, stderr a pipe, for two of them).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.tiny_models import TinyConfig, random_weights, write_llama_gguf
from tokenmill.llm import LLM
from tokenmill.loader.resolve import ModelLoadError, default_model_path

# intermediate 256: the FFN-down rows are whole blocks of the 256-wide K and IQ types
CFG = TinyConfig(intermediate=256)


def _gguf(arch: str = "llama", raw_types: dict[str, str] | None = None, drop: str | None = None):
    def build(path: Path) -> Path:
        weights = {k: v for k, v in random_weights(CFG).items() if k != drop}
        write_llama_gguf(path, CFG, weights, "F32", arch, with_tokenizer=False, raw_types=raw_types)
        return path
    return build


def _hf_dir(config: dict | str | None = None, truncate: bool = False, safetensors: bool = True,
            tokenizer: bool = True):
    """A Hugging Face directory of the tiny llama; `config` overrides keys of config.json (None
    drops the key, a string replaces the whole file). The tokenizer.json is a placeholder: these
    cases fail before the tokenizer is read."""
    def build(path: Path) -> Path:
        path.mkdir()
        c = {"model_type": "llama", "vocab_size": CFG.vocab, "hidden_size": CFG.hidden,
             "intermediate_size": CFG.intermediate, "num_hidden_layers": CFG.layers,
             "num_attention_heads": CFG.heads, "num_key_value_heads": CFG.kv_heads}
        if isinstance(config, str):
            text = config
        else:
            text = json.dumps({k: v for k, v in (c | (config or {})).items() if v is not None})
        (path / "config.json").write_text(text)
        if tokenizer:
            (path / "tokenizer.json").write_text("{}")
        if safetensors:
            st = path / "model.safetensors"
            save_file(random_weights(CFG), str(st))
            if truncate:
                data = st.read_bytes()
                st.write_bytes(data[: len(data) // 2])
        return path
    return build


def _bytes(data: bytes) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        path.write_bytes(data)
        return path
    return build


def _truncated_real(path: Path) -> Path:
    with open(default_model_path(), "rb") as f:
        path.write_bytes(f.read(1 << 20))  # the first 1 MiB: the header and part of the tokenizer
    return path


def _empty_dir(path: Path) -> Path:
    path.mkdir()
    return path


NOT_FOUND = r"not found: pass a \.gguf file, a Hugging Face model directory"
NOT_HF_DIR = r"; expected a Hugging Face model directory \(config\.json, \*\.safetensors, tokenizer"
TYPES = r"unsupported; supported: F32, F16, BF16, Q8_0"
FFN_DOWN_0 = "model.layers.0.mlp.down_proj.weight"
# case -> (build the model argument under a path, pattern its error must match)
CASES: dict[str, tuple[Callable[[Path], Path | str], str]] = {
    "missing-path": (lambda p: p / "no-such-model.gguf", rf"no-such-model\.gguf' {NOT_FOUND}"),
    "unknown-alias": (lambda p: "smollm9-1b",
                      rf"^model 'smollm9-1b' {NOT_FOUND} .* or an alias \(smollm2-135m\)$"),
    "dir-without-config": (_empty_dir,
                           rf"directory without config\.json and tokenizer\.json{NOT_HF_DIR}"),
    "dir-without-tokenizer": (_hf_dir(tokenizer=False),
                              rf"directory without tokenizer\.json{NOT_HF_DIR}"),
    "truncated-gguf": (_truncated_real, r"^truncated-gguf is truncated or corrupt: "),
    "random-bytes": (_bytes(np.random.default_rng(0).bytes(4096)),
                     r"^random-bytes is not a GGUF file \(magic b'.*', expected b'GGUF'\)$"),
    "text-file": (_bytes(b"hello, I am not a model\n"),
                  r"^text-file is not a GGUF file \(magic b'hell', expected b'GGUF'\)$"),
    "empty-file": (_bytes(b""), r"^empty-file is not a GGUF file \(magic b'', expected b'GGUF'\)$"),
    "gguf-falcon": (_gguf(arch="falcon"),
                    r"^gguf-falcon: unsupported architecture 'falcon'; supported: llama .*qwen2$"),
    "gguf-q2_k": (_gguf(raw_types={FFN_DOWN_0: "Q2_K"}),
                  rf"^tensor blk\.0\.ffn_down\.weight has type Q2_K, {TYPES}"),
    "gguf-iq2_xxs": (_gguf(raw_types={FFN_DOWN_0: "IQ2_XXS"}),
                     rf"^tensor blk\.0\.ffn_down\.weight has type IQ2_XXS, {TYPES}"),
    "gguf-q8_k": (_gguf(raw_types={FFN_DOWN_0: "Q8_K"}),
                  rf"^tensor blk\.0\.ffn_down\.weight has type Q8_K, {TYPES}"),
    "gguf-missing-weight": (_gguf(drop="model.layers.1.mlp.up_proj.weight"),
                            r"^gguf-missing-weight lacks 1 weights, e\.g\. model\.layers\.1\.mlp"),
    "hf-gpt2": (_hf_dir({"model_type": "gpt2"}),
                r"^hf-gpt2: unsupported model_type 'gpt2'; supported: llama, mistral, qwen2$"),
    "hf-yarn": (_hf_dir({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                r"^hf-yarn: unsupported rope scaling 'yarn'; supported: default, linear, llama3$"),
    "hf-no-hidden-size": (_hf_dir({"hidden_size": None}),
                          r"config\.json lacks the key 'hidden_size'$"),
    "hf-bad-json": (_hf_dir("{not json"), r"config\.json is unreadable: "),
    "hf-truncated-safetensors": (_hf_dir(truncate=True),
                                 r"^model\.safetensors is truncated or corrupt: "),
    "hf-no-safetensors": (_hf_dir(safetensors=False),
                          r"hf-no-safetensors has no \*\.safetensors files$"),
}


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, str]:
    """case -> the --model argument."""
    root = tmp_path_factory.mktemp("bad-models")
    return {name: str(build(root / name)) for name, (build, _) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_llm_raises_one_line_model_load_error(case, bad_models):
    with pytest.raises(ModelLoadError, match=CASES[case][1]) as info:
        LLM(bad_models[case], device="cpu", dtype="float32", num_kv_blocks=8, show_progress=False)
    assert "\n" not in str(info.value)


def _message(stderr: str) -> str:
    """The error message of the CLI's stderr, with any line wrapping undone."""
    return " ".join(stderr.removeprefix("error: ").split())


@pytest.mark.parametrize("case", list(CASES))
def test_cli_reports_error_line(case, bad_models):
    from typer.testing import CliRunner

    from tokenmill.cli import app

    args = ["generate", "hi", "--model", bad_models[case], "--device", "cpu"]
    result = CliRunner().invoke(app, args)
    # anything but SystemExit escaping the command would reach the user as a traceback
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1
    assert result.stderr.startswith("error: "), result.stderr
    assert re.search(CASES[case][1], _message(result.stderr)), result.stderr


# one fails resolving the path, the other half-way through loading the weights
PROCESS_CASES = ["missing-path", "gguf-q2_k"]


@pytest.fixture(scope="module")
def cli_processes(bad_models) -> dict[str, subprocess.CompletedProcess]:
    """`python -m tokenmill.cli generate hi --model <case>` as a user runs it, stderr a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    procs = {
        case: subprocess.Popen(
            [sys.executable, "-m", "tokenmill.cli", "generate", "hi", "--model", bad_models[case],
             "--device", "cpu"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for case in PROCESS_CASES
    }
    runs = {}
    for case, p in procs.items():
        out, err = p.communicate(timeout=300)
        runs[case] = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("case", PROCESS_CASES)
def test_cli_process_exits_with_error_and_no_traceback(case, cli_processes):
    run = cli_processes[case]
    assert run.returncode == 1, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    assert run.stderr.startswith("error: "), run.stderr
    assert re.search(CASES[case][1], _message(run.stderr)), run.stderr


@pytest.mark.slow
def test_cli_error_is_one_line(cli_processes):
    for case, run in cli_processes.items():
        assert run.stderr.count("\n") == 1, f"{case}: {run.stderr!r}"
