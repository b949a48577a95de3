"""WAL positions and read-your-writes tokens (pure)."""

from __future__ import annotations

import re

from ._errors import ConfigurationError

_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_TOKEN_PREFIX = "pp1:"


def parse_lsn(text: object) -> int | None:
    """``'16/B374D848'`` as a byte position, or None if it is not an LSN."""
    if not isinstance(text, str):
        return None
    match = _LSN.fullmatch(text.strip())
    if match is None:
        return None
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(position: int) -> str:
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


def format_causal_token(position: int) -> str:
    """A WAL position as a string a web app can carry from one request to the next."""
    return _TOKEN_PREFIX + format_lsn(position)


def parse_causal_token(token: str) -> int:
    """Read a token made by :func:`format_causal_token`; garbage is a ConfigurationError."""
    position = parse_lsn(token[len(_TOKEN_PREFIX):]) if token.startswith(_TOKEN_PREFIX) else None
    if position is None:
        raise ConfigurationError(f"not a picopool read-your-writes token: {token[:40]!r}")
    return position


class CausalScope:
    """A read-your-writes scope: the WAL position its reads must have reached."""

    __slots__ = ("lsn",)

    def __init__(self, lsn: int = 0) -> None:
        self.lsn = lsn

    def token(self) -> str:
        """The position as a string to carry to a later request."""
        return format_causal_token(self.lsn)

    def __repr__(self) -> str:
        return f"<read_your_writes {self.token()}>"
