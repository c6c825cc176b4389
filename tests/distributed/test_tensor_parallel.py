"""Tensor parallelism on CPU (gloo, 2 ranks as 2 processes): the same greedy tokens as one
rank, each rank reading only its slice of the file, and a killed worker failing fast."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.golden import PROMPTS, compare_up_to_near_tie, margins
from tokenmill.distributed.worker import _free_port
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2)


def _tp_llm(model: str, size: int, **kw) -> LLM:
    return LLM(model, device="cpu", dtype="float32", quantization="none", tensor_parallel_size=size,
               kv_cache_memory_gb=0.1, max_model_len=512, show_progress=False, **kw)


def _assert_same_greedy(ours: list, ref: list) -> int:
    compared = [compare_up_to_near_tie(o.outputs[0].token_ids, r.outputs[0].token_ids, margins(r))
                for o, r in zip(ours, ref)]
    return sum(compared)


def test_two_ranks_generate_what_one_does_on_the_real_model(llm, model_path):
    """SmolLM2-135M: 9 heads / 3 KV heads split unevenly (6 + 3), vocabulary and FFN halved."""
    from gguf import GGUFReader

    tp = _tp_llm("smollm2-135m", 2)
    try:
        ours = tp.generate(PROMPTS[:4], PARAMS, use_progress=False)
        ref = llm.generate(PROMPTS[:4], PARAMS, use_progress=False)
        assert _assert_same_greedy(ours, ref) >= 4 * 16
        # sharded loading: each rank read about half the file (norms are whole on both)
        total = sum(int(t.n_bytes) for t in GGUFReader(str(model_path)).tensors)
        per_rank = tp.engine.rank_weight_bytes
        assert len(per_rank) == 2 and all(b < 0.55 * total for b in per_rank), (per_rank, total)
        assert total <= sum(per_rank) <= 1.01 * total
    finally:
        tp.engine.shutdown()


def _tiny_hf_dir(dst: Path, tokenizer_dir: Path, kind: str) -> Path:
    """A random tiny checkpoint: llama with 1 KV head (replicated on both ranks), or qwen2 with
    QKV biases and a tied head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from tests.tiny_models import VOCAB, randomize_

    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2}
    torch.manual_seed(0)
    if kind == "llama-kv1":
        model = LlamaForCausalLM(LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=1,
                                             tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2,
                                             tie_word_embeddings=True))
    randomize_(model, seed=3)
    model.float().save_pretrained(str(dst))
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, dst)
    return dst


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import save_hf_tokenizer

    d = tmp_path_factory.mktemp("tokenizer")
    save_hf_tokenizer(d)
    return d


@pytest.mark.parametrize("kind", ["llama-kv1", "qwen2-bias-tied"])
def test_two_ranks_on_random_models(kind, tmp_path, tokenizer_dir):
    """KV-head replication (1 KV head, 2 ranks) and sliced QKV biases with a tied, split head."""
    path = _tiny_hf_dir(tmp_path, tokenizer_dir, kind)
    one = _tp_llm(str(path), 1)
    ref = one.generate(PROMPTS[:3], PARAMS, use_progress=False)
    two = _tp_llm(str(path), 2)
    try:
        ours = two.generate(PROMPTS[:3], PARAMS, use_progress=False)
        assert _assert_same_greedy(ours, ref) >= 3 * 12
        total = one.engine.rank_weight_bytes[0]
        assert all(b < 0.6 * total for b in two.engine.rank_weight_bytes), (two.engine.rank_weight_bytes, total)
    finally:
        two.engine.shutdown()


def _spawned_workers(pid: int) -> list[int]:
    """Child processes started by multiprocessing's spawn (not its resource tracker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    out = []
    for c in children:
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except FileNotFoundError:
            continue
        if "spawn_main" in cmd:
            out.append(int(c))
    return out


def _wait_for_workers(proc: subprocess.Popen, n: int, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        workers = _spawned_workers(proc.pid)
        if len(workers) == n:
            return workers
        time.sleep(0.2)
    raise AssertionError("the worker process did not start")


def test_killed_worker_stops_generate_with_a_clear_error():
    """`tokenmill generate -tp 2` decoding a long output; SIGKILL the worker: the command exits
    with status 1 and one line naming the rank, within seconds."""
    cmd = [sys.executable, "-m", "tokenmill.cli", "generate", "Once upon a time", "--max-tokens", "1500",
           "--ignore-eos", "--quantization", "none", "--dtype", "float32", "--device", "cpu",
           "--tensor-parallel-size", "2", "--kv-cache-memory-gb", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=os.environ | {"TOKENMILL_LOG_LEVEL": "WARNING"})
    try:
        (worker,) = _wait_for_workers(proc, 1)
        first = proc.stdout.read(20)  # decoding has begun
        assert first
        os.kill(worker, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert "error: tensor-parallel worker rank 1 was killed by signal 9" in err, err[-2000:]


STUCK_STEP = """
import os, signal, time
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

