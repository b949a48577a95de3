from __future__ import annotations

import logging
from typing import Any

import asyncpg

from .._errors import TopologyError, describe_error
from .._member import is_connection_error
from ._base import DiscoveryContext, DiscoveryProvider, service_session
from ._picodata import Picodata
from ._streaming import Streaming

logger = logging.getLogger("picopool.discovery")

# Plain enough for Picodata's SQL. pg_catalog lookups would not work there.
_PICODATA_PROBE = "SELECT count(*) FROM _pico_peer_address"
_UNDEFINED_TABLE = "42P01"
_PROBE_TIMEOUT = 5.0
_ATTEMPTS = 2  # a service connection that breaks mid-probe gets one more try elsewhere


async def _probe(connection: Any) -> Exception | None:
    """Run the Picodata probe; what it raised, if anything."""
    try:
        await connection.fetchval(_PICODATA_PROBE, timeout=_PROBE_TIMEOUT)
    except Exception as exc:
        return exc
    return None


async def detect_provider(ctx: DiscoveryContext) -> DiscoveryProvider:
    """Pick a provider for a DSN given without ``discovery=``.

    A server that has Picodata's ``_pico_peer_address`` table gets
    :class:`Picodata`; plain PostgreSQL gets :class:`Streaming` (seed hosts
    plus a role probe). Raises :class:`TopologyError` if no seed is reachable.
    """
    failures: list[str] = []
    for _ in range(_ATTEMPTS):
        try:
            async with service_session(ctx) as connection:
                where = ctx.service_address()
                error = await _probe(connection)
                if error is not None and is_connection_error(error):
                    ctx.discard()  # while no one else can have reopened it
        except TopologyError as exc:
            seeds = ", ".join(str(s) for s in ctx.seeds) or "none"
            raise TopologyError(
                f"cannot auto-detect the cluster kind: no seed reachable (seeds: {seeds}): {exc}"
            ) from exc
        provider: DiscoveryProvider
        if error is not None:
            if is_connection_error(error):
                failures.append(f"{where}: {describe_error(error)}")
                continue
            if not isinstance(error, asyncpg.PostgresError):
                raise error
            if error.sqlstate == _UNDEFINED_TABLE:
                provider = Streaming()
                reason = "no _pico_peer_address table"
            else:
                # The table exists but is not readable: Picodata with a restricted
                # user. Discovery will report the problem precisely.
                provider = Picodata()
                reason = f"_pico_peer_address exists ({describe_error(error)})"
        else:
            provider = Picodata()
            reason = "_pico_peer_address found"
        logger.info("discovery: using %r (auto-detected on %s: %s)", provider, where, reason)
        return provider
    raise TopologyError(
        "cannot auto-detect the cluster kind: the service connection failed ("
        + "; ".join(failures) + ")"
    )
