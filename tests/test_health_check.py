"""Idle health checks find a dead connection before a user is handed it.

A "silent" network failure leaves idle connections looking open: nothing
arrives, nothing closes. Only a ping notices. The proxy here forwards bytes
until it is frozen, then swallows them in both directions without closing.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def collect_garbage_here() -> Iterator[None]:
    """A socket left open by a test here (pool or proxy) fails that test, not a later one."""
    yield
    gc.collect()

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


class FreezingProxy:
    """A TCP proxy that can stop forwarding without closing anything."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self.frozen = False
        self.closed = False
        self.port = 0

    async def start(self) -> FreezingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closed:  # accepted just before close() stopped the server
            writer.transport.abort()
            return
        self._writers.append(writer)  # at once: close() must find every transport
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        self._writers.append(server_w)
        if self.closed:
            return  # close() is aborting every writer
        await asyncio.gather(self._pump(client_r, server_w), self._pump(server_r, client_w))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            if not self.frozen:  # frozen: the bytes vanish, the socket stays open
                writer.write(data)
                await writer.drain()

    async def close(self) -> None:
        # Stop accepting first, then drop every connection: Server.wait_closed()
        # waits until no accepted connection is left.
        self.closed = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.transport.abort()  # a frozen peer may never drain a graceful close
        await asyncio.sleep(0.05)  # let the transports run connection_lost before the loop ends
        if self._server is not None:
            await self._server.wait_closed()


async def frozen_instance_pool(cluster: LocalCluster, make_pool: PoolFactory,
                               health_check_interval: float | None,
                               refresh_interval: float | None = 0.1,
                               ) -> tuple[picopool.Pool, FreezingProxy]:
    proxy = await FreezingProxy(cluster.primary.host, cluster.primary.port).start()
    pool = await make_pool(
        cluster.primary.dsn_at(port=proxy.port), discovery=Static(),
        min_size=2, max_size=2, topology_refresh_interval=refresh_interval,
        connect_timeout=0.5,
        health_check_interval=health_check_interval,
    )
    assert pool.get_idle_size() == 2
    proxy.frozen = True
    return pool, proxy


@pytest.mark.parametrize("refresh_interval", [0.1, None], ids=["poller-on", "poller-off"])
async def test_a_silently_dead_instance_is_found_without_user_traffic(
    cluster: LocalCluster, make_pool: PoolFactory, refresh_interval: float | None
) -> None:
    pool, proxy = await frozen_instance_pool(cluster, make_pool, health_check_interval=0.2,
                                             refresh_interval=refresh_interval)
    try:
        started = time.monotonic()
        while not pool.stats().instances[0].failures:
            assert time.monotonic() - started < 5, "the idle check never noticed"
            await asyncio.sleep(0.05)
        stats = pool.stats().instances[0]
        assert stats.breaker in ("open", "half-open", "unresponsive")
        assert stats.last_error is not None
        # The dead connections were dropped, not handed back for the next user.
        assert pool.get_idle_size() < 2
        if refresh_interval is not None:
            # and the check itself never blocks the poller: refreshes keep coming
            # (each takes up to the 0.5 s connect timeout on the frozen service connection)
            refreshes = pool.stats().refreshes
            started = time.monotonic()
            while pool.stats().refreshes <= refreshes:
                assert time.monotonic() - started < 3, "the poller stalled"
                await asyncio.sleep(0.05)
    finally:
        pool.terminate()
        await proxy.close()


async def test_without_idle_checks_nothing_notices(
    cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    """Control: the silent failure is invisible until a user trips over it."""
    pool, proxy = await frozen_instance_pool(cluster, make_pool, health_check_interval=None)
    try:
        await asyncio.sleep(1.0)
        assert pool.stats().instances[0].failures == 0
        assert pool.get_idle_size() == 2
    finally:
        pool.terminate()
        await proxy.close()


async def test_a_recovered_instance_gets_work_again(
    cluster_factory: Callable[..., LocalCluster], make_pool: PoolFactory
) -> None:
    """The breaker opens on failures, half-opens after its backoff, and one probe that
    succeeds closes it: the instance is back in rotation, not starved by the others."""
    private = cluster_factory(1)
    replica = private.replicas[0]
    pool = await make_pool(
        private.dsn, discovery=Static(), min_size=1, max_size=2,
        topology_refresh_interval=None, health_check_interval=None,
    )
    port_query = "select inet_server_port()"
    served = {await pool.fetchval(port_query) for _ in range(4)}
    assert served == {private.primary.port, replica.port}  # Static: both serve reads

    await asyncio.to_thread(replica.stop)
    for _ in range(6):  # reads that reach the dead replica are retried on the primary
        assert await pool.fetchval(port_query) == private.primary.port
    replica_stats = stats_of(pool, replica.port)
    assert replica_stats.failures > 0

    await asyncio.to_thread(replica.start)
    started = time.monotonic()
    while replica.port not in {await pool.fetchval(port_query) for _ in range(4)}:
        assert time.monotonic() - started < 20, pool.stats()
        await asyncio.sleep(0.2)
    replica_stats = stats_of(pool, replica.port)
    assert replica_stats.breaker == "closed"


def stats_of(pool: picopool.Pool, port: int) -> picopool.InstanceStats:
    return next(s for s in pool.stats().instances if s.address.endswith(f":{port}"))
