"""What ``Pool.stats()`` returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceStats:
    id: str
    name: str | None
    address: str
    role: str
    size: int
    idle: int
    in_use: int
    served: int
    failures: int
    breaker: str
    last_error: str | None


@dataclass(frozen=True, slots=True)
class PoolStats:
    topology_version: int
    provider: str
    refreshes: int
    refresh_failures: int
    last_refresh_error: str | None
    acquire_errors: int
    retries: int  # statements run again elsewhere after a provably safe failure
    elision_safe: bool  # the catalog check allows skipping the reset
    instances: tuple[InstanceStats, ...]
    draining: int
