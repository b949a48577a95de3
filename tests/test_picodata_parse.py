"""Property tests of the Picodata metadata parsers (no servers needed)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from picopool import Address
from picopool.discovery._picodata import (
    PicodataMetadataError,
    parse_address,
    parse_state,
    reset_session,
)

variants = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,20}", fullmatch=True)
incarnations = st.integers(min_value=0, max_value=2**63)
ports = st.integers(min_value=1, max_value=65535)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join).filter(
    lambda h: not h.replace(".", "").isdigit()
)
ipv4s = st.ip_addresses(v=4).filter(lambda a: str(a) != "0.0.0.0")
ipv6s = st.ip_addresses(v=6).filter(lambda a: a.compressed != "::")


# -- parse_state ----------------------------------------------------------------------


@given(variants, incarnations)
def test_array_state_round_trips(variant: str, incarnation: int) -> None:
    assert parse_state(json.dumps([variant, incarnation])) == (variant, incarnation)


@given(variants, incarnations)
def test_object_state_round_trips(variant: str, incarnation: int) -> None:
    assert parse_state(json.dumps({variant: incarnation})) == (variant, incarnation)


@given(variants, incarnations, st.sampled_from([" ", "\n", "\t", ""]))
def test_state_tolerates_json_whitespace(variant: str, incarnation: int, pad: str) -> None:
    text = f"{pad}[{pad}\"{variant}\"{pad},{pad}{incarnation}{pad}]{pad}"
    assert parse_state(text) == (variant, incarnation)


@pytest.mark.parametrize("text", ['"Online"', '["Online"]', ' "Online" '])
def test_bare_variant_has_no_incarnation(text: str) -> None:
    assert parse_state(text) == ("Online", None)


@pytest.mark.parametrize("text", [
    "", "[]", "{}", "null", "Online", "Online 5", "5", '["Online", 5, 6]',
    '{"Online": 5, "Offline": 6}',
    '["Online", -1]', '["Online", 5.0]', '["Online", true]', '["Online", "5"]',
    '[5, "Online"]', '["", 5]', '["On line", 5]', '{"Online": [5]}', '["Online", 5',
    "\x00", '["Online", 1' + "0" * 5000 + "]", "[" * 100_000,
])
def test_malformed_states_raise_value_error(text: str) -> None:
    with pytest.raises(PicodataMetadataError):
        parse_state(text)
    assert issubclass(PicodataMetadataError, ValueError)


@given(st.text())
@example("[" * 5000)
@example('{"Online": ' + "9" * 5000 + "}")
def test_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        variant, incarnation = parse_state(text)
    except PicodataMetadataError:
        return
    assert variant and variant[0].isascii() and variant[0].isalpha()
    assert incarnation is None or incarnation >= 0


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
                    max_leaves=8))
def test_any_json_parses_or_raises_value_error(value: Any) -> None:
    with contextlib.suppress(PicodataMetadataError):
        parse_state(json.dumps(value))


def test_non_text_state_raises_value_error() -> None:
    with pytest.raises(PicodataMetadataError):
        parse_state(b'["Online", 1]')  # type: ignore[arg-type]


# -- parse_address --------------------------------------------------------------------


@given(hostnames, ports)
def test_hostname_round_trips(host: str, port: int) -> None:
    assert parse_address(f"{host}:{port}", None) == Address(host, port)


@given(ipv4s, ports)
def test_ipv4_round_trips(ip: ipaddress.IPv4Address, port: int) -> None:
    address = parse_address(f"{ip}:{port}", "svc")
    assert address == Address(str(ip), port)
    assert parse_address(str(address), "svc") == address


@given(ipv6s, ports)
def test_bracketed_ipv6_round_trips(ip: ipaddress.IPv6Address, port: int) -> None:
    address = parse_address(f"[{ip.exploded}]:{port}", "svc")
    assert address == Address(ip.compressed, port)
    assert str(address) == f"[{ip.compressed}]:{port}"
    assert parse_address(str(address), "svc") == address


@pytest.mark.parametrize("text", ["::1", "::1:4327", "fe80::1:4327", "2001:db8::1"])
def test_unbracketed_ipv6_is_ambiguous(text: str) -> None:
    with pytest.raises(PicodataMetadataError):
        parse_address(text, "svc")


@given(st.sampled_from(["0.0.0.0", "[::]", "[0:0:0:0:0:0:0:0]", "[::0]"]), ports,
       st.sampled_from(["127.0.0.1", "db.example", "::1", "LOCALHOST"]))
def test_wildcard_maps_to_the_service_host(wildcard: str, port: int, service_host: str) -> None:
    expected_host = {"::1": "::1", "LOCALHOST": "localhost"}.get(service_host, service_host)
    assert parse_address(f"{wildcard}:{port}", service_host) == Address(expected_host, port)


def test_wildcard_without_service_host_raises() -> None:
    with pytest.raises(PicodataMetadataError):
        parse_address("0.0.0.0:4327", None)


@pytest.mark.parametrize("text", [
    "", ":", "host", "host:", ":4327", "host:0", "host:65536", "host:-1", "host:+5",
    "host:\u0665", "host:4327:1", "[::1]", "[::1]4327", "[::1:4327", "[db.example]:4327",
    "ho st:4327", "/tmp:4327", "host/x:4327", "999.1.1.1:4327", "-host:4327",
    "[::1]:abc", "\x00:1", "[127.0.0.1]:4327",
])
def test_bad_addresses_raise_value_error(text: str) -> None:
    with pytest.raises(PicodataMetadataError):
        parse_address(text, "svc")


@given(st.text(), st.none() | st.text())
@example("[::]:5", "")
@example("0.0.0.0:5", "\x00")
def test_any_text_address_parses_or_raises_value_error(text: str, service: str | None) -> None:
    try:
        address = parse_address(text, service)
    except PicodataMetadataError:
        return
    assert 0 < address.port < 65536 and address.host
    assert parse_address(str(address), service) == address


# -- the reset hook -------------------------------------------------------------------


class RecordingConnection:
    """Records every statement sent through the usual asyncpg entry points."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> str:
        self.sent.append(query)
        return ""

    fetch = fetchval = fetchrow = execute


async def test_reset_hook_sends_nothing() -> None:
    connection = RecordingConnection()
    await reset_session(connection)
    assert connection.sent == []


def test_queries_suit_picodata_sql() -> None:
    """No comments and one statement per query: all Picodata's SQL takes."""
    from picopool.discovery import _auto, _picodata

    go_driver = ("SELECT ppa.address, pi.current_state FROM _pico_peer_address AS ppa "
                 "JOIN _pico_instance AS pi ON ppa.raft_id = pi.raft_id "
                 "WHERE connection_type = 'pgproto'")
    assert go_driver == _picodata._BASIC_QUERY
    for query in (_picodata._FULL_QUERY, _picodata._BASIC_QUERY, _auto._PICODATA_PROBE):
        assert "--" not in query and "/*" not in query and ";" not in query
