"""Prometheus metrics for a pool: ``pip install picopool[prometheus]``.

    import prometheus_client, picopool.prometheus
    picopool.prometheus.register(pool)          # the default registry
    prometheus_client.start_http_server(9187)

A collector reads the pool at scrape time: what its metrics listener has added
up (counters, histograms) and its state now (sizes, waiters, breakers, lag,
topology). Registering adds nothing to the statement path. Labels: ``db_instance``
(``name@host:port`` or ``host:port``; not ``instance``, which Prometheus sets to the
scrape target) and ``role``; ``outcome`` is ``ok`` or one of
the failure outcomes (``lost-in-flight``, ``statement-error`` ...). Pass
``pool_name=`` to tell several pools in one registry apart (a ``pool`` label).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._metrics import Histogram

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["PoolCollector", "register"]

BREAKER_STATES = ("closed", "open", "half-open", "unresponsive")


class PoolCollector(Collector):
    """Yields a pool's metric families on every scrape."""

    def __init__(self, pool: Pool, pool_name: str | None = None) -> None:
        self._pool = pool
        self._extra = ("pool",) if pool_name is not None else ()
        self._extra_values = (pool_name,) if pool_name is not None else ()

    def collect(self) -> Iterator[Metric]:
        pool = self._pool
        stats = pool.stats()
        metrics = pool._metrics
        x = self._extra_values
        il = ("db_instance", "role")

        statements = CounterMetricFamily(
            "picopool_statements", "Attempts of pool-level statements, by outcome",
            labels=[*self._extra, *il, "outcome"])
        errors = CounterMetricFamily(
            "picopool_statement_errors", "Attempts that did not end ok, by outcome",
            labels=[*self._extra, *il, "outcome"])
        duration = HistogramMetricFamily(
            "picopool_statement_duration_seconds",
            "Time a statement spent on its connection", labels=[*self._extra, *il])
        wait = HistogramMetricFamily(
            "picopool_acquire_wait_seconds", "Time spent checking a connection out",
            labels=[*self._extra, *il])
        acquire_failures = CounterMetricFamily(
            "picopool_acquire_failures", "Checkouts that failed",
            labels=[*self._extra, "db_instance"])
        opened = CounterMetricFamily(
            "picopool_connections_opened", "Connections opened",
            labels=[*self._extra, "db_instance"])
        lost = CounterMetricFamily(
            "picopool_connections_lost", "Connections that broke under a statement",
            labels=[*self._extra, "db_instance"])
        resets = CounterMetricFamily(
            "picopool_resets", "Connections released, by whether the reset was elided",
            labels=[*self._extra, "db_instance", "elided"])
        with metrics.lock:  # scraped from another thread: hold it while reading
            metrics.fold()  # what ran since stats() above
            for m in list(metrics.instances.values()):
                for (role, outcome), count in sorted(list(m.statements.items())):
                    statements.add_metric([*x, m.label, role, outcome], count)
                    if outcome != "ok":
                        errors.add_metric([*x, m.label, role, outcome], count)
                for role, histogram in sorted(list(m.durations.items())):
                    duration.add_metric([*x, m.label, role], _buckets(histogram), histogram.sum)
                for role, histogram in sorted(list(m.acquire_wait.items())):
                    wait.add_metric([*x, m.label, role], _buckets(histogram), histogram.sum)
                acquire_failures.add_metric([*x, m.label], m.acquire_failures)
                opened.add_metric([*x, m.label], m.connections_opened)
                lost.add_metric([*x, m.label], m.connections_lost)
                resets.add_metric([*x, m.label, "true"], m.resets_elided)
                resets.add_metric([*x, m.label, "false"], m.resets_performed)
        yield from (statements, errors, duration, wait, acquire_failures, opened, lost, resets)

        retries = CounterMetricFamily(
            "picopool_retries", "Statements run again elsewhere, by the failed attempt's outcome",
            labels=[*self._extra, "outcome"])
        for outcome, count in sorted(stats.retries_by_outcome.items()):
            retries.add_metric([*x, outcome], count)
        yield retries

        connections = GaugeMetricFamily(
            "picopool_connections", "Connections of the instance's sub-pool, by state",
            labels=[*self._extra, *il, "state"])
        max_size = GaugeMetricFamily(
            "picopool_connections_max", "The sub-pool's max_size", labels=[*self._extra, *il])
        waiters = GaugeMetricFamily(
            "picopool_waiters", "Tasks checking a connection out now",
            labels=[*self._extra, *il])
        breaker = GaugeMetricFamily(
            "picopool_breaker_state", "The instance's circuit breaker: 1 for its state",
            labels=[*self._extra, *il, "state"])
        lag_bytes = GaugeMetricFamily(
            "picopool_replica_lag_bytes", "A replica's replay lag behind the primary (WAL bytes)",
            labels=[*self._extra, "db_instance"])
        lag_seconds = GaugeMetricFamily(
            "picopool_replica_lag_seconds", "A replica's replay lag, in seconds",
            labels=[*self._extra, "db_instance"])
        member = GaugeMetricFamily(
            "picopool_instance_in_topology",
            "1 while the instance is in the topology; 0 once it left (its counters stay)",
            labels=[*self._extra, *il])
        per_instance = int(pool._pool_options["max_size"])
        current = {i.label for i in stats.instances}
        for label, m in sorted(list(metrics.instances.items())):
            if label in current:
                continue
            # Left the topology (a dead replica that discovery no longer lists): its
            # breaker as the last event said, and no sizes or lag.
            member.add_metric([*x, label, m.role], 0)
            last = metrics.breakers.get(label, "closed")
            last = "closed" if last == "answers" else last
            for state in BREAKER_STATES:
                breaker.add_metric([*x, label, m.role, state], 1 if last == state else 0)
        for i in stats.instances:
            member.add_metric([*x, i.label, i.role], 1)
            label = i.label
            connections.add_metric([*x, label, i.role, "in_use"], i.in_use)
            connections.add_metric([*x, label, i.role, "idle"], i.idle)
            max_size.add_metric([*x, label, i.role], per_instance)
            waiters.add_metric([*x, label, i.role], i.waiters)
            for state in BREAKER_STATES:
                breaker.add_metric([*x, label, i.role, state], 1 if i.breaker == state else 0)
            if i.lag_bytes is not None:
                lag_bytes.add_metric([*x, label], i.lag_bytes)
            if i.lag_seconds is not None:
                lag_seconds.add_metric([*x, label], i.lag_seconds)
        yield from (connections, max_size, waiters, breaker, lag_bytes, lag_seconds, member)

        pool_labels = list(self._extra)
        version = GaugeMetricFamily("picopool_topology_version",
                                    "The topology snapshot's version", labels=pool_labels)
        version.add_metric(list(x), stats.topology_version)
        refreshes = CounterMetricFamily("picopool_topology_refreshes", "Topology refreshes",
                                        labels=pool_labels)
        refreshes.add_metric(list(x), stats.refreshes)
        failed = CounterMetricFamily("picopool_topology_refresh_failures",
                                     "Topology refreshes that failed", labels=pool_labels)
        failed.add_metric(list(x), stats.refresh_failures)
        waiters_max = GaugeMetricFamily("picopool_waiters_max",
                                        "The most tasks seen checking out at once",
                                        labels=pool_labels)
        waiters_max.add_metric(list(x), stats.waiters_max)
        yield from (version, refreshes, failed, waiters_max)


def _buckets(histogram: Histogram) -> list[tuple[str, float]]:
    return [("+Inf" if bound == float("inf") else repr(bound), count)
            for bound, count in histogram.cumulative()]


def register(pool: Pool, registry: CollectorRegistry | None = None, *,
             pool_name: str | None = None) -> PoolCollector:
    """Expose *pool*'s metrics in *registry* (None: prometheus_client's default).

    Returns the collector: ``registry.unregister(collector)`` takes them away.
    """
    collector = PoolCollector(pool, pool_name)
    (REGISTRY if registry is None else registry).register(collector)
    return collector
