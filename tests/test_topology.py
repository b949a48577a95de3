"""Pure pieces of the topology: address parsing, seed hosts, DSN masking, reconciliation."""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from picopool import Address, ConfigurationError, Instance, Role, mask_dsn
from picopool._dsn import seed_addresses
from picopool._topology import ReconcilePlan, dedupe, normalize_host, plan_reconcile

# -- strategies --------------------------------------------------------------------

LABEL = st.from_regex(r"[a-z]([a-z0-9-]{0,12}[a-z0-9])?", fullmatch=True)
HOSTNAMES = st.lists(LABEL, min_size=1, max_size=4).map(".".join)
PORTS = st.integers(min_value=1, max_value=65535)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6)


def _mixed_case(draw: st.DrawFn, text: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


@st.composite
def host_spellings(draw: st.DrawFn) -> tuple[str, str, bool]:
    """(canonical host, one way a user may spell it, is IPv6)."""
    kind = draw(st.sampled_from(["name", "ipv4", "ipv6"]))
    if kind == "name":
        name = draw(HOSTNAMES)
        spelled = _mixed_case(draw, name) + draw(st.sampled_from(["", "."]))
        return name, spelled, False
    if kind == "ipv4":
        ip = draw(IPV4)
        return ip, ip, False
    ip6 = draw(IPV6)
    spelled = draw(st.sampled_from([ip6.compressed, ip6.exploded]))
    return ip6.compressed, _mixed_case(draw, spelled), True


# -- Address.parse / normalize_host ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("db1", "db1", 5432),
        ("db1:6432", "db1", 6432),
        ("DB1.Example.COM.", "db1.example.com", 5432),
        ("DB1.Example.COM.:7000", "db1.example.com", 7000),
        ("  db1:6432  ", "db1", 6432),
        ("127.0.0.1", "127.0.0.1", 5432),
        ("127.0.0.1:5433", "127.0.0.1", 5433),
        ("::1", "::1", 5432),
        ("[::1]", "::1", 5432),
        ("[::1]:6432", "::1", 6432),
        ("[0:0:0:0:0:0:0:1]:6432", "::1", 6432),
        ("2001:DB8::1", "2001:db8::1", 5432),
        ("[2001:0db8:0000:0000:0000:0000:0000:0001]:1", "2001:db8::1", 1),
        ("[FE80::1]:65535", "fe80::1", 65535),
        ("::ffff:127.0.0.1", ipaddress.ip_address("::ffff:127.0.0.1").compressed, 5432),
        ("/var/run/postgresql", "/var/run/postgresql", 5432),
        ("/Var/Run/PG", "/Var/Run/PG", 5432),  # socket paths are case-sensitive
    ],
)
def test_parse_examples(text: str, host: str, port: int) -> None:
    assert Address.parse(text) == Address(host, port)


def test_parse_default_port() -> None:
    assert Address.parse("db", default_port=6000) == Address("db", 6000)
    assert Address.parse("db:7000", default_port=6000) == Address("db", 7000)
    assert Address.parse("[::1]", default_port=6000) == Address("::1", 6000)


def test_str_brackets_ipv6() -> None:
    assert str(Address("::1", 5432)) == "[::1]:5432"
    assert str(Address("db", 5432)) == "db:5432"


@pytest.mark.parametrize(
    "text",
    ["", "   ", "db:", "db:abc", "db:0", "db:65536", "db:-1", "db:+1", "db: 1", "db:1.5",
     ":5432", "[::1", "[::1]x", "[::1]:", "[::1]:abc", "[::1]:0", "[]", "[]:5432"],
)
def test_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(text)


@pytest.mark.parametrize(
    "text",
    [
        ".",  # normalises to an empty host: Address('', 5432)
        "..:5",  # same, with a port
        "db:1:2",  # neither host:port nor an IPv6 literal: becomes host 'db:1:2'
        "[notanip]:5432",  # brackets are only for IPv6 literals
        "db:\u0663",  # ARABIC-INDIC DIGIT THREE passes str.isdigit(): port 3
        "db host",  # whitespace inside a host name
        "db\x00",  # control character
    ],
)
def test_parse_rejects_more_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        Address.parse(text)


