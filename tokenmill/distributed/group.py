"""TPGroup: the collectives a tensor-parallel forward needs, over torch.distributed.

Backend: NCCL on CUDA, gloo on CPU. The group is an explicit object handed to the modules
that communicate (no module-global state): a model built without one runs on one device.

Per decoder layer a forward does two all-reduces (after o_proj and after down_proj), plus one
for the embedding lookup and one all-gather of the logits per step; rank 0 broadcasts each
step's batch first (`broadcast_object`).

Two groups: tensors go through the default group (NCCL or gloo), Python objects — each step's
batch, start-up handshakes — through a gloo group of their own (`control`). An idle server's
workers wait for the next batch there, on sockets, for as long as it stays idle; so the tensor
group can keep a bounded timeout (a collective inside a step that waits minutes is a lost
peer), and with NCCL the batch travels host to host instead of through device memory and a
sync. A peer that dies closes its sockets and gloo raises at once; `WorkerDiedError` carries
that to the engine.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tokenmill.distributed.shm import ShmGroup


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank is gone; the engine cannot continue."""


# an idle server waits in the control group's broadcast for its next step: no timeout short
# enough to fire then
CONTROL_TIMEOUT = datetime.timedelta(days=7)
# a tensor collective runs inside a step, where every rank is busy with the same forward; the
# longest legitimate wait is a peer still compiling at start-up
TENSOR_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class TPGroup:
    """shm: shared-memory collectives (ranks on one CPU machine, distributed/shm.py); used for
    every tensor that fits its slots, gloo/NCCL for the rest."""

    rank: int
    size: int
    device: torch.device
    shm: ShmGroup | None = None
    control: dist.ProcessGroup | None = None  # gloo, for Python objects (None: the default group)

    # the collectives run eagerly inside a compiled decode step (a graph break each): dynamo
    # cannot trace the shared-memory waits or gloo
    @torch.compiler.disable
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over ranks (in place; returns x)."""
        if self.shm is not None and self.shm.fits(x.numel() * x.element_size()):
            return self.shm.all_reduce(x)
        _guard(dist.all_reduce, x)
        return x

    @torch.compiler.disable
    def all_gather_last(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each rank's x [N, sizes[rank]] along the last dim: [N, sum(sizes)]."""
        width = max(sizes)
        padded = torch.nn.functional.pad(x, (0, width - x.shape[-1])).contiguous()  # [N, width]
        if self.shm is not None and self.shm.fits(padded.numel() * padded.element_size()):
            parts = self.shm.all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(self.size)]
            _guard(dist.all_gather, parts, padded)
        return torch.cat([p[..., :n] for p, n in zip(parts, sizes)], dim=-1)

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order."""
        out = [None] * self.size
        _guard(dist.all_gather_object, out, obj, group=self.control)
        return out

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled; the step's batch is a few KB)."""
        if self.shm is not None:
            try:
                return self.shm.broadcast_object(obj)
            except ValueError:  # larger than a slot (every rank learns so together)
                pass
        box = [obj]
        _guard(dist.broadcast_object_list, box, src=0, group=self.control)
        return box[0]


_PEER_GONE = re.compile(r"(Connection closed by peer \S+?|Connection reset by peer|Broken pipe)[.,]?(\s|$)")


def _guard(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        gone = _PEER_GONE.search(str(e))
        if gone:  # e.g. gloo: "[.../pair.cc:553] Connection closed by peer [10.0.0.2]:18351. This is ..."
            raise WorkerDiedError(f"a tensor-parallel rank died ({gone.group(1)}); the engine cannot "
                                  "continue") from None
        raise


def init_group(rank: int, size: int, device: torch.device, master_addr: str | None = None,
               master_port: int | None = None, shm: ShmGroup | None = None) -> TPGroup:
    """Join the default process group (env:// when addr/port are not given: torchrun sets them)."""
    if master_addr is not None:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = master_addr, str(master_port)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=size, timeout=TENSOR_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TPGroup(rank, size, device, shm, control)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                   and "MASTER_ADDR" in os.environ)
