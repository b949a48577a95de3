"""Session-scoped HA clusters, as plain pytest fixtures for the conftest to import::

    from harness.fixtures import autofailover_cluster, patroni_cluster  # noqa: F401

(or load this module as a plugin: ``-p harness.fixtures`` with ``tests/`` on the path).

Each cluster starts once per session, when a test first asks for it (Patroni
about 8 s, pg_auto_failover about 20 s), and is stopped at the end. Tests may
switch over, kill and restart nodes, but must leave the cluster healthy for
the next one: call ``ensure_healthy()`` at the end (or use the ``*_healthy``
fixtures, which do it before the test).

A missing program raises :class:`~harness._process.HarnessUnavailable` from
``start()``; whether that skips or fails is the conftest's decision.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from picopool import Address, Topology

from .autofailover import AutoFailoverCluster
from .patroni import PatroniCluster

__all__ = [
    "NoConnections",
    "autofailover_cluster",
    "autofailover_healthy",
    "patroni_cluster",
    "patroni_healthy",
]


@pytest.fixture(scope="session")
def patroni_cluster() -> Iterator[PatroniCluster]:
    """etcd plus three Patroni nodes in synchronous mode, shared by the session."""
    with PatroniCluster(synchronous_mode=True) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def autofailover_cluster() -> Iterator[AutoFailoverCluster]:
    """A pg_auto_failover monitor plus three nodes, shared by the session."""
    with AutoFailoverCluster() as cluster:
        yield cluster


@pytest.fixture
def patroni_healthy(patroni_cluster: PatroniCluster) -> PatroniCluster:
    """The shared Patroni cluster after any node a previous test killed is back."""
    patroni_cluster.ensure_healthy()
    return patroni_cluster


@pytest.fixture
def autofailover_healthy(autofailover_cluster: AutoFailoverCluster) -> AutoFailoverCluster:
    """The shared pg_auto_failover cluster after any node a previous test killed is back."""
    autofailover_cluster.ensure_healthy()
    return autofailover_cluster


class NoConnections:
    """A DiscoveryContext for calling a provider directly: it lends no connections.

    Patroni and AutoFailover never use the pool's connections, so they run on it.
    """

    seeds: tuple[Address, ...] = ()
    current: Topology | None = None

    async def service_connection(self) -> Any:
        raise AssertionError("this provider should not use the service connection")

    def service_address(self) -> Address | None:
        return None

    async def connection(self, address: Address) -> Any:
        raise AssertionError("this provider should not probe instances")

    def discard(self, address: Address | None = None) -> None:
        pass
