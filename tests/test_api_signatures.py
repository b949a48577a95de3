"""picopool.Pool is a drop-in asyncpg.Pool: same public methods, same signatures.

Compared against the *installed* asyncpg, so an asyncpg upgrade that adds or
changes a parameter shows up here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import picopool
import picopool.strategies
from picopool import PoolClosedError
from picopool.cluster import LocalCluster

_EMPTY = inspect.Parameter.empty

#: asyncpg.create_pool parameters picopool takes through ``**connect_kwargs``
#: instead of naming them. ``loop`` has been deprecated (and ignored) since
#: asyncpg 0.22; picopool accepts it and drops it.
_ABSORBED_BY_KWARGS = {"loop"}


def _public_methods(cls: type) -> list[str]:
    return sorted(
        name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))
    )


ASYNCPG_METHODS = _public_methods(asyncpg.Pool)


def _describe(parameter: inspect.Parameter) -> str:
    default = "" if parameter.default is _EMPTY else f"={parameter.default!r}"
    return f"{parameter.kind.name} {parameter.name}{default}"


def signature_problems(theirs: inspect.Signature, ours: inspect.Signature) -> list[str]:
    """Why *ours* cannot stand in for *theirs* (empty when it can).

    Ours must have every parameter of theirs, in the same order, with the same
    kind and default. It may add parameters only if they are keyword-only and
    have a default, so every call valid against asyncpg stays valid.
    """
    problems: list[str] = []
    expected = list(theirs.parameters.values())
    index = 0
    for parameter in ours.parameters.values():
        if index < len(expected) and parameter.name == expected[index].name:
            original = expected[index]
            if parameter.kind is not original.kind:
                problems.append(f"{parameter.name}: {_describe(parameter)}, "
                                f"asyncpg has {_describe(original)}")
            elif parameter.default != original.default:
                problems.append(f"{parameter.name}: default {parameter.default!r}, "
                                f"asyncpg has {original.default!r}")
            index += 1
        elif parameter.name in theirs.parameters:
            problems.append(f"{parameter.name} is out of order")
        elif parameter.kind is not inspect.Parameter.KEYWORD_ONLY or parameter.default is _EMPTY:
            problems.append(f"added {_describe(parameter)}: extensions must be keyword-only "
                            "with a default")
    missing = [p.name for p in expected[index:] if p.name not in ours.parameters]
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    return problems


def test_asyncpg_has_the_expected_public_api() -> None:
    """Guards the parametrisation below against an empty or broken method list."""
    assert {"acquire", "release", "close", "terminate", "execute", "fetch", "fetchval",
            "fetchrow", "copy_to_table", "expire_connections",
            "set_connect_args"} <= set(ASYNCPG_METHODS)


@pytest.mark.parametrize("name", ASYNCPG_METHODS)
def test_pool_method_matches_asyncpg(name: str) -> None:
    ours: Callable[..., Any] | None = getattr(picopool.Pool, name, None)
    assert ours is not None and callable(ours), f"picopool.Pool lacks {name}()"
    theirs = getattr(asyncpg.Pool, name)
    problems = signature_problems(inspect.signature(theirs), inspect.signature(ours))
    assert not problems, f"Pool.{name}: " + "; ".join(problems)
    # An async method must stay async (and a sync one sync): callers await or don't.
    assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(theirs), name


def test_signature_checker_rejects_incompatible_changes() -> None:
    """The checker itself: what it must refuse."""

    def base(self: Any, query: str, *args: Any, timeout: float | None = None) -> None: ...

    def ok(self: Any, query: str, *args: Any, timeout: float | None = None,
           role: str | None = None) -> None: ...

    def positional_extra(self: Any, query: str, extra: int = 0, *args: Any,
                         timeout: float | None = None) -> None: ...

    def required_extra(self: Any, query: str, *args: Any, timeout: float | None = None,
                       role: str) -> None: ...

    def other_default(self: Any, query: str, *args: Any, timeout: float | None = 5) -> None: ...

    def missing(self: Any, query: str, *args: Any) -> None: ...

    def reordered(self: Any, *args: Any, query: str, timeout: float | None = None) -> None: ...

    reference = inspect.signature(base)
    assert signature_problems(reference, inspect.signature(ok)) == []
    for bad in (positional_extra, required_extra, other_default, missing, reordered):
        assert signature_problems(reference, inspect.signature(bad)), bad.__name__


def test_create_pool_takes_every_asyncpg_argument() -> None:
    theirs = inspect.signature(asyncpg.create_pool).parameters
    ours = inspect.signature(picopool.create_pool).parameters
    var_keyword = [p for p in ours.values() if p.kind is inspect.Parameter.VAR_KEYWORD]
    assert var_keyword, "picopool.create_pool must take **connect_kwargs like asyncpg"
    for name, parameter in theirs.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        if name in _ABSORBED_BY_KWARGS:
            assert name not in ours or ours[name].default == parameter.default
            continue
        assert name in ours, f"picopool.create_pool lacks {name}"
        assert ours[name].kind is parameter.kind, name
        assert ours[name].default == parameter.default, (
            f"{name}: default {ours[name].default!r}, asyncpg has {parameter.default!r}")
    for name, parameter in ours.items():
        if name not in theirs and parameter.kind is not inspect.Parameter.VAR_KEYWORD:
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, name
            assert parameter.default is not _EMPTY, name


def test_create_pool_drops_loop() -> None:
    """``loop=`` is absorbed by ``**connect_kwargs`` and not passed on to asyncpg.connect."""
    pool = picopool.create_pool("postgres://user@127.0.0.1:1/db", loop=None)
    assert "loop" not in pool._membership._connect_kwargs
    pool.terminate()


def test_errors_extend_asyncpg_errors() -> None:
    for error in (picopool.PicopoolError, picopool.ConfigurationError, picopool.PoolClosedError,
                  picopool.TopologyError, picopool.NoAvailableInstanceError):
        assert issubclass(error, asyncpg.InterfaceError), error
    assert issubclass(picopool.ConfigurationError, ValueError)


@pytest.mark.parametrize("name", picopool.__all__)
def test_exported_names_live_in_picopool(name: str) -> None:
    value = getattr(picopool, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__ == "picopool", f"{name}.__module__ == {value.__module__!r}"


@pytest.mark.parametrize("name", picopool.strategies.__all__)
def test_exported_strategies_live_in_their_package(name: str) -> None:
    assert getattr(picopool.strategies, name).__module__ == "picopool.strategies"


def test_all_is_complete_and_sorted() -> None:
    assert sorted(picopool.__all__) == list(picopool.__all__)
    assert len(set(picopool.__all__)) == len(picopool.__all__)
    for name in picopool.__all__:
        assert hasattr(picopool, name), name


# -- await pool / async with pool (as with asyncpg) ---------------------------------


@pytest.mark.integration
async def test_await_pool_starts_it_once(cluster: LocalCluster) -> None:
    pool = picopool.create_pool(cluster.dsn, min_size=1, max_size=1)
    assert repr(pool).startswith("<picopool.Pool new")
    try:
        started = await pool
        assert started is pool
        assert await pool is pool  # awaiting again is a no-op, as in asyncpg
        assert await pool.fetchval("select 1") == 1
    finally:
        await pool.close()
    assert pool.is_closing()


@pytest.mark.integration
async def test_async_with_pool(cluster: LocalCluster) -> None:
    async with picopool.create_pool(cluster.dsn, min_size=1, max_size=1) as pool:
        assert isinstance(pool, picopool.Pool)
        assert await pool.fetchval("select 2") == 2
        async with pool.acquire() as connection:
            assert await connection.fetchval("select 3") == 3
        connection = await pool.acquire()
        try:
            assert await connection.fetchval("select 4") == 4
        finally:
            await pool.release(connection)
    assert pool.is_closing()
    with pytest.raises(PoolClosedError):
        await pool.fetchval("select 1")


@pytest.mark.integration
async def test_query_before_start_is_refused(cluster: LocalCluster) -> None:
    """Like asyncpg, an un-awaited pool refuses work instead of hanging."""
    pool = picopool.create_pool(cluster.dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(asyncpg.InterfaceError):
            await pool.fetchval("select 1")
    finally:
        await pool.close()
