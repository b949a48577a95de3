"""picopool: asyncpg's Pool API over a PostgreSQL-protocol cluster.

    pool = await picopool.create_pool("postgres://app@h1:5432,h2:5432/app")
    rows = await pool.fetch("SELECT * FROM items")

picopool discovers the cluster's instances, keeps one asyncpg sub-pool per
instance, routes each request to an instance that can serve it and follows
the topology as it changes.
"""

from ._admission import AdmissionStats, RateLimit
from ._cache_reads import CacheStats, ReadCache
from ._dsn import mask_dsn
from ._errors import (
    ConfigurationError,
    NoAvailableInstanceError,
    NotReadyError,
    PicopoolError,
    PoolClosedError,
    RateLimitedError,
    TooManyWaitersError,
    TopologyError,
)
from ._pool import Pool, create_pool
from ._stats import InstanceStats, PoolStats
from ._topology import Address, Instance, Role, Topology
from ._wal import CausalScope

__all__ = [
    "Address",
    "AdmissionStats",
    "CacheStats",
    "CausalScope",
    "ConfigurationError",
    "Instance",
    "InstanceStats",
    "NoAvailableInstanceError",
    "NotReadyError",
    "PicopoolError",
    "Pool",
    "PoolClosedError",
    "PoolStats",
    "RateLimit",
    "RateLimitedError",
    "ReadCache",
    "Role",
    "TooManyWaitersError",
    "Topology",
    "TopologyError",
    "create_pool",
    "mask_dsn",
]

# Show the public path in reprs and docs, not the private module.
for _name in __all__:
    globals()[_name].__module__ = __name__

__version__ = "0.1.0"
