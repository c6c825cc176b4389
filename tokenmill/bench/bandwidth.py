"""STREAM-style memory bandwidth of this machine: copy and triad over arrays far larger than cache.

As in McCalpin's STREAM (https://www.cs.virginia.edu/stream/), bytes counted are those the kernel
must read plus those it writes, without write-allocate traffic:

    copy   a[i] = b[i]              2 * 8 bytes per element
    triad  a[i] = b[i] + s * c[i]   3 * 8 bytes per element

The result is the median over repeats, in GB/s (1e9 bytes). `cached_bandwidth()` measures once per
machine and keeps the JSON in the user cache dir, so benchmarks can print achieved bandwidth beside
this peak without paying for the probe each time.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROBE_THREADS = 2
CACHE_FILE = "bandwidth.json"


def cache_dir() -> Path:
    """$TOKENMILL_CACHE_DIR, else $XDG_CACHE_HOME/tokenmill, else ~/.cache/tokenmill."""
    if os.environ.get("TOKENMILL_CACHE_DIR"):
        return Path(os.environ["TOKENMILL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenmill"


def machine_signature() -> str:
    """Identifies the machine a cached measurement belongs to."""
    return f"{platform.machine()} {platform.processor() or platform.node()} cpus={os.cpu_count()}"


@dataclass(frozen=True)
class BandwidthResult:
    """Median STREAM copy and triad bandwidth in GB/s."""

    copy_gbs: float
    triad_gbs: float
    size_mb: int = 0
    repeats: int = 0
    threads: int = PROBE_THREADS
    machine: str = ""

    def __post_init__(self) -> None:
        if self.copy_gbs <= 0 or self.triad_gbs <= 0:
            raise ValueError("bandwidth must be > 0")

    @property
    def peak_gbs(self) -> float:
        return max(self.copy_gbs, self.triad_gbs)


def measure_bandwidth(
    size_mb: int = 512, repeats: int = 10, *, progress: bool = True
) -> BandwidthResult:
    """Run copy and triad `repeats` times over float64 arrays of `size_mb` MB each, on 2 threads.

    Allocates three arrays (3 * size_mb MB); nothing is kept afterwards."""
    import torch

    if size_mb < 1 or repeats < 1:
        raise ValueError("size_mb and repeats must be >= 1")
    n = size_mb * 1_000_000 // 8
    previous = torch.get_num_threads()
    torch.set_num_threads(min(PROBE_THREADS, os.cpu_count() or 1))
    try:
        a = torch.zeros(n, dtype=torch.float64)
        b = torch.ones(n, dtype=torch.float64)
        c = torch.full((n,), 2.0, dtype=torch.float64)
        copy_times: list[float] = []
        triad_times: list[float] = []
        with _progress(progress, repeats) as advance:
            a.copy_(b)  # first touch, so page faults are not timed
            for _ in range(repeats):
                t0 = time.perf_counter()
                a.copy_(b)
                copy_times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                torch.add(b, c, alpha=3.0, out=a)
                triad_times.append(time.perf_counter() - t0)
                advance()
    finally:
        torch.set_num_threads(previous)
    return BandwidthResult(
        copy_gbs=2 * 8 * n / statistics.median(copy_times) / 1e9,
        triad_gbs=3 * 8 * n / statistics.median(triad_times) / 1e9,
        size_mb=size_mb,
        repeats=repeats,
        threads=min(PROBE_THREADS, os.cpu_count() or 1),
        machine=machine_signature(),
    )


class _progress:
    """A rich progress bar when asked for, a no-op otherwise; yields an `advance()` callable."""

    def __init__(self, show: bool, total: int) -> None:
        self.show, self.total, self.bar = show, total, None

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("STREAM copy + triad", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


def cached_bandwidth(refresh: bool = False) -> BandwidthResult:
    """This machine's bandwidth: read from the cache dir, or measured once and saved there."""
    path = cache_dir() / CACHE_FILE
    if not refresh and path.is_file():
        try:
            result = BandwidthResult(**json.loads(path.read_text()))
            if result.machine == machine_signature():
                return result
        except (ValueError, TypeError):
            pass  # stale or foreign file: measure again
    result = measure_bandwidth()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result), indent=2))
    return result


def bandwidth_command(json_out: bool = False) -> None:
    """`tokenmill bench bandwidth`: measure now, refresh the cache, print a table or JSON."""
    result = cached_bandwidth(refresh=True)
    if json_out:
        print(json.dumps({**asdict(result), "peak_gbs": result.peak_gbs}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"memory bandwidth (STREAM, {result.threads} threads, median of {result.repeats})"
    )
    table.add_column("kernel")
    table.add_column("bytes / element", justify="right")
    table.add_column("GB/s", justify="right")
    table.add_row("copy  a = b", "16", f"{result.copy_gbs:.1f}")
    table.add_row("triad a = b + s*c", "24", f"{result.triad_gbs:.1f}")
    table.add_row("peak", "", f"{result.peak_gbs:.1f}")
    Console().print(table)
    print(f"cached in {cache_dir() / CACHE_FILE}")