llm = LLM("smollm2-135m", device="cpu", dtype="float32", quantization="none", tensor_parallel_size=2,
          kv_cache_memory_gb=0.1, show_progress=False)
engine = llm.engine
launcher = engine._tp_launcher
launcher.stuck_grace_s = 2.0

def stuck_forward(*args, **kwargs):  # as a step whose NCCL collective waits for the dead rank
    os.kill(launcher.procs[0].pid, signal.SIGKILL)
    time.sleep(600)

engine.runner.execute = stuck_forward
engine.add_request("r", "Once upon a time", SamplingParams(max_tokens=4))
engine.step()
print("the step returned")
"""


def test_a_step_stuck_on_a_dead_rank_ends_the_process():
    """A collective that never fails by itself (NCCL waits on the GPU for a dead rank): the
    watchdog ends the process with status 1 and the reason once the grace period is over."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STUCK_STEP], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False, env=os.environ | {"TOKENMILL_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "the step returned" not in proc.stdout
    assert "error: tensor-parallel worker rank 1 was killed by signal 9" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 120


IDLE_DEATH = """
import os, signal, time
from tokenmill.distributed.group import WorkerDiedError
from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

llm = LLM("smollm2-135m", device="cpu", dtype="float32", quantization="none", tensor_parallel_size=2,
          kv_cache_memory_gb=0.1, show_progress=False)
engine = llm.engine
launcher = engine._tp_launcher
os.kill(launcher.procs[0].pid, signal.SIGKILL)  # while no step runs
assert launcher.died.wait(30)

def stuck_forward(*args, **kwargs):  # as a step whose NCCL collective waits for the dead rank
    time.sleep(600)

engine.runner.execute = stuck_forward
engine.add_request("r", "Once upon a time", SamplingParams(max_tokens=4))
t0 = time.monotonic()
try:
    engine.step()
except WorkerDiedError as e:
    print(f"raised after {time.monotonic() - t0:.2f} s: {e}")
"""


