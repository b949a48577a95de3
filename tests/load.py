"""A reusable mixed read/write load for failover tests (a helper, not a test module).

Writers insert unique ids through ``pool.execute`` and remember an id as
*acknowledged* only once ``execute`` has returned; readers run a cheap query
through ``pool.fetchval``. Every outcome is recorded with its monotonic time
(``time.monotonic()``, the event loop's clock); an error is recorded, never
raised, so the load keeps going through a failover::

    load = MixedLoad(pool, writers=2, readers=2, max_duration=30)
    load.start()
    ...                                   # kill something
    await load.wait_for_write_after(t_kill, timeout=20)
    report = await load.stop()            # every task is cancelled and gathered
    missing = set(report.acked) - ids_present_on_the_new_primary

The load is bounded: it stops by itself after ``max_duration`` seconds or
``max_writes`` / ``max_reads`` operations, and each operation is bounded by
``op_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

__all__ = ["ErrorRecord", "LoadReport", "MixedLoad", "ReadRecord", "WriteRecord"]

CREATE_TABLE = "CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY)"
INSERT = "INSERT INTO acked(id) VALUES ($1)"
COUNT = "select count(*) from acked"


class _PoolLike(Protocol):
    """What the load needs: picopool.Pool and asyncpg.Pool both qualify."""

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...

    async def fetchval(
        self, query: str, *args: Any, column: int = 0, timeout: float | None = None
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class ErrorRecord:
    """One failed operation: when it ended, what was raised, and (for writes) the id."""

    at: float
    kind: str  # "write" or "read"
    type: str
    message: str
    id: int | None = None
    started: float = 0.0


@dataclass(frozen=True, slots=True)
class WriteRecord:
    """One acknowledged write: ``execute`` returned at ``at``."""

    id: int
    at: float
    started: float


@dataclass(frozen=True, slots=True)
class ReadRecord:
    """One read, successful or not, as it ended."""

    at: float
    ok: bool
    started: float


@dataclass
class LoadReport:
    """What :meth:`MixedLoad.stop` returns."""

    started: float
    stopped: float
    writes: list[WriteRecord] = field(default_factory=list)
    write_errors: list[ErrorRecord] = field(default_factory=list)
    reads: list[ReadRecord] = field(default_factory=list)
    read_errors: list[ErrorRecord] = field(default_factory=list)
    #: ids of writes that raised: their outcome is unknown (may or may not be committed)
    unknown_ids: list[int] = field(default_factory=list)

    @property
    def acked(self) -> list[int]:
        """Ids whose ``execute`` returned, in the order they were acknowledged."""
        return [w.id for w in self.writes]

    @property
    def reads_ok(self) -> int:
        return sum(r.ok for r in self.reads)

    @property
    def reads_failed(self) -> int:
        return sum(not r.ok for r in self.reads)

    @property
    def duration(self) -> float:
        return self.stopped - self.started

    def first_write_after(self, instant: float) -> WriteRecord | None:
        """The first write acknowledged at or after *instant* (monotonic time)."""
        return next((w for w in self.writes if w.at >= instant), None)

    def first_write_started_after(self, instant: float) -> WriteRecord | None:
        """The first acknowledged write that was *sent* at or after *instant*."""
        return min(
            (w for w in self.writes if w.started >= instant), key=lambda w: w.at, default=None
        )

    def first_read_after(self, instant: float) -> ReadRecord | None:
        return next((r for r in self.reads if r.ok and r.at >= instant), None)

    def writes_between(self, start: float, end: float) -> list[WriteRecord]:
        return [w for w in self.writes if start <= w.at < end]

    def errors_by_type(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for error in (*self.write_errors, *self.read_errors):
            key = f"{error.kind}:{error.type}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly digest for logs."""
        return {
            "duration_s": round(self.duration, 3),
            "acked_writes": len(self.writes),
            "write_errors": len(self.write_errors),
            "reads_ok": self.reads_ok,
            "reads_failed": self.reads_failed,
            "errors": self.errors_by_type(),
        }


def _ids_from(start: int) -> Iterator[int]:
    return itertools.count(start)


