"""The slow-query log: ``create_pool(slow_query_threshold=seconds)``.

A listener on the instrumentation seam. Each attempt that took at least the
threshold is logged at WARNING to the ``picopool.slow`` logger: the statement
(truncated, with string literals after ``PASSWORD`` masked), its duration, the
instance, its role, why it went there, and the outcome. Parameters are logged only
with ``log_parameters=True`` (each one truncated). The instance is named by its
label (``name@host:port``): a DSN, and so its password, is never logged.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ._events import Event, StatementFinished

logger = logging.getLogger("picopool.slow")

MAX_STATEMENT = 500  # characters of the statement logged
MAX_PARAMETER = 100  # characters of each parameter's repr logged
MAX_PARAMETERS = 20

# ALTER/CREATE ROLE ... PASSWORD 'secret' (and ENCRYPTED PASSWORD, dollar quotes)
_PASSWORD_LITERAL = re.compile(
    r"""(?is)(\bpassword\s+)('(?:[^']|'')*'|E'(?:[^'\\]|\\.|'')*'|\$([A-Za-z_]*)\$.*?\$\3\$)""")


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())  # one line per record
    return text if len(text) <= limit else text[:limit - 1] + "…"


def redact(query: str) -> str:
    """*query* with every string literal that follows ``PASSWORD`` replaced."""
    return _PASSWORD_LITERAL.sub(r"\1'***'", query)


def format_parameters(args: tuple[Any, ...]) -> str:
    shown = [_shorten(repr(a), MAX_PARAMETER) for a in args[:MAX_PARAMETERS]]
    if len(args) > MAX_PARAMETERS:
        shown.append(f"... {len(args) - MAX_PARAMETERS} more")
    return "(" + ", ".join(shown) + ")"


class SlowQueryLog:
    """Logs attempts that took *threshold* seconds or more to ``picopool.slow``."""

    __slots__ = ("log_parameters", "threshold")

    def __init__(self, threshold: float, *, log_parameters: bool = False) -> None:
        if threshold < 0:
            raise ValueError("slow_query_threshold must be >= 0")
        self.threshold = threshold
        self.log_parameters = log_parameters

    def __call__(self, event: Event) -> None:
        if type(event) is not StatementFinished or event.duration < self.threshold:
            return
        if not logger.isEnabledFor(logging.WARNING):
            return
        statement = _shorten(redact(event.query), MAX_STATEMENT)
        retry = f", attempt {event.attempt + 1}" if event.attempt else ""
        # For structured handlers; the parameters are never among them.
        extra = {"picopool_instance": event.instance, "picopool_role": event.role,
                 "picopool_reason": event.reason, "picopool_duration": event.duration}
        if self.log_parameters:
            logger.warning(
                "slow %s: %.3f s on %s (%s, %s%s) %s: %s parameters=%s",
                event.method, event.duration, event.instance, event.role, event.reason,
                retry, event.outcome, statement, format_parameters(event.args),
                extra=extra)
        else:
            logger.warning(
                "slow %s: %.3f s on %s (%s, %s%s) %s: %s",
                event.method, event.duration, event.instance, event.role, event.reason,
                retry, event.outcome, statement, extra=extra)
