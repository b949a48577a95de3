"""Secrets never show: not in reprs, error messages or log lines, whatever their characters.

A secret is the password of a DSN (in its user info, as ``password=`` of a key/value
DSN or as a ``?password=`` query parameter), any other parameter whose name marks it
as one (``sslpassword``, ``...secret...``, ``...token...``; see ``picopool._dsn``), and
the ``password=`` / ``sslpassword=`` keyword arguments of ``create_pool``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import picopool
from picopool import ConfigurationError, mask_dsn
from picopool._dsn import asyncpg_dsn, is_secret_parameter, seed_addresses

SECRET = "Zq9-s3cr3t-VALUE"


def _unused_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextmanager
def _captured_logs() -> Iterator[list[str]]:
    """Every line the picopool loggers (and asyncpg's) write meanwhile, with tracebacks."""
    handler = _Capture()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    loggers = [logging.getLogger(name) for name in ("picopool", "asyncpg")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _texts_of(error: BaseException) -> list[str]:
    """str() and repr() of an error and of every error chained to it."""
    texts: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current)]
        pending += [current.__cause__, current.__context__]
    return texts


FAST: dict[str, Any] = {
    "min_size": 1, "max_size": 1, "connect_timeout": 0.5, "failover_timeout": 0.5,
    "topology_refresh_interval": None, "health_check_interval": None, "max_retries": 0,
}


async def _exercise(dsn: str, **kwargs: Any) -> list[str]:
    """Build (and, if that works, start) a pool; every text it showed on the way."""
    texts: list[str] = []
    with _captured_logs() as lines:
        try:
            pool = picopool.create_pool(dsn, **{**FAST, **kwargs})
        except Exception as exc:  # a DSN rejected up front
            texts += _texts_of(exc)
        else:
            texts.append(repr(pool))
            try:
                await asyncio.wait_for(pool, 10)
            except Exception as exc:
                texts += _texts_of(exc)
            texts.append(repr(pool))
            texts.append(repr(pool.stats()))
            pool.terminate()
            texts.append(repr(pool))
    return texts + lines


def _assert_hidden(secret: str, texts: list[str]) -> None:
    encoded = urllib.parse.quote(secret, safe="")
    for text in texts:
        assert secret not in text, text
        assert encoded not in text, text


# -- the reproduced defects ------------------------------------------------------------


def test_sslpassword_query_parameter_is_masked_in_the_repr() -> None:
    pool = picopool.create_pool(f"postgres://app:pw@127.0.0.1:5432/db?sslpassword={SECRET}")
    assert SECRET not in repr(pool)
    assert "sslpassword=***" in repr(pool)


def test_password_with_an_unencoded_slash_is_not_echoed_by_the_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        picopool.create_pool("postgres://app:pa/ss-w0rd@127.0.0.1:5432/db")
    _assert_hidden("pa/ss-w0rd", _texts_of(info.value))
    assert "percent-encode" in str(info.value)
    for piece in ("pa/ss", "ss-w0rd"):  # not even a part of it
        assert piece not in str(info.value)


@pytest.mark.parametrize("keyword", ["password", "sslpassword"])
async def test_secret_keyword_arguments_never_show(keyword: str) -> None:
    dsn = f"postgres://app@127.0.0.1:{_unused_port()}/db"
    texts = await _exercise(dsn, **{keyword: SECRET})
    assert any("picopool.Pool" in text for text in texts)
    _assert_hidden(SECRET, texts)


