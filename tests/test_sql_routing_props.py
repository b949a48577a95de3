"""Properties of the pure router, ``picopool._routing.decide``.

Priority: a per-call role, then ``pool.route()``, then a hint comment, then the
user's router, then the classifier. Symmetric clusters serve everything anywhere.
``strip_comments`` removes hint comments from what is sent. And no text at all
makes ``decide`` raise when no user hook is involved.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from picopool._routing import (
    Decision,
    ReadWriteSplit,
    RoleRequest,
    RoutingPolicy,
    decide,
    read_request,
)
from picopool._sql import classify, format_hint, parse_hint

# The roles a user names (role=, hints); SPILL is what read_write_split="prefer_replicas"
# asks for internally.
ROLES = [r for r in RoleRequest if r is not RoleRequest.SPILL]
ROLE_NAMES = [r.value for r in ROLES]

READS = [
    "select 1",
    "SELECT * FROM items WHERE id = $1",
    "values (1), (2)",
    "table items",
    "show work_mem",
    "explain select * from items",
    "with x as (select 1) select * from x",
    "select lower('a'), count(*) from items",
]
WRITES = [
    "insert into items values ($1)",
    "update items set x = 1",
    "delete from items",
    "create table t (id int)",
    "select * from items for update",
    "select nextval('s')",
    "with w as (delete from items returning *) select * from w",
    "select 1; select 2",
    "set work_mem = '1MB'",
    "select my_writer()",
]
BASE = st.sampled_from(READS + WRITES)
INSTANCE_NAMES = st.from_regex(r"[a-z][a-z0-9-]{0,8}(\.[a-z0-9]{1,4}){0,2}(:[0-9]{1,5})?",
                               fullmatch=True).filter(lambda n: n not in ROLE_NAMES)


@st.composite
def policies(draw: st.DrawFn) -> RoutingPolicy:
    return RoutingPolicy(
        split=draw(st.sampled_from(list(ReadWriteSplit))),
        fallback_to_primary=draw(st.booleans()),
        write_functions=draw(st.sampled_from([frozenset(), frozenset({"my_writer"})])),
        elide_reset=draw(st.booleans()),
    )


@dataclass(frozen=True)
class Hint:
    role: str | None
    instance: str | None
    at_start: bool
    spelled: str  # the comment as written

    def apply(self, query: str) -> str:
        return f"{self.spelled} {query}" if self.at_start else f"{query} {self.spelled}"


@st.composite
def hints(draw: st.DrawFn) -> Hint:
    role = draw(st.none() | st.sampled_from(ROLE_NAMES))
    instance = draw(st.none() | INSTANCE_NAMES) if role is not None else draw(INSTANCE_NAMES)
    spelled = format_hint(role, instance)
    if draw(st.booleans()):  # hints are case-insensitive and whitespace-tolerant
        spelled = spelled.replace("picopool:", "PicoPool :").replace("role=", "ROLE = ")
    return Hint(role, instance, draw(st.booleans()), spelled)


@dataclass(frozen=True)
class RouterAnswer:
    value: str | None

    @property
    def role(self) -> RoleRequest | None:
        return RoleRequest(self.value) if self.value in ROLE_NAMES else None


ROUTER_ANSWERS = st.builds(RouterAnswer, st.none() | st.sampled_from(ROLE_NAMES) | INSTANCE_NAMES)


def is_write(query: str, policy: RoutingPolicy) -> bool:
    info = classify(query)
    return info.is_write or bool(info.functions & policy.write_functions)


def classifier_guess(query: str, policy: RoutingPolicy, symmetric: bool) -> RoleRequest:
    return RoleRequest.PRIMARY if is_write(query, policy) else read_request(policy, symmetric)


@given(
    base=BASE,
    policy=policies(),
    explicit=st.none() | st.sampled_from(ROLES),
    scoped=st.none() | st.sampled_from(ROLES),
    hint=st.none() | hints(),
    answer=st.none() | ROUTER_ANSWERS,
)
def test_priority_explicit_scoped_hint_router_classifier(
    base: str, policy: RoutingPolicy, explicit: RoleRequest | None,
    scoped: RoleRequest | None, hint: Hint | None, answer: RouterAnswer | None,
) -> None:
    query = hint.apply(base) if hint is not None else base
    calls: list[tuple[str, str]] = []
    if answer is not None:
        def router(q: str, guess: str) -> str | None:
            calls.append((q, guess))
            return answer.value
        policy = RoutingPolicy(policy.split, policy.fallback_to_primary, policy.write_functions,
                               router=router, elide_reset=policy.elide_reset)
    decision = decide(query, explicit=explicit, scoped=scoped, policy=policy, symmetric=False,
                      strip_comments=False)
    guess = classifier_guess(base, policy, symmetric=False)
    assert decision.is_write == is_write(base, policy)
    assert decision.query == query
    router_consulted = explicit is None and scoped is None and hint is None
    assert bool(calls) == (router_consulted and answer is not None)
    if explicit is not None:
        assert (decision.request, decision.instance) == (explicit, None)
    elif scoped is not None:
        assert (decision.request, decision.instance) == (scoped, None)
    elif hint is not None:
        expected = RoleRequest(hint.role) if hint.role is not None else guess
        assert (decision.request, decision.instance) == (expected, hint.instance)
    elif answer is not None and answer.value is not None:
        assert calls == [(query, guess.value)]
        if answer.role is not None:
            assert (decision.request, decision.instance) == (answer.role, None)
        else:
            assert (decision.request, decision.instance) == (guess, answer.value)
    else:
        assert (decision.request, decision.instance) == (guess, None)


@given(
    base=BASE,
    policy=policies(),
    explicit=st.none() | st.sampled_from(ROLES),
    scoped=st.none() | st.sampled_from(ROLES),
    hint=st.none() | hints().filter(lambda h: h.instance is None),
    answer=st.none() | st.sampled_from(ROLE_NAMES).map(RouterAnswer),
)
def test_symmetric_clusters_route_everything_to_any(
    base: str, policy: RoutingPolicy, explicit: RoleRequest | None,
    scoped: RoleRequest | None, hint: Hint | None, answer: RouterAnswer | None,
) -> None:
    query = hint.apply(base) if hint is not None else base
    if answer is not None:
        value = answer.value
        policy = RoutingPolicy(policy.split, policy.fallback_to_primary, policy.write_functions,
                               router=lambda q, g: value, elide_reset=policy.elide_reset)
    decision = decide(query, explicit=explicit, scoped=scoped, policy=policy, symmetric=True,
                      strip_comments=False)
    assert decision.request is RoleRequest.ANY
    assert decision.instance is None
    # the classification itself is unchanged
    assert decision.is_write == is_write(base, policy)


@given(base=BASE, hint=hints(), symmetric=st.booleans())
def test_symmetric_instance_hint_keeps_the_instance(base: str, hint: Hint, symmetric: bool) -> None:
    decision = decide(hint.apply(base), explicit=None, scoped=None, policy=RoutingPolicy(),
                      symmetric=symmetric, strip_comments=symmetric)
    assert decision.instance == hint.instance
    if decision.instance is None:
        assert not symmetric or decision.request is RoleRequest.ANY


@given(base=BASE, hint=hints(), policy=policies(), symmetric=st.booleans())
@example(base="select 1", hint=Hint("primary", None, False, "/* picopool: role=primary */"),
         policy=RoutingPolicy(), symmetric=False)
def test_strip_comments_removes_the_hint_but_keeps_its_routing(
    base: str, hint: Hint, policy: RoutingPolicy, symmetric: bool
) -> None:
    query = hint.apply(base)
    kept = decide(query, explicit=None, scoped=None, policy=policy, symmetric=symmetric,
                  strip_comments=False)
    stripped = decide(query, explicit=None, scoped=None, policy=policy, symmetric=symmetric,
                      strip_comments=True)
    assert kept.query == query
    assert stripped.query == base
    assert "picopool" not in stripped.query.lower()
    assert parse_hint(stripped.query) is None
    assert (stripped.request, stripped.instance, stripped.is_write, stripped.elide_reset) == (
        kept.request, kept.instance, kept.is_write, kept.elide_reset)


@given(base=BASE, policy=policies())
def test_strip_comments_without_a_hint_sends_the_text_unchanged(
    base: str, policy: RoutingPolicy
) -> None:
    for query in (base, f"/* not a hint */ {base}", f"{base} -- trailing comment",
                  f"{base} /* picopool */"):
        decision = decide(query, explicit=None, scoped=None, policy=policy, symmetric=True,
                          strip_comments=True)
        assert decision.query == query


SQL_PIECES = st.sampled_from([
    "select", "insert", "with", "(", ")", ";", "'", '"', "$$", "$1", "/*", "*/", "--", "\n",
    " ", "for update", "picopool:", "role=primary", "instance=x", "/* picopool: role=replica */",
    "E'\\'", "U&'", "nextval(", "set_config(", ",", "::", "x", "1",
])
ARBITRARY = st.text() | st.lists(SQL_PIECES | st.text(max_size=3), max_size=30).map("".join)


def _check(decision: Decision) -> None:
    assert isinstance(decision.request, RoleRequest)
    assert decision.instance is None or isinstance(decision.instance, str)
    assert isinstance(decision.query, str)
    assert isinstance(decision.is_write, bool)
    assert isinstance(decision.elide_reset, bool)


@given(
    query=ARBITRARY,
    policy=policies(),
    explicit=st.none() | st.sampled_from(ROLES),
    scoped=st.none() | st.sampled_from(ROLES),
    symmetric=st.booleans(),
    strip=st.booleans(),
)
@example(query="", policy=RoutingPolicy(), explicit=None, scoped=None, symmetric=False,
         strip=True)
@example(query="/* picopool: role=primary */", policy=RoutingPolicy(), explicit=None,
         scoped=None, symmetric=True, strip=True)
@example(query="/* picopool: role=primary */ /* picopool: role=replica */",
         policy=RoutingPolicy(), explicit=None, scoped=None, symmetric=True, strip=True)
@example(query="\x00", policy=RoutingPolicy(), explicit=None, scoped=None, symmetric=False,
         strip=True)
def test_decide_never_raises_without_hooks(
    query: str, policy: RoutingPolicy, explicit: RoleRequest | None,
    scoped: RoleRequest | None, symmetric: bool, strip: bool,
) -> None:
    decision = decide(query, explicit=explicit, scoped=scoped, policy=policy,
                      symmetric=symmetric, strip_comments=strip)
    _check(decision)
    if not strip:
        assert decision.query == query
    if symmetric and decision.instance is None:
        assert decision.request is RoleRequest.ANY
    info = classify(query)
    if info.is_write:
        assert decision.is_write and not (decision.elide_reset and info.leaves_session_state)
    if not policy.elide_reset:
        assert not decision.elide_reset


@given(query=ARBITRARY, policy=policies())
def test_unparseable_or_unknown_text_errs_towards_the_primary(
    query: str, policy: RoutingPolicy
) -> None:
    """What the classifier cannot prove a read goes to the primary with a full reset."""
    decision = decide(query, explicit=None, scoped=None, policy=policy, symmetric=False,
                      strip_comments=False)
    info = classify(query)
    if info.reason in ("unparseable", "unknown statement", "empty"):
        assert decision.is_write
        assert not decision.elide_reset
        if info.hint is None:
            assert decision.request is RoleRequest.PRIMARY


@given(base=BASE, policy=policies(), symmetric=st.booleans(), strip=st.booleans())
def test_rewrite_runs_first_and_routing_sees_its_result(
    base: str, policy: RoutingPolicy, symmetric: bool, strip: bool
) -> None:
    seen: list[str] = []

    def rewrite(query: str) -> str:
        seen.append(query)
        return "/* picopool: role=primary */ " + query + " for update"

    rewriting = RoutingPolicy(policy.split, policy.fallback_to_primary, policy.write_functions,
                              rewrite=rewrite, elide_reset=policy.elide_reset)
    decision = decide(base, explicit=None, scoped=None, policy=rewriting, symmetric=symmetric,
                      strip_comments=strip)
    assert seen == [base]
    rewritten = "/* picopool: role=primary */ " + base + " for update"
    assert decision.query == (base + " for update" if strip else rewritten)
    assert decision.is_write == classify(rewritten).is_write
    if not symmetric:
        assert decision.request is RoleRequest.PRIMARY


@given(policy=policies(), qualified=st.booleans(), upper=st.booleans())
def test_write_functions_and_volatile_functions_are_writes(
    policy: RoutingPolicy, qualified: bool, upper: bool
) -> None:
    name = ("app." if qualified else "") + ("MY_FUNC" if upper else "my_func")
    query = f"select {name}($1)"
    plain = decide(query, explicit=None, scoped=None, policy=policy, symmetric=False,
                   strip_comments=False)
    assert not plain.is_write
    assert plain.request is read_request(policy, False)
    assert not plain.elide_reset  # a user function may set state
    volatile = decide(query, explicit=None, scoped=None, policy=policy, symmetric=False,
                      strip_comments=False, volatile_functions=frozenset({"my_func"}))
    assert volatile.is_write
    assert volatile.request is RoleRequest.PRIMARY
    assert not volatile.elide_reset


@pytest.mark.parametrize(("split", "fallback", "expected"), [
    (ReadWriteSplit.REPLICAS, True, RoleRequest.PREFER_REPLICA),
    (ReadWriteSplit.REPLICAS, False, RoleRequest.REPLICA),
    (ReadWriteSplit.INCLUDE_PRIMARY, True, RoleRequest.ANY),
    (ReadWriteSplit.INCLUDE_PRIMARY, False, RoleRequest.ANY),
    (ReadWriteSplit.OFF, True, RoleRequest.PRIMARY),
    (ReadWriteSplit.OFF, False, RoleRequest.PRIMARY),
])
def test_read_request_table(split: ReadWriteSplit, fallback: bool, expected: RoleRequest) -> None:
    policy = RoutingPolicy(split=split, fallback_to_primary=fallback)
    assert read_request(policy, symmetric=False) is expected
    assert read_request(policy, symmetric=True) is RoleRequest.ANY
    for read in READS:
        decision = decide(read, explicit=None, scoped=None, policy=policy, symmetric=False,
                          strip_comments=False)
        assert decision.request is expected
