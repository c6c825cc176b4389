"""What lies around the CUDA graphs, on CPU: worker/cuda_graphs.py's static buffers, bucket
padding, scratch block and refilled host rows, wired by load_shard as on a GPU, with each captured
graph replaced by a replay that runs the model on the same static buffers. The graphs themselves
need CUDA (tests/gpu); the staging does not, and a mistake in it shows here as a wrong token."""

from __future__ import annotations

import pytest
import torch

from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker import cuda_graphs
from tests.golden import PROMPTS

pytestmark = pytest.mark.slow


class Replay:
    """A captured graph's stand-in: runs the model on the buffers it was captured with and
    writes the static output in place, as a replay does."""

    def __init__(self, decoder: cuda_graphs.CudaGraphDecoder, b: int, args: tuple) -> None:
        self.decoder, self.b, self.args = decoder, b, args
        self.replays = 0

    def replay(self) -> None:
        d, b = self.decoder, self.b
        n = d.real_rows  # the step's own rows; the rest of the bucket must be padding
        assert (d.slots[n:b] == d.pad_slot).all() and (d.tables[n:b] == d.scratch_block).all()
        assert (d.ctx_lens[n:b] == 1).all() and (d.slots[:n] != d.pad_slot).all()
        with no_recompiles():
            d.hidden[b].copy_(d.model(*self.args, d.groups))
        self.replays += 1


def no_recompiles():
    """Compiled layer groups (--compile) were traced by the runner's dummy decodes at batch 1
    and 2 (dynamic); a graph's buffers must pass their guards, not compile them again."""
    return torch._dynamo.config.patch(error_on_recompile=True)


@torch.inference_mode()
def _capture_on_cpu(self: cuda_graphs.CudaGraphDecoder) -> None:
    for b in reversed(self.buckets):
        args = (self.ids[:b], self.positions[:b], self.kv_caches, self._meta(b))
        with no_recompiles():
            self.hidden[b] = self.model(*args, self.groups)
        self.graphs[b] = Replay(self, b, args)


@pytest.fixture
def staged(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "usable", lambda device, kv_cache_dtype: True)
    monkeypatch.setattr(cuda_graphs.CudaGraphDecoder, "_capture", _capture_on_cpu)
    run = cuda_graphs.CudaGraphDecoder.run

    def counted(self, step):
        self.real_rows = len(step.token_ids)
        return run(self, step)

    monkeypatch.setattr(cuda_graphs.CudaGraphDecoder, "run", counted)


@pytest.mark.parametrize("compile", [False, True], ids=["eager-layers", "compiled-layers"])
def test_staged_decode_gives_the_eager_tokens(staged, llm, compile):
    """Two rounds through a pool small enough that the second reuses the first's blocks: seven
    requests (bucket 8 with a padded row; the longest holds block 0, where a misdirected padding
    write would land), then six others (two padded rows where the first round's requests left
    their rows, in blocks now the second round's); both shrink through buckets 4, 2, 1 as their
    requests finish. Greedy tokens are the eager engine's."""
    graphs = LLM("smollm2-135m", device="cpu", dtype="float32", quantization="none", max_num_seqs=8,
                 kv_cache_memory_gb=0.018, max_model_len=256, compile=compile, show_progress=False)
    engine = graphs.engine
    decoder = engine.runner.cuda_graphs
    assert decoder is not None and decoder.buckets == [1, 2, 4, 8] and engine.num_blocks < 30
    assert (decoder.groups is not None) == compile
    assert decoder.scratch_block == engine.num_blocks  # the pool's extra block: no request owns it
    # inference tensors, as the compiled layer groups were traced with (their guards check it)
    assert decoder.buffer.is_inference() and decoder.rows.is_inference()
    rounds = [(PROMPTS[:7], [SamplingParams(temperature=0, max_tokens=30 - 2 * i, ignore_eos=True) for i in range(7)]),
              ([p + " And then" for p in PROMPTS[:6]],
               [SamplingParams(temperature=0, max_tokens=30 - 4 * i, ignore_eos=True) for i in range(6)])]
    pool, taken = engine.kv.pool, []
    allocate = pool.allocate

    def recording(n):
        blocks = allocate(n)
        taken[-1].update(blocks)
        return blocks

    pool.allocate = recording
    for prompts, params in rounds:
        taken.append(set())
        ours = graphs.generate(prompts, params, use_progress=False)
        ref = llm.generate(prompts, params, use_progress=False)
        assert [o.outputs[0].token_ids for o in ours] == [r.outputs[0].token_ids for r in ref]
    assert 0 in taken[0] and taken[0] & taken[1]  # the second round wrote where the first had
    replays = {b: g.replays for b, g in decoder.graphs.items()}
    assert all(replays[b] > 0 for b in (1, 2, 4, 8)), replays  # every bucket, padded ones included


def test_buckets_end_at_max_num_seqs():
    assert cuda_graphs.buckets_for(8) == [1, 2, 4, 8]
    assert cuda_graphs.buckets_for(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert cuda_graphs.buckets_for(1) == [1] and cuda_graphs.buckets_for(3) == [1, 2, 3]
    assert cuda_graphs.buckets_for(1000)[-2:] == [128, 256]  # larger batches decode eagerly
