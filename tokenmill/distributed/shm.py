"""Shared-memory collectives for ranks on one CPU machine (what gloo does over loopback TCP,
at memory speed).

Gloo's all-reduce of one decode token's [1, hidden] activations costs 0.4-1.3 ms on a 2-core
machine (socket round trips and thread wake-ups), and a forward runs two per layer: more than
the layer's arithmetic. Here every rank owns two slots of one shared segment (double
buffering) and a sequence counter:

    segment:  [flags: int64 x ranks (x 8 for cache lines)] [slot r, buffer b] for r < ranks, b < 2

    op number s (the same on every rank, collectives being called in the same order):
      1. write my tensor into my slot, buffer s % 2
      2. flags[me] = s                         (x86 keeps stores in order: data before flag)
      3. wait until flags[r] >= s for every r
      4. read every rank's slot s % 2          (sum in rank order: the same bits on every rank)

A rank writes buffer s % 2 again at op s + 2 only after every other rank has set its flag to
s + 1 (step 3 of op s + 1), i.e. after each finished reading op s: two buffers suffice.
Waiting spins with sched_yield (a peer is microseconds away inside a step), then sleeps in
growing steps up to 1 ms (an idle server's workers wait here for the next step without
burning a core), and asks `peer_alive` every 50 ms so a dead rank raises instead of hanging.
Tensors larger than a slot go through gloo instead (TPGroup).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from multiprocessing import shared_memory

import numpy as np
import torch

FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each
SLOT_BYTES = 8 << 20


def segment_bytes(size: int) -> int:
    return size * FLAG_STRIDE * 8 + size * 2 * SLOT_BYTES


class ShmGroup:
    """One rank's view of the shared segment `name` (created by rank 0 with `create`)."""

    def __init__(self, name: str, rank: int, size: int, peer_alive: Callable[[], bool],
                 created: shared_memory.SharedMemory | None = None) -> None:
        """created: the segment, on the rank that created it (`close` then unlinks it)."""
        self.rank, self.size, self.peer_alive = rank, size, peer_alive
        self._created = created
        # attaching registers the name with the resource tracker again; spawned ranks share rank
        # 0's tracker, whose set holds it once, and rank 0's unlink removes it
        self._shm = shared_memory.SharedMemory(name=name)
        buf = self._shm.buf
        self._flags = np.ndarray((size, FLAG_STRIDE), dtype=np.int64, buffer=buf)[:, 0]  # view on the segment
        self._data = torch.frombuffer(buf, dtype=torch.uint8, offset=size * FLAG_STRIDE * 8,
                                      count=size * 2 * SLOT_BYTES).view(size, 2, SLOT_BYTES)
        self._seq = 0

    @staticmethod
    def create(size: int) -> shared_memory.SharedMemory:
        shm = shared_memory.SharedMemory(create=True, size=segment_bytes(size))
        np.ndarray((size * FLAG_STRIDE,), dtype=np.int64, buffer=shm.buf)[:] = 0
        return shm

    def fits(self, nbytes: int) -> bool:
        return nbytes <= SLOT_BYTES

    def _exchange(self, payload: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `payload` bytes (uint8 [n], the same n on every rank), as views."""
        self._seq += 1
        seq, b, n = self._seq, self._seq % 2, payload.numel()
        self._data[self.rank, b, :n].copy_(payload)
        self._flags[self.rank] = seq
        self._wait(lambda: int(self._flags.min()) >= seq)
        return [self._data[r, b, :n] for r in range(self.size)]

    def _wait(self, done: Callable[[], bool]) -> None:
        spins, sleep, last_check = 0, 0.0, time.monotonic()
        while not done():
            spins += 1
            if spins < 2000:
                os.sched_yield()
                continue
            sleep = min(1e-3, sleep * 2 or 1e-5)
            time.sleep(sleep)
            now = time.monotonic()
            if now - last_check > 0.05:
                last_check = now
                if not self.peer_alive():
                    from tokenmill.distributed.group import WorkerDiedError

                    raise WorkerDiedError("a tensor-parallel rank died (its process is gone)")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; every rank gets the same bits (summed in rank order)."""
        parts = self._exchange(x.contiguous().view(-1).view(torch.uint8))
        views = [p.view(x.dtype).view(x.shape) for p in parts]
        total = views[0].clone()
        for v in views[1:]:
            total += v
        return x.copy_(total)

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape everywhere), copied out of the segment."""
        parts = self._exchange(x.contiguous().view(-1).view(torch.uint8))
        return [p.view(x.dtype).view(x.shape).clone() for p in parts]

    def broadcast_object(self, obj=None):
        """Rank 0's object on every rank (pickled; None if it does not fit — the caller then
        uses gloo). Length first so that every rank exchanges the same number of bytes."""
        data = pickle.dumps(obj) if self.rank == 0 else b""
        header = torch.tensor([len(data)], dtype=torch.int64)
        n = int(self._exchange(header.view(torch.uint8))[0].view(torch.int64)[0])  # rank 0's length
        if not self.fits(n):
            raise ValueError("too large for a slot")
        payload = torch.zeros(n, dtype=torch.uint8)
        if self.rank == 0:
            payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        parts = self._exchange(payload)
        return pickle.loads(parts[0].numpy().tobytes())

    def close(self) -> None:
        """Unmap (and, on the creating rank, unlink) the segment; idempotent."""
        self._flags = self._data = None
        for shm in (self._shm, self._created):
            if shm is not None:
                try:
                    shm.close()
                except BufferError:  # a tensor still views the segment; the mapping goes with the process
                    pass
        if self._created is not None:
            try:
                self._created.unlink()
            except FileNotFoundError:
                pass
            self._created = None