def test_a_rank_that_died_while_idle_fails_the_next_step_at_once():
    """The watchdog ends a step stuck on a dead rank; a rank that dies between steps makes the
    next step raise before it runs anything (it would otherwise wait in a collective)."""
    proc = subprocess.run([sys.executable, "-c", IDLE_DEATH], capture_output=True, text=True, cwd=ROOT,
                          timeout=180, check=False, env=os.environ | {"TOKENMILL_LOG_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised after 0.0" in proc.stdout, proc.stdout
    assert "tensor-parallel worker rank 1 was killed by signal 9" in proc.stdout


def test_killed_worker_fails_the_request_in_flight_and_the_server_exits(tmp_path):
    import openai

    from tests.server.conftest import ServerProcess

    server = ServerProcess(tmp_path, "--tensor-parallel-size", "2")
    try:
        (worker,) = _spawned_workers(server.proc.pid)
        stream = server.client().completions.create(model="smollm2-135m", prompt="Once upon a time",
                                                    max_tokens=400, stream=True, temperature=0)
        chunks = iter(stream)
        assert next(chunks).choices[0].text is not None
        os.kill(worker, signal.SIGKILL)
        with pytest.raises((openai.APIError, openai.APIConnectionError)):
            for _ in chunks:
                pass
        server.proc.wait(timeout=30)
        assert server.proc.returncode == 1
        assert "tensor-parallel worker rank 1 was killed by signal 9" in server.log()
    finally:
        server.stop()


@pytest.mark.parametrize("tensor_type,quantization,activations", [
    ("F16", "none", "bf16"), ("BF16", "none", "bf16"), ("Q8_0", "none", "bf16"), ("Q4_1", "auto", "bf16"),
    ("Q4_1", "auto", "int8")])
def test_two_ranks_on_gguf_tensor_types(tensor_type, quantization, activations, tmp_path, monkeypatch):
    """Column slices of every stored layout: F16 elements, BF16 and block bytes (Q8_0 dequantized,
    Q4_1 kept packed, with bf16 or int8 activations: the workers inherit the choice). Float paths
    equal one rank up to near-ties; the packed path's partial sums round differently per rank:
    tokens agree up to a 0.5-logit near-tie and the first step's top logprob within 0.25 (0.5 with
    int8 activations)."""
    from tests.tiny_models import TinyConfig, random_weights, write_llama_gguf
    from tokenmill.quant import base
    from tokenmill.quant.int4 import Q8_LAYOUT

    if activations == "int8":
        monkeypatch.setenv("TOKENMILL_CPU_INT4_ACTIVATIONS", "int8")
    base.cpu_int4_activations.cache_clear()

    cfg = TinyConfig(hidden=128, intermediate=256, heads=4, kv_heads=2)
    path = tmp_path / f"tiny-{tensor_type}.gguf"
    write_llama_gguf(path, cfg, random_weights(cfg, seed=5), tensor_type)
    kw = {"quantization": quantization} | ({} if quantization == "none" else {"dtype": "auto"})

    def make(size: int) -> LLM:
        return LLM(str(path), device="cpu", tensor_parallel_size=size, kv_cache_memory_gb=0.05,
                   max_model_len=256, show_progress=False, **({"dtype": "float32"} | kw))

    one = make(1)
    if activations == "int8":
        assert one.engine.model.model.layers[0].mlp.down_proj.cpu_tile == Q8_LAYOUT
    ref = one.generate(PROMPTS[:3], PARAMS, use_progress=False)
    two = make(2)
    try:
        ours = two.generate(PROMPTS[:3], PARAMS, use_progress=False)
        if quantization == "none":
            assert _assert_same_greedy(ours, ref) >= 3 * 12
        else:  # bf16 logits: 0.125 resolution here; the packed near-tie bound of tests/quant (0.5)
            for o, r in zip(ours, ref):
                compare_up_to_near_tie(o.outputs[0].token_ids, r.outputs[0].token_ids, margins(r), tol=0.5)
                first_o, first_r = o.outputs[0].logprobs[0], r.outputs[0].logprobs[0]  # same context
                top = max(first_r, key=first_r.get)
                # int8 activations: an input that differs by a bf16 ulp between the runs can flip
                # its code, a step of max|x| / 127 of its block (measured 0.256 here)
                assert abs(first_o[top] - first_r[top]) <= (0.25 if activations == "bf16" else 0.5), \
                    (first_o, first_r)
        file_total = sum(b for b in make_bytes(path))
        assert all(b < 0.6 * file_total for b in two.engine.rank_weight_bytes)
    finally:
        two.engine.shutdown()
        base.cpu_int4_activations.cache_clear()


def make_bytes(path: Path) -> list[int]:
    from gguf import GGUFReader

    return [int(t.n_bytes) for t in GGUFReader(str(path)).tensors]


def test_two_ranks_with_the_compiled_decode_step(llm):
    """--compile with -tp 2: the collectives run eagerly between compiled pieces (graph breaks),
    and the tokens are the single-rank eager ones."""
    tp = _tp_llm("smollm2-135m", 2, compile=True)
    try:
        assert tp.engine.runner.compiled_groups is not None
        ours = tp.generate(PROMPTS[:2], PARAMS, use_progress=False)
        ref = llm.generate(PROMPTS[:2], PARAMS, use_progress=False)
        assert _assert_same_greedy(ours, ref) >= 2 * 16
    finally:
        tp.engine.shutdown()


def _torchrun_generate(nodes: int, node_rank: int, port: int, *args: str) -> list[str]:
    """`torchrun ... -m tokenmill.cli generate ARGS -tp 2` (float32, CPU) as node `node_rank` of
    `nodes` (2 // nodes processes each), rendezvous at 127.0.0.1:port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
            str(2 // nodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1", "--master-port", str(port),
            "-m", "tokenmill.cli", "generate", *args, "--tensor-parallel-size", "2", "--quantization", "none",
            "--dtype", "float32", "--device", "cpu", "--kv-cache-memory-gb", "0.1"]


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-nodes"])
def test_torchrun_launch_generates_what_one_rank_does(llm, nodes):
    """The README's torchrun path: on one node (two processes), and as two nodes (one torchrun
    per node, one process each, rendezvous over TCP as between machines; gloo carries every
    collective since no shared memory spans them). Rank 0 runs `generate`, rank 1 the worker
    loop; every torchrun exits 0 and the text is the single-rank greedy text."""
    port, prompt = _free_port(), PROMPTS[0]

    def torchrun(node_rank: int) -> list[str]:
        return _torchrun_generate(nodes, node_rank, port, prompt, "--max-tokens", "16", "--no-stream")

    env = os.environ | {"TOKENMILL_LOG_LEVEL": "WARNING"}
    others = [subprocess.Popen(torchrun(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env=env) for r in range(1, nodes)]
    try:
        proc = subprocess.run(torchrun(0), capture_output=True, text=True, cwd=ROOT, timeout=300, check=False, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        for other in others:
            _, err = other.communicate(timeout=60)
            assert other.returncode == 0, err[-3000:]
    finally:
        for other in others:
            other.kill()
    ref = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0), use_progress=False)[0]
    assert ref.outputs[0].text.strip() in proc.stdout, (proc.stdout, ref.outputs[0].text)


def test_a_rank_killed_on_another_node_stops_generate_with_a_clear_error():
    """Two torchrun nodes; SIGKILL node 1's rank while node 0 decodes a long output: node 0's
    command exits within seconds with one line saying a rank died (no process watchdog spans
    machines: the collective in flight fails when the peer's socket closes)."""
    port = _free_port()

    def torchrun(node_rank: int) -> list[str]:
        return _torchrun_generate(2, node_rank, port, "Once upon a time", "--max-tokens", "1500", "--ignore-eos")

    env = os.environ | {"TOKENMILL_LOG_LEVEL": "WARNING"}
    nodes = [subprocess.Popen(torchrun(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=env) for r in (1, 0)]
    try:
        assert nodes[1].stdout.read(20)  # node 0 is decoding
        (rank1,) = Path(f"/proc/{nodes[0].pid}/task/{nodes[0].pid}/children").read_text().split()
        os.kill(int(rank1), signal.SIGKILL)
        t0 = time.monotonic()
        _, err = nodes[1].communicate(timeout=60)
        assert time.monotonic() - t0 < 15
    finally:
        for p in nodes:
            p.kill()
            p.communicate()
    assert nodes[1].returncode == 1
    assert "error: a tensor-parallel rank died (Connection" in err, err[-2000:]  # closed or reset by peer


def test_an_impossible_split_is_refused_before_any_worker_starts():
    from tokenmill.config import ConfigError

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"^tensor_parallel_size=20 exceeds the model's 9 attention heads$"):
        _tp_llm("smollm2-135m", 20)
    assert not _spawned_workers(os.getpid()) and time.monotonic() - t0 < 30


def test_draft_model_speculation_with_two_ranks(llm):
    """A whole draft model on rank 0 proposes; the sharded target verifies on both ranks: the
    greedy tokens are the single-rank plain ones, and drafts were accepted."""
    spec = {"method": "draft", "draft_model": "smollm2-135m", "num_speculative_tokens": 3, "adaptive": False}
    tp = _tp_llm("smollm2-135m", 2, speculative=spec)
    try:
        ours = tp.generate(PROMPTS[:2], PARAMS, use_progress=False)
        ref = llm.generate(PROMPTS[:2], PARAMS, use_progress=False)
        assert _assert_same_greedy(ours, ref) >= 2 * 16
        assert tp.engine.stats.spec.num_accepted_tokens > 0
    finally:
        tp.engine.shutdown()


def test_self_speculation_is_refused_with_two_ranks():
    from tokenmill.config import ConfigError

    with pytest.raises(ConfigError, match=r"^speculative method 'self' does not run with tensor_parallel_size > 1"):
        _tp_llm("smollm2-135m", 2, speculative={"method": "self"})
    assert not _spawned_workers(os.getpid())


def test_perplexity_with_two_ranks(llm):
    """eval perplexity under tensor parallelism: each window is a step of the engine's runner on
    both ranks (logits gathered); the result is the single-rank one."""
    from tokenmill.eval.perplexity import perplexity

    text = (ROOT / "tests" / "quant" / "data" / "declaration_of_independence.txt").read_text()
    ids = llm.get_tokenizer().encode(text)[:300]
    one = perplexity(llm.engine, ids, window=128, stride=64)
    tp = _tp_llm("smollm2-135m", 2, num_kv_blocks=8)
    try:
        two = perplexity(tp.engine, ids, window=128, stride=64)
        assert two.scored == one.scored == 299
        assert abs(two.nll - one.nll) < 1e-3 * one.nll, (two.nll, one.nll)
        assert tp.engine.kv.pool.num_free == 8  # the borrowed blocks went back
    finally:
        tp.engine.shutdown()
