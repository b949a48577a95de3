from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from .._errors import TopologyError, describe_error
from .._topology import Address, Instance, Role
from ._base import (
    Discovered,
    DiscoveryContext,
    DiscoveryProvider,
    address_id,
    probe_session,
    unique_addresses,
)

logger = logging.getLogger("picopool.discovery")

_PROBE = "SELECT pg_is_in_recovery()"
# The timeline a primary writes on: the first 8 hex digits of its current WAL file name.
_TIMELINE = "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"


class Streaming(DiscoveryProvider):
    """Plain streaming replication: probe each known host with ``pg_is_in_recovery()``.

    The hosts probed are the seeds plus every instance found before. A host
    that does not answer within ``probe_timeout`` is left out until it does.
    If two hosts claim to be primary (a split brain after a careless
    promotion), the one with the later timeline wins and the other is left out.
    """

    name = "streaming"

    def __init__(self, addresses: Sequence[str | Address] | None = None, *,
                 probe_timeout: float = 2.0) -> None:
        self._addresses = (
            None
            if addresses is None
            else tuple(a if isinstance(a, Address) else Address.parse(a) for a in addresses)
        )
        self._probe_timeout = probe_timeout

    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        known = [i.address for i in ctx.current.instances] if ctx.current else []
        addresses = unique_addresses(self._addresses or ctx.seeds, known)
        failures: dict[Address, str] = {}
        results = await asyncio.gather(*(self._probe(ctx, a, failures) for a in addresses))
        probed = [r for r in results if r is not None]
        if not probed:
            raise TopologyError("no host answered the role probe (" + "; ".join(
                f"{address}: {error}" for address, error in failures.items()) + ")")
        primaries = [(timeline, i) for timeline, i in probed if i.role is Role.PRIMARY]
        if len(primaries) > 1:
            newest = max(primaries, key=lambda pair: pair[0])[1]
            logger.warning(
                "several hosts claim to be primary (%s); using %s, the latest timeline",
                ", ".join(str(i.address) for _, i in primaries), newest.address,
            )
            probed = [(t, i) for t, i in probed if i.role is not Role.PRIMARY or i is newest]
        return Discovered(tuple(i for _, i in probed))

    async def _probe(
        self, ctx: DiscoveryContext, address: Address, failures: dict[Address, str]
    ) -> tuple[int, Instance] | None:
        try:
            async with asyncio.timeout(self._probe_timeout), \
                    probe_session(ctx, address) as conn:
                in_recovery = await conn.fetchval(_PROBE)
                timeline = 0 if in_recovery else await conn.fetchval(_TIMELINE)
        except Exception as exc:
            ctx.discard(address)
            failures[address] = describe_error(exc)
            logger.debug("probe of %s failed: %s", address, describe_error(exc))
            return None
        role = Role.REPLICA if in_recovery else Role.PRIMARY
        return int(timeline), Instance(id=address_id(address), address=address, role=role)

    def __repr__(self) -> str:
        shown = "dsn" if self._addresses is None else ", ".join(map(str, self._addresses))
        return f"Streaming({shown})"
