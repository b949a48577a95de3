from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from .._topology import Instance


class LatencySample(Protocol):
    """A per-instance round-trip estimate, read live by latency-aware strategies.

    ``rtt``: an exponentially weighted moving average of pool-level statements'
    round-trip times, in seconds (0.0 until the first one completes);
    ``rtt_at``: the ``time.monotonic()`` of its last update (0.0: never).
    """

    @property
    def rtt(self) -> float: ...

    @property
    def rtt_at(self) -> float: ...


class Candidate:
    """An instance that can serve a request, with its current load.

    ``in_use`` (connections checked out of its sub-pool) and ``idle`` (open
    connections waiting in it) are read live, when a strategy asks: the pool
    reuses candidate lists while the topology and health stay the same.
    ``latency`` is the instance's live round-trip estimate (None: not measured).
    """

    __slots__ = ("_idle", "_in_use", "instance", "latency", "max_size")

    def __init__(self, instance: Instance, in_use: int | Callable[[], int] = 0,
                 idle: int | Callable[[], int] = 0, max_size: int = 1,
                 latency: LatencySample | None = None) -> None:
        self.instance = instance
        self.max_size = max_size
        self._in_use = in_use
        self._idle = idle
        self.latency = latency

    @property
    def in_use(self) -> int:
        return self._in_use() if callable(self._in_use) else self._in_use

    @property
    def idle(self) -> int:
        return self._idle() if callable(self._idle) else self._idle

    def __repr__(self) -> str:
        return f"Candidate({self.instance.label}, in_use={self.in_use})"


@runtime_checkable
class BalanceStrategy(Protocol):
    """Picks one candidate. Called on the hot path: keep it synchronous and cheap.

    ``candidates`` is never empty and may grow, shrink or reorder between calls.
    """

    def pick(self, candidates: Sequence[Candidate]) -> Candidate: ...
