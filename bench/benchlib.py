"""What the benches share: timed slices, interleaved rounds, medians with their IQR.

Every bench here measures its contenders side by side in one process: rounds of
short slices, one slice per contender per round, the order rotated each round
so that the machine's noise (other processes on the same cores) hits them alike.
A figure is the median over rounds with its interquartile range; a ratio is the
median of per-round ratios against a baseline measured in the same round.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

Call = Callable[[], Awaitable[object]]

#: Seconds each contender runs before the measured rounds (smoke runs shorten it).
WARM_UP = 0.2


@dataclass(frozen=True, slots=True)
class Slice:
    """One contender's slice: throughput and latency percentiles (seconds)."""

    rate: float
    p50: float
    p99: float
    cpu_us: float  # this process's CPU per call, in microseconds


async def run_slice(call: Call, concurrency: int, seconds: float) -> Slice:
    """Run *call* from *concurrency* callers for *seconds*; what it achieved."""
    latencies: list[float] = []
    record = latencies.append
    clock = time.perf_counter
    stop_at = clock() + seconds

    async def caller() -> None:
        while True:
            started = clock()
            if started >= stop_at:
                return
            await call()
            record(clock() - started)

    began, cpu_began = clock(), time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = clock() - began
    cpu = time.process_time() - cpu_began
    if not latencies:
        return Slice(0.0, float("nan"), float("nan"), float("nan"))
    latencies.sort()
    count = len(latencies)
    return Slice(rate=count / elapsed, p50=latencies[count // 2],
                 p99=latencies[min(count - 1, int(count * 0.99))],
                 cpu_us=cpu / count * 1e6)


async def interleave(contenders: Mapping[str, Call], *, concurrency: int, seconds: float,
                     rounds: int, warm_up: float | None = None) -> dict[str, list[Slice]]:
    """*rounds* rounds of one slice per contender, rotating who goes first."""
    for call in contenders.values():
        await run_slice(call, concurrency, WARM_UP if warm_up is None else warm_up)
    names = list(contenders)
    results: dict[str, list[Slice]] = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(await run_slice(contenders[name], concurrency, seconds))
    return results


@dataclass(frozen=True, slots=True)
class Spread:
    """A median and its interquartile range."""

    median: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median:.3g} (IQR {self.q1:.3g}-{self.q3:.3g})"

    def fmt(self, scale: float = 1.0, digits: int = 2) -> str:
        return (f"{self.median * scale:.{digits}f} "
                f"({self.q1 * scale:.{digits}f}-{self.q3 * scale:.{digits}f})")


def spread(values: list[float]) -> Spread:
    """Median and quartiles (a single value is its own IQR)."""
    if len(values) == 1:
        return Spread(values[0], values[0], values[0])
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Spread(median, q1, q3)


def ratios(values: list[float], base: list[float]) -> Spread:
    """The spread of per-round ratios value/base."""
    return spread([v / b for v, b in zip(values, base, strict=True) if b > 0])


# -- a sub-pool stand-in: picopool's own cost with the server taken out ----------

class StandInProtocol:
    def _is_cancelling(self) -> bool:
        return False


class StandInConnection:
    _protocol = StandInProtocol()

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None) -> int:
        return 1

    async def reset(self, *, timeout: float | None = None) -> None:
        return None

    def is_closed(self) -> bool:
        return False

    def _on_release(self) -> None:
        return None

    def terminate(self) -> None:
        return None

    def get_server_pid(self) -> int:
        return 0


class StandInHolder:
    """asyncpg's PoolConnectionHolder, as far as picopool's release uses it."""

    _timeout = None

    def __init__(self, pool: StandInSubPool) -> None:
        self._pool = pool

    async def release(self, timeout: float | None) -> None:
        return None


class StandInProxy:
    def __init__(self, pool: StandInSubPool) -> None:
        self._con = StandInConnection()
        self._holder = StandInHolder(pool)


class StandInQueue:
    """No free holder to take at once: picopool calls the stand-in's acquire."""

    _queue: tuple[()] = ()
    _getters: tuple[()] = ()


class StandInSubPool:
    """Just enough of asyncpg.Pool for picopool's fast path."""

    _initialized = True
    _initializing = False
    _closed = False
    _closing = False
    _queue = StandInQueue()
    _reset = None  # not picopool's: the release goes through the holder

    def __init__(self) -> None:
        self._proxy = StandInProxy(self)

    def _check_init(self) -> None:
        return None

    async def acquire(self, timeout: float | None = None) -> StandInProxy:
        return self._proxy

    async def release(self, connection: StandInProxy, timeout: float | None = None) -> None:
        return None

    def is_closing(self) -> bool:
        return False

    def get_max_size(self) -> int:
        return 1

    def get_idle_size(self) -> int:
        return 1

    def get_size(self) -> int:
        return 1
