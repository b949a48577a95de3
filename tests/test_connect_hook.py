"""``create_pool(..., connect=hook)`` applies to every connection picopool opens
(defect 13): the sub-pools' (asyncpg does that), and also the service connection
and the discovery probe connections, which used to call asyncpg.connect directly
and so bypassed a hook that injects a password or an IAM token.

The pool's DSN has no password; the hook adds the cluster's (when the suite's
cluster uses password authentication, nothing else could connect).  Under trust
authentication the test still proves the hook opened the service connection and a
probe connection to every instance: it records the queries each hooked connection
ran, and picopool's own service and probe queries must be among them.

Needs the core wiring: Membership passing ``connect=pool_options["connect"]`` to
``ServiceConnections``.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import picopool
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]

ROLE_PROBE = "SELECT pg_is_in_recovery()"  # picopool.discovery._streaming._PROBE
PICODATA_PROBE = "SELECT count(*) FROM _pico_peer_address"  # auto-detection


def without_password(dsn: str) -> str:
    return re.sub(r"^(postgres(?:ql)?://[^:@/]*):[^@/]*@", r"\1@", dsn)


class Hook:
    """Counts calls, adds the password, and records what each connection ran."""

    def __init__(self, password: str | None) -> None:
        self.password = password
        self.calls: list[tuple[str, int]] = []  # (host, port) asked for
        self.ran: dict[tuple[str, int], set[str]] = {}

    async def __call__(self, dsn: str, **kwargs: Any) -> Any:
        assert ":" not in urllib.parse.urlsplit(dsn).netloc.split("@")[0], \
            "the DSN picopool passes on should still have no password"
        where = (str(kwargs.get("host")), int(kwargs.get("port") or 0))
        self.calls.append(where)
        if self.password is not None:
            kwargs["password"] = self.password
        connection = await asyncpg.connect(dsn, **kwargs)
        queries = self.ran.setdefault(where, set())
        connection.add_query_logger(lambda record: queries.add(record.query))
        return connection


async def test_connect_hook_opens_service_and_probe_connections(
    cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    password = urllib.parse.urlsplit(cluster.dsn).password
    dsn = without_password(cluster.dsn)
    assert urllib.parse.urlsplit(dsn).password is None
    hook = Hook(password)
    pool = await make_pool(dsn, connect=hook)
    assert await pool.fetchval("SELECT 1") == 1
    await pool.refresh_topology()

    nodes = [(n.host, n.port) for n in (cluster.primary, *cluster.replicas)]
    for node in nodes:
        assert node in hook.calls, f"no hooked connection to {node}: {hook.calls}"
        # discovery's role probe ran on a hooked connection to each instance
        assert ROLE_PROBE in hook.ran.get(node, set()), (node, hook.ran)
    # the service connection (auto-detection ran on it) was opened by the hook too
    assert any(PICODATA_PROBE in queries for queries in hook.ran.values()), hook.ran
    # and the sub-pools' connections (asyncpg's own use of connect=)
    assert len(hook.calls) > len(nodes)
