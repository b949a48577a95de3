"""One clear warning per dead instance instead of asyncpg's tracebacks.

asyncpg 0.32's sub-pool keeps ``min_size`` connections open: when one is lost, a
maintenance task reconnects, and each failed try logs "Failed to restore the pool
connection floor; retrying" with a full traceback to the ``asyncpg.pool`` logger
(retrying after 1 s, 2 s, 4 s ... 60 s). Through picopool a failover printed several.

A filter on that logger recognises the records of picopool's sub-pools (the
record is logged from the sub-pool's own maintenance task) and replaces them: the
first becomes one picopool WARNING naming the instance and the error, the rest are
dropped until the instance changes state (a connection to it opens again). Records
of other asyncpg pools in the process pass untouched.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from ._errors import describe_error

logger = logging.getLogger("picopool")

_FLOOR_MESSAGE = "Failed to restore the pool connection floor"


class QuietFloor:
    """A membership's state: which instances have been reported unreachable."""

    __slots__ = ("__weakref__", "reported", "sub_pools")

    def __init__(self) -> None:
        self.reported: set[str] = set()
        # id(sub-pool) -> (sub-pool, its instance's label); closed ones are pruned
        # (asyncpg's Pool takes no weak references).
        self.sub_pools: dict[int, tuple[Any, str]] = {}

    def add(self, pool: Any, label: str) -> None:
        for key, (old, _) in list(self.sub_pools.items()):
            if old.is_closing():
                del self.sub_pools[key]
        self.sub_pools[id(pool)] = (pool, label)

    def recovered(self, label: str) -> None:
        """A connection to *label* opened: the next failure is news again."""
        self.reported.discard(label)


class _SubPoolFilter(logging.Filter):
    def __init__(self) -> None:
        super().__init__("picopool")
        self.memberships: weakref.WeakSet[QuietFloor] = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.memberships or not record.getMessage().startswith(_FLOOR_MESSAGE):
            return True
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no running loop: not a maintenance task
            return True
        if task is None:
            return True
        found = next(((quiet, label) for quiet in list(self.memberships)
                      for pool, label in list(quiet.sub_pools.values())
                      if getattr(pool, "_maintenance_task", None) is task), None)
        if found is None:
            return True  # not one of picopool's sub-pools
        quiet, label = found
        if label not in quiet.reported:
            quiet.reported.add(label)
            error = record.exc_info[1] if record.exc_info else None
            logger.warning(
                "instance %s is unreachable (%s): its sub-pool keeps retrying to open "
                "connections in the background; no more of this until it answers again",
                label, describe_error(error) if error is not None else "connection failed")
        return False


_filter = _SubPoolFilter()
_installed = False


def quiet_sub_pool(pool: Any, quiet: QuietFloor, label: str) -> None:
    """Replace *pool*'s floor-maintenance tracebacks by one warning per outage."""
    global _installed
    if not _installed:
        logging.getLogger("asyncpg.pool").addFilter(_filter)
        _installed = True
    _filter.memberships.add(quiet)
    quiet.add(pool, label)
