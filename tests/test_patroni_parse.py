"""Property tests of the Patroni ``GET /cluster`` mapping, plus the provider's error paths."""

from __future__ import annotations

import ssl
import sys
from typing import Any

import httpx
import pytest
from harness.fixtures import NoConnections
from hypothesis import given
from hypothesis import strategies as st

from picopool import Address, ConfigurationError, Instance, Role, TopologyError
from picopool.discovery import Patroni
from picopool.discovery._patroni import mask_url, parse_cluster

# A real body from Patroni 4.1.5 (synchronous mode), as the harness cluster serves it.
REAL_CLUSTER = {
    "members": [
        {"name": "node1", "role": "sync_standby", "state": "streaming",
         "api_url": "http://127.0.0.1:34225/patroni", "host": "127.0.0.1", "port": 36007,
         "timeline": 1, "receive_lag": 0, "receive_lsn": "0/5000050", "replay_lag": 0,
         "replay_lsn": "0/5000050", "lag": 0, "lsn": "0/5000050"},
        {"name": "node2", "role": "replica", "state": "streaming",
         "api_url": "http://127.0.0.1:35347/patroni", "host": "127.0.0.1", "port": 46883,
         "timeline": 1, "lag": "unknown", "tags": {"noloadbalance": True}},
        {"name": "node3", "role": "leader", "state": "running",
         "api_url": "http://127.0.0.1:59371/patroni", "host": "127.0.0.1", "port": 45763,
         "timeline": 1},
    ],
    "scope": "demo",
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

ROLES = ["leader", "replica", "sync_standby", "quorum_standby", "standby_leader", "master",
         "uninitialized", "LEADER", ""]
STATES = ["running", "streaming", "stopped", "starting", "crashed", "in archive recovery",
          "creating replica", "Running"]
REPLICA_ROLES = {"replica", "sync_standby", "quorum_standby", "standby_leader"}


@st.composite
def members(draw: st.DrawFn, *, name: str | None = None) -> dict[str, Any]:
    """A member that is well-formed except where hypothesis chooses otherwise."""
    member: dict[str, Any] = {
        "name": name if name is not None else draw(st.text(min_size=1, max_size=6)),
        "role": draw(st.sampled_from(ROLES)),
        "state": draw(st.sampled_from(STATES)),
        "host": draw(st.sampled_from(["127.0.0.1", "db-1.example", "::1", "", "  "])),
        "port": draw(st.one_of(st.integers(-5, 70000), st.sampled_from(["5432", "x", None]))),
        "timeline": draw(st.integers(0, 5)),
    }
    if draw(st.booleans()):
        member["lag"] = draw(st.one_of(st.integers(-10, 10**12), st.just("unknown"), json_values))
    if draw(st.booleans()):
        member["tags"] = draw(st.one_of(
            st.fixed_dictionaries({}, optional={
                "noloadbalance": st.one_of(st.booleans(), st.sampled_from(["true", "off", "1"])),
                "nofailover": st.booleans(),
            }),
            json_values,
        ))
    for key in draw(st.lists(st.sampled_from(sorted(member)), max_size=2)):
        member.pop(key, None)  # a member missing a field
    return member


def expected_usable(member: dict[str, Any]) -> bool:
    """The rules, restated independently: is this member reported at all?"""
    name, role, state = member.get("name"), member.get("role"), member.get("state")
    port, host = member.get("port"), member.get("host")
    if not isinstance(name, str) or not name.strip():
        return False
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        return False
    if not isinstance(host, str) or not host.strip():
        return False
    if role in ("leader", "master"):
        return state == "running"
    return role in REPLICA_ROLES and state in ("running", "streaming")


def check_invariants(instances: tuple[Instance, ...]) -> None:
    assert all(isinstance(i, Instance) and isinstance(i.address, Address) for i in instances)
    assert all(0 < i.address.port < 65536 for i in instances)
    assert len({i.id for i in instances}) == len(instances)
    assert sum(i.role is Role.PRIMARY for i in instances) <= 1
    assert all(i.role in (Role.PRIMARY, Role.REPLICA) for i in instances)
    assert all(i.lag_bytes is None or i.lag_bytes >= 0 for i in instances)
    assert all(i.id == i.name for i in instances)


@given(json_values)
def test_arbitrary_json_never_crashes(payload: object) -> None:
    try:
        instances = parse_cluster(payload)
    except TopologyError:
        assert not isinstance(payload, dict) or not isinstance(payload.get("members"), list)
        return
    check_invariants(instances)


@given(st.lists(st.one_of(json_values, members()), max_size=8))
def test_garbage_members_are_skipped(items: list[object]) -> None:
    instances = parse_cluster({"members": items, "scope": "demo"})
    check_invariants(instances)
    assert len(instances) <= len(items)


@given(st.lists(members(), max_size=6))
def test_membership_follows_role_and_state_rules(items: list[dict[str, Any]]) -> None:
    # Unique names, so every usable member must come out.
    for index, member in enumerate(items):
        if "name" in member:
            member["name"] = f"m{index}"
    instances = parse_cluster({"members": items})
    wanted = {m["name"] for m in items if expected_usable(m)}
    leaders = [m for m in items if expected_usable(m) and m["role"] in ("leader", "master")]
    if len(leaders) > 1:  # only the one on the latest timeline stays
        newest = max(leaders, key=lambda m: m.get("timeline", 0))
        wanted -= {m["name"] for m in leaders if m is not newest}
    assert {i.id for i in instances} == wanted
    check_invariants(instances)


@given(members(name="the-leader"), st.lists(members(), max_size=5), st.randoms())
def test_one_running_leader_is_the_only_primary(
    leader: dict[str, Any], others: list[dict[str, Any]], random: Any
) -> None:
    leader.update(name="the-leader", role="leader", state="running", host="10.0.0.1", port=5432)
    for index, member in enumerate(others):
        member["name"] = f"other{index}"
        if member.get("role") in ("leader", "master"):
            member["role"] = "replica"
    items: list[object] = [leader, *others]
    random.shuffle(items)
    instances = parse_cluster({"members": items})
    primaries = [i for i in instances if i.role is Role.PRIMARY]
    assert [p.id for p in primaries] == ["the-leader"]
    assert primaries[0].address == Address("10.0.0.1", 5432)
    assert primaries[0].lag_bytes is None


@given(st.sampled_from(sorted(REPLICA_ROLES)), st.sampled_from(["running", "streaming"]),
       st.one_of(st.booleans(), st.sampled_from(["true", "yes", "on", "false", "0", ""])),
       st.one_of(st.integers(0, 10**15), st.just("unknown")))
def test_replica_tags_and_lag(role: str, state: str, noloadbalance: object, lag: object) -> None:
    member = {"name": "r", "role": role, "state": state, "host": "h", "port": 5433,
              "lag": lag, "tags": {"noloadbalance": noloadbalance, "nofailover": True}}
    (instance,) = parse_cluster({"members": [member]})
    assert instance.role is Role.REPLICA
    assert instance.state == state
    assert instance.no_load_balance == bool(noloadbalance)  # Patroni's own reading of tags
    assert instance.lag_bytes == (None if lag == "unknown" else lag)
    assert ("nofailover", "true") in instance.attributes
    assert ("patroni_role", role) in instance.attributes


def test_real_payload() -> None:
    instances = {i.id: i for i in parse_cluster(REAL_CLUSTER)}
    assert instances["node3"].role is Role.PRIMARY
    assert instances["node3"].address == Address("127.0.0.1", 45763)
    assert instances["node1"].role is Role.REPLICA and instances["node1"].lag_bytes == 0
    assert instances["node2"].no_load_balance and instances["node2"].lag_bytes is None
    assert not instances["node1"].no_load_balance


def test_leader_must_be_running_and_stopped_replicas_are_dropped() -> None:
    payload = {"members": [
        {"name": "a", "role": "leader", "state": "starting", "host": "h", "port": 1},
        {"name": "b", "role": "replica", "state": "stopped", "host": "h", "port": 2},
        {"name": "c", "role": "replica", "state": "streaming", "host": "h", "port": 3},
        {"name": "d", "role": "leader", "state": "streaming", "host": "h", "port": 4},
    ]}
    assert [(i.id, i.role) for i in parse_cluster(payload)] == [("c", Role.REPLICA)]


def test_malformed_members_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    payload = {"members": [
        {"name": "no-port", "role": "replica", "state": "streaming", "host": "h"},
        {"name": "bad-port", "role": "replica", "state": "streaming", "host": "h", "port": 0},
        {"name": "odd-role", "role": "witness", "state": "running", "host": "h", "port": 1},
        "not a member",
    ]}
    assert parse_cluster(payload) == ()
    logged = caplog.text
    assert "no-port" in logged and "bad-port" in logged and "witness" in logged


def test_mask_url() -> None:
    assert mask_url("https://admin:s3cr%40t@h:8008") == "https://admin:***@h:8008"
    assert mask_url("http://h:8008/x") == "http://h:8008/x"
    assert mask_url("http://user@h:8008") == "http://user@h:8008"


# -- the provider ------------------------------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_all_endpoints_failing_names_each_with_masked_password() -> None:
    first, second = closed_port(), closed_port()
    provider = Patroni([f"127.0.0.1:{first}", f"http://admin:hunter2@127.0.0.1:{second}/"],
                       timeout=1)
    try:
        with pytest.raises(TopologyError) as raised:
            await provider.discover(NoConnections())
    finally:
        await provider.aclose()
    message = str(raised.value)
    assert f"http://127.0.0.1:{first}" in message
    assert f"http://admin:***@127.0.0.1:{second}" in message
    assert "hunter2" not in message and "hunter2" not in repr(provider)


async def test_tries_the_last_good_endpoint_first() -> None:
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.host)
        if request.url.host == "down":
            return httpx.Response(503, text="no")
        if request.url.host == "garbage":
            return httpx.Response(200, json={"not": "a cluster"})
        return httpx.Response(200, json=REAL_CLUSTER)

    provider = Patroni(["http://down:8008", "http://garbage:8008", "http://up:8008"],
                       transport=httpx.MockTransport(handler))
    try:
        found = await provider.discover(NoConnections())
        assert asked == ["down", "garbage", "up"]
        assert {i.id for i in found.instances} == {"node1", "node2", "node3"}
        asked.clear()
        await provider.discover(NoConnections())
        assert asked == ["up"]
    finally:
        await provider.aclose()


async def test_http_errors_do_not_leak_the_password() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"].startswith("Basic ")
        return httpx.Response(503, text="no leader")

    provider = Patroni(["http://admin:hunter2@db:8008"], transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(TopologyError, match="503") as raised:
            await provider.discover(NoConnections())
    finally:
        await provider.aclose()
    assert "hunter2" not in str(raised.value)
    assert "admin:***@db:8008" in str(raised.value)


def test_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError):
        Patroni([])
    with pytest.raises(ConfigurationError):
        Patroni(["http://h:8008"], timeout=0)
    with pytest.raises(ConfigurationError, match="TLS"):
        Patroni(["https://h:8008"], verify="/nonexistent/ca.pem")
    context = ssl.create_default_context()
    assert Patroni(["https://h:8008"], verify=context)._verify is context
    assert isinstance(Patroni(["https://h:8008"])._verify, ssl.SSLContext)  # built once
    assert Patroni(["https://h:8008"], verify=False)._verify is False
    assert repr(Patroni("h:8008")) == "Patroni(http://h:8008)"
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if not installed
    with pytest.raises(ConfigurationError, match=r"pip install picopool\[patroni\]"):
        Patroni(["http://h:8008"])
