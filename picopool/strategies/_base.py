from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from .._topology import Instance


class Candidate:
    """An instance that can serve a request, with its current load.

    ``in_use`` (connections checked out of its sub-pool) is always there;
    ``idle`` (open connections waiting in it) is computed only when read,
    because counting it walks the sub-pool and most strategies never ask.
    """

    __slots__ = ("_idle", "in_use", "instance", "max_size")

    def __init__(self, instance: Instance, in_use: int = 0,
                 idle: int | Callable[[], int] = 0, max_size: int = 1) -> None:
        self.instance = instance
        self.in_use = in_use
        self.max_size = max_size
        self._idle = idle

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
