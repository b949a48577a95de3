"""Property tests of the pg_auto_failover node mapping, plus the provider's error path."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from harness.fixtures import NoConnections
from hypothesis import given
from hypothesis import strategies as st

from picopool import Address, ConfigurationError, Instance, Role, TopologyError
from picopool._wal import parse_lsn
from picopool.discovery import AutoFailover
from picopool.discovery._autofailover import WRITABLE_STATES, parse_nodes

# Every replication state pg_auto_failover 2.0 knows, plus garbage.
STATES = sorted(WRITABLE_STATES | {
    "init", "wait_standby", "catchingup", "secondary", "prepare_promotion", "stop_replication",
    "demote_timeout", "draining", "demoted", "maintenance", "report_lsn", "fast_forward",
    "join_secondary", "dropped", "wait_maintenance", "prepare_maintenance", "SECONDARY", "",
})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def lsn_text(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


@st.composite
def rows(draw: st.DrawFn, node_id: int | None = None) -> dict[str, Any]:
    """A row of pgautofailover.node, well-formed except where hypothesis chooses otherwise."""
    row: dict[str, Any] = {
        "nodeid": node_id if node_id is not None else draw(st.integers(1, 20)),
        "nodename": draw(st.sampled_from(["node1", "node2", "node_x", "", None])),
        "nodehost": draw(st.sampled_from(["127.0.0.1", "db.example", "::1", ""])),
        "nodeport": draw(st.one_of(st.integers(-1, 70000), st.sampled_from(["5432", None]))),
        "reportedstate": draw(st.sampled_from(STATES)),
        "goalstate": draw(st.sampled_from(STATES)),
        "health": draw(st.sampled_from([-1, 0, 1, 1, None])),
        "reportedlsn": draw(st.one_of(st.integers(0, 2**40).map(lsn_text),
                                      st.sampled_from(["0/0", "bogus", None]))),
        "formationid": "default",
        "groupid": 0,
    }
    for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=2)):
        row.pop(key, None)
    return row


def healthy_row(node_id: int, state: str, lsn: int = 0, port: int | None = None
                ) -> dict[str, Any]:
    return {
        "nodeid": node_id, "nodename": f"node{node_id}", "nodehost": "127.0.0.1",
        "nodeport": port or 5000 + node_id, "reportedstate": state, "goalstate": state,
        "health": 1, "reportedlsn": lsn_text(lsn), "formationid": "default", "groupid": 0,
    }


def check_invariants(instances: tuple[Instance, ...]) -> None:
    assert all(isinstance(i, Instance) and isinstance(i.address, Address) for i in instances)
    assert len({i.id for i in instances}) == len(instances)
    assert sum(i.role is Role.PRIMARY for i in instances) <= 1
    for instance in instances:
        attributes = dict(instance.attributes)
        if instance.role is Role.REPLICA:
            assert attributes["reported_state"] == attributes["goal_state"] == "secondary"
            assert instance.lag_bytes is None or instance.lag_bytes >= 0
        else:
            assert instance.role is Role.PRIMARY
            assert attributes["goal_state"] in WRITABLE_STATES


@given(json_values, json_values)
def test_arbitrary_input_never_crashes(nodes: object, primary_id: object) -> None:
    try:
        instances = parse_nodes(nodes, primary_id)
    except TopologyError:
        assert not isinstance(nodes, list)
        return
    check_invariants(instances)


@given(st.lists(st.one_of(rows(), json_values), max_size=8),
       st.one_of(st.none(), st.integers(0, 20), json_values))
def test_garbage_rows_are_skipped(items: list[object], primary_id: object) -> None:
    check_invariants(parse_nodes(items, primary_id))


@given(st.lists(st.integers(1, 50), min_size=1, max_size=6, unique=True), st.data())
def test_get_primary_names_the_primary(ids: list[int], data: st.DataObject) -> None:
    items: list[dict[str, Any]] = [data.draw(rows(node_id)) for node_id in ids]
    for node_id, item in zip(ids, items, strict=True):  # addressable and named uniquely
        item.update(nodeid=node_id, nodename=f"n{node_id}", nodehost="10.0.0.1",
                    nodeport=5000 + node_id)
        item.setdefault("reportedstate", "secondary")
        item.setdefault("goalstate", "secondary")
    chosen = data.draw(st.sampled_from(items))
    chosen["goalstate"] = data.draw(st.sampled_from(sorted(WRITABLE_STATES)))
    instances = parse_nodes(items, chosen["nodeid"])
    primaries = [i for i in instances if i.role is Role.PRIMARY]
    assert [p.id for p in primaries] == [chosen["nodename"]]
    check_invariants(instances)


@given(st.sampled_from(["draining", "demote_timeout", "demoted", "secondary"]))
def test_get_primary_naming_a_demoted_node_is_not_trusted(old_goal: str) -> None:
    old = healthy_row(1, "primary") | {"goalstate": old_goal}
    new = healthy_row(2, "wait_primary")
    other = healthy_row(3, "secondary")
    instances = {i.id: i for i in parse_nodes([old, new, other], primary_id=1)}
    assert instances["node2"].role is Role.PRIMARY
    assert "node1" not in instances
    assert instances["node3"].role is Role.REPLICA


def test_without_get_primary_the_one_writable_goal_state_decides() -> None:
    nodes = [healthy_row(1, "secondary"), healthy_row(2, "primary"), healthy_row(3, "secondary")]
    instances = {i.id: i.role for i in parse_nodes(nodes, None)}
    assert instances == {"node1": Role.REPLICA, "node2": Role.PRIMARY, "node3": Role.REPLICA}


def test_two_writable_goal_states_and_no_answer_give_no_primary() -> None:
    nodes = [healthy_row(1, "primary"), healthy_row(2, "wait_primary"),
             healthy_row(3, "secondary")]
    assert [(i.id, i.role) for i in parse_nodes(nodes, None)] == [("node3", Role.REPLICA)]


@given(st.sampled_from(STATES), st.sampled_from(STATES), st.sampled_from([-1, 0, 1, None]))
def test_only_healthy_secondaries_serve_reads(reported: str, goal: str, health: object) -> None:
    primary = healthy_row(1, "primary")
    node = healthy_row(2, "secondary") | {"reportedstate": reported, "goalstate": goal,
                                          "health": health}
    instances = {i.id: i for i in parse_nodes([primary, node], primary_id=1)}
    assert instances["node1"].role is Role.PRIMARY
    readable = reported == goal == "secondary" and health == 1
    assert ("node2" in instances) == readable


@given(st.integers(0, 2**63), st.integers(0, 2**63))
def test_lag_is_the_lsn_distance_to_the_primary(primary_lsn: int, replica_lsn: int) -> None:
    nodes = [healthy_row(1, "primary", primary_lsn), healthy_row(2, "secondary", replica_lsn)]
    replica = next(i for i in parse_nodes(nodes, 1) if i.role is Role.REPLICA)
    assert replica.lag_bytes == max(0, primary_lsn - replica_lsn)


@given(st.integers(0, 2**64 - 1))
def test_parse_lsn_round_trip(position: int) -> None:
    assert parse_lsn(lsn_text(position)) == position
    assert parse_lsn(lsn_text(position).lower()) == position


def test_parse_lsn_rejects_garbage() -> None:
    for text in ("", "1", "1/", "/1", "G/1", "1/2/3", "123456789/0", None, 12):
        assert parse_lsn(text) is None


def test_duplicates_and_malformed_rows_are_skipped(caplog: pytest.LogCaptureFixture) -> None:
    nodes: list[object] = [
        healthy_row(1, "primary"),
        healthy_row(1, "secondary", port=6000),  # same id again
        healthy_row(2, "secondary") | {"nodeport": 0},
        healthy_row(3, "secondary") | {"nodehost": None},
        "not a row",
        healthy_row(4, "secondary"),
    ]
    assert [i.id for i in parse_nodes(nodes, 1)] == ["node1", "node4"]
    assert "duplicate" in caplog.text and "bad address" in caplog.text


# -- the provider ------------------------------------------------------------------


async def test_unreachable_monitor_raises_with_masked_dsn() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = AutoFailover(f"postgres://autoctl_node:s3cret@127.0.0.1:{port}/pg_auto_failover",
                            timeout=1)
    with pytest.raises(TopologyError) as raised:
        await provider.discover(NoConnections())
    await provider.aclose()
    assert "s3cret" not in str(raised.value) and "s3cret" not in repr(provider)
    assert f"127.0.0.1:{port}" in str(raised.value)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        AutoFailover("")
    with pytest.raises(ConfigurationError):
        AutoFailover("postgres://m/pg_auto_failover", timeout=-1)
