"""OpenTelemetry metrics for a pool: ``pip install picopool[otel]`` (the API only).

    import picopool.otel
    picopool.otel.register(pool)                 # the global MeterProvider
    picopool.otel.register(pool, meter_provider=provider)

The semantic-convention instruments where they exist, with
``db.client.connection.pool.name`` set to the instance (``name@host:port``):

* ``db.client.operation.duration`` (s): every attempt of a pool-level statement, with
  ``db.system.name``, ``db.operation.name``, ``server.address``, ``server.port``,
  ``error.type`` (the outcome) on failures, and picopool's ``picopool.instance``,
  ``picopool.role``, ``picopool.outcome``;
* ``db.client.connection.count`` (``state`` idle / used), ``db.client.connection.max``,
  ``db.client.connection.pending_requests``, ``db.client.connection.wait_time`` (s);

and picopool's own: ``picopool.statements``, ``picopool.retries``, ``picopool.resets``
(``picopool.elided``), ``picopool.connections.lost``, ``picopool.breaker.open``,
``picopool.replica.lag`` (By) and ``picopool.replica.lag_time`` (s),
``picopool.topology.version``, ``picopool.topology.refresh_failures``.

Spans: the connections picopool runs statements on are asyncpg ``Connection`` objects,
so ``opentelemetry-instrumentation-asyncpg`` traces them as it traces asyncpg. When a
statement finishes inside a recording span of yours, picopool adds
``picopool.instance``, ``picopool.role``, ``picopool.routing_reason`` and
``picopool.attempt`` to it: where your request's statements went.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from ._events import AcquireFinished, Event, ResetDone, StatementFinished
from ._metrics import LOST_OUTCOMES

if TYPE_CHECKING:
    from ._pool import Pool

__all__ = ["OtelMetrics", "register"]

_POOL_NAME = "db.client.connection.pool.name"


def _server(label: str) -> tuple[str, int | None]:
    """``server.address`` and ``server.port`` from an instance label."""
    address = label.rsplit("@", 1)[-1]
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None


class OtelMetrics:
    """The instruments of one pool; :meth:`unregister` stops reporting."""

    def __init__(self, pool: Pool, meter_provider: MeterProvider | None = None) -> None:
        from . import __version__

        self._pool = pool
        self._active = True
        self._attributes: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        meter = metrics.get_meter("picopool", __version__, meter_provider=meter_provider)
        self.operation_duration = meter.create_histogram(
            "db.client.operation.duration", unit="s",
            description="Duration of database client operations")
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time", unit="s",
            description="The time it took to obtain an open connection from the pool")
        self.statements = meter.create_counter(
            "picopool.statements", unit="{statement}",
            description="Attempts of pool-level statements, by instance, role and outcome")
        self.retries = meter.create_counter(
            "picopool.retries", unit="{statement}",
            description="Statements run again on another instance")
        self.resets = meter.create_counter(
            "picopool.resets", unit="{connection}",
            description="Connections released, by whether the reset round trip was elided")
        self.lost = meter.create_counter(
            "picopool.connections.lost", unit="{connection}",
            description="Connections that broke under a statement")
        meter.create_observable_up_down_counter(
            "db.client.connection.count", [self._count], unit="{connection}",
            description="The number of connections that are currently in state described "
                        "by the state attribute")
        meter.create_observable_up_down_counter(
            "db.client.connection.max", [self._max], unit="{connection}",
            description="The maximum number of open connections allowed")
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests", [self._pending], unit="{request}",
            description="The number of current pending requests for an open connection")
        meter.create_observable_gauge(
            "picopool.breaker.open", [self._breaker], unit="1",
            description="1 while the instance's circuit breaker keeps traffic away")
        meter.create_observable_gauge(
            "picopool.replica.lag", [self._lag_bytes], unit="By",
            description="A replica's replay lag behind the primary, in WAL bytes")
        meter.create_observable_gauge(
            "picopool.replica.lag_time", [self._lag_seconds], unit="s",
            description="A replica's replay lag behind the primary, in seconds")
        meter.create_observable_gauge(
            "picopool.topology.version", [self._version], unit="1",
            description="The version of the pool's topology snapshot")
        meter.create_observable_counter(
            "picopool.topology.refresh_failures", [self._refresh_failures], unit="1",
            description="Topology refreshes that failed")
        pool.add_event_listener(self)

    def unregister(self) -> None:
        self._active = False
        self._pool.remove_event_listener(self)

    # -- the listener --------------------------------------------------------------------

    def __call__(self, event: Event) -> None:
        kind = type(event)
        if kind is StatementFinished:
            self._statement(event)  # type: ignore[arg-type]
        elif kind is AcquireFinished:
            assert isinstance(event, AcquireFinished)
            self.wait_time.record(event.waited, {
                _POOL_NAME: event.instance, "picopool.role": event.role,
                "picopool.acquired": event.ok})
        elif kind is ResetDone:
            assert isinstance(event, ResetDone)
            self.resets.add(1, {_POOL_NAME: event.instance, "picopool.elided": event.elided})

    def _statement(self, event: StatementFinished) -> None:
        key = (event.instance, event.role, event.outcome, event.query)
        attributes = self._attributes.get(key)
        if attributes is None:
            if len(self._attributes) > 4096:  # distinct statements: keep it bounded
                self._attributes.clear()
            host, port = _server(event.instance)
            words = event.query.split(None, 1)
            attributes = {
                "db.system.name": "postgresql", "server.address": host,
                "picopool.instance": event.instance, "picopool.role": event.role,
                "picopool.outcome": event.outcome,
            }
            if words and words[0].isalpha():
                attributes["db.operation.name"] = words[0].upper()
            if port is not None:
                attributes["server.port"] = port
            if event.outcome != "ok":
                attributes["error.type"] = event.outcome
            self._attributes[key] = attributes
        self.operation_duration.record(event.duration, attributes)
        self.statements.add(1, attributes)
        if event.attempt:
            self.retries.add(1, {"picopool.instance": event.instance})
        if event.outcome in LOST_OUTCOMES:
            self.lost.add(1, {_POOL_NAME: event.instance})
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({
                "picopool.instance": event.instance, "picopool.role": event.role,
                "picopool.routing_reason": event.reason, "picopool.attempt": event.attempt})

    # -- observable instruments ---------------------------------------------------------

    def _instances(self) -> list[Any]:
        return list(self._pool.stats().instances) if self._active else []

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        for i in self._instances():
            yield Observation(i.idle, {_POOL_NAME: i.label, "db.client.connection.state": "idle",
                                       "picopool.role": i.role})
            yield Observation(i.in_use, {_POOL_NAME: i.label,
                                         "db.client.connection.state": "used",
                                         "picopool.role": i.role})

    def _max(self, options: CallbackOptions) -> Iterable[Observation]:
        size = int(self._pool._pool_options["max_size"])
        for i in self._instances():
            yield Observation(size, {_POOL_NAME: i.label})

    def _pending(self, options: CallbackOptions) -> Iterable[Observation]:
        for i in self._instances():
            yield Observation(i.waiters, {_POOL_NAME: i.label})

    def _breaker(self, options: CallbackOptions) -> Iterable[Observation]:
        for i in self._instances():
            yield Observation(0 if i.breaker == "closed" else 1,
                              {"picopool.instance": i.label, "picopool.breaker": i.breaker})

    def _lag_bytes(self, options: CallbackOptions) -> Iterable[Observation]:
        for i in self._instances():
            if i.lag_bytes is not None:
                yield Observation(i.lag_bytes, {"picopool.instance": i.label})

    def _lag_seconds(self, options: CallbackOptions) -> Iterable[Observation]:
        for i in self._instances():
            if i.lag_seconds is not None:
                yield Observation(i.lag_seconds, {"picopool.instance": i.label})

    def _version(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._active:
            yield Observation(self._pool.stats().topology_version)

    def _refresh_failures(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._active:
            yield Observation(self._pool.stats().refresh_failures)


def register(pool: Pool, meter_provider: MeterProvider | None = None) -> OtelMetrics:
    """Report *pool*'s metrics through OpenTelemetry (None: the global MeterProvider)
    and add picopool's routing attributes to the current span of each statement."""
    return OtelMetrics(pool, meter_provider)
