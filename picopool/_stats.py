"""What ``Pool.stats()`` returns."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._admission import AdmissionStats
    from ._cache_reads import CacheStats

_EMPTY: Mapping[str, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Latency:
    """Statement durations (seconds) over the sliding window: the last 60 s, at most
    2,048 statements; None when the window is empty."""

    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    count: int = 0


@dataclass(frozen=True, slots=True)
class RoleStats:
    """Totals over the instances that served in one role."""

    role: str
    statements: int
    errors: int  # attempts that did not end "ok"
    acquires: int
    acquire_wait: float  # seconds, summed


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
    # Since the pool started (from its metrics listener), and now:
    latency: Latency = Latency()
    # attempts by outcome ("ok", "lost-in-flight", "statement-error" ...)
    statements: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    waiters: int = 0  # tasks checking a connection out of this instance now
    acquires: int = 0
    acquire_wait: float = 0.0  # seconds, summed over checkouts
    acquire_wait_max: float = 0.0
    connections_opened: int = 0
    connections_lost: int = 0  # broke under a statement (lost idle, in flight, cut)
    resets_elided: int = 0
    resets_performed: int = 0
    lag_bytes: int | None = None  # a replica's, as last measured
    lag_seconds: float | None = None
    label: str = ""  # how events, logs and metrics name it: name@host:port or host:port


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
    # statements run again, by the outcome of the attempt that failed
    retries_by_outcome: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    waiters: int = 0
    waiters_max: int = 0  # the most tasks seen checking out at once
    roles: tuple[RoleStats, ...] = ()
    # Admission control (max_waiting=, rate_limit=, max_lifetime=) and the read cache
    # (None when cache= is not set).
    admission: AdmissionStats | None = None
    cache: CacheStats | None = None
