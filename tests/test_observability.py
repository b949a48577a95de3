"""Observability on the shared cluster: stats() growth, the slow-query log, and the
pure sliding window and percentiles (hypothesis)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

import picopool
from picopool._metrics import DURATION_BUCKETS, Histogram, Metrics, SlidingWindow, percentiles
from picopool._slowlog import redact
from picopool.cluster import LocalCluster

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


# -- pure: the window, the percentiles, the histogram --------------------------------


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=300),
       st.sampled_from([0.01, 0.5, 0.9, 0.95, 0.99, 1.0]))
def test_percentiles_are_nearest_rank(values: list[float], q: float) -> None:
    (p,) = percentiles(values, [q])
    assert p is not None and p in values
    n = len(values)
    assert sum(v <= p for v in values) >= q * n - 1e-9  # at least q of them are <= p
    assert sum(v < p for v in values) < q * n  # and p is the smallest such value


def test_percentiles_of_nothing_are_none() -> None:
    assert percentiles([], [0.5, 0.99]) == [None, None]


@given(st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.floats(0, 10, allow_nan=False)),
                max_size=200),
       st.floats(0.1, 20), st.integers(1, 50), st.floats(0, 10))
def test_sliding_window_keeps_the_recent_and_the_last(
        steps: list[tuple[float, float]], horizon: float, capacity: int, after: float) -> None:
    window = SlidingWindow(horizon, capacity)
    now = 0.0
    added: list[tuple[float, float]] = []
    for gap, value in steps:
        now += gap
        window.add(now, value)
        added.append((now, value))
    now += after
    expected = [v for t, v in added[-capacity:] if t >= now - horizon]
    assert window.values(now) == expected
    assert window.values(now) == expected  # reading drops nothing more


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=100))
def test_histogram_buckets_are_cumulative_and_count_everything(values: list[float]) -> None:
    histogram = Histogram()
    for v in values:
        histogram.observe(v)
    cumulative = histogram.cumulative()
    assert [b for b, _ in cumulative] == [*DURATION_BUCKETS, math.inf]
    assert cumulative[-1][1] == histogram.count == len(values)
    for bound, count in cumulative:
        assert count == sum(v <= bound for v in values)
    assert histogram.sum == pytest.approx(sum(values))


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=300),
       st.lists(st.floats(0, 100, allow_nan=False), max_size=50))
def test_observing_a_batch_is_observing_each(before: list[float], values: list[float]) -> None:
    one_by_one, batched = Histogram(), Histogram()
    for v in before:
        one_by_one.observe(v)
        batched.observe(v)
    for v in values:
        one_by_one.observe(v)
    batched.observe_many(values)
    assert batched.buckets == one_by_one.buckets
    assert batched.count == one_by_one.count
    assert batched.sum == pytest.approx(one_by_one.sum)


_SERVED = st.tuples(st.sampled_from(["primary", "replica"]), st.floats(0, 3, allow_nan=False),
                    st.floats(0, 0.5, allow_nan=False), st.booleans())


@given(st.lists(st.one_of(_SERVED, st.just("failure")), max_size=600))
def test_folded_successes_add_up_as_if_counted_one_by_one(
        steps: list[tuple[str, float, float, bool] | str]) -> None:
    """Metrics.served defers its counting to a fold; the result must be what
    statement() + acquired() + reset() per statement give, whatever the order of
    roles, failures in between and fold points."""
    deferred, direct = Metrics(), Metrics()
    now = 0.0
    for step in steps:
        now += 0.001
        if isinstance(step, str):  # a failure
            for metrics in (deferred, direct):  # counted at once, between deferred ones
                metrics.acquired("i", "replica", 0.3, False)
            continue
        role, duration, waited, elided = step
        deferred.served("i", role, duration, now, waited, elided)
        direct.statement("i", role, "ok", duration, 0, now)
        direct.acquired("i", role, waited, True)
        direct.reset("i", elided)
    deferred.fold()
    if not steps:
        return
    a, b = deferred.instances["i"], direct.instances["i"]
    assert a.statements == b.statements
    assert a.role == b.role
    assert a.resets_elided == b.resets_elided and a.resets_performed == b.resets_performed
    assert a.acquire_wait_max == b.acquire_wait_max
    for mine, theirs in ((a.durations, b.durations), (a.acquire_wait, b.acquire_wait)):
        assert mine.keys() == theirs.keys()
        for role in mine:
            assert mine[role].buckets == theirs[role].buckets
            assert mine[role].count == theirs[role].count
    assert a.window.values(now) == b.window.values(now)


def test_a_reader_in_another_thread_loses_no_statement() -> None:
    """Prometheus scrapes from its own thread: a fold there, while statements are
    counted here, must neither lose nor double-count one."""
    metrics = Metrics()
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            metrics.fold()

    reader = threading.Thread(target=scrape)
    reader.start()
    try:
        for n in range(60_000):
            metrics.served("i", "replica", 0.001, n * 1e-6, 0.0, True)
    finally:
        stop.set()
        reader.join()
    metrics.fold()
    assert metrics.instances["i"].statements[("replica", "ok")] == 60_000
    assert metrics.instances["i"].durations["replica"].count == 60_000


def test_password_literals_are_redacted() -> None:
    assert redact("ALTER ROLE app PASSWORD 'it''s s3cret'") == "ALTER ROLE app PASSWORD '***'"
    assert "s3" not in redact("create role x with encrypted password $p$s3$p$ login")
    assert redact("select 'password'") == "select 'password'"


# -- stats() on a real cluster ---------------------------------------------------------


@pytest.mark.integration
async def test_stats_report_latency_waits_connections_resets_and_roles(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, max_size=1)
    for _ in range(20):
        await pool.fetchval("select 1")
    await pool.execute("select pg_sleep(0.02)", role="primary")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await pool.fetchval("select 1 / 0")
    async with pool.acquire() as conn:  # acquire()d: always a full reset
        await conn.fetchval("select 1")

    stats = pool.stats()
    primary = next(i for i in stats.instances if i.role == "primary")
    replicas = [i for i in stats.instances if i.role == "replica"]
    assert primary.label and primary.label.endswith(primary.address)
    assert primary.statements.get("ok") == 1
    assert primary.latency.count == 1 and primary.latency.p50 is not None
    assert primary.latency.p50 >= 0.02
    assert sum(r.statements.get("ok", 0) for r in replicas) == 20
    assert sum(r.statements.get("statement-error", 0) for r in replicas) == 1
    for r in replicas:
        assert r.latency.count == r.statements.get("ok", 0) + r.statements.get(
            "statement-error", 0)
        p50, p95, p99 = r.latency.p50, r.latency.p95, r.latency.p99
        assert p50 is not None and p95 is not None and p99 is not None
        assert 0 < p50 <= p95 <= p99
        assert r.connections_opened >= 1
        assert r.lag_bytes is not None and r.lag_seconds is not None
        assert r.resets_elided >= 10  # plain SELECTs leave no session state
    assert primary.lag_bytes is None
    assert primary.resets_performed >= 1  # the acquire()d connection
    assert primary.acquires == 2 and primary.acquire_wait >= 0
    assert primary.acquire_wait_max >= 0
    assert stats.waiters == 0
    roles = {r.role: r for r in stats.roles}
    assert roles["replica"].statements == 21 and roles["replica"].errors == 1
    assert roles["primary"].statements == 1 and roles["primary"].acquires == 2
    assert stats.retries_by_outcome == {}


@pytest.mark.integration
async def test_waiters_are_counted_while_connections_are_busy(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1)
    held = await pool.acquire()  # the primary's only connection
    waiters = [asyncio.ensure_future(pool.execute("select 1", role="primary"))
               for _ in range(3)]
    await asyncio.sleep(0.2)
    assert pool.stats().waiters == 3
    await pool.release(held)
    await asyncio.gather(*waiters)
    stats = pool.stats()
    assert stats.waiters == 0 and stats.waiters_max >= 3
    primary = next(i for i in stats.instances if i.role == "primary")
    assert primary.acquire_wait_max >= 0.15


# -- the slow-query log ------------------------------------------------------------------


@pytest.mark.integration
async def test_slow_query_log_without_and_with_parameters(
        cluster: LocalCluster, make_pool: PoolFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    quiet = await make_pool(cluster.dsn, slow_query_threshold=0.05)
    await quiet.fetchval("select 1")  # fast: not logged
    await quiet.fetchval("select pg_sleep($1::float8), $2::text", 0.06, "hidden-arg",
                         role="primary")
    long = "select pg_sleep(0.06), '" + "x" * 1000 + "'"
    await quiet.execute(long)
    slow = [r for r in caplog.records if r.name == "picopool.slow"]
    assert len(slow) == 2, [r.getMessage() for r in slow]
    first, second = (r.getMessage() for r in slow)
    assert all(r.levelno == logging.WARNING for r in slow)
    assert "fetchval" in first and "primary" in first and "role=" in first
    assert f":{cluster.primary.port}" in first and "pg_sleep" in first
    assert "parameters" not in first and "hidden-arg" not in first
    assert len(second) < 700 and "…" in second  # the statement is truncated
    assert slow[0].__dict__["picopool_role"] == "primary"

    caplog.clear()
    loud = await make_pool(cluster.dsn, slow_query_threshold=0.05, log_parameters=True)
    await loud.fetchval("select pg_sleep($1::float8), $2::text", 0.06, "visible-arg",
                        role="primary")
    (record,) = [r for r in caplog.records if r.name == "picopool.slow"]
    assert "parameters=(0.06, 'visible-arg')" in record.getMessage()
    # The DSN carries the cluster's password; no log record of either pool shows it.
    assert cluster.password in cluster.dsn
    assert all(cluster.password not in r.getMessage() for r in caplog.records)


@pytest.mark.integration
async def test_slow_query_log_never_shows_a_password_literal(
        cluster: LocalCluster, make_pool: PoolFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    pool = await make_pool(cluster.dsn, slow_query_threshold=0.0)
    await pool.execute("drop role if exists slowlog_role")
    await pool.execute("create role slowlog_role password 'hunter2-not-logged'")
    await pool.execute("drop role slowlog_role")
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "picopool.slow")
    assert "create role slowlog_role password '***'" in text
    assert "hunter2" not in text and cluster.password not in text


# -- python -m picopool topology --------------------------------------------------------


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "picopool", "topology", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
async def test_cli_table_and_json(cluster: LocalCluster) -> None:
    table = await asyncio.to_thread(_cli, cluster.dsn)
    assert table.returncode == 0, table.stdout + table.stderr
    lines = table.stdout.splitlines()
    assert "postgres:***@" in lines[0] or "***" in lines[0]
    assert lines[1].split() == ["INSTANCE", "ROLE", "STATE", "LAG", "BREAKER", "CONNECTIONS"]
    rows = {line.split()[0]: line.split() for line in lines[2:5]}
    assert {label.rsplit(":", 1)[1] for label in rows} == {str(n.port) for n in cluster.nodes}
    primary = next(r for label, r in rows.items() if label.endswith(f":{cluster.primary.port}"))
    assert primary[1:4] == ["primary", "up", "-"] and primary[4] == "closed"
    assert int(primary[5]) >= 1
    replica = next(r for label, r in rows.items()
                   if label.endswith(f":{cluster.replicas[0].port}"))
    assert replica[1:3] == ["replica", "up"] and replica[5] == "/"  # lag: "0 B / 0.0s"
    assert replica[-2] == "closed" and int(replica[-1]) >= 1
    assert cluster.password not in table.stdout + table.stderr

    document = await asyncio.to_thread(_cli, cluster.dsn, "--json")
    assert document.returncode == 0
    parsed = json.loads(document.stdout)
    assert parsed["healthy"] is True and parsed["provider"] == "streaming"
    assert cluster.password not in document.stdout and "***" in parsed["dsn"]
    by_port = {int(r["instance"].rsplit(":", 1)[1]): r for r in parsed["rows"]}
    assert by_port[cluster.primary.port]["role"] == "primary"
    for node in cluster.replicas:
        row = by_port[node.port]
        assert row["role"] == "replica" and row["state"] == "up"
        assert isinstance(row["lag_bytes"], int) and row["connections"] >= 1


@pytest.mark.integration
async def test_cli_exits_non_zero_without_a_reachable_primary(cluster: LocalCluster) -> None:
    only_replica = await asyncio.to_thread(_cli, cluster.replicas[0].dsn, "--json")
    assert only_replica.returncode == 1
    assert json.loads(only_replica.stdout)["healthy"] is False
    table = await asyncio.to_thread(_cli, cluster.replicas[0].dsn)
    assert table.returncode == 1 and "no primary is reachable" in table.stdout
    nothing = await asyncio.to_thread(
        _cli, f"postgres://postgres:{cluster.password}@127.0.0.1:1/postgres", "--timeout", "1")
    assert nothing.returncode == 2 and "cannot start" in nothing.stdout
    assert cluster.password not in nothing.stdout + nothing.stderr


def _watch_in_a_terminal(dsn: str) -> tuple[bytes, int]:
    """Run ``--watch 0.3`` on a pseudo-terminal for a while, then Ctrl-C it."""
    master, slave = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "picopool", "topology", dsn, "--watch", "0.3"],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and output.count(b"\x1b[H\x1b[J") < 3:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    output += os.read(master, 65536)
                except OSError:  # the terminal closed: the process ended
                    break
        process.send_signal(signal.SIGINT)
        code = process.wait(15)
        with contextlib.suppress(OSError):
            while select.select([master], [], [], 0.2)[0]:
                chunk = os.read(master, 65536)
                if not chunk:
                    break
                output += chunk
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return output, code


@pytest.mark.integration
async def test_cli_watch_redraws_in_place_in_a_terminal(cluster: LocalCluster) -> None:
    output, code = await asyncio.to_thread(_watch_in_a_terminal, cluster.dsn)
    frames = output.split(b"\x1b[H\x1b[J")[1:]
    assert len(frames) >= 3, output
    for frame in frames[:3]:
        text = frame.decode()
        assert "INSTANCE" in text and text.count(" primary ") == 1
        assert "Ctrl-C" in text
    assert cluster.password.encode() not in output
    assert code == 130