def test_normalize_host_trailing_dot_on_ip_literal() -> None:
    assert normalize_host("0::1.") == normalize_host("0::1") == "::1"
    assert Address.parse("[0:0::1.]:5432") == Address("::1", 5432)


@given(host_spellings(), PORTS)
def test_every_spelling_parses_to_the_canonical_address(
    spelling: tuple[str, str, bool], port: int
) -> None:
    canonical, spelled, is_v6 = spelling
    expected = Address(canonical, port)
    if is_v6:
        assert Address.parse(f"[{spelled}]:{port}") == expected
        assert Address.parse(spelled, default_port=port) == expected
        assert Address.parse(f"[{spelled}]", default_port=port) == expected
    else:
        assert Address.parse(f"{spelled}:{port}") == expected
        assert Address.parse(spelled, default_port=port) == expected
    assert Address.parse(str(expected)) == expected  # str() round-trips


@given(host_spellings())
def test_normalize_host_is_idempotent_on_valid_hosts(spelling: tuple[str, str, bool]) -> None:
    canonical, spelled, _ = spelling
    assert normalize_host(spelled) == canonical
    assert normalize_host(canonical) == canonical


@given(st.text(max_size=40))
def test_parse_of_any_text_returns_an_address_or_raises_value_error(text: str) -> None:
    try:
        address = Address.parse(text)
    except ValueError:
        return
    assert 0 < address.port < 65536
    assert isinstance(address.host, str)


@given(st.text(alphabet="[]:.0123456789abcdefABCDEF/ %", max_size=30))
def test_parse_of_address_like_text_raises_only_value_error(text: str) -> None:
    try:
        address = Address.parse(text)
    except ValueError:
        return
    assert 0 < address.port < 65536


# -- seed_addresses ----------------------------------------------------------------


