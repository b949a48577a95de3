"""Shared fixtures and suite-wide hooks.

Clusters
    ``cluster``          one ``LocalCluster(replicas=2)`` for the whole session. Tests
                         may create their own tables (use unique names) but must not
                         stop, kill, promote or reconfigure any of its nodes.
    ``cluster_factory``  module-scoped: ``cluster_factory()`` starts a private cluster,
                         stopped when the module ends. Use it for anything that
                         mutates the topology (stop, kill, failover).

Pools
    ``make_pool``        ``await make_pool(dsn, **options)`` creates and starts a
                         picopool pool with small, fast defaults; every pool is
                         closed (or terminated) after the test.
    ``pool``             a started pool over the shared ``cluster``.

CI
    Under ``CI=true`` a skipped test fails the run: a missing PostgreSQL (or
    anything else) must not silently turn the integration suite green.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import picopool
from picopool.cluster import ClusterError, LocalCluster, find_pg_bin

# Hypothesis: no per-example deadline (CI machines and a busy event loop are
# slow), and no "function-scoped fixture" health check noise.
settings.register_profile(
    "picopool",
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "picopool"))

#: Defaults for pools made by ``make_pool``: small and quick to notice changes.
POOL_DEFAULTS: dict[str, Any] = {
    "min_size": 1,
    "max_size": 2,
    "topology_refresh_interval": 0.5,
    "connect_timeout": 2.0,
    "failover_timeout": 5.0,
    "drain_timeout": 5.0,
}

PoolFactory = Callable[..., Awaitable[picopool.Pool]]
ClusterFactory = Callable[..., LocalCluster]


# -- CI: skipped tests fail the run ------------------------------------------------


def _ci() -> bool:
    return os.environ.get("CI") == "true"


_collection_skips: list[str] = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Under CI=true, turn a skip (in setup, call or teardown) into a failure."""
    report = yield
    if _ci() and report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must run every test: {reason}"
    return report


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """Module-level skips happen at collection; remember them for the exit status."""
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _collection_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci() and _collection_skips and exitstatus in (pytest.ExitCode.OK,
                                                     pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    if _ci() and _collection_skips:
        terminalreporter.section("skipped under CI=true (the run fails)", sep="=", red=True)
        for line in _collection_skips:
            terminalreporter.line(line)


# -- clusters ----------------------------------------------------------------------


def _require_postgres() -> None:
    try:
        find_pg_bin()
    except ClusterError as exc:
        pytest.skip(f"PostgreSQL server not available: {exc}")


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """The suite's shared cluster: a primary and two replicas. Do not mutate its topology."""
    _require_postgres()
    with LocalCluster(replicas=2) as shared:
        yield shared


@pytest.fixture(scope="module")
def cluster_factory() -> Iterator[ClusterFactory]:
    """Private clusters for tests that stop, kill or promote nodes; stopped at module end."""
    _require_postgres()
    started: list[LocalCluster] = []

    def start(replicas: int = 2, **options: Any) -> LocalCluster:
        private = LocalCluster(replicas=replicas, **options)
        started.append(private)
        return private.start()

    try:
        yield start
    finally:
        # In parallel: each stop waits for its servers to exit.
        stoppers = [threading.Thread(target=private.stop) for private in started]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join()


# -- pools -------------------------------------------------------------------------


async def close_quietly(pool: picopool.Pool, timeout: float = 10.0) -> None:
    """Close *pool*, terminating it if a graceful close takes too long or fails."""
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except (Exception, asyncio.CancelledError):
        pool.terminate()


@pytest.fixture
async def make_pool() -> AsyncIterator[PoolFactory]:
    """``await make_pool(dsn, **options)``: a started pool, closed after the test."""
    pools: list[picopool.Pool] = []

    async def make(dsn: str | None = None, **options: Any) -> picopool.Pool:
        pool = picopool.create_pool(dsn, **{**POOL_DEFAULTS, **options})
        pools.append(pool)
        await pool
        return pool

    try:
        yield make
    finally:
        for pool in pools:
            await close_quietly(pool)


@pytest.fixture
async def pool(cluster: LocalCluster, make_pool: PoolFactory) -> picopool.Pool:
    """A started pool over the shared cluster (1..2 connections per instance)."""
    return await make_pool(cluster.dsn)


# The HA clusters (Patroni + etcd, pg_auto_failover), shared by the whole session.
from harness.fixtures import (  # noqa: E402
    autofailover_cluster,
    autofailover_healthy,
    patroni_cluster,
    patroni_healthy,
)

__all__ = ["autofailover_cluster", "autofailover_healthy", "patroni_cluster", "patroni_healthy"]
