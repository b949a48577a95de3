from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .._topology import Instance


@dataclass(frozen=True, slots=True)
class Candidate:
    """An instance that can serve a request, with its current load."""

    instance: Instance
    in_use: int = 0  # connections checked out of its sub-pool
    idle: int = 0  # open connections waiting in its sub-pool
    max_size: int = 1


@runtime_checkable
class BalanceStrategy(Protocol):
    """Picks one candidate. Called on the hot path: keep it synchronous and cheap.

    ``candidates`` is never empty and may grow, shrink or reorder between calls.
    """

    def pick(self, candidates: Sequence[Candidate]) -> Candidate: ...