# -- masking in general ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        ("postgres://u@h/db?sslpassword=s3&sslmode=require",
         "postgres://u@h/db?sslpassword=***&sslmode=require"),
        ("postgres://u@h/db?SSLPassword=s3", "postgres://u@h/db?SSLPassword=***"),
        ("postgres://u@h/db?app.api_token=s3&x=1", "postgres://u@h/db?app.api_token=***&x=1"),
        ("postgres://u@h/db?my_secret=s3", "postgres://u@h/db?my_secret=***"),
        ("postgres://u@h/db?pass%77ord=s3", "postgres://u@h/db?pass%77ord=***"),
        ("postgres://u@h/db?password=a#b&c=d", "postgres://u@h/db?password=***&c=d"),
        ("postgres://u@h/db?password=a&b&c=d", "postgres://u@h/db?password=***&c=d"),
        ("postgres://u@h/db?sslkey=/k.pem&sslcert=/c.pem",
         "postgres://u@h/db?sslkey=/k.pem&sslcert=/c.pem"),
        ("host=h sslpassword=s3 user=u", "host=h sslpassword=*** user=u"),
        ("host=h app.token='a b' user=u", "host=h app.token=*** user=u"),
        ("host=h password='unterminated user=u", "host=h password=***"),
        # user info runs to the last "@": a password with "/", "@", "?" or "#" stays hidden
        ("postgres://u:pa/ss@h:1/db", "postgres://u:***@h:1/db"),
        ("postgres://u:p@ss@h:1/db", "postgres://u:***@h:1/db"),
        ("postgres://u:p?s#s@h:1/db", "postgres://u:***@h:1/db"),
        ("postgresql://me@corp:pw@h/db", "postgresql://me@corp:***@h/db"),
        ("  POSTGRES://u:pw@h/db", "  POSTGRES://u:***@h/db"),
        # not a URL nor key/value: anything like user:password@ is still hidden
        ("postgres:/u:pw@h/db", "postgres:***@h/db"),
    ],
)
def test_mask_dsn_masks_every_secret_parameter(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


@pytest.mark.parametrize(
    ("name", "secret"),
    [("password", True), ("sslpassword", True), ("PassWord", True), ("passwd", True),
     ("client_secret", True), ("app.api_token", True), ("x.credentials", True),
     ("apikey", True), ("user", False), ("sslkey", False), ("sslcert", False),
     ("passfile", False), ("host", False), ("application_name", False)],
)
def test_secret_parameter_names(name: str, secret: bool) -> None:
    assert is_secret_parameter(name) is secret


@pytest.mark.parametrize(
    "dsn",
    [
        "postgres://app:pa/ss@127.0.0.1:5432/db",     # "/" ends the host part for asyncpg
        "postgres://app:1234/ss@127.0.0.1:5432/db",   # ... even when the rest looks like a port
        "postgres://app:p@ss@127.0.0.1:5432/db",      # asyncpg splits at the first "@"
        "postgres://app:pa?ss@127.0.0.1:5432/db",
        "postgres://app:pa#ss@127.0.0.1:5432/db",
        "postgres://app:pa\uff0fss@127.0.0.1:5432/db",  # a fullwidth "/": urllib refuses it
        "postgres://app@127.0.0.1:5432/db?password=a&b",  # asyncpg: "bad query field"
    ],
)
def test_ambiguous_dsns_are_refused_without_echoing_them(dsn: str) -> None:
    for build in (asyncpg_dsn, lambda d: seed_addresses(d, {}), picopool.create_pool):
        with pytest.raises(ConfigurationError) as info:
            build(dsn)
        for text in _texts_of(info.value):
            for piece in ("pa/ss", "1234/ss", "p@ss", "pa?ss", "pa#ss", "ss@", "a&b"):
                assert piece not in text


@pytest.mark.parametrize(
    "dsn",
    [
        "postgres://app:pa%2Fss@127.0.0.1:5432/db",
        "postgres://app:p%40ss:w@127.0.0.1:5432/db",  # ":" may stay unencoded
        "postgres://h:5432/db?user=me@corp",           # an "@" in a query value is fine
        "postgres://app:p%C3%A4ss@h1,h2:7/db?sslmode=disable",
        "postgres://app:pässwörd@h/db",
    ],
)
def test_well_formed_dsns_are_accepted(dsn: str) -> None:
    assert asyncpg_dsn(dsn) == dsn
    assert seed_addresses(dsn, {})
    picopool.create_pool(dsn)


# -- the property ----------------------------------------------------------------------

#: Printable characters, the URL delimiters, "%" and some non-ASCII (fullwidth
#: delimiters among them: urllib refuses them in a URL's host part, quoting it).
PASSWORD_CHARACTERS = st.sampled_from(
    "abcdefXYZ0123456789-_.~!$&'()*+,;= /@:#?%[]é✓ß日\uff0f\uff20\uff1a\ufe6b"
)
SPECIAL = set("/@:#?%&=+ []'") | {c for c in "é✓ß日\uff0f\uff20\uff1a\ufe6b"}


def _skeletons(port: int) -> str:
    """What the tests' output may legitimately contain besides the password."""
    return (
        f"postgres://app:***@127.0.0.1:{port}/db?sslmode=disable&sslpassword=*** "
        f"host=127.0.0.1 port={port} user=app password=*** dbname=db picopool.Pool new "
        "closed ConfigurationError NoAvailableInstanceError TopologyError"
    )


def _passwords() -> st.SearchStrategy[str]:
    return st.text(PASSWORD_CHARACTERS, min_size=4, max_size=16)


def _kv_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dsns(password: str, port: int) -> list[tuple[str, dict[str, Any]]]:
    encoded = urllib.parse.quote(password, safe="")
    base = f"postgres://app@127.0.0.1:{port}/db?sslmode=disable"
    dsns: list[tuple[str, dict[str, Any]]] = [
        (f"postgres://app:{password}@127.0.0.1:{port}/db?sslmode=disable", {}),  # as typed
        (f"postgres://app:{encoded}@127.0.0.1:{port}/db?sslmode=disable", {}),
        (f"{base}&password={encoded}", {}),
        (f"{base}&sslpassword={encoded}", {}),
        (f"host=127.0.0.1 port={port} user=app password={_kv_quote(password)} dbname=db", {}),
        (base, {"password": password}),
        (base, {"password": password, "sslpassword": password}),
    ]
    if "&" not in password:  # in a query, a raw "&name=" starts the next parameter
        dsns.append((f"{base}&sslpassword={password}", {}))
    return dsns


@settings(max_examples=150)
@given(_passwords())
def test_passwords_never_show_when_building_a_pool(password: str) -> None:
    port = 1  # never connected to here
    assume(any(c in SPECIAL for c in password))
    assume(password not in _skeletons(port))
    for dsn, kwargs in _dsns(password, port):
        texts: list[str] = []
        with _captured_logs() as lines:
            try:
                pool = picopool.create_pool(dsn, **kwargs)
            except ConfigurationError as exc:
                texts += _texts_of(exc)
            else:
                texts.append(repr(pool))
        texts += [mask_dsn(dsn), *lines]
        _assert_hidden(password, texts)


@settings(max_examples=25)
@given(_passwords())
def test_passwords_never_show_when_a_pool_fails_to_start(password: str) -> None:
    port = _unused_port()
    assume(any(c in SPECIAL for c in password))
    assume(password not in _skeletons(port))

    async def attempt_all() -> list[str]:
        texts: list[str] = []
        for dsn, kwargs in _dsns(password, port):
            texts += await _exercise(dsn, **kwargs)
        return texts

    _assert_hidden(password, asyncio.run(attempt_all()))
