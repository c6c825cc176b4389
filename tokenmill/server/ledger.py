"""The usage ledger: one SQLite row per served request, committed before its final response.

Durability: WAL journal with synchronous=FULL, so a committed row survives kill -9 of the
server (and a power cut). The request handler awaits the commit before it sends the last
chunk, so every request a client saw complete is in the ledger.

One writer thread owns the connection and commits in groups: rows that arrive while a commit
is running go into the next transaction together, so a busy server pays one fsync per group,
not per request. Readers (`tokenmill usage`) open their own connection; WAL lets them read
while the server writes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

log = logging.getLogger("tokenmill.server")


def default_ledger_path() -> Path:
    from platformdirs import user_data_path

    return user_data_path("tokenmill") / "usage.sqlite"


@dataclass(frozen=True)
class UsageRecord:
    request_id: str
    created_at: float  # unix seconds at arrival
    api_key: str  # the key's label, never the key
    user: str | None
    model: str
    endpoint: str  # completions | chat.completions
    n: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | abort (the last choice to finish; abort if any aborted)
    ttft_s: float | None
    e2e_s: float
    input_per_mtok: float
    cached_input_per_mtok: float
    output_per_mtok: float
    price_usd: float

    @property
    def day(self) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(self.created_at))


_COLUMNS = [f.name for f in fields(UsageRecord)]
_TYPES = {"str": "TEXT", "str | None": "TEXT", "float": "REAL", "float | None": "REAL", "int": "INTEGER"}
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS requests (\n    "
    + ",\n    ".join(f"{f.name} {_TYPES[str(f.type)]}" + (" PRIMARY KEY" if f.name == "request_id" else "")
                     for f in fields(UsageRecord))
    + ",\n    day TEXT NOT NULL\n);\n"
    "CREATE INDEX IF NOT EXISTS requests_key_day ON requests (api_key, day);"
)
_INSERT = (f"INSERT OR REPLACE INTO requests ({', '.join(_COLUMNS)}, day) "
           f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


_STOP = object()


class UsageLedger:
    """Append-only ledger at `path` (created with its directory). Thread-safe `record()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(self.path)  # fail at startup, not at the first request
        try:
            conn.executescript(SCHEMA)
        finally:
            conn.close()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="tokenmill-ledger", daemon=True)
        self._thread.start()

    def record(self, record: UsageRecord) -> concurrent.futures.Future:
        """Queue one row; the future completes once it is committed (or fails with the error)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((record, future))
        return future

    async def commit(self, record: UsageRecord) -> None:
        """Record and wait for the commit; a failed write is logged, never raised to the client."""
        try:
            await asyncio.wrap_future(self.record(record))
        except sqlite3.Error:
            log.exception("usage ledger: could not record request %s", record.request_id)

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued and stop the writer."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        conn = _connect(self.path)
        try:
            while True:
                batch = [self._queue.get()]
                while True:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = any(item is _STOP for item in batch)
                rows = [item for item in batch if item is not _STOP]
                if rows:
                    self._write(conn, rows)
                if stop:
                    return
        finally:
            conn.close()

    def _write(self, conn: sqlite3.Connection, rows: list[tuple[UsageRecord, concurrent.futures.Future]]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, [(*astuple(r), r.day) for r, _ in rows])
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for _, future in rows:
                _settle(future, e)
            return
        for _, future in rows:
            _settle(future, None)


def _settle(future: concurrent.futures.Future, error: BaseException | None) -> None:
    """Complete a waiter's future; a waiter that gave up (cancelled) does not stop the write."""
    try:
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    except concurrent.futures.InvalidStateError:
        pass


def read_records(path: str | Path) -> list[UsageRecord]:
    """Every row, oldest first (tests and exports)."""
    conn = _open_existing(path)
    try:
        cursor = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM requests ORDER BY created_at, request_id")
        return [UsageRecord(*row) for row in cursor]
    finally:
        conn.close()


def totals_by_key_and_day(path: str | Path, api_key: str | None = None, since: str | None = None) -> list[dict]:
    """Sums per (day, key label): requests, prompt/cached/completion tokens and price."""
    where, args = [], []
    if api_key is not None:
        where.append("api_key = ?")
        args.append(api_key)
    if since is not None:
        where.append("day >= ?")
        args.append(since)
    sql = (
        "SELECT day, api_key, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
        "SUM(price_usd) FROM requests" + (" WHERE " + " AND ".join(where) if where else "")
        + " GROUP BY day, api_key ORDER BY day, api_key"
    )
    conn = _open_existing(path)
    try:
        names = ("day", "api_key", "requests", "prompt_tokens", "cached_tokens", "completion_tokens", "price_usd")
        return [dict(zip(names, row)) for row in conn.execute(sql, args)]
    finally:
        conn.close()


def _open_existing(path: str | Path) -> sqlite3.Connection:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no usage ledger at {path}")
    return sqlite3.connect(path, timeout=30.0)
