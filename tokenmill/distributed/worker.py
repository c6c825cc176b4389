"""Starting tensor-parallel ranks, and what ranks other than 0 do.

    rank 0 (the engine)                       rank r > 0 (a worker)
    scheduler -> step batch --broadcast-->    receive the batch
    forward on its shard   <--all-reduce-->   forward on its shard
    logits  <------------------all-gather--   (its vocabulary rows)
    sample, detokenize, serve                 wait for the next batch; None ends the loop

One machine: `--tensor-parallel-size N` makes rank 0 spawn ranks 1..N-1 itself (loopback
rendezvous on a free port). Several machines: torchrun starts every rank with RANK/WORLD_SIZE/
MASTER_ADDR set; rank 0 runs the command given, the others enter the worker loop and exit when
rank 0 does (README, "Tensor parallelism").

Fault handling: a watchdog thread on rank 0 waits on the spawned processes; when one dies it
records which and with what exit code and calls the engine's listeners (an idle server learns
of it at once). A collective in flight fails by itself on gloo, which raises when a peer's
socket closes; the engine turns that into WorkerDiedError with the watchdog's message. An NCCL
collective does not: it waits on the GPU for the rank that is gone, and the step with it. So
when the engine is still inside a step `stuck_grace_s` after a death, the watchdog ends the
process with status 1 and the reason (clients of the requests in flight see their connections
close). Across machines (torchrun) no watchdog sees the other machines' processes: gloo still
fails at once, NCCL when its collective times out (group.TENSOR_TIMEOUT).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from tokenmill.config import EngineConfig
from tokenmill.distributed.group import TPGroup, WorkerDiedError, init_group, launched_by_torchrun
from tokenmill.distributed.shm import ShmGroup

log = logging.getLogger("tokenmill")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _threads(config: EngineConfig, size: int) -> None:
    """Ranks on one CPU share its cores: each takes its part unless --threads says otherwise."""
    if config.threads is None and size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


class TPLauncher:
    """Rank 0's handle on the worker processes it spawned: watchdog and orderly shutdown."""

    def __init__(self, procs: list[mp.Process], tp: TPGroup) -> None:
        self.procs = procs  # procs[i] is rank i + 1
        self.tp = tp
        self.death: str | None = None
        self.died = threading.Event()
        self._listeners: list[Callable[[WorkerDiedError], None]] = []
        self._stopping = False
        self.stepping = False  # the engine is inside a step's forward (set by the engine)
        self.stuck_grace_s = 10.0
        self._watchdog = threading.Thread(target=self._watch, name="tokenmill-tp-watchdog", daemon=True)
        self._watchdog.start()

    def on_death(self, listener: Callable[[WorkerDiedError], None]) -> None:
        self._listeners.append(listener)
        if self.death is not None:
            listener(WorkerDiedError(self.death))

    def _watch(self) -> None:
        ready = wait([p.sentinel for p in self.procs])
        if self._stopping:
            return
        rank = next(i + 1 for i, p in enumerate(self.procs) if p.sentinel in ready)
        self.procs[rank - 1].join(1)  # reap it: exitcode is None until then
        code = self.procs[rank - 1].exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        self.death = f"tensor-parallel worker rank {rank} {how}; the engine cannot continue"
        log.error("%s", self.death)
        self.died.set()
        for listener in self._listeners:
            listener(WorkerDiedError(self.death))
        self._exit_if_stuck()

    def _exit_if_stuck(self) -> None:
        """End the process if the step in flight has not failed within the grace period (an
        NCCL collective waiting for the dead rank never returns)."""
        deadline = time.monotonic() + self.stuck_grace_s
        while time.monotonic() < deadline:
            if not self.stepping or self._stopping:
                return
            time.sleep(0.05)
        log.error("the step in flight is still waiting for the dead rank after %.0f s; exiting", self.stuck_grace_s)
        print(f"error: {self.death}", file=sys.stderr, flush=True)
        os._exit(1)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Tell the workers to leave their loop, wait for them, leave the process group."""
        if self._stopping:
            return
        self._stopping = True
        if self.death is None:
            try:
                self.tp.broadcast_object(None)
            except (WorkerDiedError, RuntimeError):
                pass
        for p in self.procs:
            p.join(timeout)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.tp.shm is not None:
            self.tp.shm.close()  # rank 0 created the segment: this unlinks it


def start_tensor_parallel(config: EngineConfig, device: torch.device) -> tuple[TPGroup, TPLauncher | None]:
    """Rank 0's group. Spawns the other ranks on this machine, or, under torchrun, joins the
    group torchrun set up (a rank other than 0 runs the worker loop here and then exits)."""
    size = config.tensor_parallel_size
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if world != size:
            from tokenmill.config import ConfigError

            raise ConfigError(f"--tensor-parallel-size {size} but torchrun started {world} processes")
        tp = init_group(rank, size, _rank_device(device, int(os.environ.get("LOCAL_RANK", rank))))
        if device.type == "cpu" and int(os.environ.get("LOCAL_WORLD_SIZE", "0")) == size:
            tp = _with_shm(tp)  # every rank on this machine: shared-memory collectives
        if rank != 0:
            run_worker(config, tp)
            sys.exit(0)
        _threads(config, int(os.environ.get("LOCAL_WORLD_SIZE", size)))
        return tp, None
    port = _free_port()
    segment = ShmGroup.create(size) if device.type == "cpu" else None  # CPU ranks: shared-memory collectives
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker_main, args=(config, rank, size, port, segment and segment.name),
                         name=f"tokenmill-tp{rank}", daemon=True) for rank in range(1, size)]
    for p in procs:
        p.start()
    _threads(config, size)
    shm = None
    if segment is not None:
        shm = ShmGroup(segment.name, 0, size, peer_alive=lambda: all(p.is_alive() for p in procs), created=segment)
    tp = _join_watching(procs, lambda: init_group(0, size, _rank_device(device, 0), "127.0.0.1", port, shm))
    return tp, TPLauncher(procs, tp)


def _join_watching(procs: list[mp.Process], join: Callable[[], TPGroup]) -> TPGroup:
    """Run the rendezvous, failing fast if a worker dies before it joins (a rendezvous would
    otherwise wait for it as long as the collective timeout)."""
    box: dict = {}

    def target() -> None:
        try:
            box["tp"] = join()
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=target, name="tokenmill-tp-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        dead = [(i + 1, p.exitcode) for i, p in enumerate(procs) if not p.is_alive()]
        if dead and thread.is_alive():
            rank, code = dead[0]
            raise WorkerDiedError(f"tensor-parallel worker rank {rank} exited with status {code} before "
                                  "joining the group (its log above says why)")
    if "error" in box:
        raise box["error"]
    return box["tp"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _with_shm(tp: TPGroup) -> TPGroup:
    """Ranks torchrun started on one machine: rank 0 creates the segment and tells the others
    its name (over gloo); a peer counts as dead once its process id is gone."""
    segment = ShmGroup.create(tp.size) if tp.rank == 0 else None
    name = tp.broadcast_object(segment.name if segment is not None else None)
    pids = tp.all_gather_object(os.getpid())
    shm = ShmGroup(name, tp.rank, tp.size, peer_alive=lambda: all(_pid_alive(p) for p in pids), created=segment)
    return dataclasses.replace(tp, shm=shm)


def worker_main(config: EngineConfig, rank: int, size: int, port: int, segment: str | None) -> None:
    """Entry of a spawned rank."""
    from tokenmill.engine.llm_engine import resolve_device
    from tokenmill.logs import setup_logging

    setup_logging()
    _threads(config, size)
    parent = os.getppid()
    shm = None if segment is None else ShmGroup(segment, rank, size, peer_alive=lambda: os.getppid() == parent)
    tp = init_group(rank, size, _rank_device(resolve_device(config.device), rank), "127.0.0.1", port, shm)
    run_worker(config, tp)


def run_worker(config: EngineConfig, tp: TPGroup) -> None:
    """Load this rank's shard, then run every step rank 0 broadcasts until it sends None (or
    goes away)."""
    from tokenmill.engine.llm_engine import load_shard, resolve_weights, settle_memory

    torch.manual_seed(config.seed)
    path, quantization, dtype = resolve_weights(config, tp.device)
    try:
        shard = load_shard(config, path, quantization, dtype, tp.device, tp, show_progress=False)
        tp.all_gather_object(shard.weight_bytes())  # rank 0 reports every rank's bytes
        settle_memory()
        while (step := tp.broadcast_object()) is not None:
            shard.runner.run_step(step)
    except WorkerDiedError:
        return  # rank 0 went away: nothing left to serve
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if tp.shm is not None:
            tp.shm.close()