def A(host: str, port: int = 5432) -> Address:
    return Address(host, port)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgres://u:p@h1:1,h2:2/db", [A("h1", 1), A("h2", 2)]),
        ("postgresql://h1,h2:7/db", [A("h1"), A("h2", 7)]),
        ("postgres://u@[::1]:5432,[2001:DB8::1]:6432/db", [A("::1"), A("2001:db8::1", 6432)]),
        ("postgres://[::1]/db", [A("::1")]),
        ("postgres://H1.Example.:1/db?sslmode=disable", [A("h1.example", 1)]),
        ("postgres:///db?host=a,b&port=1,2", [A("a", 1), A("b", 2)]),
        ("postgres:///db?host=a,b&port=7", [A("a", 7), A("b", 7)]),
        ("postgres:///db?host=/var/run/postgresql", [A("/var/run/postgresql")]),
        ("host=a,b port=1,2 user=x", [A("a", 1), A("b", 2)]),
        ("host=a,b port=7", [A("a", 7), A("b", 7)]),
        ("host=a,b", [A("a"), A("b")]),
        ("host='a,b' port='1,2' dbname=x", [A("a", 1), A("b", 2)]),
        ("host = a port = 9", [A("a", 9)]),
        ("host=::1,10.0.0.1 port=1,2", [A("::1", 1), A("10.0.0.1", 2)]),
    ],
)
def test_seed_addresses_examples(dsn: str, expected: list[Address],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGHOST", raising=False)
    monkeypatch.delenv("PGPORT", raising=False)
    assert seed_addresses(dsn, {}) == expected


@pytest.mark.parametrize(
    "dsn",
    ["host=a,b,c port=1,2", "postgres:///db?host=a,b,c&port=1,2", "host=a port=x",
     "host=a port=0", "host=a port=70000", "garbage", "not a dsn"],
)
def test_seed_addresses_rejects_bad_dsns(dsn: str) -> None:
    with pytest.raises(ConfigurationError):
        seed_addresses(dsn, {})


@pytest.mark.parametrize(
    "dsn",
    ["postgres://h:notaport/db", "postgres://h:99999/db", "postgres://:5432/db",
     "host=a,,b", "postgres://[::1]x/db"],
)
def test_seed_addresses_reports_malformed_hosts_as_configuration_errors(dsn: str) -> None:
    with pytest.raises(ConfigurationError):
        seed_addresses(dsn, {})


def test_seed_addresses_from_connect_kwargs() -> None:
    assert seed_addresses(None, {"host": "h", "port": 1}) == [A("h", 1)]
    assert seed_addresses(None, {"host": ["a", "b"], "port": [1, 2]}) == [A("a", 1), A("b", 2)]
    assert seed_addresses(None, {"host": ["a", "b"], "port": 3}) == [A("a", 3), A("b", 3)]
    assert seed_addresses("postgres://x:9/db", {"host": "h"}) == [A("h")]  # kwargs win
    assert seed_addresses("postgres://a:1,b:2/db", {"port": 7}) == [A("a", 7), A("b", 7)]
    with pytest.raises(ConfigurationError):
        seed_addresses(None, {"host": ["a", "b"], "port": [1]})


def test_seed_addresses_fall_back_to_pghost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGHOST", "x,y")
    monkeypatch.setenv("PGPORT", "1,2")
    assert seed_addresses(None, {}) == [A("x", 1), A("y", 2)]
    assert seed_addresses("postgres:///db", {}) == [A("x", 1), A("y", 2)]
    assert seed_addresses("user=u dbname=d", {}) == [A("x", 1), A("y", 2)]
    monkeypatch.setenv("PGPORT", "1,2,3")
    with pytest.raises(ConfigurationError):
        seed_addresses(None, {})
    monkeypatch.delenv("PGHOST")
    monkeypatch.delenv("PGPORT")
    assert seed_addresses(None, {}) == [A("localhost")]


@st.composite
def host_lists(draw: st.DrawFn) -> list[tuple[str, str, int, bool]]:
    """[(canonical host, spelling, port, is IPv6)], 1..5 hosts."""
    hosts = draw(st.lists(host_spellings(), min_size=1, max_size=5))
    return [(c, s, draw(PORTS), v6) for c, s, v6 in hosts]


@given(host_lists(), st.sampled_from(["postgres", "postgresql"]),
       st.sampled_from(["", "u@", "u:p%40ss@"]))
def test_seed_addresses_from_multi_host_urls(hosts: list[tuple[str, str, int, bool]],
                                             scheme: str, userinfo: str) -> None:
    netloc = ",".join(f"[{s}]:{p}" if v6 else f"{s}:{p}" for _, s, p, v6 in hosts)
    dsn = f"{scheme}://{userinfo}{netloc}/db?sslmode=disable"
    assert seed_addresses(dsn, {}) == [A(c, p) for c, _, p, _ in hosts]


@given(host_lists(), st.booleans())
def test_seed_addresses_from_key_value_dsns(hosts: list[tuple[str, str, int, bool]],
                                            one_port: bool) -> None:
    host_list = ",".join(s for _, s, _, _ in hosts)
    if one_port:
        port = hosts[0][2]
        dsn = f"user=u host={host_list} port={port} dbname=d"
        expected = [A(c, port) for c, _, _, _ in hosts]
    else:
        dsn = f"user=u host={host_list} port={','.join(str(p) for _, _, p, _ in hosts)}"
        expected = [A(c, p) for c, _, p, _ in hosts]
    assert seed_addresses(dsn, {}) == expected


@given(host_lists(), st.integers(min_value=1, max_value=4))
def test_seed_addresses_port_count_mismatch(hosts: list[tuple[str, str, int, bool]],
                                            extra: int) -> None:
    assume(len(hosts) > 1)
    ports = ",".join(["5432"] * (len(hosts) + extra))
    with pytest.raises(ConfigurationError):
        seed_addresses(f"host={','.join(s for _, s, _, _ in hosts)} port={ports}", {})


# -- mask_dsn ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgres://user:s3cret@h:1/db", "postgres://user:***@h:1/db"),
        ("postgresql://user:s3cret@h1:1,h2:2/db", "postgresql://user:***@h1:1,h2:2/db"),
        ("postgres://:s3cret@h/db", "postgres://:***@h/db"),
        ("postgres://user@h/db?password=s3cret&sslmode=disable",
         "postgres://user@h/db?password=***&sslmode=disable"),
        ("postgres://user@h/db?sslmode=disable&PASSWORD=s3cret",
         "postgres://user@h/db?sslmode=disable&PASSWORD=***"),
        ("host=h password=s3cret user=u", "host=h password=*** user=u"),
        ("host=h password = s3cret", "host=h password = ***"),
        ("host=h password='s3 c\\'ret' user=u", "host=h password=*** user=u"),
        ("postgres://user@h:1/db", "postgres://user@h:1/db"),
        ("host=h user=u", "host=h user=u"),
    ],
)
def test_mask_dsn_examples(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_mask_dsn_empty() -> None:
    assert mask_dsn(None) == ""
    assert mask_dsn("") == ""


PASSWORDS = st.text(min_size=3, max_size=30).filter(lambda p: "\x00" not in p)


def _kv_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@given(PASSWORDS, st.sampled_from(["postgres", "postgresql"]), st.sampled_from(["u", ""]))
def test_mask_dsn_hides_url_passwords(password: str, scheme: str, user: str) -> None:
    encoded = urllib.parse.quote(password, safe="")
    template = f"{scheme}://{user}:{{}}@h1:5432,h2:5433/db?sslmode=disable"
    expected = template.format("***")
    assume(password not in expected and encoded not in expected)
    assert mask_dsn(template.format(encoded)) == expected


@given(PASSWORDS)
def test_mask_dsn_hides_query_passwords(password: str) -> None:
    encoded = urllib.parse.quote(password, safe="")
    template = "postgres://u@h1,h2/db?sslmode=disable&password={}&application_name=x"
    expected = template.format("***")
    assume(password not in expected and encoded not in expected)
    assert mask_dsn(template.format(encoded)) == expected


@given(PASSWORDS)
def test_mask_dsn_hides_quoted_key_value_passwords(password: str) -> None:
    template = "host=h1,h2 port=1,2 password={} user=u dbname=d"
    expected = template.format("***")
    assume(password not in expected)
    assert mask_dsn(template.format(_kv_quote(password))) == expected


@given(st.text(alphabet=st.characters(exclude_categories=["Z", "C"],
                                      exclude_characters="'\\"), min_size=3, max_size=30))
def test_mask_dsn_hides_bare_key_value_passwords(password: str) -> None:
    template = "host=h1 password={} user=u"
    expected = template.format("***")
    assume(password not in expected)
    assert mask_dsn(template.format(password)) == expected


# -- dedupe and reconciliation -----------------------------------------------------

IDS = ["a", "b", "c", "d", "e"]
ADDRESSES = [Address("10.0.0.1", 5432), Address("10.0.0.2", 5432), Address("10.0.0.3", 5432),
             Address("db4", 6432)]

INSTANCES = st.builds(
    Instance,
    id=st.sampled_from(IDS),
    address=st.sampled_from(ADDRESSES),
    role=st.sampled_from(list(Role)),
    name=st.none() | st.sampled_from(["n1", "n2"]),
    weight=st.sampled_from([0.0, 1.0, 2.0]),
    usable=st.booleans() | st.just(True),
    lag_bytes=st.none() | st.integers(min_value=0, max_value=100),
)
TOPOLOGIES = st.lists(INSTANCES, max_size=7)


def test_dedupe_first_report_wins() -> None:
    a1 = Instance("a", ADDRESSES[0], Role.PRIMARY)
    a2 = Instance("a", ADDRESSES[1], Role.REPLICA)  # same id again
    b = Instance("b", ADDRESSES[0], Role.REPLICA)  # same address as a1
    c = Instance("c", ADDRESSES[2], Role.REPLICA, usable=False)
    d = Instance("d", ADDRESSES[3], Role.REPLICA)
    assert dedupe([a1, a2, b, c, d]) == (a1, d)


def apply_plan(held: dict[str, Instance], plan: ReconcilePlan) -> None:
    """Apply *plan* the way Pool._refresh does, checking the invariants at each step."""
    assert len(set(plan.remove)) == len(plan.remove), "an id removed twice"
    for member_id in plan.remove:
        assert member_id in held, f"removing {member_id}, which is not held"
        del held[member_id]
    for instance in plan.add:
        assert instance.usable, f"adding unusable {instance}"
        assert instance.id not in held, f"adding {instance.id} twice"
        assert instance.address not in {i.address for i in held.values()}, (
            f"adding {instance.id} at {instance.address}, already held by another id")
        held[instance.id] = instance
    for member_id in plan.expire:
        assert member_id in held, f"expiring {member_id}, which is not held"
    for instance in plan.keep:
        assert instance.id in held, f"keeping {instance.id}, which is not held"
        assert held[instance.id].address == instance.address
        held[instance.id] = instance


def check_plan(held: Mapping[str, Instance], wanted: Sequence[Instance],
               plan: ReconcilePlan) -> None:
    target = {i.id: i for i in dedupe(wanted)}
    add_ids = [i.id for i in plan.add]
    keep_ids = [i.id for i in plan.keep]
    assert len(set(add_ids)) == len(add_ids)
    assert not set(add_ids) & set(keep_ids)
    assert set(plan.expire) <= set(keep_ids)
    for member_id, instance in held.items():
        new = target.get(member_id)
        if new is None:
            assert member_id in plan.remove and member_id not in add_ids
        elif new.address != instance.address:  # address change: remove + add, no expire
            assert member_id in plan.remove and member_id in add_ids
            assert member_id not in plan.expire
        else:
            assert member_id not in plan.remove and member_id in keep_ids
            assert (member_id in plan.expire) == (new.role is not instance.role)
    for member_id in add_ids:
        assert member_id not in held or member_id in plan.remove


@given(st.lists(TOPOLOGIES, min_size=1, max_size=8))
def test_reconciliation_over_topology_sequences(topologies: list[list[Instance]]) -> None:
    held: dict[str, Instance] = {}
    for wanted in topologies:
        plan = plan_reconcile(held, wanted)
        check_plan(held, wanted, plan)
        apply_plan(held, plan)

        target = dedupe(wanted)
        assert set(held) == {i.id for i in target}
        assert held == {i.id: i for i in target}  # metadata updates are kept too
        assert len({i.address for i in held.values()}) == len(held)
        assert all(i.usable for i in held.values())

        again = plan_reconcile(held, wanted)  # idempotent
        assert not again.changed, again
        assert {i.id for i in again.keep} == set(held)


@given(TOPOLOGIES)
def test_unusable_instances_are_never_added(wanted: list[Instance]) -> None:
    plan = plan_reconcile({}, wanted)
    assert all(i.usable for i in plan.add)
    assert {i.id for i in plan.add} == {i.id for i in dedupe(wanted)}


def test_role_change_expires() -> None:
    replica = Instance("a", ADDRESSES[0], Role.REPLICA)
    promoted = Instance("a", ADDRESSES[0], Role.PRIMARY)
    plan = plan_reconcile({"a": replica}, [promoted])
    assert plan.expire == ("a",) and plan.keep == (promoted,)
    assert plan.add == () and plan.remove == ()


def test_address_change_is_remove_plus_add() -> None:
    old = Instance("a", ADDRESSES[0], Role.REPLICA)
    moved = Instance("a", ADDRESSES[1], Role.PRIMARY)
    plan = plan_reconcile({"a": old}, [moved])
    assert plan.remove == ("a",) and plan.add == (moved,) and plan.expire == ()


def test_metadata_change_is_keep_only() -> None:
    old = Instance("a", ADDRESSES[0], Role.REPLICA, lag_bytes=5)
    new = Instance("a", ADDRESSES[0], Role.REPLICA, lag_bytes=500, weight=3.0)
    plan = plan_reconcile({"a": old}, [new])
    assert not plan.changed and plan.keep == (new,)


def test_address_taken_over_by_a_new_id() -> None:
    old = Instance("a", ADDRESSES[0], Role.PRIMARY)
    new = Instance("b", ADDRESSES[0], Role.PRIMARY)
    plan = plan_reconcile({"a": old}, [new])
    assert plan.remove == ("a",) and plan.add == (new,)


def test_unusable_held_instance_is_removed() -> None:
    held = Instance("a", ADDRESSES[0], Role.REPLICA)
    plan = plan_reconcile({"a": held}, [Instance("a", ADDRESSES[0], Role.REPLICA, usable=False)])
    assert plan.remove == ("a",) and plan.add == ()


@pytest.mark.parametrize("dsn", [" postgres://u:s3cret@h/db", "\tpostgresql://u:s3cret@h/db"])
def test_mask_dsn_hides_passwords_after_leading_whitespace(dsn: str) -> None:
    assert "s3cret" not in mask_dsn(dsn)
    try:
        seed_addresses(dsn, {})
    except ConfigurationError as exc:
        assert "s3cret" not in str(exc)
