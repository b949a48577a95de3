"""What ``Pool.stats()`` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._admission import AdmissionStats
    from ._cache_reads import CacheStats


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
    # Admission control (max_waiting=, rate_limit=, max_lifetime=) and the read cache
    # (None when cache= is not set).
    admission: AdmissionStats | None = None
    cache: CacheStats | None = None