class MixedLoad:
    """W writer tasks and R reader tasks against one pool; see the module docstring.

    ``id_start`` is the first id written (default: derived from the wall clock
    in microseconds, so loads started at different times on one table do not
    collide). Ids are never reused, not even the id of a write that failed.
    ``write_interval`` / ``read_interval`` pace each task (0: as fast as the
    pool answers); ``error_pause`` is the pause after a failure, so a pool that
    fails at once does not spin.
    """

    def __init__(
        self,
        pool: _PoolLike,
        *,
        writers: int = 2,
        readers: int = 2,
        insert_query: str = INSERT,
        read_query: str = COUNT,
        id_start: int | None = None,
        max_duration: float = 60.0,
        max_writes: int = 100_000,
        max_reads: int = 1_000_000,
        op_timeout: float = 10.0,
        write_interval: float = 0.0,
        read_interval: float = 0.0,
        error_pause: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if writers < 0 or readers < 0:
            raise ValueError("writers and readers must be >= 0")
        if max_duration <= 0 or op_timeout <= 0:
            raise ValueError("max_duration and op_timeout must be positive")
        self._pool = pool
        self._writers = writers
        self._readers = readers
        self._insert = insert_query
        self._read = read_query
        self._ids = _ids_from(id_start if id_start is not None else time.time_ns() // 1000)
        self._max_duration = max_duration
        self._max_writes = max_writes
        self._max_reads = max_reads
        self._op_timeout = op_timeout
        self._write_interval = write_interval
        self._read_interval = read_interval
        self._error_pause = error_pause
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._writes_started = 0
        self._reads_started = 0
        self._deadline = 0.0
        self._report: LoadReport | None = None
        self._final: LoadReport | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> MixedLoad:
        """Start the tasks (on the running loop); returns at once."""
        if self._report is not None:
            raise RuntimeError("a MixedLoad can be started only once")
        now = self._clock()
        self._report = LoadReport(started=now, stopped=now)
        self._deadline = now + self._max_duration
        self._tasks = [asyncio.ensure_future(self._writer()) for _ in range(self._writers)]
        self._tasks += [asyncio.ensure_future(self._reader()) for _ in range(self._readers)]
        return self

    async def stop(self, grace: float = 1.0) -> LoadReport:
        """Stop every task (let each finish its operation for up to *grace* s, then cancel).

        Idempotent: a second call returns the same report.
        """
        if self._final is not None:
            return self._final
        report = self._require_report()
        self._stopping.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            # The tasks record their own errors; anything else surfaced here is a bug
            # in the driver, which gather() hands back instead of raising.
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException) and not isinstance(
                    result, asyncio.CancelledError
                ):
                    raise RuntimeError("a load task crashed") from result
        report.stopped = self._clock()
        self._final = report
        return report

    async def __aenter__(self) -> MixedLoad:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop(grace=0.0 if exc is not None else 1.0)

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    @property
    def report(self) -> LoadReport:
        """The live report (still growing while the load runs)."""
        return self._require_report()

    def _require_report(self) -> LoadReport:
        if self._report is None:
            raise RuntimeError("the load was not started")
        return self._report

    # -- waiting -----------------------------------------------------------------------

    async def wait_for_write_after(
        self, instant: float, timeout: float, count: int = 1
    ) -> WriteRecord:
        """Wait until *count* writes have been acknowledged at or after *instant*."""
        found: WriteRecord = await self._wait(
            lambda: self._nth_write_after(instant, count),
            timeout,
            f"{count} acknowledged write(s) after t={instant:.3f}",
        )
        return found

    async def wait_for_reads(self, count: int, timeout: float) -> None:
        """Wait until *count* reads succeeded in total."""
        report = self._require_report()
        await self._wait(
            lambda: report.reads_ok >= count or None, timeout, f"{count} successful reads"
        )

    def _nth_write_after(self, instant: float, count: int) -> WriteRecord | None:
        after = [w for w in self._require_report().writes if w.at >= instant]
        return after[count - 1] if len(after) >= count else None

    async def _wait(self, probe: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = self._clock() + timeout
        while True:
            found = probe()
            if found:
                return found
            if self._clock() >= deadline:
                summary = self._require_report().summary()
                raise TimeoutError(f"no {what} within {timeout} s (load so far: {summary})")
            if not self.running:
                raise RuntimeError(f"the load stopped before {what}")
            await asyncio.sleep(0.01)

    # -- tasks -------------------------------------------------------------------------

    def _keep_going(self) -> bool:
        return not self._stopping.is_set() and self._clock() < self._deadline

    async def _pause(self, seconds: float) -> None:
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _writer(self) -> None:
        report = self._require_report()
        while self._keep_going() and self._writes_started < self._max_writes:
            self._writes_started += 1
            new_id = next(self._ids)
            started = self._clock()
            try:
                async with asyncio.timeout(self._op_timeout):
                    await self._pool.execute(self._insert, new_id)
            except Exception as exc:  # recorded, never raised: the load goes on
                report.unknown_ids.append(new_id)
                report.write_errors.append(_error("write", exc, started, self._clock(), new_id))
                await self._pause(self._error_pause)
                continue
            report.writes.append(WriteRecord(new_id, self._clock(), started))
            await self._pause(self._write_interval)

    async def _reader(self) -> None:
        report = self._require_report()
        while self._keep_going() and self._reads_started < self._max_reads:
            self._reads_started += 1
            started = self._clock()
            try:
                async with asyncio.timeout(self._op_timeout):
                    await self._pool.fetchval(self._read)
            except Exception as exc:
                now = self._clock()
                report.reads.append(ReadRecord(now, False, started))
                report.read_errors.append(_error("read", exc, started, now))
                await self._pause(self._error_pause)
                continue
            report.reads.append(ReadRecord(self._clock(), True, started))
            await self._pause(self._read_interval)


def _error(
    kind: str, exc: BaseException, started: float, at: float, op_id: int | None = None
) -> ErrorRecord:
    text = str(exc).strip()
    first_line = text.splitlines()[0] if text else ""
    return ErrorRecord(
        at=at,
        kind=kind,
        type=type(exc).__name__,
        message=first_line[:300],
        id=op_id,
        started=started,
    )
