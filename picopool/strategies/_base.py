from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from .._topology import Instance


class Candidate:
    """An instance that can serve a request, with its current load.

    ``in_use`` (connections checked out of its sub-pool) and ``idle`` (open
    connections waiting in it) are read live, when a strategy asks: the pool
    reuses candidate lists while the topology and health stay the same.
    """

    __slots__ = ("_idle", "_in_use", "instance", "max_size")

    def __init__(self, instance: Instance, in_use: int | Callable[[], int] = 0,
                 idle: int | Callable[[], int] = 0, max_size: int = 1) -> None:
        self.instance = instance
        self.max_size = max_size
        self._in_use = in_use
        self._idle = idle

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
